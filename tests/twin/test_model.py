"""TwinModel: routed forward equals per-sample materialization; top-k, per-batch mode,
router-driven gates, heads, gradients and bad input."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from fastmerge.twin import RoutedLinear, Router, TwinMerger, TwinModel

from .conftest import naive_outputs, perturbed_experts, tiny_net

T = 4


def build(dtype=torch.float64, rank=0.5, **kwargs):
    net = tiny_net(dtype=dtype)
    experts = perturbed_experts(net, T)
    merger = TwinMerger(net, experts, shared_kwargs={"scale": 0.3}, rank=rank, progress=False)
    return net, merger, TwinModel(net, merger, **kwargs)


def random_gates(n, dtype, seed=2, zero_some=False):
    gen = torch.Generator().manual_seed(seed)
    g = torch.softmax(3 * torch.randn(n, T, generator=gen, dtype=dtype), -1)
    if zero_some:
        g[::2, 1] = 0.0
    return g


def test_linears_become_routed_layers():
    net, merger, twin = build()
    routed = [name for name, m in twin.model.named_modules() if isinstance(m, RoutedLinear)]
    assert routed == ["0.up", "0.down", "1.up", "1.down", "2"]
    assert "0.up.bias" in twin.routed_keys and "0.norm.weight" in twin.unrouted_keys
    assert set(twin.model.state_dict()) == set(net.state_dict())  # factors are not state
    assert isinstance(twin.model[0].up, nn.Linear)
    assert type(net[0].up) is nn.Linear  # the user's model is untouched (copy=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("zero_some", [False, True])
def test_routed_forward_equals_per_sample_materialization(dtype, tol, zero_some):
    net, _, twin = build(dtype)
    x = torch.randn(7, 5, 6, dtype=dtype)  # 7 samples of 5 tokens
    g = random_gates(7, dtype, zero_some=zero_some)
    out = twin(x, gates=g)
    expected = torch.cat(naive_outputs(net, twin, [x], g))
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_routed_forward_with_full_rank_matches_each_expert():
    net = tiny_net()
    experts = perturbed_experts(net, T)
    for e in experts:  # route everything: only Linear layers differ between tasks
        for k in list(e):
            if "norm" in k:
                e[k] = net.state_dict()[k]
    twin = TwinModel(net, TwinMerger(net, experts, rank=1.0, progress=False))
    assert twin.unrouted_keys == ()
    x = torch.randn(T, 6, dtype=torch.float64)
    out = twin(x, gates=torch.eye(T, dtype=torch.float64))
    for t in range(T):
        model = copy.deepcopy(net)
        model.load_state_dict(experts[t])
        torch.testing.assert_close(out[t], model(x[t : t + 1])[0], rtol=1e-12, atol=1e-12)


def test_without_gates_the_layers_are_the_shared_model():
    net, merger, twin = build()
    shared = copy.deepcopy(net)
    shared.load_state_dict(merger.shared_state)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(twin.model(x), shared(x), rtol=0, atol=0)
    # uniform one-hot-free gates of zeros also give the shared model
    torch.testing.assert_close(twin(x, gates=torch.zeros(3, T, dtype=torch.float64)), shared(x))


def test_top_k_gates_from_the_router():
    net, merger, _ = build()
    torch.manual_seed(0)
    router = Router(6, T).eval()
    twin = TwinModel(net, merger, router, top_k=2)
    x = torch.randn(5, 6, dtype=torch.float64)
    g = twin.gates(x)
    assert g.shape == (5, T) and ((g > 0).sum(1) == 2).all()
    torch.testing.assert_close(g.sum(1), torch.ones(5))  # in the router's dtype
    # the gates come from the router on the shared model's last hidden layer
    feats = twin.features(x).float()
    dense = torch.softmax(router(feats), -1)
    assert torch.equal(g.argmax(1), dense.argmax(1))
    out = twin(x)
    expected = torch.cat(naive_outputs(net, twin, [x], g))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_per_batch_mode_merges_once_from_the_mean_gate():
    net, merger, twin = build(mode="per_batch")
    x = torch.randn(6, 2, 6, dtype=torch.float64)
    g = random_gates(6, torch.float64)
    model = copy.deepcopy(net)
    model.load_state_dict(twin.reference_state(g.mean(0)))
    torch.testing.assert_close(twin(x, gates=g), model(x), rtol=1e-12, atol=1e-12)
    routed = TwinModel(net, merger)
    assert not torch.allclose(routed(x, gates=g), model(x))  # routing is per sample


def test_gradients_flow_to_inputs_and_weights():
    net, _, twin = build()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    g = random_gates(3, torch.float64).requires_grad_()
    twin(x, gates=g).square().sum().backward()
    assert x.grad is not None and g.grad is not None and g.grad.abs().sum() > 0
    assert twin.model[0].up.weight.grad is not None


def test_heads_per_task():
    net, merger, _ = build()
    heads = [nn.Linear(3, t + 1, dtype=torch.float64) for t in range(T)]
    twin = TwinModel(net, merger, heads=heads)
    x = torch.randn(5, 6, dtype=torch.float64)
    g = torch.eye(T, dtype=torch.float64)[[0, 2, 2, 3, 1]]
    out = twin(x, gates=g)
    assert isinstance(out, list) and [o.shape[0] for o in out] == [1, 3, 3, 4, 2]
    hidden = TwinModel(net, merger)(x, gates=g)
    torch.testing.assert_close(out[1], heads[2](hidden[1]))
    same = TwinModel(net, merger, heads=[nn.Linear(3, 2, dtype=torch.float64) for _ in range(T)])
    stacked = same(x, gates=g, task_ids=torch.tensor([1, 1, 0, 0, 3]))
    assert stacked.shape == (5, 2)
    torch.testing.assert_close(stacked[0], same.heads[1](hidden[0]))


def test_threads_route_independently():
    net, _, twin = build()
    x = torch.randn(4, 6, dtype=torch.float64)
    gates = [random_gates(4, torch.float64, seed=s) for s in range(4)]
    expected = [twin(x, gates=g) for g in gates]
    results = [None] * 4

    def run(i):
        for _ in range(20):
            results[i] = twin(x, gates=gates[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r, e in zip(results, expected):
        torch.testing.assert_close(r, e, rtol=0, atol=0)


def test_bad_input():
    net, merger, twin = build()
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"gates must be \(N, T\) with T = 4 tasks, got shape \(3, 3\)"
    ):
        twin(x, gates=torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"gates must be \(N, T\)"):
        twin(x, gates=torch.ones(T, dtype=torch.float64))
    with pytest.raises(ValueError, match="first dim must be the batch"):
        twin(x, gates=torch.ones(2, T, dtype=torch.float64))
    with pytest.raises(ValueError, match="no router"):
        twin(x)
    with pytest.raises(ValueError, match="router has 3 tasks but the merger 4"):
        TwinModel(net, merger, Router(6, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        TwinModel(net, merger, mode="sample")
    with pytest.raises(ValueError, match="heads has 2 modules for 4 tasks"):
        TwinModel(net, merger, heads=[nn.Identity(), nn.Identity()])
    other = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(
        ValueError, match="the model has key '0.weight', which the merger does not have"
    ):
        TwinModel(other, merger)
