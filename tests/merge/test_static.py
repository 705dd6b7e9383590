"""average, task arithmetic, DARE and task_vectors."""

from __future__ import annotations

import pytest
import torch

from fastmerge.merge import average, dare, task_arithmetic, task_vectors

from .test_ties import CountingDict, _experts, _state


def test_average_equal_and_weighted():
    models = [_state(0), _state(1), _state(2)]
    merged = average(models)
    key = "layers.0.attn.q.weight"
    torch.testing.assert_close(merged[key], (models[0][key] + models[1][key] + models[2][key]) / 3)
    weighted = average(models, weights=[2.0, 1.0, 1.0])
    want = (2 * models[0][key] + models[1][key] + models[2][key]) / 4
    torch.testing.assert_close(weighted[key], want)
    assert merged["num_batches_tracked"].item() == 0  # from the first model
    with pytest.raises(ValueError, match="weights"):
        average(models, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        average(models, weights=[1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="empty"):
        average([])


def test_average_keeps_dtypes_and_selects_keys():
    models = [_state(0, torch.bfloat16), _state(1, torch.bfloat16)]
    merged = average(models, exclude="embed")
    assert all(merged[k].dtype == models[0][k].dtype for k in models[0])
    assert torch.equal(merged["embed.weight"], models[0]["embed.weight"])
    want = (models[0]["layers.0.mlp.bias"].float() + models[1]["layers.0.mlp.bias"].float()) / 2
    assert torch.equal(merged["layers.0.mlp.bias"], want.bfloat16())


def test_task_arithmetic():
    base = _state(0)
    experts = _experts(base, 3)
    merged = task_arithmetic(base, experts, scale=0.4, include=["attn", "mlp"])
    for key, b in base.items():
        if key in ("layers.0.attn.q.weight", "layers.0.mlp.bias"):
            want = b + 0.4 * sum(e[key] - b for e in experts)
            torch.testing.assert_close(merged[key], want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(merged[key], b)
    with pytest.raises(ValueError, match=r"experts\[2\]"):
        bad = _experts(base, 3)
        bad[2]["embed.weight"] = torch.zeros(3)
        task_arithmetic(base, bad)


def test_task_vectors():
    base = _state(0)
    experts = _experts(base, 2)
    vectors = task_vectors(base, experts, exclude="norm")
    assert len(vectors) == 2
    assert set(vectors[0]) == {"embed.weight", "layers.0.attn.q.weight", "layers.0.mlp.bias"}
    assert torch.equal(
        vectors[1]["embed.weight"], experts[1]["embed.weight"] - base["embed.weight"]
    )


def test_dare_drops_and_rescales():
    base = {"w": torch.zeros(20000)}
    experts = [{"w": torch.ones(20000)}, {"w": torch.full((20000,), 2.0)}]
    merged = dare(base, experts, drop=0.75, seed=3)["w"]
    # Each expert's kept entries are rescaled by 4: values in {0, 4, 8, 12}.
    assert set(merged.unique().tolist()) <= {0.0, 4.0, 8.0, 12.0}
    kept0 = (merged == 4) | (merged == 12)
    assert 0.22 < kept0.float().mean().item() < 0.28
    assert torch.equal(dare(base, experts, drop=0.0)["w"], torch.full((20000,), 3.0))


def test_dare_is_reproducible_and_order_independent():
    base = _state(0)
    experts = _experts(base, 2)
    first = dare(base, experts, drop=0.5, seed=7)
    again = dare(base, experts, drop=0.5, seed=7)
    reversed_base = dict(reversed(list(base.items())))
    reversed_experts = [dict(reversed(list(e.items()))) for e in experts]
    shuffled = dare(reversed_base, reversed_experts, drop=0.5, seed=7)
    only_attn = dare(base, experts, drop=0.5, seed=7, include="attn")
    other = dare(base, experts, drop=0.5, seed=8)
    key = "layers.0.attn.q.weight"
    for result in (again, shuffled, only_attn):
        assert torch.equal(result[key], first[key])
    assert not torch.equal(other[key], first[key])
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="drop"):
            dare(base, experts, drop=bad)


def test_lazy_mappings_are_read_once():
    base = CountingDict(_state(0))
    experts = [CountingDict(e) for e in _experts(_state(0), 2)]
    task_arithmetic(base, experts)
    dare(base, experts)
    for model in (base, *experts):
        assert all(count == 2 for count in model.reads.values()), model.reads
