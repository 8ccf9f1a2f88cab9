"""Checkpoint loaders on tiny random checkpoints written in the real layouts.

LLaDA weights are checked against transformers' Llama and Dream weights
against Qwen2, both run with an all-visible 4-D attention mask (and with
their default causal mask for our "causal" kind), on the same weights.
"""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from dllm.chat import CHATML
from dllm.errors import CheckpointError
from dllm.loaders import (DEFAULT_ADAPTER, DREAM_CHAT, LLADA_CHAT, Adapter, detect_format, load_adapter_into,
                          load_dream, load_gguf_model, load_llada, load_model, load_own, merge_adapter, read_adapter,
                          save_checkpoint, write_adapter)

transformers = pytest.importorskip("transformers")

VOCAB, DIM, LAYERS, HEADS, KV_HEADS, FF = 300, 64, 2, 4, 2, 128
LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|mdm_mask|>"]
DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]


def write_tokenizer(path, specials: list[str]) -> dict[str, int]:
    """A word-level tokenizer of VOCAB entries whose last ids are `specials`."""
    words = ["[UNK]"] + [f"w{i}" for i in range(VOCAB - 1 - len(specials))]
    inner = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert inner.get_vocab_size() == VOCAB
    inner.save(str(path / "tokenizer.json"))
    return {t: inner.token_to_id(t) for t in specials}


