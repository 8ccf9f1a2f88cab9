"""Errors raised by the speech synthesis package.

`TTSError` is the root (asr, tts and dllm keep separate roots because none may
import another; `voice` maps them all to protocol errors).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["TTSError", "VoiceLoadError", "SynthesisError"]


class TTSError(Exception):
    """Root of every error this package raises on purpose."""


class VoiceLoadError(TTSError):
    """A voice model or its config is missing, unreadable or not a piper voice.

    `path` is the file at fault when one is known.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class SynthesisError(TTSError):
    """Piper failed while speaking a sentence; `sentence` is the text it was given."""

    def __init__(self, message: str, sentence: str) -> None:
        super().__init__(message)
        self.sentence = sentence
