"""The fixed-cost denoising sampler for masked diffusion LMs.

A canvas of N positions, some fixed and some masked, is filled in exactly K
model calls. Each step predicts every masked position, scores its confidence
and commits the most confident ones:

  - "linear" (LLaDA, Nie et al. 2025, low-confidence remasking): about
    remaining / steps_left positions a step, so everything is committed by
    step K;
  - "threshold" (Fast-dLLM, Wu et al. 2025): every position whose confidence
    passes the threshold, and never fewer than the linear quota, so it still
    finishes within K steps (sooner when the model is sure).

Optional semi-autoregressive blocks fill the canvas left to right, K / blocks
steps each. The lead is a two-block order for the voice turn: the cleaned field
and the reply's first few tokens first, so the first sentence can be spoken
before the pass ends. The reply frontier writes the reply from its left edge, a
token or a few sure ones a step, so its words come from one way of saying it.
Everything is batched with static shapes: per-row quotas become a rank
comparison, never a Python loop over rows or a host sync inside a step.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import RequestError

CONFIDENCE_KINDS = ("prob", "margin", "entropy")
REPAIR_CHOICES = 8  # a repeat committed in one step is mended with the best of this many choices
SCHEDULES = ("linear", "threshold")


@dataclass(frozen=True)
class SamplerOptions:
    """How a canvas is denoised. The defaults suit the voice turn."""

    steps: int = 8  # K: model calls per canvas, the speed-versus-quality dial
    schedule: str = "linear"
    threshold: float = 0.9  # for schedule="threshold"
    confidence: str = "prob"  # what ranks positions: prob, margin (top1 - top2), or -entropy
    temperature: float = 0.0  # 0: greedy; >0: Gumbel-max sampling, seeded per request
    blocks: int = 1  # semi-autoregressive blocks (1: the whole canvas at once)
    # The lead: the cleaned field and the reply's first `lead_tokens` positions are committed in the
    # first `lead_steps` steps, the rest of the reply after. The reply's first sentence is then final part
    # way through the pass and can be spoken while the rest denoises (0: off; blocks > 1 replace it).
    # None: half the steps with `reply_frontier` (which paces the reply itself), else three quarters.
    lead_tokens: int = 12
    lead_steps: int | None = None
    fill_after_end: bool = True  # once a field commits its end token, pad the rest of it
    # Guards against the failure modes of few-step decoding (each measured on and off in dllm.eval):
    copy_clean: bool = True  # the cleaned field only uses tokens of the raw transcript's words (+ case, punctuation, digits)
    # None: other tokens are forbidden there; a number: their logits are lowered by this much instead, so a
    # near-miss word the model is sure of ("there" heard for "their") can still be fixed.
    copy_clean_penalty: float | None = None
    no_repeat: bool = True  # never the same token twice side by side (digits and end tokens excepted)
    end_confidence: float = 0.9  # an end token below this confidence is committed last, not first (0: off)
    # Two side-by-side positions decided in one step are guessed independently ("Hello'm, thanks would"):
    # a position whose masked neighbour is more confident waits, unless it is this sure itself (0: off).
    no_adjacent: float = 0.9
    whole_sentences: bool = True  # a reply that trails off after a finished sentence ends at that sentence
    # The reply written from its left edge: a step commits, among the reply's first `reply_frontier` open
    # positions, the one the model is surest of and every other it is `threshold` sure of; the pass's last
    # step commits what is left. A reply can be said several ways ("Sorry, I don't know." / "I'm sorry, I
    # don't know that."): positions guessed in one step take their words from different ones ("I'm sorry,
    # I sorry."), unless the model is sure of them. 0: the reply is paced like the rest of its block (and
    # blocks > 1 replace it).
    reply_frontier: int = 4

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise RequestError(f"steps must be at least 1, got {self.steps}")
        if self.schedule not in SCHEDULES:
            raise RequestError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.confidence not in CONFIDENCE_KINDS:
            raise RequestError(f"confidence must be one of {CONFIDENCE_KINDS}, got {self.confidence!r}")
        if self.blocks < 1 or self.steps % self.blocks:
            raise RequestError(f"blocks ({self.blocks}) must be at least 1 and divide steps ({self.steps})")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.lead_tokens < 0:
            raise RequestError(f"lead_tokens must be >= 0, got {self.lead_tokens}")
        if self.copy_clean_penalty is not None and not self.copy_clean_penalty >= 0:
            raise RequestError(f"copy_clean_penalty must be >= 0 or None, got {self.copy_clean_penalty}")
        if self.reply_frontier < 0:
            raise RequestError(f"reply_frontier must be >= 0, got {self.reply_frontier}")
        if self.lead_steps is not None and not 1 <= self.lead_steps < self.steps:
            raise RequestError(f"lead_steps must lie in [1, steps), got {self.lead_steps} with steps={self.steps}")



def score(logits: Tensor, kind: str, temperature: float = 0.0,
          noise: Tensor | None = None, *, fused: bool | None = None) -> tuple[Tensor, Tensor]:
    """Predicted tokens and their confidence for logits (..., V).

    With `noise` (Gumbel, same shape) and temperature > 0 the token is
    sampled by Gumbel-max; the confidence is still read from the clean
    distribution. `fused` (default: on CUDA) goes through `kernels.confidence`,
    one pass over the logits in Triton; otherwise this PyTorch code runs.
    """
    if logits.is_cuda if fused is None else fused:
        import kernels
        V = logits.shape[-1]
        c = kernels.confidence(logits.reshape(-1, V), temperature=temperature or 1.0,
                               noise=None if noise is None else noise.reshape(-1, V))
        conf = {"prob": c.prob, "margin": c.margin, "entropy": -c.entropy}[kind]
        return c.token.view(logits.shape[:-1]), conf.view(logits.shape[:-1])
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    tokens = (logits + noise).argmax(-1) if noise is not None else logits.argmax(-1)
    logp = torch.log_softmax(logits, dim=-1)
    if kind == "prob":
        conf = logp.gather(-1, tokens[..., None]).squeeze(-1).exp()
    elif kind == "margin":
        top2 = logp.topk(2, dim=-1).values.exp()
        conf = top2[..., 0] - top2[..., 1]
    else:  # negative entropy: peaked distributions first
        conf = (logp.exp() * logp).sum(-1)
    return tokens, conf


def gumbel_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device) -> Tensor:
    """Gumbel noise (B, ...) with one generator per row, so a request samples
    the same tokens batched or alone."""
    rows = []
    for seed in seeds:
        g = torch.Generator(device="cpu").manual_seed(seed)
        u = torch.rand(shape[1:], generator=g, dtype=torch.float32).clamp_(1e-10, 1.0)
        rows.append(-torch.log(-torch.log(u)))
    return torch.stack(rows).to(device)


def uses_lead(opts: SamplerOptions, field: Tensor) -> bool:
    """Whether a pass over a canvas with these fields (N,) runs in the lead's two blocks: only
    when the canvas has a reply field longer than the lead (a cleanup canvas has none)."""
    return bool(opts.lead_tokens and opts.blocks == 1 and opts.steps > 1
                and int((field == 1).sum()) > opts.lead_tokens)


def pass_spans(opts: SamplerOptions, field: Tensor) -> list[int]:
    """Steps given to each block of a pass over a canvas with these fields, in order (sum: steps)."""
    if uses_lead(opts, field):
        # The lead's default share: with the frontier it paces only the cleaned field (the reply keeps its own
        # pace), and half the steps measured best; without it, three quarters (docs/MODEL_CARD.md).
        first = opts.lead_steps or max(1, opts.steps // 2 if opts.reply_frontier else opts.steps * 3 // 4)
        return [first, opts.steps - first]
    return [opts.steps // opts.blocks] * opts.blocks


def _commit_mask(conf: Tensor, candidates: Tensor, steps_left: int, opts: SamplerOptions) -> Tensor:
    """Which candidate positions (B, N) to commit this step."""
    remaining = candidates.sum(-1, keepdim=True)  # (B, 1)
    quota = (remaining + steps_left - 1) // steps_left  # ceil: done by the last step
    conf = conf.masked_fill(~candidates, float("-inf"))
    if opts.schedule == "threshold":
        quota = torch.maximum(quota, ((conf > opts.threshold) & candidates).sum(-1, keepdim=True))
    order = conf.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return (rank < quota) & candidates


def _frontier_commit(conf: Tensor, frontier: Tensor, final: bool, threshold: float) -> Tensor:
    """The reply's commits (B, N) among its `frontier` positions: the surest one and every one at least
    `threshold` sure; at the pass's `final` step, all of them."""
    if final:
        return frontier
    conf = conf.masked_fill(~frontier, float("-inf"))
    best = torch.zeros_like(frontier).scatter_(-1, conf.argmax(-1, keepdim=True), True)
    return (best | (conf >= threshold)) & frontier


