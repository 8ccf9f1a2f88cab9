"""Checkpoint loaders: LLaDA, Dream (Qwen2 layout), our own format, and GGUF.

Each loader reads one on-disk layout, maps its tensor names to ours (see
`dllm.model`), checks every shape, and returns a `LoadedModel`: the model,
its tokenizer, the family's turn markers (`dllm.chat.ChatFormat`) and where
it came from. Layouts are translated here, at load, never inside `forward`.
Special-token ids (mask, eos) come from the checkpoint's config, so small
test checkpoints work; the real models' ids are only the fallbacks.

Formats (`load_model` tells them apart):
  - LLaDA-8B-Instruct (GSAI-ML, ML-GSAI/LLaDA `modeling_llada.py`):
    `model.transformer.blocks.N.*`, config keys `d_model`, `n_heads`, ...
  - Dream-v0-Instruct-7B (Dream-org/Dream `modeling_dream.py`): Qwen2 names.
  - "voice-dllm": our names, written by `save_checkpoint`, with an optional
    LoRA adapter (`save_adapter`) merged at load.
  - A llama GGUF file (SmolLM2, the packaged default), converted once into a
    "voice-dllm" cache directory because parsing the GGUF is slow.

Weights are read from safetensors only: pickle files (*.bin, *.pt) are refused
because unpickling can run arbitrary code.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from torch import Tensor, nn

from .chat import CHATML, DREAM, LLADA, ChatFormat
from .errors import CheckpointError
from .gguf_loader import load_gguf, packaged_smollm2_path
from .model import ATTENTION_KINDS, ModelConfig, Transformer
from .tokenizer import Tokenizer, tokenizer_from_json

__all__ = [
    "DEFAULT_ADAPTER", "DREAM_CHAT", "LLADA_CHAT", "OWN_FORMAT", "Adapter", "LoadedModel",
    "default_cache_dir", "detect_format", "load_adapter_into", "load_dream", "load_gguf_model", "load_llada",
    "load_model", "load_own", "merge_adapter", "read_adapter", "save_checkpoint", "write_adapter",
]

log = logging.getLogger(__name__)

OWN_FORMAT = "voice-dllm"
ADAPTER_FORMAT = "voice-dllm-adapter"
SUPPORTED = ("a voice-dllm directory (config.json with format 'voice-dllm')",
             "a LLaDA directory (model_type 'llada')",
             "a Dream/Qwen2 directory (model_type 'Dream' or 'qwen2')",
             "a llama .gguf file")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The voice adapter shipped for the packaged SmolLM2 base (written by dllm.train --copy-to).
DEFAULT_ADAPTER = Path(__file__).parent / "adapters" / "voice-smollm2"

Device = str | torch.device


# LLaDA writes Llama-3 headers, but its own vocabulary has no <|begin_of_text|>:
# its bos is <|startoftext|> (id 126080).
LLADA_CHAT = LLADA
DREAM_CHAT = DREAM

LLADA_MASK_ID = 126336
LLADA_EOS_ID = 126081
DREAM_MASK_ID = 151666
DREAM_EOS_ID = 151643


@dataclass
class LoadedModel:
    """What every loader returns: the model in eval mode, its tokenizer and turn markers."""
    model: Transformer
    tokenizer: Tokenizer
    chat: ChatFormat
    source: str  # "<format>:<path>", plus "+adapter:<path>" when one was merged


# ---------------------------------------------------------------- reading files

def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path.name} in {path.parent}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return value


def _checkpoint_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; expected a checkpoint directory")
    return directory


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory}: only pickle weights found ({', '.join(pickles)}); they are refused because "
            "unpickling can run arbitrary code. Convert them to safetensors first.")


class _Safetensors:
    """Tensor name -> safetensors file, over one model.safetensors or an indexed set of shards."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._open: dict[Path, object] = {}
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no 'weight_map'")
            for shard in sorted(set(weight_map.values())):
                if not str(shard).endswith(".safetensors"):
                    raise CheckpointError(f"{index} lists {shard!r}: only safetensors shards are accepted")
                if not (directory / shard).is_file():
                    raise CheckpointError(f"{directory}: shard {shard!r} listed in {index.name} is missing")
            self.where = {name: directory / shard for name, shard in weight_map.items()}
        elif single.is_file():
            self.where = {name: single for name in self._file(single).keys()}
        else:
            _refuse_pickles(directory)
            raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")

    def _file(self, path: Path):
        if path not in self._open:
            from safetensors import safe_open
            try:
                self._open[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {path}: {e}") from e
        return self._open[path]

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> Tensor:
        path = self.where.get(name)
        if path is None:
            raise CheckpointError(f"{self.directory}: missing tensor {name!r}")
        try:
            return self._file(path).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path.name}: missing or unreadable tensor {name!r}: {e}") from e


