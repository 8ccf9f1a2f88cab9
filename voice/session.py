"""A voice session: five stages joined by bounded inboxes.

    client PCM ─▶ input (resample to 16 kHz, VAD, endpointing, barge-in)
               ─▶ asr (partials while speaking, the final at the endpoint)
               ─▶ turn (one dLLM pass: cleaned transcript and reply)
               ─▶ tts (piper, sentence by sentence)
               ─▶ output (audio.start, PCM frames, audio.end, turn.done) ─▶ outbox ─▶ client

Each stage is an asyncio task (`voice.pipeline.Stage`); the blocking model
calls (Whisper, piper) run in worker threads and the dLLM runs on the
engine's own thread, so the event loop only moves frames. The design follows
Pipecat's pipelines; the timing metric follows its "voice-to-voice" latency:
from the end of the user's speech to the first reply audio sent.

A stage never holds the session: it is built with what it reads (the config,
its model, the conversation, the output rate) and tells the session what
happened through its `notify`, as a small frozen record (`frames.Say`,
`SayForTurn`, `TurnConfirmed`, `TurnFinished`, `EndpointHint`,
`AudioFlushed`, `StageFailed`). `VoiceSession._on_event` acts on them in one
place. The dLLM's canvas callback cannot wait, so the turn stage also gets a
sync `notify_nowait` for `SayForTurnNow`.

Using the silence: at a short pause (`asr.VADOptions.pause_ms`, before the
hang-over that ends an utterance) the input stage starts a *tentative* turn on
the audio so far: Whisper, then the dLLM pass and piper, all while the
endpointer still listens. Nothing of it reaches the client until the endpoint
confirms it (`TurnRecord.tentative`; its events are held, its audio waits).
If the speaker goes on, the tentative turn is dropped through the barge-in
path without a trace. Its transcript also judges the end of the turn
(`asr.looks_finished`): a finished sentence ends the utterance once the
silence has lasted `finished_hangover_ms`, an unfinished one waits
`unfinished_hangover_ms` instead of the usual hang-over.

Computing the prompt ahead (`dllm.Engine.prefill`, where the engine has
it): when a turn is done the engine computes the next turn's prompt head,
the history with that turn in it, while the reply plays; each partial
transcript lets it compute the prompt through the words heard so far. The
turn's pass then runs only what is new. A prefill gives way to any request.

Barge-in: when the user starts speaking (or types, or presses stop) while a
turn is being computed or its reply is still playing, the input stage marks
the turn interrupted and sends an `Interrupt` down the pipeline. Each stage
drops what it queued and cancels what it runs (the dLLM request leaves its
batch); the output stage drops the audio still queued for the client and
tells the client to flush its playback (`audio.flush`, `turn.interrupted`).
The history keeps the reply only up to the sentences whose playback had
begun (`TurnRecord.heard`).

A session's transport is not its business: feed it protocol messages with
`feed`, read what to send from `next_event`/`events`. The server and the
kiosk are two such transports.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import numpy as np

from . import errors as E
from . import protocol as P
from .audio import StreamResampler, pcm_chunks
from .frames import (AudioFlushed, AudioIn, Conversation, End, EndOfInput, EndpointHint, FinalRequest, Frame,
                     Interrupt, Notify, PartialRequest, ReplyEnd, ReplyReady, ReplySettled, Say, SayForTurn,
                     SayForTurnNow, SessionEvent, SpeechChunk, StageFailed, StopRequest, TextIn, TranscriptReady,
                     TurnConfirmed, TurnFinished, TurnRecord, Utterance, now)
from .pipeline import Outbox, Stage, cancel_and_wait
from .services import Services

__all__ = ["SessionConfig", "VoiceSession", "ASR_RATE"]

log = logging.getLogger("voice.session")

ASR_RATE = 16000  # the VAD and Whisper both work at 16 kHz


DEFAULT_PAUSE_MS = 120  # silence after which a tentative turn starts (scripts/endpoint_sweep.py)


def _default_vad():
    from asr import VADOptions
    return VADOptions(sample_rate=ASR_RATE, frame_ms=30, pause_ms=DEFAULT_PAUSE_MS)


@dataclass(frozen=True)
class SessionConfig:
    """Per-session settings. Defaults suit a browser client.

    Attributes:
        input_sample_rate: rate of the PCM the client sends (resampled to 16 kHz).
        output_sample_rate: rate of the reply PCM; None keeps the voice's rate.
        knowledge: a facts card for the dLLM prompt (the kiosk's venue facts).
        steps: denoising steps K; None uses the server's default.
        canvas: send each denoising step's canvas (`turn.canvas` events).
        deadline_ms: end each dLLM pass within this long of its start (queueing
            included), the remaining positions filled in one last step; None: no limit.
        vad: endpointing (`asr.VADOptions`): hang-over, minimum speech,
            maximum utterance, pre-roll; None is its defaults at 16 kHz.
        partial_every_ms: audio between partial transcripts; 0 turns them off.
        min_partial_ms: speech needed before the first partial.
        barge_in: speech while a reply plays interrupts it. The kiosk turns
            this off when its mic hears its own speaker (no echo canceller).
        history_turns: turns kept for the prompt (the turn format also caps tokens).
        inbox_size: frames each stage may have queued.
        outbox_size: events and audio frames queued for the client.
        out_chunk_ms: reply audio per binary frame.
        asr_timeout_s, turn_timeout_s, tts_timeout_s: limits on one model call.
        speak_early: send the reply's first sentences (or its short opening
            clause) to speech as soon as the pass has settled them
            (`dllm.canvas.settled_reply`), before it ends.
        end_when_finished: when the tentative turn's transcript reads as a
            finished sentence (`asr.looks_finished`), end the utterance then,
            without waiting out the hang-over. Needs `vad.pause_ms` > 0.
        unfinished_hangover_ms: the silence that ends an utterance whose
            tentative transcript reads as unfinished (0: the usual hang-over).
        finished_hangover_ms: the least silence that ends an utterance whose
            tentative transcript reads as finished; if Whisper reads it sooner,
            the end waits for it (0: end when read). The reply is held until
            the endpoint, and the pass takes longer than this, so it costs no
            latency; it spares pauses inside a sentence that Whisper reads fast.
    """

    input_sample_rate: int = 16000
    output_sample_rate: int | None = None
    knowledge: str | None = None
    steps: int | None = None
    canvas: bool = False
    deadline_ms: int | None = None
    vad: object | None = None
    partial_every_ms: int = 700
    min_partial_ms: int = 500
    barge_in: bool = True
    history_turns: int = 8
    inbox_size: int = 32
    outbox_size: int = 128
    out_chunk_ms: int = 200
    asr_timeout_s: float = 60.0
    turn_timeout_s: float = 180.0
    tts_timeout_s: float = 60.0
    speak_early: bool = True
    end_when_finished: bool = True
    unfinished_hangover_ms: int = 1500
    finished_hangover_ms: int = 600

    def __post_init__(self) -> None:
        if self.input_sample_rate not in P.INPUT_SAMPLE_RATES:
            raise ValueError(f"input_sample_rate must be one of {P.INPUT_SAMPLE_RATES}, got {self.input_sample_rate}")
        if self.output_sample_rate is not None and self.output_sample_rate not in P.OUTPUT_SAMPLE_RATES:
            raise ValueError(f"output_sample_rate must be one of {P.OUTPUT_SAMPLE_RATES}")
        if self.partial_every_ms < 0 or self.out_chunk_ms < 10:
            raise ValueError("partial_every_ms must be >= 0 and out_chunk_ms >= 10")
        if self.unfinished_hangover_ms < 0 or self.finished_hangover_ms < 0:
            raise ValueError("unfinished_hangover_ms and finished_hangover_ms must be >= 0")

    @classmethod
    def from_start(cls, start: P.SessionStart, base: SessionConfig | None = None) -> SessionConfig:
        """The config a client's session.start asks for, on top of the server's `base`."""
        base = base or cls()
        return replace(base, input_sample_rate=start.sample_rate,
                       output_sample_rate=start.output_sample_rate or base.output_sample_rate,
                       knowledge=start.knowledge if start.knowledge is not None else base.knowledge,
                       steps=start.steps or base.steps, canvas=start.canvas or base.canvas,
                       deadline_ms=start.deadline_ms or base.deadline_ms)


async def _within(aw, seconds: float, failure: type[E.VoiceError], what: str):
    """Await `aw` for at most `seconds`; past that, the stage's model has failed (`failure`)."""
    try:
        return await asyncio.wait_for(aw, seconds)
    except asyncio.TimeoutError as e:
        raise failure(f"{what} took longer than {seconds:g} s") from e


