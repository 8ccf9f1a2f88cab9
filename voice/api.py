"""The HTTP API's requests and responses, as pure functions (no sockets).

    POST /v1/cleanup            {"text": ...} or {"texts": [...]}  ->  cleaned text(s)
    POST /v1/chat/completions   OpenAI's chat completions: messages in, the dLLM's reply out
    GET  /v1/models             the one model this server runs
    GET  /openapi.json          `openapi()`, the description of all of the above

The chat endpoint follows OpenAI's wire format, so the official `openai`
client and the voice stacks built on it (Pipecat's and LiveKit Agents'
OpenAI LLM services) can use the dLLM through `base_url`. How a chat maps
onto a dLLM turn: the system messages are the knowledge card, the last
message (a user's) is the transcript, the earlier user/assistant pairs are
the history; `max_tokens` is the length of the reply canvas and `steps` (our
own field) the number of denoising steps K. Fields OpenAI defines that a
diffusion turn has no use for (penalties, logprobs, tools) are ignored.

Bad requests raise `ApiError` with an HTTP status and a message that says
what is accepted; the server answers them in OpenAI's error shape.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from . import protocol as P
from .errors import VoiceError

__all__ = ["ApiError", "MAX_BODY_BYTES", "MAX_CLEANUP_TEXTS", "MAX_REPLY_TOKENS", "CleanupBody", "ChatRequest",
           "parse_json_body", "parse_cleanup_body", "parse_chat", "chat_completion", "chat_chunk", "sse",
           "models", "error_body", "openapi"]

MAX_BODY_BYTES = 256 * 1024  # a knowledge card (16000 characters) and a long history fit easily
MAX_CLEANUP_TEXTS = 32  # one request's texts; the engine batches up to 16 at a time
MAX_REPLY_TOKENS = 256
MAX_MESSAGES = 64
MAX_DEADLINE_MS = 60_000
ROLES = ("system", "developer", "user", "assistant")


class ApiError(VoiceError, ValueError):
    """A bad HTTP API request: `status` (400, 413, ...) and a readable message."""

    def __init__(self, status: int, message: str, *, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, *, code: str, param: str | None = None) -> dict:
    """OpenAI's error shape, which its client turns into a typed exception."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def parse_json_body(body: bytes) -> dict:
    """A request body that must be one JSON object of at most MAX_BODY_BYTES."""
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body has {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted",
                       code="body_too_large")
    try:
        return P.loads_object(body)
    except ValueError as e:
        raise ApiError(400, f"the body must be a JSON object; this one is not: {e}", code="bad_json") from None


def _int(obj: dict, name: str, lo: int, hi: int) -> int | None:
    v = obj.get(name)
    if v is None:
        return None
    if not P.is_integer(v) or not lo <= v <= hi:
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        raise ApiError(400, f"{name!r} must be an integer from {lo} to {hi}, got {shown}", param=name)
    return int(v)


