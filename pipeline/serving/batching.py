"""Adaptive micro-batching: concurrent requests share one predict_fn call; a lone one waits for no one.

Requests put their decoded image in a queue and await a future. One task takes the first
waiting image, then everything already queued, up to `max_batch`, and waits for more only while
more are on their way: admitted requests still being read or decoded (`incoming`). It waits on
an event, set when an image is queued or a request on its way gives up, and never past
`max_wait`. So a lone request goes straight to the forward pass; sixteen clients' requests,
which arrive while a batch runs, are decoded meanwhile and go together into the next.

The batch runs in one thread (one forward pass at a time: the CPU's cores belong to torch's
intra-op threads, sized by the endpoint, pipeline/serving/threads.py), and while it runs the
next requests decode and queue up, so the next batch is ready when the thread comes back. A
request whose client left, or that timed out, has its future cancelled and is dropped before the
forward pass. Each dispatch says why it went (`Dispatch`): the record the tests and the
shutdown log line read.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("invmon.endpoint")

FULL, ALONE, DEADLINE, LONE = "full", "nobody on the way", "max wait", "lone request"


@dataclass(frozen=True)
class Dispatch:
    """One batch handed to the forward pass: its size, why then, and how often it waited."""

    size: int
    reason: str  # FULL, ALONE (nothing else queued or on its way), DEADLINE, or LONE (run_alone)
    waits: int  # times the batch waited for company (0: it went at once)
    waited_s: float  # on the event loop's clock, from its first image to its dispatch


class MicroBatcher:
    def __init__(self, predict_batch: Callable[[list], list], max_batch: int = 16,
                 max_wait_s: float = 0.005, thread_init: Callable[[], None] | None = None):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self.predict_batch = predict_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._incoming = 0  # requests admitted that have not reached the queue yet
        self.batches = 0
        self.images = 0
        self.reasons: Counter[str] = Counter()
        self.last: Dispatch | None = None
        self._items: deque[tuple[Any, asyncio.Future]] = deque()
        self._changed: asyncio.Event | None = None
        self._forward = asyncio.Lock()  # held from a batch's gathering to the end of its pass
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="invmon-predict",
                                          initializer=thread_init)

    def start(self) -> None:
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=False, cancel_futures=True)

    @property
    def incoming(self) -> int:
        """Requests admitted and not yet queued (being read or decoded): whom a batch may wait for."""
        return self._incoming

    @incoming.setter
    def incoming(self, value: int) -> None:
        fewer = value < self._incoming
        self._incoming = value
        if fewer and self._changed is not None:
            self._changed.set()  # one fewer on its way: a waiting batch may go now

    @property
    def queued(self) -> int:
        """Decoded images waiting for a forward pass (not the batch now running)."""
        return len(self._items)

    def submit(self, item: Any) -> asyncio.Future:
        """Queue one decoded image; the future gets its prediction (or the batch's exception)."""
        future = asyncio.get_running_loop().create_future()
        self._items.append((item, future))
        self._changed.set()
        return future

    def free_for_one(self) -> bool:
        """Whether a request may go straight to the forward pass (run_alone): no batch running
        or gathering, nothing queued, and no request on its way but itself (it counts as
        incoming until it is queued)."""
        return not self._forward.locked() and not self._items and self._incoming <= 1

    async def run_alone(self, job: Callable[[], Any]) -> Any:
        """Run `job` (a lone request's decode and forward pass, in one hop) on the forward
        thread now. The caller checks free_for_one() first, with no await in between. A batch
        that forms meanwhile waits for the thread, as it would for another batch."""
        await self._forward.acquire()  # free: returns without suspending
        future = asyncio.get_running_loop().run_in_executor(self._thread, job)

        def done(finished: asyncio.Future) -> None:
            self._forward.release()  # when the thread is done, even if the request left
            if finished.cancelled() or finished.exception() is not None:
                return  # (retrieved: a request that left logs nothing) a bad photo: no pass
            self.last = Dispatch(1, LONE, 0, 0.0)
            self.reasons[LONE] += 1
            self.batches += 1
            self.images += 1

        future.add_done_callback(done)
        return await asyncio.shield(future)

    async def _gather(self) -> tuple[list[tuple[Any, asyncio.Future]], Dispatch]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        batch: list[tuple[Any, asyncio.Future]] = []
        waits = 0
        while True:
            while self._items and len(batch) < self.max_batch:
                batch.append(self._items.popleft())
            if len(batch) >= self.max_batch:
                reason = FULL
            elif self._incoming <= 0:
                reason = ALONE  # nobody else is on the way: waiting cannot fill the batch
            elif loop.time() - started >= self.max_wait_s:
                reason = DEADLINE
            else:
                self._changed.clear()
                waits += 1
                try:  # Event.wait under wait_for: a timeout loses nothing (unlike Queue.get's)
                    await asyncio.wait_for(self._changed.wait(),
                                           self.max_wait_s - (loop.time() - started))
                except asyncio.TimeoutError:
                    pass
                continue
            return batch, Dispatch(len(batch), reason, waits, loop.time() - started)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._items:
                self._changed.clear()
                await self._changed.wait()
            async with self._forward:  # after a lone request's pass, if one is running
                gathered, dispatch = await self._gather()
                self.last = dispatch
                self.reasons[dispatch.reason] += 1
                batch = [(item, f) for item, f in gathered if not f.done()]
                if not batch:
                    continue  # every client in it left or timed out: no forward pass
                try:
                    results = await loop.run_in_executor(self._thread, self.predict_batch,
                                                         [item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
            self.batches += 1
            self.images += len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def summary(self) -> str:
        """The shutdown log line's numbers: images, forward passes, why batches went."""
        mean = self.images / self.batches if self.batches else 0.0
        why = ", ".join(f"{count} {reason}" for reason, count in self.reasons.most_common())
        return (f"scored {self.images} images in {self.batches} forward passes "
                f"(mean batch {mean:.1f}; dispatched: {why})")


class PixelBudget:
    """How many decoded pixels requests may hold at once (an async weighted semaphore).

    A request reserves the most a photo may have (the pixel budget of the decoding rule)
    before it decodes, and keeps only its photo's real size once decoded, until its batch is
    scored: many small photos can wait for a batch, few huge ones can be in memory at once.
    """

    def __init__(self, total: int):
        self.total = total
        self.free = total
        self._waiters: deque[asyncio.Future] = deque()

    async def acquire(self, pixels: int) -> None:
        pixels = min(pixels, self.total)
        while self.free < pixels:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self.free -= pixels

    def release(self, pixels: int) -> None:
        self.free = min(self.total, self.free + min(pixels, self.total))
        while self._waiters:  # each waiter checks again whether its reservation fits
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
