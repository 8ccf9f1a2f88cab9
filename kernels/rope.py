"""Rotary position embedding for queries and keys in one kernel launch.

RoPE as in Su et al., "RoFormer" (2021), in the Hugging Face Llama layout that
`dllm.model.apply_rope` uses: the head dimension is split in halves and
rotate_half(x) = cat(-x[D/2:], x[:D/2]); cos and sin come from
`dllm.model.rope_tables`, (B, 1, T, D) in float32. The arithmetic is that of
`apply_rope` (float32, rounded once to the input dtype).

PyTorch runs the slicing, negation, concatenation, two products and a sum as
separate kernels, twice (q and k). The Triton kernel reads each element and
its partner once and writes the result once, for q's and k's heads in the same
grid.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kernels.dispatch import cached_builder, cdiv, next_pow2, use_triton

if TYPE_CHECKING:  # the kernel gets `tl` from kernels.dispatch.jit_kernels at run time
    import triton.language as tl  # noqa: TC004

__all__ = ["apply_rope", "apply_rope_torch", "apply_rope_triton"]


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (T, D):
        raise ValueError(f"k must be (B, Hkv, T, D) matching q {tuple(q.shape)}, got {tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if D % 2:
        raise ValueError(f"the head dimension must be even for split-half rotation, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 4 or t.shape[0] not in (1, B) or t.shape[1] != 1 or t.shape[2:] != (T, D):
            raise ValueError(f"{name} must be (B, 1, T, D) = ({B}, 1, {T}, {D}), got {tuple(t.shape)}")


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Rotate q (B, H, T, D) and k (B, Hkv, T, D) by cos, sin (B or 1, 1, T, D).

    Returns new tensors (q, k) in the inputs' dtype; the inputs are not
    changed. `backend` is "auto", "torch" or "triton" (see kernels.dispatch).
    """
    _check(q, k, cos, sin)
    if use_triton(q, k, cos, sin, backend=backend):
        return apply_rope_triton(q, k, cos, sin)
    return apply_rope_torch(q, k, cos, sin)


def _rope_one(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def apply_rope_torch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The PyTorch reference: `dllm.model.apply_rope` on q and on k."""
    _check(q, k, cos, sin)
    return _rope_one(q, cos, sin), _rope_one(k, cos, sin)


def apply_rope_triton(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *,
                      out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The Triton kernel, one launch for q and k: compiled on CUDA,
    interpreted where triton was imported with TRITON_INTERPRET=1 (see
    kernels.dispatch).

    Any strides are accepted (q and k are usually transposed views of the
    projections) as long as the head dimension is contiguous. `out`, when
    given, is a pair shaped and typed like (q, k) to write into, of any such
    strides (it may be (q, k) themselves: each element reads only its own row);
    it is returned.
    """
    _check(q, k, cos, sin)
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    # A batch of one broadcasts over B through a zero stride.
    cos = cos.expand(B, 1, T, D)
    sin = sin.expand(B, 1, T, D)
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    if out is None:
        q_out = torch.empty_like(q)  # keeps q's layout, as the reference's elementwise ops do
        k_out = torch.empty_like(k)
    else:
        q_out, k_out = out
        for name, o, x in (("out[0]", q_out, q), ("out[1]", k_out, k)):
            if o.shape != x.shape or o.dtype != x.dtype or o.device != x.device or o.stride(-1) != 1:
                raise ValueError(f"{name} must be a {tuple(x.shape)} {x.dtype} tensor on {x.device} "
                                 f"with a contiguous last dimension, got {tuple(o.shape)} {o.dtype} on {o.device}")
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    kern = _build()
    block_d = next_pow2(D)
    # 2048 elements a program: 16 a thread over 4 warps, so x, its partner,
    # cos, sin and their addresses fit in registers.
    block_t = max(1, min(64, 2048 // block_d, next_pow2(T)))
    kern._rope_kernel[(B * (H + Hkv), cdiv(T, block_t))](
        q, k, q_out, k_out, cos, sin,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2),
        H, Hkv, T, D // 2,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return q_out, k_out


# --------------------------------------------------------------------------
# Triton kernel. A plain function here; kernels.dispatch decorates a copy on
# first use. Program (b * (H + Hkv) + h, t-block): heads h < H are q's, the
# rest k's.
# --------------------------------------------------------------------------

def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    sqb, sqh, sqt, skb, skh, skt, sqob, sqoh, sqot, skob, skoh, skot, scb, sct, ssb, sst,
    H, HKV, T, HALF,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // (H + HKV)
    h = pid % (H + HKV)
    ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    d = tl.arange(0, BLOCK_D)  # (BD,)
    D = 2 * HALF
    ok = (ts < T)[:, None] & (d < D)[None, :]  # (BT, BD)
    ts64 = ts.to(tl.int64)
    first = d < HALF
    partner = tl.where(first, d + HALF, d - HALF)  # rotate_half's source lane
    sign = tl.where(first, -1.0, 1.0)

    b64 = b.to(tl.int64)
    c = tl.load(cos_ptr + b64 * scb + ts64[:, None] * sct + d[None, :], mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + b64 * ssb + ts64[:, None] * sst + d[None, :], mask=ok, other=0.0).to(tl.float32)

    # Both branches build pointer blocks of one type; strides that Triton
    # specialises to constants (a stride of 1) cannot make them differ.
    if h < H:
        hq = h.to(tl.int64)
        rowp = q_ptr + b64 * sqb + hq * sqh + ts64[:, None] * sqt  # (BT, 1)
        outp = qo_ptr + b64 * sqob + hq * sqoh + ts64[:, None] * sqot
    else:
        hk = (h - H).to(tl.int64)
        rowp = k_ptr + b64 * skb + hk * skh + ts64[:, None] * skt
        outp = ko_ptr + b64 * skob + hk * skoh + ts64[:, None] * skot
    x = tl.load(rowp + d[None, :], mask=ok, other=0.0)
    xr = tl.load(rowp + partner[None, :], mask=ok, other=0.0)
    # -x is exact in any dtype, so negating in float32 matches the reference.
    y = x.to(tl.float32) * c + (sign[None, :] * xr.to(tl.float32)) * s
    tl.store(outp + d[None, :], y.to(qo_ptr.dtype.element_ty), mask=ok)


_build = cached_builder(globals(), ["_rope_kernel"])