def _text(value: Any, name: str, limit: int = P.MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{name!r} must be a string", param=name)
    text = " ".join(value.split())
    if not text:
        raise ApiError(400, f"{name!r} is empty", param=name)
    if len(text) > limit:
        raise ApiError(400, f"{name!r} has {len(text)} characters; at most {limit}", param=name)
    return text


# ----- /v1/cleanup

@dataclass(frozen=True)
class CleanupBody:
    texts: tuple[str, ...]
    single: bool  # {"text"} was sent: answer {"cleaned"}, not {"results"}
    steps: int | None = None


def parse_cleanup_body(obj: dict, *, max_steps: int = P.MAX_STEPS) -> CleanupBody:
    """{"text": str} or {"texts": [str, ...]}, optional "steps" (1 to `max_steps`, the server's bound)."""
    steps = _int(obj, "steps", 1, min(max_steps, P.MAX_STEPS))
    if ("text" in obj) == ("texts" in obj):
        raise ApiError(400, 'send either "text" (a string) or "texts" (a list of strings)')
    if "text" in obj:
        return CleanupBody((_text(obj["text"], "text"),), True, steps)
    texts = obj["texts"]
    if not isinstance(texts, list) or not texts:
        raise ApiError(400, "'texts' must be a non-empty list of strings", param="texts")
    if len(texts) > MAX_CLEANUP_TEXTS:
        raise ApiError(400, f"'texts' has {len(texts)} items; at most {MAX_CLEANUP_TEXTS} per request",
                       code="too_many_texts", param="texts")
    return CleanupBody(tuple(_text(t, f"texts[{i}]") for i, t in enumerate(texts)), False, steps)


# ----- /v1/chat/completions

@dataclass(frozen=True)
class ChatRequest:
    """A chat completion request as a dLLM turn and its options."""

    transcript: str
    history: tuple[tuple[str, str], ...]
    knowledge: str | None
    stream: bool = False
    steps: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    canvas: bool = False  # ours: send each denoising step's canvas
    deadline_ms: int | None = None  # ours: end the pass by then with whole fields


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or a list of text parts (images and audio are refused)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are accepted", param="messages")
            texts.append(part["text"])
        return " ".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def parse_chat(obj: dict, *, max_steps: int = P.MAX_STEPS) -> ChatRequest:
    """Map an OpenAI chat completion request onto a dLLM turn. Raises `ApiError`.
    `max_steps` is the server's bound on `steps`."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' has {len(messages)} items; at most {MAX_MESSAGES}", param="messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []  # (role, text), system messages set aside
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}", param="messages")
        text = _content(m, i)
        if role in ("system", "developer"):
            system.append(text.strip())
        else:
            turns.append((role, " ".join(text.split())))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last non-system message must be the user's (the turn to answer)", param="messages")
    transcript = _text(turns[-1][1], "messages[-1].content")
    history: list[tuple[str, str]] = []
    for role, text in turns[:-1]:
        if role == "user":
            history.append((text, ""))
        elif history and not history[-1][1]:
            history[-1] = (history[-1][0], text)
        else:
            history.append(("", text))
    knowledge = "\n".join(s for s in system if s) or None
    if knowledge and len(knowledge) > P.MAX_KNOWLEDGE_CHARS:
        raise ApiError(400, f"the system messages have {len(knowledge)} characters; at most "
                       f"{P.MAX_KNOWLEDGE_CHARS}", param="messages")
    n = _int(obj, "n", 1, 1)
    del n  # only one choice: one canvas is one answer
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    temperature = obj.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise ApiError(400, f"'temperature' must be a number from 0 to 2, got {temperature!r}", param="temperature")
    canvas = obj.get("canvas", False)
    if not isinstance(canvas, bool):
        raise ApiError(400, "'canvas' must be true or false", param="canvas")
    max_tokens = _int(obj, "max_completion_tokens", 1, MAX_REPLY_TOKENS)
    if max_tokens is None:
        max_tokens = _int(obj, "max_tokens", 1, MAX_REPLY_TOKENS)
    return ChatRequest(transcript=transcript, history=tuple(history), knowledge=knowledge, stream=stream,
                       steps=_int(obj, "steps", 1, min(max_steps, P.MAX_STEPS)), max_tokens=max_tokens,
                       temperature=None if temperature is None else float(temperature),
                       seed=_int(obj, "seed", 0, 2**63 - 1), canvas=canvas,
                       deadline_ms=_int(obj, "deadline_ms", 1, MAX_DEADLINE_MS))


def _canvas(snap: Any) -> dict:
    return {"step": snap.step, "steps": snap.steps, "cleaned": snap.cleaned, "reply": snap.reply,
            "masked": snap.masked}


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def chat_completion(cid: str, model: str, result: Any, *, canvases: list | None = None) -> dict:
    """The non-streaming answer. `cleaned` and `steps` (and `canvases` when asked) are our extras."""
    out = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": result.reply},
                        "finish_reason": "stop"}],
           "cleaned": result.cleaned, "steps": result.steps}
    if canvases is not None:
        out["canvases"] = [_canvas(c) for c in canvases]
    return out


def chat_chunk(cid: str, model: str, created: int, *, delta: dict | None = None, finish: str | None = None,
               canvas: Any = None) -> dict:
    """One `chat.completion.chunk`; a canvas rides on a chunk with an empty delta, as an extra field."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    if canvas is not None:
        out["canvas"] = _canvas(canvas)
    return out


def reply_deltas(reply: str) -> list[str]:
    """The reply in word-sized pieces that join back to it exactly (clients show them as they come)."""
    pieces, start = [], 0
    for i in range(1, len(reply)):
        if reply[i] == " " and reply[i - 1] != " ":
            pieces.append(reply[start:i])
            start = i
    if reply:
        pieces.append(reply[start:])
    return pieces


def sse(obj: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (`[DONE]` as is)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def models(model: str) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "voice"}]}


# ----- the OpenAPI description

def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _answer(description: str, schema: dict, ctype: str = "application/json") -> dict:
    return {"description": description, "content": {ctype: {"schema": schema}}}


