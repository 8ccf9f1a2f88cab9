"""The wire protocol of `/ws` (voice sessions) and `/cleanup`, as pure functions.

Nothing here touches a socket: `parse_frame` turns one received WebSocket
frame into a message dataclass or raises `ProtocolError` with an error code;
each server event is a frozen record too (`ServerEvent`), whose `to_json` is
the text the server sends, and a function of the event's name builds and
serialises one (`turn_done(...)` is `TurnDone(...).to_json()`).
The server (`voice.server`) is a thin shell around these, in the manner of
websockets' own I/O-free protocol core. `docs/protocol.md` is the reference
for client authors.

/ws, client to server:
    {"type": "session.start", "sample_rate": 16000}  first; optional fields
        "knowledge" (a facts card), "steps" (denoising steps K),
        "output_sample_rate" (rate of the reply PCM), "canvas" (send each
        denoising step's canvas as turn.canvas), "deadline_ms" (end the
        dLLM pass by then)
    binary frames: 16-bit little-endian mono PCM at `sample_rate`
    {"type": "input.end"}         end the utterance now (forced endpoint)
    {"type": "text", "text": ...} a typed turn
    {"type": "interrupt"}         stop the reply (a stop button)

/ws, server to client: text frames session.ready, vad.speech_started,
vad.speech_stopped, transcript.partial, transcript.final, turn.cleaned,
turn.canvas, turn.reply, audio.start, audio.end, audio.flush, turn.interrupted, turn.done,
error; binary frames of reply PCM (16-bit LE mono at output_sample_rate).

/cleanup: {"id": ..., "text": "..."} in, {"id": ..., "cleaned": "..."} out.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import KW_ONLY, dataclass
from collections.abc import Callable
from typing import Any, ClassVar, Union

from .errors import ErrorCode, ProtocolError, as_voice_error

__all__ = [
    "PROTOCOL_VERSION", "INPUT_SAMPLE_RATES", "OUTPUT_SAMPLE_RATES", "MAX_AUDIO_FRAME_BYTES",
    "MAX_TEXT_FRAME_BYTES", "MAX_MESSAGE_BYTES", "MAX_TEXT_CHARS", "MAX_KNOWLEDGE_CHARS", "MAX_STEPS",
    "ErrorCode", "SessionStart", "Audio", "InputEnd", "TextTurn", "Interrupt", "ClientMessage",
    "CleanupRequest", "parse_frame", "parse_json", "parse_cleanup", "loads_object", "is_integer", "parse_server_event",
    "build", "ServerEvent", "SessionReady", "SpeechStarted", "SpeechStopped", "TranscriptPartial",
    "TranscriptFinal", "TurnCleaned", "TurnCanvas", "TurnReply", "AudioStart", "AudioEnd", "AudioFlush",
    "TurnInterrupted", "TurnDone", "Error", "CleanupResult", "CleanupError",
    "session_ready", "speech_started", "speech_stopped", "transcript_partial", "transcript_final",
    "turn_cleaned", "turn_canvas", "turn_reply", "audio_start", "audio_end", "audio_flush", "turn_interrupted",
    "turn_done", "error", "cleanup_result", "cleanup_error", "error_code_for",
]

PROTOCOL_VERSION = 1
INPUT_SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
OUTPUT_SAMPLE_RATES = INPUT_SAMPLE_RATES
# 64 KiB is 2 s of 16 kHz audio; clients send 20-100 ms frames. Larger audio
# frames get an error event and are dropped.
MAX_AUDIO_FRAME_BYTES = 64 * 1024
MAX_TEXT_FRAME_BYTES = 64 * 1024  # a session.start with a knowledge card is the largest text frame
# Past this the WebSocket layer itself closes the connection (code 1009).
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_TEXT_CHARS = 2000  # the dLLM turn's own limit on a transcript
MAX_KNOWLEDGE_CHARS = 16000  # the turn keeps the first 384 tokens anyway
MAX_STEPS = 64
MAX_DEADLINE_MS = 60_000
MAX_ID_CHARS = 200


# ----- client messages

@dataclass(frozen=True)
class SessionStart:
    """Opens a voice session. `sample_rate` is the rate of the PCM the client sends."""

    sample_rate: int = 16000
    knowledge: str | None = None
    steps: int | None = None  # None: the server's default
    output_sample_rate: int | None = None  # None: the voice's own rate
    canvas: bool = False  # send turn.canvas events: each denoising step's draft
    deadline_ms: int | None = None  # end each dLLM pass within this long, with whole fields


@dataclass(frozen=True)
class Audio:
    """A frame of 16-bit LE mono PCM at the session's input rate."""

    pcm: bytes


@dataclass(frozen=True)
class InputEnd:
    """The client says the utterance is over: endpoint now."""


