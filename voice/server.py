"""The WebSocket server: voice sessions, the cleanup service, the page.

One `websockets.asyncio.server.serve` listener (127.0.0.1 unless told
otherwise) answers:

    /ws        voice sessions (`voice.session.VoiceSession`)
    /cleanup   raw transcripts in, cleaned ones out, batched by the engine
    GET /      the browser page from web/ (and its scripts)
    GET /healthz  200 with a small JSON status

The server is a thin shell: frames are parsed and events built by
`voice.protocol` (pure functions), the pipeline lives in the session, and
this module only moves bytes between the two, enforces the limits (frame
size, session count, the time allowed before session.start) and keeps one
connection's failure away from the others.
"""
from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import mimetypes
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import protocol as P
from .errors import ProtocolError
from .pipeline import cancel_and_wait
from .services import Services
from .session import SessionConfig, VoiceSession

__all__ = ["ServerOptions", "VoiceServer", "default_web_dir", "run_server"]

log = logging.getLogger("voice.server")

WEB_SUFFIXES = {".html", ".js", ".css", ".svg", ".ico", ".png", ".json", ".txt"}
MAX_WEB_FILE = 2 * 1024 * 1024


def default_web_dir() -> Path:
    """web/ beside the voice package (the repository layout)."""
    return Path(__file__).resolve().parent.parent / "web"


