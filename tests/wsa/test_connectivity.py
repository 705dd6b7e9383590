"""Mode connectivity: interpolate, interpolation_curve, Curve and permutation alignment."""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch
from torch import nn

import fastmerge
from fastmerge.wsa import Curve, interpolate, interpolation_curve, permutation_align, plot_curves


def _mlp(seed: int, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).double()


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


# ---------------------------------------------------------------------------- interpolate


def test_endpoints_are_the_models_exactly():
    a, b = _mlp(0, bn=True), _mlp(1, bn=True)
    a[1].running_mean.normal_()
    b[1].running_var.uniform_(0.5, 2)
    for alpha, want in ((0.0, a), (1.0, b)):
        got = _tensors(interpolate(a, b, alpha))
        for name, t in _tensors(want).items():
            if t.is_floating_point():
                assert torch.equal(got[name], t), (alpha, name)


def test_midpoint_is_the_average_and_inputs_are_untouched():
    a, b = _mlp(0, bn=True), _mlp(1, bn=True)
    before = {k: v.clone() for k, v in _tensors(a).items()}
    mid = interpolate(a, b, 0.5)
    assert mid is not a
    ta, tb = _tensors(a), _tensors(b)
    for name, t in _tensors(mid).items():
        if t.is_floating_point():
            torch.testing.assert_close(t, (ta[name] + tb[name]) / 2, rtol=0, atol=1e-15)
    for name, t in _tensors(a).items():
        assert torch.equal(t, before[name])


@pytest.mark.parametrize("alpha", [-0.5, 0.3, 1.75])
def test_extrapolation_follows_the_line(alpha):
    a, b = _mlp(0), _mlp(1)
    got = interpolate(a, b, alpha)
    for (name, t), ta, tb in zip(got.named_parameters(), a.parameters(), b.parameters()):
        torch.testing.assert_close(t, ta + alpha * (tb - ta), rtol=0, atol=1e-14, msg=name)


def test_batchnorm_buffers_float_mixed_integer_from_a():
    a, b = _mlp(0, bn=True), _mlp(1, bn=True)
    a[1].running_mean.fill_(1.0)
    b[1].running_mean.fill_(3.0)
    a[1].num_batches_tracked.fill_(7)
    b[1].num_batches_tracked.fill_(100)
    m = interpolate(a, b, 0.25)
    assert torch.allclose(m[1].running_mean, torch.full((16,), 1.5, dtype=torch.float64))
    assert int(m[1].num_batches_tracked) == 7


def test_half_precision_and_models_on_tied_weights():
    a = nn.Linear(4, 4).half()
    b = nn.Linear(4, 4).half()
    m = interpolate(a, b, 0.5)
    assert m.weight.dtype == torch.float16
    want = ((a.weight.float() + b.weight.float()) / 2).half()
    assert torch.equal(m.weight, want)


def test_different_architectures_name_the_parameter():
    a = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    b = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="'2.weight'"):
        interpolate(a, b, 0.5)
    c = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="'3.weight'"):
        interpolation_curve(a, c, lambda m: 0.0, progress=False)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, "0.5", True])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        interpolate(nn.Linear(2, 2), nn.Linear(2, 2), alpha)


# ---------------------------------------------------------------------------- Curve


def test_barrier_of_a_hand_built_curve():
    curve = Curve(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        {"loss": [1.0, 1.5, 2.5, 2.0, 2.0], "accuracy": [0.9, 0.8, 0.5, 0.7, 0.7]},
    )
    # loss line: 1.0, 1.25, 1.5, 1.75, 2.0 -> excess 0, .25, 1.0, .25, 0
    assert curve.barrier("loss") == pytest.approx(1.0)
    # accuracy line: .9, .85, .8, .75, .7 -> drop 0, .05, .3, .05, 0
    assert curve.barrier("accuracy") == pytest.approx(0.3)
    assert curve.barrier("accuracy", higher_is_better=False) == pytest.approx(0.0, abs=1e-12)
    assert curve.endpoints("accuracy") == (0.9, 0.7)
    assert curve.barrier() == curve.barrier("loss")


