"""PLeaS matching: a model and a copy with randomly permuted groups are matched back exactly
(every cost kind, several architectures), streaming over batches sums the statistics, partial
layouts have the right sizes, and bad input raises clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastmerge import FeatureStats
from fastmerge.pleas import (
    GroupMatch,
    PartialLayout,
    apply_permutation,
    collect_features,
    match,
    partial_layout,
    permutation_groups,
)
from fastmerge.pleas.matching import COST_KINDS

from .test_groups import MLP, BasicBlock, Bottleneck, ResNet, depthwise_net, randomize, vgg

BUILDERS = {
    "mlp": (lambda: MLP(), (4,)),
    "vgg": (lambda: vgg(), (3, 8, 8)),
    "resnet-basic": (lambda: ResNet(BasicBlock), (3, 8, 8)),
    "resnet-bottleneck": (lambda: ResNet(Bottleneck, planes=(4, 8)), (3, 8, 8)),
    "depthwise": (depthwise_net, (3, 8, 8)),
}


def batches(shape, n_batches=3, n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n,) + shape, dtype=torch.float64, generator=g) for _ in range(n_batches)]


def lively(model, data):
    """BatchNorm statistics of the data itself, so that no ReLU unit is dead on it (two dead
    units would be tied, and no matching could tell them apart)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    x = torch.cat(data)
    with torch.no_grad():
        model(x)
        model.eval()
        for m in model.modules():  # Linear layers: centre each unit's pre-activation
            if isinstance(m, nn.Linear) and m.bias is not None:
                out: list[torch.Tensor] = []
                h = m.register_forward_hook(lambda _m, _a, y, out=out: out.append(y.clone()))
                model(x)
                h.remove()
                m.bias -= out[0].reshape(-1, m.out_features).median(0).values
    return model


def permuted_pair(name, seed=0):
    make, shape = BUILDERS[name]
    data = batches(shape)
    model = lively(randomize(make(), seed), data)
    spec = permutation_groups(model, data[0][:2])
    perms = spec.random_perms(torch.Generator().manual_seed(seed + 10))
    return model, apply_permutation(model, spec, perms), spec, perms, data


# --------------------------------------------------------------------------------------------
# Exact recovery of a hidden permutation


@pytest.mark.parametrize("cost", COST_KINDS)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_recovers_permutation(name, cost):
    model_a, model_b, spec, perms, data = permuted_pair(name)
    matches = match(model_a, model_b, data, spec, cost=cost)
    assert list(matches) == list(spec.groups)
    for gname, m in matches.items():
        assert isinstance(m, GroupMatch) and m.cost == cost
        assert m.size == spec.groups[gname].size
        # b's unit k is a's unit perms[k], so a's unit j is b's unit argsort(perms)[j]
        assert torch.equal(m.perm_b, torch.argsort(perms[gname])), gname
        assert m.misalignment.abs().max() < 1e-8
    # Git Re-Basin convention: permuting b by perm_b gives a back
    aligned = apply_permutation(model_b, spec, {g: m.perm_b for g, m in matches.items()})
    for (n, ta), tb in zip(model_a.state_dict().items(), aligned.state_dict().values()):
        assert torch.equal(ta, tb), n


def test_spec_built_from_first_batch_of_a_generator():
    model_a, model_b, spec, perms, data = permuted_pair("resnet-basic")
    matches = match(model_a, model_b, (x for x in data))  # a one-shot iterator
    assert list(matches) == list(spec.groups)
    for gname, m in matches.items():
        assert torch.equal(m.perm_b, torch.argsort(perms[gname]))


def test_input_target_tuples_and_max_batches():
    model_a, model_b, spec, _, data = permuted_pair("mlp")
    pairs = [(x, torch.zeros(len(x))) for x in data]
    s1 = collect_features(model_a, model_b, pairs, spec, max_batches=2)
    s2 = collect_features(model_a, model_b, data[:2], spec)
    for g in spec.groups:
        assert s1[g].count == s2[g].count == 2 * len(data[0])
        torch.testing.assert_close(s1[g].covariance(), s2[g].covariance(), rtol=0, atol=0)


