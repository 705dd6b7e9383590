"""PLeaS merging end to end: a model merged with a permuted copy of itself is itself, budget 2
is the ensemble, widths and FLOPs follow the budget, the result is an ordinary module, the
inputs are untouched, least squares lowers every layer's objective, BatchNorm statistics are
re-estimated, and bad input raises clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn

from fastmerge.pleas import (
    Ensemble,
    apply_permutation,
    layer_costs,
    layouts_for,
    match,
    merge,
    merge_weights,
    permutation_groups,
    recompute_batchnorm,
    relative_flops,
    solve_least_squares,
)
from fastmerge.pleas.least_squares_stage import _layout_features

from .test_groups import MLP, BasicBlock, Bottleneck, ResNet, depthwise_net, randomize, vgg
from .test_matching import batches, lively

_VGG = vgg()  # vgg() defines a new class on every call: copy one instance instead
BUILDERS = {
    "mlp": (lambda: MLP(), (4,)),
    "vgg": (lambda: copy.deepcopy(_VGG), (3, 8, 8)),
    "resnet-basic": (lambda: ResNet(BasicBlock), (3, 8, 8)),
    "resnet-bottleneck": (lambda: ResNet(Bottleneck, planes=(4, 8)), (3, 8, 8)),
}
TINY_RIDGE = 1e-10


def prepared(name, seed=0, data=None):
    """A random float64 model whose BatchNorm statistics are the ones merge re-estimates."""
    make, shape = BUILDERS[name]
    data = batches(shape) if data is None else data
    model = lively(randomize(make(), seed), data)
    with torch.no_grad():  # independent models: different weights too, not just norms
        g = torch.Generator().manual_seed(100 + seed)
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                noise = torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype)
                m.weight.add_(0.3 * m.weight.std() * noise)
    model = lively(model, data)
    recompute_batchnorm(model, data)
    return model.eval(), data


def outputs(model, data):
    with torch.no_grad():
        return torch.cat([model(x) for x in data])


def close(x, y, rtol=1e-6):
    return (x - y).abs().max().item() <= rtol * max(1.0, y.abs().max().item())


# --------------------------------------------------------------------------------------------
# 1. A model and a permuted copy of itself


@pytest.mark.parametrize("method", ["permute", "pleas"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_merging_a_permuted_copy_gives_the_model(name, method):
    model, data = prepared(name)
    spec = permutation_groups(model, data[0][:2])
    model_b = apply_permutation(model, spec, spec.random_perms(torch.Generator().manual_seed(3)))
    merged = merge(model, model_b, data, method=method, budget=1.0, ridge=TINY_RIDGE)
    assert close(outputs(merged, data), outputs(model, data))
    assert merged.fastmerge_info["ratios"] == {g: 0.0 for g in spec.groups}


def test_permute_is_rebasin_then_average():
    a, data = prepared("vgg", 0)
    b, _ = prepared("vgg", 1, data)
    spec = permutation_groups(a, data[0][:2])
    merged = merge(a, b, data, method="permute", reset_bn=False)
    perms = {g: m.perm_b for g, m in match(a, b, data, spec).items()}
    aligned = apply_permutation(b, spec, perms).state_dict()
    for key, t in a.state_dict().items():
        if t.is_floating_point():
            assert torch.allclose(merged.state_dict()[key], (t + aligned[key]) / 2), key


# --------------------------------------------------------------------------------------------
# 2. Budget 2: both models side by side


@pytest.mark.parametrize("method", ["pleas", "zipit"])
@pytest.mark.parametrize("name", ["mlp-noln", "vgg", "resnet-basic"])
def test_budget_two_is_the_ensemble(name, method):
    if name == "mlp-noln":  # LayerNorm normalizes over the merged width: not an ensemble
        data = batches((4,))
        a, b = (
            randomize(
                nn.Sequential(
                    nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)
                ),
                seed,
            )
            for seed in (0, 1)
        )
    else:
        a, data = prepared(name, 0)
        b, _ = prepared(name, 1, data)
    merged = merge(a, b, data, method=method, budget=2.0, ridge=TINY_RIDGE)
    info = merged.fastmerge_info
    assert set(info["ratios"].values()) == {1.0}
    assert info["relative_flops"] == pytest.approx(2.0)
    ens = outputs(Ensemble(a, b), data)
    assert close(outputs(merged, data), ens, rtol=1e-5)
    assert not close(outputs(a, data), ens, rtol=1e-2)  # the two models really differ


# --------------------------------------------------------------------------------------------
# 3. Widths, zero blocks and FLOPs


@pytest.mark.parametrize("method", ["pleas", "zipit"])
@pytest.mark.parametrize("name", ["resnet-basic", "vgg"])
def test_widths_zero_blocks_and_flops(name, method):
    a, data = prepared(name, 0)
    b, _ = prepared(name, 1, data)
    spec = permutation_groups(a, data[0][:2])
    merged = merge(a, b, data, method=method, budget=1.5)
    info = merged.fastmerge_info
    assert info["relative_flops"] <= 1.5 + 1e-9
    costs = layer_costs(a, spec, data[0])
    assert relative_flops(costs, info["ratios"]) == pytest.approx(info["relative_flops"])
    assert any(r > 0 for r in info["ratios"].values())
    tensors = dict(merged.state_dict())
    for gname, g in spec.groups.items():
        k = round(info["ratios"][gname] * g.size)
        assert info["widths"][gname] == g.size + k
        for axis in g.axes:
            assert tensors[axis.name].shape[axis.dim] == g.size + k, axis
    modules = dict(merged.named_modules())
    checked = 0
    for lname, lg in spec.layers.items():
        if lg.input is None or lg.output is None:
            continue
        kin = round(info["ratios"][lg.input] * spec.groups[lg.input].size)
        kout = round(info["ratios"][lg.output] * spec.groups[lg.output].size)
        if kin and kout:
            w = modules[lname].weight
            win, wout = w.shape[1], w.shape[0]
            assert torch.all(w[wout - 2 * kout : wout - kout, win - kin :] == 0), lname
            assert torch.all(w[wout - kout :, win - 2 * kin : win - kin] == 0), lname
            checked += 1
    assert checked or method == "zipit"


# --------------------------------------------------------------------------------------------
# 4. An ordinary module; 5. inputs untouched


def test_ordinary_module_traceable_and_state_dict_round_trip():
    a, data = prepared("mlp", 0)
    b, _ = prepared("mlp", 1, data)
    merged = merge(a, b, data, budget=1.5)
    w1, w2 = merged.fastmerge_info["widths"]["fc1"], merged.fastmerge_info["widths"]["fc2"]
    assert (merged.fc1.out_features, merged.ln1.normalized_shape, merged.fc3.in_features) == (
        w1,
        (w1,),
        w2,
    )
    traced = torch.fx.symbolic_trace(merged)
    fresh = MLP(h1=w1, h2=w2).double().eval()
    fresh.load_state_dict(merged.state_dict())
    x = data[0]
    assert torch.allclose(traced(x), merged(x)) and torch.allclose(fresh(x), merged(x))

    r, rdata = prepared("resnet-basic", 0)
    merged = merge(r, prepared("resnet-basic", 1, rdata)[0], rdata, budget=1.25)
    traced = torch.fx.symbolic_trace(merged)
    copy_ = randomize(copy.deepcopy(merged), seed=7)
    copy_.load_state_dict(merged.state_dict())
    x = rdata[0]
    assert torch.allclose(traced(x), merged(x)) and torch.allclose(copy_(x), merged(x))


@pytest.mark.parametrize("method", ["average", "permute", "zipit", "pleas"])
def test_inputs_unchanged(method):
    a, data = prepared("resnet-basic", 0)
    b, _ = prepared("resnet-basic", 1, data)
    a.train()
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    budget = 1.5 if method in ("zipit", "pleas") else 1.0
    merge(a, b, data, method=method, budget=budget)
    for m, sd in zip((a, b), before):
        for key, t in m.state_dict().items():
            assert torch.equal(t, sd[key]), key
    assert a.training and not b.training


# --------------------------------------------------------------------------------------------
# 6. Least squares lowers the objective


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("name", ["mlp", "vgg"])
def test_least_squares_lowers_the_objective(name, sequential):
    a, data = prepared(name, 0)
    b, _ = prepared(name, 1, data)
    spec = permutation_groups(a, data[0][:2])
    layouts = layouts_for(match(a, b, data, spec), 0.25)
    merged = merge_weights(a, b, spec, layouts)
    fits = solve_least_squares(
        merged, a, b, data, spec, layouts, ridge=TINY_RIDGE, sequential=sequential
    )
    assert list(fits) == list(spec.layers)
    for lname, fit in fits.items():  # the first layer's average is exact already
        assert fit.after <= fit.before + 1e-9, lname
    assert sum(f.after for f in fits.values()) < 0.9 * sum(f.before for f in fits.values())
    if name == "mlp" and not sequential:  # the objective, recomputed directly
        x = torch.cat(data)
        feats = {}
        for mdl, key in ((a, "a"), (b, "b")):
            h = mdl.fc3.register_forward_pre_hook(
                lambda _m, args, k=key: feats.update({k: args[0]})
            )
            with torch.no_grad():
                feats[key + "y"] = mdl(x)
            h.remove()
        x_tilde = _layout_features(feats["a"], feats["b"], layouts["fc2"], -1)
        y_tilde = (feats["ay"] + feats["by"]) / 2
        with torch.no_grad():
            direct = (merged.fc3(x_tilde) - y_tilde).pow(2).sum(1).mean().item()
        assert direct == pytest.approx(fits["fc3"].after, rel=1e-6)


def test_pleas_beats_weight_averaging_on_the_ensemble_targets():
    a, data = prepared("vgg", 0)
    b, _ = prepared("vgg", 1, data)
    ens = outputs(Ensemble(a, b), data)
    errs = {
        method: (outputs(merge(a, b, data, method=method, budget=1.5), data) - ens).pow(2).mean()
        for method in ("zipit", "pleas")
    }
    assert errs["pleas"] < errs["zipit"]


# --------------------------------------------------------------------------------------------
# 7. BatchNorm statistics, metadata, bad input


def test_batchnorm_statistics_are_re_estimated():
    a, data = prepared("vgg", 0)
    b, _ = prepared("vgg", 1, data)
    merged = merge(a, b, data, method="pleas", budget=1.0)
    bn = merged.features[1]
    for m in (a, b):
        assert not torch.allclose(bn.running_mean, m.features[1].running_mean)
    fresh = copy.deepcopy(merged)
    for m in fresh.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(3.0)
    recompute_batchnorm(fresh, data)
    for (key, t), t2 in zip(merged.state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(t, t2), key
    assert merged.training == a.training and bn.momentum == a.features[1].momentum


def test_data_free_metadata_and_iterators():
    a, data = prepared("mlp", 0)
    b, _ = prepared("mlp", 1, data)
    other = [x * 2 + 1 for x in data]
    merged = merge(a, b, iter(other), budget=1.25, data_free=True, allocation="uniform")
    info = merged.fastmerge_info
    assert info["data_free"] and info["method"] == "pleas" and info["allocation"] == "uniform"
    assert info["budget"] == 1.25 and set(info["least_squares"]) == {"fc1", "fc2", "fc3"}
    tuples = [(x, torch.zeros(len(x))) for x in data]
    m1, m2 = merge(a, b, tuples, budget=1.25), merge(a, b, data, budget=1.25)
    assert torch.equal(outputs(m1, data), outputs(m2, data))


def test_not_positive_definite_warning_names_the_layer():
    a, data = prepared("mlp", 0)
    b, _ = prepared("mlp", 1, data)
    zero_col = [torch.cat([x[:, :3], torch.zeros(len(x), 1, dtype=x.dtype)], 1) for x in data]
    with pytest.warns(RuntimeWarning, match="layer 'fc1'"):
        merge(a, b, zero_col, ridge=0.0)


def test_bad_input():
    a, data = prepared("mlp", 0)
    wide = randomize(MLP(h2=9))
    with pytest.raises(ValueError, match=r"'fc2.weight' is \(8, 16\) in model_a and \(9, 16\)"):
        merge(a, wide, data)
    with pytest.raises(ValueError, match="architectures"):
        merge(a, randomize(copy.deepcopy(_VGG)), data)
    for budget in (0.5, 2.5):
        with pytest.raises(ValueError, match=r"budget must be in \[1, 2\]"):
            merge(a, a, data, budget=budget)
    with pytest.raises(ValueError, match="budget must be 1.0"):
        merge(a, a, data, method="average", budget=1.5)
    with pytest.raises(ValueError, match="empty"):
        merge(a, a, [])
    with pytest.raises(ValueError, match="empty"):
        merge(a, a, iter([]))
    with pytest.raises(ValueError, match="method must be one of"):
        merge(a, a, data, method="ties")
    with pytest.raises(ValueError, match="cost must be one of"):
        merge(a, a, data, cost="l1")
    with pytest.raises(ValueError, match="strategy must be one of"):
        merge(a, a, data, budget=1.5, allocation="optimal")
    dw = randomize(depthwise_net())
    img = batches((3, 8, 8), n_batches=1)
    with pytest.raises(NotImplementedError, match=r"module '3' \(Conv2d with groups=8\)"):
        merge(dw, dw, img)
