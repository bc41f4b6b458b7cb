"""Percentiles and peak-RSS bookkeeping (no assertion on time)."""

from __future__ import annotations

import numpy as np
import pytest

from captrt.bench.measure import PeakRss, peak_rss_mb, percentile, summarize


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_summarize_fields_and_order():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["p50"] == 3.0 and s["n"] == 5 and s["mean"] == 3.0
    assert s["p50"] <= s["p90"] <= s["p99"] <= 5.0
    empty = summarize([])
    assert empty["p50"] is None and empty["n"] == 0


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def test_peak_rss_sees_an_allocation_and_resets_per_block():
    baseline = peak_rss_mb()
    assert baseline > 0
    with PeakRss() as big:
        block = np.ones(200 * (1 << 20) // 8)  # 200 MB, every page touched
        del block
    assert big.mb is not None and big.mb >= 150
    with PeakRss() as small:
        pass
    if small.scope != "config":
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    # The second block allocated nothing: its peak must not include the first block's 200 MB.
    assert small.mb < big.mb - 100


def test_other_cpu_subtracts_this_process(monkeypatch):
    from captrt.bench.machine import OtherCpu

    real = OtherCpu()
    sum(i * i for i in range(200_000))
    value = real.cores()
    assert value is None or value >= 0.0
    samples = iter([(100.0, 10.0, 1000.0), (103.0, 11.5, 1002.0)])  # (system busy s, own cpu s, wall s)
    monkeypatch.setattr(OtherCpu, "_sample", staticmethod(lambda: next(samples)))
    assert OtherCpu().cores() == 0.75  # (3.0 - 1.5) / 2.0
