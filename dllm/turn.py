"""The voice turn: one prompt, one canvas, two answers.

The prompt (a causal prefix) holds a short instruction, an optional knowledge
card, the recent history and the raw transcript. The canvas that follows is

    Cleaned: [mask x C] Reply: [mask x R]

with the field labels fixed and each field padded with the chat end token.
One K-step denoising pass fills both fields. C comes from a few buckets
chosen by the transcript's length, R is fixed, so canvas shapes stay few and
static (and requests of one bucket batch together). A cleanup-only canvas
drops the reply field.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .chat import ChatFormat
from .errors import RequestError
from .tokenizer import Tokenizer

# Short on purpose: the prompt is paid for on every training example and every
# turn, and the trained model knows the task from the canvas layout.
INSTRUCTION = "You are a voice assistant. Clean up the user's transcript, then reply in one to three short sentences."
CLEANUP_INSTRUCTION = "Clean up the user's transcript."
KNOWLEDGE_RULE = "Answer from these facts, or say you don't know.\nFacts: "
CLEAN_LABEL = "Cleaned:"
REPLY_LABEL = "\nReply:"

# Steps of 8 up to 64: a canvas sized to the utterance, few shapes for batching.
CLEAN_BUCKETS = (16, 24, 32, 40, 48, 56, 64, 80, 96, 128)
MAX_TRANSCRIPT_CHARS = 2000


@dataclass(frozen=True)
class Turn:
    """One user turn. `history` holds earlier (user, assistant) pairs, oldest first."""

    transcript: str
    history: tuple[tuple[str, str], ...] = ()
    knowledge: str | None = None


@dataclass(frozen=True)
class TurnResult:
    raw: str
    cleaned: str
    reply: str
    steps: int
    canvas: int  # canvas length in tokens
    ms: float  # wall time of the model work, queueing excluded


@dataclass(frozen=True)
class TurnLayout:
    """Token sizes of the turn format; the defaults suit a spoken reply."""

    reply_tokens: int = 32  # the longest trained reply is about 21 tokens
    history_tokens: int = 192  # older turns are dropped past this budget
    knowledge_tokens: int = 384
    clean_buckets: tuple[int, ...] = CLEAN_BUCKETS


@dataclass
class Encoded:
    """A turn as token ids, ready for the engine."""

    prompt: list[int]
    canvas: list[int]  # mask ids in the fields
    field: list[int]  # per canvas position: -1 fixed, 0 cleaned, 1 reply
    with_reply: bool
    raw: str = ""
    meta: dict = field(default_factory=dict)
    # The prompt's first `head` tokens: all but the user's new words (the start token, the system message with
    # its instruction and card, and the history). Turns of one conversation, or of one kiosk, share them; the
    # engine keeps their keys and values between turns.
    head: int = 0

    @property
    def shape_key(self) -> tuple[int, bool]:
        return len(self.canvas), self.with_reply


def clean_bucket(n_tokens: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that fits a cleaned version of `n_tokens` raw tokens."""
    need = n_tokens + 4  # room for added punctuation and capitals
    for b in buckets:
        if need <= b:
            return b
    raise RequestError(f"transcript too long: {n_tokens} tokens, at most {buckets[-1] - 4} are accepted")


