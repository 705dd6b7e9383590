"""PLeaS budget allocation: layer FLOPs, relative FLOPs by hand, and every strategy meets the
budget (never above it, within one step of it), grows with it, and greedy spends it on the
badly aligned groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fastmerge.pleas import (
    GroupMatch,
    LayerCost,
    allocate,
    layer_costs,
    match,
    permutation_groups,
    relative_flops,
)
from fastmerge.pleas.allocation import STRATEGIES

from .test_groups import BasicBlock, PreNormBlock, ResNet, depthwise_net, randomize


def mlp(widths=(4, 16, 8, 3)):
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def setup_mlp():
    model = mlp()
    x = torch.randn(5, 4)
    spec = permutation_groups(model, x)
    return model, spec, layer_costs(model, spec, x)


def setup_resnet():
    model = ResNet(BasicBlock)
    x = torch.randn(2, 3, 16, 16)
    spec = permutation_groups(model, x)
    return model, spec, layer_costs(model, spec, x)


def fake_scores(spec, bad=(), seed=0):
    """GroupMatch per group: groups in `bad` are badly aligned (misalignment ~1), others ~0.01."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, grp in spec.groups.items():
        d = grp.size
        mis = torch.rand(d, generator=g, dtype=torch.float64) * (1.0 if name in bad else 0.01)
        order = torch.argsort(mis)  # best (least misaligned) first
        out[name] = GroupMatch(name, d, torch.arange(d), -mis, mis, order)
    return out


def one_unit_steps(spec, ratios):
    """Ratios with one more unit in each group that is not full."""
    for name, grp in spec.groups.items():
        if ratios[name] < 1:
            r = dict(ratios)
            r[name] = (round(ratios[name] * grp.size) + 1) / grp.size
            yield name, r


# --------------------------------------------------------------------------------------------
# FLOPs


def test_layer_costs_mlp_and_conv():
    _, spec, costs = setup_mlp()
    assert costs == {
        "0": LayerCost(4 * 16, None, "0"),
        "2": LayerCost(16 * 8, "0", "2"),
        "4": LayerCost(8 * 3, "2", None),
    }
    model = depthwise_net()
    x = torch.randn(3, 3, 8, 8)
    spec = permutation_groups(model, x)
    costs = layer_costs(model, spec, x)
    assert costs["0"] == LayerCost(3 * 8 * 9 * 64, None, "0")
    assert costs["3"] == LayerCost(8 * 9 * 64, "0", "0", depthwise=True)
    assert costs["6"] == LayerCost(8 * 16 * 64, "0", "6")
    assert costs["10"] == LayerCost(16 * 5, "6", None)
    # depthwise: cost grows as (1 + r), the dense formula would give 1 + 2r - r^2
    total = sum(c.flops for c in costs.values())
    r = 0.5
    expect = (
        costs["0"].flops * (1 + r) + costs["3"].flops * (1 + r)
        + costs["6"].flops * ((1 + r) * 1) + costs["10"].flops
    ) / total  # fmt: skip
    assert relative_flops(costs, {"0": r}) == pytest.approx(expect)


def test_layer_costs_sequence_positions_and_modes():
    model = PreNormBlock()
    model.train()
    x = torch.randn(2, 5, 16)
    spec = permutation_groups(model, x)
    costs = layer_costs(model, spec, x)
    assert costs["mlp.fc1"] == LayerCost(5 * 16 * 32, None, "mlp.fc1")
    assert costs["attn.q"] == LayerCost(5 * 16 * 16, None, None)
    assert all(m.training for m in model.modules())


