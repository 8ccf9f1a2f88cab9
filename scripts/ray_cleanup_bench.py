"""/v1/cleanup throughput and latency: the single-process server beside 1 and 2 dLLM replicas on Ray Serve.

    python scripts/ray_cleanup_bench.py                       # 64 requests, 8 at a time, K = 8
    python scripts/ray_cleanup_bench.py --requests 128 --concurrency 16 --replicas 1,2,4

Each setup serves the packaged dLLM (with the shipped adapter) behind one
front end in this process, a `VoiceServer` on 127.0.0.1, as `voice serve`
and `voice serve --ray` run it:

    local      the engine in this process (`voice serve`)
    ray xN     N DLLM replicas on a local Ray instance (127.0.0.1), the front
               end calling them through `voice.cluster`'s proxy; the machine's
               CPUs are split between the replicas (num_cpus, so OMP threads)

`--concurrency` clients each post one text at a time (`{"text": ...}`) until
`--requests` have been answered, after a short warm-up. Printed per setup:
requests per second over the whole run, and the median and p95 of a
request's latency as the client saw it, with the command and the machine.
The clients run in this process too (threads); they cost little beside the
model. Nothing is timed inside a test; see docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see voice.cli._openmp_defaults

TEXTS = [
    "um so i i think we should uh move the meeting to thursday",
    "uh the the budget report is is due on friday",
    "so like can you send me the the slides from yesterday",
    "i mean we we need more people on the project um",
    "okay so the the client wants uh a demo next week",
    "yeah um the server was down for like an hour this morning",
    "so uh who is who is going to the conference in may",
    "the the new office opens on monday i think",
]


@dataclass
class Result:
    setup: str
    requests: int
    wall_s: float
    latencies_ms: list[float]
    errors: int

    def row(self) -> str:
        lat = sorted(self.latencies_ms)
        p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else float("nan")
        p50 = statistics.median(lat) if lat else float("nan")
        return (f"| {self.setup} | {self.requests} | {self.requests / self.wall_s:.2f} | {p50:.0f} | {p95:.0f} "
                f"| {self.errors} |")


def post(url: str, text: str) -> int:
    req = urllib.request.Request(url, json.dumps({"text": text}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
        return r.status


async def drive(url: str, n: int, concurrency: int) -> tuple[float, list[float], int]:
    """`n` requests from `concurrency` clients; (wall seconds, latencies in ms, errors)."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=concurrency)
    latencies: list[float] = []
    errors = 0
    counter = iter(range(n))

    async def client() -> None:
        nonlocal errors
        for i in counter:
            t0 = time.perf_counter()
            try:
                await loop.run_in_executor(pool, post, url, TEXTS[i % len(TEXTS)] + f" number {i}")
                latencies.append((time.perf_counter() - t0) * 1000)
            except Exception:
                errors += 1
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    pool.shutdown()
    return wall, latencies, errors


async def measure(setup: str, services, args) -> Result:
    from voice.server import ServerOptions, VoiceServer
    server = VoiceServer(services, ServerOptions(port=0, cleanup_timeout_s=600))
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/v1/cleanup"
        await drive(url, args.concurrency, args.concurrency)  # warm-up: one round
        wall, latencies, errors = await drive(url, args.requests, args.concurrency)
    finally:
        await server.close()
    result = Result(setup, args.requests, wall, latencies, errors)
    print(result.row(), flush=True)
    return result


async def run(args) -> list[Result]:
    from voice.services import ModelOptions, Services, load_engine
    models = ModelOptions(steps=args.steps, bulk_batch=args.bulk_batch)
    cpus = args.cpus or os.cpu_count() or 1
    results = []
    if not args.no_local:
        results.append(await measure("local (one process)", Services(load_engine(models), steps=args.steps), args))
    if args.replicas:
        from voice import cluster  # before ray: it keeps a local instance on 127.0.0.1
        from ray import serve  # noqa: I001
        cluster.init_ray("local", num_cpus=cpus, log_to_driver=False)
        serve.start(proxy_location="Disabled")
        try:
            for n in args.replicas:
                options = cluster.ClusterOptions(models=models, dllm=cluster.PartOptions(
                    replicas=n, num_cpus=cpus / n, max_ongoing=64))
                cluster.deploy(options, asr=False, tts=False, redeploy=True)
                services = await cluster.connect(asr=False, tts=False)
                results.append(await measure(f"ray, {n} dLLM replica{'s' * (n > 1)} ({cpus / n:g} CPU each)",
                                             services, args))
                serve.delete(cluster.DLLM_APP)
        finally:
            serve.shutdown()
            import ray
            ray.shutdown()
    return results


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    versions = f"torch {torch.__version__}"
    try:  # not `import ray`: voice.cluster must load before it (see init_ray)
        versions += f", ray {importlib.metadata.version('ray')}"
    except importlib.metadata.PackageNotFoundError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs; Python {platform.python_version()}, {versions}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64, help="requests per setup (default: 64)")
    p.add_argument("--concurrency", type=int, default=8, help="clients at once (default: 8)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps K (default: 8)")
    p.add_argument("--bulk-batch", type=int, default=4, help="rows of a cleanup batch (default: 4, voice serve's "
                   "default on a CPU)")
    p.add_argument("--replicas", default="1,2", help="dLLM replica counts to run on Ray, comma-separated "
                   "(default: 1,2; empty: none)")
    p.add_argument("--cpus", type=int, help="CPUs Ray splits between the replicas (default: all)")
    p.add_argument("--no-local", action="store_true", help="skip the single-process server")
    args = p.parse_args(argv)
    args.replicas = [int(n) for n in args.replicas.split(",") if n.strip()]
    import logging
    logging.basicConfig(level=logging.WARNING)
    print(f"command: {' '.join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])}")
    print(f"machine: {machine()}")
    print(f"K = {args.steps}, {args.requests} requests from {args.concurrency} clients, bulk batch {args.bulk_batch}")
    print("| setup | requests | req/s | p50 ms | p95 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
