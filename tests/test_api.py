"""The HTTP API's pure layer (`voice.api`): requests parsed and answers built, no sockets."""
from __future__ import annotations

import pytest

from voice import api as A

SYSTEM = "Pool: open 6 am to 9 pm."


def test_chat_maps_onto_a_dllm_turn():
    """System messages are the card, the last user message the transcript, earlier pairs the history."""
    req = A.parse_chat({"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "one"},
        {"role": "developer", "content": "Gym: closed Mondays."},
        {"role": "user", "content": [{"type": "text", "text": "when does the"}, {"type": "text", "text": "pool open"}]},
    ], "max_tokens": 32, "temperature": 0.5, "seed": 7, "steps": 4, "stream": True, "future": 1})
    assert req.transcript == "when does the pool open"
    assert req.history == (("hi", "Hello."), ("one", ""))
    assert req.knowledge == SYSTEM + "\nGym: closed Mondays."
    assert (req.max_tokens, req.temperature, req.seed, req.steps, req.stream) == (32, 0.5, 7, 4, True)
    assert A.parse_chat({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9}).max_tokens == 9


def test_reply_deltas_join_back_exactly():
    """The streamed pieces are word-sized and concatenate to the reply, spaces included."""
    for reply in ("", "Hi.", "It opens at  nine. Bye", " lead and trail "):
        pieces = A.reply_deltas(reply)
        assert "".join(pieces) == reply and all(pieces)
    assert A.reply_deltas("It opens at nine.") == ["It", " opens", " at", " nine."]


@pytest.mark.parametrize("obj, param", [
    ({}, "messages"), ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -1}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "canvas": 1}, "canvas"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": A.MAX_REPLY_TOKENS + 1}, "max_tokens"),
    ({"messages": [{"role": "system", "content": "x" * 20000}, {"role": "user", "content": "hi"}]}, "messages"),
])
def test_bad_chat_fields_name_the_field(obj, param):
    """Each bad field is a 400 that names it."""
    with pytest.raises(A.ApiError) as info:
        A.parse_chat(obj)
    assert info.value.status == 400 and info.value.param == param


def test_sse_and_chunks():
    """Server-sent events are `data: ...` lines; a canvas rides on a chunk with an empty delta."""
    assert A.sse("[DONE]") == b"data: [DONE]\n\n"
    chunk = A.chat_chunk("c1", "m", 5, canvas=None, delta={"content": "Hi"})
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"] == {"content": "Hi"}
    assert A.parse_json_body(b'{"a": 1}') == {"a": 1}
    with pytest.raises(A.ApiError) as info:
        A.parse_json_body(b"x" * (A.MAX_BODY_BYTES + 1))
    assert info.value.status == 413


def test_hostile_bodies_are_400s():
    """Huge integers, deep nesting and lone surrogates in a body are a 400 that says why, never another error."""
    huge = "9" * 401
    for body in (b"[" * 60_000, b'{"messages": [{"role": "user", "content": "\\ud800"}]}'):
        with pytest.raises(A.ApiError) as info:
            A.parse_json_body(body)
        assert info.value.status == 400 and info.value.code == "bad_json"
    for field in ("steps", "max_tokens", "seed"):
        with pytest.raises(A.ApiError) as info:
            A.parse_chat(A.parse_json_body(
                b'{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (field.encode(), huge.encode())))
        assert info.value.status == 400 and info.value.param == field and len(info.value.message) < 200
    with pytest.raises(A.ApiError) as info:
        A.parse_cleanup_body({"text": "hi", "steps": 17}, max_steps=16)
    assert info.value.param == "steps" and "16" in info.value.message
    assert A.parse_cleanup_body({"text": "hi", "steps": 16}, max_steps=16).steps == 16