@dataclass(frozen=True)
class ServerOptions:
    """Listener and limits.

    Attributes:
        host, port: where to listen; port 0 picks a free port (see `VoiceServer.port`).
        web_dir: the page's files; None is the repository's web/.
        max_sessions: concurrent /ws sessions; more are refused with `busy` (close 1013).
        start_timeout_s: time a /ws client has to send a valid session.start.
        max_start_errors: bad messages tolerated before session.start.
        max_cleanup_inflight: /cleanup requests one connection may have running.
        cleanup_timeout_s: limit on one cleanup request.
        session: defaults for every session (VAD, partials, limits).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    web_dir: Path | None = None
    max_sessions: int = 32
    start_timeout_s: float = 10.0
    max_start_errors: int = 8
    max_cleanup_inflight: int = 32
    cleanup_timeout_s: float = 120.0
    session: SessionConfig = field(default_factory=SessionConfig)


class VoiceServer:
    """The server around loaded `Services`.

    Example:
        >>> server = VoiceServer(services, ServerOptions(port=0))
        >>> await server.start()
        >>> server.port
        48213
        >>> await server.close()
    """

    def __init__(self, services: Services, options: ServerOptions = ServerOptions()) -> None:
        self.services = services
        self.options = options
        self.sessions: dict[str, VoiceSession] = {}
        self.cleanup_connections = 0
        self._server: Server | None = None
        self._files: dict[str, tuple[bytes, str]] = {}

    # ----- lifecycle

    async def start(self) -> None:
        self._files = _load_web(self.options.web_dir or default_web_dir())
        await self.services.start()
        self._server = await serve(
            self._route, self.options.host, self.options.port,
            process_request=self._http,
            max_size=P.MAX_MESSAGE_BYTES,  # past this, websockets closes with 1009
            max_queue=32,
            compression=None,  # PCM does not compress; JSON events are small
            ping_interval=20, ping_timeout=20, close_timeout=5,
            logger=logging.getLogger("voice.server.ws"),
        )
        log.info("listening on http://%s:%d/ (ws: /ws, /cleanup)", self.options.host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.options.host}:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=10)
            self._server = None
        await self.services.close()

    async def serve_forever(self, stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (or SIGINT/SIGTERM), then close."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await self.close()

    # ----- HTTP

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path in ("/ws", "/cleanup"):
            if "websocket" in request.headers.get("Upgrade", "").lower():
                return None
            return _response(http.HTTPStatus.UPGRADE_REQUIRED,
                             f"{path} takes WebSocket connections (see docs/protocol.md)\n".encode(), "text/plain")
        if path == "/healthz":
            body = json.dumps({"status": "ok", "sessions": len(self.sessions),
                               "model": getattr(self.services.engine, "name", "model"),
                               "steps": self.services.steps}).encode()
            return _response(http.HTTPStatus.OK, body, "application/json")
        name = "index.html" if path == "/" else path.lstrip("/")
        if name in self._files:
            body, ctype = self._files[name]
            return _response(http.HTTPStatus.OK, body, ctype)
        if path == "/":
            return _response(http.HTTPStatus.NOT_FOUND, b"the page's files (web/) were not found; "
                             b"run from the repository or pass --web DIR\n", "text/plain")
        return _response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    # ----- WebSocket routes

    async def _route(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?", 1)[0] if ws.request else ""
        try:
            if path == "/ws":
                await self._voice(ws)
            elif path == "/cleanup":
                await self._cleanup(ws)
            else:
                await ws.close(1008, "unknown path")
        except ConnectionClosed:
            pass
        except Exception:  # one connection's bug must not reach the others
            log.exception("connection to %s failed", path)
            with contextlib.suppress(Exception):
                await ws.close(1011, "internal error")

    async def _await_start(self, ws: ServerConnection) -> P.SessionStart | None:
        """Read frames until a valid session.start; None if the client gave up or ran out of chances."""
        errors = 0
        try:
            async with asyncio.timeout(self.options.start_timeout_s):
                while True:
                    data = await ws.recv()
                    try:
                        msg = P.parse_frame(data, started=False)
                    except ProtocolError as e:
                        errors += 1
                        await ws.send(P.error(e.code, e.message))
                        if errors >= self.options.max_start_errors:
                            await ws.close(1008, "too many bad messages before session.start")
                            return None
                        continue
                    assert isinstance(msg, P.SessionStart)
                    return msg
        except TimeoutError:
            await ws.send(P.error(P.ErrorCode.NOT_STARTED,
                                  f"no valid session.start within {self.options.start_timeout_s:g} s; closing"))
            await ws.close(1008, "no session.start")
            return None

    async def _voice(self, ws: ServerConnection) -> None:
        if len(self.sessions) >= self.options.max_sessions:
            await ws.send(P.error(P.ErrorCode.BUSY, f"the server is at its limit of {self.options.max_sessions} "
                                  "sessions; try again later"))
            await ws.close(1013, "too many sessions")
            return
        start = await self._await_start(ws)
        if start is None:
            return
        session = VoiceSession(self.services, SessionConfig.from_start(start, self.options.session))
        self.sessions[session.id] = session
        log.info("session %s started (%d Hz in, %d Hz out)", session.id, start.sample_rate, session.output_rate)
        reader = sender = None
        try:
            await session.start()
            sender = asyncio.create_task(self._send_events(ws, session), name=f"ws-{session.id}-send")
            reader = asyncio.create_task(self._read_frames(ws, session), name=f"ws-{session.id}-read")
            await asyncio.wait({reader, sender}, return_when=asyncio.FIRST_COMPLETED)
            if session.failed is not None:
                await ws.close(1011, "the session failed")
        finally:
            await cancel_and_wait((reader, sender), 2.0)
            await session.close()
            self.sessions.pop(session.id, None)
            log.info("session %s ended", session.id)

    async def _read_frames(self, ws: ServerConnection, session: VoiceSession) -> None:
        async for data in ws:
            try:
                msg = P.parse_frame(data, started=True)
            except ProtocolError as e:
                await session.emit(P.error(e.code, e.message))
                continue
            await session.feed(msg)

    async def _send_events(self, ws: ServerConnection, session: VoiceSession) -> None:
        async for item in session.events():
            await ws.send(item)

    async def _cleanup(self, ws: ServerConnection) -> None:
        """The cleanup service: requests run concurrently so the engine batches them."""
        self.cleanup_connections += 1
        out: asyncio.Queue[str] = asyncio.Queue(maxsize=2 * self.options.max_cleanup_inflight)
        slots = asyncio.Semaphore(self.options.max_cleanup_inflight)
        running: set[asyncio.Task] = set()

        async def send_results() -> None:
            while True:
                await ws.send(await out.get())

        async def clean(req: P.CleanupRequest) -> None:
            t0 = asyncio.get_running_loop().time()
            try:
                res = await asyncio.wait_for(self.services.engine.cleanup(req.text, steps=self.services.steps),
                                             self.options.cleanup_timeout_s)
                cleaned = res if isinstance(res, str) else res.cleaned
                ms = (asyncio.get_running_loop().time() - t0) * 1000
                await out.put(P.cleanup_result(req.id, req.text, cleaned, ms=ms))
            except asyncio.TimeoutError:
                await out.put(P.cleanup_error(req.id, P.ErrorCode.LLM_FAILED, "the cleanup timed out"))
            except Exception as e:
                code = P.error_code_for(e)
                if code == P.ErrorCode.INTERNAL:
                    log.exception("cleanup failed")
                await out.put(P.cleanup_error(req.id, code, str(e) if code != P.ErrorCode.INTERNAL
                                              else f"internal error ({type(e).__name__})"))
            finally:
                slots.release()

        sender = asyncio.create_task(send_results(), name="cleanup-send")
        try:
            async for data in ws:
                try:
                    req = P.parse_cleanup(data)
                except ProtocolError as e:
                    rid = P.request_id(data) if isinstance(data, str) else None
                    await out.put(P.cleanup_error(rid, e.code, e.message))
                    continue
                await slots.acquire()
                task = asyncio.create_task(clean(req), name="cleanup-request")
                running.add(task)
                task.add_done_callback(running.discard)
                if sender.done():
                    break
        finally:  # the client is gone: its running requests leave the engine's batches
            await cancel_and_wait([*running, sender], 2.0)
            self.cleanup_connections -= 1


def _response(status: http.HTTPStatus, body: bytes, ctype: str) -> Response:
    if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
        ctype += "; charset=utf-8"
    headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-cache"), ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body)


def _load_web(directory: Path) -> dict[str, tuple[bytes, str]]:
    """The page's files, read once: name -> (bytes, content type). Only plain names, no subfolders."""
    files: dict[str, tuple[bytes, str]] = {}
    if not directory.is_dir():
        log.warning("web directory %s not found; GET / will answer 404", directory)
        return files
    for path in sorted(directory.iterdir()):
        if (path.is_file() and path.suffix in WEB_SUFFIXES and re.fullmatch(r"[A-Za-z0-9_.-]+", path.name)
                and path.stat().st_size <= MAX_WEB_FILE):
            ctype = {".js": "application/javascript", ".html": "text/html", ".css": "text/css",
                     ".json": "application/json"}.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "text/plain"
            files[path.name] = (path.read_bytes(), ctype)
    return files


async def run_server(services: Services, options: ServerOptions, stop: asyncio.Event | None = None) -> None:
    """Start a server and serve until stopped (the `voice serve` command)."""
    server = VoiceServer(services, options)
    await server.start()
    print(f"voice: serving on http://{options.host}:{server.port}/  (Ctrl-C to stop)", flush=True)
    await server.serve_forever(stop)

