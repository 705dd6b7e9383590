"""feature_cost: every backend against the float64 reference, and the reference against
the definitions computed from the activations themselves."""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge.ops.feature_cost import KINDS
from fastmerge.reference.feature_cost import feature_cost as reference

from ..conftest import backend_params

# rows x cols: empty, 1 x 1, odd, and around the Triton tile (32 x 64) and CPU/CUDA blocks.
SHAPES = [(0, 5), (4, 0), (1, 1), (97, 33), (33, 65), (130, 257)]


def _moments(xa: torch.Tensor, xb: torch.Tensor, shift_a=None, shift_b=None):
    """Shifted moments of float64 activations, as FeatureStats accumulates them."""
    shift_a = xa.mean(0) if shift_a is None else shift_a
    shift_b = xb.mean(0) if shift_b is None else shift_b
    da, db = xa - shift_a, xb - shift_b
    return (
        da.T @ db,
        da.sum(0),
        db.sum(0),
        (da * da).sum(0),
        (db * db).sum(0),
        shift_a,
        shift_b,
        xa.shape[0],
    )


def _data(rows: int, cols: int, n: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(n, rows, generator=g, dtype=torch.float64) * 2 + 0.5
    xb = torch.randn(n, cols, generator=g, dtype=torch.float64) * 0.5 - 1
    k = min(rows, cols)
    xb[:, :k] += 0.7 * xa[:, :k]  # some correlated pairs
    return xa, xb


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    assert got.dtype == torch.float64 and got.shape == want.shape
    got, want = got.cpu(), want.cpu()
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~want.isnan()
    scale = want[ok].abs().max().item() if ok.any() else 0.0
    torch.testing.assert_close(got[ok], want[ok], rtol=0, atol=rtol * (1 + scale))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference(backend, device, kind, shape):
    moments = _moments(*_data(*shape))
    want = reference(*moments, kind)
    args = [m.to(device) if isinstance(m, torch.Tensor) else m for m in moments]
    got = fastmerge.ops.feature_cost(*args, kind=kind, backend=backend)
    assert got.device.type == device
    _assert_close(got, want, 1e-13)


@pytest.mark.parametrize("backend,device", backend_params())
def test_constant_units_have_zero_correlation_and_nan_propagates(backend, device):
    xa, xb = _data(6, 7)
    xa[:, 1] = 3.25  # constant unit of model a
    xb[:, 4] = -1e6  # constant unit of model b, far from 0
    moments = list(_moments(xa, xb))
    moments[1] = moments[1].clone()
    moments[1][3] = float("nan")  # a NaN in one row's sum
    args = [m.to(device) if isinstance(m, torch.Tensor) else m for m in moments]
    corr = fastmerge.ops.feature_cost(*args, kind="correlation", backend=backend).cpu()
    assert (corr[1] == 0).all() and (corr[:, 4][[0, 1, 2, 4, 5]] == 0).all()
    assert corr[3].isnan().all()
    assert not corr[[0, 1, 2, 4, 5]].isnan().any()
    assert (corr[[0, 2, 4, 5]].abs() <= 1).all()
    for kind in KINDS:
        got = fastmerge.ops.feature_cost(*args, kind=kind, backend=backend).cpu()
        assert got[3].isnan().all(), kind
        _assert_close(got, reference(*moments, kind), 1e-13)


@pytest.mark.parametrize("backend,device", backend_params())
def test_no_cancellation_when_mean_dwarfs_std(backend, device):
    xa, xb = _data(5, 4, n=400, seed=3)
    xa += 1e6
    xb -= 3e5
    moments = _moments(xa, xb)  # shifts are the means: small shifted values
    args = [m.to(device) if isinstance(m, torch.Tensor) else m for m in moments]
    cov = fastmerge.ops.feature_cost(*args, kind="covariance", backend=backend).cpu()
    corr = fastmerge.ops.feature_cost(*args, kind="correlation", backend=backend).cpu()
    dist = fastmerge.ops.feature_cost(*args, kind="neg_sq_distance", backend=backend).cpu()
    ca, cb = xa - xa.mean(0), xb - xb.mean(0)
    want_cov = ca.T @ cb / 400
    want_corr = want_cov / torch.outer(ca.pow(2).mean(0).sqrt(), cb.pow(2).mean(0).sqrt())
    want_dist = -(xa[:, :, None] - xb[:, None, :]).pow(2).mean(0)
    torch.testing.assert_close(cov, want_cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(corr, want_corr, rtol=0, atol=1e-12)
    torch.testing.assert_close(dist, want_dist, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_matches_the_definitions(kind):
    xa, xb = _data(7, 5, n=300, seed=1)
    n = xa.shape[0]
    # Shifts far from the means: the result must not depend on them.
    moments = _moments(xa, xb, shift_a=xa[0] + 3.0, shift_b=xb[5] - 2.0)
    got = reference(*moments, kind)
    ca, cb = xa - xa.mean(0), xb - xb.mean(0)
    cov = (ca[:, :, None] * cb[:, None, :]).mean(0)
    want = {
        "covariance": cov,
        "correlation": cov / torch.outer(ca.pow(2).mean(0).sqrt(), cb.pow(2).mean(0).sqrt()),
        "inner_product": (xa[:, :, None] * xb[:, None, :]).sum(0) / n,
        "neg_sq_distance": -(xa[:, :, None] - xb[:, None, :]).pow(2).mean(0),
    }[kind]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_accepts_numpy_and_lower_precision_moments():
    moments = _moments(*_data(3, 2))
    as_numpy = [m.numpy() if isinstance(m, torch.Tensor) else m for m in moments]
    got = fastmerge.ops.feature_cost(*as_numpy, kind="covariance")
    _assert_close(got, reference(*moments, "covariance"), 1e-13)
    as_float32 = [m.float() if isinstance(m, torch.Tensor) else m for m in moments]
    got = fastmerge.ops.feature_cost(*as_float32, kind="covariance")
    assert got.dtype == torch.float64


def test_bad_input_names_the_argument():
    cross, sa, sb, qa, qb, ha, hb, n = _moments(*_data(3, 2))
    with pytest.raises(ValueError, match="kind"):
        fastmerge.ops.feature_cost(cross, sa, sb, qa, qb, ha, hb, n, kind="cosine")
    with pytest.raises(ValueError, match="sum_b"):
        fastmerge.ops.feature_cost(cross, sa, sb[:1], qa, qb, ha, hb, n)
    with pytest.raises(ValueError, match="shift_a"):
        fastmerge.ops.feature_cost(cross, sa, sb, qa, qb, ha[:2], hb, n)
    with pytest.raises(ValueError, match="cross"):
        fastmerge.ops.feature_cost(cross[0], sa, sb, qa, qb, ha, hb, n)
    with pytest.raises(TypeError, match="cross"):
        fastmerge.ops.feature_cost(cross.long(), sa, sb, qa, qb, ha, hb, n)
    with pytest.raises(TypeError, match="sumsq_a"):
        fastmerge.ops.feature_cost(cross, sa, sb, [1, 2, 3], qb, ha, hb, n)
    with pytest.raises(ValueError, match="count"):
        fastmerge.ops.feature_cost(cross, sa, sb, qa, qb, ha, hb, 0)
    with pytest.raises(TypeError, match="count"):
        fastmerge.ops.feature_cost(cross, sa, sb, qa, qb, ha, hb, "many")
