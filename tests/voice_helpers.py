"""Helpers for the voice tests: real speech, the real ASR and TTS models, a scripted engine.

The models load once per test process (`functools.cache`), whichever test
module asks first. `ScriptedEngine` stands in for the dLLM where a test is
about the pipeline's mechanics (barge-in, audio framing, bad input) rather
than about the model: it has the engine's async API and returns the reply it
was given, after a delay or when a test releases it.
"""
from __future__ import annotations

import asyncio
import functools
import json
import time

import numpy as np

QUESTION = "What time does the library open on Saturday?"


@functools.cache
def synthesizer():
    from tts import Synthesizer
    return Synthesizer.load()


@functools.cache
def speaker():
    """The voice that speaks the tests' audio: piper without its sampling noise, so the same text is the same
    audio on every run (with the noise, one take in a few of "... get to the" read as a finished sentence)."""
    from tts import Synthesizer, SynthesizerOptions
    return Synthesizer.load(SynthesizerOptions(noise_scale=0.0, noise_w_scale=0.0))


@functools.cache
def transcriber():
    from asr import Transcriber
    return Transcriber.load()


@functools.cache
def speech(text: str = QUESTION, rate: int = 16000, lead_s: float = 0.3, tail_s: float = 1.2) -> np.ndarray:
    """`text` spoken by piper, resampled to `rate`, with silence before and after (int16)."""
    from tts import resample
    voice = speaker()
    pcm = resample(voice.synthesize_all(text), voice.sample_rate, rate)
    return np.concatenate([np.zeros(int(lead_s * rate), np.int16), pcm, np.zeros(int(tail_s * rate), np.int16)])


def words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() else " " for c in text).split()


class ScriptedEngine:
    """The engine's async API with a fixed reply. `gate`, when set, holds every
    respond() until released; `calls` and `cancelled` count what happened."""

    name = "scripted"

    def __init__(self, reply: str = "The library opens at nine in the morning. It closes at five.",
                 delay: float = 0.05, settled: str = "") -> None:
        self.reply = reply
        self.delay = delay
        self.settled = settled  # if set, passed to on_canvas as settled (step 4 of 8) before the gate
        self.gate: asyncio.Event | None = None
        self.calls: list = []
        self.cancelled = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def respond(self, turn, *, steps=None, on_canvas=None, **options):
        """`options` (deadline, ...) are accepted and ignored: the reply is fixed. `on_canvas` sees one
        mid-pass canvas when `settled` is set."""
        from dllm import TurnResult
        from dllm.canvas import CanvasStep
        self.calls.append(turn)
        try:
            await asyncio.sleep(self.delay)
            if self.settled and on_canvas is not None:
                on_canvas(CanvasStep(step=4, steps=8, cleaned=turn.transcript, reply=self.settled + " ░░",
                                     masked=2, settled=self.settled))
            if self.gate is not None:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        cleaned = turn.transcript[:1].upper() + turn.transcript[1:]
        return TurnResult(raw=turn.transcript, cleaned=cleaned, reply=self.reply, steps=steps or 8,
                          canvas=72, ms=self.delay * 1000)

    async def cleanup(self, text, *, steps=None, **options):
        from dllm import TurnResult
        await asyncio.sleep(self.delay)
        return TurnResult(raw=text, cleaned=text.strip().capitalize(), reply="", steps=steps or 8, canvas=24,
                          ms=self.delay * 1000)


class Client:
    """A /ws client that records every event and counts reply audio."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.events: list[dict] = []
        self.audio_frames = 0
        self.audio_bytes = 0

    @classmethod
    async def open(cls, url: str, *, start_session: bool = True, **start) -> Client:
        """Connect; send session.start (16 kHz, plus `start` fields) unless told not to."""
        from websockets.asyncio.client import connect
        ws = await connect(url, max_size=None, open_timeout=20)
        client = cls(ws)
        if start_session:
            await ws.send(json.dumps({"type": "session.start", "sample_rate": 16000, **start}))
        return client

    async def send_json(self, **msg) -> None:
        await self.ws.send(json.dumps(msg))

    async def send_audio(self, pcm: np.ndarray, *, chunk: int = 320, realtime: float = 0.0) -> None:
        """Send int16 PCM in `chunk`-sample frames; `realtime` > 0 paces it (1.0 = real time)."""
        data = pcm.astype("<i2").tobytes()
        rate = 16000
        t0 = time.monotonic()
        for i, start in enumerate(range(0, len(data), chunk * 2)):
            await self.ws.send(data[start:start + chunk * 2])
            if realtime:
                due = t0 + (i + 1) * chunk / rate / realtime
                await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def recv_event(self, timeout: float = 60.0) -> dict:
        """The next text event (audio frames are counted on the way)."""
        while True:
            msg = await asyncio.wait_for(self.ws.recv(), timeout)
            if isinstance(msg, bytes):
                self.audio_frames += 1
                self.audio_bytes += len(msg)
                continue
            event = json.loads(msg)
            self.events.append(event)
            return event

    async def until(self, kind: str, timeout: float = 120.0) -> dict:
        """Read events until one of type `kind` arrives; return it."""
        deadline = time.monotonic() + timeout
        while True:
            event = await self.recv_event(max(0.1, deadline - time.monotonic()))
            if event["type"] == kind:
                return event

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def close(self) -> None:
        await self.ws.close()


def fresh_engine(base, **options):
    """A new Engine over `base`'s weights (no reload): its own worker, bound to the
    running test's event loop, and free to close without touching `base`."""
    from dataclasses import replace

    from dllm import Engine
    return Engine(base.model, base.tok, base.chat, options=replace(base.options, **options), name=base.name)

