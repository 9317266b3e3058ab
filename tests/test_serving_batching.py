"""MicroBatcher on its own: who goes into a batch, who waits, who is left out."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pipeline.serving.batching import MicroBatcher, PixelBudget


class Recorder:
    """A predict_batch that records each call's items (and can be held on an event)."""

    def __init__(self):
        self.calls: list[list] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        self.gate.wait(10)
        return [item * 10 for item in items]


def run(coro):
    return asyncio.run(coro)


async def in_forward_pass(recorder: Recorder) -> None:
    """Until the held forward pass has been entered (polled: no fixed sleep to guess at)."""
    async def entered():
        while not recorder.calls:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(entered(), 10)


def test_a_lone_request_does_not_wait_for_company():
    async def main():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=16, max_wait_s=5.0)
        batcher.start()
        started = time.perf_counter()
        assert await batcher.submit(1) == 10
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return recorder.calls, elapsed

    calls, elapsed = run(main())
    assert calls == [[1]]
    assert elapsed < 2.5  # nobody else was decoding: max_wait (5 s) was not spent


def test_requests_still_decoding_are_waited_for_up_to_max_wait():
    async def main():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=16, max_wait_s=0.3)
        batcher.start()
        batcher.incoming = 2  # two more requests are decoding
        first = batcher.submit(1)

        async def arrives(value, delay):
            await asyncio.sleep(delay)
            batcher.incoming -= 1
            return await batcher.submit(value)

        results = await asyncio.gather(first, arrives(2, 0.05), arrives(3, 0.1))
        await batcher.stop()
        return recorder.calls, results

    calls, results = run(main())
    assert calls == [[1, 2, 3]]
    assert results == [10, 20, 30]


def test_batches_never_exceed_max_batch_and_queue_while_a_batch_runs():
    async def main():
        recorder = Recorder()
        recorder.gate.clear()  # hold the first forward pass
        batcher = MicroBatcher(recorder, max_batch=4, max_wait_s=0.0)
        batcher.start()
        first = batcher.submit(0)
        await in_forward_pass(recorder)  # the first batch, alone
        rest = [batcher.submit(i) for i in range(1, 10)]
        recorder.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.stop()
        return recorder.calls, results

    calls, results = run(main())
    assert calls == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert results == [i * 10 for i in range(10)]


def test_cancelled_requests_are_left_out_of_the_forward_pass():
    async def main():
        recorder = Recorder()
        recorder.gate.clear()
        batcher = MicroBatcher(recorder, max_batch=8, max_wait_s=0.0)
        batcher.start()
        first = batcher.submit(0)
        await in_forward_pass(recorder)
        kept, dropped = batcher.submit(1), batcher.submit(2)
        dropped.cancel()  # its client left
        all_gone = batcher.submit(3)
        recorder.gate.set()
        assert await first == 0 and await kept == 10
        await asyncio.sleep(0.05)
        await batcher.stop()
        return recorder.calls, all_gone

    calls, _ = run(main())
    assert calls[:2] == [[0], [1, 3]]  # 2 never reached predict_batch


def test_a_failing_batch_fails_each_of_its_requests_and_the_batcher_goes_on():
    def predict(items):
        if 13 in items:
            raise RuntimeError("model fault")
        return items

    async def main():
        batcher = MicroBatcher(predict, max_batch=4, max_wait_s=0.0)
        batcher.start()
        with pytest.raises(RuntimeError, match="model fault"):
            await batcher.submit(13)
        assert await batcher.submit(7) == 7
        await batcher.stop()

    run(main())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_batch=0)


def test_the_pixel_budget_lets_many_small_photos_wait_but_few_huge_ones():
    async def main():
        budget = PixelBudget(48)
        for _ in range(3):
            await budget.acquire(16)  # three worst-case reservations: the budget is spent
        fourth = asyncio.ensure_future(budget.acquire(16))
        await asyncio.sleep(0.05)
        assert not fourth.done()
        budget.release(15)  # one photo turned out small: it keeps 1 of its 16
        await asyncio.sleep(0.05)
        assert not fourth.done() and budget.free == 15  # 15 is still not a whole reservation
        budget.release(1)  # that small photo was scored
        await asyncio.wait_for(fourth, 1)
        assert budget.free == 0
        for _ in range(2):
            budget.release(16)
        small = [asyncio.ensure_future(budget.acquire(1)) for _ in range(32)]
        await asyncio.wait_for(asyncio.gather(*small), 1)  # 32 small photos fit in 32 pixels
        assert budget.free == 0

    run(main())