@dataclass(frozen=True)
class Repeats:
    """What the no_repeat guard counts as one word twice side by side (`Engine` builds it from its tokenizer).

    `ok` (V,): tokens that may stand twice anyway (digits: "511"; the end tokens). `ok_cleaned` (B, V): per
    row, tokens that may also in the cleaned field: the number words its speaker said twice in a row ("four
    four nine"); a reply saying "ten ten" is broken. `spellings` (V, M): the ids of each token's word in every
    case, with and without its leading space ("the", " the", "The"), smallest first, so that "The the" is a
    repeat too.
    """

    ok: Tensor
    ok_cleaned: Tensor | None = None
    spellings: Tensor | None = None

    def word(self, tokens: Tensor) -> Tensor:
        """Each token's word: one id shared by all its spellings."""
        return tokens if self.spellings is None else self.spellings[tokens, 0]

    def allowed(self, tokens: Tensor, cleaned: Tensor) -> Tensor:
        """Which `tokens` (B, C) may stand beside their own word, at positions in the cleaned field or not
        (`cleaned` (C,))."""
        ok = self.ok[tokens]
        return ok if self.ok_cleaned is None else ok | (self.ok_cleaned.gather(1, tokens) & cleaned)


def _guard_logits(logits: Tensor, canvas: Tensor, field: Tensor, cols: Tensor, mask_id: int, opts: SamplerOptions,
                  clean_vocab: Tensor | None, repeats: Repeats | None) -> Tensor:
    """Rule out, per position, the tokens the guards forbid (logits -inf). The mask token is never a prediction.
    `logits` (B, C, V) are those of the canvas positions `cols` (C,)."""
    logits = logits.clone()  # (B, C, V)
    if opts.copy_clean and clean_vocab is not None:
        outside = ~clean_vocab[:, None, :] & (field[cols] == 0)[None, :, None]  # (B, C, V)
        if opts.copy_clean_penalty is None:
            logits.masked_fill_(outside, float("-inf"))
        else:
            logits.sub_(outside * opts.copy_clean_penalty)
    if opts.no_repeat:
        masked = (canvas == mask_id)[:, cols]
        for neighbour in (F.pad(canvas[:, :-1], (1, 0), value=mask_id), F.pad(canvas[:, 1:], (0, 1), value=mask_id)):
            neighbour = neighbour[:, cols]  # (B, C)
            if repeats is None:
                banned, free = neighbour[..., None], ~masked
            else:  # (B, C, M): the neighbour's word in every spelling
                banned = neighbour[..., None] if repeats.spellings is None else repeats.spellings[neighbour]
                free = ~masked | repeats.allowed(neighbour, field[cols] == 0)
            logits.scatter_(-1, torch.where(free[..., None], mask_id, banned), float("-inf"))
    logits[..., mask_id] = float("-inf")
    return logits


