"""A LLaMA-family transformer for masked diffusion LMs.

One module covers SmolLM2 (the default base), LLaDA (Llama layout, full
attention) and Dream (Qwen2 layout: QKV bias, shifted logits). What changes
between them is data in `ModelConfig`, never code paths inside `forward` (the
one branch there, fused q/k/v and gate/up products, is dllm.quantize's int8
copy of any of them).

Attention structures (`ModelConfig.attention`):
  - "bidirectional": every position sees every position (LLaDA, Dream).
  - "prefix": the prompt is causal and never sees the canvas; the canvas sees
    the prompt and itself in both directions. The prompt's keys and values
    are then independent of the canvas, so caching them is exact.
  - "causal": plain autoregressive, to run the AR base as a teacher.

Follows gpt-fast / nanoGPT in shape; rotary embedding as in the Hugging Face
Llama layout (rotate split halves); the GGUF loader permutes rows to match.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_KINDS = ("bidirectional", "prefix", "causal")


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: dim // n_heads
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    attention: str = "bidirectional"
    # Dream's shift: logits at position i predict token i + 1, so the AR head
    # is reused unchanged; the engine reads canvas position j from row j - 1.
    shift_logits: bool = False
    mask_id: int = -1
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    def with_(self, **changes) -> ModelConfig:
        return replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # SmolLM2-135M-Instruct; mask id is a spare special token (see dllm.tokenizer).
    "smollm2-135m": ModelConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
        intermediate_size=1536, rope_base=100000.0, norm_eps=1e-5,
        tie_embeddings=True, attention="prefix", shift_logits=True, max_seq_len=8192,
    ),
    "llada-8b": ModelConfig(
        vocab_size=126464, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
        intermediate_size=12288, rope_base=500000.0, norm_eps=1e-5,
        attention="bidirectional", mask_id=126336,
    ),
    "dream-7b": ModelConfig(
        vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
        intermediate_size=18944, rope_base=1000000.0, norm_eps=1e-6, qkv_bias=True,
        attention="bidirectional", shift_logits=True, mask_id=151666, max_seq_len=32768,
    ),
    # For tests: the SmolLM2 shape at toy size.
    "tiny": ModelConfig(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
        intermediate_size=128, rope_base=10000.0, tie_embeddings=True,
        attention="prefix", shift_logits=True, mask_id=511,
    ),
}


def use_kernels(x: Tensor) -> bool:
    """Triton kernels on CUDA at inference; they define no backward pass.
    `VOICE_KERNELS=torch` in the environment keeps the PyTorch reference ops
    (to rule the kernels out when a GPU result looks wrong)."""
    return x.is_cuda and not torch.is_grad_enabled() and os.environ.get("VOICE_KERNELS", "auto") != "torch"


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope_tables(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin for `positions` (B, T): each (B, 1, T, head_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if use_kernels(x):
            import kernels
            return kernels.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


@dataclass
class KVCache:
    """Keys and values of a fixed prefix, one pair per layer: (B, Hkv, P, D).

    `valid` (B, P) marks real prompt tokens; left padding is False.
    """
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    valid: Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        # q, k and v as one product, in place of the three (dllm.quantize's int8 copy: one call, one input scale).
        self.qkv_proj: nn.Module | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        c = self.cfg
        if self.qkv_proj is not None:
            kv = c.n_kv_heads * c.head_dim
            q, k, v = self.qkv_proj(x).split([c.n_heads * c.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, c.n_heads, c.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        if use_kernels(q):
            import kernels
            q, k = kernels.apply_rope(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_k, new_v = k, v
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        # Grouped-query attention without copying each key and value head for its group of query heads.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=c.n_heads != c.n_kv_heads)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, c.n_heads * c.head_dim)
        return self.o_proj(y), new_k, new_v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up as one product, as Attention.qkv_proj

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past):
        h, k, v = self.attn(self.attn_norm(x), cos, sin, mask, past)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, k, v


def attention_mask(kind: str, query_len: int, prefix_len: int, key_valid: Tensor) -> Tensor:
    """Boolean mask (B, 1, Tq, Tk), True where a query may attend to a key.

    The sequence is `prefix_len` prompt tokens (already cached, or the first
    part of this call) followed by canvas tokens. `key_valid` (B, Tk) masks
    padding. Queries are the last `query_len` positions of the Tk keys.
    """
    B, Tk = key_valid.shape
    dev = key_valid.device
    q_pos = torch.arange(Tk - query_len, Tk, device=dev)[:, None]  # (Tq, 1)
    k_pos = torch.arange(Tk, device=dev)[None, :]  # (1, Tk)
    if kind == "bidirectional":
        allowed = torch.ones(query_len, Tk, dtype=torch.bool, device=dev)
    elif kind == "causal":
        allowed = k_pos <= q_pos
    else:  # prefix: causal inside the prompt, the canvas sees everything
        allowed = (k_pos <= q_pos) | (q_pos >= prefix_len)
    mask = allowed[None] & key_valid[:, None, :]  # (B, Tq, Tk)
    # A padded query row with no visible key would give NaN; let it see itself.
    eye = (k_pos == q_pos)[None]
    mask = mask | (eye & ~mask.any(-1, keepdim=True))
    return mask[:, None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def hidden(self, tokens: Tensor, positions: Tensor, *, prefix_len: int, key_valid: Tensor,
               cache: KVCache | None = None, save_cache: bool = False) -> tuple[Tensor, KVCache | None]:
        """Final hidden states (B, T, dim) for `tokens` (B, T) at `positions` (B, T).

        With `cache`, the tokens follow the cached prefix and `key_valid`
        covers cache + tokens. With `save_cache`, the keys and values of
        these tokens are returned as a new cache (for a prompt).
        """
        T = tokens.shape[1]
        mask = attention_mask(self.cfg.attention, T, prefix_len, key_valid)
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_base)
        x = self.embed(tokens)
        out = KVCache(valid=key_valid) if save_cache else None
        for i, layer in enumerate(self.layers):
            past = (cache.keys[i], cache.values[i]) if cache is not None else None
            x, k, v = layer(x, cos, sin, mask, past)
            if out is not None:
                out.keys.append(k)
                out.values.append(v)
        return self.norm(x), out

    def forward(self, tokens: Tensor, positions: Tensor | None = None, *, prefix_len: int = 0,
                key_valid: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Logits (B, T, vocab). Without `key_valid`, nothing is padding."""
        B, T = tokens.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=tokens.device).expand(B, T)
        if key_valid is None:
            key_valid = torch.ones(B, past + T, dtype=torch.bool, device=tokens.device)
        h, _ = self.hidden(tokens, positions, prefix_len=prefix_len, key_valid=key_valid, cache=cache)
        return self.lm_head(h)