def _ms(t0: float, t1: float | None = None) -> float:
    return ((now() if t1 is None else t1) - t0) * 1000.0


# ----- the stages

class _SessionStage(Stage):
    """A stage of a session: it tells the session what happened through `notify`, its errors included."""

    def __init__(self, inbox_size: int, notify: Notify) -> None:
        super().__init__(inbox_size, lambda exc, frame: notify(StageFailed(exc, frame)))
        self.notify = notify


class InputStage(_SessionStage):
    """Resampling, VAD and endpointing; the source of turns and of interrupts."""

    name = "input"
    interruptible = False  # interrupts start here

    def __init__(self, config: SessionConfig, conversation: Conversation, notify: Notify) -> None:
        super().__init__(config.inbox_size, notify)
        from asr import VAD

        self.config, self.conversation = config, conversation
        rate = config.input_sample_rate
        self.resampler = StreamResampler(rate, ASR_RATE) if rate != ASR_RATE else None
        self.vad = VAD(config.vad or _default_vad())
        self.samples = 0  # 16 kHz samples fed to the VAD
        self.utterance: Utterance | None = None
        self.tentative: TurnRecord | None = None  # begun at a pause of the open utterance
        self._end_at_silence_ms: int | None = None  # the tentative turn reads finished: end at this much silence
        self._utterances = 0
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=256)  # (stream ms at chunk end, arrival)

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, AudioIn):
            pcm = np.frombuffer(frame.pcm, dtype="<i2").astype(np.int16, copy=False)
            if self.resampler is not None:
                pcm = self.resampler.push(pcm)
            if len(pcm):
                await self._feed(pcm)
        elif isinstance(frame, EndOfInput):
            events = self.vad.flush()
            if not events:
                await self.notify(Say(P.error(P.ErrorCode.NO_SPEECH,
                                              "input.end arrived but no speech was detected since the last turn")))
            for ev in events:
                await self._on_vad(ev)
        elif isinstance(frame, TextIn):
            await self._barge_in("text")
            record = self.conversation.begin(typed=True, started=now(), user=frame.text)
            await self.push(TranscriptReady(record, frame.text))
        elif isinstance(frame, StopRequest):
            await self._barge_in("client")
        elif isinstance(frame, EndpointHint):
            await self._on_hint(frame)
        else:
            await self.push(frame)

    async def on_end(self) -> None:
        if self.resampler is not None:
            tail = self.resampler.flush()
            if len(tail):
                await self._feed(tail)
        for ev in self.vad.flush():
            await self._on_vad(ev)

    async def _feed(self, pcm: np.ndarray) -> None:
        events = self.vad.feed(pcm)
        self.samples += len(pcm)
        self._arrivals.append((self.samples * 1000 / ASR_RATE, now()))
        for ev in events:
            await self._on_vad(ev)
        if self._end_at_silence_ms is not None and self.vad.silence_ms >= self._end_at_silence_ms:
            await self._end_now()
        await self._maybe_partial()

    def _arrival(self, t_ms: float) -> float:
        """When the audio at stream time `t_ms` reached us (the end of speech, in wall time)."""
        for end_ms, at in self._arrivals:
            if end_ms >= t_ms:
                return at
        return now()

    async def _on_vad(self, ev) -> None:
        from asr import SpeechDiscarded, SpeechPaused, SpeechResumed, SpeechStarted, SpeechStopped

        if isinstance(ev, SpeechStarted):
            await self.notify(Say(P.speech_started(ev.t_ms)))
            await self._barge_in("speech")
            self._utterances += 1
            self.utterance = Utterance(self._utterances, last_partial_samples=self.samples)
        elif isinstance(ev, SpeechPaused):
            await self._begin_tentative(ev)
        elif isinstance(ev, SpeechResumed):
            await self._drop_tentative()
        elif isinstance(ev, SpeechStopped):
            if self.utterance is not None:
                self.utterance.ended = True
            self.utterance = None
            await self.notify(Say(P.speech_stopped(ev.t_ms)))
            if ev.reason == "max_length":  # cut in mid-speech: the words after the pause are the turn's too
                await self._drop_tentative()
            if self.tentative is not None:  # the pause was the end: the turn under way is the turn
                await self._confirm()
                return
            await self._barge_in("turn")
            speech_end = min(self._arrival(ev.t_ms), now())
            record = self.conversation.begin(typed=False, started=speech_end)
            record.timings["endpoint_ms"] = _ms(speech_end)
            record.timings["speech_ms"] = len(ev.audio) * 1000 / ASR_RATE
            await self.push(FinalRequest(record, ev.audio))
        elif isinstance(ev, SpeechDiscarded):
            if self.utterance is not None:
                self.utterance.ended = True
            self.utterance = None
            await self._drop_tentative()
            await self.notify(Say(P.speech_stopped(ev.t_ms, discarded=True)))

    async def _begin_tentative(self, ev) -> None:
        """Start the turn on the audio so far, while the endpointer still listens."""
        if self.tentative is not None or self.conversation.active(now()) is not None:
            return  # one at a time, and never over a reply still playing
        speech_end = min(self._arrival(ev.t_ms), now())
        record = self.conversation.begin(typed=False, started=speech_end, tentative=True)
        record.timings["pause_ms"] = record.timings["endpoint_ms"] = _ms(speech_end)
        record.timings["speech_ms"] = len(ev.audio) * 1000 / ASR_RATE
        self.tentative = record
        if self.utterance is not None:  # a partial now would only make the final wait for Whisper
            self.utterance.ended = True
        cfg = self.config
        if cfg.end_when_finished and cfg.unfinished_hangover_ms:
            # The words decide this pause, however long Whisper takes; the longer hang-over is the fallback.
            self.vad.set_pause_hangover(cfg.unfinished_hangover_ms)
        await self.push(FinalRequest(record, ev.audio))

    async def _drop_tentative(self) -> None:
        """The speaker went on (or typed): the tentative turn was not a turn. Its work stops; the client
        saw nothing."""
        record, self.tentative = self.tentative, None
        self._end_at_silence_ms = None
        if record is None:
            return
        if self.utterance is not None:  # partials again (one queued before the pause may have been dropped)
            self.utterance.ended = self.utterance.partial_pending = False
        running = record.finished_at is None  # an empty transcript or an error ended it already
        record.interrupt("resumed", now())
        self.conversation.discard(record)
        if running:  # no other turn runs beside a tentative one, so the interrupt stops only its work
            await self.push(Interrupt("resumed", record))

    async def _confirm(self) -> None:
        """The endpoint: the tentative turn becomes the turn, and what it held goes to the client."""
        record, self.tentative = self.tentative, None
        self._end_at_silence_ms = None
        record.timings["endpoint_ms"] = _ms(record.started)
        await self.notify(TurnConfirmed(record))

    async def _on_hint(self, hint: EndpointHint) -> None:
        """The tentative turn's transcript says whether the speaker sounds finished."""
        cfg = self.config
        if hint.turn is not self.tentative:
            return  # dropped or confirmed meanwhile
        if hint.finished is None:  # no words to judge by: the usual hang-over decides
            self.vad.set_pause_hangover(0)
        elif hint.finished and cfg.end_when_finished:
            if self.vad.silence_ms >= cfg.finished_hangover_ms:
                await self._end_now()
            else:  # read before the least silence has passed: _feed ends it then, unless speech comes first
                self._end_at_silence_ms = cfg.finished_hangover_ms
        elif not hint.finished and cfg.unfinished_hangover_ms:
            self.vad.set_pause_hangover(cfg.unfinished_hangover_ms)

    async def _end_now(self) -> None:
        self._end_at_silence_ms = None
        ev = self.vad.end_now()
        if ev is not None:
            await self._on_vad(ev)

    async def _maybe_partial(self) -> None:
        u, cfg = self.utterance, self.config
        if u is None or u.partial_pending or u.ended or cfg.partial_every_ms <= 0 or not self.vad.in_speech:
            return
        if self.vad.silence_ms:  # maybe the end: a partial started now would delay the final
            return
        if (self.samples - u.last_partial_samples) * 1000 < cfg.partial_every_ms * ASR_RATE:
            return
        audio = self.vad.current_audio()
        if len(audio) * 1000 < cfg.min_partial_ms * ASR_RATE:
            return
        u.partial_pending = True
        u.last_partial_samples = self.samples
        await self.push(PartialRequest(u, audio))

    async def _barge_in(self, reason: str) -> None:
        """Interrupt the turn in progress, if any. `reason`: speech, text, client, or
        turn (a new utterance ended while the old turn went on, with barge-in off)."""
        if reason == "speech" and not self.config.barge_in:
            return
        if reason == "text":  # a typed turn replaces what was being said
            await self._drop_tentative()
        record = self.conversation.active(now())
        if record is None or record.tentative:  # nothing of a tentative turn plays: nothing to stop
            return
        record.interrupt(reason, now())
        await self.push(Interrupt(reason, record))


