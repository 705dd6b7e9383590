"""fastmerge.pleas.weight_matching (Git Re-Basin weight matching) against a plain scipy loop,
and its align="weights" paths in wsa.interpolation_curve and pleas.merge."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import fastmerge
from fastmerge.pleas import apply_permutation, permutation_groups, weight_matching
from fastmerge.pleas.weight_matching import _Term


def mlp():
    return nn.Sequential(
        nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 12), nn.ReLU(),
        nn.Linear(12, 3),
    )  # fmt: skip


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )  # fmt: skip


class TinyResNet(nn.Module):
    def __init__(self, c=8, h=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, h, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.conv2 = nn.Conv2d(h, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


class MLPBlock(nn.Module):
    """A transformer MLP block on a residual stream, with LayerNorms."""

    def __init__(self, d=8, hidden=16):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln(x))))
        return self.head(self.ln_f(x))


MODELS = {
    "mlp": (mlp, (4, 5)),
    "cnn": (cnn, (2, 3, 6, 6)),
    "resnet": (TinyResNet, (2, 3, 6, 6)),
    "mlp_block": (MLPBlock, (4, 5)),
}


def randomized(factory, seed):
    """A model in float64 with random weights, norm affines and running statistics."""
    torch.manual_seed(seed)
    model = factory().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def setup(kind, seed=0):
    factory, shape = MODELS[kind]
    a = randomized(factory, seed)
    x = torch.randn(*shape, dtype=torch.float64)
    return a, x, permutation_groups(a, x)


def reference(model_a, model_b, spec, max_iter=100, seed=0):
    """Git Re-Basin weight matching written plainly: scipy in a loop over the groups, one
    group at a time, the same order and acceptance rule as fastmerge's."""
    pa = {k: v.detach().numpy() for k, v in model_a.named_parameters()}
    pb = {k: v.detach().numpy() for k, v in model_b.named_parameters()}
    axes = {}
    for g in spec.groups.values():
        for name, dim in g.axes:
            if name in pa:
                axes.setdefault(name, []).append((g.name, dim))
    perm = {g: np.arange(s.size) for g, s in spec.groups.items()}

    def permuted(name, skip_dim=None):
        w = pb[name]
        for g, d in axes[name]:
            if d != skip_dim:
                w = np.take(w, perm[g], axis=d)
        return w

    def total():
        return sum(float((pa[n] * permuted(n)).sum()) for n in axes)

    names = list(spec.groups)
    gen = torch.Generator().manual_seed(seed)
    objective = [total()]
    for _ in range(max_iter):
        order = [names[i] for i in torch.randperm(len(names), generator=gen).tolist()]
        progress = False
        for g in order:
            n = spec.groups[g].size
            cost = np.zeros((n, n))
            for name, dim in spec.groups[g].axes:
                if name not in pa:
                    continue
                wa = np.moveaxis(pa[name], dim, 0).reshape(n, -1)
                wb = np.moveaxis(permuted(name, skip_dim=dim), dim, 0).reshape(n, -1)
                cost += wa @ wb.T
            _, cols = linear_sum_assignment(cost, maximize=True)
            old = cost[np.arange(n), perm[g]].sum()
            new = cost[np.arange(n), cols].sum()
            if new - old > 1e-12 * max(abs(old), abs(new)):
                perm[g] = cols
                progress = True
        objective.append(total())
        if not progress:
            break
    return perm, objective


