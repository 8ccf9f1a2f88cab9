"""Frames: the small dataclasses that move between a session's stages.

Following Pipecat's design: data frames carry audio, transcripts and replies
downstream; two control frames steer the pipeline. `Interrupt` makes every
stage drop what it has queued and cancel what it runs (barge-in, the stop
button, a new typed turn); `End` closes the pipeline after everything before
it has been processed. Both get through any full queue.

The stages never reach into the session: what they tell it (a client event,
a turn confirmed or finished, an error) goes as one of the frozen records at
the end of this module, through the `Notify` callable each stage is given.

A `TurnRecord` travels with a turn's frames. It holds the turn's clock
readings and the sentences of the reply as they were sent, which is what
the `Conversation` keeps as history: only what the user actually heard.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

__all__ = [
    "Frame", "Interrupt", "End", "AudioIn", "EndOfInput", "TextIn", "StopRequest", "Utterance",
    "PartialRequest", "FinalRequest", "TranscriptReady", "ReplyReady", "SpeechChunk", "ReplyEnd", "EndpointHint",
    "TurnRecord", "Conversation", "Say", "SayForTurn", "SayForTurnNow", "TurnConfirmed", "TurnFinished",
    "AudioFlushed", "StageFailed", "SessionEvent", "Notify",
]


def now() -> float:
    """The session clock: monotonic seconds."""
    return time.monotonic()


@dataclass(eq=False)
class TurnRecord:
    """One turn's life: when it started, what the stages took, what was heard.

    `started` is the end of the user's speech (voice turns) or the arrival of
    the text (typed turns). Reply sentences are recorded with the time their
    audio was sent and its length, so that the audible part can be worked out
    after a barge-in: the client plays sentences back to back from the first
    audio on, so a sentence was (at least partly) heard if it was sent and its
    estimated playback had begun before the interruption.
    """

    turn_id: int
    typed: bool
    started: float
    user: str = ""
    cleaned: str = ""
    reply: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    sentences: list[tuple[str, float, float]] = field(default_factory=list)  # (text, play_start, seconds)
    first_audio: float | None = None
    interrupted_at: float | None = None
    interrupt_reason: str | None = None
    finished_at: float | None = None  # turn.done sent (or the turn failed)
    said: str = ""  # the reply text handed to speech so far, a prefix of the reply
    said_sentences: int = 0
    speech_started: float | None = None  # when the first sentence went to speech
    # Begun at a pause, before the endpoint: the stages work on it, but nothing of it reaches the client
    # (`held` keeps its events, the output stage waits on `confirmed`) until the endpoint confirms it.
    # If the speaker goes on instead, it is dropped without a trace.
    tentative: bool = False
    held: list[str | bytes] = field(default_factory=list)
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if not self.tentative:
            self.confirmed.set()

    def add_sentence(self, text: str, seconds: float, at: float) -> None:
        if self.first_audio is None:
            self.first_audio = at
        start = max(at, self.playback_end())
        self.sentences.append((text, start, seconds))

    def playback_end(self) -> float:
        """Estimated time the client finishes playing what was sent."""
        if not self.sentences:
            return self.first_audio or 0.0
        text, start, seconds = self.sentences[-1]
        return start + seconds

    def interrupt(self, reason: str, at: float) -> None:
        if self.interrupted_at is None:
            self.interrupted_at, self.interrupt_reason = at, reason

    def finish(self, at: float) -> None:
        if self.finished_at is None:
            self.finished_at = at

    def over(self, at: float) -> bool:
        """Nothing more of this turn will be computed or heard."""
        if self.interrupted_at is not None:
            return True
        return self.finished_at is not None and at >= self.playback_end()

    def heard(self) -> str:
        """The reply as the user heard it: all of it, or the sentences begun before an interruption."""
        if self.interrupted_at is None:
            return " ".join(s for s, _, _ in self.sentences) if self.sentences else self.reply
        return " ".join(s for s, start, _ in self.sentences if start <= self.interrupted_at)


class Conversation:
    """The turns of one session, newest last, at most `max_turns` kept."""

    def __init__(self, max_turns: int = 8) -> None:
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        self._turns: deque[TurnRecord] = deque(maxlen=max_turns + 1)  # + the one in progress
        self._next_id = 1

    def begin(self, *, typed: bool, started: float, user: str = "", tentative: bool = False) -> TurnRecord:
        record = TurnRecord(self._next_id, typed, started, user=user, tentative=tentative)
        self._next_id += 1
        self._turns.append(record)
        return record

    def discard(self, record: TurnRecord) -> None:
        """Forget a tentative turn the speaker talked over (it never was a turn)."""
        if record in self._turns:
            self._turns.remove(record)
            if record.turn_id == self._next_id - 1:  # the client never saw its number: reuse it
                self._next_id -= 1

    @property
    def current(self) -> TurnRecord | None:
        return self._turns[-1] if self._turns else None

    def active(self, at: float) -> TurnRecord | None:
        """The newest turn if it is still being computed or played."""
        cur = self.current
        return cur if cur is not None and not cur.over(at) else None

    def history(self, before: TurnRecord | None = None) -> tuple[tuple[str, str], ...]:
        """(user, heard reply) pairs of the turns before `before`, oldest first.

        Turns with no user text (nothing transcribed) are left out.
        """
        out = []
        for t in self._turns:
            if t is before:
                break
            if t.user and (t.finished_at is not None or t.interrupted_at is not None):
                out.append((t.user, t.heard()))
        return tuple(out[-(self._turns.maxlen - 1):])


# ----- control frames

@dataclass(eq=False)
class Frame:
    """Base of everything that moves between stages."""

    # Goes into an inbox without waiting for room, like the control frames. Only for frames that are
    # bounded by construction (one per tentative turn) and that flow against the stream, where waiting
    # for room could close a cycle of full inboxes.
    unbounded: ClassVar[bool] = False


@dataclass(eq=False)
class Interrupt(Frame):
    """Drop queued work and cancel running work; `turn` is the turn cut short."""

    reason: str  # "speech" (barge-in), "client" (stop button), "text" (a new typed turn), "resumed" (a tentative turn)
    turn: TurnRecord | None = None


@dataclass(eq=False)
class End(Frame):
    """No more input: finish what is queued, then stop."""


# ----- input side (client to the input stage)

@dataclass(eq=False)
class AudioIn(Frame):
    pcm: bytes  # 16-bit LE mono at the session's input rate


@dataclass(eq=False)
class EndOfInput(Frame):
    """The client forced an endpoint (input.end)."""


@dataclass(eq=False)
class TextIn(Frame):
    text: str


@dataclass(eq=False)
class StopRequest(Frame):
    """The client asked to stop the reply (interrupt)."""


# ----- between stages

@dataclass(eq=False)
class Utterance:
    """The utterance being spoken; the input stage marks it ended at the endpoint."""

    number: int
    ended: bool = False
    partial_pending: bool = False
    last_partial_samples: int = 0


@dataclass(eq=False)
class PartialRequest(Frame):
    utterance: Utterance
    audio: np.ndarray = field(repr=False)  # int16, 16 kHz, the utterance so far


@dataclass(eq=False)
class FinalRequest(Frame):
    turn: TurnRecord
    audio: np.ndarray = field(repr=False)  # int16, 16 kHz, the whole utterance


@dataclass(eq=False)
class EndpointHint(Frame):
    """From the transcript of a tentative turn, to the input stage: does it read as finished?
    None: no words to judge by (nothing heard, or recognition failed)."""

    unbounded: ClassVar[bool] = True
    turn: TurnRecord
    finished: bool | None


@dataclass(eq=False)
class TranscriptReady(Frame):
    turn: TurnRecord
    text: str


@dataclass(eq=False)
class ReplySettled(Frame):
    """The reply's leading sentences, final before the dLLM pass ends: they can be spoken already."""

    turn: TurnRecord
    text: str