class ASRStage(_SessionStage):
    """Whisper on the utterance so far (partials) and on the whole of it (final)."""

    name = "asr"

    def __init__(self, config: SessionConfig, transcriber, notify: Notify,
                 on_partial: Callable[[str], None] | None = None) -> None:
        super().__init__(config.inbox_size, notify)
        self.config, self.transcriber = config, transcriber
        self.on_partial = on_partial  # each partial transcript, as it comes (the session prefills its words)

    async def _transcribe(self, audio: np.ndarray) -> str:
        asr = self.transcriber
        if asr is None:
            raise E.NoRecognizer()
        return await _within(asyncio.to_thread(asr.transcribe, audio), self.config.asr_timeout_s,
                             E.RecognitionFailed, "speech recognition")

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, PartialRequest):
            u = frame.utterance
            try:
                if u.ended:  # the final is on its way; a partial now is only delay
                    return
                text = await self._transcribe(frame.audio)
                if text and not u.ended:
                    await self.notify(Say(P.transcript_partial(text)))
                    if self.on_partial is not None:
                        self.on_partial(text)
            finally:
                u.partial_pending = False
        elif isinstance(frame, FinalRequest):
            record, t0 = frame.turn, now()
            record.timings["asr_wait_ms"] = _ms(record.started + record.timings.get("endpoint_ms", 0) / 1000, t0)
            try:
                text = await self._transcribe(frame.audio)
            except Exception:
                if record.tentative:  # no words to judge the endpoint by
                    await self.notify(EndpointHint(record, None))
                raise
            record.timings["asr_ms"] = _ms(t0)
            record.user = text
            await self.notify(SayForTurn(record, P.transcript_final(record.turn_id, text)))
            if text:
                await self.push(TranscriptReady(record, text))
            if record.tentative:  # the words judge the endpoint
                from asr import looks_finished
                await self.notify(EndpointHint(record, looks_finished(text) if text else None))
            if not text:  # nothing intelligible: the turn ends here
                await self.notify(TurnFinished(record))
        else:
            await self.push(frame)


