"""dllm: masked diffusion language models, from checkpoint to fixed-cost turns.

    engine = load_engine()                      # the packaged default model
    result = engine.respond_sync(Turn("um where is the the library"))
    result.cleaned, result.reply

Nothing here knows about audio; `voice` wires this to speech.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .chat import ChatFormat
from .engine import Engine, EngineOptions
from .errors import CheckpointError, DLLMError, EngineBusy, EngineClosed, RequestError
from .sampler import SamplerOptions
from .turn import Turn, TurnLayout, TurnResult

__all__ = [
    "Engine", "EngineOptions", "SamplerOptions", "Turn", "TurnLayout", "TurnResult", "ChatFormat",
    "DLLMError", "CheckpointError", "RequestError", "EngineBusy", "EngineClosed", "load_engine",
]

log = logging.getLogger(__name__)


def default_dtype(device: str) -> torch.dtype:
    # bf16 matmuls run about 3x faster than float32 on the CPUs we target, and natively on GPUs.
    return torch.bfloat16


def load_engine(model: str | Path | None = None, *, device: str = "cpu", dtype: torch.dtype | None = None,
                adapter: str | Path | None = "default", options: EngineOptions = EngineOptions()) -> Engine:
    """Load a model and wrap it in an `Engine` (blocking; seconds).

    `model`: None for the packaged default, or a local checkpoint (a directory
    in our format, the LLaDA or Dream layout, or a .gguf file).
    `adapter`: "default" for the shipped voice adapter when `model` is None,
    a directory, or None for the bare base.
    Raises `CheckpointError` if anything is missing or mismatched.
    """
    from .loaders import load_model
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    loaded = load_model(model, adapter=adapter)
    net = loaded.model.to(device=device, dtype=dtype or default_dtype(device))
    return Engine(net, loaded.tokenizer, loaded.chat, options=options, name=loaded.source)