def test_relative_flops_by_hand():
    _, _, costs = setup_mlp()
    base = 64 + 128 + 24
    assert relative_flops(costs, {}) == 1.0
    assert relative_flops(costs, {"0": 0.0, "2": 0.0}) == 1.0
    assert relative_flops(costs, {"0": 1.0, "2": 1.0}) == pytest.approx(2.0)
    r0, r2 = 0.25, 0.5
    hand = (64 * (1 + r0) + 128 * ((1 + r0) * (1 + r2) - 2 * r0 * r2) + 24 * (1 + r2)) / base
    assert relative_flops(costs, {"0": r0, "2": r2}) == pytest.approx(hand)
    # fc2 at r_out = 1: (1 + r_in) * 2 - 2 r_in = 2 whatever r_in
    assert relative_flops(costs, {"0": 0.0, "2": 1.0}) == pytest.approx((64 + 256 + 48) / base)
    assert relative_flops(costs, {"0": 0.75, "2": 1.0}) == pytest.approx(
        (64 * 1.75 + 256 + 48) / base
    )
    assert relative_flops(costs, {"not-a-group": 0.5}) == 1.0


def test_relative_flops_bad_input():
    _, _, costs = setup_mlp()
    with pytest.raises(ValueError, match=r"ratios\['0'\] must be in \[0, 1\]"):
        relative_flops(costs, {"0": 1.5})
    with pytest.raises(ValueError, match="no FLOPs"):
        relative_flops({}, {})
    with pytest.raises(TypeError, match="LayerCost"):
        relative_flops({"fc": 3.0}, {})


# --------------------------------------------------------------------------------------------
# Strategies


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("setup", [setup_mlp, setup_resnet], ids=["mlp", "resnet"])
def test_strategies_meet_budget_and_are_monotone(strategy, setup):
    _, spec, costs = setup()
    scores = fake_scores(spec, bad=list(spec.groups)[::2])
    previous = None
    for budget in [1.0, 1.05, 1.2, 1.33, 1.5, 1.7, 1.9, 1.99, 2.0]:
        ratios = allocate(spec, costs, budget, strategy, scores=scores)
        assert set(ratios) == set(spec.groups)
        for name, r in ratios.items():  # whole units
            d = spec.groups[name].size
            assert 0 <= r <= 1 and math.isclose(r * d, round(r * d), abs_tol=1e-9)
        value = relative_flops(costs, ratios)
        assert value <= budget + 1e-12
        steps = dict(one_unit_steps(spec, ratios))
        if strategy == "stagewise" and steps:
            # one more unit of the partial group (the latest one not kept whole) would not fit
            partial = [n for n in spec.groups if n in steps][-1]
            assert relative_flops(costs, steps[partial]) > budget
        if strategy == "greedy" and budget < 2.0:
            # ... within the cost of one unit of some group
            worst = max(relative_flops(costs, r) - value for r in steps.values())
            assert budget - value <= worst + 1e-12
        if previous is not None:
            assert all(ratios[n] >= previous[n] for n in ratios), (budget, ratios, previous)
        previous = ratios
    assert all(r == 0 for r in allocate(spec, costs, 1.0, strategy, scores=scores).values())
    assert all(r == 1 for r in allocate(spec, costs, 2.0, strategy, scores=scores).values())


@pytest.mark.parametrize("setup", [setup_mlp, setup_resnet], ids=["mlp", "resnet"])
def test_uniform_is_the_largest_shared_ratio(setup):
    _, spec, costs = setup()
    sizes = {n: g.size for n, g in spec.groups.items()}
    for budget in [1.1, 1.37, 1.8]:
        ratios = allocate(spec, costs, budget)
        # every group keeps floor(r d) units of one shared r ...
        shared = max(ratios.values())
        for n, d in sizes.items():
            assert ratios[n] == math.floor(shared * d + 1e-9) / d
        # ... and the next value of r where some group gains a unit exceeds the budget
        nxt = min(
            (math.floor(shared * d + 1e-9) + 1) / d for n, d in sizes.items() if ratios[n] < 1
        )
        over = {n: math.floor(nxt * d + 1e-9) / d for n, d in sizes.items()}
        assert relative_flops(costs, over) > budget


