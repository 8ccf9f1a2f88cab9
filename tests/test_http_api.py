"""The HTTP API, the anytime canvas on /ws and the metrics, against a real server on 127.0.0.1 (port 0).

The server runs the tiny random model through the real engine (fast, and
exact: a reply from the server can be compared with the engine's own), with
no ASR or TTS: these tests are about the API, not the speech stages. The
OpenAI-compatible routes are driven by the official `openai` client.
"""
from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request

import pytest
import pytest_asyncio
from conftest import make_tiny_engine
from voice_helpers import Client

from dllm import Turn
from dllm.canvas import MASK_TEXT
from voice import api as A
from voice.server import ServerOptions, VoiceServer
from voice.services import Services

pytestmark = pytest.mark.asyncio(loop_scope="module")

SYSTEM = "Pool: open 6 am to 9 pm."


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server():
    server = VoiceServer(Services(make_tiny_engine(batch_window_ms=30.0), steps=8), ServerOptions(port=0, max_steps=64))
    await server.start()
    yield server
    await server.close()


def http(url: str, body: bytes | None = None, method: str | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


async def post(server: VoiceServer, path: str, obj) -> tuple[int, dict]:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    status, _, data = await asyncio.to_thread(http, f"http://127.0.0.1:{server.port}{path}", body)
    return status, json.loads(data)


def openai_client(server: VoiceServer):
    openai = pytest.importorskip("openai")
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


# ----- /v1/cleanup

async def test_cleanup_one_text_and_a_batch(server):
    """{"text"} gives {"cleaned"}; {"texts"} gives results in order, batched (fewer model calls than one by one)."""
    engine = server.services.engine
    status, one = await post(server, "/v1/cleanup", {"text": "um so i i think we should go"})
    assert status == 200 and one["text"] == "um so i i think we should go"
    assert one["cleaned"] == (await engine.cleanup("um so i i think we should go", steps=8)).cleaned
    texts = ["um so i i think we should go", "uh the the meeting is at noon", "so like yeah it works",
             "er can you can you send it"]
    before = engine.batches
    status, many = await post(server, "/v1/cleanup", {"texts": texts, "steps": 4})
    assert status == 200 and [r["text"] for r in many["results"]] == texts
    assert all(isinstance(r["cleaned"], str) for r in many["results"])
    assert engine.batches - before < len(texts)


async def test_cleanup_bad_bodies_get_clear_4xx(server):
    """Not JSON, a wrong shape, an empty text, too many texts and an oversized body each get a 4xx that says why."""
    cases = [(b"{not json", 400, "bad_json"), ([1, 2], 400, "bad_json"), ({}, 400, "invalid_request"),
             ({"text": "a", "texts": ["b"]}, 400, "invalid_request"), ({"text": ""}, 400, "invalid_request"),
             ({"texts": "abc"}, 400, "invalid_request"), ({"texts": ["ok", 3]}, 400, "invalid_request"),
             ({"texts": ["a"] * (A.MAX_CLEANUP_TEXTS + 1)}, 400, "too_many_texts"),
             ({"text": "a" * 3000}, 400, "invalid_request"), ({"text": "ok", "steps": 0}, 400, "invalid_request"),
             ({"text": "x" * (A.MAX_BODY_BYTES + 10)}, 413, "body_too_large")]
    for body, status, code in cases:
        got, answer = await post(server, "/v1/cleanup", body)
        assert (got, answer["error"]["code"]) == (status, code), (body if len(str(body)) < 80 else "long", answer)
        assert answer["error"]["message"]
    status, _, _ = await asyncio.to_thread(http, f"http://127.0.0.1:{server.port}/v1/cleanup")
    assert status == 405
    assert (await post(server, "/v1/cleanup", {"text": "still here"}))[0] == 200


async def test_openapi_describes_the_api(server):
    """GET /openapi.json is an OpenAPI 3.1 document with the HTTP routes and their limits."""
    status, ctype, body = await asyncio.to_thread(http, f"http://127.0.0.1:{server.port}/openapi.json")
    doc = json.loads(body)
    assert status == 200 and ctype.startswith("application/json") and doc["openapi"].startswith("3.1")
    assert {"/v1/cleanup", "/v1/chat/completions", "/v1/models"} <= set(doc["paths"])
    texts = doc["components"]["schemas"]["CleanupRequest"]["properties"]["texts"]
    assert texts["maxItems"] == A.MAX_CLEANUP_TEXTS


# ----- OpenAI-compatible chat, through the official client

async def test_openai_client_chat_completion(server):
    """The openai client gets the engine's own reply to one turn (system: card, pairs: history, max_tokens: canvas)."""
    client = openai_client(server)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "um when does the pool open"}]
    out = await client.chat.completions.create(model="anything", messages=messages, max_tokens=24, temperature=0,
                                               seed=3, extra_body={"steps": 4})
    want = await server.services.engine.respond(Turn("um when does the pool open", history=(("hi", "Hello."),),
                                                     knowledge=SYSTEM), steps=4, reply_tokens=24)
    assert out.object == "chat.completion" and out.model == server.model
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == want.reply
    assert out.model_extra["cleaned"] == want.cleaned and out.model_extra["steps"] == 4
    models = await client.models.list()
    assert [m.id for m in models.data] == [server.model]
    await client.close()


