"""MicroBatcher on its own: who goes into a batch, who waits and why, who skips the queue, who
is left out."""
from __future__ import annotations

import asyncio
import threading

import pytest

from pipeline.serving.batching import ALONE, DEADLINE, FULL, LONE, MicroBatcher, PixelBudget


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


# The batcher's waits are on its own events, and each dispatch records why it went and how
# often it waited (Dispatch). With max_wait an hour, a batch that waited for company would hold
# the test for an hour: the assertions below need no timing of their own.
HOUR = 3600.0


def test_a_lone_request_goes_at_once_without_waiting_for_company():
    async def main():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=16, max_wait_s=HOUR)
        batcher.start()
        assert await asyncio.wait_for(batcher.submit(1), 30) == 10
        lone = batcher.last
        await batcher.stop()
        return recorder.calls, lone

    calls, lone = run(main())
    assert calls == [[1]]
    assert lone.reason == ALONE and lone.waits == 0


def test_a_lone_request_right_after_a_full_batch_does_not_wait_either():
    async def main():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=4, max_wait_s=HOUR)
        batcher.start()
        await asyncio.wait_for(asyncio.gather(*[batcher.submit(i) for i in range(4)]), 30)
        busy = batcher.last
        assert await asyncio.wait_for(batcher.submit(7), 30) == 70
        lone = batcher.last
        await batcher.stop()
        return recorder.calls, busy, lone

    calls, busy, lone = run(main())
    assert calls == [[0, 1, 2, 3], [7]]
    assert busy.reason == FULL and busy.waits == 0
    assert lone.reason == ALONE and lone.waits == 0


def test_requests_that_arrive_together_share_one_batch():
    async def main():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=16, max_wait_s=HOUR)
        batcher.start()
        results = await asyncio.wait_for(asyncio.gather(*[batcher.submit(i) for i in (1, 2, 3)]), 30)
        together = batcher.last
        await batcher.stop()
        return recorder.calls, results, together

    calls, results, together = run(main())
    assert calls == [[1, 2, 3]] and results == [10, 20, 30]
    assert together.reason == ALONE and together.waits == 0


def test_requests_still_decoding_are_waited_for_and_the_batch_goes_when_the_last_arrives():
    async def main():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=16, max_wait_s=HOUR)
        batcher.start()
        batcher.incoming = 2  # two more requests are decoding
        first = batcher.submit(1)

        async def arrives(value, after):
            for _ in range(after):  # a few turns of the loop: the batch is already waiting
                await asyncio.sleep(0)
            batcher.incoming -= 1
            return await batcher.submit(value)

        results = await asyncio.wait_for(asyncio.gather(first, arrives(2, 5), arrives(3, 10)), 30)
        waited = batcher.last
        await batcher.stop()
        return recorder.calls, results, waited

    calls, results, waited = run(main())
    assert calls == [[1, 2, 3]]
    assert results == [10, 20, 30]
    assert waited.reason == ALONE and waited.waits >= 1  # it waited, and went as the last came


def test_a_request_that_gives_up_on_its_way_releases_the_waiting_batch():
    async def main():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=16, max_wait_s=HOUR)
        batcher.start()
        batcher.incoming = 1  # one request decoding; its photo will turn out to be bad
        first = batcher.submit(1)
        for _ in range(5):
            await asyncio.sleep(0)
        batcher.incoming -= 1  # it failed to decode (a 400): nobody is on the way any more
        result = await asyncio.wait_for(first, 30)
        released = batcher.last
        await batcher.stop()
        return recorder.calls, result, released

    calls, result, released = run(main())
    assert calls == [[1]] and result == 10
    assert released.reason == ALONE and released.waits >= 1


def test_a_batch_waits_no_longer_than_max_wait_for_requests_on_their_way():
    async def main():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=16, max_wait_s=0.05)
        batcher.start()
        batcher.incoming = 1  # a request that never arrives (a client trickling its body)
        assert await asyncio.wait_for(batcher.submit(1), 30) == 10
        timed_out = batcher.last
        await batcher.stop()
        return recorder.calls, timed_out

    calls, timed_out = run(main())
    assert calls == [[1]]
    assert timed_out.reason == DEADLINE and timed_out.waits >= 1


def test_a_lone_request_runs_on_the_forward_thread_and_a_batch_waits_for_it():
    async def main():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=16, max_wait_s=HOUR)
        batcher.start()
        batcher.incoming = 1  # the lone request itself, admitted
        assert batcher.free_for_one()
        batcher.incoming = 0
        gate, threads = threading.Event(), []

        def decode_and_predict():  # what the endpoint runs: its decode, then the forward pass
            threads.append(threading.current_thread().name)
            gate.wait(10)
            return recorder([5])[0]

        alone = asyncio.ensure_future(batcher.run_alone(decode_and_predict))
        await asyncio.sleep(0)
        assert not batcher.free_for_one()  # the forward thread is taken
        queued = batcher.submit(6)  # a second request, decoded meanwhile, queues for a batch
        for _ in range(5):
            await asyncio.sleep(0)
        assert batcher.queued == 1 and recorder.calls == []  # held behind the lone one
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(alone, queued), 30)
        await batcher.stop()
        return recorder.calls, results, threads, batcher.reasons, batcher.images

    calls, results, threads, reasons, images = run(main())
    assert calls == [[5], [6]] and results == [50, 60]
    assert threads[0].startswith("invmon-predict")
    assert reasons == {LONE: 1, ALONE: 1} and images == 2


def test_no_request_skips_the_queue_while_others_are_queued_or_on_their_way():
    async def main():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=16, max_wait_s=HOUR)
        batcher.start()
        batcher.incoming = 2  # itself and one more: they should share a batch
        on_the_way = batcher.free_for_one()
        batcher.incoming = 0
        recorder.gate.clear()
        running = batcher.submit(0)
        await in_forward_pass(recorder)
        batcher.incoming = 1  # a request admitted while a batch runs
        during_a_batch = batcher.free_for_one()
        recorder.gate.set()
        await running
        await asyncio.sleep(0)
        after = batcher.free_for_one()
        await batcher.stop()
        return on_the_way, during_a_batch, after

    assert run(main()) == (False, False, True)


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
