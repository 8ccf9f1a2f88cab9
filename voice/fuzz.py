"""A seeded fuzzer for the WebSocket routes: hostile frames into /ws and /cleanup.

    python -m voice.fuzz                                  # 10,000 messages, a server in this process
    python -m voice.fuzz --messages 20000 --seed 3
    python -m voice.fuzz --url ws://127.0.0.1:8765        # a running server (its log is not seen)

Frames are drawn by hypothesis (seeded, so a run repeats): random bytes and
text, random JSON, the protocol's messages with wrong types, huge integers,
deep nesting, lone surrogates, oversized frames, and messages in the wrong
order (before or after session.start). Each connection sends a handful of
them and then a sentinel that must be answered; what the server sends back is
checked:

- every text frame is a JSON event with a `type`, and no error is `internal`;
- the sentinel is answered, or the connection was closed cleanly with a
  policy code (1000, 1008, 1009, 1013), never 1011 or a dropped socket;
- afterwards the server still answers /healthz.

With no `--url` the server runs in this process on the packaged dLLM (no
speech models: random audio needs none to be tested), and every log record
with a traceback, or at ERROR level, counts as a problem too. The exit code is
0 when there were no problems, 1 otherwise. The test suite runs a short fuzz
(`tests/test_fuzz.py`) against the tiny model.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

from .protocol import MAX_MESSAGE_BYTES

__all__ = ["FuzzReport", "frames", "run", "main"]

SENTINEL = "fuzz.sentinel"
CLEAN_CLOSES = (1000, 1008, 1009, 1013)
# This fuzzer's own client connections log here, apart from the server's loggers: the sync client of
# websockets 17 logs "unexpected internal error" (EOFError) when the server closes while this side is
# still sending a frame, a race inside the client; what the client saw is judged by the close code.
CLIENT_LOG = "voice.fuzz.client"


@dataclass
class FuzzReport:
    """What one fuzz run sent and saw. `problems` lists each broken expectation, in one line."""

    messages: int = 0
    connections: int = 0
    events: Counter = field(default_factory=Counter)  # event type (error: error:code) -> count
    closes: Counter = field(default_factory=Counter)  # close code -> count
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        errors = {k[6:]: v for k, v in self.events.items() if k.startswith("error:")}
        return (f"{self.messages} messages on {self.connections} connections; errors by code {dict(errors)}; "
                f"closes {dict(self.closes)}; {len(self.problems)} problems")


def frames():
    """The hypothesis strategy of one hostile frame: str (a text frame) or bytes (a binary frame)."""
    from hypothesis import strategies as st

    huge = st.integers(min_value=10**300, max_value=10**400) | st.integers(max_value=-(10**300))
    numbers = st.integers() | st.floats() | huge
    odd_text = st.text(st.characters(codec=None), max_size=40) | st.sampled_from(
        ["\ud800", "a\udfffb", "\x00", "\u202e", " " * 50, "x" * 3000])
    scalars = st.none() | st.booleans() | numbers | odd_text
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    kinds = st.sampled_from(["session.start", "text", "input.end", "interrupt", "audio", "", "SESSION.START"])
    fields = st.fixed_dictionaries({}, optional={
        "sample_rate": st.sampled_from([16000, 48000, 11025, 0]) | numbers | odd_text,
        "steps": st.integers(-2, 80) | numbers, "deadline_ms": numbers, "output_sample_rate": numbers,
        "knowledge": odd_text | values, "canvas": values, "text": odd_text | values, "id": odd_text | values})
    messages = st.builds(lambda kind, extra: {"type": kind, **extra}, kinds | odd_text, fields)
    as_json = st.builds(lambda v: json.dumps(v, ensure_ascii=True), messages | values)  # surrogates as escapes
    deep = st.builds(lambda n, c: c[0] * n + c[1] * (n if c[1] else 0), st.integers(500, 65_000),
                     st.sampled_from([("[", "]"), ("[", ""), ('{"a":', "}"), ('{"type":"text","text":', "")]))
    oversized = st.builds(lambda n: json.dumps({"id": "big", "text": "x" * n}), st.integers(65_000, 70_000))
    binary = st.binary(max_size=2048) | st.builds(bytes, st.integers(0, 70_000))
    return as_json | st.text(max_size=200) | deep | oversized | binary


def _describe(sent: list[str | bytes]) -> str:
    """The frames of a connection in a line: each one's kind, size and first characters."""
    return "; ".join(f"{'bin' if isinstance(f, bytes) else 'text'}[{len(f)}] {f[:24]!r}" for f in sent)


