"""Make raw transcripts for real: speak clean sentences with piper, transcribe with Whisper.

The clean sentences come from the training templates of `dllm.data` (never
the held-out ones); each row pairs Whisper's text (lower-cased, punctuation
dropped, as the recogniser's raw side) with the sentence that was spoken.
Written to OUT/asr_roundtrip.jsonl, which `python -m dllm.data` picks up.

    python scripts/asr_roundtrip.py --out data/ --seed 0 --n 300
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from asr import Transcriber
from dllm.data import Slots, TEMPLATES, clean_text, is_heldout_template, raw_words, render, vocab_words
from tts import Synthesizer, resample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=300)
    args = p.parse_args()
    out = Path(args.out) / "asr_roundtrip.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed + 7)
    slots = Slots(vocab_words(), heldout=False)
    templates = [t for i, t in enumerate(TEMPLATES) if not is_heldout_template(i)]
    sentences = [clean_text(render(rng.choice(templates), slots, rng)) for _ in range(args.n)]
    done = {json.loads(line)["cleaned"] for line in out.open()} if out.is_file() else set()
    synth, asr = Synthesizer.load(), Transcriber.load()
    t0 = time.perf_counter()
    with out.open("a") as f:
        for i, s in enumerate(sentences):
            if s in done:
                continue
            audio = resample(synth.synthesize_all(s), synth.sample_rate, 16000)
            text = asr.transcribe(audio)
            raw = " ".join(raw_words(re.sub(r"(?<=\d),(?=\d)", "", text)))
            f.write(json.dumps({"raw": raw, "cleaned": s, "reply": None, "knowledge": None, "history": []}) + "\n")
            done.add(s)
            if (i + 1) % 20 == 0:
                rate = (i + 1) / (time.perf_counter() - t0)
                print(f"{i + 1}/{len(sentences)} spoken and transcribed, {rate:.2f}/s: {s!r} -> {raw!r}", flush=True)


if __name__ == "__main__":
    main()
