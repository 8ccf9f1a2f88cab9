"""Hostile clients against a real server on 127.0.0.1 (port 0): issue 10's probe table, one row a test.

The server runs the tiny random model through the real engine and no speech
models: these tests are about admission, origins, pacing, timeouts and bad
input, and each checks that the server (and, for bad input, the same session)
still answers afterwards.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import pytest_asyncio
from conftest import make_tiny_engine
from voice_helpers import Client
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from voice import protocol as P
from voice.server import ServerOptions, VoiceServer
from voice.services import Services

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def services():
    return Services(make_tiny_engine(batch_window_ms=5.0), steps=4)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(services):
    server = VoiceServer(services, ServerOptions(port=0, max_steps=8))
    await server.start()
    yield server
    await server.close()


class serving:
    """A server with its own options over the shared services, for one test."""

    def __init__(self, services: Services, **options) -> None:
        self.server = VoiceServer(services, ServerOptions(port=0, **options))

    async def __aenter__(self) -> VoiceServer:
        await self.server.start()
        return self.server

    async def __aexit__(self, *exc) -> None:
        self.server._uvicorn.should_exit = True  # keep the shared engine: close only the listener
        await asyncio.wait_for(self.server._serving, 15)
        self.server._socket.close()


def http(url: str, body: bytes | None = None, **headers) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


async def ready(server: VoiceServer, **start) -> Client:
    client = await Client.open(server.url + "/ws", **start)
    assert (await client.until("session.ready", 20))["type"] == "session.ready"
    return client


async def answers(client: Client) -> None:
    """The session still completes a typed turn."""
    await client.send_json(type="text", text="are you still there")
    done = await client.until("turn.done", 60)
    assert done["turn_id"] >= 1


async def closed_with(client: Client, code: int, timeout: float = 20) -> None:
    with pytest.raises(ConnectionClosed):
        while True:
            await client.recv_event(timeout)
    assert client.ws.close_code == code


# ----- who may connect

async def test_foreign_origin_refused_on_every_route(server):
    """Origin: http://evil.example is refused (403) on /ws, /cleanup and the HTTP API; the page's own origin passes."""
    for path in ("/ws", "/cleanup"):
        with pytest.raises(InvalidStatus) as info:
            await connect(server.url + path, origin="http://evil.example")
        assert info.value.response.status_code == 403
    base = f"http://127.0.0.1:{server.port}"
    for path, body in (("/v1/cleanup", b'{"text": "um hi"}'), ("/v1/models", None)):
        status, _, data = await asyncio.to_thread(http, base + path, body, Origin="http://evil.example")
        assert status == 403 and json.loads(data)["error"]["code"] == "forbidden"
    status, _, _ = await asyncio.to_thread(http, base + "/v1/cleanup", b'{"text": "um hi"}', Origin=base)
    assert status == 200
    async with connect(server.url + "/cleanup", origin=base) as ws:
        await ws.send('{"id": 1, "text": "um hi"}')
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "cleanup.result"


async def test_rebound_host_refused(server):
    """A Host header naming a foreign domain (DNS rebinding) is refused on /ws and the HTTP API."""
    with pytest.raises(InvalidStatus) as info:
        await connect(f"ws://evil.example:{server.port}/ws", host="127.0.0.1", port=server.port)
    assert info.value.response.status_code == 403
    status, _, _ = await asyncio.to_thread(http, f"http://127.0.0.1:{server.port}/v1/models",
                                           Host=f"evil.example:{server.port}")
    assert status == 403


async def test_allow_origin_extends_the_list(services):
    """--allow-origin lets a named page in; others stay out."""
    async with serving(services, allow_origins=("https://app.example.com",)) as s:
        async with connect(s.url + "/ws", origin="https://app.example.com"):
            pass
        with pytest.raises(InvalidStatus):
            await connect(s.url + "/ws", origin="https://other.example.com")


async def test_healthz_shows_no_paths(server):
    """/healthz names the model without file-system paths, and no response names the server software."""
    status, headers, body = await asyncio.to_thread(http, f"http://127.0.0.1:{server.port}/healthz")
    health = json.loads(body)
    assert status == 200 and "/" not in health["model"] and "\\" not in health["model"]
    assert "server" not in {k.lower() for k in headers}


# ----- admission and idle clients

async def test_admission_counts_connections_not_yet_started(services):
    """With max_sessions 2, two connections that never start a session fill the server: the third gets busy (1013)."""
    async with serving(services, max_sessions=2) as s:
        quiet = [await Client.open(s.url + "/ws", start_session=False) for _ in range(2)]
        third = await Client.open(s.url + "/ws", start_session=False)
        assert (await third.until("error"))["code"] == "busy"
        await closed_with(third, 1013)
        await quiet[0].close()
        for _ in range(100):
            if s.voice_connections < 2:
                break
            await asyncio.sleep(0.02)
        fourth = await ready(s)  # a slot freed: admitted
        await fourth.close()
        await quiet[1].close()