@dataclass(frozen=True)
class TextTurn:
    """A typed turn: skips VAD and ASR."""

    text: str


@dataclass(frozen=True)
class Interrupt:
    """Stop the current reply, as a barge-in would."""


ClientMessage = Union[SessionStart, Audio, InputEnd, TextTurn, Interrupt]


@dataclass(frozen=True)
class CleanupRequest:
    id: Any  # echoed back as given: a string, a number or null
    text: str


def loads_object(data: str | bytes) -> dict:
    """Decode one JSON object from a client (a frame or an HTTP body): the one decoder every route uses.

    Raises ValueError with a readable reason for text that does not parse, nesting
    too deep for the parser, a value that is not an object, and strings holding a
    lone surrogate (`"\\ud800"` is valid JSON but no valid text: it could not be
    tokenized, logged or sent back).
    """
    try:
        obj = json.loads(data)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"it did not parse: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"it is a JSON {type(obj).__name__}, not an object")
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("it holds a string with a lone surrogate (not valid Unicode)") from None
    except RecursionError:  # an object nested just below the parser's limit
        raise ValueError("it is nested too deeply") from None
    return obj


def parse_json(data: str | bytes) -> dict:
    """Decode a text frame that must hold a JSON object.

    Raises `ProtocolError` (bad_json, frame_too_large).
    """
    if len(data) > MAX_TEXT_FRAME_BYTES:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                            f"text frame of {len(data)} bytes; at most {MAX_TEXT_FRAME_BYTES} are accepted")
    try:
        return loads_object(data)
    except ValueError as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"text frames must be JSON objects; this one is not: {e}") from None


def is_integer(v: Any) -> bool:
    """A JSON integer: an int (not a bool), or a float with no fraction. Huge values are integers too."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or isinstance(v, float) and math.isfinite(v) and v == int(v)


def _int_field(obj: dict, name: str) -> int | None:
    v = obj.get(name)
    if v is None:
        return None
    if not is_integer(v):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{name!r} must be an integer, got {_short(v)}")
    return int(v)


def _short(v: Any) -> str:
    """A client's value for an error message: its repr, cut short (a 401-digit number stays readable)."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _rate(obj: dict, name: str, accepted: tuple[int, ...], default: int | None) -> int | None:
    try:
        rate = _int_field(obj, name)
    except ProtocolError as e:
        raise ProtocolError(ErrorCode.BAD_SAMPLE_RATE, f"{e.message}; accepted rates: {list(accepted)}") from None
    if rate is None:
        return default
    if rate not in accepted:
        raise ProtocolError(ErrorCode.BAD_SAMPLE_RATE,
                            f"{name} {_short(rate)} Hz is not supported; accepted rates: {list(accepted)}")
    return rate


def _session_start(obj: dict, max_steps: int) -> SessionStart:
    if obj.get("sample_rate") is None:
        raise ProtocolError(ErrorCode.BAD_SAMPLE_RATE,
                            f"session.start needs 'sample_rate', one of {list(INPUT_SAMPLE_RATES)}")
    rate = _rate(obj, "sample_rate", INPUT_SAMPLE_RATES, None)
    out_rate = _rate(obj, "output_sample_rate", OUTPUT_SAMPLE_RATES, None)
    knowledge = obj.get("knowledge")
    if knowledge is not None:
        if not isinstance(knowledge, str):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "'knowledge' must be a string (the facts card)")
        if len(knowledge) > MAX_KNOWLEDGE_CHARS:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"'knowledge' has {len(knowledge)} characters; at most {MAX_KNOWLEDGE_CHARS}")
        knowledge = knowledge.strip() or None
    steps = _int_field(obj, "steps")
    if steps is not None and not 1 <= steps <= max_steps:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"'steps' must be between 1 and {max_steps} on this server, "
                            f"got {_short(steps)}")
    canvas = obj.get("canvas", False)
    if not isinstance(canvas, bool):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'canvas' must be true or false")
    deadline = _int_field(obj, "deadline_ms")
    if deadline is not None and not 1 <= deadline <= MAX_DEADLINE_MS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"'deadline_ms' must be between 1 and {MAX_DEADLINE_MS}, got {_short(deadline)}")
    return SessionStart(sample_rate=rate, knowledge=knowledge, steps=steps, output_sample_rate=out_rate,
                        canvas=canvas, deadline_ms=deadline)


