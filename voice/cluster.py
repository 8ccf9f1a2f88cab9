"""The models as Ray Serve deployments, and the proxies a front end calls them through.

A kiosk runs everything in one process. A service that outgrows one box runs
its heavy parts as Ray Serve deployments, each with its own replicas and
resources, behind front ends that hold no model at all:

    app voice-dllm   deployment DLLM         one `dllm.Engine` per replica
    app voice-asr    deployment Transcriber  one `asr.Transcriber` per replica
    app voice-tts    deployment Synthesizer  one `tts.Synthesizer` per replica
    app voice        deployment FrontEnd     the `voice.server` ASGI app (only under `serve deploy`)

A front end, be it `voice serve --ray` (uvicorn in the CLI's process) or the
FrontEnd ingress deployment, builds `Services` from `RemoteEngine`,
`RemoteTranscriber` and `RemoteSynthesizer` (`connect`): proxies with the
methods of the local models, so sessions and the HTTP API run one code path
whichever they hold.

Batching. A DLLM replica runs one `Engine` and awaits it; Serve lets up to
`max_ongoing` requests from every front end into a replica at once, and the
engine's own queue batches them: one batch mixes sessions of different front
ends (the replica's `info()` counts its batches, their rows, and those that
served more than one client; a front end's /metrics sees only its own
requests). `serve.batch` would batch too, but knows nothing of what the
engine's queue does: group by canvas shape, put voice turns ahead of cleanup
floods and serve clients round-robin, stream each step's canvas, honour
deadlines, and let a cancelled request leave its batch. So the engine stays
the batcher.

Canvases. `on_canvas` (the anytime canvas, which lets the session speak a
settled first sentence before the pass ends) is a callback on the front end's
event loop and cannot cross a process. When one is given, the proxy calls the
replica's `respond_stream` through a streaming handle: the replica yields each
step's `CanvasStep` and then the `TurnResult`, and the proxy calls `on_canvas`
on its own loop. Early speech works the same as in one process.

Failures. A replica that dies (or is killed) fails the requests it held with
a `RayActorError`; the proxy sends each again, up to `retries` times, and Serve
routes them to a live replica (a request is a pure function of its input, so a
second try is safe; a seeded turn gives the same answer). After the last try
the caller gets the model package's own error (`dllm.DLLMError`, ...), which
the server reports as `llm_failed`; the server's timeouts bound every call,
so nothing waits forever.

Ray itself is an optional dependency (`pip install 'voice[ray]'`); it is
imported only inside the functions that need it. References: Ray Serve's
deployment, handle and streaming-response guides (docs.ray.io, serve/).
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import VoiceError
from .services import ModelOptions, Services

__all__ = [
    "ClusterOptions", "PartOptions", "RemoteEngine", "RemoteTranscriber", "RemoteSynthesizer",
    "init_ray", "deploy", "connect", "app", "APPS",
]

log = logging.getLogger("voice.cluster")

# Read when ray is imported (so this module is imported first): with it off, a single-node
# Ray takes 127.0.0.1 as its node address, rather than the machine's routable one, and binds
# its servers there. Joining a cluster is unaffected: the cluster's addresses come from it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# (application, deployment) of each part; a front end finds the models by these names.
DLLM_APP, ASR_APP, TTS_APP, FRONT_APP = "voice-dllm", "voice-asr", "voice-tts", "voice"
APPS = {"dllm": (DLLM_APP, "DLLM"), "asr": (ASR_APP, "Transcriber"), "tts": (TTS_APP, "Synthesizer")}


@dataclass(frozen=True)
class PartOptions:
    """How one part runs on the cluster.

    Attributes:
        replicas: replicas of the deployment (each loads its own copy of the model).
        num_cpus, num_gpus: Ray resources each replica reserves (fractions share a device:
            num_gpus=0.25 puts four replicas on one GPU). Ray sets OMP_NUM_THREADS from num_cpus.
        max_ongoing: requests a replica takes at once. For the dLLM this is what its engine can
            batch from (keep it near the engine's max_queue); Whisper and piper work one call
            at a time per thread, so a few suffice.
    """

    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing: int = 4

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise VoiceError(f"replicas must be at least 1, got {self.replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise VoiceError("num_cpus and num_gpus must not be negative")
        if self.max_ongoing < 1:
            raise VoiceError(f"max_ongoing must be at least 1, got {self.max_ongoing}")

    def deployment_options(self) -> dict[str, Any]:
        return {"num_replicas": self.replicas, "max_ongoing_requests": self.max_ongoing,
                "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
                "logging_config": {"enable_access_log": False}}  # not a log line per request


@dataclass(frozen=True)
class ClusterOptions:
    """The parts' models, replicas and resources.

    Attributes:
        models: which models each replica loads (`voice.services.ModelOptions`).
        dllm, asr, tts: replicas and resources of each part.
        engine_factory: "module:function" that returns a `dllm.Engine`, called with
            `factory_kwargs` in each DLLM replica instead of loading `models` (a model of your
            own, or the tests' tiny random one); the module must import on the cluster.
    """

    models: ModelOptions = ModelOptions()
    dllm: PartOptions = PartOptions(max_ongoing=64)
    asr: PartOptions = PartOptions(num_cpus=0.5)  # the three fit a 2-core machine by default
    tts: PartOptions = PartOptions(num_cpus=0.5)
    engine_factory: str | None = None
    factory_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ClusterOptions:
        """From a Serve config's `args` (plain JSON): {"models": {...}, "dllm": {...}, ...}."""
        known = {f.name for f in fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise VoiceError(f"unknown cluster option(s) {sorted(unknown)}; known: {sorted(known)}")
        kw: dict[str, Any] = dict(args)
        if "models" in kw:
            kw["models"] = ModelOptions(**kw["models"])
        for part in ("dllm", "asr", "tts"):
            if part in kw:
                base = asdict(getattr(cls(), part))
                kw[part] = PartOptions(**{**base, **kw[part]})
        return cls(**kw)


# ----- the deployments' classes (plain classes; `deploy` and `app` make them deployments)

def _factory(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    if not module or not name:
        raise VoiceError(f"engine_factory must look like 'module:function', got {path!r}")
    return getattr(importlib.import_module(module), name)


class _Replica:
    def pid(self) -> int:
        """The replica's process id (tests and operators tell replicas apart by it)."""
        return os.getpid()


class DLLMReplica(_Replica):
    """One `dllm.Engine`; its queue batches the requests of every front end."""

    def __init__(self, options: ClusterOptions) -> None:
        from .services import load_engine
        if options.engine_factory:
            self.engine = _factory(options.engine_factory)(**options.factory_kwargs)
        else:
            self.engine = load_engine(options.models)
        self.batches = self.rows = self.shared = 0  # shared: batches that served more than one client
        self._clients: dict[int, set] = {}  # the clients each of the last few batches served
        self.engine.on_batch = self._batch_done

    def info(self) -> dict[str, Any]:
        """The model's name and K, this replica's pid, and its batches so far: how many, their rows, and
        how many served more than one client (sessions, connections; of any front end)."""
        return {"name": str(getattr(self.engine, "name", "model")), "steps": self.engine.options.sampler.steps,
                "pid": os.getpid(), "batches": self.batches, "rows": self.rows, "shared_batches": self.shared}

    def _batch_done(self, rows: int, calls: int, ms: float) -> None:
        self.batches += 1
        self.rows += rows

    def _served(self, client: object) -> None:
        # The engine calls on_batch just before it sets the batch's results, and their callers resume
        # before another batch can end, so `batches` is the number of the batch that served `client`.
        seen = self._clients.setdefault(self.batches, set())
        seen.add(client)
        self.shared += len(seen) == 2
        if len(self._clients) > 64:
            del self._clients[min(self._clients)]

    async def respond(self, turn, *, remaining_s: float | None = None, **kw):
        result = await self.engine.respond(turn, **_deadline(remaining_s), **kw)
        self._served(kw.get("client"))
        return result

    async def respond_stream(self, turn, *, remaining_s: float | None = None, **kw) -> AsyncIterator[Any]:
        """Each step's `CanvasStep` as the pass goes on, then the `TurnResult`."""
        steps: asyncio.Queue = asyncio.Queue()
        job = asyncio.ensure_future(self.engine.respond(turn, on_canvas=steps.put_nowait, **_deadline(remaining_s),
                                                        **kw))
        job.add_done_callback(lambda _: steps.put_nowait(None))
        try:
            while (step := await steps.get()) is not None:
                yield step
            result = job.result()  # raises the request's error: only answered requests count as served
            self._served(kw.get("client"))
            yield result
        finally:  # the caller left (or the stream failed): the request leaves its batch
            job.cancel()

    async def cleanup(self, text: str, **kw):
        result = await self.engine.cleanup(text, **kw)
        self._served(kw.get("client"))
        return result

    async def waiting(self) -> int:
        return self.engine.waiting


def _deadline(remaining_s: float | None) -> dict[str, float]:
    # A deadline is a time.monotonic() value, which means nothing in another process: it
    # travels as the seconds left and becomes this process's monotonic time again here.
    return {} if remaining_s is None else {"deadline": time.monotonic() + remaining_s}


class TranscriberReplica(_Replica):
    """One Whisper model; calls run in threads so the replica stays responsive."""

    def __init__(self, options: ClusterOptions) -> None:
        from .services import load_transcriber
        self.model = load_transcriber(options.models)

    async def transcribe(self, audio, sample_rate: int = 16000) -> str:
        return await asyncio.to_thread(self.model.transcribe, audio, sample_rate)


class SynthesizerReplica(_Replica):
    """One piper voice."""

    def __init__(self, options: ClusterOptions) -> None:
        from .services import load_synthesizer
        self.model = load_synthesizer(options.models)

    def info(self) -> dict[str, Any]:
        return {"sample_rate": int(self.model.sample_rate), "pid": os.getpid()}

    async def synthesize_all(self, text: str):
        return await asyncio.to_thread(self.model.synthesize_all, text)


# ----- the proxies: the local models' methods, over deployment handles

def _replica_lost(e: BaseException) -> bool:
    from ray import exceptions as rex
    from ray.serve import exceptions as sex
    lost = (rex.RayActorError, getattr(sex, "ReplicaUnavailableError", rex.RayActorError))
    return isinstance(e, lost)


def _cause(e: BaseException) -> BaseException:
    """The model's own exception inside a Ray task error (the server maps it to a code)."""
    from ray.exceptions import RayTaskError
    if isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), BaseException):
        return e.cause
    return e


class _Remote:
    def __init__(self, handle, *, what: str, lost: Callable[[str], Exception], retries: int = 2,
                 timeout_s: float = 120.0) -> None:
        self.handle = handle
        self.what = what
        self._lost = lost  # the model package's error for "gave up after losing replicas"
        self.retries = retries
        self.timeout_s = timeout_s
        self.in_flight = 0

    def _after_failure(self, method: str, e: Exception, attempt: int) -> float:
        """Seconds to wait before sending `method` again after `e`, or raise what the caller gets:
        the model's own error as it is, or the model package's error once `retries` are spent."""
        if not _replica_lost(e):
            raise _cause(e) from None
        if attempt == self.retries:
            raise self._lost(f"the {self.what} replica serving {method} was lost {self.retries + 1} times "
                             f"({type(e).__name__}); try again") from e
        log.warning("%s.%s: replica lost (%s); sending it again", self.what, method, type(e).__name__)
        return 0.1 * (attempt + 1)

    async def _call(self, method: str, *args, **kw):
        """`method` on some replica; sent again (on another) if its replica is lost."""
        self.in_flight += 1
        try:
            for attempt in range(self.retries + 1):
                response = getattr(self.handle, method).remote(*args, **kw)
                try:
                    return await response
                except asyncio.CancelledError:
                    response.cancel()  # the request leaves its replica's batch
                    raise
                except Exception as e:
                    await asyncio.sleep(self._after_failure(method, e, attempt))
        finally:
            self.in_flight -= 1

    def _call_blocking(self, method: str, *args, **kw):
        """`_call` for the blocking interfaces (ASR, TTS), which sessions run in worker threads."""
        for attempt in range(self.retries + 1):
            try:
                return getattr(self.handle, method).remote(*args, **kw).result(timeout_s=self.timeout_s)
            except Exception as e:
                time.sleep(self._after_failure(method, e, attempt))


class RemoteEngine(_Remote):
    """`dllm.Engine`'s async interface (respond, cleanup), served by the DLLM deployment.

    `on_canvas` is called on this process's loop with each step's canvas (streamed
    back from the replica); `deadline` is this process's `time.monotonic()`.
    """

    def __init__(self, handle, *, name: str = "model", steps: int = 8, retries: int = 2) -> None:
        from dllm.errors import DLLMError
        super().__init__(handle, what="dLLM", lost=DLLMError, retries=retries)
        self.name = name
        self.steps = steps

    @property
    def waiting(self) -> int:
        """Requests this front end has out on the cluster (the metric of the queue it sees)."""
        return self.in_flight

    async def start(self) -> None:
        pass

    async def close(self) -> None:  # the deployment serves other front ends: leave it running
        pass

    async def respond(self, turn, *, on_canvas: Callable[[Any], None] | None = None,
                      deadline: float | None = None, **kw):
        if deadline is not None:
            kw["remaining_s"] = max(0.0, deadline - time.monotonic())
        if on_canvas is None:
            return await self._call("respond", turn, **kw)
        return await self._stream(turn, on_canvas, **kw)

    async def _stream(self, turn, on_canvas: Callable[[Any], None], **kw):
        from dllm import TurnResult
        self.in_flight += 1
        try:
            for attempt in range(self.retries + 1):
                stream = self.handle.options(stream=True).respond_stream.remote(turn, **kw)
                try:
                    async for item in stream:
                        if isinstance(item, TurnResult):
                            return item
                        on_canvas(item)  # a second try starts again from step 1 (and settles the same)
                    raise RuntimeError("the dLLM replica's stream ended without a result")
                except asyncio.CancelledError:
                    stream.cancel()
                    raise
                except Exception as e:
                    await asyncio.sleep(self._after_failure("respond", e, attempt))
        finally:
            self.in_flight -= 1

    async def cleanup(self, text: str, **kw):
        return await self._call("cleanup", text, **kw)


class RemoteTranscriber(_Remote):
    """`asr.Transcriber.transcribe` (blocking, as sessions call it from a thread), on the deployment."""

    def __init__(self, handle, *, retries: int = 2, timeout_s: float = 120.0) -> None:
        from asr.errors import TranscriptionError
        super().__init__(handle, what="ASR", lost=TranscriptionError, retries=retries, timeout_s=timeout_s)

    def transcribe(self, audio, sample_rate: int = 16000) -> str:
        return self._call_blocking("transcribe", audio, sample_rate)


class RemoteSynthesizer(_Remote):
    """`tts.Synthesizer.synthesize_all` and `sample_rate`, on the deployment."""

    def __init__(self, handle, *, sample_rate: int, retries: int = 2, timeout_s: float = 120.0) -> None:
        from tts.errors import SynthesisError
        super().__init__(handle, what="TTS", lost=SynthesisError, retries=retries, timeout_s=timeout_s)
        self.sample_rate = sample_rate

    def synthesize_all(self, text: str):
        return self._call_blocking("synthesize_all", text)


# ----- start-up

def init_ray(address: str | None = "auto", *, num_cpus: int | None = None, **kw) -> None:
    """Join the Ray instance at `address` ("auto": the running one, if any), or start a local one.

    A local instance is bound to 127.0.0.1 (its node address, so every server of Ray, and
    the Serve replicas' own through `loopback_replicas`) and has no dashboard. `kw` goes to
    `ray.init`.
    """
    try:
        import ray
    except ImportError as e:
        raise VoiceError("Ray is not installed; install it with: pip install 'voice[ray]'") from e
    if ray.is_initialized():
        return
    runtime_env = dict(kw.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", f"{__name__}.loopback_replicas")
    kw["runtime_env"] = runtime_env
    if address and address != "local":
        try:
            ray.init(address=address, **kw)
            log.info("joined the Ray instance at %s", address)
            return
        except ConnectionError:
            if address != "auto":
                raise VoiceError(f"no Ray instance answers at {address}") from None
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus, **kw)
    node = ray.util.get_node_ip_address()
    if node != "127.0.0.1":
        log.warning("the local Ray instance took %s as its address, not 127.0.0.1: import voice.cluster "
                    "before ray, or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0", node)
    log.info("started a local Ray instance on %s", node)


def loopback_replicas() -> None:
    """Ray's worker setup hook (`init_ray` installs it): keep Serve replicas' servers on loopback
    on a node whose address is 127.0.0.1.

    With its node on 127.0.0.1, every server of Ray core binds there, but a Serve replica
    (Ray 2.60) opens its inter-deployment gRPC server on "[::]:0", every interface, in
    code with no setting. On such a node nothing needs it beyond this machine, so this hook
    (run in each worker before it builds a replica) moves that bind to 127.0.0.1. On other
    nodes, or where Ray's code differs, it changes nothing.
    """
    try:
        import ray
        from ray.serve._private import replica
    except ImportError:
        return
    if ray.util.get_node_ip_address() != "127.0.0.1":
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "loopback", False):
        return

    def bind_loopback(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.removeprefix("[::]:")
        return bind(server, address)
    bind_loopback.loopback = True
    replica.add_port_to_grpc_server = bind_loopback


def _deployment(cls: type, name: str, part: PartOptions):
    from ray import serve
    return serve.deployment(cls, name=name, **part.deployment_options())


def model_apps(options: ClusterOptions, *, asr: bool = True, tts: bool = True) -> dict[str, Any]:
    """The parts' Serve applications, by name, ready for `serve.run`."""
    apps = {DLLM_APP: _deployment(DLLMReplica, APPS["dllm"][1], options.dllm).bind(options)}
    if asr:
        apps[ASR_APP] = _deployment(TranscriberReplica, APPS["asr"][1], options.asr).bind(options)
    if tts:
        apps[TTS_APP] = _deployment(SynthesizerReplica, APPS["tts"][1], options.tts).bind(options)
    return apps


def running_apps() -> set[str]:
    """The Serve applications that are up (none when Serve has not started)."""
    from ray import serve
    try:
        status = serve.status()
    except Exception:  # Serve not started on this instance
        return set()
    return {name for name, app in status.applications.items() if str(app.status).endswith("RUNNING")}


def deploy(options: ClusterOptions, *, asr: bool = True, tts: bool = True, redeploy: bool = False) -> list[str]:
    """Deploy the model parts that are not running yet (all of them with `redeploy`); return
    the ones deployed. A part already up is left as it is, replicas and all: a front end
    that restarts reuses them."""
    import ray
    from ray import serve
    running = running_apps()
    up = set() if redeploy else running
    apps = {name: a for name, a in model_apps(options, asr=asr, tts=tts).items() if name not in up}
    for name in up:
        log.info("%s is running; using it", name)
    # Replicas that cannot be placed would leave serve.run waiting forever: say so instead
    # (for new parts; a part deployed again gives its own resources back as it goes).
    parts = [getattr(options, part) for part, (name, _) in APPS.items() if name in apps and name not in running]
    free = ray.available_resources()
    for what, need in (("CPU", sum(p.replicas * p.num_cpus for p in parts)),
                       ("GPU", sum(p.replicas * p.num_gpus for p in parts))):
        if need > free.get(what, 0.0) + 1e-6:
            raise VoiceError(f"the parts to deploy need {need:g} {what}s and the Ray cluster has "
                             f"{free.get(what, 0.0):g} free; lower their replicas or --num-cpus/--num-gpus, "
                             "or add nodes")
    deployed = []
    for name, application in apps.items():
        log.info("deploying %s ...", name)
        serve.run(application, name=name, route_prefix=None)
        deployed.append(name)
    return deployed


async def _handle(part: str, wait_s: float):
    """The deployment handle of `part`, waiting up to `wait_s` for its application to be deployed
    (under `serve deploy` the front end may start before the models' applications exist)."""
    from ray import serve
    app_name, name = APPS[part]
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return serve.get_deployment_handle(name, app_name=app_name)
        except Exception as e:  # not deployed (yet)
            if time.monotonic() > deadline:
                raise VoiceError(f"no {name} deployment in the Serve application {app_name!r} ({e}); deploy "
                                 "the models first (voice serve --ray, or serve deploy deploy/serve.yaml)") from e
            await asyncio.sleep(1.0)


async def connect(*, asr: bool = True, tts: bool = True, retries: int = 2, timeout_s: float = 120.0,
                  wait_s: float = 0.0) -> Services:
    """`Services` whose models are the running deployments (call on the front end's loop).

    `wait_s`: how long to wait for an application that is not deployed yet. A deployment
    whose replicas are still loading is waited for in any case (the first call queues)."""
    dllm = await _handle("dllm", wait_s)
    info = await dllm.info.remote()
    engine = RemoteEngine(dllm, name=info["name"], steps=info["steps"], retries=retries)
    transcriber = RemoteTranscriber(await _handle("asr", wait_s), retries=retries, timeout_s=timeout_s) if asr \
        else None
    synthesizer = None
    if tts:
        tts_handle = await _handle("tts", wait_s)
        rate = (await tts_handle.info.remote())["sample_rate"]
        synthesizer = RemoteSynthesizer(tts_handle, sample_rate=rate, retries=retries, timeout_s=timeout_s)
    return Services(engine, transcriber, synthesizer, steps=info["steps"])


# ----- the front end as a Serve ingress (for `serve deploy`)

class FrontEndApp:
    """The `voice.server` ASGI app, built on the replica when Serve starts it (the ASGI
    lifespan), over `connect`'s proxies. Picklable: it carries only its options."""

    def __init__(self, server: dict[str, Any], *, asr: bool = True, tts: bool = True) -> None:
        from .server import ServerOptions
        server = dict(server)
        if "allow_origins" in server:  # a list in YAML
            server["allow_origins"] = tuple(server["allow_origins"])
        ServerOptions(**{"token": "checked", **server})  # bad options fail at deploy time, not on the replica
        self.server_args = server
        self.asr, self.tts = asr, tts
        self._server = None
        self._building: asyncio.Lock | None = None  # made on the replica's loop (a lock does not pickle)

    async def _build(self) -> None:
        from .server import ServerOptions, VoiceServer
        if self._building is None:
            self._building = asyncio.Lock()
        async with self._building:  # two first requests at once build one server
            if self._server is not None:
                return
            services = await connect(asr=self.asr, tts=self.tts, wait_s=600.0)
            # The token is read on the replica (set VOICE_TOKEN in the config's runtime_env), so it
            # need not be written in the config file.
            token = self.server_args.get("token", os.environ.get("VOICE_TOKEN") or None)
            self._server = VoiceServer(services, ServerOptions(**{**self.server_args, "token": token}))
            await self._server.prepare()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self._build()
                    except Exception as e:
                        log.exception("the front end could not start")
                        await send({"type": "lifespan.startup.failed", "message": str(e)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._server is not None:  # says 1001 to open sessions, like a local server
                        await self._server.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self._build()
        await self._server.app(scope, receive, send)


def app(args: dict[str, Any]):
    """The application builder for `serve deploy` (deploy/serve.yaml names it as `voice.cluster:app`).

    `args` holds `server` (`voice.server.ServerOptions` fields for the front end: host, token,
    limits), `asr`/`tts` (false for a text-only front end) and `front_end` (replicas and
    resources of the ingress). The models' apps are deployed by their own entries in the config
    (`voice.cluster:dllm_app`, ...), so each part scales on its own.
    """
    from ray import serve
    args = dict(args or {})
    part = PartOptions(**{"max_ongoing": 256, **args.pop("front_end", {})})
    front = FrontEndApp(args.pop("server", {}), asr=args.pop("asr", True), tts=args.pop("tts", True))
    if args:
        raise VoiceError(f"unknown front end option(s) {sorted(args)}; known: server, asr, tts, front_end")
    return serve.deployment(serve.ingress(front)(FrontEnd), name="FrontEnd", **part.deployment_options()).bind()


class FrontEnd:
    """The ingress deployment's class: all it does is `FrontEndApp`'s, which `serve.ingress` wraps around it."""


def _part_app(part: str, cls: type):
    def build(args: dict[str, Any]):
        options = ClusterOptions.from_dict(dict(args or {}))
        return _deployment(cls, APPS[part][1], getattr(options, part)).bind(options)
    build.__name__ = build.__qualname__ = f"{part}_app"
    build.__doc__ = f"The {APPS[part][1]} application builder for `serve deploy` (args: `ClusterOptions` fields)."
    return build


dllm_app = _part_app("dllm", DLLMReplica)
asr_app = _part_app("asr", TranscriberReplica)
tts_app = _part_app("tts", SynthesizerReplica)
