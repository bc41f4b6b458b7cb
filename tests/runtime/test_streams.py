"""Streams: S searches at once over one loaded model, T threads each; captions never change."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from captrt.runtime import Captioner
from captrt.runtime.streams import StreamPlan, StreamSlots
from tests.conftest import random_images


def test_plans_and_their_errors():
    assert StreamPlan.resolve(cores=8) == StreamPlan(1, 8)  # the default: one batch at a time on every core
    assert StreamPlan.resolve(2, cores=8) == StreamPlan(2, 4)
    assert StreamPlan.resolve("auto", cores=8) == StreamPlan(8, 1)
    assert StreamPlan.resolve("auto", 2, cores=8) == StreamPlan(4, 2)
    assert StreamPlan.resolve(4, 4, cores=8, oversubscribe=True) == StreamPlan(4, 4)
    for kwargs, message in (({"streams": 0}, "streams must be an integer >= 1 or 'auto'"),
                            ({"streams": "two"}, "streams must be"), ({"streams": 2, "threads": 0}, "threads: expected a positive integer"),
                            ({"streams": 3, "threads": 3}, r"3 x 3 = 9 exceeds the 8 usable cores.*oversubscribe")):
        with pytest.raises(ValueError, match=message):
            StreamPlan.resolve(**kwargs, cores=8)


def test_slots_bound_concurrent_holders():
    slots, peak, lock = StreamSlots(2), [0], threading.Lock()
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        for _ in range(20):
            with slots.hold():
                with lock:
                    peak[0] = max(peak[0], slots.busy)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= peak[0] <= 2 and slots.busy == 0


@pytest.fixture(scope="module")
def images():
    return list(random_images(10, seed=21))


@pytest.mark.parametrize("engine", ["ort", "openvino"])
def test_two_streams_caption_exactly_like_one_in_input_order(varied_model_dir, images, engine):
    pytest.importorskip("openvino") if engine == "openvino" else None
    inputs = images[:4] + [b"not an image"] + images[4:]
    with Captioner.load(varied_model_dir, engine=engine, threads=1) as one, \
            Captioner.load(varied_model_dir, engine=engine, streams=2, threads=1) as two:
        want = one.caption(inputs, beam_size=3, batch_size=3)
        got = two.caption(inputs, beam_size=3, batch_size=3)  # 4 batches over the 2 streams
        assert two.info()["streams"] == 2 and two.info()["threads"] == 1
        if engine == "openvino":
            assert two.engine.describe()["num_streams"] == 2
    def key(c):
        return c.tokens, c.score if c.ok else c.error

    assert [key(c) for c in got] == [key(c) for c in want]
    assert [c.ok for c in got] == [True] * 4 + [False] + [True] * 6  # the unreadable one: its own entry, in place


def test_concurrent_callers_share_the_streams(varied_model_dir, images):
    with Captioner.load(varied_model_dir, streams=2, threads=1) as cap:
        want = [c.tokens for c in cap.caption(images, beam_size=3, batch_size=2)]
        peak, lock, search = [0], threading.Lock(), cap._search

        def watched(*args):  # every search runs inside a held stream: never more than 2 at once
            with lock:
                peak[0] = max(peak[0], cap.slots.busy)
            return search(*args)

        cap._search = watched
        results: list = [None] * 3

        def call(i):
            results[i] = [c.tokens for c in cap.caption(images, beam_size=3, batch_size=2)]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [want] * 3 and peak[0] == 2


def test_bad_stream_values_are_one_clear_error(varied_model_dir):
    with pytest.raises(ValueError, match="streams must be an integer >= 1"):
        Captioner.load(varied_model_dir, streams=0)
    with pytest.raises(ValueError, match="exceeds the .* usable cores"):
        Captioner.load(varied_model_dir, streams=64, threads=64)
