"""Endpointing policies on speech with pauses inside sentences: cut-offs and waits.

A voice assistant has to tell a pause inside a sentence from the end of a turn.
This sweep speaks questions with the packaged piper voice, each once whole and
once broken in two by a silence of 300, 500, 800 or 1,200 ms at a point inside
the sentence, and runs every policy over the same audio, frame by frame on the
VAD's stream clock, with the real Whisper at each pause:

- `fixed H`: the utterance ends after H ms of silence (the hang-over alone);
- `words`: at a short pause Whisper reads the audio so far; if the text
  reads as finished (`asr.looks_finished`) the utterance ends when Whisper
  answers (or once the silence has lasted a given least time, if later),
  else after `unfinished` ms of silence (what `voice serve` does). The
  hang-over H applies only to speech with no pause report.

It prints, per policy, the share of broken sentences cut off at their inner
pause (a turn that ends before the speaker has finished), and the median and
p95 wait from the end of a whole sentence to its endpoint, and how many
tentative turns began at a pause the speaker then went on from. Whisper's time per
call is measured here and counted on the stream clock.

    python scripts/endpoint_sweep.py [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from asr import (VAD, SpeechPaused, SpeechResumed, SpeechStopped, Transcriber, TranscriberOptions, VADOptions,
                 looks_finished)
from tts import Synthesizer, resample

RATE = 16000
FRAME_MS = 30
# Each question with a point inside it where a speaker might stop to think ("|").
QUESTIONS = [
    "Can you tell me how to get to | the train station?",
    "What time does the | library open on Saturday?",
    "I would like to book a table for | two people tonight.",
    "Where can I find | a good coffee shop around here?",
    "Is the museum open | on Mondays?",
    "How much does a ticket for | the zoo cost?",
    "Do you know when | the next ferry leaves?",
    "Can I bring my dog | into the park?",
    "I need a taxi to | the airport tomorrow morning.",
    "Could you turn on | the lights in the kitchen?",
    "My order number is | four five six two.",
    "Which floor is the | children's section on?",
]
GAPS_MS = [300, 500, 800, 1200]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[max(0, int(np.ceil(q / 100 * len(xs))) - 1)]


class Words:
    """Whisper on the audio at each pause, with its answers and their times remembered (the same
    audio at the same pause gives the same text for every policy)."""

    def __init__(self, asr: Transcriber) -> None:
        self.asr = asr
        self.seen: dict[bytes, tuple[str, float]] = {}
        self.times: list[float] = []

    def __call__(self, audio: np.ndarray) -> tuple[str, float]:
        key = audio.tobytes()
        if key not in self.seen:
            t0 = time.perf_counter()
            text = self.asr.transcribe(audio)
            ms = (time.perf_counter() - t0) * 1000
            self.times.append(ms)
            self.seen[key] = (text, ms)
        return self.seen[key]


def endpoints(audio: np.ndarray, policy: tuple, words: Words) -> tuple[list[int], int]:
    """Stream times (ms) at which the policy ends an utterance in `audio`, and how many tentative turns it
    began and dropped (the speaker went on after the pause: Whisper, and maybe dLLM steps, spent for nothing)."""
    kind, hangover, unfinished, pause, finished = policy
    vad = VAD(VADOptions(hangover_ms=hangover, post_roll_ms=min(300, hangover),
                         pause_ms=pause if kind == "words" else 0))
    step = RATE * FRAME_MS // 1000
    ends: list[int] = []
    dropped = 0
    hint: tuple[int, bool] | None = None  # (stream ms at which Whisper answers, finished?)
    end_at: int | None = None  # the silence (ms) at which a pause that reads as finished ends
    for i in range(0, len(audio) - step + 1, step):
        now_ms = (i + step) * 1000 // RATE
        for ev in vad.feed(audio[i:i + step]):
            if isinstance(ev, SpeechPaused):
                text, ms = words(ev.audio)
                hint = (now_ms + int(ms), looks_finished(text))
                vad.set_pause_hangover(unfinished)  # the words decide; the longer hang-over is the fallback
            elif isinstance(ev, SpeechResumed):
                hint = end_at = None
                dropped += 1
            elif isinstance(ev, SpeechStopped):
                ends.append(now_ms)
                hint = end_at = None
        if hint is not None and now_ms >= hint[0]:
            if hint[1]:
                end_at = finished
            elif unfinished:
                vad.set_pause_hangover(unfinished)
            hint = None
        if end_at is not None and vad.silence_ms >= end_at:
            if vad.end_now() is not None:
                ends.append(now_ms)
            end_at = None
    return ends, dropped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print("command: python scripts/endpoint_sweep.py " + f"--threads {args.threads}")
    print(f"machine: {platform.processor() or platform.machine()}; Python {platform.python_version()}")
    synth = Synthesizer.load()
    asr = Transcriber.load(TranscriberOptions(cpu_threads=args.threads))
    words = Words(asr)

    def say(text: str) -> np.ndarray:
        return resample(synth.synthesize_all(text), synth.sample_rate, RATE)

    def quiet(ms: int) -> np.ndarray:
        return np.zeros(RATE * ms // 1000, np.int16)

    # (audio, end of speech in ms or None, ms where the inner pause starts or None)
    whole, broken = [], []
    for q in QUESTIONS:
        a, b = (part.strip() for part in q.split("|"))
        first, second, full = say(a), say(b), say(f"{a} {b}")
        speech_end = 500 + len(full) * 1000 // RATE
        whole.append(np.concatenate([quiet(500), full, quiet(4000)]))
        whole[-1] = (whole[-1], speech_end)
        for gap in GAPS_MS:
            x = np.concatenate([quiet(500), first, quiet(gap), second, quiet(4000)])
            broken.append((x, 500 + len(first) * 1000 // RATE, 500 + (len(first) + len(second)) * 1000 // RATE + gap))

    # (kind, hang-over, unfinished hang-over, pause that starts the tentative turn, least silence that ends a
    # finished-sounding one; 0: as soon as Whisper has read it)
    policies = [("fixed", 600, 0, 0, 0), ("fixed", 1000, 0, 0, 0), ("fixed", 1500, 0, 0, 0),
                ("words", 600, 1500, 200, 0)] + [("words", 600, 1500, 120, least) for least in (0, 400, 500, 600, 800)]
    print(f"{len(whole)} whole questions, {len(broken)} with a pause inside ({GAPS_MS} ms)\n")
    print("| policy | cut off at the inner pause | wait after a whole question, median (p95) ms | "
          "tentative turns dropped |")
    print("|---|---:|---:|---:|")
    for policy in policies:
        kind, hangover, unfinished, pause, finished = policy
        name = f"fixed {hangover} ms" if kind == "fixed" else (
            f"words at a {pause} ms pause, finished at " + (f"{finished} ms of silence" if finished else "once read")
            + f"; unfinished {unfinished} ms")
        waits, dropped = [], 0
        for audio, speech_end in whole:
            ends, n = endpoints(audio, policy, words)
            waits.append(ends[0] - speech_end if ends else float("nan"))
            dropped += n
        cut = 0
        for audio, pause_at, speech_end in broken:
            ends, n = endpoints(audio, policy, words)
            cut += bool(ends and ends[0] < speech_end - 100)  # ended before the second half was said
            dropped += n
        print(f"| {name} | {cut}/{len(broken)} | {statistics.median(waits):.0f} ({percentile(waits, 95):.0f}) | "
              f"{dropped} |", flush=True)
    print(f"\nWhisper per call at a pause: median {statistics.median(words.times):.0f} ms "
          f"over {len(words.times)} calls")


if __name__ == "__main__":
    main()