def _guard_confidence(conf: Tensor, tokens: Tensor, candidates: Tensor, field: Tensor, end_id: int,
                      opts: SamplerOptions, repeats: Repeats | None) -> Tensor:
    """Demote (rank last, not forbid) unsure end tokens, unsure positions beside a surer masked one,
    and the weaker of two equal neighbours."""
    low = torch.zeros_like(candidates)
    if opts.end_confidence > 0:
        low |= (tokens == end_id) & (conf < opts.end_confidence)
    if opts.no_adjacent > 0:  # only local maxima of confidence among masked neighbours go first
        c = conf.masked_fill(~candidates, float("-inf"))
        left = F.pad(c[:, :-1], (1, 0), value=float("-inf"))
        right = F.pad(c[:, 1:], (0, 1), value=float("-inf"))
        low |= ((left > c) | (right >= c)) & (conf < opts.no_adjacent) & candidates  # a tie: the left one goes
    if opts.no_repeat:
        word = tokens if repeats is None else repeats.word(tokens)
        same = (word[:, 1:] == word[:, :-1]) & candidates[:, 1:] & candidates[:, :-1]  # (B, N-1): j-1 and j
        if repeats is not None:
            same &= ~repeats.allowed(tokens[:, 1:], field[1:] == 0)
        right_weaker = conf[:, 1:] <= conf[:, :-1]
        low[:, 1:] |= same & right_weaker
        low[:, :-1] |= same & ~right_weaker
    return torch.where(low, conf - 100.0, conf)  # below any undemoted one: prob and margin lie in [0, 1], -entropy above -11