class TurnStage(_SessionStage):
    """The dLLM turn: one denoising pass writes the cleaned transcript and the reply."""

    name = "turn"

    def __init__(self, config: SessionConfig, engine, conversation: Conversation, notify: Notify,
                 notify_nowait: Callable[[SayForTurnNow], None], *, client: str, steps: int,
                 speak_early: bool) -> None:
        super().__init__(config.inbox_size, notify)
        from dllm import Turn  # here, not per turn: the first import of torch takes seconds
        from dllm.engine import PRIORITY_INTERACTIVE

        self.config, self.engine, self.conversation = config, engine, conversation
        self.notify_nowait = notify_nowait  # for the canvas callback, which must not wait
        self.client, self.steps = client, steps  # `client`: the engine's queue serves clients fairly
        self.speak_early = speak_early  # the config asks for it and there is a synthesizer
        self._Turn = Turn
        self._priority = PRIORITY_INTERACTIVE

    async def process(self, frame: Frame) -> None:
        if not isinstance(frame, TranscriptReady):
            await self.push(frame)
            return
        record, cfg, t0 = frame.turn, self.config, now()
        turn = self._Turn(frame.text, history=self.conversation.history(before=record), knowledge=cfg.knowledge)
        kw: dict = {"client": self.client, "priority": self._priority}
        settled: asyncio.Queue[str] = asyncio.Queue()  # the settled reply as it grows, at most one per step
        speak_early = self.speak_early
        queued = ""  # the longest settled reply put in `settled` so far

        def on_canvas(c) -> None:  # called on the loop by the engine, once per step
            nonlocal queued
            if record.interrupted_at is not None:
                return
            if cfg.canvas:
                self.notify_nowait(SayForTurnNow(record, P.turn_canvas(record.turn_id, step=c.step, steps=c.steps,
                                                                       cleaned=c.cleaned, reply=c.reply,
                                                                       masked=c.masked)))
            if speak_early and len(c.settled) > len(queued) and c.step < c.steps:
                queued = c.settled
                settled.put_nowait(c.settled)
        if cfg.canvas or speak_early:
            kw["on_canvas"] = on_canvas
        if cfg.deadline_ms:
            kw["deadline"] = time.monotonic() + cfg.deadline_ms / 1000
        # Cancelling the job (an interrupt cancels this task) withdraws the request from the engine's batch.
        job = asyncio.ensure_future(_within(self.engine.respond(turn, steps=self.steps, **kw),
                                            cfg.turn_timeout_s, E.TurnTimedOut, "the dLLM turn"))
        next_settled: asyncio.Future | None = None
        try:
            while not job.done():  # settled sentences go to speech while the pass goes on
                next_settled = asyncio.ensure_future(settled.get())
                await asyncio.wait({job, next_settled}, return_when=asyncio.FIRST_COMPLETED)
                if next_settled.done() and not job.done():
                    record.timings.setdefault("settled_ms", _ms(t0))
                    await self.push(ReplySettled(record, next_settled.result()))
            result = job.result()
        finally:
            job.cancel()
            if next_settled is not None:
                next_settled.cancel()
        record.timings["llm_ms"] = _ms(t0)
        record.timings["llm_model_ms"] = float(result.ms)
        record.cleaned, record.reply = result.cleaned, result.reply
        await self.notify(SayForTurn(record, P.turn_cleaned(record.turn_id, result.cleaned)))
        await self.notify(SayForTurn(record, P.turn_reply(record.turn_id, result.reply)))
        record.timings["reply_ms"] = _ms(record.started)  # end of speech (or typing) to the reply text
        await self.push(ReplyReady(record, result.reply))


