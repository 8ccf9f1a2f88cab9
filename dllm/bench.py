"""Denoising speed: the engine's path beside the naive one, in one run.

    python -m dllm.bench                                   # default model, CPU
    python -m dllm.bench --model llada-8b --device cuda    # random weights, LLaDA-8B's shape

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
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time

import torch

from .chat import CHATML
from .engine import Engine
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


def load(model: str, device: str, dtype: torch.dtype) -> Engine:
    if model == "default":
        from . import load_engine
        return load_engine(device=device, dtype=dtype)
    if model not in PRESETS:
        raise SystemExit(f"unknown model {model!r}: use 'default' or one of {sorted(PRESETS)}")
    from .tokenizer import Tokenizer
    cfg = PRESETS[model]
    if cfg.attention != "prefix":  # our engine's exact cache needs the prefix structure
        cfg = cfg.with_(attention="prefix")
    with torch.device(device):
        net = Transformer(cfg).to(dtype)
    tok = Tokenizer(inner=None, eos_id=0, mask_id=cfg.mask_id, end_id=0)  # ids only; no text in a benchmark
    return Engine(net, tok, CHATML, name=f"{model} (random weights)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default' or a preset name (random weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="auto: bf16 where the device has fast bf16, else float32")
    ap.add_argument("--canvas", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--reference", metavar="FILE", help="LLaDA's generate.py, to time its generate() side by side")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        from . import default_dtype
        args.dtype = str(default_dtype(args.device)).removeprefix("torch.")
    dtype = getattr(torch, args.dtype)
    print(f"loading {args.model} on {args.device} ...", file=sys.stderr, flush=True)
    eng = load(args.model, args.device, dtype)
    n_params = sum(p.numel() for p in eng.model.parameters())
    weight_bytes = n_params * torch.finfo(dtype).bits // 8
    bw = memory_bandwidth(eng.device)
    floor_ms = weight_bytes / bw * 1000
    opts = SamplerOptions(steps=args.steps)
    dev_name = torch.cuda.get_device_name() if eng.device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"command: python -m dllm.bench {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"model: {eng.name}, {n_params / 1e6:.1f}M parameters, {args.dtype}; device: {dev_name}")
    print(f"memory bandwidth {bw / 1e9:.1f} GB/s; floor per step {floor_ms:.2f} ms "
          f"({weight_bytes / 1e6:.0f} MB of weights); K = {args.steps}, prompt {args.prompt} tokens")
    header = f"{'canvas':>6} {'batch':>5} | {'engine ms/step':>14} {'tok/s':>8} {'x floor':>7} | " \
             f"{'threshold x':>11} | {'naive x':>7}"
    print(header + (f" | {'reference x':>11}" if args.reference else ""))
    threshold = SamplerOptions(steps=args.steps, schedule="threshold", threshold=0.9)
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
    print("x columns: that path's time over the engine's (above 1: the engine is faster)")


if __name__ == "__main__":
    main()