def _split_repeats(tokens: Tensor, canvas: Tensor, commit: Tensor, top: Tensor, field: Tensor, mask_id: int,
                   repeats: Repeats | None) -> Tensor:
    """Where this step would leave one word twice side by side, every second position of the run takes its
    best choice that differs from both neighbours (of its top choices, `top` (B, N, T)). Two vectorised rounds."""
    idx = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    for _ in range(2):
        after = torch.where(commit, tokens, canvas)  # the canvas as this step would leave it
        word = after if repeats is None else repeats.word(after)
        same = F.pad(word[:, 1:] == word[:, :-1], (1, 0)) & commit & (after != mask_id)
        if repeats is not None:
            same &= ~repeats.allowed(after, field == 0)
        run_start = torch.where(same, 0, idx).cummax(-1).values
        swap = same & ((idx - run_start) % 2 == 1)
        left = F.pad(word[:, :-1], (1, 0), value=mask_id)
        right = F.pad(word[:, 1:], (0, 1), value=mask_id)
        top_word = top if repeats is None else repeats.word(top)
        fits = (top_word != left[..., None]) & (top_word != right[..., None])  # (B, N, T)
        pick = torch.where(fits.any(-1), fits.int().argmax(-1), 0)
        tokens = torch.where(swap, top.gather(-1, pick[..., None]).squeeze(-1), tokens)
    return tokens


def _fill_after_end(canvas: Tensor, masked: Tensor, fields: list[Tensor], end_id: int) -> Tensor:
    """Mark masked positions that follow a committed end token in their field."""
    fill = torch.zeros_like(masked)
    for in_field in fields:  # each (N,) bool
        seen_end = ((canvas == end_id) & ~masked & in_field).int().cummax(-1).values.bool()
        fill |= seen_end & masked & in_field
    return fill


