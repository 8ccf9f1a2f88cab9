"""End-to-end latency benchmark: spoken questions through /ws, timed per stage.

    python -m voice.bench --n 10                  # a server in this process, default models
    python -m voice.bench --n 10 --url ws://127.0.0.1:8765
    python -m voice.bench --n 10 --lead 0,12      # without and with the early first sentence, same models
    python -m voice.bench --n 10 --pause-ms 0,200 # waiting for the endpoint, or starting at a pause
    python -m voice.bench --n 10 --cache exact,rolling  # each step on the whole canvas, or on the span it needs
    python -m voice.bench --n 10 --frontier 0,4   # the reply paced with its block, or written from its left edge
    python -m voice.bench --n 10 --peer --peer-python PEER/bin/python  # then Pipecat + llama.cpp (voice.peer_bench)
    python -m voice.bench --n 10 --lookahead 0,8  # a reply step runs the masks past its frontier too, or not
    python -m voice.bench --n 10 --tts-cache 0,128  # every piece synthesised, or short ones kept
    python -m voice.bench --n 6 --conversation --head-cache 0,4096  # one session: later turns carry a history

Each of N questions (a fixed list, spoken by piper and resampled to 16 kHz)
goes to a fresh /ws session (with `--conversation`, all to one, each once
the reply before it has played) in 20 ms frames at real-time pace, followed
by real-time silence until the server's endpointer closes the utterance and
the turn ends, as a microphone would. The `turn.done` timings are collected and
the median and p95 of every stage and of `voice_to_voice_ms` (end of speech
to the first reply audio sent) are printed as a table, with the command and
the machine. Nothing is timed inside a test; see docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .cli import PRECISION_CHOICES

__all__ = ["QUESTIONS", "TurnSample", "run_bench", "summarize", "main"]

QUESTIONS = [
    "What time does the library open on Saturday?",
    "Where is the nearest bus stop?",
    "Can you tell me how to get to the train station?",
    "Is the museum open on Mondays?",
    "How much does a ticket for the zoo cost?",
    "Where can I find a good coffee shop around here?",
    "What is the weather going to be like tomorrow?",
    "Do you know when the next ferry leaves?",
    "Which floor is the children's section on?",
    "Can I bring my dog into the park?",
    "How late is the swimming pool open tonight?",
    "Where do I pay for parking?",
]

STAGES = ["pause_ms", "endpoint_ms", "asr_wait_ms", "asr_ms", "settled_ms", "llm_ms", "llm_model_ms", "reply_ms",
          "tts_first_ms", "first_audio_ms", "tts_ms", "total_ms", "stall_ms"]


@dataclass
class TurnSample:
    question: str
    transcript: str = ""
    reply: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    voice_to_voice_ms: float | None = None
    audio_bytes: int = 0
    error: str | None = None


def speak_questions(n: int) -> list[tuple[str, np.ndarray]]:
    """The first `n` questions (cycling) as 16 kHz int16 speech with 0.3 s of silence before."""
    from tts import Synthesizer, resample

    synth = Synthesizer.load()
    out = []
    for i in range(n):
        text = QUESTIONS[i % len(QUESTIONS)]
        pcm = resample(synth.synthesize_all(text), synth.sample_rate, 16000)
        out.append((text, np.concatenate([np.zeros(4800, np.int16), pcm])))
    return out


async def one_turn(url: str, question: str, pcm: np.ndarray, *, chunk_ms: int = 20, speed: float = 1.0,
                   timeout: float = 300.0) -> TurnSample:
    """Play one utterance into a new session in real time, then silence until turn.done.

    `stall_ms` (in the sample's timings): how long the reply's audio would have run dry after it started,
    for a client that plays each chunk as it comes (a reply spoken in pieces, the next made while one plays).
    """
    return (await conversation(url, [(question, pcm)], chunk_ms=chunk_ms, speed=speed, timeout=timeout))[0]


async def conversation(url: str, utterances: list[tuple[str, np.ndarray]], *, chunk_ms: int = 20,
                       speed: float = 1.0, timeout: float = 300.0, log=None) -> list[TurnSample]:
    """Play the utterances into one session, as `one_turn` plays one: each after the reply before it has
    played and `REPLY_GAP_S` more, so that every turn after the first has a history."""
    from websockets.asyncio.client import connect

    samples = []
    async with connect(url.rstrip("/") + "/ws", max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.start", "sample_rate": 16000}))
        for i, (question, pcm) in enumerate(utterances):
            samples.append(await _play_turn(ws, question, pcm, chunk_ms=chunk_ms, speed=speed, timeout=timeout,
                                            linger=i + 1 < len(utterances)))
            if log is not None:
                log(samples[-1])
    return samples


REPLY_GAP_S = 0.5  # between the end of a reply's audio and the next question, in a conversation


async def _play_turn(ws, question: str, pcm: np.ndarray, *, chunk_ms: int, speed: float, timeout: float,
                     linger: bool) -> TurnSample:
    """One utterance into the open session, in real time, then silence until turn.done (and with `linger`,
    on until the reply has played and `REPLY_GAP_S` more)."""
    sample = TurnSample(question)
    chunk = 16000 * chunk_ms // 1000
    silence = bytes(chunk * 2)
    data = pcm.astype("<i2").tobytes()
    frames = [data[i:i + chunk * 2] for i in range(0, len(data), chunk * 2)]
    stop = asyncio.Event()
    rate, played_until, stall = 0, 0.0, 0.0  # the reply's sample rate; when what came so far has played

    async def send() -> None:
        t0 = time.monotonic()
        i = 0
        while not stop.is_set():
            await ws.send(frames[i] if i < len(frames) else silence)
            i += 1
            await asyncio.sleep(max(0.0, t0 + i * chunk_ms / 1000 / speed - time.monotonic()))

    async def receive() -> None:
        nonlocal rate, played_until, stall
        async for msg in ws:
            if isinstance(msg, bytes):
                sample.audio_bytes += len(msg)
                if rate:
                    t = time.monotonic()
                    if played_until and t > played_until:
                        stall += t - played_until
                    played_until = max(t, played_until) + len(msg) / 2 / rate
                continue
            ev = json.loads(msg)
            kind = ev["type"]
            if kind == "audio.start":
                rate, played_until = ev["sample_rate"], 0.0
            elif kind == "transcript.final":
                sample.transcript = ev["text"]
            elif kind == "turn.reply":
                sample.reply = ev["text"]
            elif kind == "error":
                sample.error = f"{ev['code']}: {ev['message']}"
            elif kind == "turn.done":
                sample.timings = {k: v for k, v in ev["timings"].items() if v is not None}
                if rate:
                    sample.timings["stall_ms"] = stall * 1000
                sample.voice_to_voice_ms = ev["voice_to_voice_ms"]
                return

    sender = asyncio.create_task(send())
    try:
        await asyncio.wait_for(receive(), timeout)
        if linger:
            await asyncio.sleep(max(0.0, played_until - time.monotonic()) + REPLY_GAP_S)
    except asyncio.TimeoutError:
        sample.error = f"no turn.done within {timeout:g} s"
    finally:
        stop.set()
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    return sample


async def run_bench(url: str, utterances: list[tuple[str, np.ndarray]], *, chunk_ms: int = 20,
                    speed: float = 1.0, in_one_session: bool = False, log=print) -> list[TurnSample]:
    """Each utterance in a session of its own, or with `in_one_session` all in one (`conversation`)."""
    def report(s: TurnSample, i: int) -> None:
        v2v = f"{s.voice_to_voice_ms:.0f} ms" if s.voice_to_voice_ms is not None else "-"
        log(f"[{i}/{len(utterances)}] {s.question!r} -> heard {s.transcript!r}, reply {s.reply!r}, "
            f"voice-to-voice {v2v}" + (f", ERROR {s.error}" if s.error else ""))
    if in_one_session:
        count = iter(range(1, len(utterances) + 1))
        return await conversation(url, utterances, chunk_ms=chunk_ms, speed=speed,
                                  log=lambda s: report(s, next(count)))
    samples = []
    for i, (question, pcm) in enumerate(utterances, 1):
        samples.append(await one_turn(url, question, pcm, chunk_ms=chunk_ms, speed=speed))
        report(samples[-1], i)
    return samples


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100)."""
    xs = sorted(values)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]


