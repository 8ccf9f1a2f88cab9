"""Per-connection limits that need a clock: input audio paced to about real time.

Pure bookkeeping, no sockets and no sleeping: the server asks `AudioBudget.take`
for each audio frame and drops the frame when the answer is no. A client that
sends faster than it speaks would otherwise buy as much VAD, resampling and
Whisper time as its bandwidth allows (seen: 486x real time kept 1.1 cores busy
and slowed every other session fourfold).
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AudioBudget"]


@dataclass
class AudioBudget:
    """A token bucket measured in seconds of audio.

    A session may send `burst_s` seconds of audio at once (a client catching up
    after a network stall), and after that `rate` seconds of audio per second of
    wall time (1.0 is real time; a little more leaves room for jitter).

    >>> b = AudioBudget(rate=1.0, burst_s=2.0, at=0.0)
    >>> b.take(2.0, at=0.0), b.take(0.5, at=0.0), b.take(0.5, at=0.5)
    (True, False, True)
    """

    rate: float = 1.25
    burst_s: float = 10.0
    at: float = 0.0  # the clock reading of the last update (time.monotonic())
    level: float = field(init=False)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst_s <= 0:
            raise ValueError("the audio rate and burst must be positive")
        self.level = self.burst_s

    def take(self, seconds: float, *, at: float) -> bool:
        """Spend `seconds` of audio at clock reading `at`; False (nothing spent) when over budget."""
        self.level = min(self.burst_s, self.level + max(0.0, at - self.at) * self.rate)
        self.at = at
        if seconds > self.level:
            return False
        self.level -= seconds
        return True
