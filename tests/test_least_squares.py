"""LeastSquares (streamed Gram/cross accumulation) and ridge_solve against float64
references from the stacked data and torch.linalg.lstsq."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fastmerge
from fastmerge import LeastSquares, ridge_solve

from .conftest import HAS_CUDA, HAS_TRITON


def _linear_data(n=700, d_in=13, d_out=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    y = x @ w.T + 1.5 + 0.1 * torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _augmented(x):
    return torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_streaming_and_merge_match_the_stacked_data(dtype):
    x, y = _linear_data(dtype=dtype)
    xa = _augmented(x)
    want_g, want_c = xa.T @ xa, xa.T @ y.double()
    stream = LeastSquares(13, 5)
    for first, last in [(0, 1), (1, 98), (98, 98), (98, 400), (400, 700)]:  # uneven, empty
        stream.update(x[first:last], y[first:last])
    left = LeastSquares(13, 5).update(x[:333], y[:333])
    right = LeastSquares(13, 5).update(x[333:], y[333:])
    merged = left.merge(right).merge(LeastSquares(13, 5))
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # float32 GEMM: its rounding
    for ls in (stream, merged):
        assert ls.count == 700 and ls.gram.dtype == torch.float64
        for got, want in ((ls.gram, want_g), (ls.cross, want_c)):
            torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())
        assert torch.equal(ls.gram, ls.gram.T)


def test_leading_dims_are_flattened_and_bias_false_has_no_bias_feature():
    x, y = _linear_data(n=60)
    ls = LeastSquares(13, 5, bias=False).update(x.reshape(4, 15, 13), y.reshape(4, 15, 5))
    torch.testing.assert_close(ls.gram, x.T @ x)
    torch.testing.assert_close(ls.cross, x.T @ y)
    weight, bias = ls.solve(ridge=0.0)
    assert bias is None and weight.shape == (5, 13)


def test_float32_segments_flush_into_float64(monkeypatch):
    monkeypatch.setattr(fastmerge.least_squares, "FLUSH_ROWS", 64)
    monkeypatch.setattr(fastmerge.least_squares, "SEGMENT_UNITS", {"cpu": 4, "cuda": 4})
    x, y = _linear_data(n=500, dtype=torch.float32)
    ls = LeastSquares(13, 5).update(x, y)
    xa = _augmented(x)
    torch.testing.assert_close(ls.gram, xa.T @ xa, rtol=1e-6, atol=1e-6 * 700)


def test_solve_matches_lstsq_and_recovers_the_weights():
    x, y = _linear_data()
    weight, bias = LeastSquares(13, 5).update(x, y).solve(ridge=0.0)
    sol = torch.linalg.lstsq(_augmented(x), y).solution
    torch.testing.assert_close(weight, sol[:13].T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bias, sol[13], rtol=1e-10, atol=1e-10)


def test_residual_within_1e6_of_lstsq_with_float32_data_and_default_ridge():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 64, generator=g)
    y = x @ (torch.randn(32, 64, generator=g) / 8).T + 0.3 * torch.randn(4096, 32, generator=g)
    weight, bias = LeastSquares(64, 32).update(x, y).solve()
    ours = (x.double() @ weight.T + bias - y.double()).norm()
    best = torch.linalg.lstsq(_augmented(x), y.double()).solution
    theirs = (_augmented(x) @ best - y.double()).norm()
    assert abs(ours / theirs - 1) < 1e-6


def _conv_case():
    conv = torch.nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    x = torch.randn(5, 3, 11, 9, dtype=torch.float64)
    y = conv.double()(x).detach() + 0.05 * torch.randn(5, 4, 6, 7, dtype=torch.float64)
    return conv, x, y


@pytest.mark.parametrize(
    "backend",
    [
        None,
        "reference",
        "cpu",
        pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")),
    ],
)
def test_conv_path_matches_explicit_unfold(backend):
    conv, x, y = _conv_case()
    p = F.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1))
    p = _augmented(p.transpose(1, 2).reshape(-1, 18))
    t = y.flatten(2).transpose(1, 2).reshape(-1, 4)
    ls = LeastSquares(18, 4, backend=backend)
    ls.update_conv(x[:2], y[:2], conv).update_conv(x[2:], y[2:], conv)
    assert ls.count == p.shape[0]
    torch.testing.assert_close(ls.gram, p.T @ p, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ls.cross, p.T @ t, rtol=1e-12, atol=1e-10)
    weight, bias = ls.solve(ridge=0.0)
    sol = torch.linalg.lstsq(p, t).solution
    torch.testing.assert_close(weight, sol[:18].T, rtol=1e-9, atol=1e-9)
    same = LeastSquares(18, 4).update_conv(
        x, y, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)
    )
    torch.testing.assert_close(same.gram, ls.gram, rtol=1e-12, atol=1e-10)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_conv_and_linear_on_cuda():
    conv, x, y = _conv_case()
    ls = LeastSquares(18, 4).update_conv(x.cuda(), y.cuda(), conv)
    want = LeastSquares(18, 4).update_conv(x, y, conv)
    torch.testing.assert_close(ls.gram.cpu(), want.gram, rtol=1e-12, atol=1e-10)
    xl, yl = _linear_data(dtype=torch.float32)
    got = LeastSquares(13, 5).update(xl.cuda(), yl.cuda()).solve(ridge=0.0)[0].cpu()
    torch.testing.assert_close(got, LeastSquares(13, 5).update(xl, yl).solve(ridge=0.0)[0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_ridge_solve_matches_normal_equations_batched():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(3, 50, 6, generator=g, dtype=torch.float64)
    ys = torch.randn(3, 50, 4, generator=g, dtype=torch.float64)
    gram, cross = xs.mT @ xs, xs.mT @ ys
    got = ridge_solve(gram, cross, ridge=0.01)
    for layer in range(3):
        lam = 0.01 * gram[layer].trace() / 6
        want = torch.linalg.solve(
            gram[layer] + lam * torch.eye(6, dtype=torch.float64), cross[layer]
        )
        torch.testing.assert_close(got[layer], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ridge_solve(gram[layer], cross[layer], ridge=0.01), got[layer])
    exact = ridge_solve(gram, cross, ridge=0.0)
    torch.testing.assert_close(exact, torch.linalg.lstsq(xs, ys).solution, rtol=1e-10, atol=1e-10)


def test_masked_blocks_are_exactly_zero_and_optimal():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    y = torch.randn(200, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0, 1], [1, 1, 1, 0, 0, 1], [1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]],
        dtype=torch.bool,
    )
    got = ridge_solve(x.T @ x, x.T @ y, ridge=0.0, blocks=mask)
    assert (got.T[~mask] == 0).all()
    for j in range(4):  # each output: lstsq over its allowed inputs only
        allowed = mask[j].nonzero().flatten()
        want = torch.linalg.lstsq(x[:, allowed], y[:, j : j + 1]).solution.flatten()
        torch.testing.assert_close(got[allowed, j], want, rtol=1e-10, atol=1e-10)
    as_list = ridge_solve(
        x.T @ x, x.T @ y, ridge=0.0, blocks=[(slice(0, 2), [0, 1, 2, 5]), ([2], mask[2])]
    )
    torch.testing.assert_close(as_list, got, rtol=0, atol=0)
    per_layer = ridge_solve(
        torch.stack([x.T @ x] * 2), torch.stack([x.T @ y] * 2), ridge=0.0,
        blocks=torch.stack([mask, torch.ones_like(mask)]),
    )  # fmt: skip
    torch.testing.assert_close(per_layer[0], got, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_layer[1], ridge_solve(x.T @ x, x.T @ y, ridge=0.0))


def _partial_layout_blocks(merged: int, only: int) -> list:
    """PLeaS' zero cross blocks over inputs [merged | only-A | only-B] (outputs likewise)."""
    a = list(range(merged, merged + only))
    b = list(range(merged + only, merged + 2 * only))
    return [(a, list(range(merged + only))), (b, list(range(merged)) + b)]


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_blocks_sharing_leading_inputs_match_separate_solves(ridge):
    # The shared-factor path (one factorization, Schur complements for the inputs after
    # the common prefix) must equal solving each block's own normal equations.
    g = torch.Generator().manual_seed(5)
    merged, only = 7, 3
    d = merged + 2 * only
    x = torch.randn(3, 120, d, generator=g, dtype=torch.float64)
    y = torch.randn(3, 120, d, generator=g, dtype=torch.float64)
    gram, cross = x.mT @ x, x.mT @ y
    blocks = _partial_layout_blocks(merged, only)
    got = ridge_solve(gram, cross, ridge=ridge, blocks=blocks)
    for layer in range(3):
        lam = ridge * float(gram[layer].trace()) / d
        for outputs, allowed in [*blocks, (list(range(merged)), list(range(d)))]:
            sub = gram[layer][allowed][:, allowed] + lam * torch.eye(len(allowed)).double()
            want = torch.linalg.solve(sub, cross[layer][allowed][:, outputs])
            torch.testing.assert_close(got[layer][allowed][:, outputs], want)
            banned = sorted(set(range(d)) - set(allowed))
            assert (got[layer][banned][:, outputs] == 0).all()