def test_barrier_of_a_straight_line_is_zero_and_ignores_extrapolated_points():
    alphas = [-0.5, 0.0, 0.5, 1.0, 1.5]
    curve = Curve(alphas, {"loss": [9.0, 1.0, 2.0, 3.0, 9.0]})
    assert curve.barrier("loss") == pytest.approx(0.0, abs=1e-12)


def test_curve_checks():
    with pytest.raises(ValueError, match="3 values for 2 alphas"):
        Curve([0.0, 1.0], {"loss": [1.0, 2.0, 3.0]})
    curve = Curve([0.0, 0.5], {"loss": [1.0, 2.0]})
    with pytest.raises(ValueError, match="alpha=1"):
        curve.barrier("loss")
    with pytest.raises(KeyError, match="accuracy"):
        curve.endpoints("accuracy")
    two = Curve([0.0, 1.0], {"a": [1.0, 2.0], "b": [1.0, 2.0]})
    with pytest.raises(ValueError, match="name one"):
        two.barrier(None)


def test_to_dict_round_trip():
    curve = Curve([0.0, 0.5, 1.0], {"loss": [0.2, 0.9, 0.4]})
    d = curve.to_dict()
    assert d["barrier"]["loss"] == pytest.approx(0.6)
    assert d["endpoints"]["loss"] == [0.2, 0.4]
    assert Curve.from_dict(d) == curve


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    curve = Curve([0.0, 0.5, 1.0], {"loss": [0.2, 0.9, 0.4], "accuracy": [0.9, 0.4, 0.8]})
    curve.plot(tmp_path / "curve.png")
    plot_curves({"plain": curve, "aligned": curve}, tmp_path / "both.png", ["loss"])
    for name in ("curve.png", "both.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.png", "curve.png"]


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"fastmerge\[plot\]"):
        Curve([0.0, 1.0], {"loss": [1.0, 2.0]}).plot(tmp_path / "x.png")


# ---------------------------------------------------------------------------- the curve


def _data(seed: int = 5, batches: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 6, generator=g, dtype=torch.float64) for _ in range(batches)]


def test_curve_records_every_metric_at_every_alpha():
    a, b = _mlp(0), _mlp(1)
    x = _data()[0]
    y = torch.arange(64) % 3

    def evaluate(m):
        out = m(x).detach()
        return {
            "loss": float(nn.functional.cross_entropy(out, y)),
            "accuracy": float((out.argmax(1) == y).double().mean()),
        }

    curve = interpolation_curve(a, b, evaluate, alphas=[0.0, 0.5, 1.0], progress=False)
    assert curve.alphas == [0.0, 0.5, 1.0]
    assert set(curve.metrics) == {"loss", "accuracy"}
    assert curve.metrics["loss"][1] == pytest.approx(evaluate(interpolate(a, b, 0.5))["loss"])
    assert curve.endpoints("loss") == (evaluate(a)["loss"], evaluate(b)["loss"])
    assert len(interpolation_curve(a, b, evaluate, progress=False).alphas) == 21


def test_scalar_evaluate_is_recorded_as_value():
    a, b = _mlp(0), _mlp(1)
    curve = interpolation_curve(a, b, lambda m: float(m[0].weight.sum()), alphas=3, progress=False)
    assert list(curve.metrics) == ["value"]
    assert curve.barrier() == pytest.approx(0.0, abs=1e-9)  # linear in the weights


