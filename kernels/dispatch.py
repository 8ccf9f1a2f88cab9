"""Choosing between a Triton kernel and its PyTorch reference, and building
the Triton kernels lazily.

Follows SGLang's torch fallbacks and vLLM's Triton sampler kept beside the
torch one: every public op in `kernels` takes `backend=` and asks `use_triton`
which path to run.

  - "auto" (default): compiled Triton when every tensor is on one CUDA device
    and triton imports; the PyTorch reference otherwise. CPU tensors always
    take PyTorch, so a kiosk never imports triton.
  - "torch": always the reference.
  - "triton": always Triton, or `KernelError`. CUDA tensors run the compiled
    kernels. CPU tensors run in Triton's interpreter, which needs
    `TRITON_INTERPRET=1` set in the environment before triton is first
    imported (slow; meant for tests).

Triton decides between compiling and interpreting once per process: when it
is imported it decorates its own library (`tl.sum`, `tl.argmax`, `tl.cdiv`,
...) for one mode or the other, and the two do not mix. So the mode here is
read from that library (`library_interpreted`), not from the environment of
the moment. In an interpreting process "triton" runs every kernel in the
interpreter, CUDA tensors included, and "auto" keeps to PyTorch.

The kernels themselves are built lazily. Triton resolves the names a kernel
uses (`tl`, helper kernels) through the function's globals, and decorating at
import would import triton on machines that never use it. So each kernel file
writes its kernels as plain module-level functions, and `jit_kernels`
decorates copies of them on first use, in a private namespace that binds `tl`.
"""
from __future__ import annotations

import functools
import os
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "Backend",
    "KernelError",
    "interpreter_enabled",
    "jit_kernels",
    "library_interpreted",
    "triton_available",
    "use_triton",
]

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


class KernelError(RuntimeError):
    """A Triton kernel was asked for where it cannot run."""


@functools.cache
def _import_triton() -> tuple[Any, Any] | None:
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001  ImportError, or a broken install (missing driver libraries)
        return None
    return triton, tl


def triton_available() -> bool:
    """True when `import triton` works here. Imports it on the first call."""
    return _import_triton() is not None


def interpreter_enabled() -> bool:
    """True when `TRITON_INTERPRET=1` is set, read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def library_interpreted() -> bool:
    """True when triton was imported in interpreter mode in this process.

    Imports triton. Fixed for the life of the process (see the module doc).
    """
    if _import_triton() is None:
        return False
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction
    return any(isinstance(v, InterpretedFunction) for v in vars(standard).values())


def use_triton(*tensors: Tensor, backend: str = "auto") -> bool:
    """Whether an op on `tensors` should run its Triton kernel.

    Raises `ValueError` for an unknown backend, and `KernelError` when
    `backend="triton"` cannot be honoured (no triton; tensors on several
    devices; CPU tensors without the interpreter).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    devices = {t.device for t in tensors}
    on_cuda = all(d.type == "cuda" for d in devices)
    if backend == "auto":
        # The CUDA check comes first so CPU callers never import triton.
        return on_cuda and len(devices) == 1 and triton_available() and not library_interpreted()
    if len(devices) > 1:
        raise KernelError(f"backend='triton' needs all tensors on one device, got {sorted(map(str, devices))}")
    if not triton_available():
        raise KernelError("backend='triton' needs the triton package (pip install triton)")
    if library_interpreted():
        if on_cuda or interpreter_enabled():
            return True
        raise KernelError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    if on_cuda:
        return True
    if interpreter_enabled():
        raise KernelError(
            "backend='triton' on CPU tensors runs Triton's interpreter, but triton was imported in this "
            "process before TRITON_INTERPRET=1 was set; set it before anything imports triton"
        )
    raise KernelError(
        "backend='triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before "
        f"triton is imported; got tensors on {next(iter(devices), 'no device')}"
    )


def in_interpreter() -> bool:
    """Whether the kernels run interpreted (the callers then pick block sizes
    for Python's speed rather than the GPU's)."""
    return library_interpreted()


# Two threads reaching a first call together would otherwise both build.
_BUILD_LOCK = threading.Lock()


def jit_kernels(module_globals: dict[str, Any], names: Sequence[str]) -> types.SimpleNamespace:
    """Triton-decorated copies of the plain functions `names` from a module.

    Every copy shares one fresh namespace: the module's globals, plus `tl`,
    `triton`, and each name rebound to its decorated copy (so kernels can call
    helpers). They are compiled or interpreted as `library_interpreted()` says.
    """
    found = _import_triton()
    if found is None:
        raise KernelError("the Triton kernels need the triton package (pip install triton)")
    triton, tl = found
    if library_interpreted():
        from triton.runtime.interpreter import InterpretedFunction as make
    else:
        from triton.runtime.jit import JITFunction as make
    with _BUILD_LOCK:
        ns: dict[str, Any] = dict(module_globals)
        ns["tl"], ns["triton"] = tl, triton
        for name in names:
            fn = module_globals[name]
            copy = types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__)
            copy.__qualname__, copy.__module__ = fn.__qualname__, fn.__module__
            copy.__annotations__ = dict(fn.__annotations__)
            copy.__kwdefaults__ = fn.__kwdefaults__
            ns[name] = make(copy)
        return types.SimpleNamespace(**{name: ns[name] for name in names})


def cached_builder(module_globals: dict[str, Any], names: Sequence[str]) -> Callable[[], types.SimpleNamespace]:
    """`jit_kernels` for one module's kernels, built on the first call only."""
    @functools.cache
    def build() -> types.SimpleNamespace:
        return jit_kernels(module_globals, names)
    return build


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_block(name: str, value: int, minimum: int = 1) -> int:
    """A block size given by a caller: a power of two, at least `minimum`."""
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")
    return value


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
