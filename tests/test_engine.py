"""The sampler, the prefix cache, batching and the async engine."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny_engine

from dllm import EngineBusy, RequestError, SamplerOptions, Turn
from dllm.sampler import Repeats
from dllm.turn import TurnLayout, decode_field, training_canvas

QUESTIONS = ["um where is the the library", "what time does the pool close on sunday",
             "hi", "so i need a ticket to boston no sorry to baltimore"]
SHORT = ["hi", "hello", "where is it"]  # one canvas bucket, three prompt lengths


def test_forward_passes_equal_steps_whatever_the_canvas(tiny_engine):
    """K model calls per canvas, for canvases of very different lengths."""
    for n_words, steps in [(1, 4), (8, 8), (22, 8), (22, 16)]:
        enc = tiny_engine.encode(Turn(" ".join(["word"] * n_words)))
        before = tiny_engine.forward_calls
        out = tiny_engine.generate([enc], SamplerOptions(steps=steps))
        assert tiny_engine.forward_calls - before == steps
        assert tiny_engine.cfg.mask_id not in out[0], "every mask is committed by step K"


def test_forward_passes_real_model(base_engine):
    """The packaged model makes at most K calls (none once every position is filled) and leaves no mask."""
    enc = base_engine.encode(Turn(QUESTIONS[0]))
    before = base_engine.forward_calls
    out = base_engine.generate([enc], SamplerOptions(steps=4))
    assert 1 <= base_engine.forward_calls - before <= 4
    assert base_engine.cfg.mask_id not in out[0]


def test_prefix_cache_is_exact(tiny_engine):
    """With the prefix structure, cached and uncached runs give the same canvas."""
    encs = [tiny_engine.encode(Turn(q)) for q in QUESTIONS[:2]]
    for e in encs:
        assert tiny_engine.generate([e], cache="exact") == tiny_engine.generate([e], cache="none")


def test_head_cache_is_exact_and_reused():
    """A prompt's head (instruction, card and history) runs once and is reused by later turns; rows with
    different heads and transcripts batch together and fill their canvases as they would alone, uncached."""
    eng = make_tiny_engine()
    card = "Open 9 to 5. Closed Mondays."
    turns = [Turn("hi"), Turn("hello", knowledge=card), Turn("where is it", history=(("hi", "hello"),)),
             Turn("hello", knowledge="Tickets cost 4 pounds.")]
    encs = [eng.encode(t) for t in turns]
    assert len({e.shape_key for e in encs}) == 1 and all(e.head > 0 for e in encs)
    assert encs[0].head < encs[1].head and encs[0].head < encs[2].head, "the instruction, a card, the history"
    alone = [eng.generate([e], cache="none")[0] for e in encs]
    assert eng.head_hits == 0
    assert eng.generate(encs + encs[:1], cache="exact") == alone + alone[:1]
    # Rows 0 and 4 share a head, computed once; row 4 reads more of its prompt from row 2's head, which
    # begins with the same tokens ("user: hi", then the assistant's opening).
    assert eng.head_hits + eng.word_hits == 1
    assert eng.generate(encs[1:2], cache="exact") == alone[1:2] and eng.head_hits + eng.word_hits == 2
    assert make_tiny_engine(head_cache_tokens=0).generate(encs, cache="exact") == alone


CONVERSATION = [Turn("hi"), Turn("where is it", history=(("hi", "Hello."),)),
                Turn("thanks", history=(("hi", "Hello."), ("where is it", "Upstairs.")))]


def _layer_calls(eng) -> list[int]:
    """The positions each model call runs, appended as the engine calls its model."""
    ran: list[int] = []
    eng.model.layers[0].register_forward_hook(lambda m, i, o: ran.append(i[0].shape[1]))
    return ran


def test_a_conversation_head_runs_only_the_turn_added_since():
    """A head not in the cache is computed from the longest cached head it begins with: the same
    conversation a turn ago, so only the turn added since runs. The canvas is filled as without the cache."""
    eng, uncached = make_tiny_engine(), make_tiny_engine(head_cache_tokens=0)
    ran = _layer_calls(eng)
    encs = [eng.encode(t) for t in CONVERSATION]
    assert encs[0].head < encs[1].head < encs[2].head
    for before, enc in zip([None] + encs, encs):
        ran.clear()
        assert eng.generate([enc]) == uncached.generate([enc])
        assert ran[:2] == [enc.head - (before.head if before else 0), len(enc.prompt) - enc.head], ran


async def test_prefill_readies_the_next_turns_head():
    """`prefill` computes a turn's head ahead of its words; the turn then runs only the words."""
    eng = make_tiny_engine()
    ran = _layer_calls(eng)
    assert await eng.prefill(CONVERSATION[2])
    enc = eng.encode(CONVERSATION[2])
    ran.clear()
    assert eng.generate([enc]) == make_tiny_engine(head_cache_tokens=0).generate([enc])
    assert eng.head_hits == 1 and ran[0] == len(enc.prompt) - enc.head
    assert not await make_tiny_engine(head_cache_tokens=0).prefill(CONVERSATION[2]), "no cache, no prefill"
    await eng.close()


