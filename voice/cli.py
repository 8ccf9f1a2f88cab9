"""The `voice` command: serve, kiosk, respond, cleanup.

    voice serve   [--host 127.0.0.1] [--port 8765] [--model PATH] [--device cpu|cuda] [--steps K]
                  [--asr-model DIR] [--voice FILE.onnx]
                  [--ray [ADDRESS]] [--replicas PART=N] [--num-cpus PART=F] [--num-gpus PART=F] [--redeploy]
    voice kiosk   [--knowledge FILE] [--barge-in] [model options]
    voice respond --text "..." | --audio in.wav  [--out reply.wav] [--knowledge TEXT_OR_FILE] [--json]
    voice cleanup [--steps K] < lines of {"text": ...}

Models load with progress lines on stderr; results go to stdout. Exit
codes: 0 success, 1 a failed run (a model would not load, a bad file),
2 bad usage (argparse), 3 no audio device (kiosk).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .errors import DeviceError, ServiceLoadError, VoiceError

__all__ = ["main", "build_parser"]

log = logging.getLogger("voice")

EXIT_FAILED = 1
EXIT_NO_DEVICE = 3


# dllm.PRECISIONS, spelt out: importing dllm loads torch, seconds before --help (a test keeps them equal).
PRECISION_CHOICES = ("auto", "float32", "bfloat16", "float16", "int8")

def _add_model_options(p: argparse.ArgumentParser, *, asr: bool = True, tts: bool = True) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--model", metavar="PATH", help="dLLM checkpoint: a directory (ours, LLaDA or Dream layout) "
                   "or a .gguf file (default: the packaged SmolLM2 with the shipped voice adapter)")
    g.add_argument("--adapter", metavar="DIR", default="default",
                   help="LoRA adapter directory to merge, or 'none' for the bare base "
                   "(default: the shipped voice adapter for the packaged model)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    g.add_argument("--steps", type=int, default=8, metavar="K", help="denoising steps per turn (default: 8)")
    g.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="the dLLM's weights (default: auto: bf16 where the device has fast bf16, else int8 on a CPU)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads per model (default: all)")
    if asr:
        g.add_argument("--asr-model", metavar="DIR", help="CTranslate2 Whisper directory (default: packaged tiny.en)")
    if tts:
        g.add_argument("--voice", metavar="FILE", help="piper voice .onnx, its .onnx.json beside it "
                       "(default: packaged en_US-joe-medium)")


def _add_session_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("endpointing")
    g.add_argument("--hangover-ms", type=int, default=600, help="silence that ends an utterance (default: 600)")
    g.add_argument("--min-speech-ms", type=int, default=250, help="shorter speech is ignored (default: 250)")
    g.add_argument("--max-utterance-ms", type=int, default=15000, help="longest utterance (default: 15000)")
    g.add_argument("--no-partials", action="store_true", help="no partial transcripts while speaking "
                   "(saves CPU and a little latency at the endpoint on small machines)")
    from .session import DEFAULT_PAUSE_MS, SessionConfig
    g.add_argument("--pause-ms", type=int, default=DEFAULT_PAUSE_MS, help="silence after which the turn starts "
                   f"tentatively, dropped if the speaker goes on (default: {DEFAULT_PAUSE_MS}; 0: wait for the "
                   "endpoint; less than --hangover-ms)")
    g.add_argument("--unfinished-hangover-ms", type=int, default=SessionConfig.unfinished_hangover_ms,
                   help="silence that ends an utterance whose words sound unfinished "
                   f"(default: {SessionConfig.unfinished_hangover_ms})")
    g.add_argument("--finished-hangover-ms", type=int, default=SessionConfig.finished_hangover_ms,
                   help="least silence that ends an utterance whose words sound finished "
                   f"(default: {SessionConfig.finished_hangover_ms}; 0: as soon as they are read)")


def _session_config(args: argparse.Namespace):
    from asr import VADOptions

    from .session import SessionConfig
    try:
        vad = VADOptions(hangover_ms=args.hangover_ms, post_roll_ms=min(300, args.hangover_ms),
                         min_speech_ms=args.min_speech_ms, max_utterance_ms=args.max_utterance_ms,
                         pause_ms=args.pause_ms)
        for flag in ("unfinished_hangover_ms", "finished_hangover_ms"):  # named as the user typed them
            if getattr(args, flag) < 0:
                raise ValueError(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    except ValueError as e:
        raise VoiceError(f"bad endpointing option: {e}") from e
    return SessionConfig(vad=vad, partial_every_ms=0 if args.no_partials else SessionConfig.partial_every_ms,
                         unfinished_hangover_ms=args.unfinished_hangover_ms,
                         finished_hangover_ms=args.finished_hangover_ms)


def build_parser() -> argparse.ArgumentParser:
    # -v/-q work before or after the command; SUPPRESS keeps a subcommand from resetting them.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging on stderr")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only warnings on stderr")
    parser = argparse.ArgumentParser(prog="voice", description="A streaming voice assistant on a diffusion LM.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = lambda name, help: sub.add_parser(name, help=help, parents=[common])  # noqa: E731

    p = add("serve", "the server: browser page, WebSocket and HTTP API, metrics")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 picks a free one)")
    p.add_argument("--web", metavar="DIR", help="the page's files (default: the packaged page)")
    p.add_argument("--max-sessions", type=int, default=32, help="concurrent voice sessions (default: 32)")
    g = p.add_argument_group("exposure and limits")
    g.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web page origin (https://host[:port]) allowed besides the server's own page and "
                   "loopback pages; repeat for more, '*' for any")
    g.add_argument("--token", default=os.environ.get("VOICE_TOKEN") or None,
                   help="a token every route but /healthz requires (Authorization: Bearer, or ?token=); "
                   "default: $VOICE_TOKEN. Needed to serve a non-loopback --host")
    g.add_argument("--insecure", action="store_true", help="serve a non-loopback --host with no token")
    g.add_argument("--certfile", metavar="PEM", help="TLS certificate: serve https:// and wss://")
    g.add_argument("--keyfile", metavar="PEM", help="TLS private key (if not inside --certfile)")
    g.add_argument("--bulk-batch", type=int, metavar="N",
                   help="rows of a batch of cleanup requests, which a voice turn may wait behind "
                   "(default: 4 on cpu, the engine's 16 on cuda)")
    g.add_argument("--max-steps", type=int, default=16, metavar="K",
                   help="the largest steps a client may ask for (default: 16, or --steps if larger)")
    g.add_argument("--max-turn-ms", type=float, metavar="MS",
                   help="refuse new voice sessions while the last minute's turns took a median of more than "
                   "MS from the end of speech to the reply (default: no bound)")
    g.add_argument("--idle-timeout", type=float, default=120.0, metavar="S",
                   help="close a connection that sends nothing for S seconds (default: 120)")
    g.add_argument("--no-turn-timeout", type=float, default=600.0, metavar="S",
                   help="close a voice session with no turn for S seconds (default: 600)")
    g = p.add_argument_group("Ray Serve (pip install 'voice[ray]'; see the README)")
    g.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="run the models as Ray Serve deployments and serve this front end over them: join the "
                   "Ray instance at ADDRESS (default: the running one), or start a local one on 127.0.0.1")
    g.add_argument("--replicas", action="append", default=[], metavar="PART=N",
                   help="replicas of a part (dllm, asr, tts; default 1 each); repeat for more parts")
    g.add_argument("--num-cpus", action="append", default=[], metavar="PART=F",
                   help="CPUs each replica of a part reserves (default 1)")
    g.add_argument("--num-gpus", action="append", default=[], metavar="PART=F",
                   help="GPUs each replica of a part reserves (default 0; 0.25 puts four on one GPU)")
    g.add_argument("--redeploy", action="store_true",
                   help="deploy the parts again even if they are running (default: reuse running ones)")
    _add_model_options(p)
    _add_session_options(p)

    p = add("kiosk", "local microphone and speaker, offline")
    p.add_argument("--knowledge", metavar="FILE", help="the venue's facts card (a text file)")
    p.add_argument("--barge-in", action="store_true",
                   help="let speech interrupt replies (needs a headset or an echo canceller)")
    p.add_argument("--input-device", help="sounddevice input device (name or index)")
    p.add_argument("--output-device", help="sounddevice output device (name or index)")
    _add_model_options(p)
    _add_session_options(p)

    p = add("respond", "one turn from text or a WAV file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the raw transcript to clean and answer")
    src.add_argument("--audio", metavar="WAV", help="a spoken question (PCM WAV, any rate)")
    p.add_argument("--out", metavar="WAV", help="write the spoken reply here")
    p.add_argument("--knowledge", metavar="TEXT_OR_FILE", help="facts card: text, or a path to a text file")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    _add_model_options(p)

    p = add("cleanup", 'clean transcripts: {"text": ...} lines on stdin, results on stdout')
    _add_model_options(p, asr=False, tts=False)
    p.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="how long to gather lines into one batch (default: 20)")
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("faster_whisper", "websockets", "uvicorn", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _model_options(args: argparse.Namespace):
    from .services import ModelOptions
    adapter = None if args.adapter.lower() == "none" else args.adapter
    bulk = getattr(args, "bulk_batch", None)
    if bulk is None and args.command == "serve" and args.device == "cpu":
        bulk = 4  # on a CPU a batch costs about its rows times one request: keep voice turns' wait short
    return ModelOptions(model=args.model, device=args.device, steps=args.steps, adapter=adapter,
                        precision=args.precision, asr_model=getattr(args, "asr_model", None),
                        voice=getattr(args, "voice", None), threads=args.threads, bulk_batch=bulk)


def _knowledge(value: str | None) -> str | None:
    if not value:
        return None
    path = Path(value)
    if len(value) < 4096 and "\n" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


# ----- commands

def cmd_serve(args: argparse.Namespace) -> int:
    from .server import ServerOptions, run_server
    from .services import Services

    session = _session_config(args)
    options = ServerOptions(  # checked before the slow model loads
        host=args.host, port=args.port, web_dir=Path(args.web) if args.web else None,
        max_sessions=args.max_sessions, session=session, allow_origins=tuple(args.allow_origin),
        token=args.token, insecure=args.insecure, certfile=Path(args.certfile) if args.certfile else None,
        keyfile=Path(args.keyfile) if args.keyfile else None, max_steps=min(max(args.max_steps, args.steps), 64),
        idle_timeout_s=args.idle_timeout, turnless_timeout_s=args.no_turn_timeout, max_turn_ms=args.max_turn_ms)
    if args.ray:
        return _serve_on_ray(args, options)
    services = Services.load(_model_options(args))
    asyncio.run(run_server(services, options))
    return 0


def _part_values(items: list[str], flag: str, kind: type) -> dict[str, Any]:
    """{"dllm": value, ...} from PART=VALUE flags."""
    from .cluster import APPS
    out: dict[str, Any] = {}
    for item in items:
        part, _, value = item.partition("=")
        if part not in APPS or not value:
            raise VoiceError(f"{flag} takes PART=VALUE with PART one of {', '.join(APPS)}; got {item!r}")
        try:
            out[part] = kind(value)
        except ValueError:
            raise VoiceError(f"{flag} {item!r}: {value!r} is not a number") from None
    return out


def _serve_on_ray(args: argparse.Namespace, options) -> int:
    """`voice serve --ray`: the models as deployments (reused if running), this process the front end."""
    from dataclasses import replace

    from .cluster import APPS, ClusterOptions, connect, deploy, init_ray
    from .server import run_server

    parts: dict[str, dict[str, Any]] = {part: {} for part in APPS}
    for flag, key, kind in (("--replicas", "replicas", int), ("--num-cpus", "num_cpus", float),
                            ("--num-gpus", "num_gpus", float)):
        for part, value in _part_values(getattr(args, key), flag, kind).items():
            parts[part][key] = value
    defaults = ClusterOptions()
    cluster = replace(defaults, models=_model_options(args),
                      **{part: replace(getattr(defaults, part), **parts[part]) for part in APPS})
    init_ray(args.ray)
    from ray import serve
    serve.start(proxy_location="Disabled")  # this process is the front end: no Serve HTTP proxy
    deploy(cluster, redeploy=args.redeploy)

    async def run() -> None:
        await run_server(await connect(), options)
    asyncio.run(run())
    return 0


def cmd_kiosk(args: argparse.Namespace) -> int:
    from .kiosk import KioskOptions, open_devices, run_kiosk
    from .services import Services

    knowledge = None
    if args.knowledge:
        try:
            knowledge = Path(args.knowledge).read_text(encoding="utf-8")
        except OSError as e:
            print(f"voice kiosk: cannot read the knowledge file: {e}", file=sys.stderr)
            return EXIT_FAILED
    session = _session_config(args)
    device = lambda v: int(v) if v is not None and v.isdigit() else v  # noqa: E731
    mic, speaker = open_devices(device(args.input_device), device(args.output_device))  # before the slow loads
    services = Services.load(_model_options(args))

    async def run() -> None:
        await services.start()
        try:
            await run_kiosk(services, mic, speaker,
                            KioskOptions(knowledge=knowledge, barge_in=args.barge_in, session=session))
        finally:
            await services.close()
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        speaker.close()
    return 0


def cmd_respond(args: argparse.Namespace) -> int:
    from .services import load_engine, load_synthesizer, load_transcriber

    opts = _model_options(args)
    if args.text is not None and not args.text.strip():
        print("voice respond: --text is empty; give the words to answer", file=sys.stderr)
        return EXIT_FAILED
    knowledge = _knowledge(args.knowledge)
    timings: dict[str, float] = {}
    transcript = args.text
    pcm16k = None
    if args.audio:
        from tts import resample

        from .audio import read_wav
        try:
            pcm, rate = read_wav(args.audio)
        except ValueError as e:
            print(f"voice respond: {e}", file=sys.stderr)
            return EXIT_FAILED
        pcm16k = resample(pcm, rate, 16000)
    from dllm import DLLMError, Turn  # after the cheap checks: importing torch takes seconds

    transcriber = load_transcriber(opts) if pcm16k is not None else None
    synthesizer = load_synthesizer(opts) if args.out else None
    engine = load_engine(opts)

    if transcriber is not None:
        t0 = time.perf_counter()
        transcript = transcriber.transcribe(pcm16k)
        timings["asr_ms"] = (time.perf_counter() - t0) * 1000
        if not transcript:
            print("voice respond: no speech was recognised in the audio", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        result = engine.respond_sync(Turn(transcript or "", knowledge=knowledge), steps=args.steps) if transcript \
            else None
    except DLLMError as e:
        print(f"voice respond: {e}", file=sys.stderr)
        return EXIT_FAILED
    timings["llm_ms"] = (time.perf_counter() - t0) * 1000
    cleaned = result.cleaned if result else ""
    reply = result.reply if result else ""
    if synthesizer is not None:
        from .audio import write_wav
        t0 = time.perf_counter()
        audio = synthesizer.synthesize_all(reply)
        timings["tts_ms"] = (time.perf_counter() - t0) * 1000
        write_wav(args.out, audio, synthesizer.sample_rate)
        log.info("wrote %s (%.1f s of audio%s)", args.out, len(audio) / synthesizer.sample_rate,
                 "; the reply was empty" if not reply else "")
    if args.audio:
        out = {"transcript": transcript, "cleaned": cleaned, "reply": reply,
               "timings": {k: round(v, 1) for k, v in timings.items()}}
    else:
        out = {"raw": result.raw, "cleaned": cleaned, "reply": reply, "steps": result.steps,
               "canvas": result.canvas, "ms": round(result.ms, 1)}
        if "tts_ms" in timings:
            out["tts_ms"] = round(timings["tts_ms"], 1)
    if args.json:
        print(json.dumps(out, ensure_ascii=False), flush=True)
    else:
        if args.audio:
            print(f"transcript: {transcript}")
        print(f"cleaned:    {cleaned}")
        print(f"reply:      {reply}")
        print("timings:    " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Lines in, lines out, in order; lines read close together share a batch."""
    from dataclasses import replace

    from .services import load_engine

    engine = load_engine(replace(_model_options(args), batch_window_ms=args.batch_window_ms))
    return asyncio.run(_cleanup_lines(engine, args.steps))