def _assemble(cfg: ModelConfig, names: dict[str, str], tensors: _Safetensors, *,
              dtype: torch.dtype, device: Device) -> Transformer:
    """Build a `Transformer` from `names` (our parameter -> checkpoint tensor), checking shapes."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    state = {}
    for ours, theirs in names.items():
        t = tensors.get(theirs)
        want = tuple(expected[ours].shape)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{tensors.directory}: tensor {theirs!r} has shape {tuple(t.shape)}, "
                                  f"expected {want}")
        state[ours] = t.to(device=device, dtype=dtype)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def _check_attention(kind: str | None, default: str) -> str:
    kind = default if kind is None else kind
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    return kind


def _family_tokenizer(directory: Path, chat: ChatFormat, *, mask_id: int, eos_id: int | list[int]) -> Tokenizer:
    """tokenizer.json, with the mask and eos ids from the config; the end of turn by name."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"missing tokenizer file {path}")
    try:
        inner = HFTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exception
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if isinstance(eos_id, list):  # some configs list several; the first is the eos proper
        eos_id = eos_id[0]
    tok = Tokenizer(inner=inner, eos_id=int(eos_id), mask_id=mask_id, end_id=-1)
    tok.end_id = tok.token_id(chat.end_token)
    for what, tid in (("mask", tok.mask_id), ("eos", tok.eos_id)):
        if inner.id_to_token(tid) is None:
            raise CheckpointError(f"{path}: {what} token id {tid} (from config.json) is outside the vocabulary")
    return tok


def _need(raw: dict, key: str, directory: Path):
    if raw.get(key) is None:
        raise CheckpointError(f"{directory / 'config.json'} lacks {key!r}")
    return raw[key]


# ---------------------------------------------------------------- LLaDA

# LLaDA's Llama block: act(ff_proj(x)) * up_proj(x), then ff_out. So ff_proj
# is the gate (SiLU branch) and up_proj the linear branch.
_LLADA_LAYER = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.q_proj.weight": "q_proj.weight",
    "attn.k_proj.weight": "k_proj.weight",
    "attn.v_proj.weight": "v_proj.weight",
    "attn.o_proj.weight": "attn_out.weight",
    "mlp_norm.weight": "ff_norm.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}

# Options of LLaDA's config that change the network; only these values are supported.
_LLADA_REQUIRED = {
    "block_type": ("llama",), "layer_norm_type": ("rms",), "activation_type": ("silu",),
    "alibi": (False,), "rope": (True,), "include_bias": (False,), "attention_layer_norm": (False,),
    "input_emb_norm": (False,), "scale_logits": (False,), "clip_qkv": (None,),
    "layer_norm_with_affine": (True,), "bias_for_layer_norm": (None, False),
}


