"""The kiosk: a voice session on the local microphone and speaker, offline.

`run_kiosk` drives one `VoiceSession` from a `Microphone` and plays its reply
on a `Speaker`; the sounddevice-backed pair (`open_devices`) is what
`voice kiosk` uses, and tests pass fake ones fed real audio. The loop is the
same either way:

    mic frames ─▶ session.feed ─▶ … ─▶ session events ─▶ speaker.play / console

A kiosk has no echo canceller, so its microphone hears its own replies. By
default it is half-duplex: while the speaker plays, the mic frames are
replaced by silence (so the VAD clock keeps running) and barge-in is off.
`barge_in=True` is for headsets or rooms with an external echo canceller.

PortAudio (through sounddevice) reports a missing device as an error when a
stream is opened; `open_devices` checks first and raises `DeviceError` with
what it found, which `voice kiosk` prints before exiting non-zero.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from . import protocol as P
from .errors import DeviceError
from .pipeline import cancel_and_wait
from .services import Services
from .session import SessionConfig, VoiceSession

__all__ = ["Microphone", "Speaker", "KioskOptions", "KioskResult", "run_kiosk", "open_devices",
           "SoundDeviceMicrophone", "SoundDeviceSpeaker"]

log = logging.getLogger("voice.kiosk")


class Microphone(Protocol):
    """Audio in: 16-bit mono PCM frames at `sample_rate`."""

    sample_rate: int

    def frames(self) -> AsyncIterator[bytes]:
        """Frames as they are captured; the iterator ends when the input does."""
        ...


class Speaker(Protocol):
    """Audio out: int16 mono at `sample_rate`, queued and played in order."""

    sample_rate: int

    def play(self, pcm: np.ndarray) -> None: ...

    def flush(self) -> None:
        """Stop now and drop everything queued (barge-in)."""
        ...

    @property
    def busy(self) -> bool:
        """True while queued audio is still playing."""
        ...


@dataclass(frozen=True)
class KioskOptions:
    """Kiosk settings: the venue's facts, barge-in, and the session's other settings."""

    knowledge: str | None = None
    barge_in: bool = False
    steps: int | None = None
    session: SessionConfig = field(default_factory=SessionConfig)
    finish_timeout_s: float = 300.0  # for finite input: time allowed to answer what was said


@dataclass
class KioskResult:
    """What happened, for the console and for tests."""

    events: list[dict] = field(default_factory=list)
    audio_samples: int = 0

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]


def _say(event: dict) -> str | None:
    """One console line for an event, or None to stay quiet."""
    kind = event["type"]
    if kind == "session.ready":
        return "ready: speak when you like (Ctrl-C to quit)"
    if kind == "transcript.final":
        return f"you:   {event['text']}" if event["text"] else "you:   (nothing understood)"
    if kind == "turn.reply":
        return f"reply: {event['text']}" if event["text"] else "reply: (no reply)"
    if kind == "turn.done":
        v2v = event.get("voice_to_voice_ms")
        return f"       ({v2v:.0f} ms voice to voice)" if v2v is not None else None
    if kind == "turn.interrupted":
        return "       (interrupted)"
    if kind == "error":
        return f"error: {event['code']}: {event['message']}"
    return None


async def run_kiosk(services: Services, mic: Microphone, speaker: Speaker,
                    options: KioskOptions = KioskOptions(), *,
                    on_event: Callable[[dict], None] | None = None,
                    stop: asyncio.Event | None = None) -> KioskResult:
    """Run the kiosk loop until the microphone's frames end or `stop` is set.

    `on_event` sees every event (default: print a console line for the
    interesting ones). When the mic input ends (a finite fake stream), what
    was said is answered before returning.
    """
    config = replace(options.session, input_sample_rate=mic.sample_rate, output_sample_rate=speaker.sample_rate,
                     knowledge=options.knowledge, steps=options.steps or options.session.steps,
                     barge_in=options.barge_in)
    session = VoiceSession(services, config)
    result = KioskResult()
    stop = stop or asyncio.Event()
    show = on_event or (lambda e: (line := _say(e)) and print(line, flush=True))

    async def listen() -> None:
        async for frame in mic.frames():
            if stop.is_set():
                return
            if not options.barge_in and speaker.busy:
                frame = bytes(len(frame))  # half-duplex: do not hear ourselves
            await session.feed(P.Audio(frame))
        await session.finish(options.finish_timeout_s)

    async def speak() -> None:
        async for item in session.events():
            if isinstance(item, bytes):
                pcm = np.frombuffer(item, dtype="<i2").astype(np.int16)
                result.audio_samples += len(pcm)
                speaker.play(pcm)
                continue
            event = json.loads(item)
            result.events.append(event)
            if event["type"] == "audio.flush":
                speaker.flush()
            show(event)

    await session.start()
    tasks = [asyncio.create_task(listen(), name="kiosk-listen"), asyncio.create_task(speak(), name="kiosk-speak"),
             asyncio.create_task(stop.wait(), name="kiosk-stop")]
    try:
        # Done when the events end (the session finished or failed) or on stop.
        await asyncio.wait({tasks[1], tasks[2]}, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks[:2]:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
    finally:
        await cancel_and_wait(tasks, 3.0)
        await session.close()
    return result


# ----- sounddevice

def _sounddevice():
    try:
        import sounddevice
    except OSError as e:  # raised when the PortAudio library itself is missing
        raise DeviceError(f"no audio system: PortAudio is not installed ({e}); "
                          "install libportaudio2 (Debian/Ubuntu: apt install libportaudio2)") from e
    except ImportError as e:
        raise DeviceError("the kiosk needs the sounddevice package; `pip install sounddevice`") from e
    return sounddevice


def _check_device(sd, kind: str, device) -> dict:
    try:
        info = sd.query_devices(device, kind=kind)
    except (sd.PortAudioError, ValueError) as e:
        try:
            found = [d["name"] for d in sd.query_devices()]
        except Exception:
            found = []
        what = "microphone (input)" if kind == "input" else "speaker (output)"
        listing = ", ".join(found) if found else "no audio devices at all"
        raise DeviceError(f"no audio {what} device found ({e}); the kiosk needs a microphone and a speaker. "
                          f"Devices seen: {listing}. Use `voice respond --audio in.wav --out reply.wav` "
                          "for a machine without audio devices.") from e
    channels = info.get("max_input_channels" if kind == "input" else "max_output_channels", 0)
    if channels < 1:
        raise DeviceError(f"audio device {info.get('name')!r} has no {kind} channels")
    return info


class SoundDeviceMicrophone:
    """The default (or a named) input device at 16 kHz, 30 ms frames.

    PortAudio calls back from its own thread; frames go to the event loop
    through a bounded queue (the oldest is dropped if the loop falls behind).
    """

    def __init__(self, device=None, sample_rate: int = 16000, frame_ms: int = 30, queue_frames: int = 100) -> None:
        self.sd = _sounddevice()
        _check_device(self.sd, "input", device)
        self.device, self.sample_rate = device, sample_rate
        self.blocksize = sample_rate * frame_ms // 1000
        self.queue_frames = queue_frames

    async def frames(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=self.queue_frames)

        def put(data: bytes) -> None:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(data)

        def callback(indata, frames, time_info, status) -> None:
            loop.call_soon_threadsafe(put, bytes(indata))

        stream = self.sd.RawInputStream(samplerate=self.sample_rate, blocksize=self.blocksize, device=self.device,
                                        channels=1, dtype="int16", callback=callback)
        with stream:
            while True:
                yield await queue.get()


class SoundDeviceSpeaker:
    """The default (or a named) output device; a callback pulls from a bounded buffer."""

    def __init__(self, device=None, sample_rate: int | None = None, max_seconds: float = 120.0) -> None:
        self.sd = _sounddevice()
        info = _check_device(self.sd, "output", device)
        self.sample_rate = int(sample_rate or info.get("default_samplerate") or 22050)
        if self.sample_rate not in P.OUTPUT_SAMPLE_RATES:
            self.sample_rate = 48000 if self.sample_rate > 24000 else 22050
        self._lock = threading.Lock()
        self._chunks: deque[np.ndarray] = deque()
        self._queued = 0
        self._max = int(max_seconds * self.sample_rate)
        self._stream = self.sd.OutputStream(samplerate=self.sample_rate, channels=1, dtype="int16",
                                            device=device, callback=self._callback)
        self._stream.start()

    def _callback(self, outdata, frames, time_info, status) -> None:
        out = outdata[:, 0]
        filled = 0
        with self._lock:
            while filled < frames and self._chunks:
                chunk = self._chunks[0]
                n = min(len(chunk), frames - filled)
                out[filled:filled + n] = chunk[:n]
                filled += n
                self._queued -= n
                if n == len(chunk):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = chunk[n:]
        out[filled:] = 0

    def play(self, pcm: np.ndarray) -> None:
        with self._lock:
            if self._queued + len(pcm) > self._max:
                log.warning("speaker buffer full; dropping %d samples", len(pcm))
                return
            self._chunks.append(np.asarray(pcm, np.int16))
            self._queued += len(pcm)

    def flush(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._queued = 0

    @property
    def busy(self) -> bool:
        return self._queued > 0

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()


def open_devices(input_device=None, output_device=None) -> tuple[SoundDeviceMicrophone, SoundDeviceSpeaker]:
    """The local microphone and speaker. Raises `DeviceError` (with what was found) if either is missing."""
    mic = SoundDeviceMicrophone(input_device)
    return mic, SoundDeviceSpeaker(output_device)