def encode_turn(turn: Turn, tok: Tokenizer, chat: ChatFormat, *, mask_id: int,
                layout: TurnLayout = TurnLayout(), with_reply: bool = True) -> Encoded:
    """Build the prompt and canvas for `turn`. Raises `RequestError` on bad input."""
    raw = " ".join(turn.transcript.split())
    if not raw:
        raise RequestError("empty transcript: nothing to clean or answer")
    if len(raw) > MAX_TRANSCRIPT_CHARS:
        raise RequestError(f"transcript too long: {len(raw)} characters, at most {MAX_TRANSCRIPT_CHARS}")
    raw_ids = tok.encode(raw)
    c = clean_bucket(len(raw_ids), layout.clean_buckets)

    system = INSTRUCTION if with_reply else CLEANUP_INSTRUCTION
    if with_reply and turn.knowledge and turn.knowledge.strip():
        card = tok.encode(" ".join(turn.knowledge.split()))[: layout.knowledge_tokens]
        system += "\n" + KNOWLEDGE_RULE + tok.decode(card)
    head = chat.bos + chat.message("system", system)
    history = ""
    if with_reply:
        budget = layout.history_tokens
        for user, assistant in reversed(turn.history):
            piece = chat.message("user", user) + chat.message("assistant", assistant)
            cost = len(tok.encode(piece))
            if cost > budget:
                break
            history = piece + history
            budget -= cost
    head += history
    prompt = tok.encode(head + chat.message("user", raw) + chat.assistant_open)
    head_ids = tok.encode(head)
    head_len = len(head_ids) if prompt[:len(head_ids)] == head_ids else 0  # a token merged across the seam: no head

    end = tok.end_id
    label_c, label_r = tok.encode(CLEAN_LABEL), tok.encode(REPLY_LABEL)
    canvas = label_c + [mask_id] * c
    fields = [-1] * len(label_c) + [0] * c
    if with_reply:
        canvas += label_r + [mask_id] * layout.reply_tokens
        fields += [-1] * len(label_r) + [1] * layout.reply_tokens
    canvas.append(end)  # a fixed end closes the canvas, so both fields end cleanly
    fields.append(-1)
    return Encoded(prompt=prompt, canvas=canvas, field=fields, with_reply=with_reply, raw=raw, head=head_len)


PUNCTUATION = (".", ",", "?", "!", "'", ":", "-", "'s")


def clean_vocabulary(raw: str, tok: Tokenizer) -> list[int]:
    """The tokens a cleaned version of `raw` may use: its own words in lower,
    capitalised and (short ones) upper case, punctuation, digits and the end
    tokens. Cleaning drops and fixes words; it never brings in new ones, so a
    decoder held to this set cannot swap "Saturday" for "Sunday"."""
    ids = {tok.end_id, tok.eos_id}
    for w in set(raw.split()):
        for v in {w, w.capitalize(), w.upper() if len(w) <= 4 else w}:
            ids.update(tok.encode(" " + v))
            ids.update(tok.encode(v))
    for text in PUNCTUATION + tuple(" " + str(d) for d in range(10)):
        ids.update(tok.encode(text))
    return sorted(ids)


def decode_field(ids: list[int], fields: list[int], which: int, tok: Tokenizer, mask_id: int) -> str:
    """The text of one canvas field: its tokens up to the first end token."""
    out = []
    for t, f in zip(ids, fields):
        if f != which:
            continue
        if t == tok.end_id or t == tok.eos_id:
            break
        if t != mask_id:
            out.append(t)
    return tok.decode(out).strip()


SENTENCE_END = re.compile(r"[.!?]+[\"')]*(?=\s|$)")


def whole_sentences(reply: str) -> str:
    """`reply` without a trailing fragment that never ends ("Sorry, I don't know. information"
    -> "Sorry, I don't know."). A reply with no sentence end at all is kept as it is: nothing
    whole would be left."""
    ends = [m.end() for m in SENTENCE_END.finditer(reply)]
    return reply[:ends[-1]] if ends and reply[ends[-1]:].strip() else reply


def training_canvas(enc: Encoded, cleaned: str, reply: str | None, tok: Tokenizer) -> torch.Tensor:
    """The canvas with its fields written out: the target a trained model should produce.

    Raises `RequestError` when a target does not fit its field (the caller
    skips that example).
    """
    target = list(enc.canvas)
    texts = {0: cleaned, 1: reply or ""}
    for which, text in texts.items():
        positions = [i for i, f in enumerate(enc.field) if f == which]
        if not positions:
            continue
        ids = tok.encode(" " + text.strip()) if text.strip() else []
        if len(ids) > len(positions):
            raise RequestError(f"field {which} target has {len(ids)} tokens, the canvas holds {len(positions)}")
        ids = ids + [tok.end_id] * (len(positions) - len(ids))
        for p, t in zip(positions, ids):
            target[p] = t
    return torch.tensor(target)
