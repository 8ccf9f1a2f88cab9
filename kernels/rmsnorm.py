"""Fused RMSNorm: one read of x, one write of the result.

RMSNorm as in Zhang and Sennrich, "Root Mean Square Layer Normalization"
(2019), with the rounding of `dllm.model.rms_norm` (the Hugging Face Llama
order): normalise in float32, round to x's dtype, then multiply by the
weight. PyTorch runs that as four or five elementwise kernels, each a full
pass over memory; the Triton kernel keeps a row in registers throughout.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kernels.dispatch import cached_builder, cdiv, next_pow2, use_triton

if TYPE_CHECKING:  # the kernel gets `tl` from kernels.dispatch.jit_kernels at run time
    import triton.language as tl  # noqa: TC004

__all__ = ["rms_norm", "rms_norm_torch", "rms_norm_triton"]


def _check(x: Tensor, weight: Tensor) -> None:
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x must be (..., D) and weight (D,), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, backend: str = "auto") -> Tensor:
    """RMSNorm over the last dimension of x (..., D) with weight (D,).

    Computes in float32; the result has x's shape and dtype. `backend` is
    "auto", "torch" or "triton" (see kernels.dispatch).
    """
    _check(x, weight)
    if use_triton(x, weight, backend=backend):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def rms_norm_torch(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The PyTorch reference: `dllm.model.rms_norm`, cast back to x's dtype
    (the same thing when weight and x share a dtype)."""
    _check(x, weight)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf.to(dtype)).to(dtype)


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float, *, out: Tensor | None = None) -> Tensor:
    """The Triton kernel: compiled on CUDA, interpreted where triton was
    imported with TRITON_INTERPRET=1 (see kernels.dispatch).

    `out`, when given, is a contiguous tensor of x's shape and dtype to write
    into (it may be x itself); it is returned.
    """
    _check(x, weight)
    D = x.shape[-1]
    x2 = x.reshape(-1, D)  # (M, D), a view when x is contiguous
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight.contiguous()
    M = x2.shape[0]
    if out is None:
        out = torch.empty((M, D), dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} {x.dtype} tensor on {x.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    else:
        out = out.view(M, D)
    if M == 0 or D == 0:
        return out.reshape(x.shape)
    k = _build()
    block_d = next_pow2(D)
    # Several short rows per program keep the loads wide; one long row alone.
    rows = max(1, min(16, 4096 // block_d, next_pow2(M)))
    num_warps = min(16, max(1, rows * block_d // 1024))
    k._rms_norm_kernel[(cdiv(M, rows),)](
        x2, weight, out, x2.stride(0), out.stride(0), M, D, float(eps),
        ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out.reshape(x.shape)


# --------------------------------------------------------------------------
# Triton kernel. A plain function here; kernels.dispatch decorates a copy on
# first use.
# --------------------------------------------------------------------------

def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, M, D, eps,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (R,)
    cols = tl.arange(0, BLOCK_D)  # (BD,)
    ok = (rows < M)[:, None] & (cols < D)[None, :]  # (R, BD)
    rows64 = rows.to(tl.int64)
    raw = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    x = raw.to(tl.float32)
    ms = tl.sum(x * x, axis=1) / D  # (R,) padding columns are 0
    xn = x * (1.0 / tl.sqrt(ms + eps))[:, None]
    # Round to x's dtype before the weight, as the reference does.
    xn = xn.to(raw.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)  # (BD,)
    y = xn * w[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


_build = cached_builder(globals(), ["_rms_norm_kernel"])
