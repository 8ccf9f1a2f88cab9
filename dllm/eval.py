"""Score the voice turn model: cleanup WER, knowledge-card accuracy, reply health, latency.

Scoring follows ../shared/eval/README.md: word error rate after lower-casing,
dropping punctuation, writing numbers as digits ("fifteen" == "15") and
splitting digit runs into single digits; baselines are the raw text and a
regular-expression filler stripper. A knowledge-card reply counts when it
contains one of the accepted strings (case-insensitive, on word boundaries).

    python -m dllm.eval                               # shipped adapter, K=8, all sets
    python -m dllm.eval --adapter runs/v1/adapter --sets held-out --json
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

DEFAULT_ADAPTER = Path(__file__).parent / "adapters" / "voice-smollm2"
SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"

# ----------------------------------------------------------------- normalisation

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i >= 2}


def _numbers_to_digits(words: list[str]) -> list[str]:
    """Replace runs of number words by their value: "twenty one" -> "21", "one five" -> "1", "5"."""
    out: list[str] = []
    cur, last = None, ""

    def flush() -> None:
        nonlocal cur, last
        if cur is not None:
            out.append(str(cur))
        cur, last = None, ""

    for w in words:
        if w in _UNITS:
            v = _UNITS[w]
            if cur is not None and (last == "tens" and v < 10 or last in ("hundred", "thousand")):
                cur, last = cur + v, "units"
            else:
                flush()
                cur, last = v, "units"
        elif w in _TENS:
            if cur is not None and last in ("hundred", "thousand"):
                cur, last = cur + _TENS[w], "tens"
            else:
                flush()
                cur, last = _TENS[w], "tens"
        elif w == "hundred" and cur is not None and last in ("units", "tens") and cur % 1000 < 100:
            low = cur % 1000
            cur, last = cur - low + low * 100, "hundred"
        elif w == "thousand" and cur is not None and cur < 1000 and last != "thousand":
            cur, last = cur * 1000, "thousand"
        else:
            flush()
            out.append(w)
    flush()
    return out


def normalise(text: str) -> list[str]:
    """Words for scoring: lower case, no punctuation, numbers as single digits.

    >>> normalise("Call me at 4562, fifteen times!")
    ['call', 'me', 'at', '4', '5', '6', '2', '1', '5', 'times']
    """
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9' ]+", " ", text).replace("'", "")
    text = re.sub(r"(?<=\d)(?=[a-z])|(?<=[a-z])(?=\d)", " ", text)
    words = _numbers_to_digits(text.split())
    out = []
    for w in words:
        out += list(w) if w.isdigit() else [w]
    return out


def edit_distance(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def wer(hypotheses: list[str], references: list[str]) -> float:
    """Corpus word error rate: total edits over total reference words."""
    edits = words = 0
    for h, r in zip(hypotheses, references, strict=True):
        ref = normalise(r)
        edits += edit_distance(normalise(h), ref)
        words += len(ref)
    return edits / max(1, words)


_FILLER_RE = re.compile(r"\b(?:u+m+|u+h+|e+r+m*|h+m+|a+h+|you know|i mean|like|so|well|okay so)\b[,]?\s*", re.I)
_REPEAT_RE = re.compile(r"\b(\w+(?:\s+\w+)?)(?:\s+\1\b)+", re.I)


def strip_fillers(text: str) -> str:
    """The regular-expression baseline: drop filler words and immediate repeats."""
    text = _FILLER_RE.sub("", text)
    text = _REPEAT_RE.sub(r"\1", text)
    return " ".join(text.split())


def accepted(reply: str, accept: list[str]) -> bool:
    """Whether `reply` contains one of `accept`, case-insensitive, on word boundaries."""
    low = reply.lower().replace("\u2019", "'")
    return any(re.search(r"(?<!\w)" + re.escape(a.lower()) + r"(?!\w)", low) for a in accept)


def reply_problem(reply: str) -> str | None:
    """"empty", "repetitive", "cut off" or None for a healthy reply."""
    words = re.findall(r"[a-z0-9']+", reply.lower())
    if not words:
        return "empty"
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if len(set(trigrams)) < len(trigrams) or any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2)):
        return "repetitive"
    if not reply.rstrip().endswith((".", "!", "?", '"', "'")):
        return "cut off"
    return None


# ----------------------------------------------------------------- running the model

def load_sets(names: list[str], heldout: Path) -> dict[str, dict[str, list[dict]]]:
    """{set: {"cleanup": [{"text", "reference"}], "kiosk": [{"knowledge", "question", "accept"}], "chat": [...]}}"""
    sets = {}
    if "held-out" in names:
        rows = [json.loads(line) for line in heldout.open()] if heldout.is_file() else []
        if not rows:
            print(f"warning: no held-out rows at {heldout} (run python -m dllm.data)", file=sys.stderr)
        sets["held-out"] = {
            "cleanup": [{"text": r["raw"], "reference": r["cleaned"]} for r in rows],
            "kiosk": [{"knowledge": r["knowledge"], "question": r["raw"], "accept": r["accept"]}
                      for r in rows if r.get("knowledge")],
            "chat": [{"question": r["raw"]} for r in rows if not r.get("knowledge")][:40],
        }
    if "dev" in names:
        def read(name: str) -> list[dict]:
            p = SHARED_EVAL / name
            return [json.loads(line) for line in p.open()] if p.is_file() else []
        sets["dev"] = {"cleanup": read("cleanup_dev.jsonl"), "kiosk": read("kiosk_dev.jsonl"), "chat": []}
    return sets


def load_engine_for_eval(adapter: Path | None, threads: int):
    """The packaged SmolLM2 with `adapter` merged, in bf16, wrapped in an Engine."""
    import torch

    from .engine import Engine
    from .loaders import load_model
    torch.set_num_threads(threads)
    loaded = load_model(None, adapter=adapter)
    return Engine(loaded.model.to(torch.bfloat16), loaded.tokenizer, loaded.chat, name=loaded.source)


def evaluate(engine, sets: dict, steps: int) -> dict:
    from .turn import Turn
    results = {}
    for name, data in sets.items():
        r: dict = {}
        if data["cleanup"]:
            texts = [x["text"] for x in data["cleanup"]]
            refs = [x["reference"] for x in data["cleanup"]]
            outs = engine.cleanup_sync(texts, steps=steps)
            hyps = [o.cleaned for o in outs]
            r["cleanup"] = {"n": len(texts), "wer_model": wer(hyps, refs), "wer_raw": wer(texts, refs),
                            "wer_filler_regex": wer([strip_fillers(t) for t in texts], refs),
                            "examples": [{"raw": t, "cleaned": h, "reference": f} for t, h, f in zip(texts, hyps, refs)][:8]}
        replies = []
        if data["kiosk"]:
            outs = engine.run([engine.encode(Turn(x["question"], knowledge=x["knowledge"])) for x in data["kiosk"]],
                              engine._sampler(steps))
            hits = [accepted(o.reply, x["accept"]) for o, x in zip(outs, data["kiosk"])]
            replies += [o.reply for o in outs]
            r["kiosk"] = {"n": len(hits), "accuracy": sum(hits) / len(hits),
                          "examples": [{"question": x["question"], "reply": o.reply, "accept": x["accept"], "ok": h}
                                       for o, x, h in zip(outs, data["kiosk"], hits)][:8]}
        if data["chat"]:
            outs = engine.run([engine.encode(Turn(x["question"])) for x in data["chat"]], engine._sampler(steps))
            replies += [o.reply for o in outs]
            r["chat_examples"] = [{"question": x["question"], "cleaned": o.cleaned, "reply": o.reply}
                                  for o, x in zip(outs, data["chat"])][:6]
        if replies:
            problems = [reply_problem(x) for x in replies]
            r["replies"] = {"n": len(replies), **{k: problems.count(k) / len(problems)
                                                  for k in ("empty", "repetitive", "cut off")}}
        results[name] = r
    return results


def latency(engine, ks: list[int], repeats: int = 5) -> dict[int, float]:
    """Median wall time (ms) of one full turn (clean + reply, with a card) at each K."""
    from .turn import Turn
    turn = Turn("um so what time does the the museum open on saturday",
                knowledge="City Museum. Open 10 am to 6 pm. Adults 12 dollars.")
    engine.respond_sync(turn, steps=2)  # warm up
    out = {}
    for k in ks:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.respond_sync(turn, steps=k)
            times.append((time.perf_counter() - t0) * 1000)
        out[k] = statistics.median(times)
    return out


def print_table(results: dict, lat: dict[int, float], meta: dict) -> None:
    print(f"adapter: {meta['adapter']}  steps K={meta['steps']}  (trained steps: {meta.get('trained_steps')})")
    print(f"{'set':<10}{'n':>5}  {'WER model':>10}{'WER raw':>10}{'WER regex':>10}  {'card acc':>9}  "
          f"{'empty':>6}{'repet.':>7}{'cut off':>8}")
    for name, r in results.items():
        c, k, p = r.get("cleanup", {}), r.get("kiosk", {}), r.get("replies", {})
        f = lambda d, key: f"{d[key]:.3f}" if key in d else "-"
        print(f"{name:<10}{c.get('n', 0):>5}  {f(c, 'wer_model'):>10}{f(c, 'wer_raw'):>10}{f(c, 'wer_filler_regex'):>10}  "
              f"{f(k, 'accuracy'):>9}  {f(p, 'empty'):>6}{f(p, 'repetitive'):>7}{f(p, 'cut off'):>8}")
    if lat:
        print("turn latency (median ms, CPU): " + ", ".join(f"K={k}: {v:.0f}" for k, v in lat.items()))
    for name, r in results.items():
        for ex in r.get("cleanup", {}).get("examples", [])[:4]:
            print(f"  [{name}] {ex['raw']!r} -> {ex['cleaned']!r}")
        for ex in r.get("kiosk", {}).get("examples", [])[:4]:
            print(f"  [{name}] Q {ex['question']!r} -> {ex['reply']!r} {'ok' if ex['ok'] else 'MISS'}")
        for ex in r.get("chat_examples", [])[:3]:
            print(f"  [{name}] {ex['question']!r} -> {ex['reply']!r}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dllm.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="adapter directory, or 'none' for the bare base")
    p.add_argument("--steps", type=int, default=8, help="K, denoising steps per turn")
    p.add_argument("--sets", default="held-out,dev", help="comma list of held-out, dev")
    p.add_argument("--heldout", default="data/heldout.jsonl")
    p.add_argument("--limit", type=int, default=0, help="at most this many rows per set part (0: all)")
    p.add_argument("--latency", default="4,8,16", help="K values to time, or '' to skip")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    adapter = None if args.adapter == "none" else Path(args.adapter)
    sets = load_sets(args.sets.split(","), Path(args.heldout))
    if args.limit:
        sets = {n: {k: v[:args.limit] for k, v in d.items()} for n, d in sets.items()}
    engine = load_engine_for_eval(adapter, args.threads)
    results = evaluate(engine, sets, args.steps)
    lat = latency(engine, [int(k) for k in args.latency.split(",") if k]) if args.latency else {}
    meta = {"adapter": str(adapter), "steps": args.steps}
    if adapter is not None and (adapter / "adapter.json").is_file():
        meta["trained_steps"] = json.loads((adapter / "adapter.json").read_text()).get("steps")
    if args.json:
        print(json.dumps({"meta": meta, "results": results, "latency_ms": lat}, indent=2))
    else:
        print_table(results, lat, meta)


if __name__ == "__main__":
    main()