def test_scores_and_order_of_a_noisy_copy():
    data = batches((4,), n=256)
    model_a = lively(randomize(MLP(), 0), data)
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():  # spoil fc2's units 0..3 in b: they must come last in the order
        g = torch.Generator().manual_seed(5)
        model_b.fc2.weight[:4] += 0.05 * torch.randn(4, 16, dtype=torch.float64, generator=g)
    m = match(model_a, model_b, data, cost="correlation")["fc2"]
    assert torch.equal(m.perm_b, torch.arange(8))
    assert set(m.order[-4:].tolist()) == {0, 1, 2, 3}
    assert torch.all(m.score[m.order][:-1] >= m.score[m.order][1:])
    assert (m.misalignment[:4] > 1e-3).all() and (m.misalignment[4:] < 1e-12).all()


# --------------------------------------------------------------------------------------------
# Streaming and capture points


def test_streaming_over_batches_equals_one_batch():
    model_a, model_b, spec, _, data = permuted_pair("resnet-basic")
    streamed = collect_features(model_a, model_b, data, spec)
    whole = collect_features(model_a, model_b, [torch.cat(data)], spec)
    for g in spec.groups:
        assert streamed[g].count == whole[g].count
        for kind in COST_KINDS:
            torch.testing.assert_close(
                streamed[g].cost(kind), whole[g].cost(kind), rtol=1e-10, atol=1e-12
            )


def test_capture_points_are_the_consumers_inputs():
    """MLP: fc1's group is read at fc2's input, i.e. relu(ln1(fc1(x)))."""
    model_a = randomize(MLP(), 0)
    model_b = randomize(MLP(), 3)
    data = batches((4,))
    spec = permutation_groups(model_a, data[0])
    stats = collect_features(model_a, model_b, data, spec, full=True)
    ref = FeatureStats(full=True)
    for x in data:
        ha = torch.relu(model_a.ln1(model_a.fc1(x)))
        hb = torch.relu(model_b.ln1(model_b.fc1(x)))
        ref.update(ha.detach(), hb.detach())
    assert stats["fc1"].full
    torch.testing.assert_close(stats["fc1"].cost("covariance"), ref.cost("covariance"))
    # ResNet stage: summed over every block input that reads it (and the next stage's reads)
    model, _, spec, _, data = permuted_pair("resnet-basic")
    stats = collect_features(model, model, data[:1], spec)
    n, hw = data[0].shape[0], 4 * 4  # after the stride-2 maxpool
    # layer1.0.conv1, layer1.1.conv1, layer2.0.conv1, layer2.0.downsample.0: all 4x4 inputs
    assert stats["conv1"].count == 4 * n * hw
    # layer2.1.conv1 (2x2 input) and fc (pooled)
    assert stats["layer2.0.conv2"].count == n * 4 + n


def test_modes_restored_and_no_grad():
    model_a, model_b, spec, _, data = permuted_pair("vgg")
    model_a.train()
    model_b.eval()
    model_b.features.train()
    before_b = {n: m.training for n, m in model_b.named_modules()}
    running = model_a.features[1].running_mean.clone()
    match(model_a, model_b, data, spec)
    assert all(m.training for m in model_a.modules())
    assert {n: m.training for n, m in model_b.named_modules()} == before_b
    assert torch.equal(model_a.features[1].running_mean, running)  # eval: stats untouched
    assert not any(p.grad is not None for p in model_a.parameters())


