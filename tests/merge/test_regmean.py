"""RegMean and RegMean++ (fastmerge.merge.regmean) against plain-torch closed forms."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fastmerge.merge import (
    RegMeanStatistics,
    regmean,
    regmean_from_statistics,
    regmean_statistics,
)

from ..test_dist import run_ranks


def _mlp(seed: int, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7, bias=bias), nn.ReLU(), nn.Linear(7, 3, bias=bias)).double()


def _batches(seed: int, n: int = 3, rows: int = 20, d: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, d, generator=gen, dtype=torch.float64) for _ in range(n)]


def _shrunk(g: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))


def _regmean_layer(xs: list[torch.Tensor], ws: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """The paper's closed form with per-model mean Grams, by hand."""
    grams = [_shrunk(x.T @ x / len(x), alpha) for x in xs]
    rhs = sum(g @ w.T for g, w in zip(grams, ws))
    return torch.linalg.solve(sum(grams), rhs).T


def test_one_model_with_alpha_one_is_that_model():
    model = _mlp(0)
    for bias in ("average", "solve"):
        merged = regmean([model], _batches(1), alpha=1.0, bias=bias)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[key], value, rtol=1e-9, atol=1e-9)
    assert merged is not model


def test_two_linear_models_equal_least_squares_of_the_concatenated_data():
    torch.manual_seed(3)
    a, b = nn.Linear(6, 4).double(), nn.Linear(6, 4).double()
    xa, xb = _batches(1, n=2, rows=30, d=6), _batches(2, n=2, rows=30, d=6)
    # bias="solve": [W | b] is the least-squares fit of the concatenated (x, model(x)) pairs.
    merged = regmean([a, b], [xa, xb], alpha=1.0, bias="solve")
    x = torch.cat(xa + xb)
    y = torch.cat([a(torch.cat(xa)), b(torch.cat(xb))]).detach()
    ones = torch.ones(len(x), 1, dtype=torch.float64)
    want = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution
    torch.testing.assert_close(merged.weight.detach(), want[:6].T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(merged.bias.detach(), want[6], rtol=1e-8, atol=1e-10)
    # bias="average": the weights fit the outputs without bias, the biases are averaged.
    avg = regmean([a, b], [xa, xb], alpha=1.0)
    y0 = torch.cat([torch.cat(xa) @ a.weight.T, torch.cat(xb) @ b.weight.T]).detach()
    want0 = torch.linalg.lstsq(x, y0).solution.T
    torch.testing.assert_close(avg.weight.detach(), want0, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(avg.bias, (a.bias + b.bias) / 2)


def test_unequal_sample_counts_weigh_models_alike_and_alpha_shrinks_off_diagonals():
    a, b = _mlp(0), _mlp(1)
    xa, xb = _batches(1, n=1, rows=40), _batches(2, n=3, rows=25)
    for alpha in (1.0, 0.5):
        merged = regmean([a, b], [xa, xb], alpha=alpha)
        want = _regmean_layer([torch.cat(xa), torch.cat(xb)], [a[0].weight, b[0].weight], alpha)
        torch.testing.assert_close(merged[0].weight.detach(), want.detach(), rtol=1e-8, atol=1e-10)
        ha = torch.relu(a[0](torch.cat(xa))).detach()
        hb = torch.relu(b[0](torch.cat(xb))).detach()
        want2 = _regmean_layer([ha, hb], [a[2].weight, b[2].weight], alpha)
        torch.testing.assert_close(merged[2].weight.detach(), want2.detach(), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(merged[2].bias, (a[2].bias + b[2].bias) / 2)


def test_regmean_plus_plus_takes_the_merged_models_inputs():
    a, b = _mlp(0), _mlp(1)
    xa, xb = torch.cat(_batches(1)), torch.cat(_batches(2))
    plain = regmean([a, b], [[xa], [xb]], alpha=0.8)
    plus = regmean([a, b], [[xa], [xb]], alpha=0.8, sequential=True)
    # Layer 0 sees the data in both; layer 1 sees relu(merged layer 0 (x_i)) in RegMean++.
    w0 = _regmean_layer([xa, xb], [a[0].weight, b[0].weight], 0.8).detach()
    torch.testing.assert_close(plus[0].weight.detach(), w0, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(plain[0].weight.detach(), w0, rtol=1e-8, atol=1e-10)
    b0 = (a[0].bias + b[0].bias).detach() / 2

    def hidden(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w0.T + b0)

    w1 = _regmean_layer([hidden(xa), hidden(xb)], [a[2].weight, b[2].weight], 0.8).detach()
    torch.testing.assert_close(plus[2].weight.detach(), w1, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(plain[2].weight, plus[2].weight, atol=1e-3)


def test_statistics_of_two_halves_merge_into_those_of_all_data():
    model = _mlp(0)  # float64: the sums agree to rounding whatever the blocks
    data = _batches(4, n=6, rows=50)
    whole = regmean_statistics(model, data)
    left, right = regmean_statistics(model, data[:2]), regmean_statistics(model, data[2:])
    merged = left.merge(right)
    assert merged.names == whole.names == ["0", "2"]
    for name in whole.names:
        assert merged.count(name) == whole.count(name) == 300
        torch.testing.assert_close(merged.gram(name), whole.gram(name), rtol=1e-10, atol=1e-12)
    x = torch.cat(data)
    torch.testing.assert_close(whole.gram("0"), x.T @ x / 300, rtol=1e-10, atol=1e-12)
    # float32 inputs: float32 GEMM blocks summed in float64.
    single = regmean_statistics(model.float(), [t.float() for t in data])
    torch.testing.assert_close(single.gram("0"), x.T @ x / 300, rtol=1e-5, atol=1e-5)
    model.double()
    models = [model, _mlp(1)]
    stats = [merged, regmean_statistics(models[1], data)]
    got = regmean_from_statistics(models, stats)
    want = regmean(models, data)  # one shared iterable for both models
    torch.testing.assert_close(got.state_dict(), want.state_dict())


class _Tail(nn.Module):
    """Counts its calls: the forward must stop before it once the statistics are in."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return x * 2


def test_the_forward_stops_after_the_last_selected_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), _Tail()).double()
    data = _batches(1, n=4, rows=8, d=4)
    _Tail.calls = 0
    stats = regmean_statistics(model, data)
    assert _Tail.calls == 1  # the first batch runs whole (it finds the layer order)
    h = torch.relu(model[0](torch.cat(data))).detach()
    torch.testing.assert_close(stats.gram("2"), h.T @ h / 32, rtol=1e-10, atol=1e-12)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_bad_inputs_raise_clear_errors():
    a = _mlp(0)
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        regmean([a, nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)).double()], [])
    with pytest.raises(ValueError, match="'unused'"):
        regmean([_Branchy(), _Branchy()], [torch.randn(4, 3)])
    for kwargs, match in (
        ({"alpha": 1.5}, "alpha"),
        ({"ridge": -1.0}, "ridge"),
        ({"bias": "learn"}, "bias"),
        ({"include": "nothing-matches"}, "no nn.Linear"),
        ({"max_batches": 0}, "max_batches"),
    ):
        with pytest.raises(ValueError, match=match):
            regmean([a, _mlp(1)], _batches(1), **kwargs)
    with pytest.raises(TypeError, match="sequential"):
        regmean([a], _batches(1), sequential="yes")
    with pytest.raises(TypeError, match="iterable of batches"):
        regmean([a], torch.randn(3, 5))
    with pytest.raises(TypeError, match="nn.Module"):
        regmean([a.state_dict()], _batches(1))
    stats = regmean_statistics(a, _batches(1))
    with pytest.raises(ValueError, match="one RegMeanStatistics per model"):
        regmean_from_statistics([a, _mlp(1)], [stats])
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(regmean_statistics(a, _batches(1), include=r"^0$"))


def test_singular_gram_falls_back_to_a_ridge_with_a_warning_naming_the_layer():
    a, b = _mlp(0), _mlp(1)
    few = [torch.randn(3, 5, dtype=torch.float64)]  # 3 samples < 5 inputs: rank-deficient
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = regmean([a, b], [few, few], alpha=1.0)
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert any("layer '0'" in m and "singular" in m for m in messages), messages
    assert all(torch.isfinite(v).all() for v in merged.state_dict().values())
    # alpha < 1 makes the first layer's Gram regular (every input varies): no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regmean([a, b], [few, few], alpha=0.9, include=r"^0$")
    # ...but not where a hidden ReLU unit is 0 on all three samples.
    hidden = torch.relu(a[0](few[0]))
    if (hidden == 0).all(0).any():
        with pytest.warns(RuntimeWarning, match="layer '2'"):
            regmean([a, b], [few, few], alpha=0.9)


def test_include_exclude_and_non_linear_tensors_are_averaged():
    a, b = _mlp(0), _mlp(1)
    merged = regmean([a, b], [_batches(1), _batches(2)], exclude=r"^2$")
    torch.testing.assert_close(merged[2].weight, (a[2].weight + b[2].weight) / 2)
    assert not torch.allclose(merged[0].weight, (a[0].weight + b[0].weight) / 2)
    assert isinstance(regmean_statistics(a, _batches(1)), RegMeanStatistics)


def _distributed_scenario(rank: int, world: int) -> dict:
    data = _batches(5, n=4)
    mine = data[rank::world]
    a, b = _mlp(0), _mlp(1)
    return {
        "plain": regmean([a, b], mine).state_dict(),
        "plus": regmean([a, b], mine, sequential=True).state_dict(),
    }


def test_two_ranks_give_the_one_process_merge(tmp_path):
    results = run_ranks(tmp_path, _distributed_scenario, world=2)
    data = _batches(5, n=4)
    a, b = _mlp(0), _mlp(1)
    for key, kwargs in (("plain", {}), ("plus", {"sequential": True})):
        want = regmean([a, b], data, **kwargs).state_dict()
        for result in results:
            torch.testing.assert_close(result[key], want, rtol=1e-9, atol=1e-11)
