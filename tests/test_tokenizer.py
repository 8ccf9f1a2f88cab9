"""Our tokenizer, rebuilt from the GGUF vocabulary, against llama.cpp's ids.

The fixture was written once by scripts/make_tokenizer_fixture.py with
llama-cpp-python reading the same packaged GGUF file.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_tokens.jsonl"


@pytest.fixture(scope="module")
def cases():
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def test_ids_match_llama_cpp(base_engine, cases):
    """Every fixture sentence encodes to exactly llama.cpp's ids."""
    assert len(cases) >= 300
    wrong = [c["text"] for c in cases if base_engine.tok.encode(c["text"]) != c["ids"]]
    assert not wrong, f"{len(wrong)} sentences differ, e.g. {wrong[:3]}"


def test_decode_inverts_encode(base_engine, cases):
    tok = base_engine.tok
    for c in cases:
        if "<|" not in c["text"]:  # special tokens are dropped on decode
            assert tok.decode(c["ids"]) == c["text"]


def test_special_tokens(base_engine):
    tok = base_engine.tok
    assert tok.encode("<|im_start|>user\n") == [1, 4093, 198]
    assert tok.end_id == 2 and tok.token_id("<|im_end|>") == 2
    assert tok.mask_id == base_engine.cfg.mask_id == tok.token_id("<empty_output>")
