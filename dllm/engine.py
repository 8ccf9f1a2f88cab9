"""The diffusion LM engine: prefix cache, batching, and the asyncio front.

`Engine.generate` runs one batch of same-shape canvases through the sampler:
prompts are left-padded into one (B, P) block whose keys and values are
computed once (the prefix cache), then each of the K steps runs only the
canvas (B, N) against that cache. For models trained with the "prefix"
structure the prompt cache is exact, and a prompt's head (the instruction, a
card and the history) is kept between turns, and can be computed ahead
(`prefill`) while a reply plays; the rolling cache also keeps the canvas's
keys and values, so a step that writes the reply runs only the few positions
it needs. For bidirectional models (LLaDA, Dream) the "approx" mode follows
Fast-dLLM: the prompt's keys and values are refreshed once per
semi-autoregressive block and reused within it.

The async side (`start`, `respond`, `cleanup`) queues requests in a bounded
queue; one worker forms batches of one canvas shape and runs them on a single
model thread, so the event loop stays free for sockets. The queue is served
fairly: the more urgent requests first (`priority`: interactive turns ahead of
bulk cleanup), and among those round-robin by `client`, so that one client's
flood adds at most a batch's time to another client's request.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .chat import ChatFormat
from .errors import EngineBusy, EngineClosed, RequestError
from .model import KVCache, Transformer
from .canvas import CanvasStep, canvas_step
from .sampler import Repeats, SamplerOptions, denoise, pass_spans
from .tokenizer import Tokenizer
from .turn import (Encoded, Turn, TurnLayout, TurnResult, clean_vocabulary, decode_field, encode_turn,
                   whole_sentences)

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "exact", "window", "rolling", "approx", "none")
PREFIX_CACHES = ("exact", "window", "rolling")  # modes whose prompt cache is exact: "prefix" models only
HEAD_CHUNK = 64  # prompt-head tokens a prefill runs at a time, so a request that comes meanwhile waits little
PRIORITY_BULK = 0  # the default: batch work, such as transcript cleanup
PRIORITY_INTERACTIVE = 1  # someone is waiting to hear the answer
# Numbers said as words: in the cleaned field they may stand twice side by side where the speaker said them so
# ("four four nine").
NUMBER_WORDS = frozenset(
    "zero oh one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety".split())


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings; the defaults suit a voice server on one device."""

    sampler: SamplerOptions = SamplerOptions()
    layout: TurnLayout = TurnLayout()
    # auto: rolling for prefix models, approx for bidirectional ones. Prefix models: exact runs the whole canvas
    # every step; window runs a block's later steps on its span; rolling runs a reply step on the positions it
    # reads and those just committed (each exact for the prompt; docs/MODEL_CARD.md).
    cache: str = "auto"
    # The rolling cache's span also runs this many positions past the last one a step asks for. Those are
    # masks still, and hold the model's plan for the words ahead; read stale, from before the frontier moved,
    # they let a step splice two ways of saying the reply ("I'm sorry, sorry."; docs/BENCHMARKS.md).
    rolling_lookahead: int = 8
    max_batch: int = 16
    # Rows of a batch of bulk requests (None: max_batch). An interactive request waits
    # behind the batch that is running; on a CPU a batch costs about its rows times one.
    max_bulk_batch: int | None = None
    max_queue: int = 64  # waiting requests; past this, submit raises EngineBusy
    # Prompt heads (the instruction, a card and the history) whose keys and values are kept between turns, in
    # tokens all together, least recently used dropped first (0: off). A token costs 23 KB in bf16 at
    # SmolLM2's size, 46 KB in float32: 4096 tokens, about 190 MB, hold the heads of 20 to 40 conversations.
    head_cache_tokens: int = 4096
    batch_window_ms: float = 2.0  # how long the worker waits to gather a batch
    seed: int = 0  # per-request seed for temperature > 0, so results repeat

    def __post_init__(self) -> None:
        if self.cache not in CACHE_MODES:
            raise RequestError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.max_batch < 1 or self.max_queue < 1 or (self.max_bulk_batch or 1) < 1:
            raise RequestError("max_batch, max_bulk_batch and max_queue must be at least 1")
        if self.rolling_lookahead < 0:
            raise RequestError(f"rolling_lookahead must be >= 0, got {self.rolling_lookahead}")
        if self.head_cache_tokens < 0:
            raise RequestError(f"head_cache_tokens must be >= 0, got {self.head_cache_tokens}")