def _llada_config(raw: dict, directory: Path, attention: str) -> ModelConfig:
    for key, allowed in _LLADA_REQUIRED.items():
        if key in raw and raw[key] not in allowed:
            raise CheckpointError(f"{directory}: LLaDA option {key}={raw[key]!r} is not supported "
                                  f"(supported: {allowed})")
    dim = int(_need(raw, "d_model", directory))
    n_heads = int(_need(raw, "n_heads", directory))
    n_kv = raw.get("n_kv_heads") or (1 if raw.get("multi_query_attention") else n_heads)
    hidden = raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio", 4) * dim)
    return ModelConfig(
        vocab_size=int(raw.get("embedding_size") or _need(raw, "vocab_size", directory)),
        dim=dim, n_layers=int(_need(raw, "n_layers", directory)), n_heads=n_heads, n_kv_heads=int(n_kv),
        intermediate_size=int(hidden), rope_base=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)), qkv_bias=bool(raw.get("include_qkv_bias", False)),
        tie_embeddings=bool(raw.get("weight_tying", False)), attention=attention, shift_logits=False,
        mask_id=int(raw.get("mask_token_id", LLADA_MASK_ID)), max_seq_len=int(raw.get("max_sequence_length", 4096)),
    )


def load_llada(directory: str | Path, *, dtype: torch.dtype = torch.float32, device: Device = "cpu",
               attention: str | None = None) -> LoadedModel:
    """Load a LLaDA checkpoint directory (config.json, safetensors, tokenizer.json).

    The mask id comes from config `mask_token_id` (126336 when absent), the
    eos from `eos_token_id`. Attention defaults to "bidirectional"; logits
    are not shifted. Raises `CheckpointError` on a missing file, tensor or
    shape mismatch, or an unsupported option.
    """
    directory = _checkpoint_dir(directory)
    attention = _check_attention(attention, "bidirectional")
    raw = _read_json(directory / "config.json")
    cfg = _llada_config(raw, directory, attention)
    log.info("loading LLaDA checkpoint %s", directory)
    tensors = _Safetensors(directory)
    names = {"embed.weight": "model.transformer.wte.weight", "norm.weight": "model.transformer.ln_f.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "model.transformer.ff_out.weight"
    for i in range(cfg.n_layers):
        layer = dict(_LLADA_LAYER)
        if cfg.qkv_bias:
            layer.update({f"attn.{p}.bias": f"{p}.bias" for p in ("q_proj", "k_proj", "v_proj")})
        for ours, theirs in layer.items():
            names[f"layers.{i}.{ours}"] = f"model.transformer.blocks.{i}.{theirs}"
    model = _assemble(cfg, names, tensors, dtype=dtype, device=device)
    tok = _family_tokenizer(directory, LLADA_CHAT, mask_id=cfg.mask_id, eos_id=raw.get("eos_token_id", LLADA_EOS_ID))
    return LoadedModel(model, tok, LLADA_CHAT, f"llada:{directory}")


# ---------------------------------------------------------------- Dream (Qwen2)

_QWEN2_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def _dream_config(raw: dict, directory: Path, attention: str) -> ModelConfig:
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{directory}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    if raw.get("use_sliding_window"):
        raise CheckpointError(f"{directory}: use_sliding_window is not supported")
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"{directory}: rope type {rope_type!r} is not supported (only 'default')")
    dim = int(_need(raw, "hidden_size", directory))
    n_heads = int(_need(raw, "num_attention_heads", directory))
    return ModelConfig(
        vocab_size=int(_need(raw, "vocab_size", directory)), dim=dim,
        n_layers=int(_need(raw, "num_hidden_layers", directory)), n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        intermediate_size=int(_need(raw, "intermediate_size", directory)),
        head_dim=int(raw.get("head_dim") or 0),
        rope_base=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)), qkv_bias=True,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)), attention=attention, shift_logits=True,
        mask_id=int(raw.get("mask_token_id", DREAM_MASK_ID)),
        max_seq_len=int(raw.get("max_position_embeddings", 32768)),
    )