class TTSStage(_SessionStage):
    """piper, one sentence at a time, so the first plays while the next is made."""

    name = "tts"

    def __init__(self, config: SessionConfig, synthesizer, output_rate: int, notify: Notify) -> None:
        super().__init__(config.inbox_size, notify)
        self.config, self.synthesizer, self.output_rate = config, synthesizer, output_rate

    def _speak(self, sentence: str) -> np.ndarray:  # in a worker thread
        from tts import resample

        synth = self.synthesizer
        pcm = synth.synthesize_all(sentence)
        if len(pcm) and synth.sample_rate != self.output_rate:
            pcm = resample(pcm, synth.sample_rate, self.output_rate)
        return pcm

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, ReplySettled):  # the first sentences, while the pass goes on
            await self._say(frame.turn, frame.text)
        elif isinstance(frame, ReplyReady):
            record = frame.turn
            await self._say(record, frame.reply)
            if record.speech_started is not None:
                record.timings["tts_ms"] = _ms(record.speech_started)
            await self.push(ReplyEnd(record))
        else:
            await self.push(frame)

    async def _say(self, record: TurnRecord, text: str) -> None:
        """Speak what of `text` has not been spoken yet (`record.said` is a prefix of it)."""
        from tts import lead_clause, split_sentences

        if self.synthesizer is None or record.interrupted_at is not None:
            return
        from dllm.canvas import unsaid

        rest, record.said = unsaid(text, record.said), text
        pieces = split_sentences(rest)
        if pieces and record.speech_started is None:  # the turn's first audio: its short opening clause alone
            pieces[:1] = lead_clause(pieces[0])
        for sentence in pieces:
            t0 = now()
            if record.speech_started is None:
                record.speech_started = t0
            pcm = await _within(asyncio.to_thread(self._speak, sentence), self.config.tts_timeout_s,
                                E.SynthesisFailed, "speech synthesis")
            record.timings.setdefault("tts_first_ms", _ms(t0))
            if len(pcm):
                await self.push(SpeechChunk(record, record.said_sentences, sentence, pcm))
                record.said_sentences += 1


