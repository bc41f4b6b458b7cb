"""The batching policy on its own: a recording run() stands in for the engine (no model needed)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from captrt.serve.batcher import Batcher, BatcherClosedError, DecodeParams, QueueFullError
from captrt.serve.metrics import ServeMetrics

P5 = DecodeParams(beam_size=5, max_steps=50)
P3 = DecodeParams(beam_size=3, max_steps=50)


def img(i: int) -> np.ndarray:
    return np.full((2, 2, 3), i, np.uint8)


class Recorder:
    """run(): records each batch as (params, [pixel ids]); blocks while `gate` is clear."""

    def __init__(self) -> None:
        self.batches: list[tuple[DecodeParams, list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, pixels: list[np.ndarray], params: DecodeParams) -> list[int]:
        self.started.set()
        self.gate.wait(10)
        ids = [int(p[0, 0, 0]) for p in pixels]
        self.batches.append((params, ids))
        return [i * 10 for i in ids]


async def held(max_batch: int, capacity: int, metrics=None):
    """A started Batcher whose engine holds image 0 (until rec.gate.set()), so the queue can fill."""
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, max_batch=max_batch, max_wait_s=0.0, capacity=capacity, metrics=metrics)
    b.start()
    running = b.submit([img(0)], P5)
    while not rec.started.is_set():
        await asyncio.sleep(0.001)
    return rec, b, running


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_fills_batches_up_to_max_batch_in_order():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch=4, max_wait_s=0.05, capacity=64)
        b.start()
        futures = b.submit([img(i) for i in range(10)], P5)
        results = await asyncio.gather(*futures)
        await b.close()
        return rec, results

    rec, results = run(main())
    assert results == [i * 10 for i in range(10)]
    # full batches start at once, the 2 left over too (no other request is on its way); order is kept
    assert [ids for _, ids in rec.batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_waits_at_most_max_wait_for_a_request_that_never_comes():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch=16, max_wait_s=0.01, capacity=8)
        b.start()
        with b.incoming():  # a request is being read but never submits (e.g. its upload stalls)
            [f] = b.submit([img(7)], P5)
            result = await f  # would hang (run()'s wait_for fails) if the deadline were not honoured
        await b.close()
        return result, rec

    result, rec = run(main())
    assert result == 70 and rec.batches == [(P5, [7])]


def test_groups_by_decoding_parameters_oldest_first():
    async def main():
        rec, b, first = await held(max_batch=8, capacity=64)
        a = b.submit([img(1), img(2)], P3)
        c = b.submit([img(3)], P5)
        d = b.submit([img(4)], P3)
        rec.gate.set()
        await asyncio.gather(*first, *a, *c, *d)
        await b.close()
        return rec

    rec = run(main())
    assert rec.batches == [(P5, [0]), (P3, [1, 2, 4]), (P5, [3])]


def test_queue_capacity_counts_images_and_refuses_whole_requests():
    async def main():
        metrics = ServeMetrics()
        rec, b, running = await held(max_batch=1, capacity=3, metrics=metrics)
        queued = b.submit([img(1), img(2)], P5)
        assert b.depth == 2
        with pytest.raises(QueueFullError) as info:
            b.submit([img(3), img(4)], P5)  # 2 + 2 > 3: refused whole, nothing of it queued
        assert info.value.retry_after >= 1 and b.depth == 2
        b.submit([img(5)], P5)  # 2 + 1 fits
        rec.gate.set()
        await asyncio.gather(*running, *queued)
        await b.close()
        return rec, metrics

    rec, metrics = run(main())
    assert [ids for _, ids in rec.batches] == [[0], [1], [2], [5]]
    assert metrics.queue_depth._value.get() == 0


def test_cancelled_images_never_reach_the_engine():
    async def main():
        metrics = ServeMetrics()
        rec, b, running = await held(max_batch=4, capacity=16, metrics=metrics)
        gone = b.submit([img(1), img(2)], P5)
        kept = b.submit([img(3)], P5)
        assert b.cancel(gone) == 2 and b.depth == 1
        assert b.cancel(running) == 0  # already in the engine: it finishes, its result is discarded
        rec.gate.set()
        assert await asyncio.gather(*kept) == [30]
        await b.close()
        return rec, metrics

    rec, metrics = run(main())
    assert [ids for _, ids in rec.batches] == [[0], [3]]
    assert metrics.images_dropped._value.get() == 2


def test_engine_errors_reach_every_image_of_the_batch_and_the_loop_goes_on():
    calls = []

    def flaky(pixels, params):
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("engine exploded")
        return ["ok"] * len(pixels)

    async def main():
        b = Batcher(flaky, max_batch=2, max_wait_s=0.0, capacity=8)
        b.start()
        bad = b.submit([img(0), img(1)], P5)
        outcomes = await asyncio.gather(*bad, return_exceptions=True)
        good = await asyncio.gather(*b.submit([img(2)], P5))
        await b.close()
        with pytest.raises(BatcherClosedError):
            b.submit([img(3)], P5)
        return outcomes, good

    outcomes, good = run(main())
    assert all(isinstance(o, RuntimeError) and "exploded" in str(o) for o in outcomes)
    assert good == ["ok"]


def test_close_finishes_queued_work():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch=2, max_wait_s=60.0, capacity=8)
        b.start()
        with b.incoming():  # company on its way: the third image would wait up to 60 s for it...
            futures = b.submit([img(i) for i in range(3)], P5)
            await b.close()  # ...but closing flushes it at once
        return [f.result() for f in futures]

    assert run(main()) == [0, 10, 20]


def test_waits_for_requests_on_their_way_and_only_for_them():
    """max_wait is 60 s: a lone image with no other request arriving starts at once; an image whose
    company is still being received waits for it, and both share one batch."""
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch=8, max_wait_s=60.0, capacity=8)
        b.start()
        [alone] = b.submit([img(1)], P5)
        await asyncio.wait_for(alone, 5)  # fails if the batcher sat out max_wait with nobody coming
        with b.incoming():  # a second request is being read...
            first = b.submit([img(2)], P5)  # (an earlier request's image)
            await asyncio.sleep(0.05)
            assert not first[0].done()  # ...so the queued image waits for it
            second = b.submit([img(3)], P5)
        results = await asyncio.wait_for(asyncio.gather(*first, *second), 5)
        await b.close()
        return rec, results

    rec, results = run(main())
    assert results == [20, 30]
    assert [ids for _, ids in rec.batches] == [[1], [2, 3]]


def test_return_scores_does_not_split_a_batch():
    from dataclasses import replace

    scored = replace(P5, controls=(("return_scores", True),))
    assert scored.batch_key == P5.batch_key and scored != P5
    assert DecodeParams.for_batch([P5, scored]).return_scores and not DecodeParams.for_batch([P5]).return_scores
    other = replace(P5, controls=(("min_length", 3),))
    assert other.batch_key != P5.batch_key  # a different search: never the same batch


class Streams:
    """run() for S > 1: counts the calls running at once (peak), records each batch's ids in start order;
    a batch whose first id is in `held` blocks until its event is set."""

    def __init__(self, *held: int) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.calls: list[list[int]] = []
        self.held = {i: threading.Event() for i in held}

    def __call__(self, pixels: list[np.ndarray], params: DecodeParams) -> list[int]:
        ids = [int(p[0, 0, 0]) for p in pixels]
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.calls.append(ids)
        try:
            if ids[0] in self.held:
                assert self.held[ids[0]].wait(10)
            return [i * 10 for i in ids]
        finally:
            with self.lock:
                self.active -= 1

    def release(self) -> None:
        for e in self.held.values():
            e.set()


async def until(cond, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.001)


def test_two_streams_run_two_batches_at_once_and_results_reach_their_futures():
    """S = 2: two batches are in the engine together (never a third), the second may finish first, and
    every image's future gets its own result; the third batch starts as soon as a stream frees."""
    async def main():
        rec = Streams(0, 2)
        b = Batcher(rec, max_batch=2, max_wait_s=0.0, capacity=16, streams=2)
        b.start()
        futures = b.submit([img(i) for i in range(6)], P5)
        await until(lambda: rec.active == 2)
        await asyncio.sleep(0.02)  # a third batch would have started by now if the loop ignored S
        assert rec.calls == [[0, 1], [2, 3]] and b.running == 2 and b.depth == 2
        rec.held[2].set()  # the second batch finishes first...
        assert await asyncio.gather(*futures[2:4]) == [20, 30]
        await until(lambda: len(rec.calls) == 3)  # ...and its stream takes the next batch at once
        assert not futures[0].done() and rec.calls[2] == [4, 5]
        rec.held[0].set()
        results = await asyncio.gather(*futures)
        await until(lambda: not b._running)  # finished batches are not kept (a long-running service)
        await b.close()
        return rec, results

    rec, results = run(main())
    assert results == [i * 10 for i in range(6)] and rec.peak == 2


