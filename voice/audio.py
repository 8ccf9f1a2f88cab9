"""Audio plumbing for sessions: streaming resampling, PCM framing, WAV files.

`tts.resample` converts a whole clip. A session gets its audio in 20-100 ms
frames, and resampling each frame on its own would pad both ends with
zeros, clicking at every frame boundary (50 times a second), which the VAD
and Whisper both hear. `StreamResampler` keeps enough input on each side of
the samples it emits (more than the filter's half-width) and keeps its
buffer aligned to the rate ratio, so the streamed output equals resampling
the whole stream at once (J. O. Smith's band-limited interpolation is
position-exact, so the pieces meet without a seam).
"""
from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np

__all__ = ["StreamResampler", "pcm_chunks", "read_wav", "write_wav", "to_pcm16_bytes"]


class StreamResampler:
    """Resample an int16 stream chunk by chunk; `push` returns what is final so far.

    The output lags the input by `context` input samples (4 ms at 16 kHz,
    12 ms at 48 kHz); `flush` returns the rest at the end of the stream.
    Memory is bounded: the buffer holds about one chunk plus 2 x context.

    Example:
        >>> rs = StreamResampler(48000, 16000)
        >>> out = np.concatenate([rs.push(c) for c in chunks] + [rs.flush()])
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise ValueError(f"rates must be positive, got {src_rate} and {dst_rate}")
        g = math.gcd(src_rate, dst_rate)
        self.src_rate, self.dst_rate = src_rate, dst_rate
        self.up, self.down = dst_rate // g, src_rate // g
        # The resampler's kernel reaches 16 zero crossings each way, i.e.
        # about 17 x max(1, src/dst) input samples; 64 x that ratio is ample.
        self.context = 64 * math.ceil(max(1.0, src_rate / dst_rate))
        self._buf = np.zeros(0, np.float32)
        self._start = 0  # absolute input index of _buf[0], always a multiple of `down`
        self._taken = 0  # input samples pushed in all
        self._done = 0  # output samples emitted

    def _out_index(self, in_index: int) -> int:
        return in_index * self.up // self.down

    def _emit(self, n_end: int) -> np.ndarray:
        from tts import resample

        if n_end <= self._done:
            return np.zeros(0, np.int16)
        if self.up == self.down == 1:
            out = self._buf
        else:
            out = resample(self._buf, self.src_rate, self.dst_rate)
        first = self._out_index(self._start)  # exact: _start is a multiple of down
        seg = out[self._done - first: n_end - first]
        self._done = n_end
        # Keep `context` input samples before the next output's position, aligned to `down`.
        keep = (self._done * self.down // self.up - self.context) // self.down * self.down
        keep = max(self._start, keep)
        self._buf = self._buf[keep - self._start:]
        self._start = keep
        return np.clip(np.round(seg * 32767.0), -32768, 32767).astype(np.int16)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Add int16 samples; return the int16 output samples that are now final."""
        pcm = np.asarray(pcm)
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"StreamResampler takes 1-D int16 samples, got {pcm.dtype} {pcm.shape}")
        self._buf = np.concatenate([self._buf, pcm.astype(np.float32) / 32768.0])
        self._taken += len(pcm)
        limit = self._taken - self.context  # outputs before this input position have full context
        if limit <= 0:
            return np.zeros(0, np.int16)
        return self._emit(-(-limit * self.up // self.down))

    def flush(self) -> np.ndarray:
        """End of stream: the remaining output (zero-padded on the right, as a whole-clip resample is)."""
        return self._emit(-(-self._taken * self.up // self.down))


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