def load_dream(directory: str | Path, *, dtype: torch.dtype = torch.float32, device: Device = "cpu",
               attention: str | None = None) -> LoadedModel:
    """Load a Dream (Qwen2 layout) checkpoint directory.

    The mask id comes from config `mask_token_id` (151666 when absent);
    logits are shifted (row i predicts token i + 1) and attention defaults to
    "bidirectional". Raises `CheckpointError` as `load_llada` does.
    """
    directory = _checkpoint_dir(directory)
    attention = _check_attention(attention, "bidirectional")
    raw = _read_json(directory / "config.json")
    cfg = _dream_config(raw, directory, attention)
    log.info("loading Dream checkpoint %s", directory)
    tensors = _Safetensors(directory)
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        for ours, theirs in _QWEN2_LAYER.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    model = _assemble(cfg, names, tensors, dtype=dtype, device=device)
    tok = _family_tokenizer(directory, DREAM_CHAT, mask_id=cfg.mask_id, eos_id=raw.get("eos_token_id", DREAM_EOS_ID))
    return LoadedModel(model, tok, DREAM_CHAT, f"dream:{directory}")


# ---------------------------------------------------------------- our own format

def save_checkpoint(directory: str | Path, model: Transformer, tokenizer: Tokenizer, chat: ChatFormat, *,
                    extra_config: dict | None = None) -> Path:
    """Write `model` (a plain `Transformer`: merge adapters first) in the voice-dllm format.

    Files: config.json, model.safetensors (our parameter names; a tied head
    is stored once, as embed.weight) and tokenizer.json.

    config.json holds the `ModelConfig` fields under "model", the chat
    markers under "chat", the tokenizer's special-token names under
    "tokenizer", and `extra_config` (JSON values) under "extra".
    """
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inner = tokenizer.inner
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()
             if not (model.cfg.tie_embeddings and name == "lm_head.weight")}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": OWN_FORMAT})
    inner.save(str(directory / "tokenizer.json"))
    config = {
        "format": OWN_FORMAT,
        "format_version": 1,
        "model": asdict(model.cfg),
        "chat": asdict(chat),
        "tokenizer": {"eos_token": inner.id_to_token(tokenizer.eos_id),
                      "mask_token": inner.id_to_token(tokenizer.mask_id),
                      "end_token": inner.id_to_token(tokenizer.end_id)},
        "extra": extra_config or {},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _from_dict(cls, values: dict, what: str, directory: Path):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"{directory / 'config.json'}: unknown {what} fields {unknown}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: bad {what}: {e}") from e


def load_own(directory: str | Path, *, adapter: str | Path | None = None, dtype: torch.dtype = torch.float32,
             device: Device = "cpu", attention: str | None = None) -> LoadedModel:
    """Load a voice-dllm directory written by `save_checkpoint`, merging `adapter` if given.

    `attention` overrides the saved attention kind. Raises `CheckpointError`.
    """
    directory = _checkpoint_dir(directory)
    raw = _read_json(directory / "config.json")
    if raw.get("format") != OWN_FORMAT:
        raise CheckpointError(f"{directory}: config.json format is {raw.get('format')!r}, expected {OWN_FORMAT!r}")
    cfg = _from_dict(ModelConfig, raw.get("model") or {}, "model", directory)
    cfg.attention = _check_attention(attention, cfg.attention)
    chat = _from_dict(ChatFormat, raw.get("chat") or {}, "chat", directory)
    specials = raw.get("tokenizer") or {}
    try:
        tok = tokenizer_from_json(directory / "tokenizer.json", eos_token=specials["eos_token"],
                                  mask_token=specials["mask_token"], end_token=specials["end_token"])
    except KeyError as e:
        raise CheckpointError(f"{directory / 'config.json'}: 'tokenizer' lacks {e.args[0]!r}") from None
    if tok.mask_id != cfg.mask_id:
        raise CheckpointError(f"{directory}: config mask_id {cfg.mask_id} differs from the tokenizer's "
                              f"mask token id {tok.mask_id}")
    log.info("loading %s", directory)
    tensors = _Safetensors(directory)
    with torch.device("meta"):
        names = {n: n for n in Transformer(cfg).state_dict()}
    if cfg.tie_embeddings:
        del names["lm_head.weight"]  # saved once, as embed.weight
    model = _assemble(cfg, names, tensors, dtype=dtype, device=device)
    loaded = LoadedModel(model, tok, chat, f"{OWN_FORMAT}:{directory}")
    if adapter is not None:
        load_adapter_into(loaded, adapter)
    return loaded