@dataclass
class _Pending:
    enc: Encoded
    sampler: SamplerOptions
    future: asyncio.Future
    seed: int | None = None  # None: the engine's seed
    on_canvas: Callable[[CanvasStep], None] | None = None  # the anytime canvas, called on the event loop
    deadline: float | None = None  # time.monotonic() by which the pass ends (the batch keeps the earliest)
    client: object = None  # who asked: batches are shared round-robin between clients
    priority: int = PRIORITY_BULK  # higher waits less: it goes first, and only its peers count as a full queue
    key: tuple = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.enc.shape_key, self.sampler)


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, chat: ChatFormat, *,
                 options: EngineOptions = EngineOptions(), name: str = "model"):
        self.model = model.eval()
        # The canvas steps may run a cheaper copy of the model (int8 weights: dllm.quantize.make_int8 sets it);
        # the prompt always runs `model`.
        self.canvas_model = self.model
        self.tok = tokenizer
        self.chat = chat
        self.options = options
        self.name = name
        self.device = next(model.parameters()).device
        self.cfg = model.cfg
        cache = options.cache
        if cache == "auto":
            cache = "rolling" if self.cfg.attention == "prefix" else "approx"
        if cache in PREFIX_CACHES and self.cfg.attention != "prefix":
            raise RequestError(f"the {cache} cache needs attention='prefix'; this model is {self.cfg.attention!r} "
                               "(use cache='approx' or 'none')")
        self.cache_mode = cache
        self.forward_calls = 0  # model calls made by the sampler, for tests and benchmarks
        self._repeats_cache: tuple[Repeats, dict[str, list[int]]] | None = None
        self._heads: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()  # prompt head -> its keys and values
        self._heads_lock = threading.Lock()  # run() may be called from more than one thread
        self._words: set[tuple[int, ...]] = set()  # the heads' entries that a prefill of partial words made
        self.head_hits = 0  # turns whose prompt head came from the cache, for tests and benchmarks
        self.word_hits = 0  # turns that found some of the user's words in the cache too (a partial's prefill)
        self._pending: deque[_Pending] = deque()
        self._batches = 0
        self._last_served: dict[object, int] = {}  # client -> number of the last batch it had a request in
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm")
        self._closed = False
        self.on_batch: Callable[[int, int, float], None] | None = None  # (rows, model calls, ms), for metrics

    # ----- the synchronous core -----

    def encode(self, turn: Turn, *, with_reply: bool = True, layout: TurnLayout | None = None) -> Encoded:
        return encode_turn(turn, self.tok, self.chat, mask_id=self.cfg.mask_id,
                           layout=layout or self.options.layout, with_reply=with_reply)

    @torch.inference_mode()
    def generate(self, batch: list[Encoded], sampler: SamplerOptions | None = None, *,
                 cache: str | None = None, should_stop: Callable[[], bool] | None = None,
                 seeds: list[int] | None = None, on_step: Callable[[int, Tensor], None] | None = None,
                 deadline: float | None = None) -> list[list[int]]:
        """Denoise a batch of same-length canvases; returns each filled canvas."""
        sampler = sampler or self.options.sampler
        cache = cache or self.cache_mode
        n = len(batch[0].canvas)
        if any(len(e.canvas) != n for e in batch):
            raise RequestError("a batch must hold canvases of one length")
        dev = self.device
        prompt_kv = None
        if cache in PREFIX_CACHES:  # the prompt runs now, each row's head from the cache where it can
            prompt_kv, valid = self._prompt_cache(batch)
            prompt = p_pos = None
        else:
            P = max(len(e.prompt) for e in batch)
            pad = self.tok.end_id
            prompt = torch.tensor([[pad] * (P - len(e.prompt)) + e.prompt for e in batch], device=dev)  # (B, P)
            valid = torch.tensor([[False] * (P - len(e.prompt)) + [True] * len(e.prompt) for e in batch], device=dev)
            p_pos = (torch.arange(P, device=dev) - (P - valid.sum(-1, keepdim=True))).clamp(min=0)  # (B, P)
        lengths = valid.sum(-1, keepdim=True)  # (B, 1)
        c_pos = lengths + torch.arange(n, device=dev)  # (B, N)
        canvas = torch.tensor([e.canvas for e in batch], device=dev)  # (B, N)
        field = torch.tensor(batch[0].field, device=dev)
        key_valid = torch.cat([valid, torch.ones_like(canvas, dtype=torch.bool)], dim=1)
        spans = pass_spans(sampler, field)
        block_starts = {sum(spans[:i]) for i in range(len(spans))}
        predict = self._predictor(prompt, valid, p_pos, c_pos, key_valid, cache, block_starts, prompt_kv=prompt_kv,
                                  in_reply=field == 1)
        seeds = seeds or [self.options.seed] * len(batch)
        clean_vocab = None
        if sampler.copy_clean and all(e.raw for e in batch):  # built here, not at encode: training never needs it
            clean_vocab = torch.zeros(len(batch), self.cfg.vocab_size, dtype=torch.bool, device=dev)  # (B, V)
            for i, e in enumerate(batch):
                clean_vocab[i, clean_vocabulary(e.raw, self.tok)] = True
        out = denoise(predict, canvas, self.cfg.mask_id, field, self.tok.end_id, sampler,
                      seeds=seeds, should_stop=should_stop, on_step=on_step, deadline=deadline,
                      clean_vocab=clean_vocab,
                      repeats=self._repeats([e.raw for e in batch]) if sampler.no_repeat else None)
        return out.tolist()

    def _repeats(self, raws: list[str]) -> Repeats:
        """The no_repeat guard's data (`dllm.sampler.Repeats`) for a batch with these raw transcripts: digits
        and the end tokens may repeat; a number word may in a row's cleaned field where its speaker said it
        twice in a row; a word's spellings ("the", " the", "The", ...: at most seven in SmolLM2's vocabulary)
        count as one word."""
        if self._repeats_cache is None:
            V = self.cfg.vocab_size
            texts = self.tok.token_texts()[:V]
            texts += [""] * (V - len(texts))
            groups: dict[str, list[int]] = {}
            for i, text in enumerate(texts):
                word = text.strip().lower()
                if any(c.isalpha() for c in word):  # punctuation and spaces: only the token itself is a repeat
                    groups.setdefault(word, []).append(i)
            width = max(map(len, groups.values()), default=1)
            rows = [[i] * width for i in range(V)]
            for ids in groups.values():  # ids ascend: the smallest stands first, for the word's id
                for i in ids:
                    rows[i] = ids + [ids[0]] * (width - len(ids))
            spellings = torch.tensor(rows)
            ok = torch.zeros(V, dtype=torch.bool)
            ok[[i for i, text in enumerate(texts) if text.strip().isdigit()]] = True
            ok[[i for i in (self.tok.end_id, self.tok.eos_id) if 0 <= i < V]] = True
            numbers = {w: groups[w] for w in NUMBER_WORDS if w in groups}  # each number word's spellings
            self._repeats_cache = Repeats(ok.to(self.device), spellings=spellings.to(self.device)), numbers
        repeats, numbers = self._repeats_cache
        said_twice = [{a for a, b in zip(words, words[1:]) if a == b and a in numbers}
                      for words in ([w.strip(".,?!") for w in raw.lower().split()] for raw in raws)]
        if not any(said_twice):  # the common case: no row's speaker repeated a number word
            return repeats
        ok_cleaned = torch.zeros(len(raws), self.cfg.vocab_size, dtype=torch.bool)
        for row, repeated in enumerate(said_twice):
            for w in repeated:
                ok_cleaned[row, numbers[w]] = True
        return replace(repeats, ok_cleaned=ok_cleaned.to(self.device))

    def _predictor(self, prompt: Tensor | None, valid: Tensor, p_pos: Tensor | None, c_pos: Tensor,
                   key_valid: Tensor, cache: str, block_starts: set[int], *,
                   prompt_kv: tuple[KVCache, Tensor] | None = None,
                   in_reply: Tensor | None = None) -> Callable[[Tensor, int, Tensor], Tensor]:
        """The per-step function: canvas (B, N), step, cols (C,) -> logits (B, C, V) for those canvas
        positions. The whole canvas runs through the blocks; only the positions the sampler may commit
        this step go through the LM head (a fifth of a step's work per position, at SmolLM2's size).
        The approximate cache refreshes the prompt at `block_starts`, the steps that open a block.
        `prompt_kv`: the prompt's keys and values and its last hidden row (`_prompt_cache`), which the
        exact, window and rolling caches read; `prompt` and `p_pos` serve the approx and none modes.
        `in_reply` (N,): the canvas positions of the reply field (the rolling cache's spans stay in it)."""
        model, shift, P = self.canvas_model, self.cfg.shift_logits, valid.shape[1]
        if in_reply is None:
            in_reply = torch.zeros(c_pos.shape[1], dtype=torch.bool, device=c_pos.device)
        state: dict[str, object] = {}
        if cache in PREFIX_CACHES:
            if prompt_kv is None:
                raise RequestError(f"the {cache} cache reads the prompt's keys and values: pass prompt_kv")
            state["kv"], state["last"] = prompt_kv

        def rows(h: Tensor, last: Tensor) -> Tensor:
            """(B, N, D): the hidden state each canvas position is read from; with shifted logits,
            position j is read from row j - 1, and position 0 from the prompt's last row `last`."""
            return torch.cat([last, h[:, :-1]], dim=1) if shift else h

        def full(canvas: Tensor, save: bool) -> tuple[Tensor, KVCache | None]:
            tokens = torch.cat([prompt, canvas], dim=1)
            pos = torch.cat([p_pos, c_pos], dim=1)
            h, kv = model.hidden(tokens, pos, prefix_len=P, key_valid=key_valid, save_cache=save)
            return (h[:, P - 1: -1] if shift else h[:, P:]), kv

        def with_cache(canvas: Tensor) -> Tensor:
            h, _ = model.hidden(canvas, c_pos, prefix_len=P, key_valid=key_valid, cache=state["kv"])
            return rows(h, state["last"])

        def exact(canvas: Tensor, step: int, cols: Tensor) -> Tensor:
            self.forward_calls += 1
            return model.lm_head(with_cache(canvas)[:, cols])

        def window(canvas: Tensor, step: int, cols: Tensor) -> Tensor:
            """The exact prompt cache, and the canvas outside the block being decoded cached at the block's
            first step: the block's later steps run only its own span of the canvas and attend to the rest
            as it was then (Fast-dLLM's dual cache). In the lead that rest is the reply's tail, still all
            masks; in the tail it is the lead, committed already."""
            self.forward_calls += 1
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            if step in block_starts or "span" not in state or lo < state["span"][0] or hi > state["span"][1]:
                h, kv = model.hidden(canvas, c_pos, prefix_len=P, key_valid=key_valid, cache=state["kv"],
                                     save_cache=True)
                first = max(lo - 1, 0) if shift else lo  # with shifted logits, position lo is read from row lo - 1
                rest = torch.cat([torch.arange(first), torch.arange(hi, canvas.shape[1])]).to(canvas.device)
                state["span"], state["first"] = (lo, hi), first
                def keep(prompt_part: list[Tensor], canvas_part: list[Tensor]) -> list[Tensor]:
                    return [torch.cat([p, c[:, :, rest]], dim=2) for p, c in zip(prompt_part, canvas_part)]
                state["rest"] = KVCache(keep(state["kv"].keys, kv.keys), keep(state["kv"].values, kv.values))
                return model.lm_head(rows(h, state["last"])[:, cols])
            first, end = state["first"], state["span"][1]
            h, _ = model.hidden(canvas[:, first:end], c_pos[:, first:end], prefix_len=state["rest"].length,
                                key_valid=key_valid, cache=state["rest"])  # the prompt, the rest, the span: P + N
            # Row i of h is canvas position first + i. With shifted logits position j is read from row j - 1,
            # and position 0 from the prompt's last row.
            if not shift:
                return model.lm_head(h[:, cols - first])
            if first == 0:
                return model.lm_head(torch.cat([state["last"], h], dim=1)[:, cols])
            return model.lm_head(h[:, cols - first - 1])

        def rolling(canvas: Tensor, step: int, cols: Tensor) -> Tensor:
            """Each canvas position's keys and values are kept from the last step that ran it. A step runs
            only the span from the first to the last position it needs: those whose logits are asked for,
            those whose token changed since they last ran, and `EngineOptions.rolling_lookahead` more; the
            rest of the canvas is read from the cache. Written left to right (`SamplerOptions.reply_frontier`),
            a reply's step then runs a few positions, as autoregressive decoding would. Approximate: a kept
            position does not see what was committed after it last ran. So only steps that commit nothing
            but reply tokens take a span (the cleaned field, and a cleanup canvas, are written as with the
            exact cache), and a span of most of the canvas runs the whole canvas."""
            self.forward_calls += 1
            n = canvas.shape[1]
            first, last_col = int(cols[0]), int(cols[-1])
            lo, hi = (max(first - 1, 0), max(last_col, 1)) if shift else (first, last_col + 1)  # rows read
            hi = min(n, hi + self.options.rolling_lookahead)
            if "ran" in state:
                changed = (canvas != state["ran"]).any(0).nonzero().squeeze(-1)
                if len(changed):
                    lo, hi = min(lo, int(changed[0])), max(hi, int(changed[-1]) + 1)
            if "ran" not in state or 4 * (hi - lo) > 3 * n or not in_reply[cols].all():
                h, kv = model.hidden(canvas, c_pos, prefix_len=P, key_valid=key_valid, cache=state["kv"],
                                     save_cache=True)
                state["ckv"], state["ran"] = kv, canvas.clone()
                return model.lm_head(rows(h, state["last"])[:, cols])
            ckv, pkv = state["ckv"], state["kv"]
            outside = lambda p, c: torch.cat([p, c[:, :, :lo], c[:, :, hi:]], dim=2)  # noqa: E731
            rest = KVCache([outside(p, c) for p, c in zip(pkv.keys, ckv.keys)],
                           [outside(p, c) for p, c in zip(pkv.values, ckv.values)])
            # The keys are the prompt, the rest of the canvas, then the span: P + N of them, all real past the
            # prompt, as key_valid already says.
            h, kv = model.hidden(canvas[:, lo:hi], c_pos[:, lo:hi], prefix_len=rest.length, key_valid=key_valid,
                                 cache=rest, save_cache=True)
            for kept, new in zip(ckv.keys + ckv.values, kv.keys + kv.values):
                kept[:, :, lo:hi] = new
            state["ran"][:, lo:hi] = canvas[:, lo:hi]
            if not shift:
                return model.lm_head(h[:, cols - lo])
            if first == 0:  # position 0 is read from the prompt's last row
                return model.lm_head(torch.cat([state["last"], h[:, cols[1:] - 1 - lo]], dim=1))
            return model.lm_head(h[:, cols - 1 - lo])

        def approx(canvas: Tensor, step: int, cols: Tensor) -> Tensor:
            self.forward_calls += 1
            if step in block_starts:  # refresh at each block's start
                h, kv = full(canvas, save=True)
                kv.keys = [k[:, :, :P] for k in kv.keys]
                kv.values = [v[:, :, :P] for v in kv.values]
                kv.valid = valid
                state["kv"], state["last"] = kv, h[:, :1]
                return model.lm_head(h[:, cols])
            return model.lm_head(with_cache(canvas)[:, cols])

        def none(canvas: Tensor, step: int, cols: Tensor) -> Tensor:
            self.forward_calls += 1
            return model.lm_head(full(canvas, save=False)[0][:, cols])

        return {"exact": exact, "window": window, "rolling": rolling, "approx": approx, "none": none}[cache]

    def _prompt_cache(self, batch: list[Encoded]) -> tuple[tuple[KVCache, Tensor], Tensor]:
        """Keys and values of each row's prompt, its last hidden row (B, 1, D), and which key slots hold
        real tokens (B, P). Row i is laid out as [padding, head i, padding, rest i]: the head (instruction,
        card and history, `Encoded.head`) comes from the head cache (`_head_kv`), and only the rest (the
        user's words) runs here. The prompt is causal, so this equals running it whole."""
        dev, pad = self.device, self.tok.end_id
        lens, heads = zip(*(self._prompt_start(e) for e in batch))
        rests = [e.prompt[h:] for e, h in zip(batch, lens)]
        H, R = max(lens), max(len(r) for r in rests)
        head_valid = torch.tensor([[False] * (H - h) + [True] * h for h in lens], dtype=torch.bool, device=dev)
        rest_valid = torch.tensor([[False] * (R - len(r)) + [True] * len(r) for r in rests], device=dev)
        valid = torch.cat([head_valid, rest_valid], dim=1)  # (B, H + R)
        tokens = torch.tensor([[pad] * (R - len(r)) + r for r in rests], device=dev)  # (B, R)
        starts = torch.tensor([[h] for h in lens], device=dev)
        positions = (starts + torch.arange(R, device=dev) - (R - rest_valid.sum(-1, keepdim=True))).clamp(min=0)
        past = None
        if H:  # each row's head keys and values, left-padded to H (a row without a head: all padding)
            def stack(parts: list[Tensor | None]) -> Tensor:  # each (1, Hkv, h, D) or None -> (B, Hkv, H, D)
                like = next(t for t in parts if t is not None)
                return torch.cat([like.new_zeros(1, like.shape[1], H, like.shape[3]) if t is None else
                                  F.pad(t, (0, 0, H - t.shape[2], 0)) for t in parts])
            layers = range(self.cfg.n_layers)
            past = KVCache([stack([None if kv is None else kv.keys[i] for kv in heads]) for i in layers],
                           [stack([None if kv is None else kv.values[i] for kv in heads]) for i in layers])
        h, kv = self.model.hidden(tokens, positions, prefix_len=H + R, key_valid=valid, cache=past, save_cache=True)
        if past is not None:
            kv = KVCache([torch.cat(p, dim=2) for p in zip(past.keys, kv.keys)],
                         [torch.cat(p, dim=2) for p in zip(past.values, kv.values)])
        return (kv, h[:, -1:]), valid

    def _prompt_start(self, enc: Encoded) -> tuple[int, KVCache | None]:
        """How many of `enc`'s prompt tokens come from the cache, and their keys and values: its head, or
        more where a kept entry shares more of the prompt (a prefill of the user's first words, from a
        partial transcript); (0, None) with the cache off. The last prompt token always runs: the canvas
        reads its row."""
        h = enc.head if self.options.head_cache_tokens else 0
        if not h:
            return 0, None
        prompt = tuple(enc.prompt)
        n, kv = self._shared_run(prompt, longer_than=h, at_most=len(prompt) - 1)
        if kv is not None:
            self.word_hits += 1
            return n, kv
        return h, self._head_kv(prompt[:h])

    def _shared_run(self, tokens: tuple[int, ...], *, longer_than: int, at_most: int,
                    whole: bool = False) -> tuple[int, KVCache | None]:
        """The longest run of `tokens` from their start (more than `longer_than`, at most `at_most` of them)
        that a kept entry begins with too (with `whole`, that is all of the entry), and that run's keys and
        values; (0, None) if none. The prompt is causal, so a shared run's keys and values are the same
        whatever followed it, up to rounding."""
        best, key = longer_than, None
        with self._heads_lock:
            for k in self._heads:
                if whole and not (best < len(k) <= at_most and tokens[:len(k)] == k):
                    continue
                if best < min(len(k), at_most) and k[:best + 1] == tokens[:best + 1]:
                    n = best + 1
                    while n < min(len(k), at_most) and k[n] == tokens[n]:
                        n += 1
                    best, key = n, k
            if key is None:
                return 0, None
            self._heads.move_to_end(key)  # in use: the instruction's head, shared by every new conversation, stays
            kv = self._heads[key]
        return best, KVCache([t[:, :, :best] for t in kv.keys], [t[:, :, :best] for t in kv.values])

    def _head_kv(self, head: tuple[int, ...], *, should_stop: Callable[[], bool] | None = None) -> KVCache | None:
        """The keys and values (1, Hkv, h, D) of a prompt head, from the cache or computed and kept.

        A head not in the cache is computed from the longest kept head it begins with (the same
        conversation a turn ago, or the instruction and card alone): only the tokens past it run. With
        `should_stop`, they run `HEAD_CHUNK` at a time and stop when it says so, keeping the part done
        (a later turn begins from it); then the return value is None."""
        if not head:
            return None
        with self._heads_lock:
            kv = self._heads.get(head)
            if kv is not None:
                self._heads.move_to_end(head)
                self.head_hits += 1
                return kv
        # From a whole kept head: a run borrowed from another entry would round differently from the head
        # computed alone, and with int8 canvas steps that moves the eval's scores (docs/MODEL_CARD.md).
        start, kv = self._shared_run(head, longer_than=0, at_most=len(head) - 1, whole=True)
        done = start
        while done < len(head):
            if should_stop is not None and done > start and should_stop():
                self._keep_head(head[:done], kv)  # a later turn begins from the part done
                return None
            end = len(head) if should_stop is None else min(len(head), done + HEAD_CHUNK)
            tokens = torch.tensor([head[done:end]], device=self.device)
            positions = torch.arange(done, end, device=self.device)[None]
            _, new = self.model.hidden(tokens, positions, prefix_len=end, cache=kv, save_cache=True,
                                       key_valid=torch.ones(1, end, dtype=torch.bool, device=self.device))
            kv = new if kv is None else KVCache([torch.cat(p, dim=2) for p in zip(kv.keys, new.keys)],
                                                [torch.cat(p, dim=2) for p in zip(kv.values, new.values)])
            done = end
        self._keep_head(head, kv)
        return kv

    def _keep_head(self, head: tuple[int, ...], kv: KVCache) -> None:
        limit = self.options.head_cache_tokens
        if len(head) > limit:
            return
        with self._heads_lock:
            self._heads[head] = kv
            while sum(len(k) for k in self._heads) > limit:
                self._heads.popitem(last=False)

    def _finish(self, enc: Encoded, ids: list[int], sampler: SamplerOptions, ms: float) -> TurnResult:
        cleaned = decode_field(ids, enc.field, 0, self.tok, self.cfg.mask_id)
        reply = decode_field(ids, enc.field, 1, self.tok, self.cfg.mask_id) if enc.with_reply else ""
        if sampler.whole_sentences:
            reply = whole_sentences(reply)
        return TurnResult(raw=enc.raw, cleaned=cleaned, reply=reply, steps=sampler.steps,
                          canvas=len(enc.canvas), ms=ms)

    def run(self, encs: list[Encoded], sampler: SamplerOptions | None = None, *,
            on_step: Callable[[list[int], int, Tensor], None] | None = None) -> list[TurnResult]:
        """Blocking: run encoded turns, batching those of one canvas shape.

        `on_step(rows, step, canvas)`, if given, sees each batch's canvas after each step,
        `rows` being the indices into `encs` of the batch's canvases."""
        sampler = sampler or self.options.sampler
        results: dict[int, TurnResult] = {}
        groups: dict[tuple, list[int]] = {}
        for i, e in enumerate(encs):
            groups.setdefault(e.shape_key, []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.options.max_batch):
                chunk = idx[start:start + self.options.max_batch]
                t0 = time.perf_counter()
                watch = None if on_step is None else (lambda step, canvas, rows=chunk: on_step(rows, step, canvas))
                outs = self.generate([encs[i] for i in chunk], sampler, on_step=watch)
                ms = (time.perf_counter() - t0) * 1000
                for i, ids in zip(chunk, outs):
                    results[i] = self._finish(encs[i], ids, sampler, ms)
        return [results[i] for i in range(len(encs))]

    def respond_sync(self, turn: Turn, *, steps: int | None = None) -> TurnResult:
        return self.run([self.encode(turn)], self._sampler(steps))[0]

    def cleanup_sync(self, texts: list[str], *, steps: int | None = None) -> list[TurnResult]:
        return self.run([self.encode(Turn(t), with_reply=False) for t in texts], self._sampler(steps))

    def _sampler(self, steps: int | None) -> SamplerOptions:
        return self.options.sampler if steps is None else replace(self.options.sampler, steps=steps)

    # ----- the asyncio front -----

    async def start(self) -> None:
        """Start the batching worker on the running loop (again, if an earlier loop has gone)."""
        worker = self._worker
        if worker is None or worker.done() or worker.get_loop() is not asyncio.get_running_loop():
            self._wake = asyncio.Event()
            self._worker = asyncio.create_task(self._work(), name="dllm-engine")

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await asyncio.wait_for(self._worker, timeout=5)
            except (asyncio.CancelledError, asyncio.TimeoutError):
                pass
            self._worker = None
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(EngineClosed("the engine was shut down"))
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def respond(self, turn: Turn, *, steps: int | None = None, temperature: float | None = None,
                      seed: int | None = None, reply_tokens: int | None = None,
                      on_canvas: Callable[[CanvasStep], None] | None = None,
                      deadline: float | None = None, client: object = None,
                      priority: int = PRIORITY_BULK) -> TurnResult:
        """Clean the transcript and write a reply, in one pass. Cancel the
        awaiting task to withdraw the request (it leaves its batch).

        Optional: `temperature` and `seed` for sampling, `reply_tokens` (the
        reply field's length), `on_canvas` (called on the event loop with each
        step's `CanvasStep`), `deadline` (a `time.monotonic()` value; see
        `dllm.sampler.denoise`), and for the queue's fairness `client` (any
        hashable naming who asked) and `priority` (`PRIORITY_INTERACTIVE` for
        a turn someone is waiting on).
        """
        sampler = self._sampler(steps)
        if temperature is not None:
            sampler = replace(sampler, temperature=temperature)
        layout = None if reply_tokens is None else replace(self.options.layout, reply_tokens=reply_tokens)
        return await self._submit(self.encode(turn, layout=layout), sampler, seed=seed, on_canvas=on_canvas,
                                  deadline=deadline, client=client, priority=priority)

    async def cleanup(self, text: str, *, steps: int | None = None, client: object = None,
                      priority: int = PRIORITY_BULK) -> TurnResult:
        """Clean a transcript only (no reply field; a shorter canvas). `client`, `priority`: as for `respond`."""
        return await self._submit(self.encode(Turn(text), with_reply=False), self._sampler(steps),
                                  client=client, priority=priority)

    async def prefill(self, turn: Turn, *, words: bool = False) -> bool:
        """Compute and keep the keys and values of `turn`'s prompt head (the instruction, a card, the history)
        while the engine is idle, so that a turn with that head later runs only the user's new words. A voice
        session calls it when a reply has been sent, with the history the next turn will have. With `words`,
        the user's words so far (`turn.transcript`, a partial transcript) are computed too: a turn whose
        words begin the same way runs only the rest. It gives way to requests: it stops, keeping the part
        done, as soon as one is waiting. Returns whether all of it is ready."""
        if self._closed or not self.options.head_cache_tokens or self.cache_mode not in PREFIX_CACHES:
            return False
        enc = self.encode(turn if words else replace(turn, transcript="."))
        end = enc.head
        if words and enc.head:  # the prompt without the message's close and the assistant's opening
            tail = self.tok.encode(self.chat.close + self.chat.assistant_open)
            end = len(enc.prompt) - len(tail) if enc.prompt[-len(tail):] == tail else enc.head
        head = tuple(enc.prompt[:end])
        if not head or self._pending:
            return False
        kv = await asyncio.get_running_loop().run_in_executor(
            self._thread, lambda: self._head_kv(head, should_stop=lambda: bool(self._pending)))
        if words and kv is not None:  # the utterance's earlier partials are this one's start: drop them
            with self._heads_lock:
                for k in [k for k in self._words if len(k) < len(head) and head[:len(k)] == k]:
                    self._heads.pop(k, None)
                self._words = {k for k in self._words if k in self._heads} | {head}
        return kv is not None

    async def _submit(self, enc: Encoded, sampler: SamplerOptions, **extra) -> TurnResult:
        if self._closed:
            raise EngineClosed("the engine was shut down")
        await self.start()
        priority = extra.get("priority", PRIORITY_BULK)
        live = sum(1 for p in self._pending if not p.future.done() and p.priority >= priority)
        if live >= self.options.max_queue:
            raise EngineBusy(f"the engine has {live} requests waiting (max_queue={self.options.max_queue}); retry later")
        pending = _Pending(enc, sampler, asyncio.get_running_loop().create_future(), **extra)
        self._pending.append(pending)
        self._wake.set()
        return await pending.future

    def _take_batch(self) -> list[_Pending]:
        """The next batch. Its lead is the most urgent request of the client served longest ago;
        requests of the lead's shape join one client at a time (round-robin), oldest first."""
        live = [p for p in self._pending if not p.future.done()]  # done: cancelled while waiting
        if not live:
            self._pending.clear()
            return []
        order = lambda p: (-p.priority, self._last_served.get(p.client, -1))  # noqa: E731 - stable: FIFO on ties
        lead = min(live, key=order)
        key, rows = lead.key, self.options.max_batch
        if lead.priority <= PRIORITY_BULK and self.options.max_bulk_batch is not None:
            rows = min(rows, self.options.max_bulk_batch)
        queues: dict[object, deque[_Pending]] = {}
        for p in sorted((p for p in live if p.key == key), key=order):
            queues.setdefault(p.client, deque()).append(p)
        batch: list[_Pending] = []
        while queues and len(batch) < rows:
            for client in list(queues):
                if len(batch) < rows:
                    batch.append(queues[client].popleft())
                if not queues[client]:
                    del queues[client]
        taken = {id(p) for p in batch}
        self._pending = deque(p for p in live if id(p) not in taken)
        self._batches += 1
        for p in batch:
            self._last_served[p.client] = self._batches
        if len(self._last_served) > 4 * self.options.max_queue:  # forget clients with nothing waiting
            waiting = {p.client for p in self._pending}
            self._last_served = {c: n for c, n in self._last_served.items() if c in waiting}
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.options.batch_window_ms / 1000)
            batch = self._take_batch()
            if not self._pending:
                self._wake.clear()
            if not batch:
                continue
            futures = [p.future for p in batch]
            t0, calls = time.perf_counter(), self.forward_calls
            seeds = [self.options.seed if p.seed is None else p.seed for p in batch]
            deadline = min((p.deadline for p in batch if p.deadline is not None), default=None)
            on_step = self._canvas_sender(batch, loop) if any(p.on_canvas for p in batch) else None
            try:
                outs = await loop.run_in_executor(
                    self._thread, lambda: self.generate([p.enc for p in batch], batch[0].sampler,
                                                        should_stop=lambda: all(f.done() for f in futures),
                                                        seeds=seeds, on_step=on_step, deadline=deadline))
            except Exception as e:  # reported to every caller of the batch; the worker carries on
                log.exception("batch of %d failed", len(batch))
                for f in futures:
                    if not f.done():
                        f.set_exception(e)
                continue
            ms = (time.perf_counter() - t0) * 1000
            if self.on_batch is not None:
                self.on_batch(len(batch), self.forward_calls - calls, ms)
            for p, ids in zip(batch, outs):
                if not p.future.done():
                    p.future.set_result(self._finish(p.enc, ids, p.sampler, ms))

    @property
    def batches(self) -> int:
        """Batches taken from the queue so far (requests served together count once)."""
        return self._batches

    @property
    def waiting(self) -> int:
        """Requests queued and not yet in a batch."""
        return sum(1 for p in self._pending if not p.future.done())

    def _canvas_sender(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> Callable[[int, Tensor], None]:
        """The sampler's on_step for a batch: each watching request's canvas, rendered, sent to the loop."""
        def on_step(step: int, canvas: Tensor) -> None:  # on the model thread
            for p, ids in zip(batch, canvas.tolist()):
                if p.on_canvas is not None and not p.future.done():
                    snap = canvas_step(ids, p.enc, step, p.sampler.steps, self.tok, self.cfg.mask_id)
                    loop.call_soon_threadsafe(p.on_canvas, snap)
        return on_step
