"""Federated-learning simulation: Dirichlet split, FedAvg weighting, FedProx and WSA clients."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fastmerge
from fastmerge.wsa import fl, fuse_scopes, scope_of


def _problem(n: int = 240, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    return x, (x @ w).argmax(1)


def _model_fn(seed: int = 0):
    def build():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()

    return build


# ---------------------------------------------------------------------------- dirichlet_split


def test_split_covers_every_index_once_and_is_seeded():
    _, y = _problem(500)
    parts = fl.dirichlet_split(y, 7, 0.3, seed=1)
    assert len(parts) == 7
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(500))
    assert all(p.dtype == torch.int64 for p in parts)
    again = fl.dirichlet_split(y.tolist(), 7, 0.3, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(parts, again))
    other = fl.dirichlet_split(y, 7, 0.3, seed=2)
    assert not all(torch.equal(p, q) for p, q in zip(parts, other))


def _dominant_share(parts, y) -> float:
    shares = [torch.bincount(y[p], minlength=4).max() / len(p) for p in parts if len(p)]
    return float(torch.stack(shares).mean())


def test_small_alpha_skews_the_labels():
    y = torch.arange(4).repeat(250)
    skewed = _dominant_share(fl.dirichlet_split(y, 5, 0.05, seed=0), y)
    iid = _dominant_share(fl.dirichlet_split(y, 5, 1000.0, seed=0), y)
    assert skewed > 0.6
    assert iid < 0.32  # 4 balanced classes: 0.25 plus noise


def test_split_min_size_and_bad_input():
    y = torch.arange(4).repeat(30)
    parts = fl.dirichlet_split(y, 6, 0.1, seed=0, min_size=5)
    assert min(len(p) for p in parts) >= 5
    with pytest.raises(ValueError, match="alpha"):
        fl.dirichlet_split(y, 3, 0.0)
    with pytest.raises(ValueError, match="clients"):
        fl.dirichlet_split(y, 0, 1.0)
    with pytest.raises(ValueError, match="1-D"):
        fl.dirichlet_split(y.reshape(2, -1), 3, 1.0)
    with pytest.raises(ValueError, match="integer"):
        fl.dirichlet_split(y.double(), 3, 1.0)
    with pytest.raises(ValueError, match="min_size"):
        fl.dirichlet_split(y, 6, 1.0, min_size=21)


# ---------------------------------------------------------------------------- simulate


@pytest.mark.parametrize("mode", ["plain", "fedprox", "wsa"])
def test_each_mode_runs_and_learns(mode):
    x, y = _problem()
    config = fl.ClientConfig(mode=mode, mu=0.01, strength=0.01, lr=0.2, batch_size=16)
    h = fl.simulate(
        _model_fn(), (x, y), (x, y), clients=3, rounds=3, client=config, alpha=1.0, progress=False
    )
    assert h.rounds == [1, 2, 3]
    assert len(h.accuracy) == len(h.loss) == len(h.extra["train_loss"]) == 3
    assert h.loss[-1] < h.loss[0]
    assert h.final_accuracy == h.accuracy[-1] > 0.5
    assert h.extra["clients"] == [[0, 1, 2]] * 3
    assert sum(h.extra["client_sizes"]) == 240
    json.dumps(h.to_dict())
    assert isinstance(h.model, nn.Module)


def test_fedavg_of_one_full_batch_step_is_centralized_gradient_descent():
    x, y = _problem(100)
    splits = [range(0, 10), range(10, 40), range(40, 100)]  # unequal sizes: weighting matters
    config = fl.ClientConfig(lr=0.5, batch_size=1000)
    h = fl.simulate(
        _model_fn(),
        (x, y),
        (x, y),
        clients=3,
        rounds=1,
        client=config,
        splits=splits,
        progress=False,
    )

    central = _model_fn()()
    nn.functional.cross_entropy(central(x), y).backward()
    with torch.no_grad():
        for p in central.parameters():
            p -= 0.5 * p.grad
    for got, want in zip(h.model.parameters(), central.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    uniform = _model_fn()()  # the same step averaged with equal client weights differs
    steps = []
    for s in splits:
        m = _model_fn()()
        nn.functional.cross_entropy(m(x[list(s)]), y[list(s)]).backward()
        steps.append([p.grad for p in m.parameters()])
    with torch.no_grad():
        for i, p in enumerate(uniform.parameters()):
            p -= 0.5 * sum(g[i] for g in steps) / 3
    gap = max((a - b).abs().max() for a, b in zip(h.model.parameters(), uniform.parameters()))
    assert gap > 1e-4


def test_fedavg_weights_and_integer_buffers():
    a = {"w": torch.zeros(3), "n": torch.tensor(4)}
    b = {"w": torch.full((3,), 4.0), "n": torch.tensor(9)}
    out = fl.fedavg([a, b], [3, 1])
    assert out["w"].tolist() == [1.0, 1.0, 1.0]
    assert int(out["n"]) == 4
    with pytest.raises(ValueError, match="weights"):
        fl.fedavg([a, b], [0, 0])


class _SpyRegularizer(fastmerge.wsa.WeightScopeRegularizer):
    made: list = []

    def __init__(self, module, target, *args, **kwargs):
        super().__init__(module, target, *args, **kwargs)
        _SpyRegularizer.made.append(
            (module, self.target_mean.clone(), self.target_std.clone(), self.strength)
        )


@pytest.mark.parametrize("target", ["fused", "init"])
def test_wsa_clients_are_pulled_toward_the_servers_fused_target(monkeypatch, target):
    monkeypatch.setattr(fl, "WeightScopeRegularizer", _SpyRegularizer)
    _SpyRegularizer.made = []
    x, y = _problem()
    configs = [  # different weight decays make the client scopes differ
        fl.ClientConfig(mode="wsa", strength=0.5, target=target, lr=0.2, weight_decay=wd)
        for wd in (0.0, 0.01, 0.05)
    ]
    h = fl.simulate(
        _model_fn(),
        (x, y),
        (x, y),
        clients=3,
        rounds=3,
        client_configs=configs,
        alpha=0.5,
        progress=False,
    )
    made = _SpyRegularizer.made
    assert len(made) == 9 and {m[3] for m in made} == {0.5}
    sizes = h.extra["client_sizes"]
    initial = scope_of(_model_fn()())
    for r in range(3):
        this_round = made[3 * r : 3 * r + 3]
        if r == 0 or target == "init":
            want = initial
        else:
            previous = [scope_of(m[0]) for m in made[3 * (r - 1) : 3 * r]]
            want = fuse_scopes(previous, sizes)
        for _, mean, std, _ in this_round:
            torch.testing.assert_close(mean, want.mean, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(std, want.std, rtol=1e-12, atol=1e-14)
    assert len(h.extra["target_std"]) == 3
    if target == "fused":  # the fused target moved away from the initial scope
        assert not torch.allclose(made[-1][2], initial.std)


def test_a_client_without_data_is_skipped_with_a_warning():
    x, y = _problem(60)
    splits = [range(0, 30), [], range(30, 60)]
    with pytest.warns(UserWarning, match="client 1 has no training data"):
        h = fl.simulate(
            _model_fn(), (x, y), (x, y), clients=3, rounds=2, splits=splits, progress=False
        )
    assert h.extra["clients"] == [[0, 2], [0, 2]]
    assert h.extra["client_sizes"] == [30, 0, 30]


def test_a_non_positive_fused_sigma_raises():
    def constant_layer():
        model = _model_fn()()
        with torch.no_grad():
            model[0].weight.fill_(0.25)  # sigma 0 for every client when nothing is learned
        return model

    x, y = _problem(60)
    config = fl.ClientConfig(mode="wsa", lr=0.0)
    with pytest.raises(ValueError, match="non-positive sigma for layer '0.weight'"):
        fl.simulate(
            constant_layer, (x, y), (x, y), clients=3, rounds=2, client=config, progress=False
        )
    flat = fastmerge.ScopeStats.from_values([0.0, 0.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="non-positive sigma"):
        fl.fused_target([flat, flat], [1, 1])


def test_fraction_seed_and_datasets():
    x, y = _problem()
    kwargs = dict(clients=10, rounds=2, fraction=0.3, alpha=5.0, progress=False, seed=3)
    h = fl.simulate(_model_fn(), (x, y), (x, y), **kwargs)
    assert [len(c) for c in h.extra["clients"]] == [3, 3]
    again = fl.simulate(_model_fn(), TensorDataset(x, y), TensorDataset(x, y), **kwargs)
    assert again.accuracy == h.accuracy and again.loss == h.loss
    assert again.extra["clients"] == h.extra["clients"]


def test_custom_evaluate_and_bad_arguments():
    x, y = _problem(60)

    def evaluate(model):
        return {"accuracy": 0.5, "margin": 1.0}

    h = fl.simulate(
        _model_fn(), (x, y), (x, y), clients=2, rounds=2, evaluate=evaluate, progress=False
    )
    assert h.accuracy == [0.5, 0.5] and h.extra["margin"] == [1.0, 1.0]
    assert all(v != v for v in h.loss)  # NaN: evaluate reported no loss
    with pytest.raises(ValueError, match="mode"):
        fl.ClientConfig(mode="scaffold")
    with pytest.raises(ValueError, match="lr"):
        fl.ClientConfig(lr=-1.0)
    with pytest.raises(ValueError, match="client_configs has 2 entries for 3 clients"):
        fl.simulate(_model_fn(), (x, y), (x, y), clients=3, client_configs=[fl.ClientConfig()] * 2)
    with pytest.raises(ValueError, match="first dimensions differ"):
        fl.simulate(_model_fn(), (x, y[:10]), (x, y), clients=3)


def test_history_plot(tmp_path):
    pytest.importorskip("matplotlib")
    h = fl.History([1, 2, 3], [0.5, 0.6, 0.7], [1.0, 0.9, 0.8])
    h.plot(tmp_path / "h.png")
    fl.plot_histories({"fedavg": h, "wsa": h}, tmp_path / "both.png")
    for name in ("h.png", "both.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_simulate_on_cuda_matches_cpu():
    x, y = _problem(90)
    config = fl.ClientConfig(mode="wsa", strength=0.1, batch_size=1000)
    kwargs = dict(clients=3, rounds=2, client=config, progress=False)
    cpu = fl.simulate(_model_fn(), (x, y), (x, y), **kwargs)
    gpu = fl.simulate(_model_fn(), (x, y), (x, y), device="cuda", **kwargs)
    assert next(gpu.model.parameters()).is_cuda
    for a, b in zip(cpu.model.parameters(), gpu.model.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-9, atol=1e-9)


def test_a_trailing_single_sample_joins_the_previous_batch_so_batchnorm_trains():
    def bn_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))

    x, y = _problem(33)
    x = x.float()
    splits = [range(0, 17), range(17, 33)]  # 17 = 16 + 1 with batch_size 16
    config = fl.ClientConfig(batch_size=16)
    for data in ((x, y), TensorDataset(x, y)):
        h = fl.simulate(
            bn_model, data, data, clients=2, rounds=1, client=config, splits=splits, progress=False
        )
        assert len(h.accuracy) == 1


def test_dropout_runs_are_seeded_and_leave_the_global_rng_alone():
    def dropout_model():
        return nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 4)).double()

    x, y = _problem(60)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    runs = [
        fl.simulate(dropout_model, (x, y), (x, y), clients=2, rounds=2, seed=s, progress=False)
        for s in (7, 7, 8)
    ]
    assert torch.equal(torch.get_rng_state(), state)
    assert runs[0].loss == runs[1].loss
    assert runs[0].loss != runs[2].loss
