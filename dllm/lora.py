"""LoRA for our `Transformer`: wrap its nn.Linear layers, train, save an adapter.

Low-rank adaptation (Hu et al. 2021): a frozen weight W gets a trainable
update (alpha / r) * B @ A, with A (r, in) random and B (out, r) zero, so
training starts from the base model exactly. Besides the LoRA pairs, a few
embedding rows can be trained in full: the mask token of an AR base was
never trained as an input, so its row is learnt from scratch (DiffuGPT,
Dream). The embedding is tied to the LM head in SmolLM2, so the wrapped
head reads the same new rows; merging writes them into the shared weight.

Full fine-tuning (`add_full`) trains the same Linear weights in full; its
result ships in the same adapter format, each weight's delta cut to its best
rank-r approximation by a truncated SVD (Eckart-Young), so a GPU run's
artefact is as small as a LoRA adapter and loads the same way.

The adapter saved here is what `dllm.loaders.merge_adapter` reads.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import Transformer

DEFAULT_TARGETS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x @ A.T @ B.T, with `base` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class RowEmbedding(nn.Module):
    """An embedding whose rows `row_ids` are replaced by trainable `rows`."""

    def __init__(self, base: nn.Embedding, row_ids: list[int]):
        super().__init__()
        self.base = base
        self.register_buffer("row_ids", torch.tensor(row_ids, dtype=torch.int64))
        self.rows = nn.Parameter(base.weight.detach()[self.row_ids].float().clone())

    @property
    def weight(self) -> Tensor:  # the frozen base weight, for code that reads it
        return self.base.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.base(tokens)  # (B, T, D)
        for k in range(len(self.row_ids)):
            x = torch.where((tokens == self.row_ids[k])[..., None], self.rows[k].to(x.dtype), x)
        return x

    def head(self, h: Tensor) -> Tensor:
        """Logits (..., V) of the tied LM head with the replaced rows."""
        logits = F.linear(h, self.base.weight.to(h.dtype))
        new = F.linear(h, self.rows.to(h.dtype))  # (..., k)
        return logits.index_copy(-1, self.row_ids, new)


class TiedHead(nn.Module):
    """The LM head tied to a `RowEmbedding` (so it sees the trained rows)."""

    def __init__(self, embed: RowEmbedding):
        super().__init__()
        self.embed = [embed]  # a list, so the module is not registered twice

    def forward(self, h: Tensor) -> Tensor:
        return self.embed[0].head(h)


def add_lora(model: Transformer, *, rank: int = 16, alpha: float | None = None,
             targets: tuple[str, ...] = DEFAULT_TARGETS, train_rows: list[int] = ()) -> list[str]:
    """Freeze `model`, wrap its target Linear layers with LoRA, in place.

    `targets` are suffixes of module names ("attn.q_proj"); `train_rows` are
    embedding row ids trained in full (the mask token). Returns the wrapped
    module names ("layers.0.attn.q_proj", ...).
    """
    alpha = float(2 * rank if alpha is None else alpha)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(targets)]
    if not names:
        raise ValueError(f"no Linear module matches {targets}")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, alpha))
    if train_rows:
        model.embed = RowEmbedding(model.embed, list(train_rows))
        if model.cfg.tie_embeddings:
            model.lm_head = TiedHead(model.embed)
    return names


def add_full(model: Transformer, *, targets: tuple[str, ...] = DEFAULT_TARGETS,
             train_rows: list[int] = ()) -> dict[str, Tensor]:
    """Freeze `model` except its target Linear weights (and embedding rows `train_rows`), in place.

    Returns float32 CPU copies of the target weights as they were, the base
    that `delta_adapter_state` subtracts.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(targets)]
    if not names:
        raise ValueError(f"no Linear module matches {targets}")
    base = {}
    for name in names:
        w = model.get_submodule(name).weight
        base[name] = w.detach().float().cpu().clone()
        w.requires_grad_(True)
    if train_rows:
        model.embed = RowEmbedding(model.embed, list(train_rows))
        if model.cfg.tie_embeddings:
            model.lm_head = TiedHead(model.embed)
    return base


