"""Errors raised by the voice package, each carrying the protocol code a client is told.

`VoiceError` is the root. Every failure a client hears of has a subclass whose
`code` is its `error` event's code (`ErrorCode`) and whose `status` is the HTTP
status the API answers with; the server and the session pick neither from
class names nor from messages, only from these fields.

The model packages keep roots of their own (`dllm.DLLMError`, `asr.ASRError`,
`tts.TTSError`: none of them may import `voice`). `as_voice_error` is the one
place that maps their errors, and anything unexpected, to a subclass here.

    err = as_voice_error(exc)         # RecognitionFailed for an asr.TranscriptionError
    send(P.error(err.code, err.message))
"""
from __future__ import annotations

import functools
from typing import Any

__all__ = [
    "ErrorCode", "VoiceError", "ProtocolError", "DeviceError", "ServiceLoadError", "Busy", "TurnRefused",
    "TurnFailed", "TurnTimedOut", "RecognitionFailed", "NoRecognizer", "SynthesisFailed", "InternalError",
    "as_voice_error",
]


class ErrorCode:
    """The `code` of an `error` event. Errors are not fatal unless the server closes."""

    BAD_JSON = "bad_json"  # a text frame that is not a JSON object
    BAD_MESSAGE = "bad_message"  # a known type with missing or invalid fields
    UNKNOWN_TYPE = "unknown_type"
    NOT_STARTED = "not_started"  # anything but session.start before session.start
    ALREADY_STARTED = "already_started"
    BAD_SAMPLE_RATE = "bad_sample_rate"
    BAD_AUDIO = "bad_audio"  # odd-length PCM (a sample split in two)
    FRAME_TOO_LARGE = "frame_too_large"
    NO_SPEECH = "no_speech"  # input.end with nothing said
    BAD_TURN = "bad_turn"  # the model refused the turn (too long, empty)
    BUSY = "busy"  # too many sessions or requests; retry later
    ASR_FAILED = "asr_failed"
    LLM_FAILED = "llm_failed"
    TTS_FAILED = "tts_failed"
    IDLE = "idle_timeout"  # no message, or no turn, for too long: the server closes (1008)
    TOO_FAST = "too_fast"  # audio sent faster than real time; frames dropped until the client slows down
    FORBIDDEN = "forbidden"  # an Origin or Host the server does not allow (HTTP 403)
    UNAUTHORIZED = "unauthorized"  # a missing or wrong token (HTTP 401)
    INTERNAL = "internal"


class VoiceError(Exception):
    """Root of every error this package raises on purpose.

    `code` (an `ErrorCode`) and `status` (HTTP) say how a client is told of it;
    `message` is the text it is told.
    """

    code: str = ErrorCode.INTERNAL
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProtocolError(VoiceError, ValueError):
    """A client message that breaks the wire protocol.

    `code` is one of `ErrorCode`; `fatal` says whether the connection must
    close after the error event (the session cannot go on); `request_id` is
    the id of the `/cleanup` request it answers, when known.
    """

    status = 400

    def __init__(self, code: str, message: str, *, fatal: bool = False, request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
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


# ----- a turn's or a request's failures, as the client hears of them

class Busy(VoiceError):
    """Too many requests are waiting for the model; retry later."""

    code = ErrorCode.BUSY
    status = 503


class TurnRefused(VoiceError):
    """The model will not take this turn as given (empty, too long, bad options)."""

    code = ErrorCode.BAD_TURN
    status = 400


class TurnFailed(VoiceError):
    """The diffusion LM failed on a turn or a cleanup request."""

    code = ErrorCode.LLM_FAILED


class TurnTimedOut(TurnFailed):
    """The diffusion LM did not answer in time."""

    status = 504


class RecognitionFailed(VoiceError):
    """Speech recognition failed on an utterance."""

    code = ErrorCode.ASR_FAILED


class NoRecognizer(RecognitionFailed):
    """Speech reached a server that has no speech recognizer loaded."""

    def __init__(self, message: str = "this server has no speech recognizer loaded; send typed turns") -> None:
        super().__init__(message)


class SynthesisFailed(VoiceError):
    """Speech synthesis failed on a reply."""

    code = ErrorCode.TTS_FAILED


class InternalError(VoiceError):
    """A bug: the client is told only the exception's type; the log has the traceback."""

    @classmethod
    def of(cls, exc: BaseException) -> InternalError:
        return cls(f"internal error ({type(exc).__name__})")


@functools.cache
def _model_errors() -> tuple[tuple[type[BaseException], type[VoiceError]], ...]:
    """The model packages' errors and what each is here, most specific first. Imported on
    first use: an exception of theirs means the package is loaded already."""
    from asr.errors import ASRError
    from dllm.errors import DLLMError, EngineBusy, RequestError
    from tts.errors import TTSError
    return ((EngineBusy, Busy), (RequestError, TurnRefused), (DLLMError, TurnFailed),
            (ASRError, RecognitionFailed), (TTSError, SynthesisFailed))


def as_voice_error(exc: BaseException) -> VoiceError:
    """The error a client is told of for `exc`: a `VoiceError` as it is; a model
    package's error as the subclass for its failure, with its message, caused by
    it; anything else as an `InternalError` that names only its type."""
    if isinstance(exc, VoiceError):
        return exc
    for theirs, ours in _model_errors():
        if isinstance(exc, theirs):
            err = ours(str(exc))
            break
    else:
        err = InternalError.of(exc)
    err.__cause__ = exc
    return err