@dataclass(eq=False)
class ReplyReady(Frame):
    turn: TurnRecord
    reply: str


@dataclass(eq=False)
class SpeechChunk(Frame):
    """One sentence of the reply (or the opening clause of its first, `tts.lead_clause`), spoken: int16 mono at
    the session's output rate."""

    turn: TurnRecord
    index: int
    sentence: str
    pcm: np.ndarray = field(repr=False)


@dataclass(eq=False)
class ReplyEnd(Frame):
    turn: TurnRecord


# ----- stage to session (each stage's `notify`)

@dataclass(frozen=True)
class Say:
    """A client event (str) or reply audio (bytes): sent now, waiting while the outbox is full."""

    item: str | bytes


@dataclass(frozen=True)
class SayForTurn:
    """An event of a turn: sent now, or held until the endpoint if the turn is tentative."""

    turn: TurnRecord
    item: str | bytes


@dataclass(frozen=True)
class SayForTurnNow:
    """`SayForTurn` from a callback on the loop that cannot wait (the canvas): dropped if the outbox is full.
    Goes through the stage's sync `notify_nowait`, not `notify`."""

    turn: TurnRecord
    item: str | bytes


@dataclass(frozen=True)
class TurnConfirmed:
    """The endpoint confirmed a tentative turn: what it held goes out, its audio may follow."""

    turn: TurnRecord


@dataclass(frozen=True)
class TurnFinished:
    """Close the turn with `turn.done` (unless it was interrupted or is closed already)."""

    turn: TurnRecord


@dataclass(frozen=True)
class AudioFlushed:
    """Barge-in on a turn whose audio went out: drop the queued audio, tell the client to flush its playback."""

    turn: TurnRecord


@dataclass(frozen=True)
class StageFailed:
    """`process` raised on `frame`: reported to the client, and a turn it broke is closed."""

    error: BaseException
    frame: Frame


# `EndpointHint` is one too: the session passes it back to the input stage.
SessionEvent = Say | SayForTurn | TurnConfirmed | TurnFinished | AudioFlushed | StageFailed | EndpointHint
Notify = Callable[[SessionEvent], Awaitable[None]]
