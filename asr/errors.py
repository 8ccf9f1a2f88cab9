"""Errors raised by the speech recognition package.

`ASRError` is the root (asr, tts and dllm keep separate roots because none may
import another; `voice` maps them all to protocol errors). Bad audio handed in
by a caller is an `AudioFormatError`, which is also a `ValueError`.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["ASRError", "ModelLoadError", "AudioFormatError", "TranscriptionError"]


class ASRError(Exception):
    """Root of every error this package raises on purpose."""


class ModelLoadError(ASRError):
    """The Whisper model is missing, incomplete or cannot be loaded.

    `path` is the model directory at fault when one is known.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class AudioFormatError(ASRError, ValueError):
    """Audio in a form we do not accept: wrong dtype, shape, sample rate or byte length."""


class TranscriptionError(ASRError):
    """The model failed while decoding an utterance."""
