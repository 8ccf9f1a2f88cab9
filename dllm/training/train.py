"""Adapt an AR LM (SmolLM2) into a masked diffusion LM for the voice turn.

The recipe is DiffuGPT's and Dream's (Gong et al. 2024, "Scaling Diffusion
Language Models via Adaptation from Autoregressive Models"; Ye et al. 2025,
Dream 7B), fitted to `dllm.turn`:

  - the sequence is prompt + canvas, built by `encode_turn` and filled in by
    `training_canvas`, exactly as the engine lays them out at inference;
  - attention "prefix": the prompt is causal and never sees the canvas, the
    canvas sees everything (so the engine's prefix cache is exact);
  - shifted logits: canvas position j is predicted from row j - 1, so the
    AR head is reused as it is;
  - per example t ~ U(eps, 1); each editable canvas position is replaced by
    the mask token with probability t; the loss is the cross-entropy on the
    masked positions, weighted by 1/t and divided by the number of editable
    positions (the masked-diffusion ELBO, as in MDLM / LLaDA);
  - LoRA on attention and MLP plus a fully trained mask-token embedding row;
    bf16 autocast, AdamW, warmup + cosine, gradient clipping;
  - or, with --full (a GPU's worth of compute), full fine-tuning of the same
    Linear weights plus the mask row; the run then ships the weight deltas
    as a rank-r adapter, each the best rank-r approximation of its delta
    (truncated SVD), so the artefact stays as small as a LoRA adapter.

    python -m dllm.training.train --data data/train.jsonl --run runs/v1 --steps 2000
    python -m dllm.training.train --data data/train.jsonl --run runs/v1 --steps 4000 --resume
    python -m dllm.training.train --device cuda --full --time-budget 400 --data 'data/train*.jsonl' ...
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import multiprocessing
import pickle
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..chat import CHATML, ChatFormat
from ..errors import RequestError
from ..lora import add_full, add_lora, delta_adapter_state, load_adapter_state, save_adapter, trainable_parameters
from ..model import Transformer
from ..tokenizer import Tokenizer
from ..turn import Turn, TurnLayout, encode_turn, training_canvas

BASE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class TrainConfig:
    steps: int = 2000
    batch: int = 8  # examples a batch at most
    batch_tokens: int = 0  # if > 0, fewer examples when they are long: at most this many tokens a batch
    lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0
    rank: int = 16
    alpha: float = 32.0
    eps: float = 1e-3  # lower bound of t, so 1/t stays finite
    cleanup_share: float = 0.4  # share of batches with cleanup-only canvases
    reply_tokens: int = 32
    save_every: int = 100
    seed: int = 0
    bf16: bool = True
    max_examples: int = 0  # 0: all
    full: bool = False  # full fine-tuning of the LoRA targets, saved as a rank-`rank` SVD adapter
    time_budget: float = 0.0  # seconds: if > 0, `steps` is set from the measured step rate after warmup
    save_dtype: str = "float32"  # adapter tensors on disk: float32 or bfloat16 (half the size)


@dataclass
class Example:
    """One training sequence: token ids and, per canvas position, its role."""

    prompt: list[int]
    target: list[int]  # the canvas, fields written out
    editable: list[bool]  # canvas positions the model must fill
    with_reply: bool


def make_examples(rows: list[dict], tok: Tokenizer, chat: ChatFormat, mask_id: int, *,
                  layout: TurnLayout = TurnLayout()) -> tuple[list[Example], list[Example]]:
    """Tokenise data rows into (full turns, cleanup-only canvases).

    Each row gives a cleanup-only example; rows with a reply also give a
    full turn. Rows whose targets do not fit the canvas are skipped.
    """
    full, clean = [], []
    for row in rows:
        history = tuple(tuple(h) for h in row.get("history") or ())
        turn = Turn(row["raw"], history=history, knowledge=row.get("knowledge"))
        kinds = [False] + ([True] if row.get("reply") else [])
        for with_reply in kinds:
            try:
                enc = encode_turn(turn, tok, chat, mask_id=mask_id, layout=layout, with_reply=with_reply)
                target = training_canvas(enc, row["cleaned"], row.get("reply") if with_reply else None, tok)
            except RequestError:
                continue
            ex = Example(enc.prompt, target.tolist(), [f >= 0 for f in enc.field], with_reply)
            (full if with_reply else clean).append(ex)
    return full, clean


_WORKER: dict = {}  # what a forked tokenising worker reads (set before the fork)


def _examples_of(rows: list[dict]) -> tuple[list[Example], list[Example]]:
    w = _WORKER
    return make_examples(rows, w["tok"], w["chat"], w["mask_id"], layout=w["layout"])


def build_examples(rows: list[dict], tok: Tokenizer, chat: ChatFormat, mask_id: int, *, layout: TurnLayout,
                   workers: int = 1, cache: Path | None = None, log=print) -> tuple[list[Example], list[Example]]:
    """`make_examples` over `workers` forked processes (about 0.5 ms a row on one core,
    minutes for a GPU run's rows), read from or written to `cache` (a pickle)."""
    if cache is not None and cache.is_file():
        with open(cache, "rb") as f:
            full, clean = pickle.load(f)
        log(f"examples from {cache}")
        return full, clean
    t0 = time.perf_counter()
    if workers <= 1:
        full, clean = make_examples(rows, tok, chat, mask_id, layout=layout)
    else:
        _WORKER.update(tok=tok, chat=chat, mask_id=mask_id, layout=layout)
        chunks = [rows[i:i + 2000] for i in range(0, len(rows), 2000)]
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_examples_of, chunks)
        full = [e for f, _ in parts for e in f]
        clean = [e for _, c in parts for e in c]
    log(f"tokenised {len(rows)} rows in {time.perf_counter() - t0:.1f} s ({workers} workers)")
    if cache is not None:
        with open(cache.with_suffix(".tmp"), "wb") as f:
            pickle.dump((full, clean), f, protocol=pickle.HIGHEST_PROTOCOL)
        cache.with_suffix(".tmp").replace(cache)
    return full, clean


