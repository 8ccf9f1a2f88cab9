"""PCM conversion and sample-rate conversion.

Piper voices speak at 22.05 kHz, Whisper listens at 16 kHz and browsers play
at 44.1 or 48 kHz, so audio is resampled at every edge of the pipeline. The
resampling is libsoxr's (the `soxr` package, "HQ" quality: a linear-phase
band-limited filter, no aliasing above -100 dB), which measured 14-32 times
faster than the numpy band-limited interpolation it replaced
(`scripts/resample_bench.py`, docs/BENCHMARKS.md).
"""
from __future__ import annotations

import numpy as np
import soxr

__all__ = ["resample", "pcm16_to_float", "float_to_pcm16", "RESAMPLE_QUALITY"]

RESAMPLE_QUALITY = "HQ"


def pcm16_to_float(pcm: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Convert 16-bit PCM (little-endian bytes or an int16 array) to float32 in [-1, 1).

    Raises:
        ValueError: bytes of odd length, or an array that is not int16.
    """
    if isinstance(pcm, np.ndarray):
        if pcm.dtype != np.int16:
            raise ValueError(f"expected an int16 array, got {pcm.dtype}")
        samples = pcm
    else:
        data = bytes(pcm)  # len() of a memoryview counts items, not bytes
        if len(data) % 2:
            raise ValueError(f"16-bit PCM needs an even number of bytes, got {len(data)}")
        samples = np.frombuffer(data, dtype="<i2")
    return samples.astype(np.float32) / 32768.0


def float_to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Convert float audio in [-1, 1] to int16, clipping anything outside the range."""
    audio = np.asarray(audio, dtype=np.float32)
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)


def resample(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample mono audio from `src_rate` to `dst_rate` Hz.

    The output has about len(audio) * dst_rate / src_rate samples (rounded) and the same
    kind as the input: int16 in gives int16 out (rounded and clipped), any
    float in gives float32 out. Equal rates return the input unchanged.

    Example:
        >>> resample(np.zeros(22050, np.float32), 22050, 16000).shape
        (16000,)

    Raises:
        ValueError: a rate that is not a positive integer, or audio that is
            not a 1-D int16 or float array.
    """
    for name, rate in (("src_rate", src_rate), ("dst_rate", dst_rate)):
        if not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise ValueError(f"{name} must be a positive integer number of Hz, got {rate!r}")
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"resample takes mono 1-D audio, got shape {audio.shape}")
    is_int16 = audio.dtype == np.int16
    if not is_int16 and not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"resample takes int16 or float audio, got {audio.dtype}")
    if src_rate == dst_rate:
        return audio

    x = audio.astype(np.float32) / 32768.0 if is_int16 else audio.astype(np.float32)
    out = soxr.resample(x, int(src_rate), int(dst_rate), quality=RESAMPLE_QUALITY)
    return float_to_pcm16(out) if is_int16 else out