async def test_openai_client_streaming(server):
    """stream=True: a role chunk, deltas that join to the non-streamed reply, a stop chunk; canvases when asked."""
    client = openai_client(server)
    messages = [{"role": "user", "content": "what can you do"}]
    whole = await client.chat.completions.create(model="x", messages=messages, extra_body={"steps": 8})
    stream = await client.chat.completions.create(model="x", messages=messages, stream=True,
                                                  extra_body={"steps": 8, "canvas": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    canvases = [c.model_extra["canvas"] for c in chunks if (c.model_extra or {}).get("canvas")]
    assert [c["step"] for c in canvases] == list(range(1, 9))
    assert canvases[-1]["reply"] == whole.choices[0].message.content and canvases[-1]["masked"] == 0
    await client.close()


async def test_a_client_that_leaves_a_stream_early(server):
    """A streaming client gone after the first chunk leaves no request behind; the next chat is answered."""
    engine = server.services.engine
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    body = json.dumps({"stream": True, "steps": 64, "canvas": True,
                       "messages": [{"role": "user", "content": "a long pass"}]}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    assert b"200" in await asyncio.wait_for(reader.readline(), 30)
    await asyncio.wait_for(reader.readuntil(b"data: "), 30)
    writer.transport.abort()
    for _ in range(100):  # the request's task is cancelled or done, not left running
        if not [t for t in asyncio.all_tasks() if t.get_name().startswith("chat-")]:
            break
        await asyncio.sleep(0.05)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("chat-")]
    assert engine.waiting == 0
    status, out = await post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"


async def test_chat_canvas_and_deadline_without_streaming(server):
    """canvas: true returns every step's canvas; a 1 ms deadline still returns whole fields, in fewer steps."""
    body = {"messages": [{"role": "user", "content": "tell me a joke"}], "steps": 16, "canvas": True}
    status, out = await post(server, "/v1/chat/completions", body)
    assert status == 200 and len(out["canvases"]) == 16
    assert out["canvases"][-1]["reply"] == out["choices"][0]["message"]["content"]
    status, out = await post(server, "/v1/chat/completions", {**body, "deadline_ms": 1})
    assert status == 200 and len(out["canvases"]) <= 2 and out["canvases"][-1]["masked"] == 0
    assert MASK_TEXT not in out["choices"][0]["message"]["content"] + out["cleaned"]


async def test_chat_bad_requests(server):
    """Bad chat requests get 400 in OpenAI's error shape, which the openai client raises as BadRequestError."""
    openai = pytest.importorskip("openai")
    client = openai_client(server)
    bad = [[], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
           [{"role": "wizard", "content": "hi"}], [{"role": "user", "content": [{"type": "image_url"}]}],
           [{"role": "system", "content": "only a card"}]]
    for messages in bad:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="x", messages=messages)
    for extra in ({"max_tokens": 10_000}, {"temperature": 5}, {"n": 2}, {"steps": 0}, {"deadline_ms": -1}):
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                 **({} if "steps" in extra or "deadline_ms" in extra else extra),
                                                 extra_body=extra if "steps" in extra or "deadline_ms" in extra
                                                 else None)
        assert next(iter(extra)) in str(e.value)
    with pytest.raises(openai.BadRequestError):  # too long for the model's canvas: the engine's own check
        await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "word " * 390}],
                                             stream=True)
    await client.close()


# ----- the anytime canvas on /ws, and the metrics

