"""Time the project's resampling: whole clips (`tts.resample`) and 20 ms streaming frames
(`voice.audio.StreamResampler`), median of 5 runs over 10 s of audio.

    python scripts/resample_bench.py

Run it at two commits to compare implementations (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import platform
import statistics
import subprocess
import time

import numpy as np

from tts import resample
from voice.audio import StreamResampler


def median_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    rng = np.random.default_rng(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"command: python scripts/resample_bench.py   commit: {commit}   machine: {platform.processor() or platform.machine()}")
    print(f"{'what':<40}{'median ms':>10}")
    for src, dst in ((22050, 16000), (48000, 16000), (16000, 48000)):
        x = (rng.standard_normal(src * 10) * 0.1).astype(np.float32)
        print(f"{f'whole 10 s clip {src} -> {dst}':<40}{median_ms(lambda: resample(x, src, dst)):>10.1f}")
    x = (rng.standard_normal(48000 * 10) * 3000).astype(np.int16)
    chunks = [x[i:i + 960] for i in range(0, len(x), 960)]

    def stream() -> None:
        rs = StreamResampler(48000, 16000)
        for c in chunks:
            rs.push(c)
        rs.flush()
    print(f"{'stream 10 s 48000 -> 16000, 20 ms frames':<40}{median_ms(stream):>10.1f}")


if __name__ == "__main__":
    main()
