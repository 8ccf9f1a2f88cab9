"""Who may use the server: the Origin and Host allow-lists and the token, as pure functions.

A browser lets any web page open a WebSocket or POST a form to
`http://127.0.0.1:8765`; only the `Origin` header says which page did it. And
a page on a name the attacker controls can be re-pointed at 127.0.0.1 (DNS
rebinding), which the `Host` header then gives away. So every request but
`GET /healthz` is checked:

- `Host` must name the server by an IP address, `localhost`, the name it was
  bound to, or the host of an allowed origin. A rebound name is none of these.
- `Origin`, when a browser sends one, must be the page's own origin (the
  same host and port as `Host`), a loopback origin, or one given with
  `--allow-origin` (`*` allows any). Clients that are not browsers send none.
- With a token (`--token`, or VOICE_TOKEN), the request must carry it, as
  `Authorization: Bearer TOKEN` (HTTP clients, the `openai` client's api_key),
  `?token=TOKEN` (WebSocket clients that cannot set headers), or the
  `voice_token` cookie the page sets when it is opened as `/?token=TOKEN`
  (so that a browser's scripts and WebSocket carry it too).

The server (`voice.server`) applies `check` to every request before routing.
"""
from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from .protocol import ErrorCode

__all__ = ["AccessPolicy", "Denied", "check", "is_loopback", "OPEN_PATHS", "TOKEN_COOKIE"]

TOKEN_COOKIE = "voice_token"
OPEN_PATHS = ("/healthz",)  # answered to anyone who can reach the port: liveness probes carry no token
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _hostname(netloc: str) -> str:
    """The host part of `host[:port]` or `[v6][:port]`, lower-cased."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


@dataclass(frozen=True)
class AccessPolicy:
    """What `check` lets through.

    Attributes:
        bind_host: the address the server listens on; a name here is an allowed Host.
        allow_origins: origins (`scheme://host[:port]`) allowed beside the page's own and
            loopback ones; `"*"` allows every origin.
        token: when set, every request but `OPEN_PATHS` must carry it.
    """

    bind_host: str = "127.0.0.1"
    allow_origins: tuple[str, ...] = ()
    token: str | None = None

    def __post_init__(self) -> None:
        for origin in self.allow_origins:
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/")):
                raise ValueError(f"an allowed origin is '*' or scheme://host[:port] (http or https), got {origin!r}")
        if self.token is not None and not self.token.strip():
            raise ValueError("the token is empty")

    def _origins(self) -> set[str]:
        return {o.rstrip("/").lower() for o in self.allow_origins}


@dataclass(frozen=True)
class Denied:
    """A refused request: the HTTP status to answer, the error code, and why."""

    status: int
    code: str
    message: str


def check(policy: AccessPolicy, *, path: str, headers: Mapping[str, str], query: str = "") -> Denied | None:
    """None if the request may go on, else why not. `headers` are lower-cased names; `query`
    is the raw query string.

    >>> check(AccessPolicy(), path="/ws", headers={"host": "127.0.0.1:8765", "origin": "http://evil.example"})
    Denied(status=403, code='forbidden', message="origin 'http://evil.example' is not allowed ...")
    """
    if path in OPEN_PATHS:
        return None
    host = headers.get("host", "")
    name = _hostname(host)
    allowed_names = {_hostname(urlsplit(o).netloc) for o in policy._origins() if o != "*"}
    if policy.bind_host not in WILDCARD_HOSTS:
        allowed_names.add(_hostname(policy.bind_host))
    if host and not (_is_ip(name) or is_loopback(name) or name in allowed_names):
        return Denied(403, ErrorCode.FORBIDDEN, f"host {host[:80]!r} is not allowed: address the server by IP, "
                      "localhost, or a name given with --allow-origin")
    origin = headers.get("origin")
    if origin is not None:
        o = origin.strip().rstrip("/").lower()
        netloc = urlsplit(o).netloc
        same = bool(host) and netloc == host.strip().lower()
        loopback = urlsplit(o).scheme in ("http", "https") and is_loopback(_hostname(netloc))
        if not (same or loopback or o in policy._origins() or "*" in policy.allow_origins):
            return Denied(403, ErrorCode.FORBIDDEN, f"origin {origin[:80]!r} is not allowed: the server takes its "
                          "own page and loopback pages; add others with --allow-origin")
    if policy.token is not None:
        given = ""
        auth = headers.get("authorization", "")
        cookies = dict(part.strip().partition("=")[::2] for part in headers.get("cookie", "").split(";"))
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif "token=" in query:
            given = (parse_qs(query).get("token") or [""])[0]
        else:
            given = cookies.get(TOKEN_COOKIE, "")
        if not hmac.compare_digest(given.encode(), policy.token.encode()):
            return Denied(401, ErrorCode.UNAUTHORIZED, "this server needs its token: send "
                          "'Authorization: Bearer TOKEN', or ?token=TOKEN on a WebSocket URL")
    return None