def random_weights(names_shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in names_shapes.items():
        if "norm" in name or "ln_f" in name:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.1 * torch.randn(shape, generator=g)
    return out


def write_shards(path, tensors: dict[str, torch.Tensor], n_shards: int) -> None:
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = names[s::n_shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(path / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def make_llada(path, *, drop: str | None = None, reshape: str | None = None,
               config_changes: dict | None = None) -> dict[str, torch.Tensor]:
    """A LLaDA-8B-Instruct-shaped checkpoint at toy size: 2 shards + index."""
    path.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(path, LLADA_SPECIALS)
    hd = DIM // HEADS
    shapes = {"model.transformer.wte.weight": (VOCAB, DIM), "model.transformer.ln_f.weight": (DIM,),
              "model.transformer.ff_out.weight": (VOCAB, DIM)}
    for i in range(LAYERS):
        b = f"model.transformer.blocks.{i}."
        shapes.update({b + "attn_norm.weight": (DIM,), b + "ff_norm.weight": (DIM,),
                       b + "q_proj.weight": (HEADS * hd, DIM), b + "k_proj.weight": (KV_HEADS * hd, DIM),
                       b + "v_proj.weight": (KV_HEADS * hd, DIM), b + "attn_out.weight": (DIM, DIM),
                       b + "ff_proj.weight": (FF, DIM), b + "up_proj.weight": (FF, DIM),
                       b + "ff_out.weight": (DIM, FF)})
    tensors = random_weights(shapes)
    written = dict(tensors)
    if drop:
        del written[drop]
    if reshape:
        written[reshape] = torch.zeros(DIM, DIM)
    write_shards(path, written, 2)
    config = {  # the keys of LLaDA-8B-Instruct's config.json, at toy size
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": DIM,
        "embedding_dropout": 0.0, "embedding_size": VOCAB, "eos_token_id": ids["<|endoftext|>"],
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": ids["<|mdm_mask|>"], "max_sequence_length": 128,
        "mlp_hidden_size": FF, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": HEADS, "n_kv_heads": KV_HEADS, "n_layers": LAYERS, "pad_token_id": ids["<|endoftext|>"],
        "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-5, "rope": True,
        "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False, "use_cache": False,
        "vocab_size": VOCAB, "weight_tying": False,
    }
    config.update(config_changes or {})
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def make_dream(path, *, tie: bool = False) -> dict[str, torch.Tensor]:
    """A Dream-v0-Instruct-shaped (Qwen2 layout) checkpoint at toy size: one model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(path, DREAM_SPECIALS)
    hd = DIM // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM), "model.norm.weight": (DIM,)}
    if not tie:
        shapes["lm_head.weight"] = (VOCAB, DIM)
    for i in range(LAYERS):
        b = f"model.layers.{i}."
        shapes.update({b + "input_layernorm.weight": (DIM,), b + "post_attention_layernorm.weight": (DIM,),
                       b + "self_attn.q_proj.weight": (HEADS * hd, DIM), b + "self_attn.q_proj.bias": (HEADS * hd,),
                       b + "self_attn.k_proj.weight": (KV_HEADS * hd, DIM),
                       b + "self_attn.k_proj.bias": (KV_HEADS * hd,),
                       b + "self_attn.v_proj.weight": (KV_HEADS * hd, DIM),
                       b + "self_attn.v_proj.bias": (KV_HEADS * hd,),
                       b + "self_attn.o_proj.weight": (DIM, DIM), b + "mlp.gate_proj.weight": (FF, DIM),
                       b + "mlp.up_proj.weight": (FF, DIM), b + "mlp.down_proj.weight": (DIM, FF)})
    tensors = random_weights(shapes, seed=1)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {  # the keys of Dream-v0-Instruct-7B's config.json, at toy size
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"], "hidden_act": "silu",
        "hidden_size": DIM, "initializer_range": 0.02, "intermediate_size": FF, "mask_token_id": ids["<|mask|>"],
        "max_position_embeddings": 128, "max_window_layers": LAYERS, "model_type": "Dream",
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
        "pad_token_id": ids["<|endoftext|>"], "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": tie, "torch_dtype": "float32", "use_cache": False,
        "use_sliding_window": False, "vocab_size": VOCAB,
    }
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def hf_llama_from_llada(t: dict[str, torch.Tensor]):
    """transformers' Llama holding LLaDA's weights: ff_proj is the gate, up_proj the linear branch."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=128, tie_word_embeddings=False)
    sd = {"model.embed_tokens.weight": t["model.transformer.wte.weight"],
          "model.norm.weight": t["model.transformer.ln_f.weight"],
          "lm_head.weight": t["model.transformer.ff_out.weight"]}
    theirs = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
              "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
              "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
    for i in range(LAYERS):
        for hf_name, llada_name in theirs.items():
            sd[f"model.layers.{i}.{hf_name}.weight"] = t[f"model.transformer.blocks.{i}.{llada_name}.weight"]
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


def hf_qwen2(t: dict[str, torch.Tensor], *, tie: bool = False):
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=128, tie_word_embeddings=tie, use_sliding_window=False)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    sd = dict(t)
    if tie:
        sd["lm_head.weight"] = t["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)
    return model


def tokens_and_changed_last(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=g)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    return tokens, changed


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor, *, full: bool) -> torch.Tensor:
    if not full:
        return model(tokens).logits
    B, T = tokens.shape
    return model(tokens, attention_mask=torch.ones(B, 1, T, T, dtype=torch.bool)).logits


@torch.no_grad()
def our_logits(loaded, tokens: torch.Tensor) -> torch.Tensor:
    return loaded.model(tokens)


def assert_matches_bidirectional(ours, theirs) -> None:
    tokens, changed = tokens_and_changed_last()
    a, b = our_logits(ours, tokens), hf_logits(theirs, tokens, full=True)
    assert (a - b).abs().max() < 1e-4
    a2, b2 = our_logits(ours, changed), hf_logits(theirs, changed, full=True)
    assert (a2 - b2).abs().max() < 1e-4
    # Truly non-causal: a later token changes the first position's output, in both.
    assert (a[:, 0] - a2[:, 0]).abs().max() > 1e-3
    assert (b[:, 0] - b2[:, 0]).abs().max() > 1e-3


def assert_matches_causal(ours, theirs) -> None:
    tokens, changed = tokens_and_changed_last()
    a, b = our_logits(ours, tokens), hf_logits(theirs, tokens, full=False)
    assert (a - b).abs().max() < 1e-4
    assert torch.equal(a[:, :-1], our_logits(ours, changed)[:, :-1])


# ---------------------------------------------------------------- LLaDA

def test_llada_matches_hf_llama_with_full_mask(tmp_path):
    """LLaDA layout (2 shards + index) loads and matches Llama run with an all-visible mask."""
    tensors = make_llada(tmp_path / "llada")
    loaded = load_model(tmp_path / "llada")
    assert loaded.source.startswith("llada:")
    assert loaded.model.cfg.attention == "bidirectional" and not loaded.model.cfg.shift_logits
    assert_matches_bidirectional(loaded, hf_llama_from_llada(tensors))


def test_llada_causal_matches_hf_default(tmp_path):
    """Our "causal" attention on LLaDA weights matches Llama's default causal forward."""
    tensors = make_llada(tmp_path / "llada")
    assert_matches_causal(load_llada(tmp_path / "llada", attention="causal"), hf_llama_from_llada(tensors))


def test_llada_special_tokens_come_from_config(tmp_path):
    """The mask and eos ids are read from config.json, not the 8B defaults; chat is Llama-3."""
    make_llada(tmp_path / "llada")
    loaded = load_llada(tmp_path / "llada")
    tok = loaded.tokenizer
    assert loaded.chat == LLADA_CHAT
    assert loaded.model.cfg.mask_id == tok.mask_id == tok.token_id("<|mdm_mask|>") != 126336
    assert tok.eos_id == tok.token_id("<|endoftext|>")
    assert tok.end_id == tok.token_id("<|eot_id|>")
    chat = loaded.chat
    prompt = chat.bos + chat.message("user", "w1 w2") + chat.assistant_open
    assert prompt == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nw1 w2<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    names = [tok.inner.id_to_token(i) for i in tok.encode(prompt)]
    # The markers are single special tokens ("user" is not in the toy vocabulary).
    assert names == ["<|startoftext|>", "<|start_header_id|>", "[UNK]", "<|end_header_id|>", "w1", "w2",
                     "<|eot_id|>", "<|start_header_id|>", "[UNK]", "<|end_header_id|>"]


def test_dtype_is_applied(tmp_path):
    """`dtype` converts every weight; bfloat16 logits stay close to float32 ones."""
    make_llada(tmp_path / "llada")
    full = load_model(tmp_path / "llada")
    half = load_model(tmp_path / "llada", dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    tokens, _ = tokens_and_changed_last()
    assert (our_logits(half, tokens).float() - our_logits(full, tokens)).abs().max() < 0.1


def test_llada_mask_id_outside_vocab_is_refused(tmp_path):
    """A mask id the tokenizer lacks (the 8B default on a tiny vocab) is a clear error."""
    make_llada(tmp_path / "llada", config_changes={"mask_token_id": 126336})
    with pytest.raises(CheckpointError, match="mask token id 126336"):
        load_llada(tmp_path / "llada")


def test_llada_detected_by_tensor_names(tmp_path):
    """A LLaDA config without model_type is still recognised by its model.transformer.* names."""
    make_llada(tmp_path / "llada", config_changes={"model_type": None, "architectures": None})
    assert detect_format(tmp_path / "llada") == "llada"


# ---------------------------------------------------------------- Dream

def test_dream_matches_hf_qwen2_with_full_mask(tmp_path):
    """Dream (Qwen2 layout, QKV bias) loads and matches Qwen2 run with an all-visible mask."""
    tensors = make_dream(tmp_path / "dream")
    loaded = load_model(tmp_path / "dream")
    cfg = loaded.model.cfg
    assert loaded.source.startswith("dream:") and loaded.chat == DREAM_CHAT
    assert cfg.shift_logits and cfg.qkv_bias and cfg.attention == "bidirectional"
    assert cfg.mask_id == loaded.tokenizer.token_id("<|mask|>") != 151666
    assert loaded.tokenizer.end_id == loaded.tokenizer.token_id("<|im_end|>")
    assert_matches_bidirectional(loaded, hf_qwen2(tensors))


def test_dream_causal_and_tied_match_hf(tmp_path):
    """Tied embeddings (no lm_head tensor) load tied; "causal" matches Qwen2's default forward."""
    tensors = make_dream(tmp_path / "dream", tie=True)
    loaded = load_dream(tmp_path / "dream", attention="causal")
    assert loaded.model.lm_head.weight is loaded.model.embed.weight
    assert_matches_causal(loaded, hf_qwen2(tensors, tie=True))


# ---------------------------------------------------------------- errors

def test_missing_directory_and_config(tmp_path):
    """A missing directory or config.json is named in the error."""
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty")


def test_missing_shard(tmp_path):
    """A shard listed in the index but absent is named."""
    make_llada(tmp_path / "llada")
    (tmp_path / "llada" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(tmp_path / "llada")


def test_missing_tensor(tmp_path):
    """A tensor the layout needs but the checkpoint lacks is named."""
    make_llada(tmp_path / "llada", drop="model.transformer.blocks.1.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.transformer\.blocks\.1\.up_proj\.weight'"):
        load_model(tmp_path / "llada")


def test_wrong_shape(tmp_path):
    """A tensor of the wrong shape is named with the shape found and the one expected."""
    make_llada(tmp_path / "llada", reshape="model.transformer.blocks.0.k_proj.weight")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.k_proj\.weight.*\(64, 64\), expected \(32, 64\)"):
        load_model(tmp_path / "llada")


def test_pickle_weights_refused(tmp_path):
    """*.bin / *.pt weights are refused, as a directory, a file or an index entry."""
    make_llada(tmp_path / "llada")
    d = tmp_path / "llada"
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(d)
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(d / "pytorch_model.bin")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model.bin"}}))
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_model(d)


def test_unknown_format(tmp_path):
    """An unrecognised config says which formats are supported."""
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="supported: .*voice-dllm.*LLaDA.*Dream.*gguf"):
        load_model(tmp_path / "bert")
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_model(tmp_path / "weights.onnx")


# ---------------------------------------------------------------- own format and adapters

def test_own_format_round_trip(tmp_path):
    """save_checkpoint then load_model gives the same config, tokenizer, chat and logits."""
    make_llada(tmp_path / "llada")
    src = load_llada(tmp_path / "llada")
    save_checkpoint(tmp_path / "own", src.model, src.tokenizer, src.chat, extra_config={"note": "test"})
    assert detect_format(tmp_path / "own") == "voice-dllm"
    back = load_model(tmp_path / "own")
    assert back.model.cfg == src.model.cfg and back.chat == src.chat
    tok, tok2 = src.tokenizer, back.tokenizer
    assert (tok2.eos_id, tok2.mask_id, tok2.end_id) == (tok.eos_id, tok.mask_id, tok.end_id)
    tokens, _ = tokens_and_changed_last()
    assert torch.equal(our_logits(src, tokens), our_logits(back, tokens))
    assert json.loads((tmp_path / "own" / "config.json").read_text())["extra"] == {"note": "test"}


def test_own_format_tied_and_attention_override(tmp_path):
    """Tied weights are saved once and re-tied; `attention` overrides the saved kind."""
    make_dream(tmp_path / "dream", tie=True)
    src = load_dream(tmp_path / "dream")
    save_checkpoint(tmp_path / "own", src.model, src.tokenizer, src.chat)
    back = load_own(tmp_path / "own", attention="prefix")
    assert back.model.lm_head.weight is back.model.embed.weight
    assert back.model.cfg.attention == "prefix" and back.model.cfg.shift_logits


def random_adapter(model, *, seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    rank = 4
    lora = {}
    for name in ("layers.0.attn.q_proj", "layers.1.attn.v_proj", "layers.1.mlp.down_proj", "lm_head"):
        w = model.get_submodule(name).weight
        a = 0.1 * torch.randn(rank, w.shape[1], generator=g)
        b = 0.1 * torch.randn(w.shape[0], rank, generator=g)
        lora[name] = (a, b)
    ids = torch.tensor([model.cfg.mask_id, 5])
    rows = {"embed": (ids, torch.randn(2, model.cfg.dim, generator=g))}
    meta = {"mask_token": "<|mdm_mask|>", "shift_logits": False, "steps": 3}
    return Adapter(rank=rank, alpha=8.0, lora=lora, rows=rows, base="tiny llada", meta=meta)


def test_lora_merge_equals_base_plus_lora(tmp_path):
    """Merged weights give the base forward plus scale * B(Ax) on each target, with new embedding rows."""
    make_llada(tmp_path / "llada")
    base = load_llada(tmp_path / "llada")
    adapter = random_adapter(base.model)
    reference = copy.deepcopy(base.model)
    with torch.no_grad():
        ids, rows = adapter.rows["embed"]
        reference.embed.weight[ids] = rows
    for name, (a, b) in adapter.lora.items():
        def hook(module, inputs, output, a=a, b=b):
            return output + adapter.scale * (inputs[0] @ a.T @ b.T)
        reference.get_submodule(name).register_forward_hook(hook)
    merge_adapter(base.model, adapter)
    tokens, _ = tokens_and_changed_last()
    tokens[0, 3] = base.model.cfg.mask_id
    with torch.no_grad():
        assert (base.model(tokens) - reference(tokens)).abs().max() < 1e-4


def test_adapter_files_round_trip(tmp_path):
    """save_adapter/read_adapter keep every tensor; load_own(adapter=) and load_model(adapter=) merge it."""
    make_llada(tmp_path / "llada")
    src = load_llada(tmp_path / "llada")
    save_checkpoint(tmp_path / "own", src.model, src.tokenizer, src.chat)
    adapter = random_adapter(src.model)
    write_adapter(tmp_path / "adapter", adapter)
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 8.0 and meta["new_rows"] == {"embed": [src.model.cfg.mask_id, 5]}
    back = read_adapter(tmp_path / "adapter")
    assert sorted(back.lora) == sorted(adapter.lora) and back.base == "tiny llada" and back.meta == adapter.meta
    for name, (a, b) in adapter.lora.items():
        assert torch.equal(back.lora[name][0], a) and torch.equal(back.lora[name][1], b)
    merged = merge_adapter(copy.deepcopy(src.model), adapter)
    tokens, _ = tokens_and_changed_last()
    with_adapter = load_own(tmp_path / "own", adapter=tmp_path / "adapter")
    assert "+adapter:" in with_adapter.source
    via_load_model = load_model(tmp_path / "llada", adapter=tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(with_adapter.model(tokens), merged(tokens))
        assert torch.equal(via_load_model.model(tokens), merged(tokens))


def test_adapter_mismatch_is_refused(tmp_path):
    """An adapter for another shape or a module the model lacks is a clear error."""
    make_llada(tmp_path / "llada")
    model = load_llada(tmp_path / "llada").model
    bad = Adapter(rank=2, alpha=2.0, lora={"layers.0.attn.q_proj": (torch.zeros(2, 7), torch.zeros(64, 2))})
    with pytest.raises(CheckpointError, match=r"lora_A \(2, 7\).*expected \(2, 64\)"):
        merge_adapter(model, bad)
    with pytest.raises(CheckpointError, match="layers.9.attn.q_proj"):
        merge_adapter(model, Adapter(rank=2, alpha=2.0, lora={"layers.9.attn.q_proj": (torch.zeros(2, 64),
                                                                                          torch.zeros(64, 2))}))


def test_adapter_for_another_mask_or_shift_is_refused(tmp_path):
    """An adapter trained with another mask token or logit shift is refused by name."""
    make_llada(tmp_path / "llada")
    adapter = random_adapter(load_llada(tmp_path / "llada").model)
    adapter.meta["mask_token"] = "<|endoftext|>"
    write_adapter(tmp_path / "a1", adapter)
    with pytest.raises(CheckpointError, match="mask token '<|endoftext|>'"):
        load_model(tmp_path / "llada", adapter=tmp_path / "a1")
    adapter.meta.update(mask_token="<|mdm_mask|>", shift_logits=True)
    write_adapter(tmp_path / "a2", adapter)
    with pytest.raises(CheckpointError, match="shift_logits=True"):
        load_model(tmp_path / "llada", adapter=tmp_path / "a2")


def test_training_adapter_merges_to_the_wrapped_forward(tmp_path):
    """An adapter saved by dllm.lora from a LoRA-wrapped tied model merges to the same forward."""
    from dllm.lora import add_lora, save_adapter
    make_dream(tmp_path / "dream", tie=True)
    base = load_dream(tmp_path / "dream")
    mask_id = base.model.cfg.mask_id
    wrapped = copy.deepcopy(base.model)
    add_lora(wrapped, rank=4, alpha=8.0, train_rows=[mask_id])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:  # lora_B starts at zero; give every trained tensor a value
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    meta = {"base": "tiny dream", "mask_token": "<|mask|>", "shift_logits": True}
    save_adapter(tmp_path / "adapter", wrapped, meta=meta)
    merged = load_adapter_into(base, tmp_path / "adapter").model
    assert merged.lm_head.weight is merged.embed.weight
    tokens, _ = tokens_and_changed_last()
    tokens[:, 2] = mask_id
    with torch.no_grad():
        assert (wrapped(tokens) - merged(tokens)).abs().max() < 1e-4


# ---------------------------------------------------------------- GGUF cache

@pytest.mark.slow
def test_gguf_cache(tmp_path, caplog, monkeypatch):
    """The packaged SmolLM2 GGUF converts once; later loads read the cache and give the same model."""
    caplog.set_level(logging.INFO, logger="dllm.loaders")
    first = load_gguf_model(cache_dir=tmp_path)
    assert "(once)" in caplog.text
    caplog.clear()
    second = load_gguf_model(cache_dir=tmp_path)
    assert "(once)" not in caplog.text
    assert second.chat == CHATML and second.source == first.source
    assert second.model.cfg == first.model.cfg
    assert second.model.lm_head.weight is second.model.embed.weight
    text = CHATML.message("user", "um what time does the zoo open on saturday 2025") + CHATML.assistant_open
    ids = first.tokenizer.encode(text)
    assert second.tokenizer.encode(text) == ids
    t1, t2 = first.tokenizer, second.tokenizer
    assert (t2.eos_id, t2.mask_id, t2.end_id) == (t1.eos_id, t1.mask_id, t1.end_id)
    tokens = torch.tensor([ids[:12]])
    with torch.no_grad():
        assert torch.equal(first.model(tokens), second.model(tokens))
    monkeypatch.setenv("VOICE_CACHE_DIR", str(tmp_path))
    caplog.clear()
    default = load_model(None, attention="causal", adapter="default")
    assert "(once)" not in caplog.text and default.model.cfg.attention == "causal"
    assert ("+adapter:" in default.source) == (DEFAULT_ADAPTER / "adapter.json").is_file()
