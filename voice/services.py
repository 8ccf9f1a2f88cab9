"""The models a voice session uses, loaded once and shared by every session.

`Services.load` reads the dLLM (through `dllm.load_engine`), the Whisper
model and the piper voice, logging each step (they take seconds), and turns
any loading failure into a `ServiceLoadError` that says which model failed.
Sessions only need `engine.respond`/`engine.cleanup` (async), and blocking
`transcriber.transcribe` and `synthesizer.synthesize_all`, which they run
in worker threads.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ServiceLoadError

__all__ = ["ModelOptions", "Services"]

log = logging.getLogger("voice")


@dataclass(frozen=True)
class ModelOptions:
    """Which models to load, and where.

    Attributes:
        model: the dLLM checkpoint (a directory or .gguf file); None loads
            the packaged SmolLM2 with the shipped voice adapter.
        device: "cpu" or "cuda" for the dLLM (and Whisper and piper on cuda).
        steps: denoising steps K per turn (sessions may ask for another K).
        asr_model: a CTranslate2 Whisper directory; None is the packaged tiny.en.
        voice: a piper voice .onnx file (its .onnx.json beside it); None is
            the packaged en_US-joe-medium.
        threads: CPU threads for each model; None leaves torch's default.
        batch_window_ms: how long the engine waits to gather a batch; None
            keeps the engine's default.
        bulk_batch: rows of a batch of cleanup requests (voice turns wait behind
            the batch that runs: on a CPU it costs about its rows times one
            request); None: the engine's max_batch.
        adapter: a LoRA adapter directory to merge; "default" leaves the
            choice to `dllm.load_engine` (the shipped voice adapter for the
            packaged model); None loads the bare base.
        precision: the dLLM's weights, one of `dllm.PRECISIONS`; "auto" is
            bf16 where the device has fast bf16, else int8 on a CPU.
    """

    model: str | Path | None = None
    device: str = "cpu"
    steps: int = 8
    asr_model: str | Path | None = None
    voice: str | Path | None = None
    threads: int | None = None
    batch_window_ms: float | None = None  # None: the engine's default
    bulk_batch: int | None = None
    adapter: str | Path | None = "default"  # "default": dllm's choice (the shipped voice adapter); None: bare
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if not 1 <= self.steps <= 256:
            raise ValueError(f"steps must be between 1 and 256, got {self.steps}")


@dataclass
class Services:
    """Loaded models. `transcriber` or `synthesizer` may be None (text-only use)."""

    # dllm.Engine, or anything with async respond(turn, steps=) and cleanup(text, steps=); both also get
    # client= and priority= (the queue's fairness), respond gets on_canvas= and deadline= when a session
    # asks, and temperature=, seed=, reply_tokens= from the chat API.
    engine: Any
    transcriber: Any | None = None  # asr.Transcriber
    synthesizer: Any | None = None  # tts.Synthesizer
    steps: int = 8
    load_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, options: ModelOptions = ModelOptions(), *, asr: bool = True, tts: bool = True) -> Services:
        """Load the models (blocking; seconds). Raises `ServiceLoadError`."""
        times: dict[str, float] = {}
        engine = load_engine(options, times)
        transcriber = load_transcriber(options, times) if asr else None
        synthesizer = load_synthesizer(options, times) if tts else None
        services = cls(engine, transcriber, synthesizer, steps=options.steps, load_ms=times)
        with _timed("the models (a short call into each)", times, ("warming up", "warmed up")):
            services.warm_up()
        return services

    def warm_up(self) -> None:
        """One short call into each model (blocking), so that the first user's turn does not pay for what a
        first call sets up (the int8 products' packed weights, buffers): about 180 ms of a first turn's
        voice to voice on a 2-core CPU (docs/BENCHMARKS.md)."""
        import numpy as np

        from dllm import Turn
        respond = getattr(self.engine, "respond_sync", None)
        if respond is not None:
            respond(Turn("hello there"), steps=self.steps)
        if self.transcriber is not None:
            self.transcriber.transcribe(np.zeros(16000, np.int16))
        if self.synthesizer is not None:
            self.synthesizer.synthesize_all("Hello.")

    @property
    def output_sample_rate(self) -> int:
        return int(self.synthesizer.sample_rate) if self.synthesizer is not None else 22050

    async def start(self) -> None:
        start = getattr(self.engine, "start", None)
        if start is not None:
            await start()

    async def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            await close()


@contextmanager
def _timed(what: str, times: dict[str, float], verbs: tuple[str, str] = ("loading", "loaded")) -> Iterator[None]:
    """Log the start and the end of a slow step (progress for the CLI's stderr), and keep its time."""
    log.info("%s %s ...", verbs[0], what)
    t0 = time.perf_counter()
    yield
    times[what] = ms = (time.perf_counter() - t0) * 1000
    log.info("%s %s in %.1f s", verbs[1], what, ms / 1000)


def load_engine(options: ModelOptions, times: dict[str, float] | None = None):
    times = {} if times is None else times
    try:
        import torch

        import dllm
        from dllm import EngineOptions, SamplerOptions
    except ImportError as e:
        raise ServiceLoadError("dLLM", f"a dependency is missing ({e}); reinstall the project") from e
    # Threads come from OMP_NUM_THREADS, which torch's OpenMP reads when it loads (the CLI sets it).
    if options.threads and torch.get_num_threads() != options.threads:
        log.warning("torch was imported before --threads %d could apply (it uses %d); set OMP_NUM_THREADS instead",
                    options.threads, torch.get_num_threads())
    name = str(options.model) if options.model else "the packaged SmolLM2 dLLM"
    with _timed(f"dLLM ({name}, {options.device}, {options.precision} precision, K={options.steps})", times):
        try:
            engine_options = EngineOptions(sampler=SamplerOptions(steps=options.steps))
            if options.batch_window_ms is not None:
                engine_options = replace(engine_options, batch_window_ms=options.batch_window_ms)
            engine_options = replace(engine_options, max_bulk_batch=options.bulk_batch)
            kw: dict[str, Any] = {} if options.adapter == "default" else {"adapter": options.adapter}
            return dllm.load_engine(options.model, device=options.device, precision=options.precision,
                                    options=engine_options, **kw)
        except dllm.DLLMError as e:
            raise ServiceLoadError("dLLM", str(e)) from e


def load_transcriber(options: ModelOptions, times: dict[str, float] | None = None):
    times = {} if times is None else times
    try:
        from asr import ASRError, Transcriber, TranscriberOptions
    except ImportError as e:
        raise ServiceLoadError("ASR", f"a dependency is missing ({e}); reinstall the project") from e
    name = str(options.asr_model) if options.asr_model else "Whisper tiny.en (packaged)"
    with _timed(f"ASR ({name})", times):
        try:
            kw: dict[str, Any] = {"model": options.asr_model,
                                  "device": "cuda" if options.device.startswith("cuda") else "cpu"}
            if options.threads:
                kw["cpu_threads"] = options.threads
            return Transcriber.load(TranscriberOptions(**kw))
        except (ASRError, ValueError) as e:
            raise ServiceLoadError("ASR", str(e)) from e


def load_synthesizer(options: ModelOptions, times: dict[str, float] | None = None):
    times = {} if times is None else times
    try:
        from tts import Synthesizer, SynthesizerOptions, TTSError
    except ImportError as e:
        raise ServiceLoadError("TTS", f"a dependency is missing ({e}); reinstall the project") from e
    name = str(options.voice) if options.voice else "piper en_US-joe-medium (packaged)"
    with _timed(f"TTS ({name})", times):
        try:
            kw: dict[str, Any] = {"model": options.voice, "use_cuda": options.device.startswith("cuda")}
            if options.threads:
                kw["threads"] = options.threads
            return Synthesizer.load(SynthesizerOptions(**kw))
        except (TTSError, ValueError) as e:
            raise ServiceLoadError("TTS", str(e)) from e
