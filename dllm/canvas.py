"""The anytime canvas: a readable snapshot of a canvas part way through denoising.

A masked diffusion LM holds a whole draft at every step: some positions
committed, the rest still masks. `canvas_step` renders one such canvas as
the two fields of the voice turn, each masked position shown as `MASK_TEXT`,
so a client can show the reply developing step by step. A field ends at its
first end token, as in `dllm.turn.decode_field`; once nothing is masked the
rendering equals the decoded result.
"""
from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import Tokenizer
from .turn import SENTENCE_END, Encoded, whole_sentences

__all__ = ["LEAD_CLAUSE_WORDS", "MASK_TEXT", "CanvasStep", "canvas_step", "render_field", "settled_reply", "unsaid"]

MASK_TEXT = "░"  # one per masked position (a token, not a character)
# A reply's opening clause ("I'm sorry,") of at most this many words may be spoken before its sentence is
# settled; the same cut as `tts.lead_clause`, which speaks it as a piece of its own.
LEAD_CLAUSE_WORDS = 4


@dataclass(frozen=True)
class CanvasStep:
    """One step's canvas: `step` steps of `steps` done, `masked` positions still open."""

    step: int
    steps: int
    cleaned: str
    reply: str
    masked: int
    settled: str = ""  # the reply's start that no later step can change (see settled_reply)


def render_field(ids: list[int], fields: list[int], which: int, tok: Tokenizer, mask_id: int) -> str:
    """The text of field `which`, masks shown as `MASK_TEXT`, up to its first end token."""
    parts: list[str] = []
    run: list[int] = []
    for t, f in zip(ids, fields):
        if f != which:
            continue
        if t == tok.end_id or t == tok.eos_id:
            break
        if t == mask_id:
            parts.append(tok.decode(run))
            parts.append(MASK_TEXT)
            run = []
        else:
            run.append(t)
    parts.append(tok.decode(run))
    return "".join(parts).strip()


def settled_reply(ids: list[int], fields: list[int], tok: Tokenizer, mask_id: int, *, clause_words: int = 0) -> str:
    """The reply's leading whole sentences that no later step can change ("" while there are none).

    The sampler never revisits a committed token, so a sentence is settled once
    every token up to its end is committed and so is the one after it ("nine."
    before a mask may still go on as "nine.30"), or the field has ended. What
    this returns is a prefix of the reply the pass will return, so it can be
    spoken before the pass ends. With `clause_words`, while no sentence is
    settled, a settled opening clause of at most that many words counts too
    ("I'm sorry," once the word after its comma is committed): it is what the
    first audio says (`tts.lead_clause`), and it is usually settled steps
    before its sentence.
    """
    run: list[int] = []
    for t, f in zip(ids, fields):
        if f != 1:
            continue
        if t == mask_id:
            text = tok.decode(run).strip()
            ends = [m.end() for m in SENTENCE_END.finditer(text) if m.end() < len(text)]
            return text[:ends[-1]] if ends else opening_clause(text, clause_words)
        if t == tok.end_id or t == tok.eos_id:
            break
        run.append(t)
    return whole_sentences(tok.decode(run).strip())


def opening_clause(text: str, max_words: int) -> str:
    """`text`'s opening clause with its comma, when at most `max_words` words come before it and the comma
    ends it: a word follows the comma, or the comma closes `text` right after a letter (what comes next can
    only begin a new word); else "". A comma inside a number ("1,000") does not end a clause."""
    if ", " not in text and text.endswith(",") and text[-2:-1].isalpha():
        head = text[:-1]
    else:
        head, sep, tail = text.partition(", ")
        if not sep or not tail.strip():
            return ""
    return head + "," if 0 < len(head.split()) <= max_words else ""


def unsaid(text: str, said: str) -> str:
    """What of `text` follows `said`, the settled prefix already handed on (spoken, streamed).
    `said` is a prefix by construction; were it not, all of `text` is new."""
    return text[len(said):] if text.startswith(said) else text


def canvas_step(ids: list[int], enc: Encoded, step: int, steps: int, tok: Tokenizer, mask_id: int) -> CanvasStep:
    """Render one request's canvas after `step` (0-based) of `steps`."""
    masked = sum(1 for t, f in zip(ids, enc.field) if f >= 0 and t == mask_id)
    reply = render_field(ids, enc.field, 1, tok, mask_id) if enc.with_reply else ""
    settled = settled_reply(ids, enc.field, tok, mask_id, clause_words=LEAD_CLAUSE_WORDS) if enc.with_reply else ""
    return CanvasStep(step=step + 1, steps=steps, cleaned=render_field(ids, enc.field, 0, tok, mask_id),
                      reply=reply, masked=masked, settled=settled)
