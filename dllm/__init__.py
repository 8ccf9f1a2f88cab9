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
    "DLLMError", "CheckpointError", "RequestError", "EngineBusy", "EngineClosed", "load_engine", "default_dtype",
]

log = logging.getLogger(__name__)


def fast_bf16(device: str = "cpu") -> bool:
    """Whether bf16 matmuls are fast on `device`: on GPUs, and on CPUs with
    AVX512-BF16 or AMX. Elsewhere (an AVX2-only CPU) PyTorch emulates them:
    measured about 50x slower than float32 on such a machine."""
    if device.startswith("cuda"):
        return True
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # an older PyTorch without these probes: assume the slow path
        return False


def default_dtype(device: str) -> torch.dtype:
    """bf16 where it is fast (about 3x float32 on CPUs with bf16 units), float32 elsewhere."""
    return torch.bfloat16 if fast_bf16(device) else torch.float32


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
