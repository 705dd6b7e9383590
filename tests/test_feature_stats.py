"""FeatureStats against float64 references computed from the stacked activations:
streaming in uneven batches, merging partials, every kind, full matrices, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastmerge
from fastmerge import features
from fastmerge.ops.feature_cost import KINDS

from .conftest import backend_params


def expected(xa: torch.Tensor, xb: torch.Tensor, kind: str) -> torch.Tensor:
    """The definition, on the stacked (samples, units) activations, in float64."""
    a, b = xa.double(), xb.double()
    if kind == "inner_product":
        return (a[:, :, None] * b[:, None, :]).mean(0)
    if kind == "neg_sq_distance":
        return -(a[:, :, None] - b[:, None, :]).pow(2).mean(0)
    ca, cb = a - a.mean(0), b - b.mean(0)
    cov = (ca[:, :, None] * cb[:, None, :]).mean(0)
    if kind == "covariance":
        return cov
    scale = torch.outer(ca.pow(2).mean(0).sqrt(), cb.pow(2).mean(0).sqrt())
    return torch.where(scale > 0, cov / scale, torch.zeros_like(cov))


def expected_full(xa: torch.Tensor, xb: torch.Tensor, kind: str) -> torch.Tensor:
    x = torch.cat([xa.double(), xb.double()], dim=1)
    return expected(x, x, kind)


def data(n: int = 600, d_a: int = 7, d_b: int = 5, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(n, d_a, generator=g, dtype=torch.float64) * 1.5 + 0.3
    xb = torch.randn(n, d_b, generator=g, dtype=torch.float64) - 2.0
    k = min(d_a, d_b)
    xb[:, :k] += 0.8 * xa[:, :k].flip(1)
    return xa.to(dtype), xb.to(dtype)


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.dtype == torch.float64 and got.shape == want.shape
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=tol * (1 + scale))


def fastmerge_backends():
    return [pytest.param("reference", "cpu", id="reference"), *backend_params()]


@pytest.mark.parametrize("backend,device", fastmerge_backends())
@pytest.mark.parametrize("full", [False, True])
def test_every_kind_matches_the_stacked_reference(backend, device, full):
    xa, xb = data()
    stats = fastmerge.FeatureStats(full=full, backend=backend)
    stats.update(xa[:250].to(device), xb[:250].to(device))
    stats.update(xa[250:].to(device), xb[250:].to(device))
    assert stats.count == 600 and (stats.d_a, stats.d_b) == (7, 5)
    assert stats.device.type == device
    for kind in KINDS:
        got = stats.cost(kind)
        assert got.device.type == device
        want = expected_full(xa, xb, kind) if full else expected(xa, xb, kind)
        assert_close(got, want, 1e-12)
    torch.testing.assert_close(stats.mean_a.cpu(), xa.mean(0), rtol=0, atol=1e-14)
    torch.testing.assert_close(stats.mean_b.cpu(), xb.mean(0), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reduced_precision_inputs_use_a_float32_gemm(dtype):
    xa, xb = data(n=2000, d_a=33, d_b=20, dtype=dtype)
    stats = fastmerge.FeatureStats().update(xa, xb)
    # The reference sees exactly the values the kernels saw (rounded to `dtype`).
    for kind in KINDS:
        assert_close(stats.cost(kind), expected(xa, xb, kind), 1e-5)


def test_uneven_streaming_equals_one_batch(monkeypatch):
    # Small blocks, unit segments and flushes, so that row blocks, batches and flushes all
    # cut the data and the full Gram is built from many segment pairs (3 + 2 segments).
    monkeypatch.setitem(features.CHUNK_ELEMENTS, "cpu", 13 * 12)
    monkeypatch.setitem(features.FULL_SEGMENT_UNITS, "cpu", 3)
    monkeypatch.setattr(features, "FLUSH_ROWS", 50)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        xa, xb = data(n=1000, dtype=dtype)
        whole = fastmerge.FeatureStats(full=True).update(xa, xb)
        streamed = fastmerge.FeatureStats(full=True)
        bounds = [0, 1, 2, 99, 100, 113, 400, 401, 777, 1000]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            streamed.update(xa[lo:hi], xb[lo:hi])
        streamed.update(xa[:0], xb[:0])  # an empty batch is a no-op
        assert streamed.count == whole.count == 1000
        for kind in KINDS:
            want = expected_full(xa, xb, kind)
            assert_close(streamed.cost(kind), want, tol)
            assert_close(whole.cost(kind), want, tol)
            assert_close(streamed.cost(kind, full=False), expected(xa, xb, kind), tol)


def test_merging_partials_with_different_shifts_is_exact(monkeypatch):
    monkeypatch.setitem(features.FULL_SEGMENT_UNITS, "cpu", 4)
    xa, xb = data(n=900)
    xa[300:600] += 40.0  # a part whose means (and so shifts) are far from the others
    xb[600:] -= 25.0
    # float32 parts still hold unflushed float32 GEMM sums when they are merged.
    for full, dtype, tol in (
        (False, torch.float64, 1e-12),
        (True, torch.float64, 1e-12),
        (True, torch.float32, 1e-5),
    ):
        xa_t, xb_t = xa.to(dtype), xb.to(dtype)
        parts = [
            fastmerge.FeatureStats(full=full).update(xa_t[lo:hi], xb_t[lo:hi])
            for lo, hi in ((0, 300), (300, 600), (600, 900))
        ]
        assert not torch.equal(parts[0].shift_a, parts[1].shift_a)
        merged = fastmerge.FeatureStats(full=full).merge(parts[1])  # into empty: adopts
        merged.merge(parts[2]).merge(parts[0]).merge(fastmerge.FeatureStats(full=full))
        assert merged.count == 900
        ref = expected_full if full else expected
        for kind in KINDS:
            assert_close(merged.cost(kind), ref(xa_t, xb_t, kind), tol)
        # The parts are unchanged by being merged.
        assert parts[1].count == 300
        want = ref(xa_t[300:600], xb_t[300:600], "covariance")
        assert_close(parts[1].covariance(), want, tol)


def test_no_cancellation_when_mean_dwarfs_std():
    g = torch.Generator().manual_seed(5)
    xa = torch.randn(5000, 6, generator=g, dtype=torch.float64) * 0.01 + 1e4
    xb = torch.randn(5000, 4, generator=g, dtype=torch.float64) * 3 - 5e5
    xb[:, :3] += 100 * (xa[:, :3] - 1e4)
    stats = fastmerge.FeatureStats().update(xa[:1000], xb[:1000]).update(xa[1000:], xb[1000:])
    assert_close(stats.correlation(), expected(xa, xb, "correlation"), 1e-10)
    want = expected(xa, xb, "covariance")
    torch.testing.assert_close(stats.covariance(), want, rtol=1e-9, atol=1e-12)
    # float32 activations: 1e4 +- 0.05 keeps ~3 significant digits of the spread in float32,
    # and the reference sees the same rounded values.
    xa32, xb32 = (
        (xa[:, :3] * 0 + 1e4 + torch.randn(5000, 3, generator=g) * 0.05).float(),
        xb.float(),
    )
    stats32 = fastmerge.FeatureStats().update(xa32, xb32)
    assert_close(stats32.correlation(), expected(xa32, xb32, "correlation"), 1e-5)


def test_constant_units_have_zero_correlation_not_nan():
    xa, xb = data(n=300)
    xa[:, 2] = 0.1  # not exactly representable: its float32 shift is not exactly 0.1
    xb[:, 0] = -7.0
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        stats = fastmerge.FeatureStats(full=True).update(xa.to(dtype), xb.to(dtype))
        corr = stats.correlation()
        assert not corr.isnan().any()
        assert (corr[2] == 0).all() and (corr[:, 2] == 0).all()
        assert (corr[7] == 0).all() and (corr[:, 7] == 0).all()
        cov = stats.covariance()
        assert cov[2].abs().max() <= 1e-12 and cov[7].abs().max() <= 1e-12


def test_nan_stays_in_its_unit():
    xa, xb = data(n=300)
    xa[7, 1] = float("nan")  # in the first block, so its shift is NaN too
    xb[250, 3] = float("nan")  # in a later batch
    stats = fastmerge.FeatureStats(full=True).update(xa[:200], xb[:200])
    stats.update(xa[200:], xb[200:])
    for kind in KINDS:
        cost = stats.cost(kind, full=False)
        bad = torch.zeros_like(cost, dtype=torch.bool)
        bad[1, :] = True
        bad[:, 3] = True
        assert torch.equal(cost.isnan(), bad), kind
        assert_close(cost[~bad].reshape(6, 4), expected(xa, xb, kind)[~bad].reshape(6, 4), 1e-12)


def test_conv_activations_are_samples_times_positions():
    g = torch.Generator().manual_seed(2)
    xa = torch.randn(6, 4, 5, 3, generator=g, dtype=torch.float64)  # (N, C, H, W)
    xb = torch.randn(6, 3, 5, 3, generator=g, dtype=torch.float64) + xa[:, :3]
    stats = fastmerge.FeatureStats().update(xa, xb)
    assert stats.count == 6 * 5 * 3 and (stats.d_a, stats.d_b) == (4, 3)
    flat_a = xa.permute(0, 2, 3, 1).reshape(-1, 4)
    flat_b = xb.permute(0, 2, 3, 1).reshape(-1, 3)
    for kind in KINDS:
        assert_close(stats.cost(kind), expected(flat_a, flat_b, kind), 1e-12)
    # 3-D (N, C, L) too, and channels-last memory is fine.
    stats3 = fastmerge.FeatureStats().update(xa.flatten(2), xb.flatten(2))
    assert_close(stats3.correlation(), stats.correlation(), 1e-14)
    cl = fastmerge.FeatureStats().update(
        xa.to(memory_format=torch.channels_last), xb.to(memory_format=torch.channels_last)
    )
    assert_close(cl.correlation(), stats.correlation(), 1e-14)


def test_full_blocks_are_the_within_and_cross_blocks():
    xa, xb = data(n=400)
    stats = fastmerge.FeatureStats(full=True).update(xa, xb)
    corr = stats.correlation()
    assert corr.shape == (12, 12)
    assert_close(corr[:7, 7:], stats.correlation(full=False), 1e-15)
    assert_close(corr[7:, :7], stats.correlation(full=False).T, 1e-15)
    assert_close(corr[:7, :7], expected(xa, xa, "correlation"), 1e-12)
    assert_close(corr[7:, 7:], expected(xb, xb, "correlation"), 1e-12)
    torch.testing.assert_close(corr.diagonal(), torch.ones(12, dtype=torch.float64))


def test_state_is_independent_of_the_number_of_samples():
    small = fastmerge.FeatureStats(full=True).update(*data(n=10))
    large = fastmerge.FeatureStats(full=True).update(*data(n=5000))
    sizes = [
        {k: v.numel() for k, v in s.state_dict().items() if isinstance(v, torch.Tensor)}
        for s in (small, large)
    ]
    assert sizes[0] == sizes[1]
    assert sum(sizes[0].values()) == 7 * 7 + 7 * 5 + 5 * 5 + 3 * 12  # aa, ab, bb; 6 vectors


def test_state_dict_round_trip_and_to():
    xa, xb = data(n=100, dtype=torch.float32)
    stats = fastmerge.FeatureStats(full=True).update(xa, xb)
    state = stats.state_dict()
    assert state["count"] == 100 and state["full"] is True
    again = fastmerge.FeatureStats.from_state_dict(state)
    assert_close(again.neg_sq_distance(), stats.neg_sq_distance(), 0)
    moved = stats.to("cpu")
    assert moved is not stats
    assert_close(moved.inner_product(), stats.inner_product(), 0)
    # Streaming on after a round trip works.
    again.update(xa, xb)
    assert again.count == 200


def test_numpy_and_mixed_dtype_batches():
    xa, xb = data(n=200)
    stats = fastmerge.FeatureStats()
    stats.update(xa[:100].float().numpy(), xb[:100].numpy())  # float32 with float64: float64 GEMM
    stats.update(xa[100:].half(), xb[100:].float())
    want_a = torch.cat([xa[:100].float().double(), xa[100:].half().double()])
    want_b = torch.cat([xb[:100], xb[100:].float().double()])
    assert_close(stats.covariance(), expected(want_a, want_b, "covariance"), 1e-6)
    assert isinstance(np.asarray(stats.correlation()), np.ndarray)


def test_bad_input_names_the_argument():
    stats = fastmerge.FeatureStats()
    with pytest.raises(ValueError, match="no samples"):
        stats.correlation()
    with pytest.raises(ValueError, match="N=10.*N=9"):
        stats.update(torch.randn(10, 3), torch.randn(9, 2))
    with pytest.raises(TypeError, match="xa"):
        stats.update(torch.ones(10, 3, dtype=torch.int64), torch.randn(10, 2))
    with pytest.raises(TypeError, match="xb"):
        stats.update(torch.randn(10, 3), [[1.0, 2.0]])
    with pytest.raises(ValueError, match="xa must have shape"):
        stats.update(torch.randn(10), torch.randn(10, 2))
    with pytest.raises(ValueError, match="beyond the unit dimension"):
        stats.update(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 4))
    stats.update(torch.randn(10, 3), torch.randn(10, 2))
    with pytest.raises(ValueError, match="xb has 4 units .* earlier batches had 2"):
        stats.update(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="xa has 2 units"):
        stats.update(torch.randn(10, 2), torch.randn(10, 2))
    with pytest.raises(ValueError, match="kind"):
        stats.cost("cosine")
    with pytest.raises(ValueError, match="full=True"):
        stats.correlation(full=True)
    with pytest.raises(TypeError, match="other"):
        stats.merge(object())
    with pytest.raises(ValueError, match="full"):
        stats.merge(fastmerge.FeatureStats(full=True).update(torch.randn(4, 3), torch.randn(4, 2)))
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        stats.merge(fastmerge.FeatureStats().update(torch.randn(4, 3), torch.randn(4, 5)))
    with pytest.raises(ValueError, match="itself"):
        stats.merge(stats)
    assert stats.count == 10  # failed calls changed nothing
