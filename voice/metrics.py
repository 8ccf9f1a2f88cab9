"""The server's Prometheus metrics (`GET /metrics`), with `prometheus-client`.

One registry per server, so two servers in one process (the tests) keep
their own counts. The voice stages are read from the events a session sends
(`turn.done` carries each turn's timings, `error` its code), so sessions
need no metrics code; the engine reports each batch through its `on_batch`
hook; gauges (sessions, queue depths) are read when scraped.

    voice_stage_seconds{stage}      endpoint, asr, dllm, tts_first_audio, voice_to_voice
    voice_turns_total{outcome}      done, interrupted
    voice_errors_total{code}        the protocol's error codes (and HTTP API errors)
    voice_sessions                  open /ws sessions; voice_sessions_total: opened
    voice_queue_depth{queue}        frames queued per stage (all sessions), the outbox, the dLLM queue
    voice_http_requests_total{route,status}
    dllm_batch_size                 requests per engine batch
    dllm_steps_total                denoising steps (model calls) run
    dllm_batch_seconds              wall time of one batch
"""
from __future__ import annotations

import json
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

# Seconds: a fast endpoint decision to a slow CPU turn.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
STAGES = {"endpoint_ms": "endpoint", "asr_ms": "asr", "llm_ms": "dllm", "tts_first_ms": "tts_first_audio"}


class _Queues:
    """A collector that reads queue depths at scrape time."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily("voice_queue_depth", "Items queued now, by queue", labels=["queue"])
        for name, n in self.read().items():
            g.add_metric([name], n)
        yield g


class Metrics:
    """The metrics of one server. `sessions` returns the open sessions, `engine` is the dLLM engine."""

    def __init__(self, sessions: Callable[[], dict], engine: Any) -> None:
        self.recent_reply_ms: deque[tuple[float, float]] = deque(maxlen=32)  # (time.monotonic(), reply_ms)
        self.registry = r = CollectorRegistry()
        self._sessions, self._engine = sessions, engine
        self.stage = Histogram("voice_stage_seconds", "Latency of each stage of a turn", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.turns = Counter("voice_turns", "Turns ended, by outcome", ["outcome"], registry=r)
        self.errors = Counter("voice_errors", "Errors reported to clients, by code", ["code"], registry=r)
        self.sessions_opened = Counter("voice_sessions_opened", "Voice sessions opened", registry=r)
        Gauge("voice_sessions", "Open voice sessions", registry=r).set_function(lambda: len(self._sessions()))
        self.http = Counter("voice_http_requests", "HTTP API requests, by route and status", ["route", "status"],
                            registry=r)
        self.batch = Histogram("dllm_batch_size", "Requests per dLLM batch", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=r)
        self.batch_seconds = Histogram("dllm_batch_seconds", "Wall time of one dLLM batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.steps = Counter("dllm_steps", "Denoising steps (model calls) run", registry=r)
        r.register(_Queues(self._queue_depths))
        if hasattr(engine, "on_batch"):
            engine.on_batch = self.on_batch

    def on_batch(self, rows: int, calls: int, ms: float) -> None:
        """The engine's hook, called after each batch."""
        self.batch.observe(rows)
        self.steps.inc(calls)
        self.batch_seconds.observe(ms / 1000)

    def _queue_depths(self) -> dict[str, int]:
        depths: dict[str, int] = {}
        for session in list(self._sessions().values()):
            for stage in session.stages:
                depths[stage.name] = depths.get(stage.name, 0) + len(stage.inbox)
            depths["outbox"] = depths.get("outbox", 0) + len(session.outbox)
        depths["dllm"] = int(getattr(self._engine, "waiting", 0))
        return depths

    def observe_event(self, event: str) -> None:
        """Count what a session sends: turn.done's timings, turn.interrupted, error codes."""
        head = event[:32]
        if '"turn.done"' not in head and '"error"' not in head and '"turn.interrupted"' not in head:
            return
        try:  # metrics never break a session
            obj = json.loads(event)
        except ValueError:
            return
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "error":
            self.errors.labels(str(obj.get("code"))).inc()
        elif kind == "turn.interrupted":
            self.turns.labels("interrupted").inc()
        elif kind == "turn.done":
            self.turns.labels("done").inc()
            timings = obj.get("timings") or {}
            if isinstance(timings.get("reply_ms"), (int, float)):
                self.recent_reply_ms.append((time.monotonic(), float(timings["reply_ms"])))
            for key, stage in STAGES.items():
                if isinstance(timings.get(key), (int, float)):
                    self.stage.labels(stage).observe(timings[key] / 1000)
            if isinstance(obj.get("voice_to_voice_ms"), (int, float)):
                self.stage.labels("voice_to_voice").observe(obj["voice_to_voice_ms"] / 1000)

    def recent_turn_ms(self, window_s: float = 60.0, least: int = 3) -> float | None:
        """The median `reply_ms` (end of speech or typing to the reply) of the turns done in the
        last `window_s` seconds; None with fewer than `least` of them (nothing to judge by)."""
        since = time.monotonic() - window_s
        recent = [ms for t, ms in self.recent_reply_ms if t >= since]
        return statistics.median(recent) if len(recent) >= least else None

    def render(self) -> bytes:
        return generate_latest(self.registry)
