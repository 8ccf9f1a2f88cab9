"""Tokenizers: GPT-2 byte-level BPE rebuilt from a GGUF file, or a tokenizer.json.

`Tokenizer` is the small interface the rest of `dllm` uses: encode, decode,
and the ids of the special tokens the turn format needs (end of text, the
chat markers, and the mask). The mask id is model data (`ModelConfig.mask_id`);
the tokenizer only knows which token string it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import CheckpointError

# GGUF token types (gguf.TokenType): 3 is CONTROL, 4 USER_DEFINED.
_SPECIAL_TOKEN_TYPES = (3, 4)


@dataclass
class Tokenizer:
    inner: HFTokenizer
    eos_id: int
    mask_id: int
    # End-of-field token used to pad canvas fields: the chat "end of turn".
    end_id: int

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids, skip_special_tokens=True)

    def token_texts(self) -> list[str]:
        """Each token id's text alone ("" for special tokens)."""
        return self.inner.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=True)

    def token_id(self, token: str) -> int:
        tid = self.inner.token_to_id(token)
        if tid is None:
            raise CheckpointError(f"tokenizer has no token {token!r}")
        return tid

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split before BPE, by GGUF `tokenizer.ggml.pre` name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        # Each digit is its own pre-token, then GPT-2's split (llama.cpp: \p{N}).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    if pre in ("llama3", "llama-bpe", "qwen2", "dbrx", "smaug-bpe"):
        # The Llama-3 / Qwen2 split: numbers in runs of at most three digits.
        llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise CheckpointError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: smollm, gpt2, llama3, qwen2")


def tokenizer_from_gguf_fields(tokens: list[str], token_types: list[int], merges: list[str], pre: str,
                               *, eos_id: int, mask_token: str, end_token: str) -> Tokenizer:
    """Rebuild a byte-level BPE tokenizer from the GGUF vocabulary and merges."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    inner = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    inner.pre_tokenizer = _pre_tokenizer(pre)
    inner.decoder = decoders.ByteLevel()
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(token_types) if t in _SPECIAL_TOKEN_TYPES]
    inner.add_special_tokens(specials)
    tok = Tokenizer(inner=inner, eos_id=eos_id, mask_id=-1, end_id=-1)
    tok.mask_id = tok.token_id(mask_token)
    tok.end_id = tok.token_id(end_token)
    return tok


def tokenizer_from_json(path: Path, *, eos_token: str, mask_token: str, end_token: str) -> Tokenizer:
    """Load a Hugging Face tokenizer.json (LLaDA, Dream, our own checkpoints)."""
    if not path.is_file():
        raise CheckpointError(f"missing tokenizer file {path}")
    inner = HFTokenizer.from_file(str(path))
    tok = Tokenizer(inner=inner, eos_id=-1, mask_id=-1, end_id=-1)
    tok.eos_id = tok.token_id(eos_token)
    tok.mask_id = tok.token_id(mask_token)
    tok.end_id = tok.token_id(end_token)
    return tok
