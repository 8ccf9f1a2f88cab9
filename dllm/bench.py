"""Denoising speed: the engine's path beside the naive one, in one run.

    python -m dllm.bench                                   # default model, CPU
    python -m dllm.bench --model llada-8b --device cuda    # random weights, LLaDA-8B's shape
    OMP_WAIT_POLICY=PASSIVE python -m dllm.bench --llama --no-grid --threads 2  # a voice turn beside llama.cpp

For each canvas length and batch size it prints the time per denoising step
and canvas tokens per second for
  - "engine": prefix cache + batching (what the server runs),
  - "naive": the whole sequence every step, requests one at a time,
  - "threshold": the engine with Fast-dLLM's confidence-threshold schedule
    (prefix cache + threshold 0.9; it may finish in fewer than K calls),
  - "reference" (with `--reference FILE`): LLaDA's own `generate()` from a
    generate.py you supply (ML-GSAI/LLaDA; it is not part of this project),
    run on the same model and prompt, one request at a time,
and the physical floor per step (weight bytes over the memory bandwidth
measured in this run): no step can read its weights faster than that.
Speed does not depend on the weights, so a preset name runs random weights.

With `--llama` (default model only) it also times one typical voice turn
(the packaged GGUF with the adapter, the server's sampler) beside
llama-cpp-python on the same GGUF file and thread count, reading the same
prompt tokens and then writing, greedily and with the end tokens banned so
it cannot stop early, as many tokens as our canvas's two fields hold
(cleaned + reply): the autoregressive cost of the same output.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import torch

from . import PRECISIONS, default_dtype, default_precision
from .chat import CHATML
from .engine import Engine, EngineOptions
from .model import PRESETS, Transformer
from .sampler import SamplerOptions
from .turn import Encoded


def memory_bandwidth(device: torch.device, mbytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    n = mbytes * 2**20 // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic(prompt_len: int, canvas_len: int, mask_id: int, vocab: int, seed: int) -> Encoded:
    """A request of the given sizes: random prompt tokens, an all-mask canvas."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, vocab - 100, (prompt_len,), generator=g).tolist()
    return Encoded(prompt=prompt, canvas=[mask_id] * canvas_len, field=[0] * canvas_len, with_reply=False)


