"""The fixed pooling matrices reproduce nn.AdaptiveAvgPool2d exactly (they replace it in encoder.onnx)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from captrt.export.graphs import FixedAdaptiveAvgPool2d, adaptive_pool_matrix

SIZES = [(8, 14), (8, 4), (8, 8), (8, 7), (7, 3), (5, 9)]
EXACT = [(8, 14), (8, 4), (8, 8), (8, 7)]


@pytest.mark.parametrize("n_in,n_out", EXACT)
def test_resnet_grids_have_power_of_two_bins(n_in, n_out):
    # Precondition of the bit-exactness below for the grids the exporter meets at 256x256.
    weights = adaptive_pool_matrix(n_in, n_out, torch.float64)
    assert {round(1 / w) for w in weights[weights > 0].tolist()} <= {1, 2, 4, 8}


@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_matrix_is_the_adaptive_pool_of_each_basis_vector(n_in, n_out):
    # Pooling the one-hot basis gives the linear map column by column: 1/count exactly, both ways.
    basis = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in)  # (batch=n_in, C=1, L=n_in)
    pooled = nn.AdaptiveAvgPool1d(n_out)(basis)  # (n_in, 1, n_out): column j of the map
    expected = pooled[:, 0, :].t()  # (n_out, n_in)
    assert torch.equal(adaptive_pool_matrix(n_in, n_out, torch.float64), expected)
    assert torch.equal(adaptive_pool_matrix(n_in, n_out), expected.float())


@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_fixed_pool_equals_adaptive_pool_2d(n_in, n_out):
    gen = torch.Generator().manual_seed(n_in * 100 + n_out)
    pool = FixedAdaptiveAvgPool2d((n_in, n_in), (n_out, n_out))
    ref = nn.AdaptiveAvgPool2d((n_out, n_out))
    # Small integers: every partial sum is exact in float32, so any summation order gives the same
    # sum; when every bin's weight is a power of two (all the 8 -> {14, 4, 8, 7} cases of a ResNet
    # at 256 px) the scaling is exact too and the results are bit-identical.
    ints = torch.randint(-50, 50, (2, 3, n_in, n_in), generator=gen).float()
    weights = adaptive_pool_matrix(n_in, n_out, torch.float64)
    counts = {round(1 / w) for w in weights[weights > 0].tolist()}
    if all(c & (c - 1) == 0 for c in counts):
        assert torch.equal(pool(ints), ref(ints))
    else:
        torch.testing.assert_close(pool(ints), ref(ints), rtol=1e-6, atol=1e-5)
    # General floats: equal up to float32 rounding of a different summation order.
    x = torch.randn(2, 16, n_in, n_in, generator=gen)
    torch.testing.assert_close(pool(x), ref(x), rtol=1e-6, atol=1e-6)
    # In float64 the difference is at float64 rounding level.
    x64 = x.double()
    pool64 = FixedAdaptiveAvgPool2d((n_in, n_in), (n_out, n_out), torch.float64)
    assert (pool64(x64) - ref(x64)).abs().max() < 1e-14


def test_rectangular_and_overlapping_bins():
    # 8 -> 14 upsamples: bins overlap and have 1 or 2 inputs; rows still average to one.
    m = adaptive_pool_matrix(8, 14, torch.float64)
    assert set(m.sum(dim=1).tolist()) == {1.0}
    assert set((m > 0).sum(dim=1).tolist()) == {1, 2}
    pool = FixedAdaptiveAvgPool2d((8, 6), (14, 3))
    x = torch.randint(-9, 9, (1, 2, 8, 6)).float()
    assert torch.equal(pool(x), nn.AdaptiveAvgPool2d((14, 3))(x))


def test_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        adaptive_pool_matrix(0, 4)