def denoise(predict: Callable[[Tensor, int, Tensor], Tensor], canvas: Tensor, mask_id: int, field: Tensor,
            end_id: int, opts: SamplerOptions, *, seeds: list[int] | None = None,
            should_stop: Callable[[], bool] | None = None,
            on_step: Callable[[int, Tensor], None] | None = None, deadline: float | None = None,
            clean_vocab: Tensor | None = None, repeats: Repeats | None = None) -> Tensor:
    """Fill every `mask_id` position of `canvas` (B, N) in `opts.steps` calls.

    `predict(canvas, step, cols)` returns logits (B, C, V) for the canvas
    positions `cols` (C,), already shifted for models with shifted logits:
    only the positions some row may commit this step are asked for. `field` (N,) numbers
    the canvas fields (-1 for fixed text); it drives end-token filling and
    the semi-autoregressive blocks. Returns the filled canvas. Stops early
    only if every position is committed (threshold schedule) or if
    `should_stop()` says the callers have gone.

    Guards (each switched by `opts`): with `clean_vocab` (B, V) bool, field 0
    (the cleaned transcript) may only take each row's allowed tokens; with
    `no_repeat`, a position never takes the word of a committed neighbour,
    and of two neighbours that would commit the same word in one step the
    less confident waits (`repeats` says which tokens are one word, "The the",
    and which may repeat: digits, and in the cleaned field numbers as words);
    with `end_confidence`, unsure end tokens rank below every other choice.

    The anytime canvas: `on_step(step, canvas)` sees the canvas after each
    step (a host sync: leave it None when nobody watches). `deadline` (a
    `time.monotonic()` value) makes the step that would otherwise end past
    it the last one: it commits every masked position left, so the pass
    returns whole fields in time, one step at the least.
    """
    canvas = canvas.clone()
    B, N = canvas.shape
    editable = canvas == mask_id
    spans = pass_spans(opts, field)
    if uses_lead(opts, field):
        reply_index = (field == 1).int().cumsum(-1) - 1  # (N,): index within the reply field
        lead = (field == 0) | ((field == 1) & (reply_index < opts.lead_tokens))
        block_of = torch.where(editable, torch.where(lead, 0, 1).expand(B, N), -1)
    else:  # blocks split the editable positions, in order, into equal runs
        order = editable.int().cumsum(-1) - 1  # (B, N): index among editable positions
        n_edit = editable.sum(-1, keepdim=True).clamp(min=1)
        block_of = torch.where(editable, order * opts.blocks // n_edit, -1)
    ends = [sum(spans[:i + 1]) for i in range(len(spans))]  # the step each block ends before
    ends_t = torch.tensor(ends, device=canvas.device)
    fields = [field == f for f in field.unique().tolist() if f >= 0]
    in_reply = field == 1  # (N,)
    frontier_on = bool(opts.reply_frontier) and opts.blocks == 1  # semi-autoregressive blocks order the reply instead
    t0 = time.monotonic()
    for step in range(opts.steps):
        if should_stop is not None and should_stop():
            break
        masked = canvas == mask_id
        # A row's block: the one this step is scheduled for, or a later one when the row has filled
        # it already (the threshold schedule, or end padding), so its steps are not wasted.
        scheduled = next(i for i, e in enumerate(ends) if step < e)
        first_open = torch.where(masked, block_of, len(ends) - 1).min(-1, keepdim=True).values  # (B, 1)
        block = first_open.clamp(min=scheduled)
        t = time.monotonic()  # last: this step and one more, at the mean pace, would end past the deadline
        last = deadline is not None and t + (2 * (t - t0) / step if step else 0.0) >= deadline
        candidates = masked if last else masked & (block_of == block)
        final = last or step == opts.steps - 1
        if frontier_on:  # the reply's candidates: its first open positions, whatever block they are in
            reply_open = masked & in_reply
            frontier = reply_open if final else reply_open & (reply_open.int().cumsum(-1) <= opts.reply_frontier)
            candidates = (candidates & ~in_reply) | frontier
        # (C,): the LM head and the scoring run on these alone. A host sync, and C varies from step to step:
        # on a CPU, where a step is compute-bound, a fifth of the work per skipped position is worth both.
        cols = candidates.any(0).nonzero().squeeze(-1)
        if len(cols) == 0:  # nothing left to commit (an end token filled the fields): no model call
            if on_step is not None:
                on_step(step, canvas)
            continue
        logits = predict(canvas, step, cols)  # (B, C, V)
        V = logits.shape[-1]
        # Drawn for the whole canvas, then cut to `cols`: a row's draws do not depend on the rows beside it.
        noise = gumbel_noise((B, N, V), [s + step for s in seeds], logits.device)[:, cols] \
            if opts.temperature > 0 and seeds is not None else None
        logits = _guard_logits(logits, canvas, field, cols, mask_id, opts, clean_vocab, repeats)
        picked, picked_conf = score(logits, opts.confidence, opts.temperature, noise)  # (B, C)
        tokens = canvas.index_copy(1, cols, picked)  # (B, N); outside `cols` nothing is committed
        conf = torch.full((B, N), float("-inf"), device=canvas.device).index_copy(1, cols, picked_conf.float())
        conf = _guard_confidence(conf, tokens, candidates, field, end_id, opts, repeats)
        steps_left = 1 if last else ends_t[block] - step  # (B, 1)
        if frontier_on:
            commit = _commit_mask(conf, candidates & ~in_reply, steps_left, opts) | \
                _frontier_commit(conf, frontier, final, opts.threshold)
        else:
            commit = _commit_mask(conf, candidates, steps_left, opts)
        if opts.no_repeat:  # equal neighbours still committed together: every second one takes its next choice
            # Eight choices: a word has up to seven spellings in SmolLM2's vocabulary, and all may rank first.
            top = torch.full((B, N, min(REPAIR_CHOICES, V)), mask_id, device=canvas.device)
            top = top.index_copy(1, cols, logits.topk(min(REPAIR_CHOICES, V), dim=-1).indices)
            tokens = _split_repeats(tokens, canvas, commit, top, field, mask_id, repeats)
        canvas = torch.where(commit, tokens, canvas)
        if opts.fill_after_end:
            masked = canvas == mask_id
            canvas = torch.where(_fill_after_end(canvas, masked, fields, end_id), end_id, canvas)
        if on_step is not None:
            on_step(step, canvas)
        if last:
            break
        # The threshold schedule may finish early; the check costs a host sync.
        if opts.schedule == "threshold" and not (canvas == mask_id).any():
            break
    return canvas
