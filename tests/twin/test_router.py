"""Router: architecture, training to high accuracy, early stopping, features, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastmerge.twin import Router, default_features, fit_router, gates_from_logits, mean_pool


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny MLP steps are dominated by thread hand-offs on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def separable(n_per_task=150, t_count=4, dim=8, seed=0):
    """Two draws (train, test) of Gaussian clusters around well-separated centers."""
    gen = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(t_count, dim, generator=gen)
    ids = torch.arange(t_count).repeat_interleave(n_per_task)
    draw = [centers[ids] + torch.randn(len(ids), dim, generator=gen) for _ in range(2)]
    return draw[0], draw[1], ids


def test_architecture_is_the_methods_mlp():
    router = Router(6, 3)
    kinds = [type(m) for m in router.net]
    assert kinds == [
        nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Dropout,
        nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Dropout,
        nn.Linear,
    ]  # fmt: skip
    assert (router.net[0].in_features, router.net[0].out_features) == (6, 12)
    assert (router.net[4].in_features, router.net[4].out_features) == (12, 12)
    assert (router.net[8].in_features, router.net[8].out_features) == (12, 3)
    assert router.net[3].p == 0.5 and router.net[7].p == 0.5


def test_trains_to_high_accuracy_on_separable_features():
    feats, test_feats, ids = separable()
    router = fit_router(feats, ids, epochs=30, seed=1)
    assert not router.training
    best = router.history.best_epoch
    assert router.history.val_accuracy[best] >= 0.95
    accuracy = (router(test_feats).argmax(-1) == ids).float().mean()
    assert accuracy >= 0.95
    # training is seeded
    again = fit_router(feats, ids, epochs=30, seed=1)
    assert torch.equal(again(test_feats), router(test_feats))


def test_features_computed_with_gradients_train_the_router_only():
    feats, _, ids = separable(n_per_task=40)
    body = nn.Linear(feats.shape[1], feats.shape[1])
    with torch.enable_grad():
        features = body(feats)  # part of an autograd graph
    router = fit_router(features, ids, epochs=3, seed=0)
    assert router.history.best_epoch >= 0
    assert body.weight.grad is None


def test_early_stopping_restores_the_best_epoch():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 5, generator=gen)
    ids = torch.randint(0, 2, (200,), generator=gen)  # pure noise: held-out loss stalls
    router = fit_router(feats, ids, epochs=200, patience=3, lr=1e-2)
    h = router.history
    assert h.stopped_early
    assert len(h.val_loss) == h.best_epoch + 1 + 3
    assert min(h.val_loss) == h.val_loss[h.best_epoch]


def test_fewer_than_two_tasks_raise():
    with pytest.raises(ValueError, match="at least two tasks"):
        Router(4, 1)
    feats = torch.randn(10, 4)
    with pytest.raises(ValueError, match="at least two tasks"):
        fit_router(feats, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="task_ids must be an integer"):
        fit_router(feats, torch.zeros(10))
    with pytest.raises(ValueError, match="features must be a floating"):
        fit_router(torch.randn(10), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        fit_router(feats, torch.arange(10) % 3, num_tasks=2)
    with pytest.raises(ValueError, match=r"router features must be \(N, 4\)"):
        Router(4, 2)(torch.randn(3, 5))


def test_gates_from_logits_top_k():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 2.0]])
    dense = gates_from_logits(logits)
    torch.testing.assert_close(dense.sum(-1), torch.ones(2))
    top2 = gates_from_logits(logits, top_k=2)
    assert (top2 > 0).sum(-1).tolist() == [2, 2]
    assert top2[0, 0] == 0 and top2[0, 3] == 0 and top2[1, 1] == 0
    torch.testing.assert_close(top2.sum(-1), torch.ones(2))
    torch.testing.assert_close(top2[0, 2] / top2[0, 1], dense[0, 2] / dense[0, 1])
    assert torch.equal(gates_from_logits(logits, top_k=4), dense)


def test_default_features_of_a_plain_module_is_the_last_hidden_layer():
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(4, 5, 3)
    expected = torch.tanh(net[0](x)).mean(1)
    torch.testing.assert_close(default_features(net, x), expected)
    no_linear = nn.Sequential(nn.Tanh())
    torch.testing.assert_close(default_features(no_linear, x), torch.tanh(x).mean(1))


def test_mean_pool_respects_the_mask():
    hidden = torch.arange(12.0).view(1, 3, 4).repeat(2, 1, 1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, 0])
