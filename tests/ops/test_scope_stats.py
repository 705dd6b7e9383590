"""scope_stats: every backend against the float64 two-pass reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastmerge
from fastmerge.reference.scope_stats import scope_stats as reference_table

from ..conftest import backend_params

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# 0, 1, odd, and around the CPU/CUDA chunk (65536) and the Triton chunk (16384).
SIZES = [0, 1, 97, 16383, 16385, 65535, 65537]


def _reference(tensors):
    table = reference_table(tensors)
    return table[0], table[1], table[2]


def _assert_close(stats, tensors, rtol):
    """Relative error of std, and of mean measured against the tensor's scale
    |mean| + std (a mean of ~0 has no meaningful relative error of its own)."""
    mean, std, count = _reference(tensors)
    torch.testing.assert_close(stats.count.cpu(), count.cpu(), rtol=0, atol=0)
    got_mean, got_std = stats.mean.cpu(), stats.std.cpu()
    assert torch.equal(got_mean.isnan(), mean.isnan()) and torch.equal(got_std.isnan(), std.isnan())
    ok = ~mean.isnan()
    scale = mean[ok].abs() + std[ok]
    mean_error = ((got_mean[ok] - mean[ok]).abs() / scale).max() if ok.any() else 0.0
    std_error = (
        ((got_std[ok] - std[ok]).abs() / std[ok].clamp_min(1e-300)).max() if ok.any() else 0.0
    )
    assert float(mean_error) <= rtol, f"mean relative error {float(mean_error):.3g} > {rtol}"
    assert float(std_error) <= rtol, f"std relative error {float(std_error):.3g} > {rtol}"


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_for_all_dtypes_and_odd_sizes(backend, device, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(n, generator=g) * 0.3 + 0.1).to(dtype).to(device) for n in SIZES]
    stats = fastmerge.scope_stats(tensors, backend=backend)
    assert stats.mean.dtype == torch.float64
    assert stats.mean.device.type == device
    _assert_close(stats, tensors, rtol=1e-12)


@pytest.mark.parametrize("backend,device", backend_params())
def test_no_cancellation_when_mean_dwarfs_std(backend, device):
    # |mean| = 1e4 * std: a naive sum-of-squares loses every digit here.
    g = torch.Generator().manual_seed(1)
    tensors = [
        torch.randn(200_003, generator=g) * 1.5 + 1.5e4,
        torch.randn(3000, generator=g) * 1e-3 - 10.0,
    ]
    tensors = [t.to(device) for t in tensors]
    stats = fastmerge.scope_stats(tensors, backend=backend)
    _assert_close(stats, tensors, rtol=1e-9)


@pytest.mark.parametrize("backend,device", backend_params())
def test_many_tensors_one_call(backend, device):
    g = torch.Generator().manual_seed(2)
    count = 300 if backend == "triton" else 2000
    tensors = [
        torch.randn(int(n), generator=g).to(device)
        for n in torch.randint(1, 200, (count,), generator=g)
    ]
    _assert_close(fastmerge.scope_stats(tensors, backend=backend), tensors, rtol=1e-12)


@pytest.mark.parametrize("backend,device", backend_params())
def test_mixed_dtypes_shapes_and_non_contiguous(backend, device):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=g)
    tensors = [
        base.t().to(device),
        base[:, ::3].to(torch.float16).to(device),
        torch.randn(5, 4, 3, generator=g).to(torch.bfloat16).to(device),
        torch.randn(17, generator=g, dtype=torch.float64).to(device),
    ]
    assert not tensors[0].is_contiguous()
    _assert_close(fastmerge.scope_stats(tensors, backend=backend), tensors, rtol=1e-12)


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_tensor_gives_count_zero_and_nan(backend, device):
    tensors = [torch.empty(0, 3, device=device), torch.ones(4, device=device)]
    stats = fastmerge.scope_stats(tensors, backend=backend)
    assert stats.count.tolist() == [0.0, 4.0]
    assert math.isnan(stats.mean[0]) and math.isnan(stats.std[0])
    assert stats.mean[1] == 1.0 and stats.std[1] == 0.0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("backend,device", backend_params())
def test_nan_and_inf_stay_in_their_tensor(backend, device):
    clean = torch.arange(10.0)
    with_nan = clean.clone()
    with_nan[7] = float("nan")
    with_inf = clean.clone()
    with_inf[70 % 10] = float("inf")
    stats = fastmerge.scope_stats(
        [clean.to(device), with_nan.to(device), with_inf.to(device)], backend=backend
    )
    assert math.isnan(stats.mean[1]) and math.isnan(stats.std[1])
    assert not math.isfinite(stats.mean[2]) or not math.isfinite(stats.std[2])
    assert stats.mean[0] == 4.5
    assert abs(float(stats.std[0]) - math.sqrt(8.25)) < 1e-12


def test_result_does_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(300_000, generator=g), torch.randn(1000, generator=g)]
    fastmerge.set_num_threads(1)
    one = fastmerge.scope_stats(tensors, backend="cpu")
    fastmerge.set_num_threads(2)
    two = fastmerge.scope_stats(tensors, backend="cpu")
    fastmerge.set_num_threads(fastmerge.backends.cpu_extension().get_num_threads())
    assert torch.equal(one.mean, two.mean) and torch.equal(one.std, two.std)
    assert fastmerge.get_num_threads() == 2


def test_partials_merge_to_the_whole():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10_001, generator=g, dtype=torch.float64) * 2 + 50
    y = torch.randn(333, generator=g, dtype=torch.float64)
    whole = fastmerge.scope_stats([x, y])
    parts = [fastmerge.scope_stats([x[:s], y[:t]]) for s, t in ((0, 0),)]
    first = fastmerge.scope_stats([x[:4000], y[:1]])
    second = fastmerge.scope_stats([x[4000:7000], y[1:200]])
    third = fastmerge.scope_stats([x[7000:], y[200:]])
    merged = parts[0].merge(first).merge(second).merge(third)
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(merged.std, whole.std, rtol=1e-12, atol=0)
    assert merged.count.tolist() == whole.count.tolist()


def test_numpy_and_dlpack_inputs():
    class DLPackOnly:
        """An array type fastmerge knows nothing about but DLPack."""

        def __init__(self, array):
            self._array = array

        def __dlpack__(self, **kwargs):
            return self._array.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self._array.__dlpack_device__()

    a = np.linspace(-1, 3, 101, dtype=np.float32)
    stats = fastmerge.scope_stats([a, DLPackOnly(a.astype(np.float64))])
    assert stats.mean.tolist() == pytest.approx([1.0, 1.0], rel=1e-7)
    assert stats.std[0] == pytest.approx(np.std(a.astype(np.float64)), rel=1e-7)


def test_empty_list_gives_empty_stats():
    assert len(fastmerge.scope_stats([])) == 0


@pytest.mark.parametrize(
    "tensors,error,words",
    [
        (torch.ones(3), TypeError, "list"),
        ((t for t in [torch.ones(3)]), TypeError, "list"),
        ([torch.ones(3), torch.arange(3)], TypeError, "tensors[1]"),
        ([torch.ones(3), torch.ones(2, dtype=torch.complex64)], TypeError, "tensors[1]"),
        ([torch.ones(3), "abc"], TypeError, "tensors[1]"),
        ([torch.ones(3), torch.ones(3, device="meta")], ValueError, "tensors[1]"),
    ],
)
def test_bad_input_names_the_culprit(tensors, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        fastmerge.scope_stats(tensors)
