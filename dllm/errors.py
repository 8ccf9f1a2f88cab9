"""Errors raised by the diffusion LM package.

`DLLMError` is the root; callers catch it to report any model failure. The
import rule (nothing below `voice/` imports another sibling) means `asr` and
`tts` keep roots of their own; `voice` maps all of them to protocol errors.
"""
from __future__ import annotations


class DLLMError(Exception):
    """Root of every error this package raises on purpose."""


class CheckpointError(DLLMError):
    """A checkpoint directory or file is missing, malformed or mismatched."""


class RequestError(DLLMError, ValueError):
    """A generation request is invalid (empty, too long, bad options)."""


class EngineBusy(DLLMError):
    """The engine's request queue is full; retry later."""


class EngineClosed(DLLMError):
    """The engine was shut down."""
