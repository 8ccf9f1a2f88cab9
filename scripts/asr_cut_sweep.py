"""Choose Whisper's decoding settings by where an utterance may be cut.

The VAD decides where an utterance starts, and a late onset (or a short
pre-roll) cuts into the first word; Whisper tiny.en with greedy decoding can
then hear fluent nonsense ("turn off my life Simba Kitchen"). This sweep
speaks sentences with the packaged piper voice, cuts each one at points
around the start of its speech (from 100 ms of silence before it to 120 ms
inside the first word), and prints the word error rate of every
setting (beam size × silence put in front) with its median time per call.

    python scripts/asr_cut_sweep.py [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace

import numpy as np

from asr import Transcriber, TranscriberOptions
from dllm.eval.scoring import wer
from tts import Synthesizer, SynthesizerOptions, resample

SENTENCES = [
    "Can you turn off the lights in the kitchen please?",
    "What time does the museum open on Sunday?",
    "I need a ticket to Baltimore for tomorrow morning.",
    "How much is a student ticket?",
    "Please call David at three o'clock.",
    "Where can I find the restrooms?",
    "Is there parking at the hotel?",
    "My order number is four five six two.",
]
CUTS_MS = [-100, 0, 40, 80, 120]  # relative to the first loud sample
SETTINGS = [(1, 0), (1, 250), (5, 0), (5, 250)]  # (beam size, silence in front, ms)


def speech_onset(x: np.ndarray, rate: int) -> int:
    """Index of the first 10 ms frame of int16 audio louder than -40 dBFS."""
    frame = rate // 100
    for i in range(0, len(x) - frame, frame):
        if np.sqrt(np.mean((x[i:i + frame] / 32768.0) ** 2)) > 0.01:
            return i
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    clips = []
    for pace in (1.0,):
        synth = Synthesizer.load(SynthesizerOptions(length_scale=pace))
        for s in SENTENCES:
            x = resample(synth.synthesize_all(s), synth.sample_rate, 16000)
            x = np.concatenate([np.zeros(4000, x.dtype), x])  # room for the cuts before the speech
            clips.append((s, x, speech_onset(x, 16000)))
    base = Transcriber.load(TranscriberOptions(cpu_threads=args.threads))
    print(f"command: python scripts/asr_cut_sweep.py --threads {args.threads}   machine: "
          f"{platform.processor() or platform.machine()}")
    print(f"{len(clips)} clips x {len(CUTS_MS)} cut points, from {CUTS_MS[0]} to {CUTS_MS[-1]} ms around the onset")
    print(f"{'beam':>4} {'silence ms':>10} | {'WER all cuts':>12} {'WER cuts inside':>15} {'worst cut WER':>13} | "
          f"{'ms/call':>7}")
    for beam, lead in SETTINGS:
        t = Transcriber(base._model, replace(base.options, beam_size=beam, lead_silence_ms=lead))
        hyps, refs, inside_h, inside_r, times, per_cut = [], [], [], [], [], {}
        for s, x, onset in clips:
            for cut in CUTS_MS:
                t0 = time.perf_counter()
                h = t.transcribe(x[max(0, onset + cut * 16):])
                times.append(time.perf_counter() - t0)
                hyps.append(h)
                refs.append(s)
                per_cut.setdefault(cut, ([], []))
                per_cut[cut][0].append(h)
                per_cut[cut][1].append(s)
                if cut > 0:
                    inside_h.append(h)
                    inside_r.append(s)
        worst = max(wer(*v) for v in per_cut.values())
        print(f"{beam:>4} {lead:>10} | {wer(hyps, refs):>12.3f} {wer(inside_h, inside_r):>15.3f} {worst:>13.3f} | "
              f"{statistics.median(times) * 1000:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
