"""Dynamic micro-batching: concurrent requests share one predict_fn call.

Requests put their decoded image on a queue and await a future. One task takes the first
waiting image, then gathers more until the batch is full, or `max_wait` has passed, or nobody
else is on the way (no request is still decoding): a lone client never waits for company.
The batch runs in one thread (one forward pass at a time: the CPU's cores belong to torch's
intra-op threads), and while it runs the next requests decode and queue up, so the next batch
is ready when the thread comes back. A request whose client left, or that timed out, has its
future cancelled and is dropped before the forward pass.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

log = logging.getLogger("invmon.endpoint")


class MicroBatcher:
    def __init__(self, predict_batch: Callable[[list], list], max_batch: int = 16,
                 max_wait_s: float = 0.005):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self.predict_batch = predict_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.incoming = 0  # requests admitted that have not reached the queue yet (decoding)
        self.batches = 0
        self.images = 0
        self.last_batch = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="invmon-predict")

    def start(self) -> None:
        self._queue = asyncio.Queue()
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
    def queued(self) -> int:
        """Decoded images waiting for a forward pass (not the batch now running)."""
        return self._queue.qsize() if self._queue is not None else 0

    def submit(self, item: Any) -> asyncio.Future:
        """Queue one decoded image; the future gets its prediction (or the batch's exception)."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return future

    async def _gather(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            # Wait only for requests on their way: admitted ones still decoding, or, while the
            # last batch was bigger than this one, its clients' next requests (they were just
            # answered). A lone client never waits; sixteen do not split into 15 + 1.
            expected = self.incoming > 0 or len(batch) < self.last_batch
            if remaining <= 0 or not expected:
                break
            # Poll in 1 ms slices (wait_for on Queue.get can drop an item on 3.11), and so
            # that a request whose decode fails does not hold the batch to the deadline.
            await asyncio.sleep(min(remaining, 0.001))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(item, f) for item, f in await self._gather() if not f.done()]
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
            self.last_batch = len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


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