def _exercise(url: str, route: str, sent: list[str | bytes], report: FuzzReport, timeout: float) -> None:
    """One connection: the frames, then the sentinel; checks what comes back."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    report.connections += 1
    sentinel = json.dumps({"type": SENTINEL, "id": SENTINEL})  # an unknown type on /ws, a text-less request on /cleanup
    try:
        ws = connect(url + route, max_size=None, open_timeout=timeout, close_timeout=2,
                     logger=logging.getLogger(CLIENT_LOG))
    except InvalidStatus as e:
        report.problems.append(f"{route}: handshake refused with {e.response.status_code}")
        return
    with ws:
        try:
            for frame in [*sent, sentinel]:
                report.messages += 1
                ws.send(frame)
            deadline = time.monotonic() + timeout
            while True:
                reply = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                if isinstance(reply, bytes):
                    report.events["audio"] += 1
                    continue
                event = json.loads(reply)
                if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                    report.problems.append(f"{route}: an event without a type: {reply[:80]!r}")
                    continue
                kind = event["type"] + (f":{event.get('code')}" if event["type"] == "error" else "")
                report.events[kind] += 1
                if event.get("code") == "internal":
                    report.problems.append(f"{route}: an internal error: {event.get('message')!r}")
                if event.get("id") == SENTINEL or SENTINEL in str(event.get("message", "")):
                    return
        except TimeoutError:
            report.problems.append(f"{route}: the sentinel was not answered within {timeout:g} s "
                                   f"after {_describe(sent)}")
        except ConnectionClosed:
            code = ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None
            if code is None and any(len(f) > MAX_MESSAGE_BYTES for f in sent):
                code = 1009  # closed while this client was still sending: its close frame went unread
            report.closes[code] += 1
            if code not in CLEAN_CLOSES:
                report.problems.append(f"{route}: closed with {code} (a clean close is one of {CLEAN_CLOSES}) "
                                       f"after {_describe(sent)}")


def run(url: str, *, messages: int = 10_000, seed: int = 0, per_connection: int = 8,
        timeout: float = 60.0) -> FuzzReport:
    """Send about `messages` hostile frames to the server at `url` (ws://host:port), blocking.

    Connections alternate at random between /ws (half of them start a session
    first) and /cleanup, each with up to `per_connection` frames.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed
    from hypothesis import strategies as st

    report = FuzzReport()
    start = json.dumps({"type": "session.start", "sample_rate": 16000})

    def one(route: str, sent: list) -> None:
        if route == "/ws+start":
            route, sent = "/ws", [start, *sent]
        _exercise(url, route, sent, report, timeout)

    round_ = 0
    while report.messages < messages:
        batch = max(1, (messages - report.messages) // (per_connection // 2 + 2))
        # A fresh test function each round: hypothesis refuses to set settings twice on one.
        test = given(route=st.sampled_from(["/ws", "/ws+start", "/cleanup"]),
                     sent=st.lists(frames(), min_size=1, max_size=per_connection))(one)
        settings(max_examples=batch, database=None, deadline=None, phases=[Phase.generate],
                 suppress_health_check=list(HealthCheck))(hyp_seed(seed * 1000 + round_)(test))()
        round_ += 1
    base = url.replace("ws://", "http://").replace("wss://", "https://")
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=timeout) as r:
            if r.status != 200:
                report.problems.append(f"/healthz answered {r.status} after the run")
    except OSError as e:
        report.problems.append(f"/healthz failed after the run: {e}")
    return report


class _Tracebacks(logging.Handler):
    """Log records that carry a traceback or say ERROR: each one is a problem."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != CLIENT_LOG and (record.exc_info or record.levelno >= logging.ERROR):
            self.seen.append(f"server log: {record.name}: {record.getMessage()[:160]}")


def _serve_in_thread(services, options):
    """A server on its own event loop in a daemon thread; returns (server, stop)."""
    from .server import VoiceServer

    ready, box = threading.Event(), {}

    def main() -> None:
        async def serve() -> None:
            server = VoiceServer(services, options)
            await server.start()
            box["server"], box["stop"], box["loop"] = server, asyncio.Event(), asyncio.get_running_loop()
            ready.set()
            await box["stop"].wait()
            await server.close()
        asyncio.run(serve())

    thread = threading.Thread(target=main, name="fuzz-server", daemon=True)
    thread.start()
    ready.wait(300)

    def stop() -> None:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)
    return box["server"], stop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m voice.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server, ws://host:port (default: one in this process)")
    p.add_argument("--messages", type=int, default=10_000, help="frames to send (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="the hypothesis seed (default: 0)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps of the server in this process (default: 2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    catcher, stop = _Tracebacks(), None
    url = args.url
    if url is None:
        from .server import ServerOptions
        from .services import ModelOptions, Services
        services = Services.load(ModelOptions(steps=args.steps), asr=False, tts=False)
        logging.getLogger().addHandler(catcher)
        server, stop = _serve_in_thread(services, ServerOptions(port=0))
        url = server.url
    t0 = time.monotonic()
    try:
        report = run(url, messages=args.messages, seed=args.seed)
    finally:
        if stop is not None:
            stop()
    problems = report.problems + catcher.seen
    print(f"python -m voice.fuzz --messages {args.messages} --seed {args.seed}"
          f"{' --url ' + args.url if args.url else ''}: {report.summary()} in {time.monotonic() - t0:.0f} s")
    if args.url is None:
        print(f"server log records with a traceback or at ERROR: {len(catcher.seen)}")
    for line in problems[:50]:
        print("  " + line)
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
