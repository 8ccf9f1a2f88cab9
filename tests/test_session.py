"""Session stages fed messages directly (no sockets): order of events, interruption, history.

Whisper and piper are the real packaged models, and so is the dLLM (`real_engine`)
where the test is not about a reply's content or timing; there a `ScriptedEngine`
keeps replies (and their timing) under the test's control.
"""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import pytest_asyncio
from voice_helpers import QUESTION, ScriptedEngine, fresh_engine, speech, synthesizer, transcriber, words

from voice import protocol as P
from voice.audio import StreamResampler, pcm_chunks
from voice.frames import Conversation, End, Frame, Interrupt, TurnRecord
from voice.pipeline import Inbox, Outbox, Stage
from voice.services import Services
from voice.session import SessionConfig, VoiceSession


def services(engine=None, *, asr=True, tts=True) -> Services:
    return Services(engine or ScriptedEngine(), transcriber() if asr else None, synthesizer() if tts else None)


@pytest_asyncio.fixture
async def real_engine(base_engine):
    """The packaged dLLM (conftest's weights, loaded once), with a worker on this test's loop."""
    engine = fresh_engine(base_engine)
    yield engine
    await engine.close()


async def start(svc: Services, **config) -> VoiceSession:
    session = VoiceSession(svc, SessionConfig(partial_every_ms=0, **config))
    await session.start()
    return session


async def feed_pcm(session: VoiceSession, pcm: np.ndarray, chunk: int = 480) -> None:
    for data in pcm_chunks(pcm, chunk):
        await session.feed(P.Audio(data))


async def collect(session: VoiceSession, until: str, timeout: float = 60.0, events=None) -> tuple[list[dict], int]:
    """Events (parsed) up to and including the first of type `until`, and the audio bytes seen."""
    events = [] if events is None else events
    audio = 0

    async def run():
        nonlocal audio
        while True:
            item = await session.next_event()
            assert item is not None, f"session closed before {until}; got {[e['type'] for e in events]}"
            if isinstance(item, bytes):
                audio += len(item)
                continue
            events.append(json.loads(item))
            if events[-1]["type"] == until:
                return
    await asyncio.wait_for(run(), timeout)
    return events, audio


# ----- the machinery

class Recorder(Stage):
    """A stage whose processing blocks until released, recording what it saw."""

    name = "recorder"

    def __init__(self) -> None:
        async def report(exc, frame):
            self.errors.append(exc)
        super().__init__(4, report)
        self.release = asyncio.Event()
        self.started: list[Frame] = []
        self.finished: list[Frame] = []
        self.cancelled: list[Frame] = []
        self.interrupts: list[Interrupt] = []
        self.errors: list[BaseException] = []

    async def process(self, frame):
        self.started.append(frame)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(frame)
            raise
        self.finished.append(frame)
        await self.push(frame)

    async def on_interrupt(self, frame):
        self.interrupts.append(frame)


@pytest.mark.parametrize("n", [1, 3])
async def test_interrupt_drops_queued_frames_and_cancels_running_work(n):
    """An Interrupt cancels the frame in progress, drops the queued ones, and is passed downstream."""
    first, second = Recorder(), Recorder()
    first.link(second)
    tasks = [asyncio.create_task(s.run()) for s in (first, second)]
    frames = [Frame() for _ in range(n + 1)]
    for f in frames:
        await first.inbox.put(f)
    await asyncio.sleep(0.05)
    assert first.started == [frames[0]] and len(first.inbox) == n
    await first.inbox.put(Interrupt("speech"))
    await asyncio.sleep(0.05)
    assert first.cancelled == [frames[0]]
    assert first.inbox.dropped == n and len(first.inbox) == 0
    assert len(first.interrupts) == 1 and len(second.interrupts) == 1
    assert second.started == []  # nothing of the old turn got through
    # The stage carries on with new work after the interrupt.
    fresh = Frame()
    await first.inbox.put(fresh)
    first.release.set()
    second.release.set()
    await first.inbox.put(End())
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert first.finished == [fresh] and second.finished == [fresh]


