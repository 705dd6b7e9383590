"""Truncated SVD: exactness at full rank, Eckart-Young optimality, the randomized path,
and rank resolution."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fastmerge.twin.svd import check_rank, resolve_rank, svd_tail, truncated_svd


def _reconstruct(f):
    return f.u * f.s @ f.vh


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (1, 9), (16, 16)])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_full_rank_reconstructs(shape, method):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = truncated_svd(a, min(shape), method=method)
    torch.testing.assert_close(_reconstruct(f), a, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank", [0, 1, 3, 6])
def test_truncation_error_is_the_svd_tail(rank):
    a = torch.randn(12, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = torch.linalg.svdvals(a)
    f = truncated_svd(a, rank, method="exact")
    assert f.u.shape == (12, rank) and f.s.shape == (rank,) and f.vh.shape == (rank, 9)
    error = float(torch.linalg.matrix_norm(a - _reconstruct(f)))
    assert error == pytest.approx(svd_tail(s, rank), rel=1e-10, abs=1e-12)
    # and the factors are the leading singular triplets
    torch.testing.assert_close(f.s, s[:rank])


def test_randomized_close_to_exact_on_low_rank_plus_noise():
    gen = torch.Generator().manual_seed(3)
    m, n, r = 1500, 1200, 20
    signal = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen)
    a = signal + 1e-3 * torch.randn(m, n, generator=gen)
    exact = truncated_svd(a, r, method="exact")
    rand = truncated_svd(a, r, method="randomized", seed=5)
    torch.testing.assert_close(rand.s, exact.s, rtol=1e-4, atol=0)
    err_exact = float(torch.linalg.matrix_norm(a - _reconstruct(exact)))
    err_rand = float(torch.linalg.matrix_norm(a - _reconstruct(rand)))
    assert err_rand <= err_exact * (1 + 1e-3)
    # seeded: the same seed gives the same factors
    again = truncated_svd(a, r, method="randomized", seed=5)
    assert torch.equal(again.vh, rand.vh)


def test_auto_picks_randomized_for_large_matrices(monkeypatch):
    import fastmerge.twin.svd as svd

    calls = []
    real = svd._randomized_svd
    monkeypatch.setattr(svd, "_randomized_svd", lambda *a: calls.append(a[0].shape) or real(*a))
    truncated_svd(torch.randn(40, 30), 3)
    assert calls == []
    monkeypatch.setattr(svd, "EXACT_MAX_SIDE", 16)
    truncated_svd(torch.randn(80, 60), 3)
    assert calls == [(80, 60)]


def test_half_inputs_are_factored_in_float32():
    f = truncated_svd(torch.randn(6, 4).to(torch.bfloat16), 2)
    assert f.u.dtype == torch.float32


def test_resolve_rank():
    assert resolve_rank(0.1, (768, 3072)) == math.ceil(76.8)
    assert resolve_rank(1.0, (5, 9)) == 5
    assert resolve_rank(0.01, (5, 9)) == 1  # at least one
    assert resolve_rank(4, (5, 9)) == 4
    with pytest.warns(UserWarning, match=r"rank 12 is larger than min\(shape\) = 5 of layer.w"):
        assert resolve_rank(12, (5, 9), "layer.w") == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_rank(5, (5, 9))


@pytest.mark.parametrize("bad", [0, -1, 0.0, 1.5, float("nan")])
def test_bad_rank_values(bad):
    with pytest.raises(ValueError, match="rank"):
        check_rank(bad)


@pytest.mark.parametrize("bad", [True, "0.1", None])
def test_bad_rank_types(bad):
    with pytest.raises(TypeError, match="rank must be an int or a float"):
        check_rank(bad)


def test_truncated_svd_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        truncated_svd(torch.randn(3), 1)
    with pytest.raises(ValueError, match="rank must be in"):
        truncated_svd(torch.randn(3, 4), 4)
    with pytest.raises(ValueError, match="method"):
        truncated_svd(torch.randn(3, 4), 1, method="lanczos")