def test_permutation_alignment_removes_the_barrier_of_a_permuted_copy():
    a = _mlp(0)
    data = _data()
    spec = fastmerge.pleas.permutation_groups(a, data[0])
    g = torch.Generator().manual_seed(3)
    perms = {name: torch.randperm(grp.size, generator=g) for name, grp in spec.groups.items()}
    b = fastmerge.pleas.apply_permutation(a, spec, perms)  # same function, units shuffled
    x = data[0]
    want = a(x).detach()

    def loss(m):
        return {"loss": float((m(x) - want).pow(2).mean())}

    plain = interpolation_curve(a, b, loss, alphas=5, progress=False)
    aligned = interpolation_curve(
        a, b, loss, alphas=5, align="permute", align_data=data, progress=False
    )
    assert plain.endpoints("loss") == pytest.approx((0.0, 0.0), abs=1e-20)
    assert plain.barrier("loss") > 1e-3
    assert aligned.barrier("loss") < 1e-20
    realigned = permutation_align(a, b, data)
    # Units that are dead on every input (ReLU output 0; this model's second hidden layer
    # has two) cannot be told apart by activations: their order is an exact tie of the
    # assignment, which linear_assignment breaks by scipy's rule. Every other unit must
    # come back exactly; the dead ones in any order among themselves.
    h1 = torch.relu(a[0](torch.cat(data)))
    dead = {"0": (h1.amax(0) == 0).nonzero().flatten().tolist()}
    dead["2"] = (torch.relu(a[2](h1)).amax(0) == 0).nonzero().flatten().tolist()
    assert set(spec.groups) == set(dead)
    candidates = []
    for orders in itertools.product(*(itertools.permutations(d) for d in dead.values())):
        perm = {}
        for (name, units), order in zip(dead.items(), orders):
            p = torch.arange(spec.groups[name].size)
            if units:
                p[list(units)] = torch.tensor(order, dtype=torch.long)
            perm[name] = p
        candidates.append(fastmerge.pleas.apply_permutation(a, spec, perm))
    assert any(
        all(torch.equal(tc, tr) for tc, tr in zip(c.parameters(), realigned.parameters()))
        for c in candidates
    )


def test_permutation_align_of_a_list_is_each_pair_aligned():
    a, b, c = _mlp(0), _mlp(1), _mlp(2)
    data = _data()
    both = permutation_align(a, [b, c], data)
    assert isinstance(both, list) and len(both) == 2
    for model, aligned in zip((b, c), both):
        pair = permutation_align(a, model, data)
        assert all(torch.equal(x, y) for x, y in zip(pair.parameters(), aligned.parameters()))
        x = data[0]
        assert torch.allclose(aligned(x), model(x), atol=1e-12)  # the same function


def test_bn_data_re_estimates_statistics_at_every_alpha():
    a, b = _mlp(0, bn=True), _mlp(1, bn=True)
    data = _data(batches=1)
    seen = []

    def evaluate(m):
        h = m[0](data[0])
        seen.append(torch.allclose(m[1].running_mean, h.mean(0)))
        assert not m.training
        return 0.0

    interpolation_curve(a, b, evaluate, alphas=3, bn_data=iter(data), progress=False)
    assert seen == [True, True, True]
    seen.clear()
    with pytest.warns(UserWarning, match="pass bn_data"):
        interpolation_curve(a, b, evaluate, alphas=3, progress=False)
    assert seen == [False, False, False]  # interpolated statistics are not the batch's


def test_align_and_evaluate_checks():
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(ValueError, match="align_data or bn_data"):
        interpolation_curve(a, b, lambda m: 0.0, align="permute", progress=False)
    with pytest.raises(ValueError, match="align must be"):
        interpolation_curve(a, b, lambda m: 0.0, align="rebasin", progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        interpolation_curve(a, b, lambda m: 0.0, alphas=1, progress=False)
    calls = iter([{"loss": 1.0}, {"acc": 1.0}])
    with pytest.raises(ValueError, match="metrics"):
        interpolation_curve(a, b, lambda m: next(calls), alphas=2, progress=False)
    with pytest.raises(TypeError, match="evaluate must return"):
        interpolation_curve(a, b, lambda m: "good", alphas=2, progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_curve_on_cuda_matches_cpu():
    a, b = _mlp(0, bn=True), _mlp(1, bn=True)
    data = _data()

    def loss(m):
        x = data[0].to(next(m.parameters()).device)
        return {"loss": float(m(x).pow(2).mean())}

    cpu = interpolation_curve(a, b, loss, alphas=3, bn_data=data, align="permute", progress=False)
    gpu = interpolation_curve(
        a.cuda(),
        b.cuda(),
        loss,
        alphas=3,
        bn_data=[t.cuda() for t in data],
        align="permute",
        progress=False,
    )
    assert gpu.metrics["loss"] == pytest.approx(cpu.metrics["loss"], rel=1e-9)
