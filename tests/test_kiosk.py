"""The kiosk loop with fake microphone and speaker streams fed real (piper) speech."""
from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
from conftest import make_tiny_engine
from voice_helpers import QUESTION, ScriptedEngine, fresh_engine, speech, synthesizer, \
    transcriber, words

from voice.audio import pcm_chunks
from voice.errors import DeviceError
from voice.kiosk import KioskOptions, open_devices, run_kiosk
from voice.services import Services

FACTS = "The Riverside Library opens at 9 am on Saturdays and closes at 5 pm."


class FakeMicrophone:
    """Yields the given audio in 30 ms frames, as fast as the loop takes them, then ends."""

    def __init__(self, pcm: np.ndarray, sample_rate: int = 16000) -> None:
        self.pcm, self.sample_rate = pcm, sample_rate

    async def frames(self) -> AsyncIterator[bytes]:
        for frame in pcm_chunks(self.pcm, self.sample_rate * 30 // 1000):
            yield frame


class FakeSpeaker:
    """Keeps what it is asked to play; `always_busy` simulates a reply that never stops playing."""

    def __init__(self, sample_rate: int = 22050, always_busy: bool = False) -> None:
        self.sample_rate = sample_rate
        self.played: list[np.ndarray] = []
        self.flushes = 0
        self.always_busy = always_busy

    def play(self, pcm: np.ndarray) -> None:
        self.played.append(pcm)

    def flush(self) -> None:
        self.flushes += 1

    @property
    def busy(self) -> bool:
        return self.always_busy

    @property
    def samples(self) -> int:
        return sum(len(p) for p in self.played)


@pytest.fixture(scope="module")
def engine_base(base_engine):
    """The packaged dLLM (conftest's session-wide `base_engine`)."""
    return base_engine


async def test_kiosk_answers_a_spoken_question_with_the_real_model(engine_base):
    """Speech from the mic is transcribed and answered by the dLLM; the speaker gets audio iff there is a reply."""
    engine = fresh_engine(engine_base)
    services = Services(engine, transcriber(), synthesizer())
    mic, speaker = FakeMicrophone(speech(QUESTION)), FakeSpeaker()
    lines: list[dict] = []
    result = await run_kiosk(services, mic, speaker, KioskOptions(knowledge=FACTS), on_event=lines.append)
    await engine.close()
    assert lines == result.events
    final = result.of("transcript.final")
    assert len(final) == 1 and {"library", "open", "saturday"} <= set(words(final[0]["text"]))
    reply = result.of("turn.reply")[0]["text"]
    assert result.of("turn.done")
    assert (speaker.samples > 0) == bool(reply)
    assert speaker.samples == result.audio_samples


async def test_kiosk_passes_the_knowledge_card_and_plays_at_the_speaker_rate():
    """The knowledge card reaches the dLLM turn; reply audio is resampled to the speaker's rate."""
    engine = ScriptedEngine(reply="It opens at nine. It closes at five.")
    services = Services(engine, transcriber(), synthesizer())
    mic, speaker = FakeMicrophone(speech(QUESTION, rate=48000), 48000), FakeSpeaker(sample_rate=48000)
    result = await run_kiosk(services, mic, speaker, KioskOptions(knowledge=FACTS), on_event=lambda e: None)
    assert engine.calls and engine.calls[0].knowledge == FACTS
    assert result.of("audio.start")[0]["sample_rate"] == 48000
    seconds = speaker.samples / 48000
    assert 1.5 < seconds < 10, seconds
    # The speech really is the reply: Whisper hears it back.
    from tts import resample
    heard = transcriber().transcribe(resample(np.concatenate(speaker.played), 48000, 16000))
    assert {"opens", "closes"} <= set(words(heard)) and ({"nine", "9"} & set(words(heard))), heard


async def test_half_duplex_kiosk_does_not_hear_itself():
    """While the speaker plays, mic audio is muted (no echo canceller), so nothing starts a turn."""
    engine = make_tiny_engine()  # a real engine that is never asked (the tiny model: nothing to wait for)
    services = Services(engine, transcriber(), synthesizer())
    mic, speaker = FakeMicrophone(speech(QUESTION)), FakeSpeaker(always_busy=True)
    result = await run_kiosk(services, mic, speaker, KioskOptions(), on_event=lambda e: None)
    await engine.close()
    assert not result.of("vad.speech_started") and engine.forward_calls == 0


def test_no_audio_device_is_a_clear_error():
    """Without a microphone, opening the devices raises DeviceError saying what is missing."""
    try:
        import sounddevice as sd
        if sd.query_devices():
            pytest.skip("this machine has audio devices")
    except OSError:
        pass
    except Exception:  # PortAudio errors: no devices, which is the case under test
        pass
    with pytest.raises(DeviceError) as info:
        open_devices()
    message = str(info.value)
    assert "microphone" in message and "device" in message
