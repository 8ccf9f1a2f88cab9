"""The models as Ray Serve deployments (`voice.cluster`), on a local Ray instance bound to 127.0.0.1.

One Ray instance for the module: two DLLM replicas running the tiny random
model (conftest's `make_tiny_engine`, seeded, so every replica and the
single-process server hold the same weights), one Whisper and one piper
replica. Front ends run in this process, as `voice serve --ray` runs them:
a `VoiceServer` over `cluster.connect()`'s proxies. The reference is the
same server over the same models loaded in this process.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import pytest_asyncio
from voice_helpers import QUESTION, Client, speech, synthesizer, transcriber, words

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray loads: see voice.cluster
pytest.importorskip("ray", reason="Ray is not installed (pip install 'voice[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'voice[ray]')")

from conftest import make_tiny_engine  # noqa: E402

from voice import cluster  # noqa: E402
from voice.server import ServerOptions, VoiceServer  # noqa: E402
from voice.services import Services  # noqa: E402
from voice.session import SessionConfig  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

# The tiny random model; with this seed its replies hold letters, so piper has something to say.
TINY = {"batch_window_ms": 30.0, "seed": 4}
TEXTS = [f"um so {w} the the meeting is at {n}" for w, n in
         [("i think", "noon"), ("uh", "three"), ("like", "five"), ("well", "nine"), ("so", "ten"), ("yeah", "two")]]
SESSION = SessionConfig(partial_every_ms=0)  # no partial transcripts: fewer Whisper calls on a 2-core machine


PROXY: dict[str, int] = {}  # the Serve HTTP proxy's port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray on 127.0.0.1 (no dashboard, 4 logical CPUs), Serve with no HTTP proxy, the parts deployed."""
    import ray
    from ray import serve

    tests = str(Path(__file__).resolve().parent)
    cluster.init_ray("local", num_cpus=4, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": tests, "OMP_WAIT_POLICY": "PASSIVE"}})
    try:
        # A Serve HTTP proxy on loopback, for the front end deployed as the ingress (`serve deploy`'s way).
        PROXY["port"] = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": PROXY["port"]})
        options = cluster.ClusterOptions(
            dllm=cluster.PartOptions(replicas=2, num_cpus=0.5, max_ongoing=64),
            asr=cluster.PartOptions(num_cpus=0.5), tts=cluster.PartOptions(num_cpus=0.5),
            engine_factory="conftest:make_tiny_engine", factory_kwargs=TINY)
        cluster.deploy(options)
        yield options
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local():
    """The single-process server over the same models: the reference."""
    server = VoiceServer(Services(make_tiny_engine(**TINY), transcriber(), synthesizer()),
                         ServerOptions(port=0, session=SESSION))
    await server.start()
    yield server
    await server.close()


async def front_end() -> VoiceServer:
    server = VoiceServer(await cluster.connect(), ServerOptions(port=0, session=SESSION))
    await server.start()
    return server


@pytest_asyncio.fixture(loop_scope="module")
async def remote(ray_cluster):
    server = await front_end()
    yield server
    await server.close()


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def replica_infos(rounds: int = 10) -> dict[int, dict]:
    """Each DLLM replica's `info()`, by pid, seen through rounds of concurrent calls (until two answer)."""
    from ray import serve
    handle = serve.get_deployment_handle("DLLM", app_name=cluster.DLLM_APP)
    infos: dict[int, dict] = {}
    for _ in range(rounds):
        for info in await asyncio.gather(*(handle.info.remote() for _ in range(16))):
            infos[info["pid"]] = info
        if len(infos) >= 2:
            break
    return infos


async def replica_pids(rounds: int = 10) -> set[int]:
    """The DLLM replicas' process ids (see `replica_infos`)."""
    return set(await replica_infos(rounds))


async def replica_process_ids() -> set[int]:
    """The process ids of every replica (DLLM, Transcriber, Synthesizer)."""
    from ray import serve
    pids = await replica_pids()
    for part in ("asr", "tts"):
        app_name, name = cluster.APPS[part]
        handle = serve.get_deployment_handle(name, app_name=app_name)
        pids.add(await handle.pid.remote())
    return pids


def running_replicas() -> int:
    from ray import serve
    states = serve.status().applications[cluster.DLLM_APP].deployments["DLLM"].replica_states
    return int(states.get("RUNNING", 0))


async def spoken_turn(server: VoiceServer) -> Client:
    client = await Client.open(server.url + "/ws")
    await client.until("session.ready", 30)
    await client.send_audio(speech(QUESTION), realtime=4.0)
    await client.until("turn.done", 180)
    await client.close()
    return client


def turn_text(client: Client) -> tuple[str, str, str]:
    return tuple(client.of(kind)[0]["text"] for kind in ("transcript.final", "turn.cleaned", "turn.reply"))


async def test_local_instance_is_on_loopback(ray_cluster):
    """The Ray instance the tests started took 127.0.0.1 as its node address."""
    import ray
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    # Every listening socket of this session's Ray processes (the replicas' too) is on loopback.
    if shutil.which("ss") is None:
        return
    pids = {str(p) for p in await replica_process_ids()}
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    mine = [line for line in out.splitlines() if any(f"pid={p}," in line for p in pids)]
    exposed = [line for line in mine if line.split()[3].rpartition(":")[0].strip("[]")
               not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert mine and not exposed, exposed


async def test_spoken_turn_through_the_deployments(local, remote):
    """A /ws turn from audio to reply audio through the ASR, DLLM and TTS deployments says what one process says."""
    mine, theirs = await asyncio.gather(spoken_turn(remote), spoken_turn(local))
    assert {"library", "saturday"} <= set(words(turn_text(mine)[0])), turn_text(mine)
    assert turn_text(mine) == turn_text(theirs)
    assert mine.of("turn.reply")[0]["text"] and mine.audio_bytes > 0
    # The same reply spoken (within the framing: a sentence spoken early is a chunk of its own).
    assert abs(mine.audio_bytes - theirs.audio_bytes) <= 0.1 * theirs.audio_bytes


async def test_canvases_stream_back_from_a_replica(local, remote):
    """A typed turn asking for canvases gets every step's draft from the replica, as in one process."""
    async def canvases(server: VoiceServer) -> list[dict]:
        client = await Client.open(server.url + "/ws", canvas=True)
        await client.until("session.ready", 30)
        await client.send_json(type="text", text="um when does the the pool close")
        await client.until("turn.done", 120)
        await client.close()
        return [{k: e[k] for k in ("step", "cleaned", "reply")} for e in client.of("turn.canvas")]
    mine, theirs = await asyncio.gather(canvases(remote), canvases(local))
    assert len(mine) == 8 and mine == theirs


async def test_cleanup_through_two_replicas(local, remote):
    """/v1/cleanup and /cleanup requests spread over two DLLM replicas give the single-process outputs."""
    async def cleaned(server: VoiceServer) -> list[str]:
        url = f"http://127.0.0.1:{server.port}/v1/cleanup"
        replies = await asyncio.gather(*(asyncio.to_thread(post, url, {"text": t}) for t in TEXTS))
        assert all(status == 200 for status, _ in replies), replies
        return [body["cleaned"] for _, body in replies]
    assert len(await replica_pids()) == 2
    assert await cleaned(remote) == await cleaned(local)
    status, body = await asyncio.to_thread(post, f"http://127.0.0.1:{remote.port}/v1/cleanup", {"texts": TEXTS})
    assert status == 200 and [r["cleaned"] for r in body["results"]] == await cleaned(local)


async def test_a_batch_mixes_two_front_ends(ray_cluster):
    """Requests from two front ends at once share engine batches on the replicas."""
    from websockets.asyncio.client import connect

    async def flood(server: VoiceServer, tag: str) -> None:
        async with connect(server.url + "/cleanup") as ws:  # one connection: one client to the engine
            for i in range(8):
                await ws.send(json.dumps({"id": i, "text": f"{tag} um the the number {i}"}))
            for _ in range(8):
                assert json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] == "cleanup.result"
    a, b = await front_end(), await front_end()
    try:
        before = sum(i["shared_batches"] for i in (await replica_infos()).values())
        await asyncio.gather(flood(a, "first"), flood(b, "second"))
        infos = await replica_infos()
    finally:
        await a.close()
        await b.close()
    assert sum(i["shared_batches"] for i in infos.values()) > before, infos


async def test_front_end_restarts_while_replicas_serve(ray_cluster, local):
    """A front end closed and started again finds the same replicas (not restarted) and is served at once."""
    before = await replica_pids()
    first = await front_end()
    url = f"http://127.0.0.1:{first.port}/v1/cleanup"
    assert (await asyncio.to_thread(post, url, {"text": TEXTS[0]}))[0] == 200
    await first.close()
    t0 = time.monotonic()
    second = await front_end()
    try:
        status, body = await asyncio.to_thread(post, f"http://127.0.0.1:{second.port}/v1/cleanup", {"text": TEXTS[1]})
        assert status == 200, body
        assert time.monotonic() - t0 < 10  # no model loads: the replicas were serving all along
        _, reference = await asyncio.to_thread(post, f"http://127.0.0.1:{local.port}/v1/cleanup", {"text": TEXTS[1]})
        assert body["cleaned"] == reference["cleaned"]
    finally:
        await second.close()
    assert await replica_pids() == before


async def test_replica_killed_under_load(ray_cluster, local, remote):
    """A DLLM replica killed while a flood of /cleanup requests runs: every request is answered, none hangs."""
    import ray
    from websockets.asyncio.client import connect

    n = 48
    texts = [TEXTS[i % len(TEXTS)] + f" number {i}" for i in range(n)]
    async with connect(remote.url + "/cleanup") as ws:
        for i, text in enumerate(texts):
            await ws.send(json.dumps({"id": i, "text": text}))
        answers = [json.loads(await asyncio.wait_for(ws.recv(), 60))]  # the flood is under way: kill one
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if cluster.DLLM_APP in a["name"] and "DLLM" in a["name"]]
        assert len(replicas) == 2, replicas
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        while len(answers) < n:
            answers.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))
    by_id = {a["id"]: a for a in answers}
    assert sorted(by_id) == list(range(n))
    failed = [a for a in answers if a["type"] != "cleanup.result"]
    assert all(a["type"] == "cleanup.error" and a["code"] == "llm_failed" for a in failed), failed
    assert len(failed) <= n // 4, failed  # lost requests are sent again: at most a few give up
    print(f"{n} requests, {len(failed)} failed after retries")
    local_engine = local.services.engine
    for a in answers:
        if a["type"] == "cleanup.result":
            assert a["cleaned"] == (await local_engine.cleanup(a["text"])).cleaned
    # Serve replaces the killed replica; the deployment is back to two.
    deadline = time.monotonic() + 120
    while (running_replicas() < 2 or len(await replica_pids(rounds=2)) < 2) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # the handles learn of the new replica a little after it runs
    assert running_replicas() == 2 and len(await replica_pids()) == 2