def _text(obj: dict, name: str = "text") -> str:
    text = obj.get(name)
    if not isinstance(text, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{name!r} must be a string")
    text = " ".join(text.split())
    if not text:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{name!r} is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{name!r} has {len(text)} characters; at most {MAX_TEXT_CHARS}")
    return text


_CLIENT_TYPES = ("session.start", "input.end", "text", "interrupt")
_START_HINT = '{"type": "session.start", "sample_rate": N}'


def parse_frame(data: str | bytes, *, started: bool, max_steps: int = MAX_STEPS) -> ClientMessage:
    """Parse one frame a `/ws` client sent.

    `data` is a str for a text frame and bytes for a binary one (as websockets
    delivers them); `started` says whether session.start was accepted already;
    `max_steps` is the server's bound on a session's `steps` (at most `MAX_STEPS`).

    Raises `ProtocolError` with the code to report; the frame is then dropped
    and the session carries on.

    >>> parse_frame('{"type": "session.start", "sample_rate": 48000}', started=False)
    SessionStart(sample_rate=48000, knowledge=None, steps=None, output_sample_rate=None)
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if not started:
            raise ProtocolError(ErrorCode.NOT_STARTED, f"audio before session.start; send {_START_HINT} first")
        n = len(data)
        if n > MAX_AUDIO_FRAME_BYTES:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                                f"audio frame of {n} bytes; at most {MAX_AUDIO_FRAME_BYTES} are accepted "
                                "(send 20-100 ms frames)")
        if n % 2:
            raise ProtocolError(ErrorCode.BAD_AUDIO,
                                f"audio frame of {n} bytes: 16-bit PCM needs an even number of bytes; frame dropped")
        return Audio(bytes(data))
    obj = parse_json(data)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "every message needs a string 'type'")
    if kind not in _CLIENT_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE,
                            f"unknown message type {kind[:40]!r}; expected one of {list(_CLIENT_TYPES)}")
    if kind == "session.start":
        if started:
            raise ProtocolError(ErrorCode.ALREADY_STARTED, "session.start was already accepted; ignored")
        return _session_start(obj, min(max_steps, MAX_STEPS))
    if not started:
        raise ProtocolError(ErrorCode.NOT_STARTED, f"{kind!r} before session.start; send {_START_HINT} first")
    if kind == "input.end":
        return InputEnd()
    if kind == "interrupt":
        return Interrupt()
    return TextTurn(_text(obj))


def parse_cleanup(data: str | bytes) -> CleanupRequest:
    """Parse one `/cleanup` request. Raises `ProtocolError`, whose `request_id` is the
    request's "id" when the frame was a JSON object with a valid one (echo it back)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "/cleanup takes text frames of JSON, not binary frames")
    obj = parse_json(data)
    rid = obj.get("id")
    if not (rid is None or isinstance(rid, float) and math.isfinite(rid) or isinstance(rid, int)
            and not isinstance(rid, bool) and len(str(rid)) <= MAX_ID_CHARS
            or isinstance(rid, str) and len(rid) <= MAX_ID_CHARS):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"'id' must be a string (up to {MAX_ID_CHARS} characters), "
                            f"a number (up to {MAX_ID_CHARS} digits) or null")
    try:
        return CleanupRequest(rid, _text(obj))
    except ProtocolError as e:
        e.request_id = rid
        raise


def parse_server_event(data: str) -> dict:
    """Decode a server text frame (for clients and tests). Raises ValueError."""
    obj = json.loads(data)
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ValueError(f"not a server event: {data[:80]!r}")
    return obj


# ----- server events
#
# Each event is a small frozen record; `to_json` is its one serialisation. The
# functions below build and serialise one in a call, for the session's emit sites.

def build(kind: str, **fields: Any) -> str:
    """One server event as compact JSON; fields that are None are left out."""
    return _dumps({"type": kind, **{k: v for k, v in fields.items() if v is not None}})


