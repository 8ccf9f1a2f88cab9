"""The engine's queue under a cleanup flood: a voice turn's latency alone, beside a flood served
first-come-first-served, beside the same flood served fairly (priority, then round-robin), and
with the cleanup batches capped as well (`EngineOptions.max_bulk_batch`, `voice serve --bulk-batch`).

    python scripts/fair_queue_bench.py --turns 3 --flood 16

The flood is one client keeping `--flood` cleanup requests outstanding (each
answered request is replaced at once); the voice client asks `--turns` turns
one after another. "as before" gives every request the same client and
priority, which makes the queue first-come-first-served, as it was. Prints
the command, the machine and a table; results go in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import time
from dataclasses import replace

from dllm import Turn, load_engine
from dllm.engine import PRIORITY_BULK, PRIORITY_INTERACTIVE
from voice.bench import machine, percentile

QUESTION = "um what time does the the pool close on sunday"
DIRTY = ["um so i i think we should go to the the meeting", "uh the the report is due on friday i think",
         "so like can you can you send me the file"]


async def measure(engine, turns: int, flood: int, fair: bool | None) -> list[float]:
    """Turn latencies (ms); `fair` None runs no flood."""
    stop = asyncio.Event()

    async def flooder(i: int) -> None:
        while not stop.is_set():
            kw = {"client": "flood", "priority": PRIORITY_BULK} if fair else {}
            await engine.cleanup(DIRTY[i % 3], **kw)

    floods = [asyncio.create_task(flooder(i)) for i in range(flood if fair is not None else 0)]
    await asyncio.sleep(1.0 if floods else 0)  # the queue fills
    out = []
    for _ in range(turns):
        kw = {"client": "voice", "priority": PRIORITY_INTERACTIVE} if fair else {}
        t0 = time.perf_counter()
        await engine.respond(Turn(QUESTION), **kw)
        out.append((time.perf_counter() - t0) * 1000)
    stop.set()
    for t in floods:
        t.cancel()
    await asyncio.gather(*floods, return_exceptions=True)
    return out


async def main(args: argparse.Namespace) -> None:
    print(f"command: {' '.join(shlex.quote(a) for a in ['python', *sys.argv])}")
    print(f"machine: {machine()}")
    engine = load_engine()
    await engine.start()
    await engine.respond(Turn(QUESTION))  # warm-up
    rows = []
    for name, fair, bulk in (("alone", None, None), ("beside the flood, as before (FIFO)", False, None),
                             ("beside the flood, fair queue", True, None),
                             (f"beside the flood, fair queue, bulk batches of {args.bulk}", True, args.bulk)):
        engine.options = replace(engine.options, max_bulk_batch=bulk)
        ms = await measure(engine, args.turns, args.flood, fair)
        rows.append((name, len(ms), statistics.median(ms), percentile(ms, 95)))
        print(f"{name}: {[round(x) for x in ms]}", flush=True)
    await engine.close()
    print("\n| voice turn (K=8) | n | median ms | p95 ms |\n|---|---:|---:|---:|")
    for name, n, med, p95 in rows:
        print(f"| {name} | {n} | {med:.0f} | {p95:.0f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--flood", type=int, default=16, help="cleanup requests the flood keeps outstanding")
    p.add_argument("--bulk", type=int, default=4, help="the cap on cleanup batch rows in the last row")
    asyncio.run(main(p.parse_args()))