async def test_front_end_as_the_serve_ingress(ray_cluster, local):
    """The front end deployed as the Serve ingress (what `serve deploy` runs) answers /v1/cleanup and a
    typed /ws turn through Serve's HTTP proxy as one process does."""
    from ray import serve
    serve.run(cluster.app({"server": {}, "front_end": {"num_cpus": 0.25}}), name=cluster.FRONT_APP, route_prefix="/")
    try:
        port = PROXY["port"]
        status, body = await asyncio.to_thread(post, f"http://127.0.0.1:{port}/v1/cleanup", {"texts": TEXTS[:3]})
        assert status == 200, body
        _, reference = await asyncio.to_thread(post, f"http://127.0.0.1:{local.port}/v1/cleanup", {"texts": TEXTS[:3]})
        assert body["results"] == reference["results"]

        async def typed(url: str) -> tuple[str, str]:
            client = await Client.open(url + "/ws")
            await client.until("session.ready", 30)
            await client.send_json(type="text", text="um is the the gym open late")
            await client.until("turn.done", 120)
            await client.close()
            assert client.audio_bytes > 0
            return client.of("turn.cleaned")[0]["text"], client.of("turn.reply")[0]["text"]
        assert await typed(f"ws://127.0.0.1:{port}") == await typed(local.url)
    finally:
        serve.delete(cluster.FRONT_APP)


