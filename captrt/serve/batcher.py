"""Dynamic batching: images from concurrent requests share one beam search.

Requests put decoded images (uint8 (S, S, 3)) into a bounded FIFO queue and await one future per
image. One loop on the event loop forms batches: it looks at the oldest waiting image, gathers up
to ``max_batch`` images with the same decoding parameters (DecodeParams.batch_key; oldest first) and starts the engine as
soon as the batch is full, or the oldest image has waited ``max_wait_s``, or no other request is on its
way (being received or decoded: see ``incoming``), since then waiting could only add latency. The engine runs on
``streams`` worker threads (default 1: one batch at a time, using every core), so the event loop never
blocks on inference. Up to ``streams`` batches are in flight at once (the captioner's streams,
captrt.runtime.streams): the loop forms a new batch only while fewer are running, and while all of them
run the next one fills up: under load, batches grow by themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from captrt.checks import check_int
from captrt.runtime.decoding import DecodingOptions
from captrt.runtime.decoding.options import SPECS

log = logging.getLogger("captrt.serve")


@dataclass(frozen=True)
class DecodeParams:
    """A request's decoding parameters. Images share a search when their `batch_key`s are equal:
    every parameter but return_scores, which only decides what the response shows (a batch computes
    token scores when any of its requests asks, and the others' responses leave them out).

    controls: the decoding controls that differ from their defaults (captrt.runtime.decoding), as
    sorted (name, value) pairs so that the parameters stay hashable and comparable.
    """

    beam_size: int
    max_steps: int
    attention: bool = False
    length_penalty: float = 0.0
    controls: tuple[tuple[str, Any], ...] = ()

    @property
    def return_scores(self) -> bool:
        return dict(self.controls).get("return_scores", False)

    @property
    def batch_key(self) -> "DecodeParams":
        return replace(self, controls=tuple(kv for kv in self.controls if SPECS[kv[0]].splits_batch))

    @classmethod
    def of(cls, options: DecodingOptions, attention: bool = False) -> "DecodeParams":
        basics = ("beam_size", "max_steps", "length_penalty")
        controls = tuple(sorted((k, v) for k, v in options.changed().items() if k not in basics))
        return cls(options.beam_size, options.max_steps, attention, options.length_penalty, controls)

    def decoding(self) -> DecodingOptions:
        """The DecodingOptions these parameters ask for."""
        return DecodingOptions.build(beam_size=self.beam_size, max_steps=self.max_steps,
                                     length_penalty=self.length_penalty, **dict(self.controls))

    @classmethod
    def for_batch(cls, params: Sequence["DecodeParams"]) -> "DecodeParams":
        """One batch's parameters (equal batch keys): with return_scores when any request asks."""
        first = params[0]
        if any(p.return_scores for p in params) and not first.return_scores:
            return replace(first, controls=tuple(sorted(first.controls + (("return_scores", True),))))
        return first


class QueueFullError(Exception):
    """No room for the request's images; the client should retry after ``retry_after`` seconds."""

    def __init__(self, waiting: int, capacity: int, retry_after: int):
        super().__init__(f"queue full: {waiting} images waiting (capacity {capacity}); retry in {retry_after} s")
        self.retry_after = retry_after


class BatcherClosedError(Exception):
    """The service is shutting down and takes no new work."""


@dataclass
class _Job:
    pixels: np.ndarray  # (S, S, 3) uint8
    params: DecodeParams
    future: asyncio.Future
    enqueued: float  # loop.time()


# run(pixels: list of (S, S, 3), params) -> one result per image, in order; called on a worker thread
# (up to `streams` calls at once).
RunBatch = Callable[[list[np.ndarray], DecodeParams], Sequence[Any]]


class Batcher:
    """Bounded queue + batch-forming loop. All methods but the worker call run on the event loop."""

    def __init__(self, run: RunBatch, *, max_batch: int, max_wait_s: float, capacity: int, metrics: Any = None,
                 streams: int = 1):
        self._run = run
        self.streams = check_int("streams", streams)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self._metrics = metrics
        self._queue: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._busy_s = 0.05  # running mean of one engine call: sizes Retry-After
        self._incoming = 0  # requests being received/decoded: images that may join the next batch
        self._running: set[asyncio.Task] = set()  # batches in the engine (at most `streams`)
        self._executor = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="captrt-engine")

    @property
    def depth(self) -> int:
        """Images waiting for the engine (not counting the batches that are running)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Batches in the engine now (0..streams)."""
        return sum(1 for t in self._running if not t.done())

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="captrt-batcher")

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Wrap a request from its first byte until it has submitted (or failed): while any request
        is inside, the batcher waits (up to max_wait_s) for its images; when none is, it starts at once."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            if self._incoming == 0 and self._wakeup is not None:
                self._wakeup.set()

    def submit(self, images: Sequence[np.ndarray], params: DecodeParams) -> list[asyncio.Future]:
        """Queue a request's images (all or none); one future per image resolves to run()'s result."""
        if self._closing or self._task is None:
            raise BatcherClosedError("the service is shutting down")
        if len(self._queue) + len(images) > self.capacity:
            raise QueueFullError(len(self._queue), self.capacity, self.retry_after())
        loop = asyncio.get_running_loop()
        now = loop.time()
        jobs = [_Job(p, params, loop.create_future(), now) for p in images]
        self._queue.extend(jobs)
        self._gauge()
        assert self._wakeup is not None
        self._wakeup.set()
        return [j.future for j in jobs]

    def cancel(self, futures: Sequence[asyncio.Future]) -> int:
        """Give up on these images (client gone, timeout): queued ones never reach the engine.
        Returns how many were still queued."""
        for f in futures:
            f.cancel()
        before = len(self._queue)
        self._drop_done()
        dropped = before - len(self._queue)
        if dropped and self._metrics is not None:
            self._metrics.images_dropped.inc(dropped)
        return dropped

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: waiting batches x mean engine call, at least 1.
        `streams` batches run at once, so the waiting batches take ceil(batches / streams) rounds (the
        mean call is measured with the streams sharing the cores, so it already holds their slow-down)."""
        batches = -(-max(len(self._queue), 1) // self.max_batch)
        rounds = -(-batches // self.streams)
        return max(1, int(round(rounds * self._busy_s + 0.5)))

    async def close(self) -> None:
        """Finish every queued image (and every batch in flight), then stop the loop and the worker threads."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------------------------ internals

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._queue))

    def _drop_done(self) -> None:
        if any(j.future.done() for j in self._queue):
            self._queue = deque(j for j in self._queue if not j.future.done())
            self._gauge()

    async def _wait_for_batch(self) -> bool:
        """Return True when a batch should start now, False when closing with nothing left."""
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            self._drop_done()
            if not self._queue:
                if self._closing:
                    return False
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            same = sum(1 for j in self._queue if j.params.batch_key == head.params.batch_key)
            remaining = head.enqueued + self.max_wait_s - loop.time()
            if same >= self.max_batch or remaining <= 0 or self._closing or self._incoming == 0:
                return True
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _take(self) -> list[_Job]:
        """The oldest image's parameters decide; matching images oldest first, others keep their place."""
        key = self._queue[0].params.batch_key
        batch: list[_Job] = []
        rest: deque[_Job] = deque()
        for job in self._queue:
            if len(batch) < self.max_batch and job.params.batch_key == key:
                batch.append(job)
            else:
                rest.append(job)
        self._queue = rest
        self._gauge()
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.running >= self.streams:  # every stream busy: the queue fills while they run
                await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
            if not await self._wait_for_batch():
                break
            jobs = self._take()
            task = loop.create_task(self._run_jobs(jobs), name="captrt-batch")
            self._running.add(task)
            task.add_done_callback(self._running.discard)  # the set holds only batches in flight
        if self._running:  # closing: the batches in flight finish before the worker threads stop
            await asyncio.gather(*self._running)

    async def _run_jobs(self, jobs: list[_Job]) -> None:
        """One batch on a worker thread; its results (or the engine's error) go to its own futures."""
        loop = asyncio.get_running_loop()
        params = DecodeParams.for_batch([j.params for j in jobs])
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(jobs))
        start = loop.time()
        try:
            results = await loop.run_in_executor(self._executor, self._run, [j.pixels for j in jobs], params)
            if len(results) != len(jobs):
                raise RuntimeError(f"engine returned {len(results)} results for {len(jobs)} images")
        except Exception as exc:  # the engine failed: every image of the batch gets the error
            log.exception("batch of %d images failed", len(jobs))
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        finally:
            took = loop.time() - start
            self._busy_s = 0.8 * self._busy_s + 0.2 * took
            if self._metrics is not None:
                self._metrics.inference_seconds.observe(took)
        for j, r in zip(jobs, results):
            if not j.future.done():
                j.future.set_result(r)
        if self._metrics is not None:
            self._metrics.images_captioned.inc(len(jobs))
