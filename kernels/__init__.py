"""Triton kernels for the dLLM hot paths, each beside its PyTorch reference.

Follows SGLang and vLLM in keeping a plain torch implementation next to every
kernel and dispatching between them (kernels.dispatch): Triton on CUDA
tensors, the reference elsewhere, the interpreter on request for tests.

  confidence(logits)                 token, prob, margin, entropy per row, one pass
  lm_head_confidence(hidden, weight) the same fused into the LM head
  rms_norm(x, weight, eps)           fused RMSNorm
  apply_rope(q, k, cos, sin)         split-half RoPE on q and k in one launch

Each public op takes `backend="auto" | "torch" | "triton"`; `<op>_torch` and
`<op>_triton` are the two paths, callable directly. Importing this package
does not import triton; the kernels are built on first use.
"""
from __future__ import annotations

from kernels.confidence import Confidence, confidence, confidence_torch, confidence_triton
from kernels.dispatch import Backend, KernelError, triton_available, use_triton
from kernels.lm_head_confidence import lm_head_confidence, lm_head_confidence_torch, lm_head_confidence_triton
from kernels.rmsnorm import rms_norm, rms_norm_torch, rms_norm_triton
from kernels.rope import apply_rope, apply_rope_torch, apply_rope_triton

__all__ = [
    "Backend",
    "Confidence",
    "KernelError",
    "apply_rope",
    "apply_rope_torch",
    "apply_rope_triton",
    "confidence",
    "confidence_torch",
    "confidence_triton",
    "lm_head_confidence",
    "lm_head_confidence_torch",
    "lm_head_confidence_triton",
    "rms_norm",
    "rms_norm_torch",
    "rms_norm_triton",
    "triton_available",
    "use_triton",
]
