"""magnitude_threshold: every backend against the reference (exact: it selects a value)."""

from __future__ import annotations

import math

import pytest
import torch

import fastmerge
from fastmerge.reference.magnitude_threshold import magnitude_threshold as reference

from ..conftest import backend_params

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# 1, odd, around the CPU block (1024) and, with 5 experts, past the size where the CPU
# splits the work over two threads (2 x 2^18 input elements).
CPU_SIZES = [1, 2, 97, 1023, 1024, 1025, 100003]
# The Triton interpreter is slow: around its block (1024) only.
TRITON_SIZES = [1, 97, 1025]


def _sizes(backend: str) -> list[int]:
    return TRITON_SIZES if backend == "triton" else CPU_SIZES


def _inputs(n: int, experts: int, dtype: torch.dtype, seed: int = 0, tied: bool = False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    if tied:  # few distinct magnitudes, both signs, zeros and negative zeros
        deltas = [torch.randint(-3, 4, (n,), generator=g).float() * 0.25 for _ in range(experts)]
        for d in deltas:
            d[d == 0] = -0.0
        base = torch.randint(-4, 5, (n,), generator=g).float()
    else:
        deltas = [torch.randn(n, generator=g) * 0.01 * (t + 1) for t in range(experts)]
    return base.to(dtype), [(base + d).to(dtype) for d in deltas]


def _ranks(n: int, backend: str) -> list[int]:
    if backend == "triton":  # the interpreter is slow: k = 1 is in test_special_values
        return sorted({n, math.ceil(0.3 * n)})
    return sorted({1, n, math.ceil(0.3 * n), max(1, n // 2)})


def _by_sorting(base, experts, k):
    """Independent oracle: sort the float64 magnitudes of τ formed in the compute dtype."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    out = []
    for e in experts:
        tau = (e.to(dtype) - base.to(dtype)).abs().double().flatten()
        out.append(tau.sort(descending=True).values[k - 1].item())
    return out


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_experts", [1, 2, 5])
def test_matches_reference(backend, device, dtype, num_experts):
    for n in _sizes(backend):
        for tied in (False, True):
            base, experts = _inputs(n, num_experts, dtype, seed=n, tied=tied)
            for k in _ranks(n, backend):
                got = fastmerge.ops.magnitude_threshold(
                    base.to(device), [e.to(device) for e in experts], k, backend=backend
                )
                want = reference(base, experts, k)
                assert got.dtype == want.dtype
                assert torch.equal(got.cpu(), want), (n, k, tied, got, want)
                assert got.cpu().double().tolist() == _by_sorting(base, experts, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_both_sides_of_the_cpu_small_tensor_path(dtype):
    # The CPU kernel sorts the keys of tensors up to 2**14 expert entries in one thread and
    # takes the radix selection above: both sides of that size, tied inputs included.
    for n in (8192, 8193):
        for tied in (False, True):
            base, experts = _inputs(n, 2, dtype, seed=n, tied=tied)
            for k in (1, 2, n // 3, n - 1, n):
                got = fastmerge.ops.magnitude_threshold(base, experts, k, backend="cpu")
                assert torch.equal(got, reference(base, experts, k)), (n, k, tied)


@pytest.mark.parametrize("backend,device", backend_params())
def test_special_values(backend, device):
    # Negative zeros, exact ties across the bin boundaries, subnormals and huge values.
    base = torch.tensor([0.0, -0.0, 1.0, 1e-40, -3e38, 2.0, 0.5, -0.0])
    expert = torch.tensor([-0.0, 0.0, 1.0, -1e-40, 3e38, -2.0, 0.25, 7.0])
    taus = (expert - base).abs()
    for k in range(1, 9):
        got = fastmerge.ops.magnitude_threshold(
            base.to(device), [expert.to(device)], k, backend=backend
        )
        assert got.item() == taus.sort(descending=True).values[k - 1].item()
    # All magnitudes equal: every rank gives that value.
    same = torch.full((300,), 0.125)
    got = fastmerge.ops.magnitude_threshold(
        torch.zeros(300).to(device), [same.to(device), (-same).to(device)], 17, backend=backend
    )
    assert got.tolist() == [0.125, 0.125]


@pytest.mark.parametrize("backend,device", backend_params())
def test_mixed_dtypes_and_shapes(backend, device):
    base, experts = _inputs(97, 3, torch.float32, seed=3)
    experts = [experts[0].bfloat16(), experts[1].half(), experts[2]]
    base2d, experts2d = base.reshape(97, 1), [e.reshape(97, 1) for e in experts]
    got = fastmerge.ops.magnitude_threshold(
        base2d.to(device), [e.to(device) for e in experts2d], 30, backend=backend
    )
    assert torch.equal(got.cpu(), reference(base, [e.float() for e in experts], 30))
    wide = fastmerge.ops.magnitude_threshold(
        base.double().to(device), [e.to(device) for e in experts], 30, backend=backend
    )
    assert wide.dtype == torch.float64


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_tensor(backend, device):
    got = fastmerge.ops.magnitude_threshold(
        torch.empty(0, 3).to(device), [torch.empty(0, 3).to(device)] * 2, 0, backend=backend
    )
    assert got.tolist() == [0.0, 0.0]


def test_bad_input_names_the_argument():
    base = torch.zeros(4)
    with pytest.raises(ValueError, match=r"experts\[1\] has shape"):
        fastmerge.ops.magnitude_threshold(base, [torch.ones(4), torch.ones(5)], 1)
    with pytest.raises(ValueError, match="experts is empty"):
        fastmerge.ops.magnitude_threshold(base, [], 1)
    with pytest.raises(ValueError, match="k must be in"):
        fastmerge.ops.magnitude_threshold(base, [torch.ones(4)], 5)
    with pytest.raises(ValueError, match="k must be in"):
        fastmerge.ops.magnitude_threshold(base, [torch.ones(4)], 0)
    with pytest.raises(TypeError, match="k must be an integer"):
        fastmerge.ops.magnitude_threshold(base, [torch.ones(4)], 1.5)
    with pytest.raises(TypeError, match="base"):
        fastmerge.ops.magnitude_threshold(base.int(), [torch.ones(4)], 1)
    with pytest.raises(TypeError, match=r"experts\[0\]"):
        fastmerge.ops.magnitude_threshold(base, [torch.ones(4, dtype=torch.int32)], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_large_tensor_with_a_crowded_bin(dtype):
    """Enough entries that the selected histogram bin holds thousands of keys (the CPU
    then counts one more radix digit before nth_element): still the exact k-th value."""
    n = 1_000_003
    base, experts = _inputs(n, 3, dtype, seed=11)
    narrow = (base.double() + 1e-3 * (1 + torch.rand(n, dtype=torch.float64))).to(dtype)
    experts = [*experts, narrow]  # magnitudes within one octave: one crowded bin
    for k in (1, 2, n // 3, n // 2 + 1, n - 1, n):
        got = fastmerge.ops.magnitude_threshold(base, experts, k, backend="cpu")
        assert torch.equal(got, reference(base, experts, k)), k


def test_cpu_exact_when_the_sample_misleads():
    """The CPU kernel estimates the k-th largest from 64 evenly spaced chunks of 512
    entries and selects in a band around the estimate; here the sampled chunks hold tiny
    deltas and the rest large ones, so the band misses and the exact two-pass selection
    must take over: the answer is the same."""
    n = 1 << 20
    g = torch.Generator().manual_seed(12)
    base = torch.zeros(n)
    delta = 1.0 + torch.rand(n, generator=g)
    for c in range(64):
        i0 = (n - 512) * c // 63
        delta[i0 : i0 + 512] = 1e-3 * torch.rand(512, generator=g)
    experts = [base + delta, base - 2 * delta]
    for k in (1, 1000, n // 3, n - 5000, n):
        got = fastmerge.ops.magnitude_threshold(base, experts, k, backend="cpu")
        assert torch.equal(got, reference(base, experts, k)), k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tied", [False, True])
def test_cpu_one_pass_selection_of_large_tensors(dtype, tied):
    """Tensors of 2^18 entries or more take the CPU's sampled one-pass selection."""
    n = 300_007
    base, experts = _inputs(n, 3, dtype, seed=13, tied=tied)
    for k in (1, 7, n // 10, (3 * n) // 10, n // 2, n - 1, n):
        got = fastmerge.ops.magnitude_threshold(base, experts, k, backend="cpu")
        assert torch.equal(got, reference(base, experts, k)), (k, got, reference(base, experts, k))
