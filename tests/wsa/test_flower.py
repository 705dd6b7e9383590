"""Flower integration: FedWSA + WSAClient in a loopback (in-process) Flower deployment."""

from __future__ import annotations

import concurrent.futures
import importlib
import sys

import pytest
import torch
from torch import nn

import fastmerge
from fastmerge.wsa import fl, fuse_scopes

flwr = pytest.importorskip("flwr")
flower = importlib.import_module("fastmerge.wsa.flower")

TIME_LIMIT_S = 120  # a hung Flower server loop fails the test instead of blocking CI


def _problem(n: int = 150):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return x, (x @ torch.randn(5, 3, generator=g, dtype=torch.float64)).argmax(1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


class _RecordingClient(flower.WSAClient):
    log: list = []

    def fit(self, parameters, config):
        out = super().fit(parameters, config)
        _RecordingClient.log.append((self.last_target, out[1], out[2]))
        return out


def _run(strategy, clients, rounds):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(flower.run_in_process, strategy, clients, rounds)
        return job.result(timeout=TIME_LIMIT_S)


def test_fedwsa_matches_the_simulation_and_sends_the_fused_target():
    x, y = _problem()
    splits = fl.dirichlet_split(y, 3, 0.5, seed=0, min_size=5)
    config = fl.ClientConfig(mode="wsa", strength=0.5, lr=0.3, local_epochs=2, batch_size=1000)
    clients = [
        _RecordingClient(_model(), [(x[p], y[p])], config, test_data=[(x, y)]) for p in splits
    ]
    _RecordingClient.log = []
    initial = [t.numpy().copy() for t in _model().state_dict().values()]
    strategy = flower.FedWSA(
        min_fit_clients=3,
        min_available_clients=3,
        min_evaluate_clients=3,
        initial_parameters=flwr.common.ndarrays_to_parameters(initial),
    )
    history = _run(strategy, clients, 3)

    log = _RecordingClient.log
    assert len(log) == 9
    assert strategy.targets[1] is None
    for r in (2, 3):  # every client of round r trained toward the fusion of round r-1
        previous = log[3 * (r - 2) : 3 * (r - 1)]
        want = fuse_scopes(
            [flower.decode_scope(m[flower.SCOPE_KEY]) for _, _, m in previous],
            [n for _, n, _ in previous],
        )
        for target, _, _ in log[3 * (r - 1) : 3 * r]:
            torch.testing.assert_close(target.mean, want.mean, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(target.std, want.std, rtol=1e-12, atol=1e-15)
    assert len(history.losses_distributed) == 3

    # The same federation in fastmerge's own simulation gives the same server model.
    h = fl.simulate(
        _model, (x, y), (x, y), clients=3, rounds=3, client=config, splits=splits, progress=False
    )
    for got, want in zip(strategy.latest_parameters, h.model.state_dict().values()):
        torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-9, atol=1e-10)


def test_scope_encoding_round_trip_and_errors():
    scope = fastmerge.wsa.scope_of(_model())
    back = flower.decode_scope(flower.encode_scope(scope))
    assert back.names == scope.names
    assert torch.equal(back.mean, scope.mean) and torch.equal(back.std, scope.std)
    with pytest.raises(ValueError, match="not an encoded weight scope"):
        flower.decode_scope("{}")
    with pytest.raises(ValueError, match="fusion"):
        flower.FedWSA(fusion="median")
    flat = fastmerge.ScopeStats.from_values([0.0], [0.0])
    with pytest.raises(ValueError, match="non-positive sigma"):
        flower.FedWSA(initial_target=flat)


def test_fedwsa_needs_the_clients_scopes():
    x, y = _problem(30)

    class Plain(flwr.client.NumPyClient):
        def __init__(self):
            self.client = flower.WSAClient(_model(), [(x, y)])

        def get_parameters(self, config):
            return self.client.get_parameters(config)

        def fit(self, parameters, config):
            params, n, _ = self.client.fit(parameters, config)
            return params, n, {}

    strategy = flower.FedWSA(min_fit_clients=3, min_available_clients=3, fraction_evaluate=0.0)
    with pytest.raises(ValueError, match="reported no 'wsa_scope'"):
        _run(strategy, [Plain(), Plain(), Plain()], 1)


def test_client_fn_and_missing_flower_message(monkeypatch):
    fn = flower.wsa_client_fn(lambda i: flower.WSAClient(_model(), [], fl.ClientConfig()))
    assert isinstance(fn("2"), flwr.client.Client)
    monkeypatch.setitem(sys.modules, "flwr.client", None)
    monkeypatch.delitem(sys.modules, "fastmerge.wsa.flower")
    with pytest.raises(ImportError, match=r"fastmerge\[flower\]"):
        importlib.import_module("fastmerge.wsa.flower")


def test_docstring_examples():
    import doctest

    globs = {"torch": torch, "fastmerge": fastmerge, **vars(flower)}
    tests = doctest.DocTestFinder().find(flower, "fastmerge.wsa.flower", globs=globs)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    assert tests
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