def test_blocks_whose_union_is_singular_are_solved_separately_without_warning():
    # only-B duplicates only-A: the whole Gram is singular, every block's is not.
    g = torch.Generator().manual_seed(6)
    merged, only = 4, 2
    x = torch.randn(80, merged + only, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:, merged:]], dim=1)
    y = torch.randn(80, merged + 2 * only, generator=g, dtype=torch.float64)
    (_, allowed_a), block_b = _partial_layout_blocks(merged, only)
    blocks = [(list(range(merged + only)), allowed_a), block_b]  # no output uses all inputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ridge_solve(x.T @ x, x.T @ y, ridge=0.0, blocks=blocks)
    for outputs, allowed in blocks:
        want = torch.linalg.lstsq(x[:, allowed], y[:, outputs]).solution
        torch.testing.assert_close(got[allowed][:, outputs], want, rtol=1e-9, atol=1e-9)


def test_least_squares_solve_with_a_mask_keeps_the_bias():
    x, y = _linear_data()
    mask = torch.zeros(5, 13, dtype=torch.bool)
    mask[:, :4] = True
    weight, bias = LeastSquares(13, 5).update(x, y).solve(ridge=0.0, blocks=mask)
    assert (weight[:, 4:] == 0).all()
    want = torch.linalg.lstsq(_augmented(x[:, :4]), y).solution
    torch.testing.assert_close(weight[:, :4], want[:4].T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bias, want[4], rtol=1e-10, atol=1e-10)