# ---------------------------------------------------------------- LoRA adapters

@dataclass
class Adapter:
    """LoRA deltas and replaced embedding rows, kept apart from a base model.

    Files (`dllm.lora.save_adapter` writes the same from a training run):
    adapter.json {"format": "voice-dllm-adapter", "base", "rank", "alpha",
    "targets": [module names], "new_rows": {module: [row ids]}, ...} and
    adapter.safetensors with `<module>.lora_A` (r, in) and `<module>.lora_B`
    (out, r) per target Linear, and `<module>.rows` (n, dim) with
    `<module>.row_ids` (n,) per module whose rows are replaced in full (the
    mask token's embedding, which an AR base never learnt). Merging adds
    (alpha / rank) * B @ A to each target's weight and writes the rows.
    Other adapter.json fields land in `meta`; "mask_token" and
    "shift_logits" there are checked against the base when merging.
    """
    rank: int
    alpha: float
    lora: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # module -> (A, B)
    rows: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # module -> (row ids, rows)
    base: str = ""  # what the adapter was trained on, for people
    meta: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def write_adapter(directory: str | Path, adapter: Adapter) -> Path:
    """Write `adapter` as adapter.json + adapter.safetensors under `directory`."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in adapter.lora.items():
        tensors[f"{name}.lora_A"] = a.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = b.detach().cpu().contiguous()
    for name, (ids, rows) in adapter.rows.items():
        tensors[f"{name}.row_ids"] = ids.detach().cpu().to(torch.int64).contiguous()
        tensors[f"{name}.rows"] = rows.detach().cpu().contiguous()
    save_file(tensors, str(directory / "adapter.safetensors"), metadata={"format": ADAPTER_FORMAT})
    info = {**adapter.meta, "format": ADAPTER_FORMAT, "base": adapter.base, "rank": adapter.rank,
            "alpha": adapter.alpha, "targets": sorted(adapter.lora),
            "new_rows": {name: ids.tolist() for name, (ids, _) in sorted(adapter.rows.items())}}
    (directory / "adapter.json").write_text(json.dumps(info, indent=2) + "\n")
    return directory


def read_adapter(directory: str | Path) -> Adapter:
    """Read an adapter directory. Raises `CheckpointError` for missing files or tensors."""
    directory = _checkpoint_dir(directory)
    info = _read_json(directory / "adapter.json")
    path = directory / "adapter.safetensors"
    if not path.is_file():
        _refuse_pickles(directory)
        raise CheckpointError(f"missing adapter.safetensors in {directory}")
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path}: {e}") from e

    def get(name: str) -> Tensor:
        if name not in tensors:
            raise CheckpointError(f"{path}: missing tensor {name!r}")
        return tensors[name]

    try:
        rank, alpha = int(info["rank"]), float(info["alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'adapter.json'} needs numeric 'rank' and 'alpha'") from e
    known = ("format", "base", "rank", "alpha", "targets", "new_rows")
    adapter = Adapter(rank=rank, alpha=alpha, base=str(info.get("base", "")),
                      meta={k: v for k, v in info.items() if k not in known})
    for name in info.get("targets") or []:
        adapter.lora[name] = (get(f"{name}.lora_A"), get(f"{name}.lora_B"))
    for name, ids in (info.get("new_rows") or {}).items():
        row_ids = get(f"{name}.row_ids")
        if row_ids.tolist() != list(ids):
            raise CheckpointError(f"{directory}: {name}.row_ids disagree with adapter.json new_rows")
        adapter.rows[name] = (row_ids, get(f"{name}.rows"))
    return adapter


def merge_adapter(model: Transformer, adapter: Adapter | str | Path) -> Transformer:
    """Merge `adapter` (or an adapter directory) into `model`'s weights, in place.

    Raises `CheckpointError` when a module is missing or a shape does not fit.
    """
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    with torch.no_grad():
        for name, (a, b) in adapter.lora.items():
            module = _submodule(model, name)
            if not isinstance(module, nn.Linear):
                raise CheckpointError(f"adapter target {name!r} is not a Linear layer")
            if name == "lm_head" and model.cfg.tie_embeddings:
                raise CheckpointError("adapter targets lm_head, which is tied to the embedding")
            w = module.weight
            want_a, want_b = (adapter.rank, w.shape[1]), (w.shape[0], adapter.rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise CheckpointError(f"adapter {name!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, "
                                      f"expected {want_a} / {want_b}")
            delta = adapter.scale * (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32))
            w.copy_((w.float() + delta).to(w.dtype))
        for name, (ids, rows) in adapter.rows.items():
            w = _submodule(model, name).weight
            fits = rows.shape == (len(ids), w.shape[1]) and all(0 <= i < w.shape[0] for i in ids.tolist())
            if not fits:
                raise CheckpointError(f"adapter rows for {name!r} ({tuple(rows.shape)} at ids {ids.tolist()[:8]}) "
                                      f"do not fit its weight {tuple(w.shape)}")
            w[ids.to(w.device)] = rows.to(w.device, w.dtype)
    return model


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"adapter names module {name!r}, which the model lacks") from None


def load_adapter_into(loaded: LoadedModel, adapter: Adapter | str | Path) -> LoadedModel:
    """Merge `adapter` into `loaded.model` in place and note it in `loaded.source`.

    Refuses an adapter trained with another mask token or logit shift than
    the base has: its learnt rows and head would be read at the wrong places.
    """
    where = "<in memory>" if isinstance(adapter, Adapter) else str(adapter)
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    cfg, inner = loaded.model.cfg, loaded.tokenizer.inner
    mask_token = adapter.meta.get("mask_token")
    if mask_token is not None and mask_token != inner.id_to_token(cfg.mask_id):
        raise CheckpointError(f"adapter {where} was trained with mask token {mask_token!r}; this base's mask is "
                              f"{inner.id_to_token(cfg.mask_id)!r}")
    shift = adapter.meta.get("shift_logits")
    if shift is not None and bool(shift) != cfg.shift_logits:
        raise CheckpointError(f"adapter {where} was trained with shift_logits={shift}; this base has "
                              f"shift_logits={cfg.shift_logits}")
    merge_adapter(loaded.model, adapter)
    loaded.source += f"+adapter:{where}"
    return loaded


# ---------------------------------------------------------------- GGUF, with a cache

def default_cache_dir() -> Path:
    """`$VOICE_CACHE_DIR`, else ~/.cache/voice."""
    env = os.environ.get("VOICE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "voice"


# Bump when the cached layout changes, so old conversions are not read.
GGUF_CACHE_VERSION = 1


def load_gguf_model(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device: Device = "cpu",
                    attention: str | None = None, cache_dir: str | Path | None = None) -> LoadedModel:
    """Load a llama GGUF file (default: the packaged SmolLM2) through a voice-dllm cache.

    Parsing and dequantising the GGUF takes seconds, so the first call
    converts it to `<cache_dir>/gguf/<name>-<size>-<mtime>/` and later calls
    load that directory. Where the cache cannot be written the GGUF is
    loaded directly each time.
    """
    path = Path(path) if path is not None else packaged_smollm2_path()
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    st = path.stat()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "gguf" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-v{GGUF_CACHE_VERSION}"
    if (target / "config.json").is_file():
        try:
            loaded = load_own(target, dtype=dtype, device=device, attention=attention)
            loaded.source = f"gguf:{path}"
            return loaded
        except CheckpointError as e:  # a damaged cache is rebuilt, never fatal
            log.warning("the cached conversion %s is unusable (%s); converting again", target, e)
            shutil.rmtree(target, ignore_errors=True)
    log.info("converting %s to %s (once)", path.name, target)
    model, tok = load_gguf(path)
    try:
        _write_cache(target, model, tok, path)
    except OSError as e:
        log.warning("cannot cache %s in %s (%s); loading it directly each time", path.name, target, e)
    model.cfg.attention = _check_attention(attention, model.cfg.attention)
    model = model.to(device=device, dtype=dtype)
    return LoadedModel(model, tok, CHATML, f"gguf:{path}")


def _write_cache(target: Path, model: Transformer, tok: Tokenizer, source: Path) -> None:
    """Write the converted checkpoint to a temporary sibling, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save_checkpoint(tmp, model, tok, CHATML, extra_config={"converted_from": str(source)})
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- dispatch