async def _cleanup_lines(engine, steps: int) -> int:
    from dllm import DLLMError

    from .pipeline import cancel_and_wait

    loop = asyncio.get_running_loop()
    await engine.start()
    pending: asyncio.Queue = asyncio.Queue(maxsize=256)  # futures of results, in input order
    running: set[asyncio.Task] = set()

    def error_line(lineno: int, message: str, text=None) -> str:
        return json.dumps({"line": lineno, "text": text, "error": message}, ensure_ascii=False)

    async def clean(text: str, extra: dict, lineno: int) -> str:
        try:
            res = await engine.cleanup(text, steps=steps)
        except DLLMError as e:
            return error_line(lineno, str(e), text)
        cleaned = res if isinstance(res, str) else res.cleaned
        return json.dumps({**extra, "text": text, "cleaned": cleaned}, ensure_ascii=False)

    async def read() -> None:
        lineno = 0
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            done = loop.create_future()
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("each line must be a JSON object like {\"text\": \"...\"}")
                text = obj.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise ValueError("the object needs a non-empty string \"text\"")
            except ValueError as e:
                done.set_result(error_line(lineno, f"bad line: {e}"))
                await pending.put(done)
                continue
            extra = {"id": obj["id"]} if "id" in obj else {}
            task = asyncio.create_task(clean(text, extra, lineno), name=f"cleanup-line-{lineno}")
            running.add(task)
            task.add_done_callback(running.discard)
            await pending.put(task)
        await pending.put(None)

    async def write() -> None:
        while (fut := await pending.get()) is not None:
            print(await fut, flush=True)

    reader = asyncio.create_task(read(), name="cleanup-read")
    writer = asyncio.create_task(write(), name="cleanup-write")
    try:
        await asyncio.gather(reader, writer)
    finally:
        await cancel_and_wait([reader, writer, *running], 5.0)
        await engine.close()
    return 0


def _openmp_defaults(threads: int | None) -> None:
    """OpenMP settings, read by torch when it loads (later than this).

    Whisper (CTranslate2), piper (onnxruntime) and the dLLM (torch) share the
    cores. OpenMP's default spin-waiting makes torch's threads burn the cores
    the others need, and stall when they are taken: on a busy 2-core machine
    a K=4 turn took 33 s with spinning and 1.1 s with passive waiting.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    if getattr(args, "steps", 8) < 1:
        parser.error("--steps must be at least 1")
    _openmp_defaults(getattr(args, "threads", None))
    command = {"serve": cmd_serve, "kiosk": cmd_kiosk, "respond": cmd_respond, "cleanup": cmd_cleanup}[args.command]
    try:
        return command(args)
    except DeviceError as e:
        print(f"voice {args.command}: {e}", file=sys.stderr)
        return EXIT_NO_DEVICE
    except ServiceLoadError as e:
        print(f"voice {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except VoiceError as e:
        print(f"voice {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
