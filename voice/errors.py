"""Errors raised by the voice package.

`VoiceError` is the root. A `ProtocolError` is a client's bad message on the
wire; it carries the protocol's error `code` (see `voice.protocol.ErrorCode`)
so the server can answer with an `error` event and carry on. The model
packages keep roots of their own (`dllm.DLLMError`, `asr.ASRError`,
`tts.TTSError`); `voice.protocol.error_code_for` maps them to codes.
"""
from __future__ import annotations

from typing import Any

__all__ = ["VoiceError", "ProtocolError", "DeviceError", "ServiceLoadError"]


class VoiceError(Exception):
    """Root of every error this package raises on purpose."""


class ProtocolError(VoiceError, ValueError):
    """A client message that breaks the wire protocol.

    `code` is one of `voice.protocol.ErrorCode`; `fatal` says whether the
    connection must close after the error event (the session cannot go on);
    `request_id` is the id of the `/cleanup` request it answers, when known.
    """

    def __init__(self, code: str, message: str, *, fatal: bool = False, request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class DeviceError(VoiceError):
    """No usable local audio device (the kiosk needs a microphone and a speaker)."""


class ServiceLoadError(VoiceError):
    """A model the server or kiosk needs could not be loaded; `stage` names which."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"cannot load the {stage} model: {message}")
        self.stage = stage
