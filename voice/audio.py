"""Audio plumbing for sessions: streaming resampling, PCM framing, WAV files.

`tts.resample` converts a whole clip. A session gets its audio in 20-100 ms
frames, and resampling each frame on its own would pad both ends with
zeros, clicking at every frame boundary (50 times a second), which the VAD
and Whisper both hear. `StreamResampler` is libsoxr's streaming resampler,
which keeps its filter state between frames, so the pieces meet without a
seam and the stream comes out as the whole clip would.
"""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import soxr

from tts import RESAMPLE_QUALITY, float_to_pcm16

__all__ = ["StreamResampler", "pcm_chunks", "read_wav", "write_wav", "to_pcm16_bytes"]


class StreamResampler:
    """Resample an int16 stream chunk by chunk; `push` returns what is final so far.

    The output lags the input by the filter's delay (a few ms); `flush`
    returns the rest at the end of the stream. Memory is bounded by the
    filter's state.

    Example:
        >>> rs = StreamResampler(48000, 16000)
        >>> out = np.concatenate([rs.push(c) for c in chunks] + [rs.flush()])
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise ValueError(f"rates must be positive, got {src_rate} and {dst_rate}")
        self.src_rate, self.dst_rate = src_rate, dst_rate
        self._stream = soxr.ResampleStream(src_rate, dst_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Add int16 samples; return the int16 output samples that are now final."""
        pcm = np.asarray(pcm)
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"StreamResampler takes 1-D int16 samples, got {pcm.dtype} {pcm.shape}")
        return float_to_pcm16(self._stream.resample_chunk(pcm.astype(np.float32) / 32768.0))

    def flush(self) -> np.ndarray:
        """End of stream: the remaining output."""
        return float_to_pcm16(self._stream.resample_chunk(np.zeros(0, np.float32), last=True))


def to_pcm16_bytes(pcm: np.ndarray) -> bytes:
    return np.asarray(pcm, dtype=np.int16).astype("<i2", copy=False).tobytes()


def pcm_chunks(pcm: np.ndarray, samples: int) -> list[bytes]:
    """Cut int16 audio into little-endian byte frames of at most `samples` samples."""
    if samples < 1:
        raise ValueError("samples must be at least 1")
    data = to_pcm16_bytes(pcm)
    step = samples * 2
    return [data[i: i + step] for i in range(0, len(data), step)]


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a PCM WAV file (8, 16, 24 or 32-bit integer samples) as int16 mono and its rate.

    Channels are averaged. Uses only the standard library's `wave`.
    Raises `ValueError` saying what is wrong when the file cannot be used.
    """
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (OSError, EOFError, wave.Error) as e:
        raise ValueError(f"cannot read {path} as a PCM WAV file: {e}") from e
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples are not supported (use 16-bit PCM)")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16), int(rate)


def write_wav(path: str | Path, pcm: np.ndarray, rate: int) -> None:
    """Write int16 mono as a 16-bit PCM WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(to_pcm16_bytes(pcm))