def test_not_positive_definite_falls_back_with_a_warning():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:, :1]], dim=1)  # duplicate column: rank 3 of 4
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    good = torch.randn(30, 4, generator=g, dtype=torch.float64)
    gram = torch.stack([good.T @ good, x.T @ x])
    cross = torch.stack([good.T @ y, x.T @ y])
    with pytest.warns(RuntimeWarning, match=r"layer\(s\) \[1\], block 0"):
        got = ridge_solve(gram, cross, ridge=0.0)
    want = torch.linalg.pinv(x) @ y  # the minimum-norm least-squares solution
    torch.testing.assert_close(got[1], want, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(got[0], torch.linalg.solve(gram[0], cross[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ridge_solve(gram, cross, ridge=1e-3)  # the ridge makes it positive definite


def test_bad_input_names_the_argument():
    ls = LeastSquares(3, 2)
    with pytest.raises(ValueError, match="no samples"):
        ls.solve()
    with pytest.raises(ValueError, match="d_in=3"):
        ls.update(torch.randn(5, 4), torch.randn(5, 2))
    with pytest.raises(ValueError, match="d_out=2"):
        ls.update(torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="leading dimensions"):
        ls.update(torch.randn(5, 3), torch.randn(4, 2))
    with pytest.raises(TypeError, match="x must be a floating"):
        ls.update(torch.ones(5, 3, dtype=torch.int64), torch.randn(5, 2))
    with pytest.raises(ValueError, match="d_in"):
        LeastSquares(0, 2)
    with pytest.raises(ValueError, match="merge"):
        ls.merge(LeastSquares(3, 2, bias=False))
    with pytest.raises(ValueError, match="groups=1"):
        LeastSquares(9, 4).update_conv(torch.randn(1, 2, 5, 5), torch.randn(1, 4, 3, 3),
                                       torch.nn.Conv2d(2, 4, 3, groups=2))  # fmt: skip
    with pytest.raises(ValueError, match="d_in=10"):
        LeastSquares(10, 4).update_conv(torch.randn(1, 2, 5, 5), torch.randn(1, 4, 3, 3),
                                        kernel_size=3)  # fmt: skip
    with pytest.raises(ValueError, match="y must have shape"):
        LeastSquares(18, 4).update_conv(torch.randn(1, 2, 5, 5), torch.randn(1, 4, 5, 5),
                                        kernel_size=3)  # fmt: skip
    gram, cross = torch.eye(3), torch.ones(3, 2)
    with pytest.raises(ValueError, match="ridge"):
        ridge_solve(gram, cross, ridge=-1.0)
    with pytest.raises(ValueError, match="cross"):
        ridge_solve(gram, torch.ones(4, 2))
    with pytest.raises(ValueError, match="gram must be square"):
        ridge_solve(torch.ones(3, 2), torch.ones(3, 2))
    with pytest.raises(TypeError, match="gram"):
        ridge_solve(gram.long(), cross)
    with pytest.raises(ValueError, match="blocks"):
        ridge_solve(gram, cross, blocks=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"blocks\[1\]"):
        ridge_solve(gram, cross, blocks=[([0], [0]), ([0, 1], [1])])