async def test_ws_session_canvas_events(server):
    """canvas: true gives K turn.canvas events a turn, masks shrinking, the last equal to turn.cleaned, turn.reply."""
    client = await Client.open(server.url + "/ws", canvas=True, steps=8)
    await client.until("session.ready", 20)
    await client.send_json(type="text", text="um what time is it")
    await client.until("turn.done", 60)
    await client.close()
    canvases = client.of("turn.canvas")
    assert [c["step"] for c in canvases] == list(range(1, 9)) and all(c["turn_id"] == 1 for c in canvases)
    assert canvases[0]["masked"] > canvases[-1]["masked"] == 0 and MASK_TEXT in canvases[0]["reply"]
    types = client.types()
    assert types.index("turn.canvas") < types.index("turn.cleaned")
    assert canvases[-1]["cleaned"] == client.of("turn.cleaned")[0]["text"]
    assert canvases[-1]["reply"] == client.of("turn.reply")[0]["text"]


async def test_ws_session_deadline(server):
    """deadline_ms shorter than the pass: the turn ends early and its fields hold no masks."""
    client = await Client.open(server.url + "/ws", canvas=True, steps=32, deadline_ms=1)
    await client.until("session.ready", 20)
    await client.send_json(type="text", text="um what time is it")
    await client.until("turn.done", 60)
    await client.send_json(type="session.start", sample_rate=16000, deadline_ms=0)  # refused, and the session goes on
    assert (await client.until("error"))["code"] == "already_started"
    await client.close()
    canvases = client.of("turn.canvas")
    assert 1 <= len(canvases) <= 2 and canvases[-1]["masked"] == 0
    assert MASK_TEXT not in client.of("turn.reply")[0]["text"] + client.of("turn.cleaned")[0]["text"]


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text format (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    m = re.search(r"^" + pattern + r"$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_metrics_move_after_a_turn(server):
    """GET /metrics (Prometheus text): a typed turn, a bad frame and an HTTP call move their counters."""
    url = f"http://127.0.0.1:{server.port}/metrics"
    status, ctype, body = await asyncio.to_thread(http, url)
    assert status == 200 and ctype.startswith("text/plain")
    before = body.decode()
    client = await Client.open(server.url + "/ws")
    await client.until("session.ready", 20)
    await client.ws.send("{not json")
    await client.until("error")
    await client.send_json(type="text", text="hello there")
    await client.until("turn.done", 60)
    await post(server, "/v1/cleanup", {"text": "um hi"})
    _, _, body = await asyncio.to_thread(http, url)
    after = body.decode()
    await client.close()
    moved = {
        ("voice_turns_total", (("outcome", "done"),)): 1,
        ("voice_stage_seconds_count", (("stage", "dllm"),)): 2,
        ("voice_errors_total", (("code", "bad_json"),)): 1,
        ("voice_sessions_opened_total", ()): 1,
        ("voice_http_requests_total", (("route", "cleanup"), ("status", "200"))): 1,
        ("dllm_batch_size_count", ()): 2,
    }
    for (name, labels), at_least in moved.items():
        delta = metric(after, name, **dict(labels)) - metric(before, name, **dict(labels))
        assert delta >= at_least, (name, labels, delta)
    assert metric(after, "dllm_steps_total") - metric(before, "dllm_steps_total") >= 16
    assert metric(after, "voice_sessions") == 1
    assert 'voice_queue_depth{queue="turn"}' in after and 'voice_queue_depth{queue="dllm"}' in after


async def test_a_stream_sends_the_settled_first_sentence_before_the_pass_ends(base_engine):
    """With the shipped adapter, a streamed reply's first sentence comes in deltas before the last canvas:
    a voice stack behind this endpoint can speak it while the pass goes on. The deltas still join to
    exactly the reply the non-streamed request returns."""
    server = VoiceServer(Services(base_engine, steps=8), ServerOptions(port=0))
    await server.start()
    try:
        client = openai_client(server)
        messages = [{"role": "user", "content": "hi there"}]
        whole = await client.chat.completions.create(model="x", messages=messages)
        stream = await client.chat.completions.create(model="x", messages=messages, stream=True,
                                                      extra_body={"canvas": True})
        chunks = [c async for c in stream]
        await client.close()
    finally:
        await server.close()
    reply = whole.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply
    steps = [(c.model_extra or {}).get("canvas", {}).get("step") for c in chunks]
    first_text = next(i for i, c in enumerate(chunks) if c.choices[0].delta.content)
    assert first_text < steps.index(8), f"the first words came after the last step: {reply!r}"
