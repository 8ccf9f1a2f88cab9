"""The stage machinery: bounded inboxes, the outbox, and the `Stage` base.

After Pipecat's frame processors, cut down to what a voice session needs:

- An `Inbox` is a bounded FIFO of frames. `put` waits for room, so a slow
  stage slows the ones before it (and, in the end, the socket reader).
  An `Interrupt` never waits: it drops the queued data frames, goes to the
  front, and wakes the owning stage so it cancels the work it is running.
  An `End` never waits either, and is never dropped.
- A `Stage` takes one frame at a time from its inbox and runs `process` as a
  task it can cancel. On an `Interrupt` it cancels that task, calls
  `on_interrupt`, and passes the interrupt downstream, which repeats it stage
  by stage: whatever a stage pushed before the interrupt reaches the next one
  before the interrupt does, and is dropped there.
- The `Outbox` holds what goes to the client: text events (str) and reply
  audio (bytes), bounded. `drop_audio` discards the queued audio (barge-in).

Errors in `process` do not kill a stage: they go to the session's `report`
callback (which turns them into `error` events) and the stage carries on.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from .frames import End, Frame, Interrupt

__all__ = ["Inbox", "Outbox", "Stage", "cancel_and_wait"]

log = logging.getLogger(__name__)

Report = Callable[[BaseException, Frame], Awaitable[None]]


async def cancel_and_wait(tasks: Iterable[asyncio.Task], timeout: float) -> set[asyncio.Task]:
    """Cancel `tasks` and wait up to `timeout` s for them to end; return those still running."""
    tasks = {t for t in tasks if t is not None}
    for t in tasks:
        t.cancel()
    if not tasks:
        return set()
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            log.debug("task %s ended with %r", t.get_name(), t.exception())
    if pending:
        log.warning("%d task(s) did not stop within %.1f s: %s", len(pending), timeout,
                    [t.get_name() for t in pending])
    return pending


class Inbox:
    """A bounded FIFO of frames in which `Interrupt` and `End` jump the bound."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("an inbox needs room for at least one frame")
        self.maxsize = maxsize
        self._items: deque[Frame] = deque()
        self._cond = asyncio.Condition()
        self.epoch = 0  # bumped by every Interrupt put
        self._flag = asyncio.Event()  # set (and replaced) at each Interrupt
        self.dropped = 0  # data frames dropped by interrupts, for tests and metrics

    def __len__(self) -> int:
        return len(self._items)

    def _data(self) -> int:
        """Queued data frames: control frames (and `Frame.unbounded` ones) do not count against the bound."""
        return sum(1 for f in self._items if not (isinstance(f, (Interrupt, End)) or f.unbounded))

    def pending(self) -> list[Frame]:
        return list(self._items)

    async def put(self, frame: Frame) -> None:
        async with self._cond:
            if isinstance(frame, Interrupt):
                earlier = [f for f in self._items if isinstance(f, Interrupt)]
                ends = [f for f in self._items if isinstance(f, End)]
                self.dropped += len(self._items) - len(earlier) - len(ends)
                # Interrupts still queued stay (each names its own turn), the newest maxsize - 1 of them.
                earlier = earlier[len(earlier) - (self.maxsize - 1):] if len(earlier) >= self.maxsize else earlier
                self._items = deque([*earlier, frame, *ends])
                self.epoch += 1
                flag, self._flag = self._flag, asyncio.Event()
                flag.set()
            elif isinstance(frame, End) or frame.unbounded:
                self._items.append(frame)
            else:
                await self._cond.wait_for(lambda: self._data() < self.maxsize)
                self._items.append(frame)
            self._cond.notify_all()

    async def get(self) -> Frame:
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._items))
            frame = self._items.popleft()
            self._cond.notify_all()
            return frame

    async def interrupted(self, epoch: int) -> None:
        """Return once an Interrupt has been put after `epoch` was read."""
        if self.epoch != epoch:
            return
        await self._flag.wait()


class Outbox:
    """What a session sends to its client: str (a JSON event) or bytes (reply PCM).

    Bounded; `close` makes `get` return None once the queue is empty.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[str | bytes] = deque()
        self._cond = asyncio.Condition()
        self._closed = False
        self.dropped_audio = 0
        self._wakers: set[asyncio.Task] = set()  # put_nowait's notifications, each over in one loop turn

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: str | bytes) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: len(self._items) < self.maxsize or self._closed)
            if self._closed:
                return
            self._items.append(item)
            self._cond.notify_all()

    def put_nowait(self, item: str | bytes) -> bool:
        """Queue without waiting (from a callback); False, and dropped, if full or closed."""
        if self._closed or len(self._items) >= self.maxsize:
            return False
        self._items.append(item)
        task = asyncio.get_running_loop().create_task(self._wake())  # a waiting get() needs the lock to wake
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)
        return True

    async def _wake(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def drop_audio(self) -> int:
        """Discard queued reply audio (not events); return how many frames went."""
        async with self._cond:
            kept = deque(i for i in self._items if isinstance(i, str))
            n = len(self._items) - len(kept)
            self._items = kept
            self.dropped_audio += n
            self._cond.notify_all()
            return n

    async def get(self) -> str | bytes | None:
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._items) or self._closed)
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    async def close(self) -> None:
        async with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close_now(self) -> None:
        """Close without waiting (from a done-callback); wakes waiters on the next put or get."""
        self._closed = True


class Stage:
    """One step of the pipeline. Subclasses implement `process(frame)`.

    `interruptible = False` stages (the input stage) run `process` inline: no
    interrupt ever reaches them, they are where interrupts start.
    """

    name = "stage"
    interruptible = True
    stop_timeout = 2.0  # seconds to wait for cancelled work

    def __init__(self, inbox_size: int, report: Report) -> None:
        self.inbox = Inbox(inbox_size)
        self.next: Stage | None = None
        self._report = report
        self.processed = 0

    def link(self, nxt: Stage) -> Stage:
        self.next = nxt
        return nxt

    async def push(self, frame: Frame) -> None:
        if self.next is not None:
            await self.next.inbox.put(frame)

    async def process(self, frame: Frame) -> None:
        """Handle one data frame; frames a stage does not know are passed on."""
        await self.push(frame)

    async def on_interrupt(self, frame: Interrupt) -> None:
        """Reset per-turn state; called before the interrupt is passed on."""

    async def on_end(self) -> None:
        """Called when End arrives, before it is passed on."""

    async def run(self) -> None:
        while True:
            frame = await self.inbox.get()
            if isinstance(frame, Interrupt):
                await self.on_interrupt(frame)
                await self.push(frame)
                continue
            if isinstance(frame, End):
                await self.on_end()
                await self.push(frame)
                return
            if self.interruptible:
                await self._run_cancellable(frame)
            else:
                await self._run_inline(frame)
            self.processed += 1

    async def _run_inline(self, frame: Frame) -> None:
        try:
            await self.process(frame)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._report(e, frame)

    async def _run_cancellable(self, frame: Frame) -> None:
        epoch = self.inbox.epoch
        work = asyncio.create_task(self.process(frame), name=f"{self.name}.process")
        watch = asyncio.create_task(self.inbox.interrupted(epoch), name=f"{self.name}.watch")
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await cancel_and_wait((work, watch), self.stop_timeout)
            raise
        if not work.done():  # interrupted: drop the work, the interrupt is next in the inbox
            await cancel_and_wait((work,), self.stop_timeout)
            watch.cancel()
            return
        watch.cancel()
        if work.cancelled():
            return
        exc = work.exception()
        if exc is not None:
            await self._report(exc, frame)