async def test_prefill_of_the_first_words_spares_them_in_the_turn():
    """`prefill(words=True)` with a partial transcript computes the prompt through those words; the turn,
    whose words begin the same way, runs only the rest of its prompt and fills its canvas as without it."""
    eng = make_tiny_engine()
    history = CONVERSATION[2].history
    assert await eng.prefill(Turn("what time does the", history=history), words=True)
    enc = eng.encode(Turn("what time does the pool close", history=history))
    ran = _layer_calls(eng)
    assert eng.generate([enc]) == make_tiny_engine(head_cache_tokens=0).generate([enc])
    said = len(eng.encode(Turn("what time does the", history=history)).prompt) - len(
        eng.tok.encode(eng.chat.close + eng.chat.assistant_open))
    assert eng.word_hits == 1 and ran[0] == len(enc.prompt) - said, (ran, said)
    assert await eng.prefill(Turn("what time does the pool", history=history), words=True)
    assert len(eng._heads) == 1, "a later partial of the same words takes the earlier one's place"
    other = eng.encode(Turn("where is it", history=history))
    cached = eng.encode(Turn("what time does the pool close", history=history)).prompt
    shared = next(i for i, (a, b) in enumerate(zip(other.prompt, cached)) if a != b)  # the head, "user:", "wh"
    ran.clear()
    assert eng.generate([other]) == make_tiny_engine(head_cache_tokens=0).generate([other])
    assert ran[0] == len(other.prompt) - shared > len(other.prompt) - said, "other words: what they share"
    await eng.close()


def test_prefill_gives_way_and_keeps_the_part_done():
    """Asked to stop, a prefill ends after its first `HEAD_CHUNK` tokens and keeps them; a turn begins there."""
    from dllm.engine import HEAD_CHUNK
    eng = make_tiny_engine()
    enc = eng.encode(CONVERSATION[2])
    head = tuple(enc.prompt[:enc.head])
    assert len(head) > HEAD_CHUNK
    assert eng._head_kv(head, should_stop=lambda: True) is None
    assert list(eng._heads) == [head[:HEAD_CHUNK]]
    ran = _layer_calls(eng)
    assert eng.generate([enc]) == make_tiny_engine(head_cache_tokens=0).generate([enc])
    assert ran[0] == len(head) - HEAD_CHUNK


def test_head_cache_is_bounded():
    """The cache keeps at most `head_cache_tokens` tokens of heads, dropping the least recently used."""
    eng = make_tiny_engine(head_cache_tokens=300)
    cards = [f"Card {i}: open {i} to 5, rooms {i}0 to {i}9." for i in range(6)]
    for card in cards + cards[-1:]:
        eng.generate([eng.encode(Turn("hi", knowledge=card))], SamplerOptions(steps=2))
        assert 0 < sum(len(h) for h in eng._heads) <= 300
    assert eng.head_hits == 1 and len(eng._heads) < len(cards)
    with pytest.raises(RequestError, match="head_cache_tokens"):
        make_tiny_engine(head_cache_tokens=-1)


def test_exact_cache_refused_for_bidirectional_model():
    with pytest.raises(RequestError, match="prefix"):
        make_tiny_engine(attention="bidirectional", cache="exact")


def test_approximate_cache_for_bidirectional_model():
    """Fast-dLLM's cache: K calls, the prompt refreshed once a block, every mask filled."""
    eng = make_tiny_engine(attention="bidirectional", shift=False)
    assert eng.cache_mode == "approx"
    enc = eng.encode(Turn(QUESTIONS[1]))
    out = eng.generate([enc], SamplerOptions(steps=8, blocks=2))
    assert eng.forward_calls == 8 and eng.cfg.mask_id not in out[0]
    # With one step per block the approximate cache is never stale: it equals no cache.
    one = SamplerOptions(steps=4, blocks=4)
    assert eng.generate([enc], one, cache="approx") == eng.generate([enc], one, cache="none")


def _predictors(eng, enc, modes: tuple[str, ...]) -> dict:
    """The engine's per-step function for one encoded turn, in each cache mode (the first step opens a block)."""
    with torch.inference_mode():
        prompt_kv, valid = eng._prompt_cache([enc])
    P, N = valid.shape[1], len(enc.canvas)
    key_valid = torch.cat([valid, torch.ones(1, N, dtype=torch.bool)], dim=1)
    c_pos = valid.sum(-1, keepdim=True) + torch.arange(N)
    return {mode: eng._predictor(None, valid, None, c_pos, key_valid, mode, {0}, prompt_kv=prompt_kv,
                                 in_reply=torch.tensor(enc.field) == 1) for mode in modes}


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("span", [(0, 9), (5, 17), (12, 30)])
def test_window_cache_reads_the_right_rows(shift, span):
    """The window cache runs only the block's span of the canvas. On a canvas unchanged since the block
    began, its logits equal the exact cache's: the span's rows, their shift and the cached rest line up."""
    eng = make_tiny_engine(shift=shift)
    enc = eng.encode(Turn(QUESTIONS[1]))
    predict = _predictors(eng, enc, ("exact", "window"))
    canvas = torch.tensor([enc.canvas])
    cols = torch.arange(*span)
    canvas[0, cols[::3]] = 65  # some of the span committed already
    for step, c in [(0, cols), (1, cols[1:-2]), (2, cols[::2])]:
        torch.testing.assert_close(predict["window"](canvas, step, c), predict["exact"](canvas, step, c))