async def test_admission_is_atomic_under_a_burst(services):
    """20 clients sending session.start at once to a server of 4 sessions: exactly 4 get session.ready."""
    async with serving(services, max_sessions=4) as s:
        clients = await asyncio.gather(*(Client.open(s.url + "/ws", start_session=False) for _ in range(20)))

        async def start(client: Client) -> dict:
            with contextlib.suppress(ConnectionClosed):  # a refused client may be closed before it speaks
                await client.send_json(type="session.start", sample_rate=16000)
            return await client.recv_event(20)
        firsts = await asyncio.gather(*(start(c) for c in clients))
        assert sorted(e["type"] for e in firsts).count("session.ready") == 4
        assert sum(e.get("code") == "busy" for e in firsts) == 16
        await asyncio.gather(*(c.close() for c in clients))


async def test_idle_session_is_closed(services):
    """A session that sends nothing after session.start gets idle_timeout and a 1008 close."""
    async with serving(services, idle_timeout_s=0.5) as s:
        client = await ready(s)
        err = await client.until("error", 10)
        assert err["code"] == "idle_timeout" and "0.5 s" in err["message"]
        await closed_with(client, 1008)
        assert not s.sessions


async def test_session_with_silence_and_no_turn_is_closed(services):
    """A session that streams silence but never takes a turn is closed after turnless_timeout_s."""
    async with serving(services, idle_timeout_s=5, turnless_timeout_s=1.0) as s:
        client = await ready(s)
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed):
            while time.monotonic() - t0 < 10:
                await client.ws.send(bytes(640))  # 20 ms of silence
                await asyncio.sleep(0.02)
        assert client.ws.close_code == 1008 and client.ws.close_reason == "no turn"
        assert 0.9 < time.monotonic() - t0 < 5


async def test_idle_cleanup_connection_is_closed(services):
    """A /cleanup connection with no request in flight and nothing sent is closed (1008) after the idle time."""
    async with serving(services, idle_timeout_s=0.5) as s:
        async with connect(s.url + "/cleanup") as ws:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["code"] == "idle_timeout"
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1008


# ----- pacing and bounds

async def test_audio_faster_than_real_time_is_refused(services):
    """30 s of audio sent at once: one too_fast error, frames dropped, and the session still answers."""
    async with serving(services, audio_burst_s=2.0) as s:
        client = await ready(s)
        await client.send_audio(np.zeros(30 * 16000, np.int16), chunk=1600)
        err = await client.until("error", 10)
        assert err["code"] == "too_fast" and "real time" in err["message"]
        await answers(client)
        assert [e["code"] for e in client.of("error")] == ["too_fast"]
        await client.close()


