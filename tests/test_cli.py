"""The `voice` command in subprocesses: respond, cleanup, and kiosk without an audio device."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from voice_helpers import QUESTION, speech, transcriber, words

from voice.audio import read_wav, write_wav

ROOT = Path(__file__).resolve().parent.parent
# The installed console script if there is one, else the same code through -m.
VOICE = [shutil.which("voice")] if shutil.which("voice") else [sys.executable, "-m", "voice"]
MODEL_ARGS = ["--threads", "2"]  # with the CLI's passive OpenMP waiting


def voice(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([*VOICE, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_precision_choices_are_the_engines():
    """The CLI spells out dllm.PRECISIONS (so that --help need not load torch); the two must not drift apart."""
    import dllm
    from voice.cli import build_parser
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    choices = next(a.choices for a in serve._actions if a.dest == "precision")
    assert tuple(choices) == dllm.PRECISIONS


def test_respond_text_json():
    """`voice respond --text ... --json` prints one JSON line with the turn's fields; progress goes to stderr."""
    run = voice("respond", "--text", "um where is the the nearest bus stop", "--json", "--steps", "4", *MODEL_ARGS)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) >= {"raw", "cleaned", "reply", "steps", "canvas", "ms"}
    assert out["raw"] == "um where is the the nearest bus stop" and out["steps"] == 4 and out["canvas"] > 0
    assert "loading dLLM" in run.stderr and "loaded dLLM" in run.stderr


def test_respond_audio_to_wav(tmp_path):
    """`voice respond --audio in.wav --out reply.wav --json` transcribes the question and writes the reply WAV."""
    wav_in, wav_out = tmp_path / "q.wav", tmp_path / "reply.wav"
    write_wav(wav_in, speech(QUESTION, rate=22050, tail_s=0.3), 22050)
    run = voice("respond", "--audio", str(wav_in), "--out", str(wav_out), "--json",
                "--knowledge", "The library opens at 9 on Saturdays.", *MODEL_ARGS)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(out) == {"transcript", "cleaned", "reply", "timings"}
    assert {"library", "saturday"} <= set(words(out["transcript"]))
    assert {"asr_ms", "llm_ms", "tts_ms"} <= set(out["timings"])
    pcm, rate = read_wav(wav_out)
    assert rate == 22050
    if out["reply"]:
        from tts import resample
        heard = set(words(transcriber().transcribe(resample(pcm, rate, 16000))))
        assert heard & set(words(out["reply"])), (heard, out["reply"])
    else:
        assert len(pcm) == 0


def test_respond_bad_audio_file(tmp_path):
    """A file that is not a WAV is refused with a message and exit 1, before any model loads."""
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    run = voice("respond", "--audio", str(bad), "--json", timeout=60)
    assert run.returncode == 1 and "cannot read" in run.stderr and run.stdout == ""


def test_cleanup_lines():
    """`voice cleanup` answers each JSON line in order, reports a bad line and carries on."""
    stdin = "\n".join([json.dumps({"text": "um so the the meeting is at noon", "id": 1}),
                       "this is not json",
                       json.dumps({"text": "uh can you can you hear me"})]) + "\n"
    run = voice("cleanup", "--steps", "4", *MODEL_ARGS, stdin=stdin)
    assert run.returncode == 0, run.stderr
    out = [json.loads(line) for line in run.stdout.strip().splitlines()]
    assert len(out) == 3
    assert out[0]["id"] == 1 and out[0]["text"] == "um so the the meeting is at noon" and "cleaned" in out[0]
    assert "error" in out[1] and out[1]["line"] == 2
    assert out[2]["text"] == "uh can you can you hear me" and isinstance(out[2]["cleaned"], str)


def test_kiosk_without_audio_device():
    """`voice kiosk` on a machine with no audio device says so and exits non-zero, without loading models."""
    try:
        import sounddevice as sd
        if sd.query_devices():
            pytest.skip("this machine has audio devices")
    except Exception:
        pass
    run = voice("kiosk", timeout=60)
    assert run.returncode == 3
    assert "no audio" in run.stderr and "microphone" in run.stderr
    assert "loading" not in run.stderr


def test_usage_errors():
    """Missing arguments are usage errors (exit 2)."""
    assert voice("respond", timeout=60).returncode == 2
    assert voice(timeout=60).returncode == 2


def test_bad_endpointing_option_names_the_flag():
    """A negative hang-over is refused before any model loads, naming the flag."""
    run = voice("serve", "--port", "0", "--finished-hangover-ms", "-5", timeout=60)
    assert run.returncode != 0 and "--finished-hangover-ms must not be negative" in run.stderr, run.stderr
    assert "loading" not in run.stderr


def test_serve_beyond_loopback_needs_a_token():
    """`voice serve --host 0.0.0.0` with no token refuses to start, before loading any model, and says why."""
    env_token = os.environ.pop("VOICE_TOKEN", None)
    try:
        run = voice("serve", "--host", "0.0.0.0", "--port", "0", timeout=60)
    finally:
        if env_token is not None:
            os.environ["VOICE_TOKEN"] = env_token
    assert run.returncode == 1 and "--token" in run.stderr and "--insecure" in run.stderr
    assert "loading" not in run.stderr
