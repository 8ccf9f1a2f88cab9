"""A soak test: N voice sessions speaking real questions for M minutes, optionally beside a cleanup flood.

    python -m voice.soak --sessions 16 --minutes 10                 # a server in this process
    python -m voice.soak --sessions 1 --minutes 1 --flood 3          # one voice beside three /cleanup floods
    python -m voice.soak --sessions 4 --minutes 5 --url ws://127.0.0.1:8765

Each session is one long-lived /ws connection that streams audio at real time
the whole while: a question spoken by piper (`voice.bench.QUESTIONS`), then
silence until `turn.done`, then silence for as long as the reply's audio
lasts (as a user who listens to the end), then the next question. A turn is
lost when it ends with an error, is interrupted, or has no `turn.done` within
the timeout. Each `--flood` connection keeps `--flood-inflight` /cleanup
requests outstanding until the end.

Printed: the command and machine, turns completed and lost, the percentiles
of voice-to-voice and of the dLLM stage, cleanup requests answered, and (for
a server in this process) the resident memory after warm-up and at the end.
Warm-up lasts until every session has taken `--warm-turns` turns (by default
as many as a session's history keeps: from then on its prompt is as long as
it gets, so the engine's buffers have seen their largest shapes). Results go
in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .bench import machine, percentile, speak_questions

__all__ = ["SoakResult", "run_soak", "main"]


@dataclass
class SoakResult:
    done: int = 0
    lost: list[str] = field(default_factory=list)  # one reason per lost turn
    voice_to_voice_ms: list[float] = field(default_factory=list)
    llm_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)  # llm_ms less llm_model_ms: the wait for the engine
    cleanups: int = 0
    cleanup_errors: int = 0
    rss_warm_mb: float | None = None
    rss_end_mb: float | None = None
    warm: int = 0  # sessions past their warm-up turns
    rss_each_minute_mb: list[float] = field(default_factory=list)  # the curve: a leak climbs, a cache flattens


def rss_mb() -> float | None:
    """This process's resident memory in MiB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def _session(url: str, utterances: list[tuple[str, np.ndarray]], until: float, result: SoakResult,
                   offset: int, sessions: int, timeout: float, warm_turns: int) -> None:
    from websockets.asyncio.client import connect

    chunk = 320  # 20 ms at 16 kHz
    silence = bytes(chunk * 2)
    speech: list[bytes] = []  # frames still to speak
    events: asyncio.Queue[dict] = asyncio.Queue()
    audio = [0]  # reply bytes of the current turn
    async with connect(url.rstrip("/") + "/ws", max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.start", "sample_rate": 16000}))

        async def send() -> None:
            t0, i = time.monotonic(), 0
            while True:
                await ws.send(speech.pop(0) if speech else silence)
                i += 1
                await asyncio.sleep(max(0.0, t0 + i * 0.02 - time.monotonic()))

        async def receive() -> None:
            async for msg in ws:
                if isinstance(msg, bytes):
                    audio[0] += len(msg)
                else:
                    await events.put(json.loads(msg))

        tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
        try:
            rate, n = 22050, offset
            while time.monotonic() < until:
                question, pcm = utterances[n % len(utterances)]
                n += sessions
                data = pcm.astype("<i2").tobytes()
                audio[0] = 0
                speech.extend(data[i:i + chunk * 2] for i in range(0, len(data), chunk * 2))
                try:
                    async with asyncio.timeout(timeout):
                        while True:
                            ev = await events.get()
                            if ev["type"] == "session.ready":
                                rate = ev["output_sample_rate"]
                            elif ev["type"] in ("error", "turn.interrupted"):
                                result.lost.append(f"{ev['type']} {ev.get('code', ev.get('reason'))}: {question!r}")
                                break
                            elif ev["type"] == "turn.done":
                                result.done += 1
                                if ev.get("voice_to_voice_ms") is not None:
                                    result.voice_to_voice_ms.append(ev["voice_to_voice_ms"])
                                t = ev["timings"]
                                if t.get("llm_ms") is not None:
                                    result.llm_ms.append(t["llm_ms"])
                                    result.queue_ms.append(t["llm_ms"] - t.get("llm_model_ms", t["llm_ms"]))
                                break
                except TimeoutError:
                    result.lost.append(f"no turn.done within {timeout:g} s: {question!r}")
                if n - offset == warm_turns * sessions:  # this session's last warm-up turn
                    result.warm += 1
                    if result.warm == sessions:
                        result.rss_warm_mb = rss_mb()
                await asyncio.sleep(audio[0] / 2 / rate + 0.5)  # listen to the reply, then a pause
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _flood(url: str, until: float, inflight: int, result: SoakResult) -> None:
    from websockets.asyncio.client import connect

    texts = ["um so i i think we should go to the the meeting", "uh the the report is due on friday i think",
             "so like can you can you send me the file"]
    async with connect(url.rstrip("/") + "/cleanup", max_size=None) as ws:
        sent = 0
        for _ in range(inflight):
            await ws.send(json.dumps({"id": sent, "text": texts[sent % 3]}))
            sent += 1
        while time.monotonic() < until:
            try:
                reply = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, until - time.monotonic())))
            except TimeoutError:
                break
            if reply["type"] == "cleanup.result":
                result.cleanups += 1
            else:
                result.cleanup_errors += 1
            await ws.send(json.dumps({"id": sent, "text": texts[sent % 3]}))
            sent += 1


