"""Who may use the server (`voice.access`) and the audio pace (`voice.limits`), as pure functions, no sockets."""
from __future__ import annotations

import pytest

from voice.access import AccessPolicy, check, is_loopback
from voice.limits import AudioBudget

LOCAL = {"host": "127.0.0.1:8765"}


def refused(policy: AccessPolicy, path: str = "/ws", query: str = "", **headers) -> str | None:
    denied = check(policy, path=path, headers={k.replace("_", "-"): v for k, v in headers.items()}, query=query)
    return None if denied is None else f"{denied.status} {denied.code}"


def test_origins_same_origin_and_loopback_by_default():
    """The page's own origin, loopback pages and clients with no Origin pass; any other page is refused."""
    p = AccessPolicy()
    assert refused(p, **LOCAL) is None
    assert refused(p, **LOCAL, origin="http://127.0.0.1:8765") is None
    assert refused(p, **LOCAL, origin="http://localhost:3000") is None
    assert refused(p, host="[::1]:8765", origin="http://[::1]:8765") is None
    for bad in ("http://evil.example", "null", "http://127.0.0.1.evil.example", "file://", "https://evil.example:8765"):
        assert refused(p, **LOCAL, origin=bad) == "403 forbidden", bad
    for path in ("/cleanup", "/v1/cleanup", "/v1/chat/completions", "/v1/models", "/", "/metrics"):
        assert refused(p, path, **LOCAL, origin="http://evil.example") == "403 forbidden", path


def test_allow_origin_extends_the_list():
    """--allow-origin adds pages (and their host names); '*' allows every page."""
    p = AccessPolicy(allow_origins=("https://app.example.com",))
    assert refused(p, **LOCAL, origin="https://app.example.com") is None
    assert refused(p, host="app.example.com", origin="https://app.example.com") is None
    assert refused(p, **LOCAL, origin="https://other.example.com") == "403 forbidden"
    assert refused(AccessPolicy(allow_origins=("*",)), **LOCAL, origin="http://evil.example") is None
    with pytest.raises(ValueError):
        AccessPolicy(allow_origins=("app.example.com",))


def test_host_names_that_could_be_rebound_are_refused():
    """A Host naming anything but an IP address, localhost or a configured name is refused (DNS rebinding)."""
    p = AccessPolicy()
    assert refused(p, host="evil.example:8765") == "403 forbidden"
    assert refused(p, host="evil.example:8765", origin="http://evil.example:8765") == "403 forbidden"
    for ok in ("localhost:8765", "192.168.1.7:8765", "[::1]:8765", "127.0.0.1"):
        assert refused(p, host=ok) is None, ok
    assert refused(AccessPolicy(bind_host="voice.lan", token="t"), host="voice.lan:8765",
                   authorization="Bearer t") is None
    assert refused(p, "/healthz", host="evil.example") is None  # liveness answers anyone


def test_token_on_every_route_but_healthz():
    """With a token, a request needs it as a Bearer header or ?token=; /healthz needs none."""
    p = AccessPolicy(token="s3cret")
    assert refused(p, **LOCAL) == "401 unauthorized"
    assert refused(p, "/v1/models", **LOCAL, authorization="Bearer wrong") == "401 unauthorized"
    assert refused(p, "/v1/models", **LOCAL, authorization="Bearer s3cret") is None
    assert refused(p, "/ws", query="token=s3cret", **LOCAL) is None
    assert refused(p, "/ws", query="token=s3cre", **LOCAL) == "401 unauthorized"
    assert refused(p, "/healthz", **LOCAL) is None
    assert is_loopback("127.0.0.2") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_audio_budget_allows_a_burst_then_real_time():
    """The bucket lets a burst through, then about `rate` seconds of audio per second; refusals cost nothing."""
    b = AudioBudget(rate=1.0, burst_s=2.0, at=100.0)
    assert b.take(2.0, at=100.0)
    assert not b.take(0.02, at=100.0)
    sent = sum(0.02 for i in range(1, 1001) if b.take(0.02, at=100.0 + i * 0.005))  # 5 s at 4x real time
    assert 4.9 <= sent <= 5.1


def test_token_from_the_pages_cookie():
    """The voice_token cookie (set when the page is opened with ?token=) carries the token for scripts and /ws."""
    p = AccessPolicy(token="s3cret")
    assert refused(p, "/app.js", **LOCAL, cookie="other=1; voice_token=s3cret") is None
    assert refused(p, "/ws", **LOCAL, cookie="voice_token=nope") == "401 unauthorized"