async def test_serve_config_builds():
    """deploy/serve.yaml is a valid Serve config whose applications build from their import paths and args."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema(**yaml.safe_load((Path(__file__).parents[1] / "deploy" / "serve.yaml").read_text()))
    for application in config.applications:
        module, _, name = application.import_path.partition(":")
        built = getattr(__import__(module, fromlist=[name]), name)(application.args)
        assert type(built).__name__ == "Application", application.name


class FlakyHandle:
    """A stand-in deployment handle whose calls fail as `errors` says, then answer."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __getattr__(self, method: str):
        return self

    def remote(self, *args, **kw):
        self.calls += 1
        error = self.errors.pop(0) if self.errors else None

        async def answer():
            if error is not None:
                raise error
            from dllm import TurnResult
            return TurnResult(raw=args[0], cleaned=args[0].capitalize(), reply="", steps=8, canvas=24, ms=1.0)
        return Response(answer())


class Response:
    def __init__(self, coro) -> None:
        self.coro = coro

    def __await__(self):
        return self.coro.__await__()

    def cancel(self) -> None:
        pass


async def test_proxy_sends_again_then_gives_up_with_the_models_error():
    """A request whose replica dies is sent again; past `retries` losses, or on the model's own error, the
    caller gets the model package's exception (which the server reports with its code), not Ray's."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from dllm.errors import DLLMError, RequestError

    handle = FlakyHandle(ActorDiedError(), ActorDiedError())
    assert (await cluster.RemoteEngine(handle, retries=2).cleanup("um hi")).cleaned == "Um hi"
    assert handle.calls == 3
    handle = FlakyHandle(*[ActorDiedError()] * 3)
    with pytest.raises(DLLMError, match="lost 3 times"):
        await cluster.RemoteEngine(handle, retries=2).cleanup("um hi")
    try:
        raise RequestError("the transcript is too long")
    except RequestError as e:
        wrapped = RayTaskError("cleanup", "traceback", e).as_instanceof_cause()
    handle = FlakyHandle(wrapped)
    with pytest.raises(RequestError, match="too long") as caught:
        await cluster.RemoteEngine(handle, retries=2).cleanup("um hi")
    assert type(caught.value) is RequestError and handle.calls == 1


async def test_serve_ray_refuses_a_bad_part(capsys):
    """`voice serve --ray --replicas gpu=2` says which parts there are, before any Ray starts."""
    from voice.cli import main
    assert main(["serve", "--ray", "--replicas", "gpu=2"]) == 1
    assert "PART one of dllm, asr, tts" in capsys.readouterr().err