async def _sample_rss(result: SoakResult, every_s: float = 60.0) -> None:
    while rss_mb() is not None:
        await asyncio.sleep(every_s)
        result.rss_each_minute_mb.append(rss_mb())


async def run_soak(url: str, utterances: list[tuple[str, np.ndarray]], *, sessions: int, minutes: float,
                   flood: int = 0, flood_inflight: int = 16, timeout: float = 120.0, warm_turns: int = 1) -> SoakResult:
    result = SoakResult()
    until = time.monotonic() + minutes * 60
    jobs = [_session(url, utterances, until, result, i, sessions, timeout, warm_turns) for i in range(sessions)]
    jobs += [_flood(url, until, flood_inflight, result) for _ in range(flood)]
    sampler = asyncio.create_task(_sample_rss(result))
    try:
        await asyncio.gather(*jobs)
    finally:
        sampler.cancel()
    result.rss_end_mb = rss_mb()
    return result


def report(result: SoakResult, in_process: bool) -> str:
    lines = [f"turns completed: {result.done}, lost: {len(result.lost)}"]
    for name, values in (("voice_to_voice_ms", result.voice_to_voice_ms), ("llm_ms", result.llm_ms),
                         ("engine queue ms", result.queue_ms)):
        if values:
            lines.append(f"{name}: n {len(values)}, median {statistics.median(values):.0f}, "
                         f"p95 {percentile(values, 95):.0f}, max {max(values):.0f}")
    lines.append(f"cleanup requests answered: {result.cleanups}, errors: {result.cleanup_errors}")
    if in_process and result.rss_warm_mb and result.rss_end_mb:
        growth = (result.rss_end_mb / result.rss_warm_mb - 1) * 100
        lines.append(f"RSS after warm-up {result.rss_warm_mb:.0f} MiB, at the end {result.rss_end_mb:.0f} MiB "
                     f"({growth:+.1f}%)")
    elif in_process:
        lines.append("RSS after warm-up: not reached (a session took fewer than --warm-turns turns)")
    if in_process and result.rss_each_minute_mb:
        lines.append("RSS each minute (MiB): " + " ".join(f"{mb:.0f}" for mb in result.rss_each_minute_mb))
    lines += [f"lost: {reason}" for reason in result.lost[:20]]
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    print(f"command: {' '.join(shlex.quote(a) for a in ['python', '-m', 'voice.soak', *sys.argv[1:]])}")
    print(f"machine: {machine()}")
    utterances = speak_questions(12)
    server, url = None, args.url
    if url is None:
        from .server import ServerOptions, VoiceServer
        from .services import ModelOptions, Services

        services = Services.load(ModelOptions(steps=args.steps, threads=args.threads))
        server = VoiceServer(services, ServerOptions(port=0, max_sessions=max(32, args.sessions)))
        await server.start()
        url = server.url
    try:
        result = await run_soak(url, utterances, sessions=args.sessions, minutes=args.minutes, flood=args.flood,
                                flood_inflight=args.flood_inflight, warm_turns=args.warm_turns)
    finally:
        if server is not None:
            await server.close()
    print(report(result, server is not None))
    return 1 if result.lost else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m voice.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=16, help="concurrent voice sessions (default: 16)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long (default: 10)")
    p.add_argument("--flood", type=int, default=0, help="/cleanup connections flooding beside them (default: 0)")
    p.add_argument("--flood-inflight", type=int, default=16, help="requests each keeps outstanding (default: 16)")
    p.add_argument("--url", help="a running server (ws://host:port); default: one in this process")
    p.add_argument("--steps", type=int, default=8, help="denoising steps K (in-process server)")
    p.add_argument("--threads", type=int, help="CPU threads per model (in-process server)")
    from .session import SessionConfig
    p.add_argument("--warm-turns", type=int, default=SessionConfig.history_turns,
                   help="turns per session before the warm-up memory is read (default: the history a session "
                        f"keeps, {SessionConfig.history_turns})")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.minutes <= 0 or args.warm_turns < 1:
        p.error("--sessions and --warm-turns must be at least 1 and --minutes above 0")
    from .cli import _openmp_defaults
    _openmp_defaults(args.threads)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
