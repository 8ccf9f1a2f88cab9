"""Make raw transcripts for real: speak sentences, transcribe them with Whisper.

The clean sentences come from the training templates of `dllm.training.data`
(never the held-out ones). Half of them are spoken as they are, half as a
disfluent raw version (fillers, repeats, self-corrections), so the recogniser's
own habits (dropped fillers, digits, homophones, misheard words) meet the
disfluencies. Several voices: the packaged piper voice at three paces, and
espeak-ng when its command is installed (`apt-get install espeak-ng`), a very
different synthesiser. Each row pairs Whisper's text (lower-cased, punctuation
dropped, as the recogniser's raw side) with the clean sentence. Written to
OUT/asr_roundtrip.jsonl, which `python -m dllm.training.data` picks up.

    python scripts/asr_roundtrip.py --out data/ --seed 0 --n 600
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from asr import Transcriber
from dllm.training.data import (TEMPLATES, Slots, clean_text, corrupt, is_heldout_template, raw_words, render,
                                vocab_words)
from tts import Synthesizer, SynthesizerOptions, resample


def espeak(text: str, voice: str) -> tuple[np.ndarray, int]:
    """Speech from the espeak-ng command as float32 mono and its sample rate."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", voice, "-s", "165", "-w", f.name, text], check=True, capture_output=True)
        with wave.open(f.name) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
            return pcm.astype(np.float32) / 32768.0, w.getframerate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=600)
    args = p.parse_args()
    out = Path(args.out) / "asr_roundtrip.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed + 7)
    slots = Slots(vocab_words(), heldout=False)
    templates = [t for i, t in enumerate(TEMPLATES) if not is_heldout_template(i)]
    pieces = [render(rng.choice(templates), slots, rng) for _ in range(args.n)]
    done = {json.loads(line)["spoken"] for line in out.open()} if out.is_file() else set()
    pipers = {pace: Synthesizer.load(SynthesizerOptions(length_scale=pace)) for pace in (0.85, 1.0, 1.2)}
    voices = [f"piper-{pace}" for pace in pipers] + (["espeak-en-us", "espeak-en"] if shutil.which("espeak-ng") else [])
    print(f"voices: {', '.join(voices)}", flush=True)
    asr = Transcriber.load()
    t0 = time.perf_counter()
    with out.open("a") as f:
        for i, ps in enumerate(pieces):
            clean = clean_text(ps)
            spoken = clean if rng.random() < 0.5 else corrupt(ps, slots, rng, [])
            if spoken in done:
                continue
            voice = voices[i % len(voices)]
            if voice.startswith("piper"):
                synth = pipers[float(voice.split("-")[1])]
                audio, rate = synth.synthesize_all(spoken), synth.sample_rate
            else:
                audio, rate = espeak(spoken, voice.split("-", 1)[1])
            text = asr.transcribe(resample(audio, rate, 16000))
            raw = " ".join(raw_words(re.sub(r"(?<=\d),(?=\d)", "", text)))
            f.write(json.dumps({"raw": raw, "cleaned": clean, "reply": None, "knowledge": None, "history": [],
                                "spoken": spoken, "voice": voice}) + "\n")
            done.add(spoken)
            if (i + 1) % 20 == 0:
                rate_s = (i + 1) / (time.perf_counter() - t0)
                print(f"{i + 1}/{len(pieces)} spoken and transcribed, {rate_s:.2f}/s [{voice}]: {spoken!r} -> {raw!r}",
                      flush=True)


if __name__ == "__main__":
    main()