def test_two_streams_keep_the_queue_capacity_retry_after_and_cancel():
    """Capacity counts queued images only (not the S batches running); a full queue refuses whole
    requests with a Retry-After of ceil(waiting batches / S) mean engine calls; cancelled images are dropped."""
    async def main():
        metrics = ServeMetrics()
        rec = Streams(0, 1)
        b = Batcher(rec, max_batch=1, max_wait_s=0.0, capacity=3, metrics=metrics, streams=2)
        b.start()
        running = b.submit([img(0)], P5) + b.submit([img(1)], P5)
        await until(lambda: rec.active == 2)
        queued = b.submit([img(2), img(3)], P5)
        assert b.depth == 2
        b._busy_s = 4.2  # a measured mean engine call, pinned for the arithmetic below
        b.submit([img(4)], P5)
        with pytest.raises(QueueFullError) as info:
            b.submit([img(5)], P5)  # 3 + 1 > 3: refused, nothing of it queued
        assert info.value.retry_after == round(2 * 4.2 + 0.5)  # 3 one-image batches on 2 streams: 2 rounds
        assert b.cancel(queued[1:]) == 1 and b.depth == 2  # image 3: the client left
        rec.release()
        results = await asyncio.gather(*running, *queued[:1])
        await b.close()
        return rec, metrics, results

    rec, metrics, results = run(main())
    assert results == [0, 10, 20]
    assert sorted(ids for call in rec.calls for ids in call) == [0, 1, 2, 4]  # 3 never reached the engine
    assert metrics.queue_depth._value.get() == 0 and metrics.images_dropped._value.get() == 1


def test_close_with_two_streams_drains_the_batches_in_flight_and_the_queue():
    """close() refuses new work at once, waits for both running batches and runs what is still queued."""
    async def main():
        rec = Streams(0, 1)
        b = Batcher(rec, max_batch=1, max_wait_s=60.0, capacity=8, streams=2)
        b.start()
        with b.incoming():  # company on its way: without close, image 2 could wait up to max_wait
            futures = b.submit([img(i) for i in range(3)], P5)
            await until(lambda: rec.active == 2)
            closing = asyncio.get_running_loop().create_task(b.close())
            await asyncio.sleep(0.02)
            assert not closing.done() and not any(f.done() for f in futures)
            with pytest.raises(BatcherClosedError):
                b.submit([img(9)], P5)
            rec.release()
            await closing
        return [f.result() for f in futures], rec

    results, rec = run(main())
    assert results == [0, 10, 20] and sorted(rec.calls) == [[0], [1], [2]] and rec.peak == 2