def _dumps(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(float(x), 1)


@dataclass(frozen=True)
class ServerEvent:
    """A text frame the server sends. A subclass names its `type` and declares its
    fields in wire order; `to_json` writes them after "type", leaving out those that
    are None, except the ones in `nullable`, which the protocol sends as null."""

    type: ClassVar[str]
    nullable: ClassVar[frozenset[str]] = frozenset()

    def fields(self) -> dict[str, Any]:
        """The wire fields after "type", in order; overridden where a value is shaped on the way out."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return _dumps({"type": self.type,
                       **{k: v for k, v in self.fields().items() if v is not None or k in self.nullable}})


@dataclass(frozen=True)
class _TurnEvent(ServerEvent):
    """An event that names its turn and nothing more."""

    turn_id: int


@dataclass(frozen=True)
class _TurnText(ServerEvent):
    """A turn's text: its transcript, cleaned transcript or reply."""

    turn_id: int
    text: str


@dataclass(frozen=True)
class SessionReady(ServerEvent):
    type = "session.ready"
    session_id: str
    _: KW_ONLY
    protocol: int = PROTOCOL_VERSION
    input_sample_rate: int
    output_sample_rate: int
    steps: int


@dataclass(frozen=True)
class SpeechStarted(ServerEvent):
    type = "vad.speech_started"
    t_ms: int


@dataclass(frozen=True)
class SpeechStopped(ServerEvent):
    """`discarded`: too little speech to be words (a cough); no transcript follows. Sent only when true."""

    type = "vad.speech_stopped"
    t_ms: int
    _: KW_ONLY
    discarded: bool = False

    def fields(self) -> dict[str, Any]:
        return {"t_ms": self.t_ms, "discarded": self.discarded or None}


@dataclass(frozen=True)
class TranscriptPartial(ServerEvent):
    type = "transcript.partial"
    text: str


@dataclass(frozen=True)
class TranscriptFinal(_TurnText):
    type = "transcript.final"


@dataclass(frozen=True)
class TurnCleaned(_TurnText):
    type = "turn.cleaned"


@dataclass(frozen=True)
class TurnCanvas(ServerEvent):
    """A draft: the canvas after `step` of `steps` denoising steps; masked positions show as `░`."""

    type = "turn.canvas"
    turn_id: int
    _: KW_ONLY
    step: int
    steps: int
    cleaned: str
    reply: str
    masked: int


@dataclass(frozen=True)
class TurnReply(_TurnText):
    type = "turn.reply"


@dataclass(frozen=True)
class AudioStart(ServerEvent):
    type = "audio.start"
    turn_id: int
    sample_rate: int
    encoding: str = "pcm_s16le"
    channels: int = 1


@dataclass(frozen=True)
class AudioEnd(_TurnEvent):
    type = "audio.end"


@dataclass(frozen=True)
class AudioFlush(_TurnEvent):
    """Drop every queued sample of this turn's reply and stop playing it now."""

    type = "audio.flush"


@dataclass(frozen=True)
class TurnInterrupted(ServerEvent):
    """The turn was cut short; `heard` is the part of the reply kept in the history."""

    type = "turn.interrupted"
    turn_id: int
    _: KW_ONLY
    reason: str
    heard: str


@dataclass(frozen=True)
class TurnDone(ServerEvent):
    """`timings` per stage in ms (0.1 ms); `voice_to_voice_ms` is null for typed turns and silent replies."""

    type = "turn.done"
    nullable = frozenset({"voice_to_voice_ms"})
    turn_id: int
    _: KW_ONLY
    timings: dict[str, float | None]
    voice_to_voice_ms: float | None

    def fields(self) -> dict[str, Any]:
        return {"turn_id": self.turn_id, "timings": {k: _ms(v) for k, v in self.timings.items()},
                "voice_to_voice_ms": _ms(self.voice_to_voice_ms)}


@dataclass(frozen=True)
class Error(ServerEvent):
    """A `/ws` error; `turn_id` names the turn it ended, if any."""

    type = "error"
    code: str
    message: str
    _: KW_ONLY
    turn_id: int | None = None


@dataclass(frozen=True)
class CleanupResult(ServerEvent):
    type = "cleanup.result"
    nullable = frozenset({"id"})
    id: Any  # the request's id, as given
    text: str
    cleaned: str
    _: KW_ONLY
    ms: float

    def fields(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "cleaned": self.cleaned, "ms": _ms(self.ms)}


@dataclass(frozen=True)
class CleanupError(ServerEvent):
    """A `/cleanup` error; `id` is the request's, or null when the frame had none."""

    type = "error"
    nullable = frozenset({"id"})
    id: Any
    code: str
    message: str


def _builder(record: type[ServerEvent]) -> Callable[..., str]:
    """A function that takes `record`'s arguments and returns its wire text."""
    def build_event(*args: Any, **kwargs: Any) -> str:
        return record(*args, **kwargs).to_json()
    build_event.__doc__ = record.__doc__
    build_event.__wrapped__ = record  # inspect.signature shows the record's arguments
    return build_event


# What the session's emit sites call: `turn_done(...)` is `TurnDone(...).to_json()`.
session_ready = _builder(SessionReady)
speech_started = _builder(SpeechStarted)
speech_stopped = _builder(SpeechStopped)
transcript_partial = _builder(TranscriptPartial)
transcript_final = _builder(TranscriptFinal)
turn_cleaned = _builder(TurnCleaned)
turn_canvas = _builder(TurnCanvas)
turn_reply = _builder(TurnReply)
audio_start = _builder(AudioStart)
audio_end = _builder(AudioEnd)
audio_flush = _builder(AudioFlush)
turn_interrupted = _builder(TurnInterrupted)
turn_done = _builder(TurnDone)
error = _builder(Error)
cleanup_result = _builder(CleanupResult)
cleanup_error = _builder(CleanupError)


def error_code_for(exc: BaseException) -> str:
    """The protocol error code a client is told for `exc` (see `voice.errors.as_voice_error`)."""
    return as_voice_error(exc).code
