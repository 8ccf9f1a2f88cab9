"""Tests for asr: the VAD endpointer and the Whisper transcriber, on speech synthesised by piper."""
from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from asr import (
    VAD,
    ASRError,
    AudioFormatError,
    ModelLoadError,
    SpeechDiscarded,
    SpeechStarted,
    SpeechStopped,
    Transcriber,
    TranscriberOptions,
    VADOptions,
)
from tts import Synthesizer, SynthesizerOptions, resample

RATE = 16000
QUESTION = "What time does the library open on Saturday?"
SECOND = "The museum is closed on Monday."


@pytest.fixture(scope="module")
def speech() -> dict[str, np.ndarray]:
    """Each sentence as int16 mono 16 kHz, spoken by the packaged piper voice."""
    synth = Synthesizer.load(SynthesizerOptions(threads=2, noise_scale=0.0, noise_w_scale=0.0))  # the same audio every run
    return {t: resample(synth.synthesize_all(t), synth.sample_rate, RATE) for t in (QUESTION, SECOND)}


@pytest.fixture(scope="module")
def transcriber() -> Transcriber:
    return Transcriber.load(TranscriberOptions(cpu_threads=2))


def silence(ms: int) -> np.ndarray:
    return np.zeros(ms * RATE // 1000, np.int16)


def speech_span_ms(audio: np.ndarray) -> tuple[float, float]:
    """Where the audio is audibly not silent: (first, last) loud sample, in ms."""
    loud = np.nonzero(np.abs(audio) > 300)[0]
    return loud[0] * 1000 / RATE, loud[-1] * 1000 / RATE


def words(text: str) -> set[str]:
    return set("".join(c if c.isalnum() else " " for c in text.lower()).split())


# --- transcription -----------------------------------------------------------

def test_round_trip_piper_to_whisper(speech, transcriber) -> None:
    """Synthesised speech, resampled to 16 kHz, transcribes back to its words."""
    text = transcriber.transcribe(speech[QUESTION])
    assert {"what", "time", "library", "open", "saturday"} <= words(text), text
    assert text == text.strip()


def test_transcribe_accepts_float_and_empty(speech, transcriber) -> None:
    """float32 in [-1, 1] works like int16; empty audio gives "" without calling the model."""
    text = transcriber.transcribe(speech[SECOND].astype(np.float32) / 32768)
    assert {"museum", "closed", "monday"} <= words(text), text
    assert transcriber.transcribe(np.zeros(0, np.int16)) == ""


def test_transcribe_from_threads(speech, transcriber) -> None:
    """Two threads transcribing at once each get their own sentence back."""
    results: dict[str, str] = {}

    def work(key: str) -> None:
        results[key] = transcriber.transcribe(speech[key])

    threads = [threading.Thread(target=work, args=(k,)) for k in (QUESTION, SECOND)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "library" in words(results[QUESTION]) and "museum" in words(results[SECOND])


def test_short_window_hears_what_the_30_s_window_hears(speech, transcriber) -> None:
    """The default encodes a short utterance in a 12 s window: the same words as Whisper's 30 s one."""
    full = Transcriber(transcriber._model, replace(transcriber.options, window_s=None))
    for sentence in (QUESTION, SECOND):
        assert words(transcriber.transcribe(speech[sentence])) == words(full.transcribe(speech[sentence])) \
            == words(sentence)


def test_window_size_follows_the_utterance(transcriber) -> None:
    """At least window_s, in whole seconds with 1 s to spare; 30 s and beyond (or window_s=None) use Whisper's own."""
    assert transcriber._window_frames(3 * RATE) == 1200
    assert transcriber._window_frames(int(11.5 * RATE)) == 1300
    assert transcriber._window_frames(29 * RATE) is None
    assert Transcriber(transcriber._model, TranscriberOptions(window_s=None))._window_frames(RATE) is None
    # faster-whisper's VAD runs only in its own path, so asking for it means the 30 s window
    assert Transcriber(transcriber._model, TranscriberOptions(vad_filter=True))._window_frames(RATE) is None
    with pytest.raises(ValueError, match="window_s"):
        TranscriberOptions(window_s=0.5)


def test_silence_and_noise_transcribe_to_nothing(transcriber) -> None:
    """No made-up words ("you", "Thank you.") for digital silence or low noise, in either window."""
    rng = np.random.default_rng(0)
    full = Transcriber(transcriber._model, replace(transcriber.options, window_s=None))
    for audio in (silence(2000), (rng.standard_normal(2 * RATE) * 200).astype(np.int16)):
        assert transcriber.transcribe(audio) == "" and full.transcribe(audio) == ""


def test_a_long_utterance_uses_the_30_s_window(transcriber) -> None:
    """An utterance too long for a shorter window is still transcribed whole."""
    synth = Synthesizer.load(SynthesizerOptions(threads=2, noise_scale=0.0, noise_w_scale=0.0))
    sentences = [QUESTION, SECOND, "Can you turn off the lights in the kitchen please?",
                 "I need a ticket to Baltimore for tomorrow morning.", "Please call David at three o'clock.",
                 "Where can I find the restrooms?", "Is there parking at the hotel?",
                 "Do you know when the next ferry leaves?", "Which floor is the children's section on?"]
    audio = np.concatenate([np.concatenate([resample(synth.synthesize_all(s), synth.sample_rate, RATE), silence(1200)])
                            for s in sentences])
    assert len(audio) > 29 * RATE and transcriber._window_frames(len(audio)) is None
    heard = words(transcriber.transcribe(audio))
    assert {"library", "museum", "kitchen", "baltimore", "david", "restrooms", "parking", "ferry", "section"} <= heard


@pytest.mark.parametrize(
    "audio, rate, message",
    [
        (np.zeros((16000, 2), np.int16), RATE, "mono 1-D"),
        (np.zeros(16000, np.int32), RATE, "int16 or float32"),
        (np.zeros(16000, np.int16), 22050, "16000 Hz"),
        (np.full(16000, 3000.0, np.float32), RATE, "int16 samples stored as float"),
        (np.full(16000, np.nan, np.float32), RATE, "NaN"),
        ([0, 1, 2], RATE, "numpy array"),
    ],
)
def test_transcribe_rejects_bad_audio(transcriber, audio, rate, message) -> None:
    """Wrong shape, dtype, rate or scale raises AudioFormatError (a ValueError) saying what is accepted."""
    with pytest.raises(AudioFormatError, match=message) as info:
        transcriber.transcribe(audio, sample_rate=rate)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ASRError)


def test_missing_model(tmp_path) -> None:
    """A missing model directory, or one without model.bin, raises ModelLoadError saying how to fix it."""
    with pytest.raises(ModelLoadError, match="directory not found") as info:
        Transcriber.load(TranscriberOptions(model=tmp_path / "absent"))
    assert info.value.path == tmp_path / "absent"
    with pytest.raises(ModelLoadError, match="no model.bin"):
        Transcriber.load(TranscriberOptions(model=tmp_path))
    with pytest.raises(ValueError, match="device"):
        TranscriberOptions(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lead_silence_ms"):
        TranscriberOptions(lead_silence_ms=-5)


# --- VAD -----------------------------------------------------------------------

def summary(events) -> list[tuple[str, str | None]]:
    return [(type(e).__name__, getattr(e, "reason", None)) for e in events]


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_one_utterance_with_pre_roll(speech, frame_ms) -> None:
    """Speech padded with silence gives one start and one stop near the true times, with pre-roll audio."""
    audio = speech[QUESTION]
    first, last = speech_span_ms(audio)
    vad = VAD(VADOptions(frame_ms=frame_ms))
    events = vad.feed(np.concatenate([silence(1000), audio, silence(1000)]).tobytes()) + vad.flush()
    assert summary(events) == [("SpeechStarted", None), ("SpeechStopped", "silence")]
    start, stop = events
    assert abs(start.t_ms - (1000 + first)) <= 100
    assert abs(stop.t_ms - (1000 + last)) <= 250
    assert stop.audio.dtype == np.int16
    # 300 ms of pre-roll before the onset: leading silence, then the whole sentence.
    lead = np.nonzero(np.abs(stop.audio) > 300)[0][0] * 1000 / RATE
    assert 250 <= lead <= 400
    assert len(stop.audio) * 1000 / RATE == pytest.approx(stop.t_ms - start.t_ms + 300 + 300, abs=2 * frame_ms)


def test_utterance_transcribes(speech, transcriber) -> None:
    """The audio of a VAD utterance is what Whisper needs: the words come back."""
    vad = VAD()
    events = vad.feed(np.concatenate([silence(700), speech[SECOND], silence(800)]).tobytes())
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert len(stops) == 1
    assert {"museum", "closed", "monday"} <= words(transcriber.transcribe(stops[0].audio))


def test_chunking_does_not_matter(speech) -> None:
    """Feeding odd-sized (but whole-sample) pieces gives the same events as one big feed."""
    pcm = np.concatenate([silence(500), speech[QUESTION], silence(1000)]).tobytes()
    whole = VAD().feed(pcm)
    vad, pieces = VAD(), []
    for i in range(0, len(pcm), 334):
        pieces += vad.feed(pcm[i : i + 334])
    assert [(type(e), e.t_ms) for e in pieces] == [(type(e), e.t_ms) for e in whole]
    assert np.array_equal(pieces[-1].audio, whole[-1].audio)


def test_silence_and_low_noise_give_nothing() -> None:
    """Digital silence and low background noise never start speech."""
    rng = np.random.default_rng(0)
    for audio in (silence(3000), (rng.standard_normal(3 * RATE) * 200).astype(np.int16)):
        vad = VAD()
        assert vad.feed(audio.tobytes()) == [] and vad.flush() == []
        assert not vad.in_speech and vad.current_audio().size == 0


def test_two_sentences_two_utterances(speech) -> None:
    """Two sentences 1.5 s apart are two utterances, in order."""
    pcm = np.concatenate([silence(500), speech[QUESTION], silence(1500), speech[SECOND], silence(1000)])
    events = VAD().feed(pcm.tobytes())
    assert summary(events) == [("SpeechStarted", None), ("SpeechStopped", "silence")] * 2
    assert events[0].t_ms < events[1].t_ms < events[2].t_ms < events[3].t_ms
    assert events[2].t_ms - events[1].t_ms >= 1300  # the gap between them


def test_max_utterance_forces_endpoint(speech) -> None:
    """Speech longer than max_utterance_ms is cut there, and never into longer pieces."""
    vad = VAD(VADOptions(max_utterance_ms=1200))
    events = vad.feed(np.concatenate([silence(500), speech[QUESTION], silence(1000)]).tobytes())
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    assert stops[0].reason == "max_length"
    assert all(len(s.audio) <= 1200 * RATE // 1000 for s in stops)
    assert stops[-1].reason == "silence"
    assert isinstance(events[0], SpeechStarted)


def test_flush_and_current_audio(speech) -> None:
    """Mid-utterance, current_audio() grows with the input and flush() ends it as "forced"."""
    audio = speech[QUESTION]
    vad = VAD()
    events = vad.feed(np.concatenate([silence(500), audio[: RATE]]).tobytes())
    assert summary(events) == [("SpeechStarted", None)]
    assert vad.in_speech
    before = len(vad.current_audio())
    vad.feed(audio[RATE : RATE + 1601].tobytes())  # 1601 samples: a partial frame stays pending
    now = vad.current_audio()
    assert now.dtype == np.int16 and len(now) == before + 1601
    (stop,) = vad.flush()
    assert isinstance(stop, SpeechStopped) and stop.reason == "forced"
    assert np.array_equal(stop.audio, now)
    assert not vad.in_speech and vad.current_audio().size == 0 and vad.flush() == []


def test_blip_is_discarded(speech) -> None:
    """A 150 ms snippet of speech, under min_speech_ms, ends as SpeechDiscarded."""
    blip = speech[QUESTION][RATE // 4 : RATE // 4 + 150 * RATE // 1000]
    events = VAD().feed(np.concatenate([silence(1000), blip, silence(1000)]).tobytes())
    assert [type(e) for e in events] in ([], [SpeechStarted, SpeechDiscarded])
    assert not any(isinstance(e, SpeechStopped) for e in events)
    # Deterministically: a whole sentence under a min_speech_ms it cannot reach.
    events = VAD(VADOptions(min_speech_ms=10_000)).feed(np.concatenate([speech[SECOND], silence(1000)]).tobytes())
    assert [type(e) for e in events] == [SpeechStarted, SpeechDiscarded]
    assert 1000 < events[1].voiced_ms < 10_000


def test_reset_restarts_the_clock(speech) -> None:
    """reset() drops an open utterance and times restart from zero."""
    vad = VAD()
    vad.feed(np.concatenate([silence(2000), speech[QUESTION][:RATE]]).tobytes())
    assert vad.in_speech
    vad.reset()
    assert not vad.in_speech
    events = vad.feed(np.concatenate([silence(200), speech[QUESTION]]).tobytes())
    assert isinstance(events[0], SpeechStarted) and events[0].t_ms < 500


def test_bad_input_and_options() -> None:
    """Odd byte counts, non-int16 arrays and unsupported options raise ValueError saying what is accepted."""
    vad = VAD()
    with pytest.raises(AudioFormatError, match="even number of bytes"):
        vad.feed(b"\x00" * 961)
    with pytest.raises(ValueError, match="int16"):
        vad.feed(np.zeros(480, np.float32))
    assert vad.feed(b"\x00" * 960) == []  # still usable afterwards
    with pytest.raises(ValueError, match="frame_ms must be 10, 20 or 30"):
        VADOptions(frame_ms=25)
    with pytest.raises(ValueError, match="sample_rate"):
        VADOptions(sample_rate=22050)
    with pytest.raises(ValueError, match="aggressiveness"):
        VADOptions(aggressiveness=4)
    with pytest.raises(ValueError, match="max_utterance_ms"):
        VADOptions(max_utterance_ms=500)
