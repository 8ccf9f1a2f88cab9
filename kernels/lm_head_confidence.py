"""The LM head fused with the per-step confidence: hidden states in, token,
probability, margin and entropy out, with the (N, V) logits never written.

The sampler only needs four numbers per masked position, yet the unfused path
writes N x V logits (about 1 GB for 4096 positions of LLaDA's 126k vocabulary
in bf16) and reads them back. Here each program computes a (BLOCK_N, BLOCK_V)
tile of logits with `tl.dot`, folds it into the online-softmax state of
kernels.confidence (Milakov and Gimelshein 2018, the same idea that lets
FlashAttention skip the score matrix) and moves to the next vocabulary tile.
With few rows the vocabulary is split across programs and the partial states
are merged by kernels.confidence.merge_partials.

Semantics are those of `confidence(hidden @ weight.T, temperature=...)`,
without noise (Gumbel sampling needs per-token noise, so a sampler that
samples calls the unfused pair). The Triton path accumulates the logits in
float32 and does not round them to the input dtype, so in float16 it is
slightly more precise than the reference.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kernels.confidence import Confidence, confidence_torch, merge_partials, output_buffers
from kernels.dispatch import cached_builder, cdiv, check_block, next_pow2, sm_count, use_triton

if TYPE_CHECKING:  # the kernels get `tl` from kernels.dispatch.jit_kernels at run time
    import triton.language as tl  # noqa: TC004

__all__ = ["lm_head_confidence", "lm_head_confidence_torch", "lm_head_confidence_triton"]


def _check(hidden: Tensor, weight: Tensor, temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (N, D) and weight (V, D), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden has D={hidden.shape[1]} but weight has D={weight.shape[1]}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    if weight.shape[0] < 1:
        raise ValueError("weight needs at least one vocabulary row")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def lm_head_confidence(hidden: Tensor, weight: Tensor, *, temperature: float = 1.0,
                       backend: str = "auto") -> Confidence:
    """Confidence of `hidden @ weight.T` without materialising the logits.

    hidden (N, D), weight (V, D) in one dtype. Returns `Confidence` (token
    int64, prob, margin, entropy float32, each (N,)). `backend` is "auto",
    "torch" or "triton" (see kernels.dispatch).
    """
    _check(hidden, weight, temperature)
    if use_triton(hidden, weight, backend=backend):
        return lm_head_confidence_triton(hidden, weight, temperature=temperature)
    return lm_head_confidence_torch(hidden, weight, temperature=temperature)


def lm_head_confidence_torch(hidden: Tensor, weight: Tensor, *, temperature: float = 1.0) -> Confidence:
    """The PyTorch reference: the logits (N, V) in the input dtype, then
    `confidence_torch`."""
    _check(hidden, weight, temperature)
    return confidence_torch(hidden @ weight.T, temperature=temperature)  # (N, V)


def lm_head_confidence_triton(hidden: Tensor, weight: Tensor, *, temperature: float = 1.0,
                              out: Confidence | None = None, block_n: int | None = None,
                              block_v: int | None = None, block_d: int | None = None,
                              splits: int | None = None) -> Confidence:
    """The fused Triton kernel: compiled on CUDA, interpreted where triton
    was imported with TRITON_INTERPRET=1 (see kernels.dispatch).

    `out` is an optional preallocated `Confidence` to write into (see
    `confidence_triton`). Block sizes (powers of two, at least 16) and
    `splits` (vocabulary chunks) are tuning knobs; None picks defaults.
    """
    _check(hidden, weight, temperature)
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    out = output_buffers(N, dev, out)
    if N == 0:
        return out
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    k = _build()
    # tl.dot needs every block dimension >= 16.
    block_n = check_block("block_n", block_n, 16) if block_n else max(16, min(64, next_pow2(N)))
    block_v = check_block("block_v", block_v, 16) if block_v else 128
    block_d = check_block("block_d", block_d, 16) if block_d else max(16, min(64, next_pow2(D)))
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    row_blocks = cdiv(N, block_n)
    n_tiles = cdiv(V, block_v)
    if splits is None:
        splits = max(1, min(cdiv(2 * sm_count(dev), row_blocks), n_tiles // 4))
    tiles_per_split = cdiv(n_tiles, max(1, min(splits, n_tiles)))
    splits = cdiv(n_tiles, tiles_per_split)
    # float32 inputs would otherwise go through TF32 and lose ~3 digits.
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    args = (hidden, weight, hidden.stride(0), weight.stride(0), N, V, D, float(temperature), tiles_per_split,
            out.token, out.prob, out.margin, out.entropy)
    # 8 warps for a 64 x 128 tile: with 4, the accumulator and the softmax
    # temporaries outgrow the register file (checked on sm_90 cubins).
    num_warps = 8 if block_n * block_v >= 8192 else 4
    meta = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, PRECISION=precision, num_warps=num_warps,
                num_stages=3)
    if splits == 1:
        k._lm_head_kernel[(row_blocks, 1)](*args, out.prob, out.token, 1, FINAL=True, **meta)
        return out
    part_f = torch.empty(6, N, splits, dtype=torch.float32, device=dev)  # v1, v2, s, u, best, chosen
    part_i = torch.empty(N, splits, dtype=torch.int32, device=dev)  # token
    k._lm_head_kernel[(row_blocks, splits)](*args, part_f, part_i, splits, FINAL=False, **meta)
    merge_partials(part_f, part_i, out)
    return out


# --------------------------------------------------------------------------
# Triton kernel. A plain function here; kernels.dispatch decorates a copy on
# first use. The state per row is that of kernels.confidence (v1, v2, s, u,
# best/tok/chosen), without noise, so best == v1 and chosen == v1.
# --------------------------------------------------------------------------

def _lm_head_kernel(
    h_ptr, w_ptr, stride_h, stride_w, N, V, D, temperature, tiles_per_split,
    token_ptr, prob_ptr, margin_ptr, entropy_ptr, part_f_ptr, part_i_ptr, S,
    FINAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    lanes = tl.arange(0, BLOCK_V)  # (BV,)
    dk = tl.arange(0, BLOCK_D)  # (BD,)
    NEG = float("-inf")

    v1 = tl.full((BLOCK_N,), NEG, tl.float32)
    v2 = tl.full((BLOCK_N,), NEG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    tok = tl.zeros((BLOCK_N,), tl.int32)

    n_tiles = tl.cdiv(V, BLOCK_V)
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        cols = t * BLOCK_V + lanes  # (BV,)
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + dk
            d_ok = dd < D
            # Out-of-range rows, columns and features load 0, which adds 0.
            h = tl.load(h_ptr + rows64[:, None] * stride_h + dd[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BN, BD)
            w = tl.load(w_ptr + cols64[:, None] * stride_w + dd[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BV, BD)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)  # (BN, BV)
        x = tl.where(col_ok[None, :], acc / temperature, NEG)  # (BN, BV)

        t1 = tl.max(x, axis=1)  # (BN,)
        i1 = tl.argmax(x, axis=1)  # first index on ties
        t2 = tl.max(tl.where(lanes[None, :] == i1[:, None], NEG, x), axis=1)
        e = tl.exp(x - t1[:, None])  # every tile has a real column, so t1 is finite
        ts = tl.sum(e, axis=1)
        tu = tl.sum(tl.where(e > 0, x - t1[:, None], 0.0) * e, axis=1)  # no -inf * 0

        m = tl.maximum(v1, t1)
        a_old = tl.exp(v1 - m)
        a_new = tl.exp(t1 - m)
        d_old = tl.where(s > 0, v1 - m, 0.0)
        u = a_old * (u + d_old * s) + a_new * (tu + (t1 - m) * ts)
        s = a_old * s + a_new * ts
        v2 = tl.maximum(tl.maximum(tl.minimum(v1, t1), v2), t2)
        tok = tl.where(t1 > v1, t * BLOCK_V + i1, tok)  # later tiles win only when larger
        v1 = m

    if FINAL:
        inv = 1.0 / s
        tl.store(token_ptr + rows, tok.to(tl.int64), mask=row_ok)
        tl.store(prob_ptr + rows, inv, mask=row_ok)  # the argmax token's p = exp(v1 - v1) / s
        tl.store(margin_ptr + rows, (1.0 - tl.exp(v2 - v1)) * inv, mask=row_ok)
        tl.store(entropy_ptr + rows, tl.log(s) - u * inv, mask=row_ok)
    else:
        plane = N * S
        at = rows64 * S + pid_s
        tl.store(part_f_ptr + at, v1, mask=row_ok)
        tl.store(part_f_ptr + plane + at, v2, mask=row_ok)
        tl.store(part_f_ptr + 2 * plane + at, s, mask=row_ok)
        tl.store(part_f_ptr + 3 * plane + at, u, mask=row_ok)
        tl.store(part_f_ptr + 4 * plane + at, v1, mask=row_ok)  # best: no noise, so the top-1
        tl.store(part_f_ptr + 5 * plane + at, v1, mask=row_ok)  # chosen
        tl.store(part_i_ptr + at, tok, mask=row_ok)


_build = cached_builder(globals(), ["_lm_head_kernel"])