async def test_steps_bounded_by_max_steps(server):
    """steps above --max-steps is refused on /ws and the HTTP API; the bound itself is accepted."""
    client = await Client.open(server.url + "/ws", steps=9)
    err = await client.until("error")
    assert err["code"] == "bad_message" and "8" in err["message"]
    await client.send_json(type="session.start", sample_rate=16000, steps=8)
    assert (await client.until("session.ready"))["steps"] == 8
    await client.close()
    base = f"http://127.0.0.1:{server.port}"
    status, _, body = await asyncio.to_thread(http, base + "/v1/cleanup", b'{"text": "hi", "steps": 64}')
    assert status == 400 and json.loads(body)["error"]["param"] == "steps"
    status, _, _ = await asyncio.to_thread(
        http, base + "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "steps": 9}')
    assert status == 400


# ----- fuzz findings: an error event, the same session carries on, one log line, no traceback

FUZZ_WS = [  # (frame, the event that answers it)
    ('{"type": "session.start", "sample_rate": 16000, "steps": %s}' % ("9" * 401), "error"),
    ('{"type": "text", "text": "x", "n": %s}' % ("9" * 401), "turn.done"),  # an unknown field: ignored
    ("[" * 60_000, "error"),
    ('{"type": "text", "text": "hello \\ud800 there"}', "error"),
    ('{"type": "text", "text": "\\udfff"}', "error"),
]


async def test_fuzz_findings_on_ws(server, caplog):
    """Huge integers, deep nesting and lone surrogates get error events; the session's next turn still works."""
    caplog.set_level(logging.INFO)
    client = await ready(server)
    for frame, answer in FUZZ_WS:
        await client.ws.send(frame)
        await client.until(answer, 30)
    codes = [e["code"] for e in client.of("error")]
    assert codes == ["already_started", "bad_json", "bad_json", "bad_json"], codes
    await answers(client)
    await answers(client)  # and the one after: nothing poisoned the history
    await client.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert sum("refused" in r.getMessage() for r in caplog.records) >= 4


async def test_fuzz_findings_on_cleanup(server, caplog):
    """A surrogate id, a huge id and a frame over 64 KiB on /cleanup get errors (id null); the connection goes on."""
    caplog.set_level(logging.INFO)
    async with connect(server.url + "/cleanup", max_size=None) as ws:
        frames = ['{"id": "\\ud800", "text": "um hi"}', '{"id": %s, "text": "um hi"}' % ("9" * 401),
                  '{"id": "big", "text": "%s"}' % ("x" * (P.MAX_TEXT_FRAME_BYTES + 10)), "[" * 60_000]
        for frame in frames:
            await ws.send(frame)
            reply = json.loads(await asyncio.wait_for(ws.recv(), 20))
            assert reply["type"] == "error" and reply["id"] is None, reply
        await ws.send('{"id": "ok", "text": "um so yeah"}')
        reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert reply["type"] == "cleanup.result" and reply["id"] == "ok"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# ----- exposure: token, binding, TLS

async def test_token_on_every_route_but_healthz(services):
    """With a token: /v1 and /ws refuse without it, take it as Bearer or ?token=, the page sets it as a cookie."""
    async with serving(services, token="s3cret") as s:
        base = f"http://127.0.0.1:{s.port}"
        assert (await asyncio.to_thread(http, base + "/healthz"))[0] == 200
        assert (await asyncio.to_thread(http, base + "/v1/models"))[0] == 401
        assert (await asyncio.to_thread(http, base + "/"))[0] == 401
        assert (await asyncio.to_thread(http, base + "/v1/models", Authorization="Bearer s3cret"))[0] == 200
        status, headers, _ = await asyncio.to_thread(http, base + "/?token=s3cret")
        assert status == 200 and "voice_token=s3cret" in headers.get("set-cookie", "")
        assert "httponly" in headers["set-cookie"].lower() and "samesite=strict" in headers["set-cookie"].lower()
        with pytest.raises(InvalidStatus):
            await connect(s.url + "/ws")
        client = await Client.open(s.url + "/ws?token=s3cret")
        assert (await client.until("session.ready"))["type"] == "session.ready"
        await client.close()


async def test_binding_beyond_loopback_needs_a_token_or_insecure():
    """A non-loopback host without a token is refused at configuration; --token or --insecure lift that."""
    from voice.errors import VoiceError
    with pytest.raises(VoiceError, match="token"):
        ServerOptions(host="0.0.0.0")
    ServerOptions(host="0.0.0.0", token="t")
    ServerOptions(host="0.0.0.0", insecure=True)
    ServerOptions(host="127.0.0.1")


def _self_signed(tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


async def test_tls(services, tmp_path):
    """With --certfile/--keyfile the server speaks https:// and wss://, and a session runs over it."""
    import ssl
    pytest.importorskip("cryptography")
    certfile, keyfile = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(certfile))
    async with serving(services, certfile=certfile, keyfile=keyfile) as s:
        assert s.url.startswith("wss://")
        async with connect(s.url + "/ws", ssl=trust) as ws:
            await ws.send('{"type": "session.start", "sample_rate": 16000}')
            assert json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] == "session.ready"
        def get() -> int:
            with urllib.request.urlopen(f"https://127.0.0.1:{s.port}/healthz", context=trust, timeout=10) as r:
                return r.status
        assert await asyncio.to_thread(get) == 200


# ----- sharing the engine

async def test_cleanup_flood_does_not_starve_voice_turns(services):
    """Three /cleanup connections sending 32 requests each: every typed turn of a voice session still completes."""
    async with serving(services) as s:
        client = await ready(s)

        async def flood() -> list[dict]:
            async with connect(s.url + "/cleanup") as ws:
                for i in range(32):
                    await ws.send(json.dumps({"id": i, "text": "um so i i think we should go"}))
                return [json.loads(await asyncio.wait_for(ws.recv(), 120)) for _ in range(32)]

        floods = [asyncio.create_task(flood()) for _ in range(3)]
        await asyncio.sleep(0.05)
        for _ in range(3):
            await answers(client)
        assert not client.of("error")
        replies = [r for f in await asyncio.gather(*floods) for r in f]
        assert len(replies) == 96 and not [r for r in replies if r["type"] == "error"]
        await client.close()


async def test_admission_refuses_when_turns_are_over_the_bound(services):
    """With max_turn_ms below what turns take, new sessions get busy (1013) while admitted ones go on."""
    async with serving(services, max_turn_ms=0.001) as s:
        client = await ready(s)
        for _ in range(3):
            await answers(client)
        refused = await Client.open(s.url + "/ws", start_session=False)
        err = await refused.until("error")
        assert err["code"] == "busy" and "capacity" in err["message"]
        await closed_with(refused, 1013)
        await answers(client)
        await client.close()


async def test_shutdown_closes_sessions_with_1001(caplog):
    """Closing the server with a session and a /cleanup connection open says 1001 to both and logs no error."""
    caplog.set_level(logging.INFO)
    server = VoiceServer(Services(make_tiny_engine(), steps=2), ServerOptions(port=0))
    await server.start()
    client = await ready(server)
    async with connect(server.url + "/cleanup") as cleanup:
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await server.close()
        assert time.monotonic() - t0 < 4  # not uvicorn's 5 s grace period
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(cleanup.recv(), 5)
        assert cleanup.close_code == 1001
    await closed_with(client, 1001)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
