"""The server: one ASGI application (Starlette) under uvicorn.

    /ws                    WebSocket: voice sessions (`voice.session.VoiceSession`)
    /cleanup               WebSocket: raw transcripts in, cleaned ones out, batched by the engine
    POST /v1/cleanup       the same over HTTP: {"text"} or {"texts": [...]}
    POST /v1/chat/completions, GET /v1/models   OpenAI-compatible chat on the dLLM
    GET /openapi.json      the HTTP API's description
    GET /metrics           Prometheus metrics (`voice.metrics`)
    GET /healthz           200 with a small JSON status
    GET /                  the browser page (web/, shipped inside the package)

Why Starlette under uvicorn: one small ASGI app serves HTTP, server-sent
events and WebSockets on one port, on the server most Python web services
run in production, with no framework on top. uvicorn speaks WebSocket
through websockets' own I/O-free protocol core (`--ws websockets-sansio`,
the project's existing dependency; uvicorn's older `websockets` option is
deprecated): it enforces the 1 MiB message limit (close 1009), answers
pings, and reads the next frame only once the app has taken the last one,
so a slow session slows its own client down.

The server stays a thin shell: frames are parsed and events built by
`voice.protocol`, HTTP bodies by `voice.api` (pure functions), the pipeline
lives in the session, and this module only moves bytes, enforces the limits
(frame and body size, admission, idle time, audio pace, the largest `steps`),
checks who is asking (`voice.access`: Origin, Host, token) and keeps one
connection's failure away from the others. A client's bad message is answered
with an `error` event or a clean close and logged as one line, never a traceback.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected, WebSocketState

from . import access
from . import api as A
from . import protocol as P
from .errors import InternalError, ProtocolError, TurnTimedOut, VoiceError, as_voice_error
from .limits import AudioBudget
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .pipeline import cancel_and_wait
from .services import Services
from .session import SessionConfig, VoiceSession

__all__ = ["ServerOptions", "VoiceServer", "default_web_dir", "run_server"]

log = logging.getLogger("voice.server")

WEB_SUFFIXES = {".html", ".js", ".css", ".svg", ".ico", ".png", ".json", ".txt"}
MAX_WEB_FILE = 2 * 1024 * 1024


def default_web_dir() -> Path:
    """The page's files: voice/web/ in an installed package, else web/ beside the package (a checkout)."""
    here = Path(__file__).resolve().parent
    packaged = here / "web"
    return packaged if (packaged / "index.html").is_file() else here.parent / "web"