@pytest.mark.parametrize("kind", list(MODELS))
def test_a_permuted_model_is_recovered_exactly(kind):
    a, x, spec = setup(kind)
    assert len(spec.groups) >= 1
    true = spec.random_perms(torch.Generator().manual_seed(1))
    b = apply_permutation(a, spec, true)
    wm = weight_matching(a, b, spec=spec, seed=3)
    assert wm.converged
    for g, p in true.items():
        assert torch.equal(wm.perm_b[g], torch.argsort(p)), g
    aligned = wm.apply(b)
    for (name, p), q in zip(aligned.state_dict().items(), a.state_dict().values()):
        assert torch.equal(p, q), name  # parameters and running statistics
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), b(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_plain_scipy_reference(kind, seed):
    a, x, spec = setup(kind)
    b = randomized(MODELS[kind][0], 10 + seed)
    wm = weight_matching(a, b, spec=spec, seed=seed)
    perm, objective = reference(a, b, spec, seed=seed)
    for g in spec.groups:
        assert wm.perm_b[g].tolist() == perm[g].tolist(), g
    assert wm.sweeps == len(objective) - 1
    np.testing.assert_allclose(wm.objective, objective, rtol=1e-10)
    # Never decreases; the aligned model computes b's function.
    assert all(n >= o - 1e-10 * abs(o) for o, n in zip(wm.objective, wm.objective[1:]))
    assert wm.objective[-1] > wm.objective[0]
    with torch.no_grad():
        torch.testing.assert_close(wm.apply(b)(x), b(x), rtol=1e-10, atol=1e-10)


def test_max_iter_init_and_the_group_order():
    a, _, spec = setup("mlp")
    b = randomized(mlp, 5)
    one = weight_matching(a, b, spec=spec, max_iter=1, seed=4)
    assert one.sweeps == 1 and len(one.objective) == 2 and len(one.orders) == 1
    gen = torch.Generator().manual_seed(4)
    assert one.orders[0] == tuple(list(spec.groups)[i] for i in torch.randperm(3, generator=gen))
    full = weight_matching(a, b, spec=spec, seed=4)
    again = weight_matching(a, b, spec=spec, seed=4, init=full.perm_b)
    assert again.sweeps == 1 and again.improved == (0,) and again.converged
    assert all(torch.equal(again.perm_b[g], full.perm_b[g]) for g in spec.groups)


def test_running_statistics_follow_but_do_not_enter_the_cost():
    a, x, spec = setup("cnn")
    b = randomized(cnn, 7)
    wm = weight_matching(a, b, spec=spec)
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.mul_(100.0)
    again = weight_matching(a, b, spec=spec)
    assert all(torch.equal(wm.perm_b[g], again.perm_b[g]) for g in spec.groups)
    aligned = again.apply(b)
    g = spec.layers["0"].output
    assert torch.equal(aligned[1].running_mean, b[1].running_mean[again.perm_b[g]])


def test_incremental_cost_update_equals_a_full_gemm():
    torch.manual_seed(0)
    a, b = torch.randn(6, 10, 3, 3, dtype=torch.float64), torch.randn(6, 10, 3, 3).double()
    term = _Term(a, b, 0, [("q", 1)])
    old = torch.randperm(10)
    term.update({"q": old})
    new = old.clone()
    new[[2, 7]] = new[[7, 2]]  # two units moved: the update is a rank-2 correction
    value = term.update({"q": new}).clone()
    full = a.reshape(6, -1) @ b[:, new].reshape(6, -1).T
    torch.testing.assert_close(value, full, rtol=1e-12, atol=1e-12)


def test_bad_input_is_named():
    a, x, spec = setup("mlp")
    other = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 9)).double()
    with pytest.raises(ValueError, match="'2.weight'"):
        weight_matching(a, other, spec=spec)
    small, _, small_spec = setup("cnn")
    with pytest.raises(ValueError, match="does not fit"):
        weight_matching(a, a, spec=small_spec)
    with pytest.raises(ValueError, match="spec or example_input"):
        weight_matching(a, a)
    with pytest.raises(ValueError, match="max_iter"):
        weight_matching(a, a, spec=spec, max_iter=0)
    with pytest.raises(ValueError, match=r"init\['0'\] must be a permutation"):
        weight_matching(a, a, spec=spec, init={"0": torch.zeros(12, dtype=torch.long)})
    with pytest.raises(KeyError, match="not a group"):
        weight_matching(a, a, spec=spec, init={"nope": torch.arange(3)})
    assert weight_matching(a, a, example_input=x).converged


def test_interpolation_curve_align_weights():
    a, x, spec = setup("mlp")
    b = apply_permutation(a, spec, spec.random_perms(torch.Generator().manual_seed(2)))

    def loss(m):
        return {"loss": float((m(x) - a(x)).pow(2).mean())}

    raw = fastmerge.wsa.interpolation_curve(a, b, loss, alphas=3, progress=False)
    aligned = fastmerge.wsa.interpolation_curve(
        a, b, loss, alphas=3, align="weights", align_data=[x], progress=False
    )
    assert raw.barrier("loss") > 1e-3
    assert max(aligned.metrics["loss"]) < 1e-20  # b aligned is a itself: a flat path
    with pytest.raises(ValueError, match="align='weights' needs a batch to trace"):
        fastmerge.wsa.interpolation_curve(a, b, loss, align="weights", progress=False)
    same = fastmerge.wsa.permutation_align(a, b, [x], method="weights")
    assert all(torch.equal(p, q) for p, q in zip(same.parameters(), a.parameters()))


def test_pleas_merge_permute_align_weights():
    a, x, spec = setup("cnn")
    b = randomized(cnn, 3)
    data = [torch.randn(4, 3, 6, 6, dtype=torch.float64)]
    merged = fastmerge.pleas.merge(a, b, data, method="permute", align="weights", reset_bn=False)
    info = merged.fastmerge_info
    assert info["align"] == "weights" and info["cost"] is None
    wm = weight_matching(a, b, spec=spec)
    aligned = wm.apply(b)
    for name, t in merged.named_parameters():  # the average of a and b aligned
        expect = (a.get_parameter(name) + aligned.get_parameter(name)) / 2
        torch.testing.assert_close(t, expect, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="align='weights' needs method='permute'"):
        fastmerge.pleas.merge(a, b, data, method="pleas", align="weights")
    with pytest.raises(ValueError, match="align must be"):
        fastmerge.pleas.merge(a, b, data, method="permute", align="data")


def test_non_finite_weights_are_named():
    a, _, spec = setup("mlp")
    b = randomized(mlp, 1)
    with torch.no_grad():
        b[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model_b's parameter '2.weight' has NaN"):
        weight_matching(a, b, spec=spec)