class OutputStage(_SessionStage):
    """Reply audio and the turn's closing events, into the outbox."""

    name = "output"

    def __init__(self, config: SessionConfig, output_rate: int, notify: Notify) -> None:
        super().__init__(config.inbox_size, notify)
        self.config, self.output_rate = config, output_rate

    async def process(self, frame: Frame) -> None:
        rate = self.output_rate
        if isinstance(frame, (SpeechChunk, ReplyEnd)):
            await frame.turn.confirmed.wait()  # a tentative turn's audio waits for the endpoint
        if isinstance(frame, SpeechChunk):
            record = frame.turn
            if record.interrupted_at is not None or record.finished_at is not None:
                return  # cut short, or failed (its error and turn.done are out): no audio after them
            t = now()
            if record.first_audio is None:
                await self.notify(Say(P.audio_start(record.turn_id, rate)))
                record.timings["first_audio_ms"] = _ms(record.started, t)
            # Recorded before its chunks go out: once the first chunk is sent, the sentence may be heard.
            record.add_sentence(frame.sentence, len(frame.pcm) / rate, t)
            for chunk in pcm_chunks(frame.pcm, max(1, rate * self.config.out_chunk_ms // 1000)):
                await self.notify(Say(chunk))
        elif isinstance(frame, ReplyEnd):
            record = frame.turn
            if record.first_audio is not None:
                await self.notify(Say(P.audio_end(record.turn_id)))
            await self.notify(TurnFinished(record))

    async def on_interrupt(self, frame: Interrupt) -> None:
        record = frame.turn
        if record is None or record.tentative:  # the client never heard of a tentative turn
            return
        if record.first_audio is not None:
            await self.notify(AudioFlushed(record))
        await self.notify(Say(P.turn_interrupted(record.turn_id, reason=frame.reason, heard=record.heard())))


# ----- the session

class VoiceSession:
    """One conversation: feed it client messages, read back what to send.

    Example:
        >>> session = VoiceSession(services, SessionConfig(input_sample_rate=48000))
        >>> await session.start()                 # queues session.ready
        >>> await session.feed(protocol.Audio(pcm_bytes))
        >>> async for item in session.events():  # str: a JSON event, bytes: reply PCM
        ...     await websocket.send(item)
        >>> await session.close()
    """

    def __init__(self, services: Services, config: SessionConfig = SessionConfig(), *,
                 session_id: str | None = None) -> None:
        self.services = services
        self.config = config
        self.id = session_id or uuid.uuid4().hex[:12]
        self.steps = config.steps or services.steps
        self.output_rate = config.output_sample_rate or services.output_sample_rate
        self.conversation = Conversation(config.history_turns)
        self.outbox = Outbox(config.outbox_size)
        notify, synth = self._on_event, services.synthesizer
        self.input = InputStage(config, self.conversation, notify)
        self.stages: list[Stage] = [self.input]
        for stage in (ASRStage(config, services.transcriber, notify, self._prefill_words),
                      TurnStage(config, services.engine, self.conversation, notify, self._on_event_nowait,
                                client=self.id, steps=self.steps, speak_early=config.speak_early and synth is not None),
                      TTSStage(config, synth, self.output_rate, notify),
                      OutputStage(config, self.output_rate, notify)):
            self.stages.append(self.stages[-1].link(stage))
        self._tasks: list[asyncio.Task] = []
        self.prefill: asyncio.Task | None = None  # the engine computing a prompt ahead (`_prefill`), one at a time
        self.failed: BaseException | None = None
        self.errors = 0
        self.started_at = now()

    # ----- lifecycle

    async def start(self) -> None:
        """Start the stage tasks and queue `session.ready`."""
        if self._tasks:
            return
        for stage in self.stages:
            task = asyncio.create_task(stage.run(), name=f"session-{self.id}-{stage.name}")
            task.add_done_callback(self._stage_done)
            self._tasks.append(task)
        await self.emit(P.session_ready(self.id, input_sample_rate=self.config.input_sample_rate,
                                        output_sample_rate=self.output_rate, steps=self.steps))

    def _stage_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A stage loop died (a bug, not a model error): this session cannot go on.
        self.failed = task.exception()
        log.error("session %s: %s failed", self.id, task.get_name(), exc_info=self.failed)
        self.outbox.close_now()
        closer = asyncio.get_running_loop().create_task(self.outbox.close(), name=f"session-{self.id}-close")
        self._tasks.append(closer)  # tracked like the stages; close() cancels what is left

    async def finish(self, timeout: float = 300.0) -> bool:
        """End of input: let everything queued run to the end, then stop.
        Returns False if it did not end within `timeout` s (the session is closed anyway)."""
        await self.input.inbox.put(End())
        last = self._tasks[len(self.stages) - 1] if self._tasks else None
        ok = True
        if last is not None:
            done, _ = await asyncio.wait({last}, timeout=timeout)
            ok = bool(done)
        await self.close()
        return ok

    async def close(self, timeout: float = 2.0) -> None:
        """Cancel every stage now (the client went away) and close the outbox."""
        await cancel_and_wait(self._tasks + ([self.prefill] if self.prefill else []), timeout)
        await self.outbox.close()

    def idle_since(self) -> float | None:
        """When the last turn ended (the session's start before the first), on the `frames.now` clock;
        None while the user is speaking or a turn is being computed or played."""
        t = now()
        if self.input.utterance is not None or self.conversation.active(t) is not None:
            return None
        cur = self.conversation.current
        if cur is None:
            return self.started_at
        return max(cur.started, cur.finished_at or 0.0, cur.interrupted_at or 0.0)

    @property
    def running(self) -> bool:
        return bool(self._tasks) and not all(t.done() for t in self._tasks)

    # ----- in and out

    async def feed(self, message: P.ClientMessage) -> None:
        """Pass one client message to the pipeline (waits while the input stage is full)."""
        if isinstance(message, P.Audio):
            frame: Frame = AudioIn(message.pcm)
        elif isinstance(message, P.InputEnd):
            frame = EndOfInput()
        elif isinstance(message, P.TextTurn):
            frame = TextIn(message.text)
        elif isinstance(message, P.Interrupt):
            frame = StopRequest()
        else:
            raise TypeError(f"a running session cannot take {type(message).__name__}")
        await self.input.inbox.put(frame)

    async def emit(self, item: str | bytes) -> None:
        await self.outbox.put(item)

    async def next_event(self) -> str | bytes | None:
        """The next thing to send to the client; None once the session is closed."""
        return await self.outbox.get()

    async def events(self) -> AsyncIterator[str | bytes]:
        while (item := await self.outbox.get()) is not None:
            yield item

    # ----- what the stages tell the session

    async def _on_event(self, event: SessionEvent) -> None:
        """Every stage's `notify`: the one place where stages act on the session."""
        match event:
            case Say(item):
                await self.outbox.put(item)
            case SayForTurn(record, item):  # sent now, or held until the endpoint if the turn is tentative
                if record.tentative:
                    record.held.append(item)  # bounded: a turn has a handful of events (and K canvases)
                else:
                    await self.outbox.put(item)
            case TurnConfirmed(record):  # send what it held, in order, and let its audio go
                while record.held:
                    await self.outbox.put(record.held.pop(0))
                record.tentative = False  # no await since the last check: nothing can slip in behind
                record.confirmed.set()
            case TurnFinished(record):  # close it with turn.done, unless it was interrupted
                if record.finished_at is not None or record.interrupted_at is not None:
                    return
                record.timings["total_ms"] = _ms(record.started)
                record.finish(now())
                v2v = None if record.typed or record.first_audio is None else _ms(record.started, record.first_audio)
                done = P.turn_done(record.turn_id, timings=dict(record.timings), voice_to_voice_ms=v2v)
                await self._on_event(SayForTurn(record, done))
                self._prefill_next_turn()
            case EndpointHint():  # what a tentative turn's words say of the endpoint, for the input stage
                await self.input.inbox.put(event)
            case AudioFlushed(record):
                await self.outbox.drop_audio()
                await self.outbox.put(P.audio_flush(record.turn_id))
            case StageFailed(exc, frame):
                await self._report(exc, frame)
            case _:
                raise TypeError(f"not a session event: {event!r}")

    def _prefill_next_turn(self) -> None:
        """While the reply plays, the engine computes the next turn's prompt head (the history, this turn in
        it), so that turn runs only its new words (`dllm.Engine.prefill`; an engine without it is left be)."""
        self._prefill(".", words=False)

    def _prefill_words(self, partial: str) -> None:
        """While the user speaks, the engine computes the prompt through the words heard so far (a partial
        transcript), so that the turn runs only the words after them, and what Whisper heard differently."""
        self._prefill(partial, words=True)

    def _prefill(self, text: str, *, words: bool) -> None:
        prefill = getattr(self.services.engine, "prefill", None)
        if prefill is None or self.prefill is not None and not self.prefill.done():
            return
        from dllm import Turn
        turn = Turn(text, history=self.conversation.history(), knowledge=self.config.knowledge)

        async def run() -> None:
            try:
                await prefill(turn, words=words)
            except Exception:  # only a head start lost: the turn computes its prompt itself
                log.warning("session %s: a prefill failed", self.id, exc_info=True)
        self.prefill = asyncio.create_task(run(), name=f"session-{self.id}-prefill")

    def _on_event_nowait(self, event: SayForTurnNow) -> None:
        """The canvas callback's `notify`: on the loop, never waiting; dropped if the outbox is full."""
        if event.turn.tentative:
            event.turn.held.append(event.item)
        else:
            self.outbox.put_nowait(event.item)

    async def _report(self, exc: BaseException, frame: Frame) -> None:
        """A stage's error, as an error event; a turn it broke is closed."""
        self.errors += 1
        record = getattr(frame, "turn", None)
        err = E.as_voice_error(exc)  # the stages raise the error of their failure; anything else is a bug
        code, message = err.code, err.message
        log.warning("session %s: %s on %s: %s", self.id, code, type(frame).__name__, exc,
                    exc_info=exc if isinstance(err, E.InternalError) else None)
        event = P.error(code, message, turn_id=record.turn_id if record else None)
        await self._on_event(Say(event) if record is None else SayForTurn(record, event))
        if record is not None:
            if record.first_audio is not None and record.finished_at is None:
                await self.emit(P.audio_end(record.turn_id))
            await self._on_event(TurnFinished(record))
