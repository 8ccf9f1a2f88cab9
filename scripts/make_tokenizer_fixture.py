"""Write tests/fixtures/smollm2_tokens.jsonl: token ids of varied sentences,
as llama.cpp (an independent reader of the same GGUF file) tokenizes them.

    pip install --no-deps llama-cpp-python && python scripts/make_tokenizer_fixture.py

Run once; the test compares our tokenizer against the stored ids.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dllm.gguf_loader import packaged_smollm2_path  # noqa: E402

WORDS = ("the zoo library pharmacy opens closes at on Saturday Sunday a.m. p.m. I'm don't can't we'll they've "
         "price $20 €15 50% 3.14 1,000,000 2026-11-23 12:30 e.g. Dr. Smith O'Neil naïve café résumé "
         "um uh you know like so well hello Hello HELLO world! what? yes... no—maybe (maybe) [brackets] "
         "{braces} <tags> #hash @user http://example.com/path?q=1 foo_bar camelCase snake_case 日本語 "
         "Привет مرحبا 🙂 👍🏽 tab\tnewline\n  double  spaces   x=y+z; print('hi') 0 7 42 123 4567 89012").split(" ")


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fixed = [
        "", " ", "Hello, world!", "um what time does the the zoo open on saturday",
        "I'd like to uh order a pizza with with mushrooms", "Call 555-0199 before 9:30 p.m.",
        "   leading spaces", "trailing spaces   ", "new\nlines\n\nand\ttabs", "ALL CAPS SENTENCE.",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "Ünïcödé — “quotes” ‘single’ …",
        "1234567890", "3.14159 and 2.71828", "emoji 🙂🙂 and 👍🏽", "def f(x):\n    return x ** 2\n",
    ]
    out = list(fixed)
    while len(out) < n:
        k = rng.randint(1, 18)
        sep = rng.choice([" ", " ", " ", "", "  ", "\n"])
        out.append(sep.join(rng.choice(WORDS) for _ in range(k)))
    return out


def main() -> None:
    from llama_cpp import Llama
    llm = Llama(model_path=str(packaged_smollm2_path()), vocab_only=True, verbose=False)
    out = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "smollm2_tokens.jsonl"
    with out.open("w") as f:
        for text in sentences(300):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            f.write(json.dumps({"text": text, "ids": ids}, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
