"""Voice activity detection and endpointing on top of WebRTC's VAD.

webrtcvad (github.com/wiseman/py-webrtcvad) labels each 10/20/30 ms frame as
speech or not; this module turns those labels into utterances, in the manner
of py-webrtcvad's `example.py` and the endpointers of streaming ASR systems:

- Speech starts when `start_voiced_ms` of voiced frames fall inside the last
  `start_window_ms`, so a click or a door knock does not open an utterance.
  The onset is the first voiced frame of that window, and `pre_roll_ms` of the
  audio before it is kept, because the first phoneme is usually quieter than
  the frames that trip the trigger.
- Speech stops after `hangover_ms` of unbroken non-speech (reason "silence"),
  when the utterance reaches `max_utterance_ms` ("max_length"), when the
  caller calls `flush()` ("forced"), or when the caller decides the speaker
  has finished (`end_now()`, reason "early"). An utterance with less than
  `min_speech_ms` of voiced frames in it ends as `SpeechDiscarded` instead.
- A pause (`pause_ms` of non-speech, shorter than the hang-over) is reported
  as `SpeechPaused` with the audio so far, so the caller may start on the
  turn during the silence; `SpeechResumed` follows if the speaker goes on.
  The caller may then end the utterance at once (`end_now()`, when the words
  so far make a finished sentence) or wait longer (`set_pause_hangover()`, when
  they plainly do not).

The detector is push-style and does no I/O: feed it bytes as they arrive and
act on the events it returns. Every buffer it holds is bounded (the pending
partial frame, the pre-roll ring, and the utterance by `max_utterance_ms`).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .errors import AudioFormatError

__all__ = ["VAD", "VADOptions", "VADEvent", "SpeechStarted", "SpeechStopped", "SpeechDiscarded",
           "SpeechPaused", "SpeechResumed"]

StopReason = Literal["silence", "max_length", "forced", "early"]

_RATES = (8000, 16000, 32000, 48000)  # what webrtcvad accepts
_FRAME_MS = (10, 20, 30)


@dataclass(frozen=True)
class VADOptions:
    """Endpointing parameters. Durations are in milliseconds and are rounded
    up to whole frames (the maximum is rounded down, so it is never exceeded).

    Attributes:
        sample_rate: rate of the 16-bit mono PCM fed in: 8000, 16000, 32000 or
            48000. Default 16000.
        frame_ms: webrtcvad frame length: 10, 20 or 30. Default 30.
        aggressiveness: webrtcvad mode, 0 (keeps most) to 3 (drops most
            non-speech). Default 2.
        start_window_ms: window the start trigger looks at. Default 300.
        start_voiced_ms: voiced audio needed inside that window to start
            speech. Default 150 (five 30 ms frames).
        pre_roll_ms: audio kept from before the onset. Default 300.
        post_roll_ms: audio kept after the last voiced frame when speech ends
            on silence; at most `hangover_ms`. Default 300.
        hangover_ms: unbroken non-speech that ends an utterance. Default 600.
        min_speech_ms: utterances with less voiced audio than this are
            discarded (coughs, blips). Default 250.
        max_utterance_ms: longest utterance audio, pre-roll included; reaching
            it forces an endpoint. Default 15000.
        pause_ms: non-speech after which a `SpeechPaused` is reported (once
            per pause), shorter than `hangover_ms`; 0: never. Default 0.
    """

    sample_rate: int = 16000
    frame_ms: int = 30
    aggressiveness: int = 2
    start_window_ms: int = 300
    start_voiced_ms: int = 150
    pre_roll_ms: int = 300
    post_roll_ms: int = 300
    hangover_ms: int = 600
    min_speech_ms: int = 250
    max_utterance_ms: int = 15000
    pause_ms: int = 0

    def __post_init__(self) -> None:
        if self.sample_rate not in _RATES:
            raise ValueError(f"sample_rate must be one of {_RATES} (webrtcvad's rates), got {self.sample_rate}")
        if self.frame_ms not in _FRAME_MS:
            raise ValueError(f"frame_ms must be 10, 20 or 30 (webrtcvad's frame sizes), got {self.frame_ms}")
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0, 1, 2 or 3, got {self.aggressiveness}")
        for name in ("start_window_ms", "start_voiced_ms", "hangover_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("pre_roll_ms", "post_roll_ms", "min_speech_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.start_voiced_ms > self.start_window_ms:
            raise ValueError(
                f"start_voiced_ms ({self.start_voiced_ms}) cannot exceed start_window_ms ({self.start_window_ms})"
            )
        if not 0 <= self.pause_ms < self.hangover_ms:
            raise ValueError(f"pause_ms ({self.pause_ms}) must lie in [0, hangover_ms ({self.hangover_ms}))")
        if self.post_roll_ms > self.hangover_ms:
            raise ValueError(f"post_roll_ms ({self.post_roll_ms}) cannot exceed hangover_ms ({self.hangover_ms})")
        # The utterance opens holding the pre-roll and the trigger window, and
        # needs room for at least one more frame.
        least = (self._frames(self.pre_roll_ms) + self._frames(self.start_window_ms) + 1) * self.frame_ms
        if self.max_utterance_ms < least:
            raise ValueError(
                f"max_utterance_ms ({self.max_utterance_ms}) must be at least pre_roll_ms + "
                f"start_window_ms + one frame ({least} ms)"
            )

    def _frames(self, ms: int) -> int:
        return math.ceil(ms / self.frame_ms)


@dataclass(frozen=True)
class VADEvent:
    """Base of the detector's events. `t_ms` is stream time: milliseconds of
    audio fed since the detector was built or last `reset()`."""

    t_ms: int


@dataclass(frozen=True)
class SpeechStarted(VADEvent):
    """Speech began at `t_ms` (the onset, which the trigger confirms up to
    `start_window_ms` later). The natural moment for barge-in."""


@dataclass(frozen=True, eq=False)  # eq would compare numpy arrays
class SpeechStopped(VADEvent):
    """An utterance ended. `t_ms` is the end of its last voiced frame when
    `reason` is "silence", else the end of the audio taken. `audio` is int16
    mono at the detector's rate, from `pre_roll_ms` before the onset to the end
    (plus `post_roll_ms` on silence)."""

    audio: np.ndarray = field(repr=False)
    reason: StopReason


@dataclass(frozen=True)
class SpeechDiscarded(VADEvent):
    """A started utterance ended with only `voiced_ms` of speech, under
    `min_speech_ms`: a blip, not words. Nothing to transcribe."""

    voiced_ms: int


@dataclass(frozen=True, eq=False)
class SpeechPaused(VADEvent):
    """`pause_ms` of non-speech inside an open utterance. `t_ms` is the end of
    the last voiced frame; `audio` is the utterance so far, as `SpeechStopped`
    would give it if the pause turned out to be the end (less the post-roll
    not yet heard). The utterance stays open."""

    audio: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class SpeechResumed(VADEvent):
    """Speech again after a `SpeechPaused`, inside the same utterance."""


class VAD:
    """Streaming endpointer over 16-bit little-endian mono PCM.

    Example:
        >>> vad = VAD(VADOptions(sample_rate=16000))
        >>> for event in vad.feed(pcm_bytes):
        ...     if isinstance(event, SpeechStopped):
        ...         text = transcriber.transcribe(event.audio)

    Not thread-safe: one detector per audio stream, driven from one task.
    """

    def __init__(self, options: VADOptions | None = None) -> None:
        try:
            import webrtcvad
        except ImportError as e:
            raise ImportError("asr.VAD needs webrtcvad; `pip install webrtcvad-wheels`") from e
        self.options = o = options or VADOptions()
        self._vad = webrtcvad.Vad(o.aggressiveness)
        self._frame_bytes = o.sample_rate * o.frame_ms // 1000 * 2
        self._window = o._frames(o.start_window_ms)
        self._need = o._frames(o.start_voiced_ms)
        self._pre_roll = o._frames(o.pre_roll_ms)
        self._post_roll = o._frames(o.post_roll_ms)
        self._hangover = o._frames(o.hangover_ms)
        self._max_frames = o.max_utterance_ms // o.frame_ms
        self.reset()

    def reset(self) -> None:
        """Forget everything, the stream clock included (a new stream)."""
        self._clock = 0  # frames seen
        self._pending = b""  # partial frame, always shorter than one frame
        self._clear()

    def _clear(self) -> None:
        # Recent (frame, voiced) pairs while idle: the trigger window plus the pre-roll before it.
        self._history: deque[tuple[bytes, bool]] = deque(maxlen=self._window + self._pre_roll)
        self._frames: list[bytes] = []  # the utterance, when in speech
        self._first = 0  # clock index of _frames[0]
        self._voiced = 0
        self._last_voiced = 0  # index into _frames
        self._silence = 0
        self._paused = False  # a SpeechPaused was reported for the silence now running
        self._hangover_now = self._hangover  # this utterance's hang-over (set_pause_hangover)

    @property
    def in_speech(self) -> bool:
        """True between SpeechStarted and the event that ends it."""
        return bool(self._frames)

    def feed(self, pcm: bytes | bytearray | memoryview | np.ndarray) -> list[VADEvent]:
        """Process more audio; return the events it caused, oldest first.

        `pcm` is 16-bit little-endian mono at `options.sample_rate`, as bytes
        or an int16 array, of any length: partial frames wait for the next call.

        Raises:
            AudioFormatError (a ValueError): an odd number of bytes (a sample
                split in two; the caller must keep samples whole) or an array
                that is not 1-D int16.
        """
        if isinstance(pcm, np.ndarray):
            if pcm.dtype != np.int16 or pcm.ndim != 1:
                raise AudioFormatError(f"VAD.feed takes 1-D int16 samples, got {pcm.dtype} with shape {pcm.shape}")
            pcm = pcm.astype("<i2", copy=False).tobytes()
        data = bytes(pcm)  # len() of a memoryview counts items, not bytes
        if len(data) % 2:
            raise AudioFormatError(
                f"VAD.feed needs whole 16-bit samples (an even number of bytes), got {len(data)} bytes"
            )
        data = self._pending + data
        n = len(data) // self._frame_bytes * self._frame_bytes
        self._pending = data[n:]
        events: list[VADEvent] = []
        for i in range(0, n, self._frame_bytes):
            event = self._step(data[i : i + self._frame_bytes])
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[VADEvent]:
        """End of input: close an open utterance now (reason "forced").

        The utterance keeps any partial frame still pending; when idle it is
        dropped. Returns [] when no speech was in progress. The clock keeps
        running (in whole frames, so a dropped partial frame is not counted),
        and the detector takes more audio afterwards.
        """
        events: list[VADEvent] = []
        if self.in_speech:
            self._frames.append(self._pending)
            end_ms = self._clock * self.options.frame_ms + len(self._pending) // 2 * 1000 // self.options.sample_rate
            events.append(self._end("forced", len(self._frames), end_ms))
        self._pending = b""
        self._clear()
        return events

    def end_now(self) -> VADEvent | None:
        """End the open utterance here: the caller has decided the speaker is done
        (reason "early"; the audio runs to the end of what was fed, at most the
        post-roll past the last voiced frame). None when not in speech."""
        if not self.in_speech:
            return None
        keep = min(len(self._frames), self._last_voiced + 1 + self._post_roll)
        return self._end("early", keep, (self._first + self._last_voiced + 1) * self.options.frame_ms)

    def set_pause_hangover(self, ms: int) -> None:
        """End the open utterance after `ms` of non-speech in the pause now running,
        never less than the usual hang-over (so 0 restores it). Speech again, or
        the next utterance, brings the usual hang-over back."""
        if self.in_speech:
            self._hangover_now = max(self._hangover, self.options._frames(ms))

    @property
    def silence_ms(self) -> int:
        """Non-speech since the last voiced frame of the open utterance (0 when not in speech)."""
        return self._silence * self.options.frame_ms if self.in_speech else 0

    def current_audio(self) -> np.ndarray:
        """The open utterance so far as int16 (pre-roll included), for partial
        transcripts; an empty array when not in speech. A copy."""
        if not self.in_speech:
            return np.zeros(0, np.int16)
        return np.frombuffer(b"".join(self._frames) + self._pending, dtype="<i2").astype(np.int16)

    def _step(self, frame: bytes) -> VADEvent | None:
        o = self.options
        voiced = self._vad.is_speech(frame, o.sample_rate)
        self._clock += 1
        if not self.in_speech:
            self._history.append((frame, voiced))
            history = list(self._history)
            window = history[-self._window :]
            if not voiced or sum(v for _, v in window) < self._need:
                return None
            onset = len(history) - len(window) + next(i for i, (_, v) in enumerate(window) if v)
            begin = max(0, onset - self._pre_roll)
            self._frames = [f for f, _ in history[begin:]]
            self._first = self._clock - len(history) + begin
            self._voiced = sum(v for _, v in history[onset:])
            self._last_voiced = len(self._frames) - 1
            self._silence = 0
            self._history.clear()
            return SpeechStarted(t_ms=(self._clock - len(history) + onset) * o.frame_ms)

        self._frames.append(frame)
        resumed = None
        if voiced:
            self._voiced += 1
            self._last_voiced = len(self._frames) - 1
            self._silence = 0
            if self._paused:
                self._paused = False
                self._hangover_now = self._hangover  # a stretched hang-over was for that pause only
                resumed = SpeechResumed(t_ms=(self._clock - 1) * o.frame_ms)
        else:
            self._silence += 1
        if self._silence >= self._hangover_now:
            keep = self._last_voiced + 1 + self._post_roll
            return self._end("silence", keep, (self._first + self._last_voiced + 1) * o.frame_ms)
        if len(self._frames) >= self._max_frames:
            return self._end("max_length", len(self._frames), self._clock * o.frame_ms)
        # A pause is news only for an utterance that would be kept if it ended here.
        if (o.pause_ms and not self._paused and self._silence * o.frame_ms >= o.pause_ms
                and self._voiced * o.frame_ms >= o.min_speech_ms):
            self._paused = True
            audio = np.frombuffer(b"".join(self._frames), dtype="<i2").astype(np.int16)
            return SpeechPaused(t_ms=(self._first + self._last_voiced + 1) * o.frame_ms, audio=audio)
        return resumed

    def _end(self, reason: StopReason, keep: int, t_ms: int) -> VADEvent:
        voiced_ms = self._voiced * self.options.frame_ms
        audio = np.frombuffer(b"".join(self._frames[:keep]), dtype="<i2").astype(np.int16)
        self._clear()
        if voiced_ms < self.options.min_speech_ms:
            return SpeechDiscarded(t_ms=t_ms, voiced_ms=voiced_ms)
        return SpeechStopped(t_ms=t_ms, audio=audio, reason=reason)
