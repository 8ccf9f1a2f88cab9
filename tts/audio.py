"""PCM conversion and sample-rate conversion, in plain numpy.

Piper voices speak at 22.05 kHz, Whisper listens at 16 kHz and browsers play
at 44.1 or 48 kHz, so audio is resampled at every edge of the pipeline. The
resampler is the classic band-limited interpolation (J. O. Smith, "Digital
Audio Resampling", ccrma.stanford.edu/~jos/resample): each output sample is a
Kaiser-windowed sinc evaluated at its exact fractional position in the input,
with the cutoff lowered to the output's Nyquist rate when downsampling so that
nothing aliases. scipy and soxr would do the same; neither is a dependency.
"""
from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["resample", "pcm16_to_float", "float_to_pcm16"]

# Filter design. 16 zero crossings on each side with a Kaiser beta of 8.6
# keeps aliasing and ripple below about -80 dB; the 0.95 rolloff leaves a
# transition band just under the Nyquist rate (above the speech band).
_ZERO_CROSSINGS = 16
_KAISER_BETA = 8.6
_ROLLOFF = 0.95
# Output samples computed per block: bounds the temporary (block, taps) matrices.
_BLOCK = 8192


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

    The output has ceil(len(audio) * dst_rate / src_rate) samples and the same
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

    g = math.gcd(int(src_rate), int(dst_rate))
    up, down = int(dst_rate) // g, int(src_rate) // g
    x = audio.astype(np.float32) / 32768.0 if is_int16 else audio.astype(np.float32)
    n_out = -(-len(x) * up // down)  # ceil
    table = _kernel_table(up, down)  # (up, taps)
    half = table.shape[1] // 2
    taps = np.arange(-half + 1, half + 1)  # input offsets around floor(t)
    padded = np.concatenate([np.zeros(half, np.float32), x, np.zeros(half + 1, np.float32)])

    out = np.empty(n_out, np.float32)
    for start in range(0, n_out, _BLOCK):
        n = np.arange(start, min(start + _BLOCK, n_out), dtype=np.int64)
        # Output n sits at input position n * down / up: integer part and
        # phase kept apart so long inputs lose no precision.
        idx = ((n * down) // up)[:, None] + taps[None, :] + half
        out[start : start + len(n)] = np.einsum("ij,ij->i", padded[idx], table[(n * down) % up])
    return float_to_pcm16(out) if is_int16 else out


@functools.lru_cache(maxsize=8)
def _kernel_table(up: int, down: int) -> np.ndarray:
    """Filter taps for each of the `up` fractional phases, (up, taps) float32.

    At most dst_rate rows of a few dozen taps: a few MB for the oddest rates.
    """
    # Cutoff as a fraction of the input's Nyquist rate; a lower cutoff widens
    # the kernel (in input samples) by the same factor.
    cutoff = min(1.0, up / down) * _ROLLOFF
    half = int(math.ceil(_ZERO_CROSSINGS / cutoff))
    taps = np.arange(-half + 1, half + 1)
    d = taps[None, :] - (np.arange(up) / up)[:, None]  # tap distance from t, (up, taps)
    window = np.i0(_KAISER_BETA * np.sqrt(np.clip(1.0 - (d / half) ** 2, 0.0, None)))
    kernel = cutoff * np.sinc(cutoff * d) * window / np.i0(_KAISER_BETA)
    return kernel.astype(np.float32)
