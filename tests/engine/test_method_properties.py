"""Properties of the per-tensor methods, checked on generated tensors: the endpoints and
norms of SLERP, its colinear fallback, model stock on identical experts, breadcrumbs'
exact count, and DARE/DELLA's keep rates, rescale and expected value (random masks are
tested in distribution: within 3 standard deviations)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fastmerge.engine import get_method


def merge(method: str, tensors, shared=None, per_input=None, base_index=0, seed=0, name="w"):
    """`method`'s merge of one tensor, its parameters resolved as the planner does."""
    m = get_method(method)
    per_input = per_input or [{} for _ in tensors]
    task = SimpleNamespace(
        name=name, dtype=tensors[0].dtype, base_index=base_index if m.base != "ignored" else None,
        seed=seed, group=f"tensor {name}", inputs=list(range(len(tensors))),
        shared={p.name: p.default for p in m.parameters if p.scope == "global"} | (shared or {}),
        per_input=[],
    )  # fmt: skip
    for j, own in enumerate(per_input):
        mine = ("model",) if j == task.base_index else ("model", "non_base")
        defaults = {p.name: p.default for p in m.parameters if p.scope in mine}
        task.per_input.append(defaults | own)
    problem = m.check(task) if m.check is not None else None
    assert problem is None, problem
    return m.merge(task, list(tensors), None)


def test_slerp_endpoints_and_unit_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 33, generator=g), torch.randn(4, 33, generator=g)
    torch.testing.assert_close(merge("slerp", [a, b], {"t": 0.0}), a)
    torch.testing.assert_close(merge("slerp", [a, b], {"t": 1.0}), b)
    ua, ub = a / a.norm(), b / b.norm()
    for t in (0.1, 0.5, 0.8):
        mid = merge("slerp", [ua, ub], {"t": t})
        assert mid.norm().item() == pytest.approx(1.0, abs=1e-6)
        # the angle to the base is t times the angle between the endpoints
        theta = math.acos((ua * ub).sum().item())
        assert math.acos((mid * ua).sum().clamp(-1, 1).item()) == pytest.approx(t * theta, abs=1e-5)


def test_slerp_colinear_inputs_fall_back_to_linear():
    a = torch.linspace(1, 2, 50)
    b = 2 * a + 1e-4 * torch.sin(torch.arange(50.0))  # cos θ > 0.9995
    torch.testing.assert_close(merge("slerp", [a, b], {"t": 0.3}), 0.7 * a + 0.3 * b)
    torch.testing.assert_close(merge("nuslerp", [a, 2 * a], per_input=[{"weight": 1.0},
                                                                         {"weight": 3.0}],
                                     base_index=None), 0.25 * a + 0.75 * 2 * a)  # fmt: skip


def test_model_stock_of_identical_experts_is_the_expert():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 16, generator=g)
    expert = base + 0.1 * torch.randn(8, 16, generator=g)
    for wise in (False, True):
        got = merge("model_stock", [base, expert, expert.clone(), expert.clone()],
                    {"filter_wise": wise})  # fmt: skip
        torch.testing.assert_close(got, expert)


@pytest.mark.parametrize("density, gamma", [(0.3, 0.01), (0.5, 0.1), (0.95, 0.1), (0.2, 0.0)])
def test_breadcrumbs_keeps_exactly_the_documented_band(density, gamma):
    n = 1000
    base = torch.zeros(n)
    tau = torch.randperm(n, generator=torch.Generator().manual_seed(2)).float() + 1
    tau *= torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)  # distinct magnitudes, both signs
    got = merge("breadcrumbs", [base, tau], per_input=[{}, {"density": density, "gamma": gamma}])
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    kept = got != 0
    assert kept.sum().item() == target
    ranks = tau.abs().argsort().argsort()  # ascending magnitude rank of each entry
    assert torch.equal(kept, (ranks >= bottom) & (ranks < bottom + target))
    assert torch.equal(got[kept], tau[kept])


def _within_3_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 3 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keep_rate_rescale_and_expected_value(method):
    n, p = 200_000, 0.3
    base = torch.zeros(n)
    tau = torch.rand(n, generator=torch.Generator().manual_seed(3)) + 0.5
    experts = [{}, {"density": p}]
    plain = merge(method, [base, tau], {"rescale": False}, experts)
    kept = plain != 0
    assert _within_3_sigma(kept.sum().item(), n, p)
    assert torch.equal(plain[kept], tau[kept])
    # mergekit's rescale (the default): the kept deltas keep the L1 norm of the delta
    l1 = merge(method, [base, tau], None, experts)
    assert torch.equal(l1 != 0, kept)  # the same mask from the same seed
    assert l1.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)
    # the paper's rule: divide by the density, so that the expected delta is the delta
    paper = merge(method, [base, tau], {"rescale_rule": "density"}, experts)
    torch.testing.assert_close(paper[kept], tau[kept] / p)
    ratio = paper / tau  # 1/p where kept, else 0: mean 1, variance (1 - p) / p
    assert abs(ratio.mean().item() - 1.0) <= 3 * math.sqrt((1 - p) / p / n)


def test_random_masks_are_reproducible_from_the_seed():
    base, tau = torch.zeros(5000), torch.ones(5000)
    experts = [{}, {"density": 0.5}]
    first = merge("dare_linear", [base, tau], None, experts, seed=7)
    assert torch.equal(first, merge("dare_linear", [base, tau], None, experts, seed=7))
    assert not torch.equal(first, merge("dare_linear", [base, tau], None, experts, seed=8))
    assert not torch.equal(first, merge("dare_linear", [base, tau], None, experts, seed=7,
                                        name="other"))  # fmt: skip


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_keep_rates_follow_the_magnitude_ranks(method):
    rows, cols, d, eps = 200, 501, 0.4, 0.2
    base = torch.zeros(rows, cols)
    tau = torch.rand(rows, cols, generator=torch.Generator().manual_seed(4)) + 0.1
    got = merge(method, [base, tau], {"rescale": False}, [{}, {"density": d, "epsilon": eps}])
    kept = got != 0
    assert torch.equal(got[kept], tau[kept])
    n = rows * cols
    assert _within_3_sigma(kept.sum().item(), n, d)  # the mean keep probability is density
    ranks = tau.argsort(1).argsort(1).float() / (cols - 1)  # normalized ascending rank
    for lo, hi in [(0.0, 0.25), (0.75, 1.0001)]:
        band = (ranks >= lo) & (ranks < hi)
        p = d - eps + 2 * eps * ranks[band].mean().item()
        assert _within_3_sigma(kept[band].sum().item(), band.sum().item(), p)
    l1 = merge(method, [base, tau], None, [{}, {"density": d, "epsilon": eps}])
    assert l1.abs().sum().item() == pytest.approx(tau.sum().item(), rel=1e-5)


def test_ties_zero_sum_rules():
    base = torch.zeros(3)
    a = torch.tensor([1.0, 2.0, -1.0])
    b = torch.tensor([-1.0, 1.0, -3.0])
    # entry 0 sums to exactly 0: mergekit elects +, the paper's sgn(0) = 0 keeps nothing
    mergekit = merge("ties", [base, a, b])
    paper = merge("ties", [base, a, b], {"zero_sum": "drop"})
    assert mergekit.tolist() == [1.0, 1.5, -2.0]
    assert paper.tolist() == [0.0, 1.5, -2.0]