@pytest.mark.parametrize("ahead", [0, 8])
@pytest.mark.parametrize("shift", [True, False])
def test_rolling_cache_runs_the_span_and_keeps_the_rest(shift, ahead):
    """The rolling cache: a step that asks only for reply positions runs only those it reads, those changed
    since they last ran and `ahead` after them. With every kept position current its logits equal the exact
    cache's; a step asking for a position outside the reply, or a span past three quarters of the canvas, runs
    the whole canvas."""
    eng = make_tiny_engine(shift=shift, rolling_lookahead=ahead)
    enc = eng.encode(Turn(QUESTIONS[1]))
    predict = _predictors(eng, enc, ("exact", "rolling"))
    canvas, N = torch.tensor([enc.canvas]), len(enc.canvas)
    in_reply = torch.tensor(enc.field) == 1
    calls = []
    eng.model.layers[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))

    def rolling(step: int, cols: torch.Tensor) -> int:
        """Checks the rolling cache's logits against the exact cache's; returns the canvas positions it ran."""
        calls.clear()
        got = predict["rolling"](canvas, step, cols)
        ran = calls[-1]
        torch.testing.assert_close(got, predict["exact"](canvas, step, cols))
        return ran

    reply = in_reply.nonzero().flatten()
    r0 = int(reply[0])
    assert rolling(0, torch.arange(N)) == N
    assert rolling(1, reply[3:7]) == 4 + ahead
    assert rolling(2, reply[[0, 2]]) == 3 + ahead
    assert rolling(3, torch.tensor([r0 - 3, r0])) == N, "a cleaned position asked for: the whole canvas"
    canvas[0, [r0, r0 + 2]] = 65  # committed: those positions run again, with the ones read
    calls.clear()
    predict["rolling"](canvas, 4, reply[8:10])
    assert calls[-1] == (r0 + 9 if shift else r0 + 10) - r0 + ahead, calls
    assert rolling(5, torch.arange(N)) == N


@pytest.mark.parametrize("cache", ["window", "rolling"])
@pytest.mark.parametrize("frontier", [0, 3])
def test_span_caches_fill_every_position(cache, frontier):
    """At most K calls and no mask left, each call running its own span."""
    eng = make_tiny_engine()
    for q in QUESTIONS:
        before = eng.forward_calls
        out = eng.generate([eng.encode(Turn(q))], SamplerOptions(steps=8, reply_frontier=frontier), cache=cache)
        assert eng.forward_calls - before <= 8 and eng.cfg.mask_id not in out[0]


def test_batched_equals_alone(tiny_engine):
    """Prompts of different lengths, padded into one batch, decode as they do alone."""
    encs = [tiny_engine.encode(Turn(q)) for q in SHORT]
    assert len({e.shape_key for e in encs}) == 1 and len({len(e.prompt) for e in encs}) == 3
    alone = [tiny_engine.generate([e])[0] for e in encs]
    assert tiny_engine.generate(encs) == alone


def test_batched_equals_alone_with_temperature(tiny_engine):
    """Seeded Gumbel sampling is per request: the same tokens batched or alone, run after run."""
    opts = SamplerOptions(steps=4, temperature=1.0)
    encs = [tiny_engine.encode(Turn(q)) for q in SHORT[:2]]
    alone = [tiny_engine.generate([e], opts)[0] for e in encs]
    assert tiny_engine.generate(encs, opts) == alone
    assert tiny_engine.generate(encs, opts) == alone
    assert alone[0] != tiny_engine.generate([encs[0]], SamplerOptions(steps=4))[0]


@pytest.mark.parametrize("lead, calls", [(0, 1), (12, 2)])
def test_threshold_schedule_finishes_within_k(tiny_engine, lead, calls):
    """With no guard demoting anything, a threshold of 0 commits a whole block per step; a block
    finished early hands its steps to the next (the lead's two blocks: two calls)."""
    enc = tiny_engine.encode(Turn(QUESTIONS[3]))
    before = tiny_engine.forward_calls
    opts = SamplerOptions(steps=8, schedule="threshold", threshold=0.0, lead_tokens=lead, reply_frontier=0, no_repeat=False,
                          no_adjacent=0, end_confidence=0)
    out = tiny_engine.generate([enc], opts)
    assert tiny_engine.forward_calls - before == calls
    assert tiny_engine.cfg.mask_id not in out[0]