@dataclass(frozen=True)
class ServerOptions:
    """Listener and limits.

    Attributes:
        host, port: where to listen; port 0 picks a free port (see `VoiceServer.port`).
        web_dir: the page's files; None is the packaged page (`default_web_dir`).
        max_sessions: concurrent /ws connections, counted from the moment they open (before
            session.start); more are refused with `busy` (close 1013).
        start_timeout_s: time a /ws client has to send a valid session.start.
        idle_timeout_s: a connection (/ws or /cleanup) that sends nothing for this long, with no
            turn or request of its own under way, is closed (`idle_timeout`, 1008).
        turnless_timeout_s: a /ws session with no turn for this long (audio of silence only) is closed.
        max_turn_ms: refuse new /ws sessions (`busy`, 1013) while the turns of the last minute took a
            median of more than this long from the end of speech to the reply; None: no bound.
        max_steps: the largest `steps` a client may ask for (session.start, the HTTP API).
        audio_rate, audio_burst_s: input audio is accepted at `audio_rate` times real time after
            a burst of `audio_burst_s` seconds; faster frames are dropped with `too_fast`.
        allow_origins: origins allowed beside the page's own and loopback ones (`voice.access`).
        token: when set, every route but /healthz needs it. Binding to anything but
            loopback needs a token, or `insecure`.
        insecure: serve a non-loopback address without a token (a warning is logged).
        certfile, keyfile: serve HTTPS and WSS (PEM files; the key may sit in the certfile).
        max_start_errors: bad messages tolerated before session.start.
        max_cleanup_inflight: /cleanup requests one connection may have running.
        cleanup_timeout_s: limit on one cleanup request (WebSocket or HTTP) and one chat completion.
        session: defaults for every session (VAD, partials, limits).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    web_dir: Path | None = None
    max_sessions: int = 32
    start_timeout_s: float = 10.0
    idle_timeout_s: float = 120.0
    turnless_timeout_s: float = 600.0
    max_turn_ms: float | None = None
    max_steps: int = 16
    audio_rate: float = 1.25
    audio_burst_s: float = 10.0
    allow_origins: tuple[str, ...] = ()
    token: str | None = None
    insecure: bool = False
    certfile: Path | None = None
    keyfile: Path | None = None
    max_start_errors: int = 8
    max_cleanup_inflight: int = 16
    cleanup_timeout_s: float = 120.0
    session: SessionConfig = field(default_factory=SessionConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.max_steps <= P.MAX_STEPS:
            raise VoiceError(f"max_steps must be between 1 and {P.MAX_STEPS}, got {self.max_steps}")
        if self.keyfile is not None and self.certfile is None:
            raise VoiceError("a key file needs its certificate file (--certfile)")
        if not access.is_loopback(self.host) and self.token is None and not self.insecure:
            raise VoiceError(f"serving on {self.host!r} opens the server to the network: give a token "
                             "(--token or VOICE_TOKEN), or pass --insecure to serve without one")
        try:
            self.policy  # noqa: B018 - checks the origins and the token
        except ValueError as e:
            raise VoiceError(str(e)) from e

    @property
    def policy(self) -> access.AccessPolicy:
        return access.AccessPolicy(bind_host=self.host, allow_origins=self.allow_origins, token=self.token)


class _Gone(Exception):
    """The WebSocket client went away."""


class _Socket:
    """A Starlette WebSocket read and written as text (str) and binary (bytes) messages."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        client = ws.client
        self.name = f"{ws.url.path} from {client.host}:{client.port}" if client else ws.url.path  # for the log

    async def recv(self) -> str | bytes:
        msg = await self.ws.receive()
        if msg["type"] == "websocket.disconnect":
            raise _Gone
        return msg["text"] if msg.get("text") is not None else (msg.get("bytes") or b"")

    async def send(self, item: str | bytes) -> None:
        if self.ws.application_state != WebSocketState.CONNECTED:  # closed by the server (shutting down)
            raise _Gone
        try:
            if isinstance(item, str):
                await self.ws.send_text(item)
            else:
                await self.ws.send_bytes(item)
        except (WebSocketDisconnect, WebSocketDisconnected, OSError) as e:
            raise _Gone from e

    async def close(self, code: int = 1000, reason: str = "") -> None:
        # Not after the client's close, nor after uvicorn closed it (a message over the size
        # limit: 1009): a second close is an error in uvicorn, logged with a traceback.
        if self.ws.application_state == WebSocketState.CONNECTED == self.ws.client_state:
            with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected, OSError):
                await self.ws.close(code, reason)

    async def __aiter__(self):
        while True:
            yield await self.recv()