_ERRORS = {str(s): _answer(d, _ref("Error")) for s, d in (
    (400, "a bad body: not JSON, a missing or invalid field, too many texts, a transcript too long for the canvas"),
    (413, f"the body is over {MAX_BODY_BYTES} bytes"),
    (503, "the dLLM queue is full; retry later"),
    (504, "the model did not answer in time"))}


def openapi(version: str, model: str) -> dict:
    """The OpenAPI 3.1 description of the HTTP API."""
    string = {"type": "string"}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": list(ROLES)},
        "content": {"oneOf": [string, {"type": "array", "items": {"type": "object", "properties": {
            "type": {"const": "text"}, "text": string}}}]}}}
    canvas = {"type": "object", "properties": {
        "step": {"type": "integer"}, "steps": {"type": "integer"}, "masked": {"type": "integer"},
        "cleaned": {**string, "description": "masked positions show as ░"}, "reply": string}}
    schemas = {
        "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
            "message": string, "type": string, "code": string, "param": {"type": ["string", "null"]}}}}},
        "CleanupRequest": {"type": "object", "description": 'either "text" or "texts"', "properties": {
            "text": {**string, "maxLength": P.MAX_TEXT_CHARS},
            "texts": {"type": "array", "items": {**string, "maxLength": P.MAX_TEXT_CHARS}, "minItems": 1,
                      "maxItems": MAX_CLEANUP_TEXTS},
            "steps": {"type": "integer", "minimum": 1, "maximum": P.MAX_STEPS}}},
        "CleanupResponse": {"type": "object", "properties": {
            "text": string, "cleaned": string, "ms": {"type": "number"},
            "results": {"type": "array", "items": {"type": "object", "properties": {
                "text": string, "cleaned": string}}}}},
        "Canvas": canvas,
        "ChatRequest": {"type": "object", "required": ["messages"], "properties": {
            "model": {**string, "description": f"any name; this server runs {model}"},
            "messages": {"type": "array", "items": message, "minItems": 1, "maxItems": MAX_MESSAGES,
                         "description": "system messages: the knowledge card; the last message: the user's"},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_REPLY_TOKENS,
                           "description": "length of the reply canvas in tokens"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0},
            "seed": {"type": "integer"}, "stream": {"type": "boolean", "default": False},
            "steps": {"type": "integer", "minimum": 1, "maximum": P.MAX_STEPS,
                      "description": "denoising steps K (the server's default when left out)"},
            "canvas": {"type": "boolean", "default": False, "description": "return each step's canvas"},
            "deadline_ms": {"type": "integer", "minimum": 1, "maximum": MAX_DEADLINE_MS,
                            "description": "end the pass by then, the remaining positions filled in one step"}}},
        "ChatCompletion": {"type": "object", "properties": {
            "id": string, "object": {"const": "chat.completion"}, "created": {"type": "integer"}, "model": string,
            "choices": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "finish_reason": string,
                "message": {"type": "object", "properties": {"role": string, "content": string}}}}},
            "cleaned": string, "steps": {"type": "integer"}, "canvases": {"type": "array", "items": _ref("Canvas")}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "voice", "version": version,
                 "description": "A streaming voice assistant on a masked diffusion LM: the HTTP API. "
                                "The WebSocket routes /ws and /cleanup are described in docs/protocol.md."},
        "paths": {
            "/v1/cleanup": {"post": {
                "summary": "Clean raw transcripts (batched with concurrent requests)",
                "requestBody": _json_body(_ref("CleanupRequest")),
                "responses": {"200": _answer("the cleaned text(s)", _ref("CleanupResponse")), **_ERRORS}}},
            "/v1/chat/completions": {"post": {
                "summary": "OpenAI-compatible chat completion from one denoising pass",
                "requestBody": _json_body(_ref("ChatRequest")),
                "responses": {"200": {"description": "a chat.completion, or with stream: server-sent "
                                      "chat.completion.chunk events ending with data: [DONE]",
                                      "content": {"application/json": {"schema": _ref("ChatCompletion")},
                                                  "text/event-stream": {"schema": string}}}, **_ERRORS}}},
            "/v1/models": {"get": {"summary": "The model this server runs",
                                   "responses": {"200": _answer("a list of one model", {"type": "object"})}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _answer("ok", {"type": "object"})}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": _answer("text exposition format", string, "text/plain")}}},
        },
        "components": {"schemas": schemas},
    }
