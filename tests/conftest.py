"""Shared fixtures: real packaged models, loaded once per test session."""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting starve everything else on a small,
# shared CPU (seen: a 1 s turn took 33 s under load); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# transformers (5.25 seen) takes this project's top-level `kernels` package, shipped in
# the `voice` distribution, for the Hugging Face `kernels` library and fails to import
# names from it. The reference-model tests need none of its hub kernels.
try:
    import transformers.utils as _tf_utils  # noqa: E402
    import transformers.utils.import_utils as _tf_import_utils  # noqa: E402
    _tf_utils.is_kernels_available = _tf_import_utils.is_kernels_available = lambda *a, **k: False
except ImportError:  # transformers is a test extra; tests that need it skip without it
    pass


@pytest.fixture(scope="session")
def base_engine():
    """The packaged SmolLM2 base with the shipped voice adapter, on the CPU."""
    from dllm import load_engine
    return load_engine()


def byte_tokenizer():
    """A byte-level tokenizer with no merges and the ChatML specials, for tiny models."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from dllm.tokenizer import Tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    inner = HFTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<mask>")])
    tok = Tokenizer(inner=inner, eos_id=-1, mask_id=-1, end_id=-1)
    tok.eos_id, tok.mask_id, tok.end_id = tok.token_id("<|endoftext|>"), tok.token_id("<mask>"), tok.token_id("<|im_end|>")
    return tok


def make_tiny_engine(attention: str = "prefix", shift: bool = True, seed: int = 0, **options):
    """A random 2-layer model in float32 with the byte tokenizer: exact, fast."""
    from dllm.chat import CHATML
    from dllm.engine import Engine, EngineOptions
    from dllm.model import PRESETS, Transformer
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    cfg = PRESETS["tiny"].with_(attention=attention, shift_logits=shift, mask_id=tok.mask_id)
    model = Transformer(cfg)
    for p in model.parameters():  # larger weights than default init, so predictions are not all ties
        torch.nn.init.normal_(p, std=0.2)
    return Engine(model, tok, CHATML, options=EngineOptions(**options))


@pytest.fixture
def tiny_engine():
    return make_tiny_engine()