def test_semi_autoregressive_blocks_fill_left_to_right(tiny_engine):
    """With two blocks, the first half of the steps touches only the first half of the fields."""
    enc = tiny_engine.encode(Turn(QUESTIONS[0]))
    seen = []
    mask_id = tiny_engine.cfg.mask_id
    predict_orig = tiny_engine._predictor

    def spy(*a, **k):
        inner = predict_orig(*a, **k)

        def predict(canvas, step, cols):
            seen.append((canvas == mask_id)[0].clone())
            return inner(canvas, step, cols)
        return predict
    tiny_engine._predictor = spy
    tiny_engine.generate([enc], SamplerOptions(steps=4, blocks=2, fill_after_end=False))
    editable = torch.tensor(enc.canvas) == mask_id
    idx = editable.nonzero().flatten()
    second_half = idx[len(idx) // 2:]
    assert seen[2][second_half].all(), "block 2 is untouched after block 1's steps"
    assert not seen[2][idx[: len(idx) // 2]].any(), "block 1 is complete before block 2 starts"


def test_fill_after_end_pads_the_field(tiny_engine):
    """Once a field commits its end token, everything after it in that field is end tokens."""
    from dllm.sampler import denoise
    mask, end = 9, 7
    canvas = torch.tensor([[1, mask, mask, mask, mask, 2, mask, mask]])
    field = torch.tensor([-1, 0, 0, 0, 0, -1, 1, 1])

    def predict(c, step, cols):  # position 2 is an end token, very confidently; the rest token 5, weakly
        logits = torch.zeros(1, 8, 10)
        logits[0, :, 5] = 1.0
        logits[0, 2, end] = 50.0
        return logits[:, cols]
    out = denoise(predict, canvas, mask, field, end, SamplerOptions(steps=4, no_repeat=False, no_adjacent=0))
    assert out[0, 2:5].tolist() == [end, end, end]
    assert out[0, 6:].tolist() == [5, 5]


def _flat_predict(prefer: dict[int, float], V: int = 12):
    """A stand-in model: every position prefers the same tokens, with these logits."""
    def predict(c, step, cols):
        logits = torch.zeros(c.shape[0], c.shape[1], V)
        for t, v in prefer.items():
            logits[..., t] = v
        return logits[:, cols]
    return predict


def test_copy_clean_keeps_the_cleaned_field_to_its_vocabulary():
    """With copy_clean, field 0 only takes allowed tokens, however strongly the model wants others."""
    from dllm.sampler import denoise
    mask, end = 11, 7
    canvas = torch.tensor([[1] + [mask] * 6 + [2] + [mask] * 3])
    field = torch.tensor([-1] + [0] * 6 + [-1] + [1] * 3)
    vocab = torch.zeros(1, 12, dtype=torch.bool)
    vocab[0, [3, 4, end]] = True
    predict = _flat_predict({5: 9.0, 3: 2.0, 4: 1.0})
    out = denoise(predict, canvas, mask, field, end, SamplerOptions(steps=3, no_repeat=False), clean_vocab=vocab)
    assert set(out[0, 1:7].tolist()) <= {3, 4, end}
    assert out[0, 8:].tolist() == [5, 5, 5], "the reply field is not held to the cleaned field's vocabulary"
    free = denoise(predict, canvas, mask, field, end, SamplerOptions(steps=3, no_repeat=False, copy_clean=False),
                   clean_vocab=vocab)
    assert free[0, 1:7].tolist() == [5] * 6


def test_copy_clean_penalty_lowers_outside_tokens_instead_of_forbidding_them():
    """A penalty smaller than the model's margin lets a sure outside token through; a larger one does not."""
    from dllm.sampler import denoise
    mask, end = 11, 7
    canvas = torch.tensor([[1] + [mask] * 4 + [2]])
    field = torch.tensor([-1] + [0] * 4 + [-1])
    vocab = torch.zeros(1, 12, dtype=torch.bool)
    vocab[0, [3, end]] = True
    predict = _flat_predict({5: 9.0, 3: 6.0})  # the model prefers 5 (outside) by 3
    for penalty, want in [(2.0, 5), (4.0, 3)]:
        opts = SamplerOptions(steps=2, no_repeat=False, copy_clean_penalty=penalty)
        out = denoise(predict, canvas, mask, field, end, opts, clean_vocab=vocab)
        assert out[0, 1:5].tolist() == [want] * 4, (penalty, out)
    with pytest.raises(RequestError):
        SamplerOptions(copy_clean_penalty=-1.0)


@pytest.mark.parametrize("steps", [1, 2, 6])
def test_no_repeat_never_writes_a_token_twice_side_by_side(steps):
    """With no_repeat, neighbours differ, whether committed in one step or across steps; digits may repeat."""
    from dllm.sampler import denoise
    mask, end = 11, 7
    canvas = torch.tensor([[1] + [mask] * 6 + [end]])
    field = torch.tensor([-1] + [0] * 6 + [-1])
    predict = _flat_predict({5: 9.0, 6: 8.0, 4: 7.0})
    out = denoise(predict, canvas, mask, field, end, SamplerOptions(steps=steps, end_confidence=0))[0, 1:7].tolist()
    assert all(a != b for a, b in zip(out, out[1:])), out
    repeat_ok = torch.zeros(12, dtype=torch.bool)
    repeat_ok[5] = True  # a digit, say
    out = denoise(predict, canvas, mask, field, end, SamplerOptions(steps=steps), repeats=Repeats(repeat_ok))
    assert out[0, 1:7].tolist() == [5] * 6


@pytest.mark.parametrize("steps", [1, 2, 6])
def test_no_repeat_counts_two_spellings_of_a_word_as_a_repeat(steps):
    """With `spellings`, tokens 4 and 6 spell one word ("The", " the"): they never stand side by side,
    whether committed in one step or across steps."""
    from dllm.sampler import denoise
    mask, end = 11, 7
    canvas = torch.tensor([[1] + [mask] * 6 + [end]])
    field = torch.tensor([-1] + [0] * 6 + [-1])
    predict = _flat_predict({4: 9.0, 6: 8.5, 5: 7.0, 3: 6.0})
    opts = SamplerOptions(steps=steps, end_confidence=0)
    out = denoise(predict, canvas, mask, field, end, opts)[0, 1:7].tolist()
    assert (4, 6) in zip(out, out[1:]) or (6, 4) in zip(out, out[1:]), out  # without spellings they are two words
    spellings = torch.arange(12)[:, None].repeat(1, 2)
    spellings[4] = spellings[6] = torch.tensor([4, 6])
    repeats = Repeats(torch.zeros(12, dtype=torch.bool), spellings=spellings)
    out = denoise(predict, canvas, mask, field, end, opts, repeats=repeats)[0, 1:7].tolist()
    word = [4 if t in (4, 6) else t for t in out]
    assert all(a != b for a, b in zip(word, word[1:])), out


@pytest.mark.parametrize("steps", [1, 2, 6])
def test_number_words_may_repeat_in_the_cleaned_field_only(steps):
    """`Repeats.ok_cleaned` (a number word the speaker said twice: "four four nine") spares a token in the
    cleaned field, not in the reply, where "ten ten dollars" is broken."""
    from dllm.sampler import denoise
    mask, end = 11, 7
    canvas = torch.tensor([[1] + [mask] * 4 + [2] + [mask] * 4 + [end]])
    field = torch.tensor([-1] + [0] * 4 + [-1] + [1] * 4 + [-1])
    ok_cleaned = torch.zeros(1, 12, dtype=torch.bool)
    ok_cleaned[0, 5] = True  # " four", which the speaker said twice in a row
    repeats = Repeats(torch.zeros(12, dtype=torch.bool), ok_cleaned=ok_cleaned)
    opts = SamplerOptions(steps=steps, end_confidence=0, lead_tokens=0, reply_frontier=0)
    out = denoise(_flat_predict({5: 9.0, 6: 8.0, 4: 7.0}), canvas, mask, field, end, opts, repeats=repeats)[0]
    assert out[1:5].tolist() == [5] * 4
    reply = out[6:10].tolist()
    assert all(a != b for a, b in zip(reply, reply[1:])), reply


def test_the_packaged_tokenizer_spellings_and_repeatable_words(base_engine):
    """The engine's no_repeat data for SmolLM2: "The" and " the" are one word; digits may repeat, number words
    in the cleaned field where the speaker said them twice in a row ("four four nine"), other words nowhere."""
    repeats = base_engine._repeats(["the code is four four nine", "ninety eight minutes"])
    tok = base_engine.tok
    ids = lambda text: tok.encode(text)[-1]  # noqa: E731
    the = set(repeats.spellings[ids(" the")].tolist())
    assert {ids("The"), ids(" The"), ids("the")} <= the
    assert repeats.ok[ids("7")] and repeats.ok[tok.end_id]
    for text in (" four", " Four"):
        assert repeats.ok_cleaned[0, ids(text)] and not repeats.ok[ids(text)], text
    assert not repeats.ok_cleaned[0, ids(" nine")] and not repeats.ok_cleaned[1, ids(" eight")], "said once"
    for text in (" the", " need", " sorry"):
        assert not repeats.ok[ids(text)] and not repeats.ok_cleaned[:, ids(text)].any(), text


def test_unsure_end_tokens_are_committed_last():
    """With end_confidence, an end token the model is unsure of does not take a step's quota first."""
    from dllm.sampler import denoise
    mask, end = 11, 7
    canvas = torch.tensor([[1] + [mask] * 4])
    field = torch.tensor([-1] + [0] * 4)

    def predict(c, step, cols):  # position 1 leans to an end token (p ~ 0.6); the others to words, less surely
        logits = torch.zeros(1, 5, 12)
        logits[0, 1, end] = 3.0
        logits[0, 2:, 3] = torch.tensor([2.0, 2.5, 2.2])
        logits[0, 2:, 4] = 1.5
        return logits[:, cols]
    seen = []
    opts = SamplerOptions(steps=4, no_repeat=False, fill_after_end=False, end_confidence=0)
    denoise(predict, canvas, mask, field, end, opts, on_step=lambda s, c: seen.append(c[0].tolist()))
    assert seen[0][1] == end, "without the guard the end token goes first"
    seen.clear()
    denoise(predict, canvas, mask, field, end, SamplerOptions(steps=4, no_repeat=False, fill_after_end=False,
                                                              end_confidence=0.9),
            on_step=lambda s, c: seen.append(c[0].tolist()))
    assert seen[0][1] == mask and seen[-1][1] == end


def test_no_adjacent_keeps_unsure_neighbours_apart():
    """With no_adjacent, two unsure side-by-side positions never commit in one step; a sure one may."""
    from dllm.sampler import denoise
    mask, end = 11, 7
    canvas = torch.tensor([[1] + [mask] * 6])
    field = torch.tensor([-1] + [0] * 6)

    def predict(c, step, cols):  # every position unsure (p ~ 0.5), position 3 sure of itself
        logits = torch.zeros(1, 7, 12)
        logits[0, :, 3] = torch.tensor([0.0, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5])
        logits[0, 3, 4] = 12.0
        return logits[:, cols]
    opts = SamplerOptions(steps=3, no_repeat=False, fill_after_end=False, end_confidence=0)

    def unsure_pairs(guard: float) -> int:
        seen = []
        out = denoise(predict, canvas, mask, field, end, replace(opts, no_adjacent=guard),
                      on_step=lambda s, c: seen.append(c[0].tolist()))
        assert mask not in out[0].tolist(), "every position is still filled in K steps"
        pairs, before = 0, [mask] * 7
        for after in seen[:-1]:  # the last step must commit whatever is left
            new = [i for i in range(1, 7) if before[i] == mask and after[i] != mask]
            pairs += sum(b == a + 1 and 3 not in (a, b) for a, b in zip(new, new[1:]))
            before = after
        return pairs
    assert unsure_pairs(0.9) == 0
    assert unsure_pairs(0.0) > 0, "without the guard, unsure neighbours go together"


def test_whole_sentences_drops_a_trailing_fragment():
    """A reply that trails off after a finished sentence ends there; one with no sentence end is kept."""
    from dllm.turn import whole_sentences
    assert whole_sentences("Sorry, I don't know. information") == "Sorry, I don't know."
    assert whole_sentences("Hi! How can I") == "Hi!"
    assert whole_sentences("It is 3.5 dollars.") == "It is 3.5 dollars."
    assert whole_sentences("no end at all") == "no end at all"
    assert whole_sentences("") == ""


def test_turn_format_round_trip(tiny_engine):
    """A target canvas written from strings decodes back to the same strings."""
    tok = tiny_engine.tok
    enc = tiny_engine.encode(Turn("um where is the the library", knowledge="The library is on Elm Street."))
    target = training_canvas(enc, "Where is the library?", "It is on Elm Street.", tok)
    mask_id = tiny_engine.cfg.mask_id
    assert decode_field(target.tolist(), enc.field, 0, tok, mask_id) == "Where is the library?"
    assert decode_field(target.tolist(), enc.field, 1, tok, mask_id) == "It is on Elm Street."
    assert "Elm Street" in tok.decode(enc.prompt)


def test_canvas_buckets_and_history_budget(tiny_engine):
    short = tiny_engine.encode(Turn("hi"))
    long = tiny_engine.encode(Turn("word " * 20))
    assert len(long.canvas) > len(short.canvas)
    history = tuple((f"question {i} " * 5, f"answer {i} " * 5) for i in range(50))
    enc = tiny_engine.encode(Turn("hi", history=history))
    assert len(enc.prompt) < 400, "old turns are dropped past the history budget"
    assert "answer 49" in tiny_engine.tok.decode(enc.prompt), "the newest turns are kept"


def test_bad_requests_raise_clear_errors(tiny_engine):
    with pytest.raises(RequestError, match="empty"):
        tiny_engine.encode(Turn("   "))
    with pytest.raises(RequestError, match="too long"):
        tiny_engine.encode(Turn("x" * 5000))
    with pytest.raises(RequestError, match="steps"):
        SamplerOptions(steps=0)
    with pytest.raises(RequestError, match="divide"):
        SamplerOptions(steps=8, blocks=3)


async def test_concurrent_requests_run_as_one_batch():
    """Four requests of one bucket, submitted together, cost K calls, not 4K."""
    eng = make_tiny_engine(batch_window_ms=20)
    try:
        results = await asyncio.gather(*(eng.respond(Turn(q)) for q in SHORT), eng.respond(Turn("hello")))
        assert eng.forward_calls == eng.options.sampler.steps
        alone = eng.respond_sync(Turn(SHORT[0]))
        assert results[0].cleaned == alone.cleaned and results[0].reply == alone.reply
    finally:
        await eng.close()


async def test_cancelled_request_leaves_its_batch():
    eng = make_tiny_engine(batch_window_ms=50)
    try:
        tasks = [asyncio.create_task(eng.respond(Turn(q))) for q in SHORT]
        await asyncio.sleep(0.005)
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[1], asyncio.CancelledError)
        assert all(not isinstance(d, BaseException) for d in (done[0], done[2]))
        assert eng.forward_calls == eng.options.sampler.steps
    finally:
        await eng.close()


class _HeldSteps:
    """Holds the engine's model thread at the LM head until released: a batch that is surely running."""

    def __init__(self, eng) -> None:
        import threading
        self.running, self.release = threading.Event(), threading.Event()
        self._hook = eng.model.lm_head.register_forward_pre_hook(self._hold)

    def _hold(self, module, args) -> None:
        self.running.set()
        assert self.release.wait(30), "the test never released the batch"

    async def wait_running(self) -> None:
        assert await asyncio.to_thread(self.running.wait, 30), "the batch never started"

    def done(self) -> None:
        self._hook.remove()
        self.release.set()


async def test_request_cancelled_while_its_batch_runs_leaves_it():
    """Cancelling a request mid-batch ends its wait at once; the batch's other requests get their
    results, unchanged; a batch whose every request is cancelled stops before its K steps."""
    eng = make_tiny_engine(batch_window_ms=20)
    steps = eng.options.sampler.steps
    alone = [eng.respond_sync(Turn(q)) for q in SHORT]
    held = _HeldSteps(eng)
    try:
        tasks = [asyncio.create_task(eng.respond(Turn(q))) for q in SHORT]
        await held.wait_running()
        tasks[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        assert not tasks[0].done() and not tasks[2].done(), "the batch is still held"
        held.release.set()
        kept = await asyncio.gather(tasks[0], tasks[2])
        assert [(r.cleaned, r.reply) for r in kept] == [(r.cleaned, r.reply) for r in (alone[0], alone[2])]

        held.release.clear()
        held.running.clear()
        before = eng.forward_calls
        lone = asyncio.create_task(eng.respond(Turn(SHORT[0])))
        await held.wait_running()
        lone.cancel()
        held.done()
        await eng.respond(Turn(SHORT[1]))  # runs once the abandoned batch has stopped
        abandoned = eng.forward_calls - before - steps
        assert abandoned < steps, abandoned
    finally:
        held.done()
        await eng.close()


async def test_queue_is_bounded():
    eng = make_tiny_engine(max_queue=2, batch_window_ms=200)
    try:
        first = [asyncio.create_task(eng.respond(Turn(q))) for q in QUESTIONS[:2]]
        await asyncio.sleep(0)
        with pytest.raises(EngineBusy, match="max_queue"):
            await eng.respond(Turn("one too many"))
        await asyncio.gather(*first)
    finally:
        await eng.close()


async def test_cleanup_has_no_reply_field(tiny_engine):
    res = await tiny_engine.cleanup("um hello there")
    full = tiny_engine.encode(Turn("um hello there"))
    assert res.reply == "" and res.canvas < len(full.canvas)
    await tiny_engine.close()


def test_steps_override_and_layout(tiny_engine):
    res = tiny_engine.respond_sync(Turn("hello"), steps=2)
    assert res.steps == 2
    eng = make_tiny_engine(layout=replace(TurnLayout(), reply_tokens=8))
    assert len(eng.encode(Turn("hello")).canvas) < len(tiny_engine.encode(Turn("hello")).canvas)


def test_kernel_confidence_agrees_with_sampler_scores():
    """The path used on CUDA (kernels.confidence, here its reference) ranks as the sampler does."""
    from dllm.sampler import CONFIDENCE_KINDS, gumbel_noise, score
    logits = torch.randn(2, 6, 300) * 3
    noise = gumbel_noise((2, 6, 300), [1, 2], torch.device("cpu"))
    for kind in CONFIDENCE_KINDS:
        for temperature, n in [(0.0, None), (0.7, noise)]:
            tok_a, conf_a = score(logits, kind, temperature, n, fused=False)
            tok_b, conf_b = score(logits, kind, temperature, n, fused=True)
            assert torch.equal(tok_a, tok_b)
            torch.testing.assert_close(conf_a, conf_b, rtol=1e-4, atol=1e-5)


async def _batches_until(eng, flood: list[asyncio.Task], witness: asyncio.Task) -> int:
    """How many batches had run when `witness` finished (the engine's batch counter)."""
    await witness
    n = eng._batches
    await asyncio.gather(*flood)
    return n


async def test_queue_is_round_robin_across_clients():
    """One client's 8 queued requests do not make another client's request wait behind all of them."""
    eng = make_tiny_engine(max_batch=2, batch_window_ms=20)
    try:
        flood = [asyncio.create_task(eng.cleanup("um so i i think we should go", client="flood")) for _ in range(8)]
        await asyncio.sleep(0)
        other = asyncio.create_task(eng.cleanup("um so i i think we should go", client="other"))
        assert await _batches_until(eng, flood, other) == 1  # FIFO would run it in the fifth batch
    finally:
        await eng.close()


async def test_interactive_turns_go_ahead_of_bulk_cleanup():
    """A voice turn queued behind a cleanup flood runs next, and a full bulk queue does not refuse it."""
    from dllm.engine import PRIORITY_INTERACTIVE
    eng = make_tiny_engine(max_batch=2, max_queue=6, batch_window_ms=20)
    try:
        flood = [asyncio.create_task(eng.cleanup(q, client="flood")) for q in QUESTIONS[:3] * 2]
        await asyncio.sleep(0)
        with pytest.raises(EngineBusy):  # the queue is full for bulk work
            await eng.cleanup("one too many", client="flood")
        turn = asyncio.create_task(eng.respond(Turn("hello"), client="voice", priority=PRIORITY_INTERACTIVE))
        assert await _batches_until(eng, flood, turn) == 1
    finally:
        await eng.close()


async def test_bulk_batches_are_capped():
    """With max_bulk_batch 2, queued cleanups run two at a time; an interactive batch may be as large as max_batch."""
    from dllm.engine import PRIORITY_INTERACTIVE
    eng = make_tiny_engine(max_batch=8, max_bulk_batch=2, batch_window_ms=20)
    rows: list[int] = []
    eng.on_batch = lambda n, calls, ms: rows.append(n)
    try:
        await asyncio.gather(*(eng.cleanup("um so i i think we should go", client=i) for i in range(6)))
        assert rows == [2, 2, 2]
        await asyncio.gather(*(eng.respond(Turn("hi"), priority=PRIORITY_INTERACTIVE) for _ in range(4)))
        assert rows[-1] == 4
    finally:
        await eng.close()


def _scripted_predict(target: torch.Tensor, V: int, seed: int):
    """A stand-in model that always wants `target` (N,), with confidences drawn at random per position."""
    g = torch.Generator().manual_seed(seed)
    strength = 2.0 + 6.0 * torch.rand(target.shape[0], generator=g)

    def predict(c, step, cols):
        logits = torch.zeros(c.shape[0], c.shape[1], V)
        logits[0, torch.arange(target.shape[0]), target] = strength
        return logits[:, cols]
    return predict


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("frontier", [0, 4])
def test_settled_reply_only_grows_and_is_a_prefix_of_the_result(seed, frontier):
    """Whatever order the pass commits in, what `settled_reply` says at each step is whole sentences that the
    final reply starts with; with the lead on (and the reply paced with it) it is there by the end of the
    lead's steps."""
    from dllm.canvas import settled_reply
    from dllm.sampler import denoise
    tok = make_tiny_engine().tok
    mask, end = tok.mask_id, tok.end_id
    reply = tok.encode(" Hi there. The pool opens at 9.30 am. Bye")
    label = tok.encode("Cleaned: hi\nReply:")
    canvas = torch.tensor([label + [mask] * (len(reply) + 3)])
    field = torch.tensor([-1] * len(label) + [1] * (len(reply) + 3))
    target = torch.tensor(label + reply + [end] * 3)
    for lead in (0, len(tok.encode(" Hi there. The"))):
        opts = SamplerOptions(steps=6, lead_tokens=lead, lead_steps=3 if lead else None, reply_frontier=frontier,
                              no_repeat=False, no_adjacent=0, end_confidence=0)
        seen = []
        out = denoise(_scripted_predict(target, tok.vocab_size, seed), canvas, mask, field, end, opts,
                      on_step=lambda s, c: seen.append(settled_reply(c[0].tolist(), field.tolist(), tok, mask)))
        final = decode_field(out[0].tolist(), field.tolist(), 1, tok, mask)
        assert final == "Hi there. The pool opens at 9.30 am. Bye"
        assert all(a == "" or b.startswith(a) for a, b in zip(seen, seen[1:])), seen
        assert all(s in ("", "Hi there.", "Hi there. The pool opens at 9.30 am.") for s in seen), seen
        assert seen[-1] == "Hi there. The pool opens at 9.30 am.", "the trailing fragment is not whole"
        if lead and not frontier:
            assert seen[2] != "", "with the lead, the first sentence is settled after the lead's steps"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sure", [False, True])
def test_reply_frontier_writes_the_reply_from_its_left_edge(seed, sure):
    """With `reply_frontier` W, each step but the last commits reply positions only among the first W still
    open: the one the model is surest of, and all W when it is sure of them; the last step fills the rest."""
    from dllm.sampler import denoise
    tok = make_tiny_engine().tok
    mask, end = tok.mask_id, tok.end_id
    reply = tok.encode(" Hi there. The pool opens at 9.30 am.")
    canvas = torch.tensor([[mask] * (len(reply) + 3)])
    field = torch.ones(canvas.shape[1], dtype=torch.long)
    target = torch.tensor(reply + [end] * 3)
    predict = _scripted_predict(target, tok.vocab_size, seed)
    if sure:  # confidence above the threshold everywhere
        predict = (lambda p: lambda c, step, cols: p(c, step, cols) * 10)(predict)
    opts = SamplerOptions(steps=8, lead_tokens=0, reply_frontier=3, no_repeat=False, no_adjacent=0, end_confidence=0)
    seen = [canvas[0].tolist()]
    out = denoise(predict, canvas, mask, field, end, opts, on_step=lambda s, c: seen.append(c[0].tolist()))
    assert decode_field(out[0].tolist(), field.tolist(), 1, tok, mask) == "Hi there. The pool opens at 9.30 am."
    for before, after in zip(seen[:-2], seen[1:-1]):
        open_ = [i for i, t in enumerate(before) if t == mask]
        new = [i for i in open_ if after[i] != mask]
        assert new == open_[:3] if sure else (len(new) == 1 and new[0] in open_[:3]), (new, open_[:3])


def test_settled_reply_waits_for_the_token_after_a_full_stop():
    """"at 9." before a mask may still go on as "9.30": not settled until the next token is known."""
    from dllm.canvas import settled_reply
    tok = make_tiny_engine().tok
    mask = tok.mask_id
    head = tok.encode(" It opens at 9.")
    ids = head + [mask, mask]
    fields = [1] * len(ids)
    assert settled_reply(ids, fields, tok, mask) == ""
    assert settled_reply(head + tok.encode("3") + [mask], fields, tok, mask) == ""
    assert settled_reply(head + tok.encode(" Bye") + [mask], fields[:len(head) + 5], tok, mask) == "It opens at 9."
    assert settled_reply(head + [tok.end_id, tok.end_id], fields, tok, mask) == "It opens at 9."


def test_settled_reply_may_end_at_a_short_opening_clause():
    """With `clause_words`, "I'm sorry," is settled once its comma is committed, while its sentence is still
    open; a longer opening, or a comma that may lie inside a number, is not."""
    from dllm.canvas import LEAD_CLAUSE_WORDS, canvas_step, settled_reply
    from dllm.turn import Encoded
    tok = make_tiny_engine().tok
    mask = tok.mask_id

    def settled(text: str, words: int = LEAD_CLAUSE_WORDS) -> str:
        ids = tok.encode(text) + [mask, mask]
        return settled_reply(ids, [1] * len(ids), tok, mask, clause_words=words)
    assert settled(" I'm sorry, I") == "I'm sorry,"
    assert settled(" I'm sorry, I", words=0) == "", "sentences only, as before"
    assert settled(" I'm sorry,") == "I'm sorry,", "nothing that follows a comma after a word can join it"
    assert settled(" It costs 1,000") == ""
    assert settled(" It costs 1,") == "", "a digit may follow the comma"
    assert settled(" I'm sorry") == ""
    assert settled(" The library on the hill opens, then") == "", "five words before the comma"
    assert settled(" Sure. Okay, then") == "Sure.", "a whole sentence comes first"
    ids = tok.encode(" Sorry, I can") + [mask]
    snap = canvas_step(ids, Encoded(prompt=[], canvas=ids, field=[1] * len(ids), with_reply=True), 2, 8, tok, mask)
    assert snap.settled == "Sorry,", "the anytime canvas speaks the opening clause"


def test_the_settled_clause_and_the_lead_clause_cut_alike():
    """The canvas settles the opening clause that piper speaks as a piece of its own."""
    import inspect

    from dllm.canvas import LEAD_CLAUSE_WORDS
    from tts import lead_clause
    assert inspect.signature(lead_clause).parameters["max_words"].default == LEAD_CLAUSE_WORDS


def test_lead_commits_the_cleaned_field_and_the_reply_start_first(tiny_engine):
    """With the lead, the first lead_steps steps fill the cleaned field and the reply's first tokens only."""
    enc = tiny_engine.encode(Turn(QUESTIONS[0]))
    mask_id = tiny_engine.cfg.mask_id
    seen = []
    opts = SamplerOptions(steps=8, lead_tokens=10, reply_frontier=0, fill_after_end=False)
    tiny_engine.generate([enc], opts, on_step=lambda s, c: seen.append(c[0].tolist()))
    field = torch.tensor(enc.field)
    reply = (field == 1).nonzero().flatten()
    after6 = torch.tensor(seen[5]) == mask_id
    assert not after6[field == 0].any() and not after6[reply[:10]].any(), "the lead is done after 6 of 8 steps"
    assert after6[reply[10:]].all(), "the rest of the reply waits for the last quarter"
    assert mask_id not in seen[-1]


def test_lead_options_are_checked():
    with pytest.raises(RequestError, match="lead_steps"):
        SamplerOptions(steps=8, lead_tokens=8, lead_steps=8)
    with pytest.raises(RequestError, match="reply_frontier"):
        SamplerOptions(reply_frontier=-1)
    from dllm.sampler import pass_spans, uses_lead
    turn = torch.tensor([-1] + [0] * 8 + [-1] + [1] * 32)  # a voice turn's fields
    assert pass_spans(SamplerOptions(steps=8, lead_tokens=8), turn) == [4, 4], "the frontier paces the reply"
    assert pass_spans(SamplerOptions(steps=8, lead_tokens=8, reply_frontier=0), turn) == [6, 2]
    assert pass_spans(SamplerOptions(steps=4, lead_tokens=8, reply_frontier=0), turn) == [3, 1]
    assert pass_spans(SamplerOptions(steps=8, lead_tokens=8, lead_steps=5), turn) == [5, 3]
    assert pass_spans(SamplerOptions(steps=8, lead_tokens=8, blocks=4), turn) == [2, 2, 2, 2], "blocks replace the lead"
    assert not uses_lead(SamplerOptions(steps=8, lead_tokens=8, blocks=2), turn)
    assert pass_spans(SamplerOptions(steps=1, lead_tokens=8), turn) == [1]
    assert pass_spans(SamplerOptions(steps=8, lead_tokens=32), turn) == [8], "a reply no longer than the lead"
    assert pass_spans(SamplerOptions(steps=8, lead_tokens=8), turn[:10]) == [8], "a cleanup canvas has no lead"