def detect_format(path: str | Path) -> str:
    """"voice-dllm", "llada", "dream" or "gguf" for a checkpoint path. Raises `CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pickle checkpoints are refused (unpickling can run arbitrary code); "
                                  "convert it to safetensors")
        raise CheckpointError(f"{path}: unknown checkpoint format; supported: {'; '.join(SUPPORTED)}")
    raw = _read_json(path / "config.json")
    model_type = str(raw.get("model_type") or "").lower()
    archs = raw.get("architectures") or []
    if raw.get("format") == OWN_FORMAT:
        return OWN_FORMAT
    if model_type == "llada" or "LLaDAModelLM" in archs:
        return "llada"
    if model_type in ("dream", "qwen2") or "DreamModel" in archs or "Qwen2ForCausalLM" in archs:
        return "dream"
    if not model_type and "d_model" in raw:
        try:
            if any(n.startswith("model.transformer.") for n in _Safetensors(path).names()):
                return "llada"
        except CheckpointError:
            pass
    raise CheckpointError(f"{path}: unknown checkpoint format (model_type {raw.get('model_type')!r}); "
                          f"supported: {'; '.join(SUPPORTED)}")


def load_model(path: str | Path | None = None, *, device: Device = "cpu", dtype: torch.dtype = torch.float32,
               attention: str | None = None, adapter: str | Path | None = None) -> LoadedModel:
    """Load any supported checkpoint; None loads the packaged SmolLM2 GGUF.

    `attention` overrides the format's default ("bidirectional" for LLaDA
    and Dream, the saved kind for voice-dllm and GGUF). `adapter` names an
    adapter directory merged after loading; "default" means the shipped
    voice adapter (`DEFAULT_ADAPTER`) when `path` is None and nothing
    otherwise.

    >>> loaded = load_model("/models/LLaDA-8B-Instruct", device="cuda", dtype=torch.bfloat16)
    """
    if adapter == "default":
        adapter = None
        if path is None and (DEFAULT_ADAPTER / "adapter.json").is_file():
            adapter = DEFAULT_ADAPTER
        elif path is None:
            log.warning("the shipped voice adapter %s is missing; using the bare SmolLM2 base", DEFAULT_ADAPTER)
    if path is None:
        loaded = load_gguf_model(None, dtype=dtype, device=device, attention=attention)
    else:
        kind = detect_format(path)
        loader = {OWN_FORMAT: load_own, "llada": load_llada, "dream": load_dream, "gguf": load_gguf_model}[kind]
        loaded = loader(path, dtype=dtype, device=device, attention=attention)
    if adapter is not None:
        load_adapter_into(loaded, adapter)
    return loaded
