"""fastmerge.merge.ties against an independent sort-based TIES, and its input checks."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch

import fastmerge
from fastmerge.merge import keep_count, ties

from ..conftest import backend_params


def _state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 16, generator=g).to(dtype),
        "layers.0.attn.q.weight": torch.randn(16, 16, generator=g).to(dtype),
        "layers.0.norm.weight": torch.randn(16, generator=g).to(dtype),
        "layers.0.mlp.bias": torch.randn(33, generator=g).to(dtype),
        "num_batches_tracked": torch.tensor(seed),
    }


def _experts(base, count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            k: (v + torch.randn(v.shape, generator=g).to(v.dtype) * 0.1)
            if v.is_floating_point()
            else v + 1
            for k, v in base.items()
        }
        for _ in range(count)
    ]


def _sorted_ties(base, experts, density, scale):
    """TIES written independently in float64 from a sort (float32 τ, as ties computes)."""
    out = {}
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = b
            continue
        bf = b.float()
        taus = [(e[key].float() - bf).double().flatten() for e in experts]
        k = math.ceil(density * b.numel() - 1e-9 * density * b.numel())
        kept = []
        for tau in taus:
            h = tau.abs().sort(descending=True).values[k - 1]
            kept.append(torch.where(tau.abs() >= h, tau, 0.0))
        stacked = torch.stack(kept)
        sign = stacked.sum(0).sign()
        agree = (stacked.sign() == sign) & (stacked != 0)
        mean = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[key] = (bf.double().flatten() + scale * mean).reshape(b.shape)
    return out


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("num_experts", [1, 3])
def test_matches_sort_based_ties(backend, device, num_experts):
    base = _state(0)
    experts = _experts(base, num_experts)
    to = lambda sd: {k: v.to(device) for k, v in sd.items()}  # noqa: E731
    merged = ties(to(base), [to(e) for e in experts], density=0.3, scale=0.8, backend=backend)
    want = _sorted_ties(base, experts, 0.3, 0.8)
    assert list(merged) == list(base)
    for key, value in merged.items():
        assert value.dtype == base[key].dtype and value.device.type == device
        if key == "num_batches_tracked":
            assert value.item() == 0  # copied from the base, not merged
        else:
            torch.testing.assert_close(value.cpu().double(), want[key], rtol=1e-6, atol=1e-7)
    # Bit for bit the reference backend's result.
    reference = ties(base, experts, density=0.3, scale=0.8, backend="reference")
    for key in merged:
        assert torch.equal(merged[key].cpu(), reference[key]), key


def test_half_precision_and_float64_state_dicts():
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        base = _state(2, dtype)
        experts = _experts(base, 2)
        merged = ties(base, experts, density=0.5)
        reference = ties(base, experts, density=0.5, backend="reference")
        for key in base:
            assert merged[key].dtype == base[key].dtype
            assert torch.equal(merged[key], reference[key])


def test_include_exclude_select_keys():
    base = _state(0)
    experts = _experts(base, 2)
    merged = ties(base, experts, density=0.5, include=r"\.weight$", exclude=["^embed"])
    for key in base:
        changed = not torch.equal(merged[key], base[key])
        assert changed == (key in ("layers.0.attn.q.weight", "layers.0.norm.weight")), key


def test_density_one_keeps_everything_and_ties_at_threshold_are_kept():
    base = {"w": torch.zeros(6)}
    experts = [{"w": torch.tensor([1.0, -1.0, 1.0, 0.5, 0.5, 0.0])}]
    # k = 2: the 2nd largest magnitude is 1, and all three entries of magnitude 1 stay.
    assert ties(base, experts, density=2 / 6)["w"].tolist() == [1.0, -1.0, 1.0, 0, 0, 0]
    assert ties(base, experts, density=1.0)["w"].tolist() == experts[0]["w"].tolist()


class CountingDict(Mapping):
    """A lazy state dict that counts reads per key."""

    def __init__(self, data):
        self.data, self.reads = data, {}

    def __getitem__(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return self.data[key].clone()

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)


def test_reads_every_key_once_from_lazy_mappings():
    base = CountingDict(_state(0))
    experts = [CountingDict(e) for e in _experts(_state(0), 2)]
    ties(base, experts, density=0.3)
    for model in (base, *experts):
        assert all(count == 1 for count in model.reads.values()), model.reads
    assert set(base.reads) == set(base.data)


def test_keep_count():
    assert [keep_count(0.3, n) for n in (1, 10, 11, 100)] == [1, 3, 4, 30]
    assert keep_count(0.2, 0) == 0


def test_bad_input_names_the_key_and_the_expert():
    base = _state(0)
    experts = _experts(base, 2)
    del experts[1]["layers.0.mlp.bias"]
    with pytest.raises(ValueError, match=r"experts\[1\].*layers\.0\.mlp\.bias"):
        ties(base, experts)
    experts = _experts(base, 2)
    experts[0]["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"experts\[0\].*'extra'"):
        ties(base, experts)
    experts = _experts(base, 2)
    experts[1]["layers.0.norm.weight"] = torch.zeros(17)
    with pytest.raises(ValueError, match=r"experts\[1\]\['layers\.0\.norm\.weight'\].*shape"):
        ties(base, experts)
    with pytest.raises(ValueError, match="experts is empty"):
        ties(base, [])
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="density"):
            ties(base, _experts(base, 1), density=density)
    with pytest.raises(ValueError, match="include pattern"):
        ties(base, _experts(base, 1), include="(")
    with pytest.raises(TypeError, match="list of state dicts"):
        ties(base, base)


def test_exported_from_fastmerge():
    assert fastmerge.merge.ties is ties


def test_thresholds_of_a_list_equal_those_read_one_expert_at_a_time():
    """A list of experts is selected in one call per distinct density; an iterator one
    expert at a time; the thresholds are the same, in expert order."""
    from fastmerge.merge import TensorMerge

    g = torch.Generator().manual_seed(3)
    base = torch.randn(5000, generator=g)
    experts = [base + 0.01 * (t + 1) * torch.randn(5000, generator=g) for t in range(4)]
    merger = TensorMerge(4, trim="magnitude", densities=[0.3, 0.5, 0.3, 0.5], consensus=True)
    together = merger.thresholds("w", base, experts)
    one_by_one = merger.thresholds("w", base, iter(experts))
    assert [float(t) for t in together] == [float(t) for t in one_by_one]
    for t, (e, d) in enumerate(zip(experts, [0.3, 0.5, 0.3, 0.5])):
        k = keep_count(d, base.numel())
        assert float(together[t]) == float((e - base).abs().kthvalue(5000 - k + 1).values)
