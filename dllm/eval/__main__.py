"""Score the voice turn model: cleanup WER, knowledge-card accuracy, conversational fit, reply health.

Sets: "dev" (../shared/eval's cleanup and card sets, plus this folder's
hand-written conversational set `talk_dev.jsonl`) and "held-out" (the held-out
split written by `python -m dllm.training.data`: unseen templates, slot values,
venues and phrasings). Scoring is `dllm.eval.scoring`. A conversational reply
"fits" when it is healthy (not empty, repetitive or cut off) and holds one of
the accepted strings (a greeting back, an honest "I can't" or "I don't know",
the repeated reply, ...). "degenerate" is the share of all replies, card and
conversational, that are empty, repetitive or cut off. "turn WER" scores the
cleaned field of the voice turns (the transcript the user is shown) where the
set has a reference: the held-out card and talk rows, and the spoken set.
"spoken" is the held-out fifth of the speech round trip
(`data/heldout_spoken.jsonl`): sentences spoken by piper and espeak-ng and
written down by Whisper, cleaned alone and as voice turns.

    python -m dllm.eval                                   # shipped adapter, K=8, all sets
    python -m dllm.eval --steps 4,8,16                    # one table row per set and K
    python -m dllm.eval --guards each                     # each decoding guard switched off in turn
    python -m dllm.eval --lead 0,12                       # the reply's first tokens first (early speech), off and on
    python -m dllm.eval --cache exact,window               # the canvas outside the block recomputed, or cached
    python -m dllm.eval --adapter runs/voice-v2/adapter --sets held-out --json
    python -m dllm.eval --sets spoken                     # real speech: the held-out speech round trip
    python -m dllm.eval --threshold 0.7,0.8               # the reply frontier's bar for a second commit a step
    python -m dllm.eval --lookahead 0,8                   # a rolling-cache step also runs the 8 masks past the frontier
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from .scoring import accepted, reply_problem, strip_fillers, wer

DEFAULT_ADAPTER = Path(__file__).resolve().parents[1] / "adapters" / "voice-smollm2"
# ../shared/eval beside the checkout; VOICE_EVAL_DIR names another copy (a machine that lacks it).
SHARED_EVAL = Path(os.environ.get("VOICE_EVAL_DIR") or Path(__file__).resolve().parents[3] / "shared" / "eval")
TALK_DEV = Path(__file__).resolve().parent / "talk_dev.jsonl"
GUARDS = ("copy_clean", "no_repeat", "end_confidence", "no_adjacent", "whole_sentences")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open() if line.strip()] if path.is_file() else []


def load_sets(names: list[str], heldout: Path, spoken: Path = Path("data/heldout_spoken.jsonl")
              ) -> dict[str, dict[str, list[dict]]]:
    """{set: {"cleanup": [{"text", "reference"}], "kiosk": [{"knowledge", "question", "accept"}],
    "talk": [{"question", "accept", "history"?}], "turns"?: [{"text", "reference"}]}}; "turns" are
    voice turns whose cleaned field alone is scored."""
    sets = {}
    if "held-out" in names:
        rows = _read(heldout)
        if not rows:
            print(f"warning: no held-out rows at {heldout} (run python -m dllm.training.data)", file=sys.stderr)
        sets["held-out"] = {
            "cleanup": [{"text": r["raw"], "reference": r["cleaned"]} for r in rows if not r.get("reply")],
            "kiosk": [{"knowledge": r["knowledge"], "question": r["raw"], "accept": r["accept"],
                       "reference": r["cleaned"]} for r in rows if r.get("knowledge")],
            "talk": [{"question": r["raw"], "accept": r["accept"], "history": r.get("history") or [],
                      "reference": r["cleaned"]} for r in rows if r.get("reply") and not r.get("knowledge")],
        }
    if "spoken" in names:
        rows = _read(spoken)
        if not rows:
            print(f"warning: no spoken rows at {spoken} (run python -m dllm.training.data with "
                  "data/asr_roundtrip.jsonl there)", file=sys.stderr)
        pairs = [{"text": r["raw"], "reference": r["cleaned"]} for r in rows]
        sets["spoken"] = {"cleanup": pairs, "kiosk": [], "talk": [], "turns": pairs}
    if "dev" in names:
        sets["dev"] = {"cleanup": _read(SHARED_EVAL / "cleanup_dev.jsonl"), "kiosk": _read(SHARED_EVAL / "kiosk_dev.jsonl"),
                       "talk": _read(TALK_DEV)}
    return sets


def load_engine_for_eval(adapter: Path | None, threads: int, device: str = "cpu", precision: str = "auto"):
    """The packaged SmolLM2 with `adapter` merged, wrapped in an Engine on `device` at `precision`."""
    import torch

    from .. import place
    from ..loaders import load_model
    torch.set_num_threads(threads)
    return place(load_model(None, adapter=adapter), device, precision)


def evaluate(engine, sets: dict, sampler) -> dict:
    """Run every part of every set with `sampler` (SamplerOptions); returns scores and a few examples."""
    from ..canvas import settled_reply
    from ..turn import Turn
    results = {}
    for name, data in sets.items():
        r: dict = {}
        if data["cleanup"]:
            texts = [x["text"] for x in data["cleanup"]]
            refs = [x["reference"] for x in data["cleanup"]]
            outs = engine.run([engine.encode(Turn(t), with_reply=False) for t in texts], sampler)
            hyps = [o.cleaned for o in outs]
            r["cleanup"] = {"n": len(texts), "wer_model": wer(hyps, refs), "wer_raw": wer(texts, refs),
                            "wer_filler_regex": wer([strip_fillers(t) for t in texts], refs),
                            "examples": [{"raw": t, "cleaned": h, "reference": f} for t, h, f in zip(texts, hyps, refs)]}
        replies, first_steps = [], []
        shown, turn_refs = [], []  # a voice turn's cleaned field, and its reference where the set has one
        for part in ("kiosk", "talk"):
            if not data[part]:
                continue
            turns = [Turn(x["question"], knowledge=x.get("knowledge"),
                          history=tuple(tuple(h) for h in x.get("history") or ())) for x in data[part]]
            encs = [engine.encode(t) for t in turns]
            settled_at = [sampler.steps] * len(encs)  # the step after which the first sentence could be spoken

            def watch(rows: list[int], step: int, canvas, encs=encs, settled_at=settled_at) -> None:
                for i, ids in zip(rows, canvas.tolist()):
                    if settled_at[i] > step + 1 and settled_reply(ids, encs[i].field, engine.tok, engine.cfg.mask_id):
                        settled_at[i] = step + 1
            outs = engine.run(encs, sampler, on_step=watch)
            first_steps += settled_at
            ok = [accepted(o.reply, x["accept"]) and (part == "kiosk" or reply_problem(o.reply) is None)
                  for o, x in zip(outs, data[part])]
            replies += [o.reply for o in outs]
            for o, x in zip(outs, data[part]):
                if x.get("reference"):
                    shown.append(o.cleaned)
                    turn_refs.append(x["reference"])
            r[part] = {"n": len(ok), "accuracy": sum(ok) / len(ok),
                       "examples": [{"question": x["question"], "cleaned": o.cleaned, "reply": o.reply, "ok": h}
                                    for o, x, h in zip(outs, data[part], ok)]}
        if data.get("turns"):  # voice turns with no card: only the cleaned field is scored
            outs = engine.run([engine.encode(Turn(x["text"])) for x in data["turns"]], sampler)
            shown += [o.cleaned for o in outs]
            turn_refs += [x["reference"] for x in data["turns"]]
        if replies:
            problems = [reply_problem(x) for x in replies]
            r["replies"] = {"n": len(replies), "degenerate": sum(p is not None for p in problems) / len(problems),
                            **{k: problems.count(k) / len(problems) for k in ("empty", "repetitive", "cut off")},
                            "first_sentence_step": statistics.median(first_steps)}
        if turn_refs:  # the transcript a voice turn shows the user, against the clean reference
            r["turn_cleaned"] = {"n": len(turn_refs), "wer_model": wer(shown, turn_refs)}
        results[name] = r
    return results


def latency(engine, ks: list[int], repeats: int = 5) -> dict[int, float]:
    """Median wall time (ms) of one full turn (clean + reply, with a card) at each K."""
    from ..turn import Turn
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


HEADER = (f"{'set':<9}{'K':>3} {'guards':<24}{'WER model':>10}{'WER raw':>8}{'WER regex':>10}  {'card acc':>9}"
          f"{'talk fit':>9}{'degen.':>8}{'repet.':>7}{'cut off':>8}{'empty':>6}{'1st sent.':>10}{'turn WER':>9}")


def table_row(name: str, k: int, guards: str, r: dict) -> str:
    c, kk, t, p = r.get("cleanup", {}), r.get("kiosk", {}), r.get("talk", {}), r.get("replies", {})
    tc = r.get("turn_cleaned", {})
    first = f"{p['first_sentence_step']:>6.1f}/{k:<3}" if "first_sentence_step" in p else f"{'-':>10}"
    f = lambda d, key, w: f"{d[key]:>{w}.3f}" if key in d else f"{'-':>{w}}"
    return (f"{name:<9}{k:>3} {guards:<24}{f(c, 'wer_model', 10)}{f(c, 'wer_raw', 8)}{f(c, 'wer_filler_regex', 10)}  "
            f"{f(kk, 'accuracy', 9)}{f(t, 'accuracy', 9)}{f(p, 'degenerate', 8)}{f(p, 'repetitive', 7)}"
            f"{f(p, 'cut off', 8)}{f(p, 'empty', 6)}{first}{f(tc, 'wer_model', 9)}")


def print_examples(results: dict, n: int = 4) -> None:
    for name, r in results.items():
        for ex in r.get("cleanup", {}).get("examples", [])[:n]:
            print(f"  [{name}] {ex['raw']!r} -> {ex['cleaned']!r}")
        for part in ("kiosk", "talk"):
            for ex in r.get(part, {}).get("examples", [])[:n]:
                print(f"  [{name}] {ex['question']!r} -> {ex['reply']!r} {'ok' if ex['ok'] else 'MISS'}")


def guard_variants(mode: str, base) -> list[tuple[str, object]]:
    """(label, SamplerOptions) for --guards: on, off, or each (all on, then each one off, then all off)."""
    without = {"copy_clean": {"copy_clean": False}, "no_repeat": {"no_repeat": False},
               "end_confidence": {"end_confidence": 0.0}, "no_adjacent": {"no_adjacent": 0.0},
               "whole_sentences": {"whole_sentences": False}}
    off = replace(base, **{k: v for change in without.values() for k, v in change.items()})
    if mode == "on":
        return [("all on", base)]
    if mode.startswith("no-"):
        return [(mode.replace("-", " ", 1), replace(base, **without[mode[3:]]))]
    if mode == "off":
        return [("all off", off)]
    return [("all on", base)] + [(f"no {g}", replace(base, **without[g])) for g in GUARDS] + [("all off", off)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dllm.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="adapter directory, or 'none' for the bare base")
    p.add_argument("--steps", default="8", help="K, denoising steps per turn; a comma list gives a row for each")
    p.add_argument("--guards", default="on", choices=["on", "off", "each"] + [f"no-{g}" for g in GUARDS],
                   help="the decoding guards of SamplerOptions: all on, all off, each off in turn, or one off")
    p.add_argument("--lead", default=None,
                   help="reply tokens decoded first, so the first sentence settles early (SamplerOptions.lead_tokens); "
                        "a comma list gives a row for each (default: the engine's)")
    p.add_argument("--lead-steps", default=None,
                   help="steps given to the lead (SamplerOptions.lead_steps; default: three quarters of K); a comma list gives "
                        "a row for each")
    p.add_argument("--cache", default=None,
                   help="the engine's cache mode (exact, window, ...); a comma list gives a row for each "
                        "(default: the engine's)")
    p.add_argument("--copy-penalty", default=None,
                   help="SamplerOptions.copy_clean_penalty: 'ban' (the default) or how much lower the logits of words "
                        "not in the raw transcript are; a comma list gives a row for each")
    p.add_argument("--threshold", default=None,
                   help="SamplerOptions.threshold: how sure a reply position beside the frontier's surest must be to "
                        "commit in the same step (default 0.9); a comma list gives a row for each")
    p.add_argument("--frontier", default=None,
                   help="SamplerOptions.reply_frontier: 0 (the reply paced with its block) or how many of its first open "
                        "positions a step may commit from; a comma list gives a row for each")
    p.add_argument("--lookahead", default=None,
                   help="EngineOptions.rolling_lookahead: masked positions past the frontier that a rolling-cache step "
                        "runs too (default 8); a comma list gives a row for each")
    p.add_argument("--sets", default="held-out,dev", help="comma list of held-out, spoken, dev")
    p.add_argument("--heldout", default="data/heldout.jsonl")
    p.add_argument("--spoken", default="data/heldout_spoken.jsonl")
    p.add_argument("--limit", type=int, default=0, help="at most this many rows per set part (0: all)")
    p.add_argument("--latency", default="", help="K values to time (e.g. 4,8,16), or '' to skip")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="auto",
                   help="the model's weights: auto (bf16 where fast, else int8 on a CPU), float32, bfloat16 or int8; "
                        "a comma list gives a row for each")
    p.add_argument("--examples", type=int, default=4, help="examples to print per set part")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    adapter = None if args.adapter == "none" else Path(args.adapter)
    sets = load_sets(args.sets.split(","), Path(args.heldout), Path(args.spoken))
    if args.limit:
        sets = {n: {k: v[:args.limit] for k, v in d.items()} for n, d in sets.items()}
    meta = {"adapter": str(adapter)}
    if adapter is not None and (adapter / "adapter.json").is_file():
        info = json.loads((adapter / "adapter.json").read_text())
        meta["trained_steps"], meta["examples_seen"] = info.get("steps"), info.get("examples_seen")
    rows = []
    if not args.json:
        print(f"adapter: {meta['adapter']}  (trained steps: {meta.get('trained_steps')}, "
              f"examples seen: {meta.get('examples_seen')})")
        print(HEADER, flush=True)
    leads = [None] if args.lead is None else [int(x) for x in args.lead.split(",")]
    lead_steps = [None] if args.lead_steps is None else [int(x) for x in args.lead_steps.split(",")]
    caches = [None] if args.cache is None else args.cache.split(",")
    penalties = [None] if args.copy_penalty is None else args.copy_penalty.split(",")
    frontiers = [None] if args.frontier is None else [int(x) for x in args.frontier.split(",")]
    thresholds = [None] if args.threshold is None else [float(x) for x in args.threshold.split(",")]
    lookaheads = [None] if args.lookahead is None else [int(x) for x in args.lookahead.split(",")]
    steps = [int(x) for x in args.steps.split(",")]
    engine, loaded = None, None
    for precision, k, lead, first, cache, penalty, frontier, threshold, ahead in itertools.product(
            args.precision.split(","), steps, leads, lead_steps, caches, penalties, frontiers, thresholds, lookaheads):
        if loaded != precision:
            engine, loaded = load_engine_for_eval(adapter, args.threads, args.device, precision), precision
            default_cache, default_options = engine.cache_mode, engine.options
        engine.cache_mode = cache or default_cache
        engine.options = default_options if ahead is None else replace(default_options, rolling_lookahead=ahead)
        base = replace(engine.options.sampler, steps=k)
        if lead is not None:
            base = replace(base, lead_tokens=lead)
        if first is not None:
            base = replace(base, lead_steps=first)
        if penalty is not None:
            base = replace(base, copy_clean_penalty=None if penalty == "ban" else float(penalty))
        if frontier is not None:
            base = replace(base, reply_frontier=frontier)
        if threshold is not None:
            base = replace(base, threshold=threshold)
        for label, sampler in guard_variants(args.guards, base):
            if lead is not None:
                label = f"{label}, lead {lead}"
            if first is not None:
                label = f"{label}, lead in {first} steps"
            if cache is not None:
                label = f"{label}, {cache} cache"
            if penalty is not None:
                label = f"{label}, copy {penalty}"
            if frontier is not None:
                label = f"{label}, frontier {frontier}"
            if threshold is not None:
                label = f"{label}, threshold {threshold:g}"
            if ahead is not None:
                label = f"{label}, lookahead {ahead}"
            if precision != "auto":
                label = f"{label}, {precision}"
            results = evaluate(engine, sets, sampler)
            rows.append({"steps": k, "guards": label, "lead_tokens": sampler.lead_tokens, "results": results})
            if not args.json:
                for name, r in results.items():
                    print(table_row(name, k, label, r), flush=True)
    lat = latency(engine, [int(k) for k in args.latency.split(",") if k]) if args.latency else {}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "latency_ms": lat}, indent=2))
        return
    if lat:
        print("turn latency (median ms): " + ", ".join(f"K={k}: {v:.0f}" for k, v in lat.items()))
    print_examples(rows[0]["results"], args.examples)


if __name__ == "__main__":
    main()