def summarize(samples: list[TurnSample]) -> list[tuple[str, int, float, float]]:
    """(stage, n, median, p95) rows for every stage seen, and voice_to_voice_ms last."""
    rows = []
    keys = [k for k in STAGES if any(k in s.timings for s in samples)]
    keys += sorted({k for s in samples for k in s.timings} - set(keys) - {"speech_ms"})
    for key in keys:
        vals = [s.timings[key] for s in samples if key in s.timings]
        rows.append((key, len(vals), statistics.median(vals), percentile(vals, 95)))
    v2v = [s.voice_to_voice_ms for s in samples if s.voice_to_voice_ms is not None]
    if v2v:
        rows.append(("voice_to_voice_ms", len(v2v), statistics.median(v2v), percentile(v2v, 95)))
    return rows


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores", f"Python {platform.python_version()}", platform.platform()]
    try:
        import torch
        from dllm import fast_bf16
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads, "
                     f"{torch.backends.cpu.get_cpu_capability()}, bf16 {'fast' if fast_bf16('cpu') else 'slow'})")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    except ImportError:
        pass
    return "; ".join(parts)


def table(rows: list[tuple[str, int, float, float]]) -> str:
    lines = ["| stage | n | median ms | p95 ms |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {n} | {med:.0f} | {p95:.0f} |" for k, n, med, p95 in rows]
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    print(f"command: {' '.join(shlex.quote(a) for a in ['python', '-m', 'voice.bench', *sys.argv[1:]])}")
    print(f"machine: {machine()}")
    if args.peer:  # before our run, so a missing peer costs nothing
        from .peer_bench import peer_missing
        if missing := peer_missing(args.peer_python or sys.executable):
            print(f"--peer: {missing}", file=sys.stderr)
            return 2
    utterances = speak_questions(args.n)
    server = None
    url = args.url
    if url is None:
        from .server import ServerOptions, VoiceServer
        from .services import ModelOptions, Services

        adapter = None if args.adapter.lower() == "none" else args.adapter
        services = Services.load(ModelOptions(model=args.model, device=args.device, steps=args.steps,
                                              threads=args.threads, adapter=adapter, precision=args.precision))
        server = VoiceServer(services, ServerOptions(port=0))
        await server.start()
        url = server.url
        print(f"server: in-process at {url} (model {getattr(services.engine, 'name', '?')}, K={args.steps}, "
              f"{args.precision} precision)")
    else:
        print(f"server: {url}")
    # Variants run in turn on the same loaded models (each change stays for the variants after it): the sampler's
    # lead, the cache, or the pause that starts a turn.
    variants: list[tuple[str, str, int | str]] = []
    for name, value in (("lead_tokens", args.lead), ("lead_steps", args.lead_steps), ("pause_ms", args.pause_ms),
                        ("cache", args.cache), ("reply_frontier", args.frontier),
                        ("rolling_lookahead", args.lookahead), ("head_cache_tokens", args.head_cache),
                        ("cache_pieces", args.tts_cache)):
        if value is not None and server is None:
            print(f"{name} variants need the in-process server; ignored")
        elif value is not None:
            variants += [(f"{name}={v}", name, v if name == "cache" else int(v)) for v in value.split(",")]
    runs: dict[str, list[TurnSample]] = {}
    try:
        for label, name, value in variants or [("the server's default", "", 0)]:
            if name in ("lead_tokens", "lead_steps", "reply_frontier"):
                engine = services.engine
                engine.options = replace(engine.options, sampler=replace(engine.options.sampler, **{name: value}))
            elif name in ("rolling_lookahead", "head_cache_tokens"):
                services.engine.options = replace(services.engine.options, **{name: value})
            elif name == "cache_pieces":
                synth = services.synthesizer
                synth.options = replace(synth.options, cache_pieces=value)
            elif name == "cache":
                services.engine.cache_mode = value
            elif name == "pause_ms":
                from asr import VADOptions
                session = server.options.session
                vad = replace(session.vad or VADOptions(), pause_ms=value)
                server.options = replace(server.options, session=replace(session, vad=vad))
            if name:
                print(f"\n--- {label} ---")
            runs[label] = await run_bench(url, utterances, chunk_ms=args.chunk_ms, speed=args.speed,
                                          in_one_session=args.conversation)
    finally:
        if server is not None:
            await server.close()
    errors = 0
    for label, samples in runs.items():
        bad = sum(1 for s in samples if s.error)
        errors += bad
        replies = sum(1 for s in samples if s.reply)
        print(f"\n{label}: {len(samples)} turns, {bad} errors, {replies} non-empty replies "
              f"(voice_to_voice_ms needs a spoken reply)\n")
        print(table(summarize(samples)))
    peer = _peer(args, runs) if args.peer else None
    if peer is not None:
        errors += sum(1 for s in peer if s.error)
    if args.json:
        out = {label: [s.__dict__ for s in samples] for label, samples in runs.items()}
        if peer:
            out["peer"] = [s.__dict__ for s in peer]
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if errors else 0


