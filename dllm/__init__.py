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
    "DLLMError", "CheckpointError", "RequestError", "EngineBusy", "EngineClosed", "load_engine", "place",
    "default_dtype", "default_precision", "PRECISIONS",
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


PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")


def default_dtype(device: str) -> torch.dtype:
    """bf16 where it is fast (about 3x float32 on CPUs with bf16 units), float32 elsewhere."""
    return torch.bfloat16 if fast_bf16(device) else torch.float32


def default_precision(device: str) -> str:
    """bf16 where it is fast; on other CPUs int8 canvas steps (`dllm.quantize`); float32 on other devices."""
    if fast_bf16(device):
        return "bfloat16"
    return "int8" if device == "cpu" else "float32"


def place(loaded, device: str, precision: str = "auto", options: EngineOptions = EngineOptions()) -> Engine:
    """An Engine on `device` at `precision` from a `dllm.loaders.LoadedModel` (blocking; int8 calibrates, seconds).

    int8: the prompt runs in float32 and the canvas steps in int8 (`dllm.quantize`), after the float32 model's
    input channels are smoothed with scales measured on a few turns (`dllm.quantize.make_int8`)."""
    if precision not in PRECISIONS:
        raise RequestError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = default_precision(device)
    if precision == "int8" and device != "cpu":
        raise RequestError("int8 weights are for the CPU (fbgemm); use bfloat16 on a GPU")
    dtype = torch.float32 if precision == "int8" else getattr(torch, precision)
    net = loaded.model.to(device=device, dtype=dtype)
    engine = Engine(net, loaded.tokenizer, loaded.chat, options=options, name=loaded.source)
    if precision == "int8":
        from . import quantize
        quantize.make_int8(engine)
    return engine


def load_engine(model: str | Path | None = None, *, device: str = "cpu", precision: str = "auto",
                adapter: str | Path | None = "default", options: EngineOptions = EngineOptions()) -> Engine:
    """Load a model and wrap it in an `Engine` (blocking; seconds).

    `model`: None for the packaged default, or a local checkpoint (a directory
    in our format, the LLaDA or Dream layout, or a .gguf file).
    `precision`: one of PRECISIONS; "auto" is `default_precision(device)`.
    `adapter`: "default" for the shipped voice adapter when `model` is None,
    a directory, or None for the bare base.
    Raises `CheckpointError` if anything is missing or mismatched.
    """
    from .loaders import load_model
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    return place(load_model(model, adapter=adapter), device, precision, options)
