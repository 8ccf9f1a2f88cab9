"""The server over real WebSocket connections on 127.0.0.1 (port 0).

Three servers: `real` runs the packaged dLLM, Whisper and piper; `strict` runs
them too, with a short session.start timeout and no partials, for the bad-input
tests, which check that a second, healthy session on the same server still
completes a turn afterwards; `scripted` runs Whisper and piper with a
`ScriptedEngine`, for barge-in and output rates, where the reply must be known,
long and non-empty.
"""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import pytest_asyncio
from voice_helpers import QUESTION, Client, ScriptedEngine, fresh_engine, speech, synthesizer, \
    transcriber, words
from websockets.exceptions import ConnectionClosed

from voice import protocol as P
from voice.server import ServerOptions, VoiceServer
from voice.services import Services
from voice.session import SessionConfig

pytestmark = pytest.mark.asyncio(loop_scope="module")

LONG_REPLY = ("The library opens at nine in the morning on Saturdays. It closes at five in the afternoon. "
              "The children's room opens an hour later. Parking is free on weekends.")


@pytest.fixture(scope="module")
def engine_base(base_engine):
    """The packaged dLLM (conftest's session-wide `base_engine`)."""
    return base_engine


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real(engine_base):
    engine = fresh_engine(engine_base, batch_window_ms=30.0)
    server = VoiceServer(Services(engine, transcriber(), synthesizer()), ServerOptions(port=0))
    await server.start()
    yield server
    await server.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def strict(engine_base):
    engine = fresh_engine(engine_base, batch_window_ms=30.0)
    server = VoiceServer(Services(engine, transcriber(), synthesizer()),
                         ServerOptions(port=0, start_timeout_s=1.5, session=SessionConfig(partial_every_ms=0)))
    await server.start()
    yield server
    await server.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scripted():
    engine = ScriptedEngine(reply=LONG_REPLY)
    server = VoiceServer(Services(engine, transcriber(), synthesizer()),
                         ServerOptions(port=0, start_timeout_s=1.5, session=SessionConfig(partial_every_ms=0)))
    await server.start()
    yield server
    await server.close()


async def ready(url: str, **start) -> Client:
    client = await Client.open(url + "/ws", **start)
    assert (await client.until("session.ready", 20))["type"] == "session.ready"
    return client


async def still_works(server: VoiceServer, witness: Client | None = None) -> None:
    """A healthy session (the witness opened before the trouble, or a new one) completes a typed turn."""
    client = witness or await ready(server.url)
    await client.send_json(type="text", text="are you still there")
    done = await client.until("turn.done", 120)
    assert done["turn_id"] >= 1
    await client.close()


