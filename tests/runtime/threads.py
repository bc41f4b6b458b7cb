"""One thread-safety check for every engine: a shared Captioner gives 8 threads the sequential results."""

from __future__ import annotations

import threading

import numpy as np

from tests.conftest import random_images


def assert_thread_safe(shared, threads: int = 8) -> None:
    """16 jobs of varied batches, beams and attention, run sequentially, then by `threads` threads at once
    on the same Captioner: tokens, scores and attention maps must be identical."""
    imgs = random_images(16, seed=21)
    jobs = [(imgs[i % 16: i % 16 + 1 + i % 3], 1 + i % 5, i % 2 == 0) for i in range(16)]  # varied batches/beams
    sequential = [shared.caption(x, beam_size=b, return_attention=a) for x, b, a in jobs]
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for j in range(t, len(jobs), threads):
                x, b, a = jobs[j]
                results[j] = shared.caption(x, beam_size=b, return_attention=a)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    for j, seq in enumerate(sequential):
        got = results[j]
        assert [c.tokens for c in got] == [c.tokens for c in seq]
        assert [c.score for c in got] == [c.score for c in seq]
        for g, s in zip(got, seq):
            if s.attention is not None:
                np.testing.assert_array_equal(g.attention, s.attention)