def collate(batch: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Left-pad prompts and right-pad canvases, as the engine lays them out."""
    P = max(len(e.prompt) for e in batch)
    N = max(len(e.target) for e in batch)
    B = len(batch)
    tokens = torch.full((B, P + N), pad_id, dtype=torch.long)
    valid = torch.zeros(B, P + N, dtype=torch.bool)
    editable = torch.zeros(B, N, dtype=torch.bool)
    positions = torch.zeros(B, P + N, dtype=torch.long)
    for i, e in enumerate(batch):
        lp, n = len(e.prompt), len(e.target)
        tokens[i, P - lp:P] = torch.tensor(e.prompt)
        tokens[i, P:P + n] = torch.tensor(e.target)
        valid[i, P - lp:P + n] = True
        editable[i, :n] = torch.tensor(e.editable)
        positions[i, P - lp:P + n] = torch.arange(lp + n)
    return {"tokens": tokens, "valid": valid, "editable": editable, "positions": positions,
            "prompt_len": torch.tensor(P)}


def diffusion_loss(model: Transformer, batch: dict[str, Tensor], mask_id: int, *, eps: float = 1e-3,
                   generator: torch.Generator | None = None, t: Tensor | None = None) -> Tensor:
    """The masked-diffusion loss of one collated batch (a scalar).

    Mask each editable canvas position with probability t (per example),
    predict the masked ones (row j - 1 predicts position j when the model
    shifts logits), and weight the cross-entropy by 1/t.
    """
    dev = next(model.parameters()).device
    tokens, editable = batch["tokens"].to(dev), batch["editable"].to(dev)
    P = int(batch["prompt_len"])
    B, N = editable.shape
    if t is None:  # stratified over the batch: one t in each of B equal slices, lower variance than i.i.d.
        u = (torch.arange(B) + torch.rand(B, generator=generator)) / B
        t = eps + (1 - eps) * u[torch.randperm(B, generator=generator)]
    t = t.to(dev)
    drop = (torch.rand(B, N, generator=generator).to(dev) < t[:, None]) & editable  # (B, N)
    target = tokens[:, P:]
    noisy = tokens.clone()
    noisy[:, P:] = torch.where(drop, mask_id, target)
    h, _ = model.hidden(noisy, batch["positions"].to(dev), prefix_len=P, key_valid=batch["valid"].to(dev))
    rows = h[:, P - 1:-1] if model.cfg.shift_logits else h[:, P:]  # (B, N, D): row for each canvas position
    b_idx, n_idx = drop.nonzero(as_tuple=True)
    logits = model.lm_head(rows[b_idx, n_idx]).float()  # (M, V): only masked positions
    ce = F.cross_entropy(logits, target[b_idx, n_idx], reduction="none")  # (M,)
    per_example = torch.zeros(B, dtype=ce.dtype, device=dev).index_add(0, b_idx, ce)
    weight = 1.0 / (t * editable.sum(-1).clamp(min=1))
    return (per_example * weight).mean()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Batches:
    """An endless, seeded stream of batches of similar length.

    Each batch is all full turns or all cleanup canvases. Examples are sorted
    by length and a batch is a random run of neighbours, so little of it is
    padding; with `batch_tokens` a batch of long examples holds fewer of them.
    """

    def __init__(self, full: list[Example], clean: list[Example], cfg: TrainConfig, pad_id: int):
        if not full and not clean:
            raise ValueError("no training examples")
        size = lambda e: len(e.prompt) + len(e.target)
        self.full, self.clean = sorted(full, key=size), sorted(clean, key=size)
        self.cfg, self.pad_id = cfg, pad_id
        self.rng = random.Random(cfg.seed)

    def next(self) -> dict[str, Tensor]:
        use_clean = not self.full or (self.clean and self.rng.random() < self.cfg.cleanup_share)
        pool = self.clean if use_clean else self.full
        start = self.rng.randrange(len(pool))
        n = self.cfg.batch
        if self.cfg.batch_tokens > 0:
            longest = pool[min(len(pool), start + n) - 1]
            n = max(1, min(n, self.cfg.batch_tokens // (len(longest.prompt) + len(longest.target))))
        start = min(start, max(0, len(pool) - n))
        return collate(pool[start:start + n], self.pad_id)


def adapter_meta(model: Transformer, tok: Tokenizer, cfg: TrainConfig, step: int, base: str) -> dict:
    return {"base": base, "attention": model.cfg.attention, "shift_logits": model.cfg.shift_logits,
            "mask_token": tok.inner.id_to_token(model.cfg.mask_id), "steps": step,
            "train": {k: v for k, v in asdict(cfg).items() if k not in ("save_every", "max_examples")}}


def compact_optimizer_state(state: dict) -> dict:
    """AdamW's moments in bf16: half the checkpoint that is committed between sessions.
    `load_state_dict` casts them back to the parameters' float32."""
    return {**state, "state": {k: {n: t.to(torch.bfloat16) if t.is_floating_point() and t.dim() else t
                                   for n, t in v.items()} for k, v in state["state"].items()}}


def save_state(run: Path, model: Transformer, opt: torch.optim.Optimizer, step: int, tok: Tokenizer,
               cfg: TrainConfig, base: str, copy_to: Path | None, losses: list[float], examples: int,
               full_base: dict[str, Tensor] | None = None, log=print) -> None:
    """Checkpoint: the adapter (loadable on its own) plus optimizer state and step.

    A full fine-tune (`full_base` given) saves its deltas as an SVD adapter
    and no optimizer state: it runs in one go on a GPU and is not resumed.
    """
    meta = adapter_meta(model, tok, cfg, step, base) | {"examples_seen": examples}
    dtype = getattr(torch, cfg.save_dtype)
    if full_base is not None:
        tensors, kept = delta_adapter_state(model, full_base, cfg.rank, cfg.alpha)
        meta["svd_energy_kept"] = round(kept, 4)
        save_adapter(run / "adapter", model, meta=meta, tensors=tensors, rank=cfg.rank, alpha=cfg.alpha, dtype=dtype)
        log(f"rank-{cfg.rank} SVD of the deltas keeps {kept:.1%} of their squared norm")
        state = {"step": step, "examples": examples, "losses": losses[-1000:]}
    else:
        save_adapter(run / "adapter", model, meta=meta, dtype=dtype)
        state = {"step": step, "examples": examples, "optimizer": compact_optimizer_state(opt.state_dict()),
                 "rng": torch.get_rng_state(), "losses": losses[-1000:]}
    torch.save(state, run / "state.pt.tmp")
    (run / "state.pt.tmp").replace(run / "state.pt")
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        for name in ("adapter.safetensors", "adapter.json"):
            shutil.copyfile(run / "adapter" / name, copy_to / f"{name}.tmp")
            (copy_to / f"{name}.tmp").replace(copy_to / name)


def train(model: Transformer, tok: Tokenizer, rows: list[dict], cfg: TrainConfig, *, run: Path | None = None,
          chat: ChatFormat = CHATML, resume: bool = False, copy_to: Path | None = None, base: str = BASE_NAME,
          init_adapter: Path | None = None, examples: tuple[list[Example], list[Example]] | None = None,
          log=print) -> list[float]:
    """Wrap `model` with LoRA (or, with `cfg.full`, unfreeze its targets) and train it
    on `rows`; returns the loss of each step.

    `run` receives train.log lines, `adapter/` and `state.pt` every
    `cfg.save_every` steps and at the end; with `resume` training continues
    from `run/state.pt`. `copy_to` gets a copy of each saved adapter.
    `examples` (from `build_examples`) replaces tokenising `rows` here.
    `init_adapter` starts a new run from an earlier adapter's weights (a warm
    start; its optimizer state is not carried over). With `cfg.time_budget`,
    the step count is fixed after the warmup's first 20 steps from their
    rate, so the cosine schedule ends when the budget does.
    """
    if cfg.full and (resume or init_adapter is not None):
        raise ValueError("a full fine-tune starts from the base: --resume and --init-adapter are for LoRA runs")
    torch.manual_seed(cfg.seed)
    mask_id = model.cfg.mask_id
    layout = TurnLayout(reply_tokens=cfg.reply_tokens)
    full, clean = examples or make_examples(rows, tok, chat, mask_id, layout=layout)
    log(f"examples: {len(full)} full turns, {len(clean)} cleanup canvases")
    full_base = None
    if cfg.full:
        full_base = add_full(model, train_rows=[mask_id])
    else:
        add_lora(model, rank=cfg.rank, alpha=cfg.alpha, train_rows=[mask_id])
    model.to(next(model.parameters()).device)  # the new LoRA weights join the base's device
    params = trainable_parameters(model)
    log(f"trainable parameters: {sum(p.numel() for p in params):,}")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    batches = Batches(full, clean, cfg, tok.end_id)
    start, losses, examples = 0, [], 0
    if init_adapter is not None and not (resume and run is not None and (run / "state.pt").is_file()):
        from safetensors.torch import load_file
        load_adapter_state(model, load_file(str(Path(init_adapter) / "adapter.safetensors")))
        log(f"warm start from {init_adapter}")
    if resume and run is not None and (run / "state.pt").is_file():
        from safetensors.torch import load_file
        load_adapter_state(model, load_file(str(run / "adapter" / "adapter.safetensors")))
        state = torch.load(run / "state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, losses, examples = state["step"], list(state["losses"]), state.get("examples", 0)
        batches.rng.seed(cfg.seed + start)  # a fresh but reproducible stream after resuming
        log(f"resumed at step {start}")
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed + start)
    t0, window, seen0 = time.perf_counter(), [], examples
    calibrate = (start + 5, start + 25) if cfg.time_budget > 0 else None
    step = start
    while step < cfg.steps:
        if calibrate and step == calibrate[0]:
            t_cal = time.perf_counter()
        if calibrate and step == calibrate[1]:  # the first steps are slow (allocator, kernels): not timed
            per_step = (time.perf_counter() - t_cal) / (calibrate[1] - calibrate[0])
            spent = time.perf_counter() - t0
            cfg.steps = step + max(1, int((cfg.time_budget - spent) / per_step))
            log(f"time budget {cfg.time_budget:.0f} s at {per_step * 1000:.0f} ms a step: {cfg.steps} steps")
            calibrate = None
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = batches.next()
        with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = diffusion_loss(model, batch, mask_id, eps=cfg.eps, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        losses.append(loss.item())
        window.append(loss.item())
        examples += batch["tokens"].shape[0]
        done = step + 1
        if done % 10 == 0 or done == cfg.steps or done == start + 1:
            elapsed = time.perf_counter() - t0
            rate = (done - start) / elapsed
            eta = (cfg.steps - done) / rate
            log(f"step {done}/{cfg.steps} loss {sum(window) / len(window):.4f} lr {lr_at(step, cfg):.2e} "
                f"{rate:.3f} steps/s {elapsed / max(1, examples - seen0):.3f} s/example, {examples} seen, "
                f"eta {eta / 60:.1f} min")
            window = []
        if run is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            save_state(run, model, opt, done, tok, cfg, base, copy_to, losses, examples, full_base, log)
            log(f"saved step {done} to {run / 'adapter'}" + (f" and {copy_to}" if copy_to else ""))
        step = done
    model.eval()
    return losses


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dllm.training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/train.jsonl",
                   help="training rows (from python -m dllm.training.data); a glob reads every file it matches")
    p.add_argument("--run", default="runs/voice", help="directory for train.log, adapter/ and state.pt")
    p.add_argument("--resume", action="store_true", help="continue from RUN/state.pt")
    p.add_argument("--init-adapter", default=None, help="start a new run from this adapter's weights")
    p.add_argument("--copy-to", default=None, help="also copy each saved adapter here (e.g. dllm/adapters/voice-smollm2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=1, help="processes that tokenise the rows")
    p.add_argument("--examples-cache", default=None, help="tokenised examples: read if present, else written")
    for f, v in asdict(TrainConfig()).items():
        if isinstance(v, bool):  # --full, or --bf16 false
            p.add_argument(f"--{f.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true", "yes"),
                           nargs="?", const=True, default=v)
        else:
            p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    logf = open(run / "train.log", "a", buffering=1)

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")

    log(f"config: {json.dumps(asdict(cfg))}")
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    files = sorted(glob.glob(args.data)) or [args.data]
    rows = [r for f in files for r in read_jsonl(f)]
    log(f"{len(rows)} rows from {', '.join(files)}")
    if cfg.max_examples:
        rows = rows[:cfg.max_examples]
    from .. import fast_bf16
    from ..gguf_loader import load_gguf, packaged_smollm2_path
    model, tok = load_gguf(packaged_smollm2_path())
    if cfg.bf16 and not fast_bf16(args.device):
        log(f"bf16 is slow on this {args.device} (no bf16 units): training in float32")
        cfg.bf16 = False
    if cfg.bf16 and not cfg.full:  # the frozen base in bf16 (no per-step casts); LoRA weights stay float32
        model = model.to(torch.bfloat16)
    model = model.to(args.device)
    examples = build_examples(rows, tok, CHATML, model.cfg.mask_id, layout=TurnLayout(reply_tokens=cfg.reply_tokens),
                              workers=args.workers, cache=Path(args.examples_cache) if args.examples_cache else None,
                              log=log)
    train(model, tok, rows, cfg, run=run, resume=args.resume, log=log, examples=examples,
          copy_to=Path(args.copy_to) if args.copy_to else None,
          init_adapter=Path(args.init_adapter) if args.init_adapter else None)
    log("done")


if __name__ == "__main__":
    sys.exit(main())