def _peer(args: argparse.Namespace, runs: dict[str, list[TurnSample]]) -> list[TurnSample]:
    """The same questions through Pipecat + llama.cpp (voice.peer_bench, under --peer-python), and ours / peer.

    A peer that could not run gives one sample with its error."""
    import tempfile

    from .peer_bench import PeerUnavailable, run_peer_subprocess

    python = args.peer_python or sys.executable
    threads = args.threads or 2
    print(f"\n--- peer: Pipecat + llama.cpp under {python} ---", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            peer = run_peer_subprocess(python, args.n, threads, json_path=os.path.join(tmp, "peer.json"))
        except PeerUnavailable as e:
            print(f"peer failed: {e}")
            return [TurnSample("(the peer)", error=str(e))]
    theirs = [s.voice_to_voice_ms for s in peer if s.voice_to_voice_ms is not None]
    for label, samples in runs.items():
        ours = [s.voice_to_voice_ms for s in samples if s.voice_to_voice_ms is not None]
        if ours and theirs:
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"voice to voice, median: ours ({label}) {a:.0f} ms, peer {b:.0f} ms: ours / peer {a / b:.2f}x")
    return peer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m voice.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10, help="utterances (default 10)")
    p.add_argument("--url", help="a running server (ws://host:port); default: start one in this process")
    p.add_argument("--model", help="dLLM checkpoint for the in-process server")
    p.add_argument("--adapter", default="default", help="adapter directory, or 'none' (in-process server)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=8, help="denoising steps K (in-process server)")
    p.add_argument("--threads", type=int, help="CPU threads per model")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="the dLLM's weights (in-process server; auto: bf16 where fast, else int8 on a CPU)")
    p.add_argument("--conversation", action="store_true",
                   help="all questions in one session, each after the reply before it has played: the turns after the "
                        "first carry a history (default: a fresh session per question)")
    p.add_argument("--head-cache", help="comma list of EngineOptions.head_cache_tokens to run in turn (in-process "
                                        "server), e.g. 0,4096: every prompt run whole, or its head kept and prefilled")
    p.add_argument("--tts-cache", help="comma list of tts.SynthesizerOptions.cache_pieces to run in turn (in-process "
                                       "server), e.g. 0,128: every piece synthesised, or short ones kept")
    p.add_argument("--chunk-ms", type=int, default=20, help="audio per frame (default 20)")
    p.add_argument("--speed", type=float, default=1.0, help="1.0 sends audio in real time")
    p.add_argument("--json", metavar="FILE", help="also write every turn's sample here")
    p.add_argument("--lead", help="comma list of SamplerOptions.lead_tokens to run in turn on the same models "
                                  "(in-process server), e.g. 0,12: the first sentence spoken before the pass ends")
    p.add_argument("--lead-steps", help="comma list of SamplerOptions.lead_steps to run in turn (in-process server): "
                                        "the steps after which the reply's first sentence is final")
    p.add_argument("--cache", help="comma list of the engine's cache modes to run in turn (in-process server), "
                                   "e.g. exact,rolling: each step runs the whole canvas, or only the span it needs")
    p.add_argument("--frontier", help="comma list of SamplerOptions.reply_frontier to run in turn (in-process server), "
                                      "e.g. 0,4: the reply paced with its block, or written from its left edge")
    p.add_argument("--lookahead", help="comma list of EngineOptions.rolling_lookahead to run in turn (in-process "
                                       "server): masked positions past the reply's frontier that a step runs too")
    p.add_argument("--pause-ms", help="comma list of asr.VADOptions.pause_ms to run in turn (in-process server), "
                                      "e.g. 0,200: the turn waits for the endpoint, or starts at a 200 ms pause")
    p.add_argument("--peer", action="store_true",
                   help="then play the same questions through Pipecat + llama.cpp on the same models "
                        "(voice.peer_bench; needs the peer extra)")
    p.add_argument("--peer-python", metavar="PYTHON",
                   help="the interpreter that has the peer extra, e.g. a virtualenv's bin/python (default: this one)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    from .cli import _openmp_defaults
    _openmp_defaults(args.threads)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("faster_whisper", "websockets", "voice.server.ws"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