def time_engine(engine: Engine, batch: list[Encoded], opts: SamplerOptions, cache: str, batched: bool,
                repeats: int) -> float:
    """Median seconds to denoise the whole batch."""
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        _sync(engine.device)
        t0 = time.perf_counter()
        if batched:
            engine.generate(batch, opts, cache=cache)
        else:
            for e in batch:
                engine.generate([e], opts, cache=cache)
        _sync(engine.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


class _LogitsOnly:
    """Our model behind the call LLaDA's generate() makes: `model(x).logits`."""

    def __init__(self, engine: Engine):
        self.engine, self.device = engine, engine.device

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        logits = self.engine.model(x)
        if self.engine.cfg.shift_logits:  # the reference reads position j from row j
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return type("Output", (), {"logits": logits})()


def time_reference(path: str, engine: Engine, batch: list[Encoded], steps: int, repeats: int) -> float:
    """Median seconds for LLaDA's reference generate() over the batch, one request at a time."""
    spec = importlib.util.spec_from_file_location("reference_generate", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}: pass LLaDA's generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = _LogitsOnly(engine)
    times = []
    for _ in range(repeats + 1):
        _sync(engine.device)
        t0 = time.perf_counter()
        for e in batch:
            prompt = torch.tensor([e.prompt], device=engine.device)
            n = len(e.canvas)
            with torch.inference_mode():
                module.generate(model, prompt, steps=steps, gen_length=n, block_length=n, temperature=0.0,
                                cfg_scale=0.0, remasking="low_confidence", mask_id=engine.cfg.mask_id)
        _sync(engine.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# A transcript as Whisper hands it over; its cleaned field takes the smallest bucket but one.
VOICE_TRANSCRIPT = "um what time does the uh the library open on saturday"


def time_turn(engine: Engine, enc: Encoded, opts: SamplerOptions, repeats: int) -> float:
    """Median seconds for one whole voice turn as the server runs it (prompt cache, K steps, decoding)."""
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        _sync(engine.device)
        t0 = time.perf_counter()
        engine.run([enc], opts)
        _sync(engine.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def time_llama(path: str, prompt: list[int], n_tokens: int, threads: int, banned: list[int],
               repeats: int) -> tuple[float, float]:
    """Median seconds of llama-cpp-python reading `prompt` and writing exactly `n_tokens` tokens greedily,
    as (prompt + first token, all). `banned` (its end tokens) get -inf logits so it never stops early.

    Raises ImportError with what to install when llama_cpp is missing."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError as e:
        raise ImportError(f"llama-cpp-python is not installed here ({e}); install the peer extra, "
                          "`pip install -e '.[peer]'` (it builds llama.cpp; see docs/BENCHMARKS.md)") from e
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                          n_ctx=max(512, len(prompt) + n_tokens + 16), verbose=False)

    def no_end(_ids, logits):
        logits[banned] = -np.inf
        return logits

    processors = llama_cpp.LogitsProcessorList([no_end])
    firsts, totals = [], []
    for _ in range(repeats + 1):  # the first run warms up
        llm.reset()  # no reuse of the previous run's prompt cache: every run reads the whole prompt
        t0 = time.perf_counter()
        written = 0
        for _tok in llm.generate(prompt, temp=0.0, top_k=1, logits_processor=processors):
            written += 1
            if written == 1:
                first = time.perf_counter() - t0
            if written == n_tokens:
                break
        totals.append(time.perf_counter() - t0)
        firsts.append(first)
    return statistics.median(firsts[1:]), statistics.median(totals[1:])


def llama_side_by_side(eng: Engine, model_path: str, steps: int, threads: int, repeats: int) -> None:
    """Print one voice turn of ours beside llama.cpp writing as many tokens on the same GGUF and threads."""
    from .turn import Turn

    enc = eng.encode(Turn(VOICE_TRANSCRIPT))
    n = sum(1 for f in enc.field if f >= 0)  # the cleaned and reply fields, labels and the end excluded
    opts = replace(eng.options.sampler, steps=steps)
    print(f"\nvoice turn: {VOICE_TRANSCRIPT!r}, prompt {len(enc.prompt)} tokens, canvas {len(enc.canvas)} "
          f"({n} in the cleaned + reply fields), K = {steps}; llama.cpp on {model_path}, {threads} threads")
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        # torch reads it when it loads, before this runs; the server sets it (voice.cli._openmp_defaults)
        print("note: OMP_WAIT_POLICY=PASSIVE is not set, as the server sets it: spinning OpenMP threads slow "
              "both paths on a busy machine; run with OMP_WAIT_POLICY=PASSIVE in the environment")
    ours = time_turn(eng, enc, opts, repeats)
    print(f"{'path':>22} | {'turn ms':>8} | {'tokens':>6} | note")
    print(f"{'ours (dLLM, K steps)':>22} | {ours * 1000:>8.0f} | {n:>6} | the whole canvas in one pass", flush=True)
    try:
        first, total = time_llama(model_path, enc.prompt, n, threads, sorted({eng.tok.eos_id, eng.tok.end_id}),
                                  repeats)
    except ImportError as e:
        print(f"llama.cpp side by side skipped: {e}")
        return
    gen_rate = (n - 1) / (total - first) if total > first else float("inf")
    print(f"{'llama.cpp (AR)':>22} | {total * 1000:>8.0f} | {n:>6} | prompt + first token {first * 1000:.0f} ms, "
          f"then {gen_rate:.0f} tokens/s")
    print(f"ours / llama.cpp: {ours / total:.2f}x (below 1: ours is faster)")


def load(model: str, device: str, precision: str) -> Engine:
    if model == "default":
        from . import load_engine
        return load_engine(device=device, precision=precision)
    if precision == "int8":
        raise SystemExit("int8 calibrates on real turns: use it with the default model")
    dtype = getattr(torch, precision)
    if model not in PRESETS:
        raise SystemExit(f"unknown model {model!r}: use 'default' or one of {sorted(PRESETS)}")
    from .tokenizer import Tokenizer
    cfg = PRESETS[model]
    if cfg.attention != "prefix":  # our engine's exact cache needs the prefix structure
        cfg = cfg.with_(attention="prefix")
    with torch.device(device):
        net = Transformer(cfg).to(dtype)
    tok = Tokenizer(inner=None, eos_id=0, mask_id=cfg.mask_id, end_id=0)  # ids only; no text in a benchmark
    # Random weights write no words, so the guard that reads them (no_repeat) has nothing to go on.
    options = EngineOptions(sampler=SamplerOptions(no_repeat=False))
    return Engine(net, tok, CHATML, options=options, name=f"{model} (random weights)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default' or a preset name (random weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="auto: bf16 where the device has fast bf16, else int8 on a CPU (float32 on other devices)")
    ap.add_argument("--canvas", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--reference", metavar="FILE", help="LLaDA's generate.py, to time its generate() side by side")
    ap.add_argument("--llama", action="store_true",
                    help="also time a voice turn beside llama-cpp-python on the same GGUF and threads "
                         "(default model; needs the peer extra)")
    ap.add_argument("--no-grid", action="store_true", help="skip the canvas x batch table (with --llama: the turn only)")
    args = ap.parse_args(argv)
    if args.llama and args.model != "default":
        ap.error("--llama compares the default model with llama.cpp on its GGUF: leave --model out")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "auto":  # int8 calibrates on real turns: the random-weight presets keep float weights
        args.precision = default_precision(args.device) if args.model == "default" else \
            str(default_dtype(args.device)).removeprefix("torch.")
    print(f"loading {args.model} on {args.device} ...", file=sys.stderr, flush=True)
    eng = load(args.model, args.device, args.precision)
    n_params = sum(p.numel() for p in eng.model.parameters())
    bytes_per_weight = 1 if args.precision == "int8" else torch.finfo(getattr(torch, args.precision)).bits // 8
    weight_bytes = n_params * bytes_per_weight
    bw = memory_bandwidth(eng.device)
    floor_ms = weight_bytes / bw * 1000
    opts = replace(eng.options.sampler, steps=args.steps)  # a random preset's engine drops no_repeat
    dev_name = torch.cuda.get_device_name() if eng.device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"command: python -m dllm.bench {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"model: {eng.name}, {n_params / 1e6:.1f}M parameters, {args.precision}; device: {dev_name}")
    print(f"memory bandwidth {bw / 1e9:.1f} GB/s; floor per step {floor_ms:.2f} ms "
          f"({weight_bytes / 1e6:.0f} MB of weights); K = {args.steps}, prompt {args.prompt} tokens")
    if args.no_grid:
        args.canvas = []
    header = f"{'canvas':>6} {'batch':>5} | {'engine ms/step':>14} {'tok/s':>8} {'x floor':>7} | " \
             f"{'threshold x':>11} | {'naive x':>7}"
    if args.canvas:
        print(header + (f" | {'reference x':>11}" if args.reference else ""))
    threshold = replace(opts, schedule="threshold", threshold=0.9)
    for n in args.canvas:
        for b in args.batch:
            batch = [synthetic(args.prompt - i % 7, n, eng.cfg.mask_id, eng.cfg.vocab_size, i) for i in range(b)]
            fast = time_engine(eng, batch, opts, eng.cache_mode, True, args.repeats)
            thr = time_engine(eng, batch, threshold, eng.cache_mode, True, args.repeats)
            slow = time_engine(eng, batch, opts, "none", False, max(1, args.repeats // 2))
            per_step = fast / args.steps * 1000
            row = (f"{n:>6} {b:>5} | {per_step:>14.1f} {n * b / fast:>8.0f} {per_step / floor_ms:>7.1f} | "
                   f"{thr / fast:>10.2f}x | {slow / fast:>6.1f}x")
            if args.reference:
                ref = time_reference(args.reference, eng, batch, args.steps, max(1, args.repeats // 2))
                row += f" | {ref / fast:>10.1f}x"
            print(row, flush=True)
    if args.canvas:
        print("x columns: that path's time over the engine's (above 1: the engine is faster)")
    if args.llama:
        from .gguf_loader import packaged_smollm2_path
        llama_side_by_side(eng, str(packaged_smollm2_path()), args.steps, args.threads or torch.get_num_threads(),
                           args.repeats)


if __name__ == "__main__":
    main()