async def sessions_drain(server: VoiceServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not server.sessions, "a session outlived its connection"


def http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


# ----- the real models

async def test_spoken_utterance_end_to_end(real):
    """Piper speech sent in real time gives VAD events, partial and final transcripts, the dLLM turn and turn.done."""
    client = await ready(real.url)
    await client.send_audio(speech(QUESTION), realtime=1.0)
    done = await client.until("turn.done", 180)
    await client.close()
    types = client.types()
    order = ["session.ready", "vad.speech_started", "transcript.partial", "vad.speech_stopped", "transcript.final",
             "turn.cleaned", "turn.reply", "turn.done"]
    seen = [t for t in types if t in order]
    assert list(dict.fromkeys(seen)) == order, types  # each kind present, first occurrences in order
    partials = [i for i, t in enumerate(types) if t == "transcript.partial"]
    assert types.index("vad.speech_started") < partials[0] and partials[-1] < types.index("vad.speech_stopped")
    final = client.of("transcript.final")[0]["text"]
    assert {"what", "time", "library", "open", "saturday"} <= set(words(final)), final
    reply = client.of("turn.reply")[0]["text"]
    for key in ("endpoint_ms", "asr_ms", "llm_ms", "total_ms"):
        assert done["timings"][key] > 0, key
    if reply:  # audio iff there is something to say
        # The first sentence may be spoken before the pass ends, so audio.start may precede turn.reply.
        positions = [types.index(t) for t in ("transcript.final", "audio.start", "audio.end", "turn.done")]
        assert positions == sorted(positions) and types.index("turn.reply") < types.index("turn.done"), types
        assert client.audio_bytes > 0
        assert 0 < done["voice_to_voice_ms"] == pytest.approx(done["timings"]["first_audio_ms"], abs=0.2)
    else:
        assert "audio.start" not in types and client.audio_bytes == 0
        assert done["voice_to_voice_ms"] is None
    # /metrics counted the spoken turn's stages.
    _, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{real.port}/metrics")
    for stage in ["endpoint", "asr", "dllm"] + (["tts_first_audio", "voice_to_voice"] if reply else []):
        assert f'voice_stage_seconds_count{{stage="{stage}"}} ' in body.decode(), stage


async def test_typed_turn_after_a_client_vanished_mid_reply(real):
    """A client that disconnects while its reply is being computed leaves nothing behind; a typed turn then works."""
    gone = await ready(real.url)
    await gone.send_json(type="text", text="um what is the the weather like today")
    await asyncio.sleep(0.3)  # the dLLM turn is under way
    gone.ws.transport.abort()
    await sessions_drain(real)
    client = await ready(real.url)
    await client.send_json(type="text", text="hello can you hear me")
    done = await client.until("turn.done", 180)
    await client.close()
    types = client.types()
    assert {"turn.cleaned", "turn.reply"} <= set(types[:types.index("turn.done")]), types
    assert done["voice_to_voice_ms"] is None and done["timings"]["llm_ms"] > 0


async def test_two_sessions_take_turns_at_the_same_time(real):
    """Two sessions sending typed turns at the same moment share the engine's batches, and each gets only
    its own turns: its own turn ids and cleaned text, one turn.done a turn, no error."""
    engine = real.services.engine
    asks = {"pool": ["um when does the the pool close", "and is the pool open on sunday"],
            "station": ["uh where is the the train station", "and is the station far from here"]}
    clients = {key: await ready(real.url) for key in asks}
    before = engine.batches

    async def turn(key: str, text: str) -> list[dict]:
        client = clients[key]
        start = len(client.events)
        await client.send_json(type="text", text=text)
        await client.until("turn.done", 180)
        return client.events[start:]

    for round_ in range(2):
        events = await asyncio.gather(*(turn(key, texts[round_]) for key, texts in asks.items()))
        for key, got in zip(asks, events):
            other = next(k for k in asks if k != key)
            mine = [e for e in got if e["type"] in ("turn.cleaned", "turn.reply", "turn.done")]
            assert {e["turn_id"] for e in mine} == {round_ + 1}, got  # (the last reply may be flushed first)
            cleaned = [e["text"] for e in got if e["type"] == "turn.cleaned"]
            assert len(cleaned) == 1 and key in words(cleaned[0]) and other not in words(cleaned[0]), cleaned
            assert [e["type"] for e in got].count("turn.done") == 1 and "error" not in [e["type"] for e in got]
    for client in clients.values():
        await client.close()
    assert engine.batches - before < 4  # turns asked together shared a batch


async def test_cleanup_batches_concurrent_requests(real):
    """Concurrent /cleanup requests all get answers with their ids, in fewer engine steps than one by one."""
    from websockets.asyncio.client import connect
    texts = ["um so i i think we should go", "uh the the meeting is at noon", "so like yeah it works",
             "er can you can you send it"]
    engine = real.services.engine
    before = engine.batches
    async with connect(real.url + "/cleanup") as ws:
        for i, text in enumerate(texts):
            await ws.send(json.dumps({"id": f"r{i}", "text": text}))
        await ws.send('{"id": "bad", "text": ""}')
        replies = [json.loads(await asyncio.wait_for(ws.recv(), 120)) for _ in range(len(texts) + 1)]
    by_id = {r["id"]: r for r in replies}
    assert by_id["bad"]["type"] == "error" and by_id["bad"]["code"] == "bad_message"
    for i, text in enumerate(texts):
        r = by_id[f"r{i}"]
        assert r["type"] == "cleanup.result" and r["text"] == text and isinstance(r["cleaned"], str)
    assert engine.batches - before < len(texts)  # at least two shared a batch


async def test_healthz_and_page(real):
    """GET /healthz answers 200 JSON, / serves the page and its scripts, unknown paths 404, /ws needs an upgrade."""
    base = f"http://127.0.0.1:{real.port}"
    status, ctype, body = await asyncio.to_thread(http_get, base + "/healthz")
    assert status == 200 and ctype.startswith("application/json") and json.loads(body)["status"] == "ok"
    status, ctype, body = await asyncio.to_thread(http_get, base + "/")
    assert status == 200 and ctype.startswith("text/html") and b"app.js" in body
    for name in ("app.js", "mic-worklet.js"):
        status, ctype, _ = await asyncio.to_thread(http_get, f"{base}/{name}")
        assert status == 200 and "javascript" in ctype
    assert (await asyncio.to_thread(http_get, base + "/../pyproject.toml"))[0] == 404
    assert (await asyncio.to_thread(http_get, base + "/ws"))[0] == 426


# ----- bad input: an error event or a clean close, and other sessions unaffected

async def test_missing_session_start(strict):
    """Audio or text before session.start gets not_started; a session.start afterwards still works."""
    witness = await ready(strict.url)
    client = await Client.open(strict.url + "/ws", start_session=False)
    await client.ws.send(b"\x00\x00" * 160)
    assert (await client.until("error"))["code"] == "not_started"
    await client.send_json(type="text", text="hi")
    assert (await client.until("error"))["code"] == "not_started"
    await client.send_json(type="session.start", sample_rate=16000)
    await client.until("session.ready")
    await client.close()
    await still_works(strict, witness)


async def test_no_session_start_in_time_closes(strict):
    """A client that never sends session.start gets an error and a policy close (1008)."""
    client = await Client.open(strict.url + "/ws", start_session=False)
    event = await client.until("error", 10)
    assert event["code"] == "not_started" and "session.start" in event["message"]
    with pytest.raises(ConnectionClosed):
        await client.recv_event(10)
    assert client.ws.close_code == 1008


async def test_wrong_session_start(strict):
    """An unsupported rate, a bad field and a second session.start each get a clear error."""
    witness = await ready(strict.url)
    client = await Client.open(strict.url + "/ws", sample_rate=11025)
    err = await client.until("error")
    assert err["code"] == "bad_sample_rate" and "16000" in err["message"]
    await client.send_json(type="session.start", sample_rate=16000, steps="many")
    assert (await client.until("error"))["code"] == "bad_message"
    await client.send_json(type="session.start", sample_rate=48000)
    assert (await client.until("session.ready"))["input_sample_rate"] == 48000
    await client.send_json(type="session.start", sample_rate=16000)
    assert (await client.until("error"))["code"] == "already_started"
    await client.close()
    await still_works(strict, witness)


async def test_odd_length_pcm_and_bad_messages(strict):
    """Odd-length PCM, malformed JSON and unknown types get errors and the same session carries on."""
    client = await ready(strict.url)
    await client.ws.send(b"\x00" * 641)
    assert (await client.until("error"))["code"] == "bad_audio"
    await client.ws.send("{this is not json")
    assert (await client.until("error"))["code"] == "bad_json"
    await client.send_json(type="dance", moves=3)
    err = await client.until("error")
    assert err["code"] == "unknown_type" and "dance" in err["message"]
    await client.send_json(type="text", text=123)
    assert (await client.until("error"))["code"] == "bad_message"
    await still_works(strict, client)


async def test_oversized_frames(strict):
    """A frame over 64 KiB is refused with an error; one over the 1 MiB message limit closes the connection (1009)."""
    witness = await ready(strict.url)
    client = await ready(strict.url)
    await client.ws.send(bytes(P.MAX_AUDIO_FRAME_BYTES + 2))
    err = await client.until("error")
    assert err["code"] == "frame_too_large" and str(P.MAX_AUDIO_FRAME_BYTES) in err["message"]
    await client.ws.send(bytes(P.MAX_MESSAGE_BYTES + 2))
    with pytest.raises(ConnectionClosed):
        await client.recv_event(10)
    assert client.ws.close_code == 1009
    await sessions_drain_one(strict, keep=1)
    await still_works(strict, witness)


async def sessions_drain_one(server: VoiceServer, keep: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(server.sessions) > keep and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(server.sessions) == keep


async def test_client_vanishes_mid_utterance(strict):
    """A client that drops its TCP connection halfway through speaking is cleaned up; others carry on."""
    witness = await ready(strict.url)
    client = await ready(strict.url)
    pcm = speech(QUESTION)
    await client.send_audio(pcm[: len(pcm) // 2])
    await client.until("vad.speech_started")
    client.ws.transport.abort()
    await sessions_drain_one(strict, keep=1)
    await still_works(strict, witness)


async def test_too_many_sessions(strict):
    """Past max_sessions a new client gets a busy error and close 1013; the others are untouched."""
    server = VoiceServer(strict.services, ServerOptions(port=0, max_sessions=1))
    await server.start()
    try:
        first = await ready(server.url)
        second = await Client.open(server.url + "/ws", start_session=False)
        assert (await second.until("error"))["code"] == "busy"
        with pytest.raises(ConnectionClosed):
            await second.recv_event(10)
        assert second.ws.close_code == 1013
        await still_works(server, first)
    finally:
        await server.close()


# ----- barge-in over the wire

async def test_barge_in_flushes_the_reply(scripted):
    """Speech while the reply plays: audio.flush and turn.interrupted, then the new utterance is answered."""
    engine = scripted.services.engine
    client = await ready(scripted.url)
    await client.send_json(type="text", text="tell me about the library")
    await client.until("audio.start", 60)
    await client.send_audio(speech(QUESTION), realtime=3.0)
    flush = await client.until("audio.flush", 30)
    interrupted = await client.until("turn.interrupted", 10)
    assert flush["turn_id"] == interrupted["turn_id"] == 1 and interrupted["reason"] == "speech"
    heard = interrupted["heard"]
    assert LONG_REPLY.startswith(heard) and len(heard) < len(LONG_REPLY)
    final = await client.until("transcript.final", 60)
    assert final["turn_id"] == 2 and "library" in words(final["text"])
    await client.until("turn.done", 60)
    await client.close()
    types = client.types()
    assert types.index("vad.speech_started") < types.index("audio.flush")
    assert engine.calls[-1].history == (("tell me about the library", heard),)


async def test_stop_button_interrupts(scripted):
    """{"type": "interrupt"} during a reply flushes it; with nothing playing it does nothing."""
    client = await ready(scripted.url)
    await client.send_json(type="interrupt")
    await client.send_json(type="text", text="read me the opening hours")
    await client.until("audio.start", 60)
    await client.send_json(type="interrupt")
    await client.until("audio.flush", 10)
    interrupted = await client.until("turn.interrupted", 10)
    await client.close()
    assert interrupted["reason"] == "client"
    assert "error" not in client.types()


async def test_input_rate_48k_and_output_rate_choice(scripted):
    """A 48 kHz client is understood, and output_sample_rate sets the reply PCM rate."""
    client = await ready(scripted.url, sample_rate=48000, output_sample_rate=16000)
    assert client.of("session.ready")[0]["output_sample_rate"] == 16000
    pcm = speech(QUESTION, rate=48000)
    await client.send_audio(pcm, chunk=960)
    final = await client.until("transcript.final", 60)
    start = await client.until("audio.start", 60)
    await client.until("turn.done", 60)
    await client.close()
    assert "saturday" in words(final["text"]) and start["sample_rate"] == 16000
    seconds = client.audio_bytes / 2 / 16000
    assert 3 < seconds < 30  # the long reply, spoken at 16 kHz
    assert np.isfinite(seconds)


@pytest.mark.parametrize("hold_s", [0.0, 2.0])
async def test_bench_counts_the_silence_between_the_pieces_of_a_reply(hold_s):
    """voice.bench's `stall_ms`: the opening clause is spoken while the pass goes on; when the rest of the reply
    comes after the clause has played, a listener hears a gap, and the bench says how long."""
    from voice.bench import one_turn

    engine = ScriptedEngine(reply="I'm sorry, I don't know that.", settled="I'm sorry,")
    engine.gate = asyncio.Event()
    server = VoiceServer(Services(engine, transcriber(), synthesizer()),
                         ServerOptions(port=0, session=SessionConfig(partial_every_ms=0)))
    await server.start()

    async def release() -> None:
        while not engine.calls:
            await asyncio.sleep(0.01)
        await asyncio.sleep(hold_s)
        engine.gate.set()
    releaser = asyncio.create_task(release())
    try:
        sample = await one_turn(server.url, QUESTION, speech(QUESTION), timeout=120)
    finally:
        releaser.cancel()
        await server.close()
    assert sample.error is None and sample.reply == "I'm sorry, I don't know that."
    clause_s = len(synthesizer().synthesize_all("I'm sorry,")) / synthesizer().sample_rate
    if hold_s:
        assert sample.timings["stall_ms"] > (hold_s - clause_s) * 1000 - 300, (sample.timings, clause_s)
    else:
        assert sample.timings["stall_ms"] < 100, sample.timings


async def test_bench_conversation_plays_each_question_after_the_reply_before():
    """voice.bench --conversation: the questions go to one session, each after the reply before it has
    played, so none cuts a reply short and every turn after the first carries the ones before."""
    from voice.bench import QUESTIONS, conversation, speak_questions

    engine = ScriptedEngine(reply="I'm sorry, I don't know that.")
    server = VoiceServer(Services(engine, transcriber(), synthesizer()),
                         ServerOptions(port=0, session=SessionConfig(partial_every_ms=0)))
    await server.start()
    try:
        samples = await conversation(server.url, speak_questions(2), timeout=120)
    finally:
        await server.close()
    assert [s.error for s in samples] == [None, None]
    assert [s.reply for s in samples] == ["I'm sorry, I don't know that."] * 2
    assert [len(t.history) for t in engine.calls] == [0, 1]
    assert engine.calls[1].history[0] == (samples[0].transcript, "I'm sorry, I don't know that.")
    assert "saturday" in words(samples[0].transcript) and QUESTIONS[0] == samples[0].question
