"""Using the silence: pauses, tentative turns, and the end of a turn judged by its words.

The VAD's pause and resume events and its early and late endpoints are tested on
piper speech with no model in the loop; the session's tentative turns with the
real Whisper and piper, audio fed at real-time pace as a microphone would, and the
scripted dLLM stand-in (the mechanics, not the model, are under test here).
"""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from voice_helpers import ScriptedEngine, speech, synthesizer, transcriber, words

from asr import VAD, SpeechPaused, SpeechResumed, SpeechStarted, SpeechStopped, VADOptions, looks_finished
from voice import protocol as P
from voice.audio import pcm_chunks
from voice.services import Services
from voice.session import SessionConfig, VoiceSession

RATE = 16000
FIRST_HALF = "Can you tell me how to get to"
SECOND_HALF = "the train station?"


def silence(ms: int) -> np.ndarray:
    return np.zeros(RATE * ms // 1000, np.int16)


def halves(gap_ms: int) -> np.ndarray:
    """One question spoken in two pieces with a pause of `gap_ms` inside the sentence."""
    a, b = speech(FIRST_HALF, lead_s=0.3, tail_s=0.0), speech(SECOND_HALF, lead_s=0.0, tail_s=0.0)
    return np.concatenate([a, silence(gap_ms), b])


# ----- the detector

def test_pause_then_resume_is_one_utterance() -> None:
    """A 400 ms pause inside a sentence is reported (with the audio so far) and so is the speech after it."""
    vad = VAD(VADOptions(pause_ms=200))
    events = vad.feed(np.concatenate([halves(400), silence(1000)]).tobytes())
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "SpeechStarted" and kinds[-1] == "SpeechStopped"
    assert kinds.count("SpeechStopped") == 1
    pauses = [e for e in events if isinstance(e, SpeechPaused)]
    assert SpeechResumed in [type(e) for e in events]
    mid = next(e for e in pauses if kinds.index("SpeechResumed") > events.index(e))
    assert {"tell", "get"} <= set(words(transcriber().transcribe(mid.audio)))
    assert "station" in words(transcriber().transcribe(events[-1].audio))


def test_no_pause_without_the_option_or_for_a_blip() -> None:
    """pause_ms=0 never pauses; a blip under min_speech_ms is never reported as a pause."""
    audio = np.concatenate([halves(400), silence(1000)])
    assert not any(isinstance(e, (SpeechPaused, SpeechResumed)) for e in VAD().feed(audio.tobytes()))
    blip = speech(FIRST_HALF, lead_s=0.0, tail_s=0.0)[RATE // 4: RATE // 4 + RATE // 10]
    events = VAD(VADOptions(pause_ms=200)).feed(np.concatenate([silence(500), blip, silence(1000)]).tobytes())
    assert not any(isinstance(e, SpeechPaused) for e in events)


def test_end_now_and_set_pause_hangover() -> None:
    """end_now() closes the utterance at once ("early"); set_pause_hangover() makes the next one wait longer."""
    question = speech("Where is the nearest bus stop?", lead_s=0.3, tail_s=0.0)
    vad = VAD(VADOptions(pause_ms=200, hangover_ms=600))
    events = vad.feed(np.concatenate([question, silence(300)]).tobytes())
    assert isinstance(events[0], SpeechStarted) and isinstance(events[-1], SpeechPaused)
    stop = vad.end_now()
    assert isinstance(stop, SpeechStopped) and stop.reason == "early" and not vad.in_speech
    assert stop.t_ms == events[-1].t_ms and vad.end_now() is None
    # The same question with the hang-over stretched to 1.5 s: 1 s of silence does not end it, 1.5 s does.
    vad = VAD(VADOptions(pause_ms=200, hangover_ms=600))
    vad.feed(np.concatenate([question, silence(300)]).tobytes())
    vad.set_pause_hangover(1500)
    assert not any(isinstance(e, SpeechStopped) for e in vad.feed(silence(700).tobytes()))
    (stop,) = [e for e in vad.feed(silence(600).tobytes()) if isinstance(e, SpeechStopped)]
    assert stop.reason == "silence"
    # ... and the next utterance has the usual hang-over again.
    events = vad.feed(np.concatenate([question, silence(700)]).tobytes())
    assert isinstance(events[-1], SpeechStopped)


def test_pause_option_is_checked() -> None:
    """pause_ms must be shorter than the hang-over."""
    with pytest.raises(ValueError, match="pause_ms"):
        VADOptions(pause_ms=600, hangover_ms=600)


# ----- the words

@pytest.mark.parametrize("text, finished", [
    ("What time does the library open on Saturday?", True),
    ("Where is it?", True),
    ("Who are you?", True),
    ("What are you looking for?", True),
    ("Thank you.", True),
    ("Can you tell me how to get to the", False),
    ("Can you tell me how to get to the.", False),
    ("I'd like to book a table for, um...", False),
    ("I want to go to the museum and", False),
    ("So, um.", False),
    ("I would like to book a table for.", False),
    ("Do you know when?", False),
    ("Since when?", True),
    ("hello there", False),
    ("", False),
])
def test_looks_finished(text, finished) -> None:
    """Terminal punctuation after a word that can end a sentence reads as finished, and nothing else does."""
    assert looks_finished(text) is finished


def test_whisper_punctuates_what_the_rule_reads() -> None:
    """On real speech, Whisper's text of finished questions reads finished; of cut sentences, unfinished.
    (Whisper on two busy threads may hear a cut word differently, "to the" as "to that.", so most, not all.)"""
    asr = transcriber()
    finished = ["Is the museum open on Mondays?", "Where is the nearest bus stop?", "Thank you very much."]
    cut = ["Can you tell me how to get to the", "I would like to book a table for two and", "I need a ticket to"]
    heard = {t: asr.transcribe(speech(t, tail_s=0.3)) for t in finished + cut}
    assert sum(looks_finished(heard[t]) for t in finished) >= 2, heard
    assert sum(not looks_finished(heard[t]) for t in cut) >= 2, heard


# ----- the session

async def play(session: VoiceSession, pcm: np.ndarray, events: list[dict], *, until: str,
               chunk_ms: int = 20, timeout: float = 60.0) -> float:
    """Feed `pcm` then silence at real-time pace until an event of type `until`; return the
    milliseconds of audio fed by then. Every event is appended to `events`."""
    chunks = list(pcm_chunks(pcm, RATE * chunk_ms // 1000))
    quiet = silence(chunk_ms).tobytes()
    seen = asyncio.Event()
    fed = 0

    async def reader() -> None:
        while (item := await session.next_event()) is not None:
            if isinstance(item, str):
                events.append(json.loads(item))
                if events[-1]["type"] == until:
                    seen.set()
                    return

    async def feeder() -> None:
        nonlocal fed
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while not seen.is_set():
            await session.feed(P.Audio(chunks[fed] if fed < len(chunks) else quiet))
            fed += 1
            await asyncio.sleep(max(0.0, t0 + fed * chunk_ms / 1000 - loop.time()))

    read, feed = asyncio.create_task(reader()), asyncio.create_task(feeder())
    try:
        await asyncio.wait_for(asyncio.shield(read), timeout)
    finally:
        feed.cancel()
        read.cancel()
        await asyncio.gather(read, feed, return_exceptions=True)
    return fed * chunk_ms


async def session(engine: ScriptedEngine, **config) -> VoiceSession:
    vad = config.pop("vad", VADOptions(pause_ms=200))
    s = VoiceSession(Services(engine, transcriber(), synthesizer()),
                     SessionConfig(vad=vad, partial_every_ms=0, **config))
    await s.start()
    return s


async def test_a_pause_inside_the_sentence_leaves_no_trace() -> None:
    """A tentative turn begun at a mid-sentence pause is dropped when the speaker goes on: one turn, all words."""
    engine = ScriptedEngine(reply="It is five minutes away.")
    s = await session(engine)
    events: list[dict] = []
    try:
        await play(s, halves(450), events, until="turn.done")
    finally:
        await s.close()
    kinds = [e["type"] for e in events]
    assert "turn.interrupted" not in kinds and "error" not in kinds
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert len(finals) == 1 and finals[0]["turn_id"] == 1
    assert {"tell", "get", "train", "station"} <= set(words(finals[0]["text"]))
    assert [e["type"] for e in events if e["type"].startswith("vad.")] == ["vad.speech_started", "vad.speech_stopped"]
    assert kinds.index("vad.speech_stopped") < kinds.index("transcript.final") < kinds.index("audio.start")
    # The dLLM saw the whole sentence last (the tentative first half may or may not have reached it).
    assert "station" in words(engine.calls[-1].transcript)


async def test_a_finished_question_ends_before_the_hangover() -> None:
    """With a 3 s hang-over, a plainly finished question still ends as soon as its words are read."""
    engine = ScriptedEngine(reply="At nine.")
    s = await session(engine, vad=VADOptions(pause_ms=200, hangover_ms=3000, post_roll_ms=300))
    events: list[dict] = []
    question = speech("What time does the library open on Saturday?", tail_s=0.0)
    try:
        fed = await play(s, question, events, until="vad.speech_stopped")
        await play(s, silence(0), events, until="turn.done")
    finally:
        await s.close()
    assert fed - len(question) * 1000 // RATE < 2500  # stopped well inside the 3 s of silence
    done = events[-1]
    assert done["timings"]["pause_ms"] <= done["timings"]["endpoint_ms"] < 2500
    assert done["voice_to_voice_ms"] is not None
    assert len(engine.calls) == 1  # the tentative turn was the turn: no second pass


async def test_a_finished_question_waits_for_the_least_silence() -> None:
    """Words read as finished before finished_hangover_ms of silence end the utterance at that silence:
    not sooner (Whisper reads a 3 s question in well under 900 ms), and not at the 3 s hang-over."""
    question = speech("What time does the library open on Saturday?", tail_s=0.0)
    waited = {}
    for least in (0, 900):
        s = await session(ScriptedEngine(reply="At nine."), finished_hangover_ms=least,
                          vad=VADOptions(pause_ms=200, hangover_ms=3000, post_roll_ms=300))
        events: list[dict] = []
        try:
            waited[least] = await play(s, question, events, until="vad.speech_stopped") - len(question) * 1000 // RATE
        finally:
            await s.close()
    assert waited[0] < 850 <= waited[900] < 1500, waited
    with pytest.raises(ValueError, match="finished_hangover_ms"):
        SessionConfig(finished_hangover_ms=-1)


async def test_a_pause_read_as_finished_is_spared_by_the_least_silence() -> None:
    """"Is the museum open" | 450 ms | "on Mondays?": Whisper reads the first half as a whole question, so
    ending as soon as it is read cuts the speaker off; 600 ms of least silence keeps the turn whole."""
    first = speech("Is the museum open", lead_s=0.3, tail_s=0.0)
    audio = np.concatenate([first, silence(450), speech("on Mondays?", lead_s=0.0, tail_s=0.0)])
    finals = {}
    for least in (0, 600):
        s = await session(ScriptedEngine(reply="Yes."), finished_hangover_ms=least)
        events: list[dict] = []
        try:
            await play(s, audio, events, until="turn.done")
            await drain(s, events, wait=1.0)
        finally:
            await s.close()
        finals[least] = [e["text"] for e in events if e["type"] == "transcript.final"]
    assert "mondays" not in words(finals[0][0]), finals  # cut off at the pause
    assert len(finals[600]) == 1 and {"museum", "open", "mondays"} <= set(words(finals[600][0])), finals


async def test_an_unfinished_sentence_waits_longer() -> None:
    """Words that trail off ("... get to the") hold the endpoint for unfinished_hangover_ms, not the hang-over."""
    engine = ScriptedEngine(reply="Where to?")
    s = await session(engine, vad=VADOptions(pause_ms=200, hangover_ms=1200, post_roll_ms=300),
                      unfinished_hangover_ms=2500)
    events: list[dict] = []
    cut = speech("Can you tell me how to get to the", tail_s=0.0)
    try:
        fed = await play(s, cut, events, until="vad.speech_stopped")
    finally:
        await s.close()
    assert fed - len(cut) * 1000 // RATE >= 2300  # the 1.2 s hang-over was stretched to 2.5 s


class FailingVoice:
    """piper, failing on every sentence after the first: the only way to reach a synthesis error part way
    through a reply with a real pipeline around it."""

    def __init__(self) -> None:
        self.voice, self.spoken = synthesizer(), 0
        self.sample_rate = self.voice.sample_rate

    def synthesize_all(self, text: str) -> np.ndarray:
        from tts.errors import SynthesisError
        self.spoken += 1
        if self.spoken > 1:
            raise SynthesisError("this voice fails on purpose", text)
        return self.voice.synthesize_all(text)


async def drain(session: VoiceSession, events: list[dict], wait: float = 0.5) -> None:
    """Whatever else the session sends within `wait` s."""
    try:
        while (item := await asyncio.wait_for(session.next_event(), wait)) is not None:
            if isinstance(item, str):
                events.append(json.loads(item))
    except asyncio.TimeoutError:
        pass


async def test_a_tentative_turn_that_fails_sends_nothing_after_its_end() -> None:
    """A tentative turn whose speech synthesis fails after its first sentence ends with error then
    turn.done at the endpoint, and no reply audio follows them."""
    engine = ScriptedEngine(reply="It is close. It is five minutes away on foot.")
    s = VoiceSession(Services(engine, transcriber(), FailingVoice()),  # the failure comes before the endpoint
                     SessionConfig(vad=VADOptions(pause_ms=200, hangover_ms=2000), partial_every_ms=0,
                                   end_when_finished=False))
    await s.start()
    events: list[dict] = []
    try:
        await play(s, speech("Where is the nearest bus stop?", tail_s=0.0), events, until="turn.done")
        await drain(s, events)
    finally:
        await s.close()
    kinds = [e["type"] for e in events]
    assert [e["code"] for e in events if e["type"] == "error"] == ["tts_failed"]
    assert kinds.index("error") < kinds.index("turn.done")
    assert "audio.start" not in kinds[kinds.index("turn.done"):]
    assert kinds.count("audio.start") == kinds.count("audio.end")


async def test_typing_during_a_pause_replaces_the_tentative_turn() -> None:
    """Text typed while a tentative turn waits at a pause replaces it: the typed turn runs to its end, and
    speaking on afterwards does not cut it short, even when the tentative turn had failed already (here:
    no recognizer)."""
    engine = ScriptedEngine(reply="Hello there.")
    s = VoiceSession(Services(engine, None, synthesizer()),
                     SessionConfig(vad=VADOptions(pause_ms=200), partial_every_ms=0, unfinished_hangover_ms=3000))
    await s.start()
    events: list[dict] = []
    first = speech(FIRST_HALF, lead_s=0.3, tail_s=0.0)
    reader = asyncio.create_task(drain(s, events, wait=30.0))
    try:
        for chunk in pcm_chunks(np.concatenate([first, silence(400)]), RATE // 50):  # real time, then a pause
            await s.feed(P.Audio(chunk))
            await asyncio.sleep(0.02)
        assert s.input.tentative is not None, "a tentative turn began at the pause"
        await s.feed(P.TextTurn("hello"))
        for chunk in pcm_chunks(np.concatenate([speech(SECOND_HALF, lead_s=0.0, tail_s=0.0), silence(300)]),
                                RATE // 50):
            await s.feed(P.Audio(chunk))
            await asyncio.sleep(0.02)
        for _ in range(200):
            if any(e["type"] == "turn.done" for e in events):
                break
            await asyncio.sleep(0.05)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await s.close()
    kinds = [e["type"] for e in events]
    assert "turn.done" in kinds and "turn.interrupted" not in kinds, kinds
    assert not any(e["type"] == "error" and e.get("turn_id") == 1 for e in events), events
    replies = [e for e in events if e["type"] == "turn.reply"]
    assert replies and replies[0]["text"] == "Hello there." and replies[0]["turn_id"] == 1
