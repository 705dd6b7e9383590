"""wsa_penalty: values and gradients against autograd through a plain per-layer loop."""

from __future__ import annotations

import math

import pytest
import torch

import fastmerge

from ..conftest import backend_params


def _loop_penalty(tensors, mean_t, std_t, divergence, reduction):
    """The obvious implementation: autograd through torch.std_mean per layer."""
    terms = []
    for i, w in enumerate(tensors):
        s, m = torch.std_mean(w.double(), unbiased=False)
        mt, st = float(mean_t[i]), float(std_t[i])
        if divergence == "kl":
            d = math.log(st) - torch.log(s) + (s**2 + (m - mt) ** 2) / (2 * st**2) - 0.5
        elif divergence == "reverse_kl":
            d = torch.log(s) - math.log(st) + (st**2 + (m - mt) ** 2) / (2 * s**2) - 0.5
        else:
            d = (m - mt) ** 2 + (s - st) ** 2
        terms.append(d)
    total = torch.stack(terms).sum()
    return total / len(tensors) if reduction == "mean" else total


def _weights(dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (8,), (4, 3, 3, 3), (1000,)]
    return [
        (torch.randn(*s, generator=g) * 0.2 + 0.05).to(dtype).to(device).requires_grad_()
        for s in shapes
    ]


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "w2"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_value_and_gradient_match_autograd_loop(divergence, reduction):
    ws = _weights()
    mean_t = torch.tensor([0.0, 0.1, -0.05, 0.02], dtype=torch.float64)
    std_t = torch.tensor([0.1, 0.3, 0.2, 0.05], dtype=torch.float64)
    ours = fastmerge.wsa_penalty(
        ws,
        fastmerge.ScopeStats.from_values(mean_t, std_t),
        divergence=divergence,
        reduction=reduction,
    )
    theirs = _loop_penalty(ws, mean_t, std_t, divergence, reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours, ws)
    want = torch.autograd.grad(theirs, ws)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_params())
def test_each_backend_gives_the_reference_gradient(backend, device):
    ws = _weights(torch.float32, device)
    ref_ws = [w.detach().clone().requires_grad_() for w in ws]
    ours = fastmerge.wsa_penalty(ws, (0.0, 0.1), backend=backend)
    ref = fastmerge.wsa_penalty(ref_ws, (0.0, 0.1), backend="reference")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    for g1, g2 in zip(torch.autograd.grad(ours, ws), torch.autograd.grad(ref, ref_ws)):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    ws = [
        w.detach()[:50].requires_grad_() if w.dim() == 1 else w.detach().requires_grad_()
        for w in _weights()
    ]
    for divergence in ("kl", "reverse_kl", "w2"):
        assert torch.autograd.gradcheck(
            lambda *a, d=divergence: fastmerge.wsa_penalty(list(a), (0.02, 0.3), divergence=d),
            ws,
        )


def test_only_tensors_that_require_grad_get_one():
    a = torch.randn(10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64)
    fastmerge.wsa_penalty([a, b], (0.0, 1.0)).backward()
    assert a.grad is not None and b.grad is None


def test_penalty_is_zero_at_the_target():
    w = torch.randn(500, dtype=torch.float64, requires_grad=True)
    target = fastmerge.scope_stats([w.detach()])
    value = fastmerge.wsa_penalty([w], target)
    assert abs(value.item()) < 1e-12
    (grad,) = torch.autograd.grad(value, [w])
    assert grad.abs().max() < 1e-12


@pytest.mark.parametrize(
    "target,error,words",
    [
        ((0.0, 0.0), ValueError, "std must be positive"),
        ((0.0, -1.0), ValueError, "std must be positive"),
        ((0.0, float("nan")), ValueError, "std must be positive"),
        (([0.0, 0.0, 0.0], 1.0), ValueError, "3 entries"),
        ("init", TypeError, "ScopeStats"),
    ],
)
def test_bad_targets_raise(target, error, words):
    with pytest.raises(error, match=words):
        fastmerge.wsa_penalty([torch.ones(3), torch.zeros(2)], target)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="divergence"):
        fastmerge.wsa_penalty([torch.ones(3)], (0, 1), divergence="js")
    with pytest.raises(ValueError, match="reduction"):
        fastmerge.wsa_penalty([torch.ones(3)], (0, 1), reduction="max")
    with pytest.raises(ValueError, match=r"tensors\[1\] is empty"):
        fastmerge.wsa_penalty([torch.ones(3), torch.ones(0)], (0, 1))
    with pytest.raises(ValueError, match="at least one"):
        fastmerge.wsa_penalty([], (0, 1))
