"""Per-step confidence over the vocabulary: argmax token, its probability, the
top-1 minus top-2 margin and the entropy, in one pass over the logits.

A masked diffusion sampler scores every masked position at every step (LLaDA's
low-confidence remasking, Dream's margin and entropy confidences, Fast-dLLM's
threshold). The PyTorch way materialises softmax probabilities (N, V) in
float32 and reads them again for each score. The Triton kernel reads the
logits once and keeps, per row, an online softmax in the style of Milakov and
Gimelshein, "Online normalizer calculation for softmax" (2018): the running
max (which is also the top-1 logit), the running sum of exp, a running
sum of (x - max) * exp for the entropy, the runner-up logit, and the argmax.
No probability tensor is written. Each lane of a tile keeps these for the
columns it sees and the lanes are combined once at the end, so the loop does
one cross-lane reduction a tile (the max) rather than one per statistic.

With few rows the vocabulary is split across programs (split-K style) and a
second small kernel merges the partial states, so that a 64-row step still
fills the GPU.

Semantics, shared by both paths (x = logits / temperature, p = softmax(x)):
  token   = argmax(x + noise) (argmax(x) without noise; first index on ties)
  prob    = p[token]
  margin  = top-1 p minus top-2 p (of the clean p, whichever token is chosen)
  entropy = -sum p log p  (nats)

`noise` is there for Gumbel-max sampling: the sampler draws Gumbel noise
itself and passes it, so the token is a sample from softmax(x) while the
scores stay those of the clean distribution (LLaDA scores the sampled token
by its clean probability the same way).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from kernels.dispatch import cached_builder, cdiv, check_block, in_interpreter, next_pow2, sm_count, use_triton

if TYPE_CHECKING:  # the kernels get `tl` from kernels.dispatch.jit_kernels at run time
    import triton.language as tl  # noqa: TC004

__all__ = ["Confidence", "confidence", "confidence_torch", "confidence_triton"]


class Confidence(NamedTuple):
    """Per-row scores, each (N,): token int64; prob, margin, entropy float32."""

    token: Tensor
    prob: Tensor
    margin: Tensor
    entropy: Tensor


def _check(logits: Tensor, temperature: float, noise: Tensor | None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError("logits need at least one vocabulary entry")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use 1.0 and no noise for greedy), got {temperature}")
    if noise is not None and noise.shape != logits.shape:
        raise ValueError(f"noise must match logits {tuple(logits.shape)}, got {tuple(noise.shape)}")


def confidence(logits: Tensor, *, temperature: float = 1.0, noise: Tensor | None = None,
               backend: str = "auto") -> Confidence:
    """Token, probability, margin and entropy for each row of `logits` (N, V).

    `temperature` divides the logits before the softmax; `noise` (N, V), when
    given, is added to the tempered logits for the argmax only (Gumbel-max
    sampling). `backend` is "auto", "torch" or "triton" (see kernels.dispatch).

    Example:
        conf = confidence(logits[masked], noise=gumbel)
        order = conf.prob.argsort(descending=True)
    """
    _check(logits, temperature, noise)
    tensors = (logits,) if noise is None else (logits, noise)
    if use_triton(*tensors, backend=backend):
        return confidence_triton(logits, temperature=temperature, noise=noise)
    return confidence_torch(logits, temperature=temperature, noise=noise)


def confidence_torch(logits: Tensor, *, temperature: float = 1.0, noise: Tensor | None = None) -> Confidence:
    """The PyTorch reference: materialises the float32 softmax (N, V)."""
    _check(logits, temperature, noise)
    x = logits.float() / temperature  # (N, V)
    logp = torch.log_softmax(x, dim=-1)  # (N, V)
    p = logp.exp()
    y = x if noise is None else x + noise.float()
    token = y.argmax(dim=-1)  # (N,)
    prob = p.gather(-1, token[:, None])[:, 0]
    top = p.topk(min(2, p.shape[1]), dim=-1).values  # (N, 2)
    second = top[:, 1] if top.shape[1] > 1 else torch.zeros_like(top[:, 0])
    margin = top[:, 0] - second
    # p = 0 where x = -inf: count 0 * log 0 as 0, not NaN.
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return Confidence(token, prob, margin, entropy)


def confidence_triton(logits: Tensor, *, temperature: float = 1.0, noise: Tensor | None = None,
                      out: Confidence | None = None, block_v: int | None = None,
                      splits: int | None = None) -> Confidence:
    """The Triton kernel: compiled on CUDA, interpreted where triton was
    imported with TRITON_INTERPRET=1 (see kernels.dispatch).

    `out` is an optional preallocated `Confidence` to write into (static
    buffers for CUDA graphs); it is returned. `block_v` (a power of two) and
    `splits` (vocabulary chunks per row) are tuning knobs; None picks them
    from the shape and the device.
    """
    _check(logits, temperature, noise)
    N, V = logits.shape
    dev = logits.device
    out = output_buffers(N, dev, out)
    if N == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if noise is not None and noise.stride(1) != 1:
        noise = noise.contiguous()
    interpret = in_interpreter()
    k = _build()
    # 2048 lanes x 8 warps: 8 columns a thread, so the per-lane state (up to
    # eight vectors) stays in registers.
    block_v = check_block("block_v", block_v) if block_v else min(2048, next_pow2(V))
    # One row per program on the GPU; the interpreter runs programs one at a
    # time in Python, so it takes several rows each to keep tests quick.
    rows = min(16, next_pow2(N)) if interpret else 1
    n_tiles = cdiv(V, block_v)
    row_blocks = cdiv(N, rows)
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if splits is None:
        # Enough programs to fill every SM a few times over, but not chunks of
        # under four tiles, where the merge would cost more than it saves.
        splits = max(1, min(cdiv(4 * sm_count(dev), row_blocks), n_tiles // 4))
    tiles_per_split = cdiv(n_tiles, max(1, min(splits, n_tiles)))
    splits = cdiv(n_tiles, tiles_per_split)
    has_noise = noise is not None
    noise_arg = noise if has_noise else logits  # never read when HAS_NOISE is False
    noise_stride = noise.stride(0) if has_noise else 0
    num_warps = 8 if block_v >= 2048 else 4
    if splits == 1:
        k._confidence_kernel[(row_blocks, 1)](
            logits, noise_arg, logits.stride(0), noise_stride, N, V, float(temperature), tiles_per_split,
            out.token, out.prob, out.margin, out.entropy, out.prob, out.token, 1,
            HAS_NOISE=has_noise, FINAL=True, ROWS=rows, BLOCK_V=block_v, num_warps=num_warps,
        )
        return out
    part_f = torch.empty(6, N, splits, dtype=torch.float32, device=dev)  # v1, v2, s, u, best, chosen
    part_i = torch.empty(N, splits, dtype=torch.int32, device=dev)  # token
    k._confidence_kernel[(row_blocks, splits)](
        logits, noise_arg, logits.stride(0), noise_stride, N, V, float(temperature), tiles_per_split,
        out.token, out.prob, out.margin, out.entropy, part_f, part_i, splits,
        HAS_NOISE=has_noise, FINAL=False, ROWS=rows, BLOCK_V=block_v, num_warps=num_warps,
    )
    merge_partials(part_f, part_i, out)
    return out


def output_buffers(n: int, device: torch.device, out: Confidence | None = None) -> Confidence:
    """Fresh outputs for `n` rows, or `out` checked to fit (contiguous, on
    `device`, int64 token and float32 scores of shape (n,))."""
    if out is None:
        return Confidence(
            torch.empty(n, dtype=torch.int64, device=device),
            torch.empty(n, dtype=torch.float32, device=device),
            torch.empty(n, dtype=torch.float32, device=device),
            torch.empty(n, dtype=torch.float32, device=device),
        )
    for name, t, dtype in zip(Confidence._fields, out, (torch.int64,) + (torch.float32,) * 3):
        if t.shape != (n,) or t.dtype != dtype or t.device != device or not t.is_contiguous():
            raise ValueError(f"out.{name} must be a contiguous ({n},) {dtype} tensor on {device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return Confidence(*out)


def merge_partials(part_f: Tensor, part_i: Tensor, out: Confidence) -> None:
    """Merge per-chunk states (6, N, S) float32 and (N, S) int32 into `out`.

    Shared with the fused LM head, whose vocabulary chunks leave the same
    partial state.
    """
    _, N, S = part_f.shape
    rows = 128 if part_f.is_cuda else min(128, next_pow2(N))
    k = _build()
    k._merge_kernel[(cdiv(N, rows),)](
        part_f, part_i, N, S, out.token, out.prob, out.margin, out.entropy, ROWS=rows,
    )


# --------------------------------------------------------------------------
# Triton kernels. Plain functions here; kernels.dispatch decorates copies of
# them on first use (so `tl` is bound then, not at import).
#
# Per-row state, all float32 except the token (what a program hands to the
# merge kernel, and what the fused LM head keeps):
#   v1  top-1 tempered logit (also the running max the sums are relative to)
#   v2  top-2 tempered logit (-inf while fewer than two seen)
#   s   sum exp(x - v1)
#   u   sum (x - v1) exp(x - v1); entropy = log s - u / s
#   best, tok, chosen: the largest x + noise, its index, and x at that index
# An empty state is v1 = v2 = best = -inf, s = u = 0.
# --------------------------------------------------------------------------

def _confidence_kernel(
    logits_ptr, noise_ptr, stride_l, stride_z, N, V, temperature, tiles_per_split,
    token_ptr, prob_ptr, margin_ptr, entropy_ptr, part_f_ptr, part_i_ptr, S,
    HAS_NOISE: tl.constexpr, FINAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Each lane (column position inside a tile) keeps its own top-2, argmax
    # and sums over the tiles it sees, so the loop needs one cross-lane
    # reduction a tile (the row max, to keep exp in range) instead of one per
    # statistic; the lanes are combined once, after the loop. A lane sees
    # columns in increasing order and keeps the first of equal values, and
    # the final reduction takes the smallest column among equal lanes, so ties
    # go to the first index as in torch.argmax.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * ROWS + tl.arange(0, ROWS)  # (R,)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    lanes = tl.arange(0, BLOCK_V)  # (BV,)
    NEG = float("-inf")
    BIG = 2147483647

    n_tiles = tl.cdiv(V, BLOCK_V)
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    first_cols = t_begin * BLOCK_V + lanes  # (BV,)

    m = tl.full((ROWS,), NEG, tl.float32)  # running row max; the sums are relative to it
    lv1 = tl.full((ROWS, BLOCK_V), NEG, tl.float32)  # per-lane top-1 ...
    li1 = tl.zeros((ROWS, BLOCK_V), tl.int32) + first_cols[None, :]  # ... its column
    lv2 = tl.full((ROWS, BLOCK_V), NEG, tl.float32)  # per-lane top-2
    ls = tl.zeros((ROWS, BLOCK_V), tl.float32)  # per-lane sum exp(x - m)
    lu = tl.zeros((ROWS, BLOCK_V), tl.float32)  # per-lane sum (x - m) exp(x - m)
    lb = tl.full((ROWS, BLOCK_V), NEG, tl.float32)  # per-lane best x + noise ...
    lt = tl.zeros((ROWS, BLOCK_V), tl.int32) + first_cols[None, :]  # ... its column
    lc = tl.full((ROWS, BLOCK_V), NEG, tl.float32)  # ... and x there

    for t in range(t_begin, t_end):
        cols = t * BLOCK_V + lanes  # (BV,)
        col_ok = (cols < V)[None, :]  # (1, BV)
        ok = row_ok[:, None] & col_ok  # (R, BV)
        raw = tl.load(logits_ptr + rows64[:, None] * stride_l + cols[None, :], mask=ok, other=0.0)
        # Rows past N read zeros rather than -inf, so their (unstored) state
        # stays finite and the interpreter raises no NaN warnings.
        x = tl.where(col_ok, raw.to(tl.float32) / temperature, NEG)  # (R, BV)

        gt = x > lv1
        lv2 = tl.where(gt, lv1, tl.maximum(lv2, x))
        li1 = tl.where(gt, cols[None, :], li1)
        lv1 = tl.where(gt, x, lv1)

        m_new = tl.maximum(m, tl.max(x, axis=1))  # (R,)
        mref = tl.where(m_new == NEG, 0.0, m_new)  # rows of all -inf so far stay finite
        alpha = tl.exp(m - mref)[:, None]  # (R, 1), 0 while m = -inf
        shift = tl.where(m == NEG, 0.0, m - mref)[:, None]  # no -inf * 0
        lu = alpha * (lu + shift * ls)
        ls = alpha * ls
        d = x - mref[:, None]
        e = tl.exp(d)  # (R, BV), 0 where x = -inf
        ls += e
        lu += tl.where(e > 0, d, 0.0) * e
        m = m_new

        if HAS_NOISE:
            z = tl.load(noise_ptr + rows64[:, None] * stride_z + cols[None, :], mask=ok, other=0.0)
            y = tl.where(col_ok, x + z.to(tl.float32), NEG)
            gb = y > lb
            lt = tl.where(gb, cols[None, :], lt)
            lc = tl.where(gb, x, lc)
            lb = tl.where(gb, y, lb)

    # Combine the lanes. Each column lives in one lane only, so a column
    # identifies its lane.
    v1 = tl.max(lv1, axis=1)  # (R,) equals m
    tok1 = tl.min(tl.where(lv1 == v1[:, None], li1, BIG), axis=1)
    others = tl.where(li1 == tok1[:, None], NEG, lv1)
    v2 = tl.maximum(tl.max(lv2, axis=1), tl.max(others, axis=1))
    s = tl.sum(ls, axis=1)
    u = tl.sum(lu, axis=1)
    if HAS_NOISE:
        best = tl.max(lb, axis=1)
        tok = tl.min(tl.where(lb == best[:, None], lt, BIG), axis=1)
        chosen = tl.sum(tl.where(lt == tok[:, None], lc, 0.0), axis=1)
    else:
        best = v1
        tok = tok1
        chosen = v1

    if FINAL:
        inv = 1.0 / s
        tl.store(token_ptr + rows, tok.to(tl.int64), mask=row_ok)
        tl.store(prob_ptr + rows, tl.exp(chosen - m) * inv, mask=row_ok)
        tl.store(margin_ptr + rows, (1.0 - tl.exp(v2 - m)) * inv, mask=row_ok)
        tl.store(entropy_ptr + rows, tl.log(s) - u * inv, mask=row_ok)
    else:
        plane = N * S
        at = rows64 * S + pid_s
        tl.store(part_f_ptr + at, m, mask=row_ok)
        tl.store(part_f_ptr + plane + at, v2, mask=row_ok)
        tl.store(part_f_ptr + 2 * plane + at, s, mask=row_ok)
        tl.store(part_f_ptr + 3 * plane + at, u, mask=row_ok)
        tl.store(part_f_ptr + 4 * plane + at, best, mask=row_ok)
        tl.store(part_f_ptr + 5 * plane + at, chosen, mask=row_ok)
        tl.store(part_i_ptr + at, tok, mask=row_ok)


def _merge_kernel(part_f_ptr, part_i_ptr, N, S, token_ptr, prob_ptr, margin_ptr, entropy_ptr,
                  ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (R,)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    NEG = float("-inf")
    plane = N * S

    v1 = tl.full((ROWS,), NEG, tl.float32)
    v2 = tl.full((ROWS,), NEG, tl.float32)
    s = tl.zeros((ROWS,), tl.float32)
    u = tl.zeros((ROWS,), tl.float32)
    best = tl.full((ROWS,), NEG, tl.float32)
    tok = tl.zeros((ROWS,), tl.int32)
    chosen = tl.full((ROWS,), NEG, tl.float32)
    # Chunks in vocabulary order, so ties keep the first index as torch does.
    for j in range(S):
        at = rows64 * S + j
        # Rows past N load a finite dummy state (one logit of 0), never stored.
        b1 = tl.load(part_f_ptr + at, mask=row_ok, other=0.0)
        b2 = tl.load(part_f_ptr + plane + at, mask=row_ok, other=0.0)
        bs = tl.load(part_f_ptr + 2 * plane + at, mask=row_ok, other=1.0)
        bu = tl.load(part_f_ptr + 3 * plane + at, mask=row_ok, other=0.0)
        bb = tl.load(part_f_ptr + 4 * plane + at, mask=row_ok, other=0.0)
        bc = tl.load(part_f_ptr + 5 * plane + at, mask=row_ok, other=0.0)
        bt = tl.load(part_i_ptr + at, mask=row_ok, other=0)

        m = tl.maximum(v1, b1)
        mref = tl.where(m == NEG, 0.0, m)
        a_old = tl.exp(v1 - mref)
        a_new = tl.exp(b1 - mref)
        d_old = tl.where(s > 0, v1 - mref, 0.0)
        d_new = tl.where(bs > 0, b1 - mref, 0.0)
        u = a_old * (u + d_old * s) + a_new * (bu + d_new * bs)
        s = a_old * s + a_new * bs
        v2 = tl.maximum(tl.maximum(tl.minimum(v1, b1), v2), b2)
        v1 = m
        take = bb > best
        tok = tl.where(take, bt, tok)
        chosen = tl.where(take, bc, chosen)
        best = tl.where(take, bb, best)

    inv = 1.0 / s
    tl.store(token_ptr + rows, tok.to(tl.int64), mask=row_ok)
    tl.store(prob_ptr + rows, tl.exp(chosen - v1) * inv, mask=row_ok)
    tl.store(margin_ptr + rows, (1.0 - tl.exp(v2 - v1)) * inv, mask=row_ok)
    tl.store(entropy_ptr + rows, tl.log(s) - u * inv, mask=row_ok)


_build = cached_builder(globals(), ["_confidence_kernel", "_merge_kernel"])