def _svd_factors(delta: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """LoRA factors A (rank, in), B (out, rank) with scale * B @ A the best rank-`rank`
    approximation of `delta` (out, in); also its singular values. The root of
    each singular value goes to either side, so bf16 storage loses little on
    both; a matrix narrower than `rank` gets zero rows past its own rank."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    root = (s[:k] / scale).sqrt()
    a = delta.new_zeros(rank, delta.shape[1])
    b = delta.new_zeros(delta.shape[0], rank)
    a[:k], b[:, :k] = root[:, None] * vh[:k], u[:, :k] * root
    return a, b, s


def delta_adapter_state(model: Transformer, base: dict[str, Tensor], rank: int,
                        alpha: float) -> tuple[dict[str, Tensor], float]:
    """Adapter tensors for a fully fine-tuned `model`: each target's delta from `base`,
    truncated to rank `rank` by SVD. Also returns the share of the deltas'
    squared norm that the truncation keeps (1.0: nothing lost)."""
    out, kept, total = {}, 0.0, 0.0
    scale = alpha / rank
    with torch.no_grad():
        for name, w0 in base.items():
            w = model.get_submodule(name).weight
            delta = w.detach().float() - w0.to(w.device)  # (out, in)
            a, b, s = _svd_factors(delta, rank, scale)
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a.cpu().contiguous(), b.cpu().contiguous()
            kept += float(s[:rank].pow(2).sum())
            total += float(s.pow(2).sum())
    if isinstance(model.embed, RowEmbedding):
        out["embed.rows"] = model.embed.rows.detach().float().cpu().contiguous()
        out["embed.row_ids"] = model.embed.row_ids.cpu().contiguous()
    return out, kept / total if total else 1.0


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state(model: Transformer) -> dict[str, Tensor]:
    """The adapter tensors, named as `dllm.loaders.read_adapter` expects."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach().float().cpu().contiguous()
        out[f"{name}.lora_B"] = m.lora_B.detach().float().cpu().contiguous()
    if isinstance(model.embed, RowEmbedding):
        out["embed.rows"] = model.embed.rows.detach().float().cpu().contiguous()
        out["embed.row_ids"] = model.embed.row_ids.cpu().contiguous()
    return out


def load_adapter_state(model: Transformer, tensors: dict[str, Tensor]) -> None:
    """Copy saved adapter tensors into a LoRA-wrapped model (for --resume)."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.lora_A.copy_(tensors[f"{name}.lora_A"])
            m.lora_B.copy_(tensors[f"{name}.lora_B"])
        if isinstance(model.embed, RowEmbedding) and "embed.rows" in tensors:
            model.embed.rows.copy_(tensors["embed.rows"])


def save_adapter(directory: str | Path, model: Transformer, *, meta: dict,
                 tensors: dict[str, Tensor] | None = None, rank: int | None = None, alpha: float | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write adapter.json + adapter.safetensors for a LoRA-wrapped model.

    `meta` adds fields to adapter.json (base, attention, steps, ...). With
    `tensors` (from `delta_adapter_state`), `rank` and `alpha`, those are
    written instead of the model's LoRA weights. `dtype` is the storage type
    of the float tensors (bfloat16 halves the file; merging reads either).
    The files are written to temporary names and renamed, so a reader never
    sees half an adapter.
    """
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = adapter_state(model)
        first = next(iter(lora_modules(model).values()))
        rank, alpha = first.rank, first.alpha
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    targets = sorted(k[: -len(".lora_A")] for k in tensors if k.endswith(".lora_A"))
    info = {
        "format": "voice-dllm-adapter",
        "rank": rank, "alpha": alpha,
        "targets": targets,
        "new_rows": {"embed": tensors["embed.row_ids"].tolist()} if "embed.row_ids" in tensors else {},
        **meta,
    }
    tmp = directory / "adapter.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": info["format"]})
    tmp.replace(directory / "adapter.safetensors")
    tmp_json = directory / "adapter.json.tmp"
    tmp_json.write_text(json.dumps(info, indent=2) + "\n")
    tmp_json.replace(directory / "adapter.json")
    return directory


def shrink_adapter(src: str | Path, dst: str | Path, rank: int, *, dtype: torch.dtype = torch.bfloat16) -> float:
    """Write the adapter at `src` again at a lower `rank`, each delta cut by SVD.

    A rank-r truncation of a rank-R adapter's delta is the rank-r truncation
    of the full delta it came from, so one high-rank export serves every
    smaller rank. Returns the share of the deltas' squared norm kept.
    """
    from .loaders import Adapter, read_adapter, write_adapter
    big = read_adapter(src)
    if rank > big.rank:
        raise ValueError(f"rank {rank} is above the adapter's own rank {big.rank}")
    small = Adapter(rank=rank, alpha=float(2 * rank), rows=big.rows, base=big.base, meta=dict(big.meta))
    kept = total = 0.0
    for name, (a, b) in big.lora.items():
        a2, b2, s = _svd_factors(big.scale * (b.float() @ a.float()), rank, small.scale)
        small.lora[name] = (a2.to(dtype), b2.to(dtype))
        kept += float(s[:rank].pow(2).sum())
        total += float(s.pow(2).sum())
    small.meta["shrunk_from_rank"] = big.rank
    write_adapter(dst, small)
    return kept / total if total else 1.0


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="python -m dllm.lora", description="Shrink an adapter to a lower rank (SVD).")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--rank", type=int, required=True)
    args = p.parse_args()
    print(f"rank {args.rank} keeps {shrink_adapter(args.src, args.dst, args.rank):.1%} of the deltas' squared norm")
