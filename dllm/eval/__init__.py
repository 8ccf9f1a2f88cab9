"""Evaluation of the voice turn model: scoring (`dllm.eval.scoring`) and the runner (`python -m dllm.eval`)."""
from __future__ import annotations

from .scoring import accepted, normalise, reply_problem, strip_fillers, wer

__all__ = ["accepted", "normalise", "reply_problem", "strip_fillers", "wer"]