async def test_end_gets_through_a_full_inbox_and_survives_interrupts():
    """End never waits for room and is never dropped; data frames wait when the inbox is full."""
    box = Inbox(2)
    await box.put(Frame())
    await box.put(Frame())
    blocked = asyncio.create_task(box.put(Frame()))
    await asyncio.sleep(0.02)
    assert not blocked.done()  # bounded
    await box.put(End())
    await box.put(Interrupt("client"))
    kinds = [type(f).__name__ for f in box.pending()]
    assert kinds == ["Interrupt", "End"]
    await asyncio.sleep(0.02)
    assert blocked.done()  # room was made; its frame queues behind
    assert [type(await box.get()).__name__ for _ in range(3)] == ["Interrupt", "End", "Frame"]


async def test_outbox_drop_audio_keeps_events():
    """drop_audio removes queued PCM only; close ends the stream after what is queued."""
    box = Outbox(8)
    for item in ["a", b"\x00\x00", b"\x01\x00", "b"]:
        await box.put(item)
    assert await box.drop_audio() == 2
    await box.close()
    assert [await box.get() for _ in range(3)] == ["a", "b", None]


@pytest.mark.parametrize("src", [8000, 22050, 44100, 48000])
def test_stream_resampler_matches_whole_clip(src):
    """Resampling 20 ms chunks gives the same samples as resampling the whole clip."""
    from tts import resample
    t = np.arange(src) / src
    x = (9000 * np.sin(2 * np.pi * 300 * t) + 4000 * np.sin(2 * np.pi * 2100 * t)).astype(np.int16)
    rs = StreamResampler(src, 16000)
    parts = [rs.push(x[i:i + src // 50]) for i in range(0, len(x), src // 50)] + [rs.flush()]
    out = np.concatenate(parts)
    whole = resample(x, src, 16000)
    assert len(out) == len(whole)
    assert np.abs(out.astype(int) - whole.astype(int)).max() <= 1


def test_heard_reply_stops_at_the_interruption():
    """History keeps the sentences whose playback began before the barge-in."""
    conv = Conversation(max_turns=2)
    t = conv.begin(typed=True, started=0.0, user="hi")
    t.reply = "One. Two. Three."
    t.add_sentence("One.", 1.0, at=10.0)  # plays 10-11
    t.add_sentence("Two.", 1.0, at=10.2)  # sent early, plays 11-12
    t.add_sentence("Three.", 1.0, at=10.3)  # plays 12-13
    t.interrupt("speech", 11.5)
    assert t.heard() == "One. Two."
    assert conv.history() == (("hi", "One. Two."),)
    for i in range(4):  # bounded
        r = conv.begin(typed=True, started=20.0 + i, user=f"q{i}")
        r.finish(20.0 + i)
    assert [u for u, _ in conv.history()] == ["q2", "q3"]


def test_a_turn_nobody_interrupted_is_heard_whole():
    """A finished reply counts in full; a turn still playing is active until its audio ends."""
    t = TurnRecord(1, typed=False, started=0.0, reply="Hello there.")
    t.add_sentence("Hello there.", 2.0, at=1.0)
    t.finish(1.5)
    assert t.heard() == "Hello there."
    assert not t.over(2.0) and t.over(3.1)


# ----- whole sessions

async def test_spoken_turn_events_in_order():
    """Speech in gives VAD events, the final transcript, cleaned text, reply, audio and turn.done, in order."""
    engine = ScriptedEngine()
    session = await start(services(engine))
    await feed_pcm(session, speech(QUESTION))
    events, audio = await collect(session, "turn.done")
    await session.close()
    types = [e["type"] for e in events]
    assert types == ["session.ready", "vad.speech_started", "vad.speech_stopped", "transcript.final",
                     "turn.cleaned", "turn.reply", "audio.start", "audio.end", "turn.done"]
    final = events[3]["text"]
    assert {"library", "open", "saturday"} <= set(words(final))
    assert engine.calls[0].transcript == final
    assert events[5]["text"] == engine.reply
    assert events[6]["sample_rate"] == synthesizer().sample_rate
    assert audio > synthesizer().sample_rate * 2  # more than a second of speech
    done = events[-1]
    assert done["turn_id"] == events[3]["turn_id"] == 1
    for key in ("endpoint_ms", "asr_ms", "llm_ms", "tts_first_ms", "tts_ms", "first_audio_ms", "total_ms"):
        assert done["timings"][key] >= 0, key
    assert done["voice_to_voice_ms"] == pytest.approx(done["timings"]["first_audio_ms"], abs=0.2)


async def test_partial_transcripts_while_speaking(real_engine):
    """With partials on, a transcript.partial arrives between speech start and stop when audio comes in real time."""
    session = VoiceSession(services(real_engine), SessionConfig(partial_every_ms=600, min_partial_ms=500))
    await session.start()
    pcm = speech("Please tell me how late the swimming pool stays open tonight.")
    events: list[dict] = []

    async def realtime():
        for data in pcm_chunks(pcm, 480):
            await session.feed(P.Audio(data))
            await asyncio.sleep(0.03)
    feeder = asyncio.create_task(realtime())
    await collect(session, "transcript.final", events=events)
    await feeder
    await session.close()
    types = [e["type"] for e in events]
    partials = [e for e in events if e["type"] == "transcript.partial"]
    assert partials, types
    assert types.index("vad.speech_started") < types.index("transcript.partial") < types.index("vad.speech_stopped")
    assert any(w in words(partials[0]["text"]) for w in ("please", "tell", "me", "how"))


async def test_the_words_heard_so_far_are_computed_while_the_user_speaks(real_engine):
    """Each partial transcript lets the engine compute the prompt through the words heard so far; the turn
    then finds them in the cache (`Engine.word_hits`) and runs only what follows."""
    session = VoiceSession(services(real_engine, tts=False), SessionConfig(partial_every_ms=600, min_partial_ms=500))
    await session.start()
    pcm = speech("Please tell me how late the swimming pool stays open tonight.")
    hits = real_engine.word_hits

    async def realtime():
        for data in pcm_chunks(pcm, 480):
            await session.feed(P.Audio(data))
            await asyncio.sleep(0.03)
    feeder = asyncio.create_task(realtime())
    events, _ = await collect(session, "turn.done")
    await feeder
    await session.close()
    assert any(e["type"] == "transcript.partial" for e in events)
    assert real_engine.word_hits == hits + 1


async def test_resampled_input_is_transcribed(real_engine):
    """48 kHz input is resampled to 16 kHz for the VAD and Whisper."""
    session = await start(services(real_engine), input_sample_rate=48000)
    await feed_pcm(session, speech(QUESTION, rate=48000), chunk=960)
    events, _ = await collect(session, "transcript.final")
    await session.close()
    assert {"library", "saturday"} <= set(words(events[-1]["text"]))


async def test_input_end_forces_the_endpoint(real_engine):
    """input.end ends the utterance at once (no trailing silence needed); with no speech it is an error."""
    session = await start(services(real_engine))
    await session.feed(P.InputEnd())
    events, _ = await collect(session, "error")
    assert events[-1]["code"] == "no_speech"
    await feed_pcm(session, speech(QUESTION, tail_s=0.0))
    await session.feed(P.InputEnd())
    events, audio = await collect(session, "turn.done")
    await session.close()
    types = [e["type"] for e in events]
    assert "vad.speech_stopped" in types and "transcript.final" in types
    reply = next(e["text"] for e in events if e["type"] == "turn.reply")
    assert (audio > 0) == bool(reply) == (events[-1]["voice_to_voice_ms"] is not None)  # spoken iff said


async def test_typed_turn_and_empty_reply():
    """A typed turn skips VAD and ASR; an empty reply still gives turn.reply "" and turn.done, with no audio."""
    engine = ScriptedEngine(reply="")
    session = await start(services(engine))
    await session.feed(P.TextTurn("um hello there"))
    events, audio = await collect(session, "turn.done")
    await session.close()
    assert [e["type"] for e in events] == ["session.ready", "turn.cleaned", "turn.reply", "turn.done"]
    assert events[2]["text"] == "" and audio == 0
    assert events[-1]["voice_to_voice_ms"] is None


async def test_the_next_turns_head_is_computed_while_the_reply_plays(real_engine):
    """When a turn is done, the engine computes the next turn's prompt head (the history with that turn in
    it) before the next words come, and the next turn reads it from the cache."""
    from dllm import Turn
    session = await start(services(real_engine, asr=False, tts=False))  # no playback for the next turn to cut
    await session.feed(P.TextTurn("hi there"))
    await collect(session, "turn.done")
    await asyncio.wait_for(session.prefill, 30)
    history = session.conversation.history()
    enc = real_engine.encode(Turn("where is it", history=history))
    assert len(history) == 1 and tuple(enc.prompt[:enc.head]) in real_engine._heads
    hits = real_engine.head_hits
    await session.feed(P.TextTurn("where is the library"))
    await collect(session, "turn.done")
    await session.close()
    assert real_engine.head_hits == hits + 1


@pytest.mark.parametrize("reply, settled", [
    ("The library opens at nine. It closes at five.", "The library opens at nine."),
    ("I'm sorry, I don't know that.", "I'm sorry,"),  # the opening clause, settled before its sentence
])
async def test_settled_first_sentence_is_spoken_before_the_pass_ends(reply, settled):
    """A sentence (or opening clause) the pass has settled goes to piper at once: its audio arrives while the
    engine is still working, and the rest of the reply follows without saying the first part twice."""
    engine = ScriptedEngine(reply=reply, settled=settled)
    engine.gate = asyncio.Event()
    session = await start(services(engine))
    await session.feed(P.TextTurn("when does the library open"))
    events, audio = await collect(session, "audio.start")
    assert audio == 0 and "turn.reply" not in [e["type"] for e in events], "the first audio came before the reply"
    first = await asyncio.wait_for(session.next_event(), 30)
    assert isinstance(first, bytes), "the settled sentence's audio follows audio.start while the pass goes on"
    engine.gate.set()
    events, _ = await collect(session, "turn.done")
    await session.close()
    assert [e["type"] for e in events][-3:] == ["turn.reply", "audio.end", "turn.done"]
    assert engine.calls[0].transcript == "when does the library open"
    assert events[-1]["timings"]["settled_ms"] >= 0
    heard = session.conversation.history()[-1][1]
    assert heard == reply


async def test_without_speak_early_the_audio_waits_for_the_pass():
    engine = ScriptedEngine(reply="The library opens at nine. It closes at five.", settled="The library opens at nine.")
    session = await start(services(engine), speak_early=False)
    await session.feed(P.TextTurn("when does the library open"))
    events, _ = await collect(session, "turn.done")
    await session.close()
    types = [e["type"] for e in events]
    assert types.index("turn.reply") < types.index("audio.start")
    assert "settled_ms" not in events[-1]["timings"]


async def test_barge_in_cancels_the_dllm_request():
    """Speech during the dLLM turn cancels it (the request is withdrawn) and the new utterance is answered."""
    engine = ScriptedEngine(reply="")
    engine.gate = asyncio.Event()
    session = await start(services(engine))
    await session.feed(P.TextTurn("tell me a long story"))
    await asyncio.sleep(0.2)
    assert len(engine.calls) == 1
    await feed_pcm(session, speech(QUESTION))
    events, _ = await collect(session, "turn.interrupted")
    assert engine.cancelled == 1
    assert events[-1] == {"type": "turn.interrupted", "turn_id": 1, "reason": "speech", "heard": ""}
    engine.gate.set()
    events, _ = await collect(session, "turn.done")
    await session.close()
    assert events[-1]["turn_id"] == 2
    # The interrupted turn is in the history, with nothing heard of its reply.
    assert engine.calls[-1].history == (("tell me a long story", ""),)


async def test_stop_during_playback_flushes_audio_and_truncates_history():
    """An interrupt while the reply plays drops queued audio, sends audio.flush, and keeps only what was heard."""
    reply = "The first sentence is short. The second one comes next. The third one is the last."
    engine = ScriptedEngine(reply=reply)
    session = await start(services(engine), outbox_size=4)  # a small outbox fills while we do not read
    await session.feed(P.TextTurn("tell me three things"))
    events, _ = await collect(session, "audio.start")
    await asyncio.sleep(1.5)  # TTS fills the outbox; the client reads nothing
    await session.feed(P.Interrupt())
    await asyncio.sleep(0.3)  # the interrupt reaches the output stage while the client still reads nothing
    events, audio = await collect(session, "turn.interrupted")
    assert session.outbox.dropped_audio > 0
    types = [e["type"] for e in events]
    assert types[-2:] == ["audio.flush", "turn.interrupted"] and "turn.done" not in types
    heard = events[-1]["heard"]
    assert heard == "The first sentence is short."
    await session.feed(P.TextTurn("and then"))
    await collect(session, "turn.done")
    await session.close()
    assert engine.calls[-1].history == (("tell me three things", heard),)


async def test_model_error_becomes_an_error_event_and_the_session_goes_on():
    """A dLLM failure reports an error with the turn id and closes the turn; the next turn works."""
    from dllm import RequestError

    class Failing(ScriptedEngine):
        async def respond(self, turn, *, steps=None, **options):
            if len(self.calls) == 0:
                self.calls.append(turn)
                raise RequestError("transcript too long: 300 tokens, at most 124 are accepted")
            return await super().respond(turn, steps=steps)

    session = await start(services(Failing(reply="")))
    await session.feed(P.TextTurn("first"))
    events, _ = await collect(session, "turn.done")
    assert [e["type"] for e in events][-2:] == ["error", "turn.done"]
    assert events[-2]["code"] == "bad_turn" and events[-2]["turn_id"] == 1
    await session.feed(P.TextTurn("second"))
    events, _ = await collect(session, "turn.done")
    await session.close()
    assert events[-1]["turn_id"] == 2 and session.running is False


async def test_finish_runs_queued_work_to_the_end(real_engine):
    """finish() lets a turn queued before the end complete, then stops every stage."""
    session = await start(services(real_engine))
    await session.feed(P.TextTurn("hello"))
    collector = asyncio.create_task(collect(session, "turn.done"))
    assert await session.finish(timeout=60)
    events, audio = await collector
    reply = next(e["text"] for e in events if e["type"] == "turn.reply")
    assert (audio > 0) == bool(reply) and not session.running


async def test_speech_without_a_recognizer_is_an_asr_error():
    """Speech reaching a server with no Whisper loaded ends its turn with asr_failed, saying to type instead."""
    session = await start(services(asr=False, tts=False))
    await feed_pcm(session, speech())
    await session.feed(P.InputEnd())  # the endpoint (the failed turn's events wait for it)
    events, _ = await collect(session, "turn.done")
    await session.close()
    error, = [e for e in events if e["type"] == "error"]
    assert error["code"] == "asr_failed" and "typed turns" in error["message"] and error["turn_id"] == 1


def test_warm_up_calls_each_model_once(base_engine):
    """`Services.warm_up` (run by `Services.load`) puts one short turn through the dLLM and a call through
    Whisper and piper, so a first user's turn does not pay for first-call set-up; an engine without
    `respond_sync` (a remote or scripted one) is left alone."""
    from voice.services import Services
    engine = fresh_engine(base_engine)
    calls = engine.forward_calls
    Services(engine, transcriber(), synthesizer()).warm_up()
    assert engine.forward_calls > calls
    Services(ScriptedEngine(), None, None).warm_up()