def test_transformer_sequence_inputs_use_the_last_axis():
    from .test_groups import PreNormBlock

    model = randomize(PreNormBlock(), 0)
    x = [torch.randn(6, 5, 16, dtype=torch.float64) for _ in range(2)]
    spec = permutation_groups(model, x[0])
    perms = spec.random_perms(torch.Generator().manual_seed(4))
    matches = match(model, apply_permutation(model, spec, perms), x, spec)
    assert torch.equal(matches["mlp.fc1"].perm_b, torch.argsort(perms["mlp.fc1"]))


# --------------------------------------------------------------------------------------------
# Partial layouts


@pytest.mark.parametrize("d", [1, 7, 16])
def test_partial_layout_sizes_and_disjointness(d):
    g = torch.Generator().manual_seed(d)
    perm_b = torch.randperm(d, generator=g)
    score = torch.randn(d, dtype=torch.float64, generator=g)
    order = torch.argsort(-score)
    m = GroupMatch("g", d, perm_b, score, torch.zeros(d, dtype=torch.float64), order)
    for k in range(d + 1):
        layout = partial_layout(m, k / d)
        assert isinstance(layout, PartialLayout)
        assert layout.n_kept == k and layout.n_merged == d - k and layout.width == d + k
        assert layout.ratio == pytest.approx(k / d)
        a = torch.cat([layout.merged_a, layout.only_a])
        b = torch.cat([layout.merged_b, layout.only_b])
        assert torch.equal(torch.sort(a).values, torch.arange(d))  # disjoint, complete
        assert torch.equal(torch.sort(b).values, torch.arange(d))
        assert torch.equal(layout.merged_b, perm_b[layout.merged_a])
        # the merged pairs are the best-aligned ones
        if 0 < k < d:
            assert score[layout.merged_a].min() >= score[layout.only_a].max()
    # rounding: round half up on the merged count, consistent widths
    assert partial_layout(m, 0.0).width == d and partial_layout(m, 1.0).width == 2 * d


def test_partial_layout_rounding():
    m = GroupMatch(
        "g", 10, torch.arange(10), torch.zeros(10, dtype=torch.float64),
        torch.zeros(10, dtype=torch.float64), torch.arange(10),
    )  # fmt: skip
    assert partial_layout(m, 0.3).n_kept == 3
    assert partial_layout(m, 0.34).n_kept == 3
    assert partial_layout(m, 0.36).n_kept == 4
    assert partial_layout(m, 0.25).n_kept == 2  # merged 7.5 rounds up to 8
    with pytest.raises(ValueError, match="ratio must be in"):
        partial_layout(m, 1.5)
    with pytest.raises(TypeError, match="GroupMatch"):
        partial_layout("g", 0.5)


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs():
    model = randomize(MLP(), 0)
    data = batches((4,))
    spec = permutation_groups(model, data[0])
    with pytest.raises(ValueError, match="empty"):
        match(model, model, [])
    with pytest.raises(ValueError, match="empty"):
        collect_features(model, model, iter([]), spec)
    with pytest.raises(ValueError, match="cost must be one of"):
        match(model, model, data, spec, cost="euclid")
    with pytest.raises(TypeError, match="iterable of input batches"):
        match(model, model, data[0], spec)
    with pytest.raises(ValueError, match="max_batches"):
        collect_features(model, model, data, spec, max_batches=0)
    wider = randomize(MLP(h1=20), 0)
    with pytest.raises(ValueError, match=r"'fc1\.weight' is \(16, 4\) in model_a and \(20, 4\)"):
        match(model, wider, data, spec)
    with pytest.raises(ValueError, match="model_b has no parameter or buffer 'fc1.weight'"):
        match(model, nn.Sequential(nn.Linear(4, 16)), data)
    with pytest.raises(ValueError, match="spec group"):
        collect_features(wider, wider, data, spec)
    with pytest.raises(TypeError, match="PermutationSpec"):
        collect_features(model, model, data, {"fc1": 3})
    nan = [torch.full((8, 4), float("nan"), dtype=torch.float64)]
    with pytest.raises(ValueError, match="not finite"):
        match(model, model, nan, spec)
