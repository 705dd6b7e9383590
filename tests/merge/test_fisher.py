"""Fisher information and Fisher merging (fastmerge.merge.fisher) against autograd loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastmerge.merge import fisher_information, fisher_merge

from ..test_dist import run_ranks


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(seed: int, n: int = 3, rows: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(rows, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (rows,), generator=gen),
        )
        for _ in range(n)
    ]


def _loop_fisher(model: nn.Module, data, predicted: bool = False) -> dict[str, torch.Tensor]:
    """Per-example autograd: mean of squared gradients of log p(y | x)."""
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for x, y in data:
        for i in range(len(x)):
            model.zero_grad()
            logp = torch.log_softmax(model(x[i : i + 1]), -1)[0]
            label = int(logp.argmax()) if predicted else int(y[i])
            logp[label].backward()
            for n, p in model.named_parameters():
                sums[n] += p.grad**2
            count += 1
    return {n: s / count for n, s in sums.items()}


@pytest.mark.parametrize("labels", ["empirical", "model"])
def test_fisher_equals_the_per_example_autograd_loop(labels):
    model, data = _mlp(0), _data(1)
    got = fisher_information(model, data, labels=labels)
    want = _loop_fisher(model, data, predicted=labels == "model")
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name].float(), rtol=1e-5, atol=1e-8)
        assert got[name].dtype == torch.float32
    # Bare inputs work with the model's own labels.
    bare = fisher_information(model, [x for x, _ in data], labels="model")
    if labels == "model":
        torch.testing.assert_close(bare, got)


class _Tokens(nn.Module):
    """(B, T, C) logits: a token classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.proj = nn.Linear(4, 5).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_sequence_outputs_sum_the_positions_and_skip_ignored_labels():
    model = _Tokens()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (4, 3), generator=gen)
    y[1, 2] = y[3, 0] = -100
    got = fisher_information(model, [{"x": x, "labels": y}])
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        logp = torch.log_softmax(model(x[i]), -1)
        keep = y[i] != -100
        logp[keep.nonzero().flatten(), y[i][keep]].sum().backward()
        for n, p in model.named_parameters():
            want[n] += p.grad**2 / 4
    for n in want:
        torch.testing.assert_close(got[n], want[n].float(), rtol=1e-5, atol=1e-8)


def test_fisher_of_two_halves_combine_by_counts_into_that_of_all_data():
    model, data = _mlp(0), _data(4, n=4)
    whole = fisher_information(model, data)
    left, right = fisher_information(model, data[:1]), fisher_information(model, data[1:])
    for n in whole:
        torch.testing.assert_close((left[n] + 3 * right[n]) / 4, whole[n], rtol=1e-5, atol=1e-8)
    assert fisher_information(model, data, max_batches=1)["0.bias"].equal(left["0.bias"])


def test_equal_fishers_give_the_average_and_weights_and_floor_apply():
    models = [_mlp(0), _mlp(1), _mlp(2)]
    f = fisher_information(models[0], _data(1))
    merged = fisher_merge(models, [f, f, f])
    for key, value in merged.state_dict().items():
        want = sum(m.state_dict()[key] for m in models) / 3
        torch.testing.assert_close(value, want)
    a, b = models[0].state_dict(), models[1].state_dict()
    fa = {k: torch.rand(v.shape, dtype=torch.float64) for k, v in a.items()}
    fb = {k: torch.rand(v.shape, dtype=torch.float64) for k, v in a.items()}
    fa["0.bias"] = torch.zeros_like(fa["0.bias"])  # floored: b wins there
    got = fisher_merge([a, b], [fa, fb], weights=[2.0, 1.0], floor=1e-6)
    for k in a:
        wa, wb = 2 * fa[k].clamp_min(1e-6), fb[k].clamp_min(1e-6)
        torch.testing.assert_close(got[k], (wa * a[k] + wb * b[k]) / (wa + wb))
    torch.testing.assert_close(got["0.bias"], b["0.bias"], rtol=1e-5, atol=1e-6)


def test_tensors_without_a_fisher_are_averaged():
    models = [nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)) for _ in range(2)]
    for m in models:
        m[1].running_mean.uniform_()
        m[0].bias.requires_grad_(False)
    fishers = [fisher_information(m, [torch.randn(4, 3)], labels="model") for m in models]
    assert "0.bias" not in fishers[0] and "1.running_mean" not in fishers[0]
    merged = fisher_merge(models, fishers)
    means = [m[1].running_mean for m in models]
    torch.testing.assert_close(merged[1].running_mean, (means[0] + means[1]) / 2)
    torch.testing.assert_close(merged[0].bias, (models[0][0].bias + models[1][0].bias) / 2)


def test_bad_inputs_raise_clear_errors():
    model, data = _mlp(0), _data(1)
    with pytest.raises(ValueError, match="labels must be one of"):
        fisher_information(model, data, labels="true")
    with pytest.raises(ValueError, match="labelled batches"):
        fisher_information(model, [x for x, _ in data])
    with pytest.raises(ValueError, match="do not fit logits"):
        fisher_information(model, [(data[0][0], data[0][1][:3])])
    with pytest.raises(ValueError, match="no examples"):
        fisher_information(model, [])
    with pytest.raises(ValueError, match="chunk_size"):
        fisher_information(model, data, chunk_size=0)
    f = fisher_information(model, data)
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        fisher_merge([model, other], [f, f])
    with pytest.raises(ValueError, match="one dict per model"):
        fisher_merge([model, _mlp(1)], [f])
    with pytest.raises(ValueError, match="'0.bias'"):
        fisher_merge([model, _mlp(1)], [f, {k: v for k, v in f.items() if k != "0.bias"}])
    with pytest.raises(ValueError, match="shape"):
        fisher_merge([model, _mlp(1)], [f, {**f, "0.bias": torch.ones(2)}])
    with pytest.raises(ValueError, match="weights"):
        fisher_merge([model, _mlp(1)], [f, f], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="floor"):
        fisher_merge([model, _mlp(1)], [f, f], floor=0.0)


def _distributed_scenario(rank: int, world: int) -> dict:
    return {"fisher": fisher_information(_mlp(0), _data(5, n=4)[rank::world])}


def test_two_ranks_give_the_one_process_fisher(tmp_path):
    results = run_ranks(tmp_path, _distributed_scenario, world=2)
    want = fisher_information(_mlp(0), _data(5, n=4))
    for result in results:
        torch.testing.assert_close(result["fisher"], want, rtol=1e-5, atol=1e-8)
