"""Choose Whisper's decoding settings by where an utterance may be cut.

The VAD decides where an utterance starts, and a late onset (or a short
pre-roll) cuts into the first word; Whisper tiny.en with greedy decoding can
then hear fluent nonsense ("turn off my life Simba Kitchen"). This sweep
speaks sentences with the packaged piper voice, cuts each one at points
around the start of its speech (from 100 ms of silence before it to 120 ms
inside the first word), and prints the word error rate of every
setting (beam size × silence put in front × the encoder's window) with its
median time per call.

    python scripts/asr_cut_sweep.py [--threads 2] [--beams 1,5] [--silences 0,250] [--windows 30,10,12,15]
"""
from __future__ import annotations

import argparse
import itertools
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
    "What time does the library open on Saturday?",
    "Do you know when the next ferry leaves?",
    "Which floor is the children's section on?",
    "Can I bring my dog into the park?",
    "Um so I was wondering if you could tell me how to get to the train station.",
    "Thanks a lot, that was really helpful.",
    "Hi there, how are you doing today?",
    "I'd like to book a table for two at seven thirty tonight please.",
]
CUTS_MS = [-100, 0, 40, 80, 120]  # relative to the first loud sample


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
    p.add_argument("--beams", default="1", help="beam sizes, a comma list")
    p.add_argument("--silences", default="250", help="silence put in front, ms, a comma list")
    p.add_argument("--windows", default="30,10,12,15", help="the encoder's shortest window, s, a comma list (30: "
                                                             "Whisper's own)")
    p.add_argument("--paces", default="0.85,1,1.2", help="piper's length scales, a comma list (1: its own pace)")
    args = p.parse_args()
    settings = list(itertools.product(*([int(v) for v in a.split(",")] for a in (args.beams, args.silences)),
                                      [float(v) for v in args.windows.split(",")]))
    clips = []
    for pace in [float(v) for v in args.paces.split(",")]:
        synth = Synthesizer.load(SynthesizerOptions(length_scale=pace))  # with piper's noise: varied takes
        for s in SENTENCES:
            x = resample(synth.synthesize_all(s), synth.sample_rate, 16000)
            # room for the cuts before the speech, and the 300 ms of silence after it that the VAD keeps
            x = np.concatenate([np.zeros(4000, x.dtype), x, np.zeros(4800, x.dtype)])
            clips.append((s, x, speech_onset(x, 16000)))
    base = Transcriber.load(TranscriberOptions(cpu_threads=args.threads))
    print(f"command: python scripts/asr_cut_sweep.py --threads {args.threads} --beams {args.beams} --silences "
          f"{args.silences} --windows {args.windows} --paces {args.paces}   machine: "
          f"{platform.processor() or platform.machine()}")
    print(f"{len(clips)} clips x {len(CUTS_MS)} cut points, from {CUTS_MS[0]} to {CUTS_MS[-1]} ms around the onset")
    print(f"{'beam':>4} {'silence ms':>10} {'window s':>8} | {'WER all cuts':>12} {'WER cuts inside':>15} "
          f"{'worst cut WER':>13} | {'ms/call':>7}")
    for beam, lead, window in settings:
        t = Transcriber(base._model, replace(base.options, beam_size=beam, lead_silence_ms=lead,
                                             window_s=None if window >= 30 else window))
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
        print(f"{beam:>4} {lead:>10} {window:>8g} | {wer(hyps, refs):>12.3f} {wer(inside_h, inside_r):>15.3f} "
              f"{worst:>13.3f} | {statistics.median(times) * 1000:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
