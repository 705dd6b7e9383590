"""scope_of, fuse_scopes and the regularizer module."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastmerge
from fastmerge.wsa import WeightScopeRegularizer, fuse_scopes, scope_of


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.LayerNorm(16),
        nn.Linear(16, 4),
    )


def test_scope_of_takes_linear_and_conv_weights_only():
    model = _model()
    scope = scope_of(model)
    assert scope.names == ("0.weight", "4.weight", "6.weight")
    want = fastmerge.scope_stats(
        [model[0].weight, model[4].weight, model[6].weight], backend="reference"
    )
    torch.testing.assert_close(scope.std, want.std, rtol=1e-12, atol=0)


def test_scope_of_custom_filter_and_no_match():
    model = _model()
    biases = scope_of(model, include=lambda mn, m, pn, p: pn == "bias")
    assert len(biases) == 5
    with pytest.raises(ValueError, match="no parameter"):
        scope_of(model, include=lambda *a: False)


def test_fuse_scopes_rules():
    a = fastmerge.ScopeStats.from_values([0.0, 1.0], [1.0, 2.0], count=[10, 10])
    b = fastmerge.ScopeStats.from_values([2.0, 1.0], [3.0, 2.0], count=[10, 10])
    mean_rule = fuse_scopes([a, b], weights=[1, 3], rule="mean")
    torch.testing.assert_close(mean_rule.mean, torch.tensor([1.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        mean_rule.var, torch.tensor([0.25 * 1 + 0.75 * 9, 4.0], dtype=torch.float64)
    )
    moment = fuse_scopes([a, b], weights=[1, 3], rule="moment")
    # Mixture variance: within-model variance plus the spread of the means.
    torch.testing.assert_close(
        moment.var,
        mean_rule.var + torch.tensor([0.25 * 1.5**2 + 0.75 * 0.5**2, 0.0], dtype=torch.float64),
    )


def test_moment_fusion_matches_pooled_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, generator=g, dtype=torch.float64)
    y = torch.randn(4000, generator=g, dtype=torch.float64) * 3 + 2
    fused = fuse_scopes([fastmerge.scope_stats([x]), fastmerge.scope_stats([y])], rule="moment")
    pooled = fastmerge.scope_stats([torch.cat([x, y])])
    torch.testing.assert_close(fused.std, pooled.std, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(rule="median"), ValueError, "rule"),
        (dict(weights=[1.0]), ValueError, "entries"),
        (dict(weights=[-1.0, 2.0]), ValueError, "non-negative"),
    ],
)
def test_fuse_scopes_bad_input(kwargs, error, words):
    a = fastmerge.ScopeStats.from_values([0.0], [1.0])
    with pytest.raises(error, match=words):
        fuse_scopes([a, a], **kwargs)


def test_fuse_scopes_rejects_different_layers():
    a = fastmerge.ScopeStats.from_values([0.0, 0.0], [1.0, 1.0], names=("x", "y"))
    b = fastmerge.ScopeStats.from_values([0.0, 0.0], [1.0, 1.0], names=("x", "z"))
    with pytest.raises(ValueError, match="names differ"):
        fuse_scopes([a, b])
    with pytest.raises(ValueError, match="entries"):
        fuse_scopes([a, fastmerge.ScopeStats.from_values([0.0], [1.0])])


def test_regularizer_value_and_training_pulls_scope_to_target():
    model = _model()
    params = [model[0].weight, model[4].weight, model[6].weight]
    target = (0.0, 0.01)
    reg = WeightScopeRegularizer(model, target, strength=0.5)
    torch.testing.assert_close(reg(), 0.5 * fastmerge.wsa_penalty(params, target))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    before = reg().item()
    for _ in range(20):
        optimizer.zero_grad()
        reg().backward()
        optimizer.step()
    assert reg().item() < before
    # The module is not re-registered: only the target buffers are state.
    assert set(reg.state_dict()) == {"target_mean", "target_std"}
    assert list(reg.parameters()) == []


def test_regularizer_default_strength_is_the_studied_one_and_warns():
    model = _model()
    params = [model[0].weight, model[4].weight, model[6].weight]
    target = (0.0, 0.01)
    with pytest.warns(FutureWarning, match=r"default strength is now 0\.01 \(it was 1\.0"):
        reg = WeightScopeRegularizer(model, target)
    assert reg.strength == fastmerge.wsa.regularizer.DEFAULT_STRENGTH == 0.01
    torch.testing.assert_close(reg(), 0.01 * fastmerge.wsa_penalty(params, target))
    with pytest.warns(FutureWarning):
        assert WeightScopeRegularizer(model).strength == 0.01  # target "init", as before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert WeightScopeRegularizer(model, target, strength=1.0).strength == 1.0
        assert WeightScopeRegularizer(model, target, 0.01).strength == 0.01


def test_regularizer_init_target_starts_at_zero():
    reg = WeightScopeRegularizer(_model(), "init", strength=1.0)
    assert abs(reg().item()) < 1e-6


def test_regularizer_bad_input():
    with pytest.raises(ValueError, match="strength"):
        WeightScopeRegularizer(_model(), "init", strength=-1)
    with pytest.raises(ValueError, match="positive"):
        WeightScopeRegularizer(_model(), (0.0, 0.0))
    with pytest.raises(ValueError, match="names differ"):
        WeightScopeRegularizer(
            _model(), fastmerge.ScopeStats.from_values([0.0] * 3, [1.0] * 3, names=("a", "b", "c"))
        )