class _Uvicorn(uvicorn.Server):
    """uvicorn, minus its signal handling: `VoiceServer.serve_forever` owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


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
        self.voice_connections = 0  # open /ws connections, started or not: what max_sessions bounds
        self.cleanup_connections = 0
        self.metrics = Metrics(lambda: self.sessions, services.engine)
        self.app = self._guarded(self._app())
        self._uvicorn: _Uvicorn | None = None
        self._serving: asyncio.Task | None = None
        self._socket: socket.socket | None = None
        self._files: dict[str, tuple[bytes, str]] = {}
        self._open: set[_Socket] = set()  # accepted WebSockets, closed with 1001 on shutdown

    @property
    def model(self) -> str:
        """The model's id for /v1/models: the file or directory names in the engine's name, without paths."""
        name = str(getattr(self.services.engine, "name", "model"))
        return "+".join(Path(part.split(":", 1)[-1]).name or part for part in name.split("+"))

    # ----- lifecycle

    async def prepare(self) -> None:
        """All of `start` but listening: for a host that serves `app` itself (a Ray Serve ingress)."""
        self._files = _load_web(self.options.web_dir or default_web_dir())
        await self.services.start()

    async def start(self) -> None:
        await self.prepare()
        self._socket = socket.create_server((self.options.host, self.options.port))
        config = uvicorn.Config(
            self.app, ws="websockets-sansio", lifespan="off", log_config=None, access_log=False,
            ws_max_size=P.MAX_MESSAGE_BYTES,  # past this, the connection closes with 1009
            ws_per_message_deflate=False,  # PCM does not compress; JSON events are small
            ws_ping_interval=20, ws_ping_timeout=20, timeout_graceful_shutdown=5,
            server_header=False,  # no "Server: uvicorn": the version tells an attacker what to try
            ssl_certfile=self.options.certfile, ssl_keyfile=self.options.keyfile)
        self._uvicorn = _Uvicorn(config)
        self._serving = asyncio.create_task(self._uvicorn.serve(sockets=[self._socket]), name="uvicorn")
        while not self._uvicorn.started:
            if self._serving.done():  # it failed to start: say why
                await self._serving
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("listening on %s://%s:%d/ (ws: /ws, /cleanup; http: /v1/...)",
                 "https" if self.options.certfile else "http", self.options.host, self.port)
        if self.options.insecure and not access.is_loopback(self.options.host) and self.options.token is None:
            log.warning("serving %s with no token (--insecure): anyone who can reach the port can use it",
                        self.options.host)

    @property
    def port(self) -> int:
        assert self._socket is not None, "start() first"
        return self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        return f"{'wss' if self.options.certfile else 'ws'}://{self.options.host}:{self.port}"

    async def close(self) -> None:
        # Say goodbye (1001) first: the handlers then end on their own, rather than being
        # cancelled by uvicorn after its grace period (which it logs as a traceback).
        await asyncio.gather(*(sock.close(1001, "the server is shutting down") for sock in list(self._open)))
        if self._uvicorn is not None and self._serving is not None:
            self._uvicorn.should_exit = True
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._serving, timeout=15)
            self._uvicorn = self._serving = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
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

    def _guarded(self, app: Starlette):
        """`app` behind `voice.access.check`: a refused request gets 401 or 403 in the API's error
        shape; a refused WebSocket handshake gets a bare 403 (the reason goes to the log)."""
        policy = self.options.policy

        async def guard(scope, receive, send) -> None:
            if scope["type"] in ("http", "websocket"):
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                denied = access.check(policy, path=scope["path"], headers=headers,
                                      query=scope.get("query_string", b"").decode("latin-1"))
                if denied is not None:
                    log.info("refused %s %s: %s", scope["type"], scope["path"], denied.message)
                    self.metrics.errors.labels(denied.code).inc()
                    if scope["type"] == "websocket":  # refused in the handshake: uvicorn answers 403
                        await send({"type": "websocket.close", "code": 1008, "reason": denied.message[:120]})
                        return
                    body = A.error_body(denied.status, denied.message, code=denied.code)
                    await JSONResponse(body, denied.status)(scope, receive, send)
                    return
            await app(scope, receive, send)
        return guard

    def _app(self) -> Starlette:
        return Starlette(routes=[
            WebSocketRoute("/ws", self._ws(self._voice)),
            WebSocketRoute("/cleanup", self._ws(self._cleanup)),
            Route("/ws", self._upgrade_required),
            Route("/cleanup", self._upgrade_required),
            Route("/healthz", self._healthz),
            Route("/metrics", self._metrics),
            Route("/openapi.json", self._openapi),
            Route("/v1/models", self._api("models", self._models), methods=["GET"]),
            Route("/v1/cleanup", self._api("cleanup", self._cleanup_http), methods=["POST"]),
            Route("/v1/chat/completions", self._api("chat", self._chat), methods=["POST"]),
            Route("/", self._page),
            Route("/{name}", self._page),
        ])

    # ----- plain HTTP

    async def _page(self, request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name in self._files:
            body, ctype = self._files[name]
            response = Response(body, media_type=ctype, headers={"Cache-Control": "no-cache"})
            if self.options.token is not None and "token" in request.query_params:  # checked by the guard
                response.set_cookie(access.TOKEN_COOKIE, request.query_params["token"], httponly=True,
                                    samesite="strict", secure=self.options.certfile is not None)
            return response
        if name == "index.html":
            return PlainTextResponse("the page's files (web/) were not found; reinstall the package "
                                     "or pass --web DIR\n", 404)
        return PlainTextResponse("not found\n", 404)

    async def _upgrade_required(self, request: Request) -> Response:
        return PlainTextResponse(f"{request.url.path} takes WebSocket connections (see docs/protocol.md)\n", 426,
                                 headers={"Upgrade": "websocket"})

    async def _healthz(self, request: Request) -> Response:
        # The model's name only: /healthz is open to anyone, and paths tell about the machine.
        return JSONResponse({"status": "ok", "sessions": len(self.sessions), "model": self.model,
                             "steps": self.services.steps})

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _openapi(self, request: Request) -> Response:
        return JSONResponse(A.openapi(_version(), self.model))

    # ----- the HTTP API

    def _api(self, route: str, handler: Callable[[Request], Awaitable[Response]]):
        """An endpoint that answers any failure in OpenAI's error shape and counts it."""
        async def endpoint(request: Request) -> Response:
            try:
                response = await handler(request)
            except Exception as e:
                err = _client_error(e)
                if isinstance(err, InternalError):
                    log.exception("%s failed", route)
                self.metrics.errors.labels(err.code).inc()
                response = JSONResponse(A.error_body(err.status, err.message, code=err.code,
                                                     param=getattr(e, "param", None)), err.status)
            self.metrics.http.labels(route, str(response.status_code)).inc()
            return response
        return endpoint

    async def _json(self, request: Request) -> dict:
        """The body as a JSON object, read up to `api.MAX_BODY_BYTES` (413 past it)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > A.MAX_BODY_BYTES:
            raise A.ApiError(413, f"the body has {length} bytes; at most {A.MAX_BODY_BYTES} are accepted",
                             code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > A.MAX_BODY_BYTES:
                raise A.ApiError(413, f"the body is over {A.MAX_BODY_BYTES} bytes", code="body_too_large")
        return A.parse_json_body(bytes(body))

    async def _models(self, request: Request) -> Response:
        return JSONResponse(A.models(self.model))

    async def _cleanup_http(self, request: Request) -> Response:
        body = A.parse_cleanup_body(await self._json(request), max_steps=self.options.max_steps)
        steps, t0 = body.steps or self.services.steps, time.perf_counter()
        calls = [self.services.engine.cleanup(t, steps=steps, client=_http_client(request)) for t in body.texts]
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True),
                                         self.options.cleanup_timeout_s)
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                if not isinstance(r, Exception):
                    raise r
                err = _client_error(r)
                raise A.ApiError(err.status, err.message if body.single else f"texts[{i}]: {err.message}",
                                 code=err.code) from r
        ms = (time.perf_counter() - t0) * 1000
        self.metrics.stage.labels("dllm").observe(ms / 1000)
        cleaned = [r if isinstance(r, str) else r.cleaned for r in results]
        if body.single:
            return JSONResponse({"text": body.texts[0], "cleaned": cleaned[0], "ms": round(ms, 1)})
        return JSONResponse({"results": [{"text": t, "cleaned": c} for t, c in zip(body.texts, cleaned)],
                             "ms": round(ms, 1)})

    async def _chat(self, request: Request) -> Response:
        from dllm import Turn

        req = A.parse_chat(await self._json(request), max_steps=self.options.max_steps)
        from dllm.engine import PRIORITY_INTERACTIVE  # a chat is a turn someone (a voice stack) waits on

        kw: dict[str, Any] = {k: v for k, v in (("temperature", req.temperature), ("seed", req.seed),
                                                ("reply_tokens", req.max_tokens)) if v is not None}
        kw.update(client=_http_client(request), priority=PRIORITY_INTERACTIVE)
        if req.deadline_ms:
            kw["deadline"] = time.monotonic() + req.deadline_ms / 1000
        canvases: asyncio.Queue = asyncio.Queue()  # at most K items: one per step
        if req.canvas or req.stream:  # a stream sends the reply's settled start before the pass ends
            kw["on_canvas"] = canvases.put_nowait
        turn = Turn(req.transcript, history=req.history, knowledge=req.knowledge)
        cid, t0 = A.new_id(), time.perf_counter()

        async def respond():
            async with asyncio.timeout(self.options.cleanup_timeout_s):  # no inner task: see below
                result = await self.services.engine.respond(turn, steps=req.steps or self.services.steps, **kw)
            self.metrics.stage.labels("dllm").observe(time.perf_counter() - t0)
            return result

        if not req.stream:
            result = await respond()
            seen = [canvases.get_nowait() for _ in range(canvases.qsize())] if req.canvas else None
            return JSONResponse(A.chat_completion(cid, self.model, result, canvases=seen))
        task = asyncio.create_task(respond(), name=f"chat-{cid}")
        task.add_done_callback(lambda _: canvases.put_nowait(None))
        # One turn of the loop runs the request up to the engine's queue: a bad turn
        # or a full queue fails here, and is answered with a status, not a broken stream.
        await asyncio.sleep(0)
        if task.done() and task.exception() is not None:
            raise task.exception()
        return StreamingResponse(self._chat_events(task, canvases, cid, show_canvas=req.canvas),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _chat_events(self, task: asyncio.Task, canvases: asyncio.Queue, cid: str, *, show_canvas: bool):
        """The SSE stream: the role, each canvas (when asked), the reply in word deltas (its settled
        sentences while the pass goes on, the rest at its end), the end, [DONE]."""
        from dllm.canvas import unsaid

        created = int(time.time())
        sent = ""  # the reply text sent so far, a prefix of the reply

        def deltas(text: str):
            return [A.sse(A.chat_chunk(cid, self.model, created, delta={"content": p})) for p in A.reply_deltas(text)]
        try:
            yield A.sse(A.chat_chunk(cid, self.model, created, delta={"role": "assistant", "content": ""}))
            while (snap := await canvases.get()) is not None:
                if show_canvas:
                    yield A.sse(A.chat_chunk(cid, self.model, created, canvas=snap))
                if len(snap.settled) > len(sent):
                    for chunk in deltas(unsaid(snap.settled, sent)):
                        yield chunk
                    sent = snap.settled
            try:
                result = task.result()
            except Exception as e:  # the status line is gone: the error travels in the stream
                err = _client_error(e)
                self.metrics.errors.labels(err.code).inc()
                yield A.sse(A.error_body(err.status, err.message, code=err.code))
                return
            for chunk in deltas(unsaid(result.reply, sent)):
                yield chunk
            yield A.sse(A.chat_chunk(cid, self.model, created, finish="stop"))
            yield A.sse("[DONE]")
        finally:  # the client left early: the request leaves its batch
            await cancel_and_wait([task], 2.0)

    # ----- WebSocket routes

    def _ws(self, handler: Callable[[_Socket], Awaitable[None]]):
        async def endpoint(websocket: WebSocket) -> None:
            sock = _Socket(websocket)
            try:
                await websocket.accept()
                self._open.add(sock)
                await handler(sock)
            except (WebSocketDisconnect, WebSocketDisconnected, OSError):  # gone before the handshake ended
                return
            except _Gone:
                pass
            except Exception:  # one connection's bug must not reach the others
                log.exception("connection to %s failed", websocket.url.path)
                await sock.close(1011, "internal error")
            finally:
                self._open.discard(sock)
            await sock.close()
        return endpoint

    def _note(self, who: str, e: ProtocolError) -> None:
        """Count and log, in one line, a client message that was refused."""
        self.metrics.errors.labels(e.code).inc()
        log.info("%s: refused: %s", who, e)

    async def _end(self, ws: _Socket, who: str, why: _Close) -> None:
        """Close a connection for `why`: its error event (if any), a log line, the close frame."""
        log.info("%s: closing (%d): %s", who, why.close_code, why.message)
        if why.code is not None:
            self.metrics.errors.labels(why.code).inc()
            await ws.send(why.event)
        await ws.close(why.close_code, why.reason)

    async def _await_start(self, ws: _Socket) -> P.SessionStart | _Close:
        """Read frames until a valid session.start, or the reason to give up on the client."""
        errors = 0
        try:
            async with asyncio.timeout(self.options.start_timeout_s):
                while True:
                    data = await ws.recv()
                    try:
                        msg = P.parse_frame(data, started=False, max_steps=self.options.max_steps)
                    except ProtocolError as e:
                        errors += 1
                        self._note(ws.name, e)
                        await ws.send(P.error(e.code, e.message))
                        if errors >= self.options.max_start_errors:
                            return _Close(None, f"{errors} bad messages before session.start",
                                          "too many bad messages before session.start")
                        continue
                    assert isinstance(msg, P.SessionStart)
                    return msg
        except TimeoutError:
            return _Close(P.ErrorCode.NOT_STARTED,
                          f"no valid session.start within {self.options.start_timeout_s:g} s; closing",
                          "no session.start")

    async def _voice(self, ws: _Socket) -> None:
        # Counted when the socket opens, with no await between the test and the count: a
        # burst of connections cannot all pass the test before any of them is counted.
        if self.voice_connections >= self.options.max_sessions:
            await self._end(ws, ws.name, _Close(P.ErrorCode.BUSY, f"the server is at its limit of "
                                                f"{self.options.max_sessions} sessions; try again later",
                                                "too many sessions", 1013))
            return
        recent = self.metrics.recent_turn_ms() if self.options.max_turn_ms else None
        if recent is not None and recent > self.options.max_turn_ms:  # admitting more would slow them further
            await self._end(ws, ws.name, _Close(P.ErrorCode.BUSY, f"the server is at capacity: recent turns took "
                                                f"{recent:.0f} ms, over its bound of {self.options.max_turn_ms:.0f} "
                                                "ms; try again later", "at capacity", 1013))
            return
        self.voice_connections += 1
        try:
            await self._voice_session(ws)
        finally:
            self.voice_connections -= 1

    async def _voice_session(self, ws: _Socket) -> None:
        start = await self._await_start(ws)
        if isinstance(start, _Close):
            await self._end(ws, ws.name, start)
            return
        session = VoiceSession(self.services, SessionConfig.from_start(start, self.options.session))
        self.sessions[session.id] = session
        self.metrics.sessions_opened.inc()
        log.info("session %s started (%s, %d Hz in, %d Hz out)", session.id, ws.name, start.sample_rate,
                 session.output_rate)
        reader = sender = None
        why: _Close | None = None
        try:
            await session.start()
            sender = asyncio.create_task(self._send_events(ws, session), name=f"ws-{session.id}-send")
            reader = asyncio.create_task(self._read_frames(ws, session), name=f"ws-{session.id}-read")
            done, _ = await asyncio.wait({reader, sender}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done and not isinstance(reader.exception(), _Gone):
                if reader.exception() is not None:  # a bug: say so in the log, end only this session
                    log.error("session %s: reading frames failed", session.id, exc_info=reader.exception())
                    why = _Close(None, "reading frames failed", "internal error", 1011)
                else:
                    why = reader.result()
            if session.failed is not None:
                why = _Close(None, "the session failed", "the session failed", 1011)
        finally:
            await cancel_and_wait((reader, sender), 2.0)
            await session.close()
            self.sessions.pop(session.id, None)
            log.info("session %s ended", session.id)
        if why is not None:
            await self._end(ws, f"session {session.id}", why)

    async def _read_frames(self, ws: _Socket, session: VoiceSession) -> _Close:
        """Feed the session until the client goes (`_Gone`) or must be closed (the reason returned)."""
        o, who = self.options, f"session {session.id}"
        budget = AudioBudget(o.audio_rate, o.audio_burst_s, at=time.monotonic())
        too_fast = False
        while True:
            try:
                async with asyncio.timeout(o.idle_timeout_s):
                    data = await ws.recv()
            except TimeoutError:
                if session.idle_since() is None:  # a turn is under way: its client may only be listening
                    continue
                return _Close(P.ErrorCode.IDLE, f"nothing received for {o.idle_timeout_s:g} s; closing", "idle")
            since = session.idle_since()
            if since is not None and time.monotonic() - since > o.turnless_timeout_s:
                return _Close(P.ErrorCode.IDLE, f"no turn for {o.turnless_timeout_s:g} s; closing", "no turn")
            try:
                msg = P.parse_frame(data, started=True)
            except ProtocolError as e:
                self._note(who, e)
                await session.emit(P.error(e.code, e.message))
                continue
            if isinstance(msg, P.Audio):
                if not budget.take(len(msg.pcm) / 2 / session.config.input_sample_rate, at=time.monotonic()):
                    if not too_fast:  # one error per spell of haste, not one per dropped frame
                        e = ProtocolError(P.ErrorCode.TOO_FAST, f"audio is arriving faster than {o.audio_rate:g}x "
                                          "real time; frames are dropped until it slows down")
                        self._note(who, e)
                        await session.emit(P.error(e.code, e.message))
                    too_fast = True
                    continue
                too_fast = False
            await session.feed(msg)

    async def _send_events(self, ws: _Socket, session: VoiceSession) -> None:
        async for item in session.events():
            if isinstance(item, str):
                self.metrics.observe_event(item)
            await ws.send(item)

    async def _cleanup(self, ws: _Socket) -> None:
        """The cleanup service: requests run concurrently so the engine batches them."""
        self.cleanup_connections += 1
        out: asyncio.Queue[str] = asyncio.Queue(maxsize=2 * self.options.max_cleanup_inflight)
        slots = asyncio.Semaphore(self.options.max_cleanup_inflight)
        running: set[asyncio.Task] = set()

        async def send_results() -> None:
            while True:
                await ws.send(await out.get())

        async def clean(req: P.CleanupRequest) -> None:
            t0 = time.perf_counter()
            try:
                res = await asyncio.wait_for(self.services.engine.cleanup(req.text, steps=self.services.steps,
                                                                          client=ws.name),
                                             self.options.cleanup_timeout_s)
                cleaned = res if isinstance(res, str) else res.cleaned
                ms = (time.perf_counter() - t0) * 1000
                self.metrics.stage.labels("dllm").observe(ms / 1000)
                await out.put(P.cleanup_result(req.id, req.text, cleaned, ms=ms))
            except Exception as e:
                err = _client_error(e, timed_out="the cleanup timed out")
                if isinstance(err, InternalError):
                    log.exception("cleanup failed")
                self.metrics.errors.labels(err.code).inc()
                await out.put(P.cleanup_error(req.id, err.code, err.message))
            finally:
                slots.release()

        sender = asyncio.create_task(send_results(), name="cleanup-send")
        idle = self.options.idle_timeout_s
        try:
            while not sender.done():
                try:
                    async with asyncio.timeout(idle):
                        data = await ws.recv()
                except TimeoutError:
                    if running:
                        continue
                    why = _Close(P.ErrorCode.IDLE, f"no request for {idle:g} s; closing", "idle")
                    log.info("%s: closing (%d): %s", ws.name, why.close_code, why.message)
                    self.metrics.errors.labels(why.code).inc()
                    await out.put(P.cleanup_error(None, why.code, why.message))
                    await _drain(out, sender)
                    await ws.close(why.close_code, why.reason)
                    return
                try:
                    req = P.parse_cleanup(data)
                except ProtocolError as e:
                    self._note(ws.name, e)
                    await out.put(P.cleanup_error(e.request_id, e.code, e.message))
                    continue
                await slots.acquire()
                task = asyncio.create_task(clean(req), name="cleanup-request")
                running.add(task)
                task.add_done_callback(running.discard)
        finally:  # the client is gone: its running requests leave the engine's batches
            await cancel_and_wait([*running, sender], 2.0)
            self.cleanup_connections -= 1


async def _drain(queue: asyncio.Queue, sender: asyncio.Task, timeout: float = 2.0) -> None:
    """Wait (a little) until `sender` has taken everything from `queue`."""
    deadline = time.monotonic() + timeout
    while not queue.empty() and not sender.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


@dataclass(frozen=True)
class _Close:
    """Why the server ends a connection: the error event to send first (when `code` is set),
    the line to log, and the close frame's code and reason."""

    code: str | None
    message: str
    reason: str
    close_code: int = 1008

    @property
    def event(self) -> str:
        assert self.code is not None
        return P.error(self.code, self.message)


def _http_client(request: Request) -> str:
    """Who an HTTP request is from, for the engine's round-robin: its address (a client's
    connections and requests share one turn)."""
    return f"http {request.client.host}" if request.client else "http"


def _client_error(exc: Exception, *, timed_out: str = "the model did not answer in time") -> VoiceError:
    """What a client is told of a failed request: a timeout of the model call, as `timed_out`
    says; anything else as `voice.errors.as_voice_error` maps it (with its code and HTTP status)."""
    if isinstance(exc, asyncio.TimeoutError):
        return TurnTimedOut(timed_out)
    return as_voice_error(exc)


def _version() -> str:
    try:
        return version("voice")
    except PackageNotFoundError:
        return "0"


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
            if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
                ctype += "; charset=utf-8"
            files[path.name] = (path.read_bytes(), ctype)
    return files


async def run_server(services: Services, options: ServerOptions, stop: asyncio.Event | None = None) -> None:
    """Start a server and serve until stopped (the `voice serve` command)."""
    server = VoiceServer(services, options)
    await server.start()
    print(f"voice: serving on http://{options.host}:{server.port}/  (Ctrl-C to stop)", flush=True)
    await server.serve_forever(stop)