def test_stagewise_keeps_late_groups_and_merges_early_ones():
    _, spec, costs = setup_resnet()
    ratios = allocate(spec, costs, 1.3, "stagewise")
    order = list(spec.groups)  # graph order is depth order for this ResNet
    values = [ratios[n] for n in order]
    # a run of zeros, at most one partial group, then ones
    assert values == sorted(values)
    assert sum(0 < v < 1 for v in values) <= 1
    assert values[-1] == 1.0 and values[0] == 0.0


def test_greedy_prefers_badly_aligned_groups():
    _, spec, costs = setup_mlp()
    for bad in ("0", "2"):
        scores = fake_scores(spec, bad=[bad])
        ratios = allocate(spec, costs, 1.1, "greedy", scores=scores)
        good = "2" if bad == "0" else "0"
        assert ratios[bad] > 0 and ratios[good] == 0, ratios


def test_greedy_with_real_matches_and_tensor_scores():
    torch.manual_seed(0)
    model_a = randomize(mlp((4, 32, 32, 3)), 0)
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():  # b's second hidden layer is unrelated to a's
        model_b[2].weight.copy_(torch.randn(32, 32, dtype=torch.float64) / 4)
        model_b[4].weight.copy_(torch.randn(3, 32, dtype=torch.float64) / 4)
    x = [torch.randn(128, 4, dtype=torch.float64) for _ in range(2)]
    spec = permutation_groups(model_a, x[0])
    matches = match(model_a, model_b, x, spec)
    assert matches["0"].misalignment.max() < 1e-9  # the first layer is shared
    assert matches["2"].misalignment.mean() > 0.1
    costs = layer_costs(model_a, spec, x[0])
    ratios = allocate(spec, costs, 1.2, "greedy", scores=matches)
    assert ratios["2"] > 0 and ratios["0"] == 0
    as_tensors = {n: m.misalignment for n, m in matches.items()}
    assert allocate(spec, costs, 1.2, "greedy", scores=as_tensors)["2"] == ratios["2"]


def test_budget_above_reachable_maximum_warns():
    model = PreNormBlock()
    x = torch.randn(2, 5, 16)
    spec = permutation_groups(model, x)
    costs = layer_costs(model, spec, x)
    top = relative_flops(costs, {"mlp.fc1": 1.0})
    assert 1.0 < top < 2.0  # the attention projections have no permuted side
    with pytest.warns(UserWarning, match="above the largest reachable"):
        assert allocate(spec, costs, 2.0) == {"mlp.fc1": 1.0}
    assert allocate(spec, costs, top) == {"mlp.fc1": 1.0}
    r = allocate(spec, costs, (1 + top) / 2)["mlp.fc1"]
    assert r == pytest.approx(0.5, abs=1 / 32)


def test_allocate_bad_input():
    _, spec, costs = setup_mlp()
    for budget in (0.99, 2.01, float("nan"), -1):
        with pytest.raises(ValueError, match=r"budget must be in \[1, 2\]"):
            allocate(spec, costs, budget)
    with pytest.raises(TypeError, match="budget must be a real number"):
        allocate(spec, costs, "1.5")
    with pytest.raises(ValueError, match="strategy must be one of"):
        allocate(spec, costs, 1.5, "qp")
    with pytest.raises(ValueError, match="needs scores"):
        allocate(spec, costs, 1.5, "greedy")
    with pytest.raises(ValueError, match="no entry for group '2'"):
        allocate(spec, costs, 1.5, "greedy", scores={"0": torch.zeros(16)})
    with pytest.raises(ValueError, match="1-D float tensor of 16"):
        allocate(spec, costs, 1.5, "greedy", scores={"0": torch.zeros(3), "2": torch.zeros(8)})
    bad = dict(costs, extra=LayerCost(1.0, "nope", None))
    with pytest.raises(ValueError, match="group 'nope', which is not a group of spec"):
        allocate(spec, bad, 1.5)
