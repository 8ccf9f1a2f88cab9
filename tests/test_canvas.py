"""The anytime canvas on the tiny model: one canvas per step, the last equal to
the result, and a deadline that ends the pass early with whole fields."""
from __future__ import annotations

import asyncio
import time

from conftest import make_tiny_engine

from dllm import Turn
from dllm.canvas import MASK_TEXT


async def test_one_canvas_per_step_the_last_equal_to_the_result():
    """K steps give K canvases, masks fewer each step, and the last is the final reply and cleaned text."""
    engine = make_tiny_engine()
    seen = []
    try:
        result = await engine.respond(Turn("um what time is it"), steps=8, on_canvas=seen.append)
    finally:
        await engine.close()
    assert [c.step for c in seen] == list(range(1, 9)) and all(c.steps == 8 for c in seen)
    masked = [c.masked for c in seen]
    assert masked == sorted(masked, reverse=True) and masked[0] > 0 and masked[-1] == 0
    assert MASK_TEXT in seen[0].cleaned + seen[0].reply
    assert (seen[-1].cleaned, seen[-1].reply) == (result.cleaned, result.reply)


async def test_a_deadline_shorter_than_the_pass_still_fills_every_field():
    """With a deadline already past, the pass ends after one step and no mask is left in either field."""
    engine = make_tiny_engine()
    seen = []
    try:
        before = engine.forward_calls
        result = await engine.respond(Turn("um what time is it"), steps=16, on_canvas=seen.append,
                                      deadline=time.monotonic())
        calls = engine.forward_calls - before
        full = await engine.respond(Turn("um what time is it"), steps=16)
    finally:
        await engine.close()
    assert calls == 1 and len(seen) == 1 and seen[0].masked == 0
    assert MASK_TEXT not in result.cleaned + result.reply
    assert (seen[-1].cleaned, seen[-1].reply) == (result.cleaned, result.reply)
    assert full.steps == 16


async def test_a_deadline_part_way_ends_the_pass_between_steps():
    """A deadline of a few steps' time stops a long pass early; the result has whole fields."""
    engine = make_tiny_engine()
    seen = []
    try:
        t0 = time.perf_counter()
        await engine.respond(Turn("warm up"), steps=4)
        step_s = (time.perf_counter() - t0) / 4
        result = await engine.respond(Turn("um what time is it"), steps=64, on_canvas=seen.append,
                                      deadline=time.monotonic() + 6 * step_s)
    finally:
        await engine.close()
    assert 1 <= len(seen) < 64 and seen[-1].masked == 0
    assert MASK_TEXT not in result.cleaned + result.reply


async def test_a_seed_per_request_repeats_and_differs():
    """temperature > 0 with a seed: the same seed gives the same reply, batched or alone."""
    engine = make_tiny_engine()
    try:
        a, b, c = await asyncio.gather(*(engine.respond(Turn("say something"), temperature=1.0, seed=s)
                                         for s in (1, 1, 2)))
        alone = await engine.respond(Turn("say something"), temperature=1.0, seed=1)
    finally:
        await engine.close()
    assert a.reply == b.reply == alone.reply
    assert (a.cleaned, a.reply) != (c.cleaned, c.reply)
