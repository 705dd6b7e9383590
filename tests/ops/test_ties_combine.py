"""ties_combine: every backend against the reference, bit for bit."""

from __future__ import annotations

import shutil

import pytest
import torch

import fastmerge
from fastmerge.reference.ties_combine import ties_combine as reference

from ..conftest import backend_params
from .ptx import triton_kernels_checked
from .test_magnitude_threshold import DTYPES, _inputs, _sizes


def _thresholds(base, experts, fraction):
    n = base.numel()
    k = max(1, min(n, round(fraction * n)))
    return fastmerge.ops.magnitude_threshold(base, experts, k, backend="reference")


def _want(base, experts, thresholds, scale, out_dtype=None):
    out = torch.empty(base.shape, dtype=out_dtype or base.dtype)
    if base.numel():
        reference(base, experts, thresholds, scale, out)
    return out


def test_hand_computed_example():
    # Entry 0: both kept, signs agree -> mean. Entry 1: elected sign +, only expert 1
    # agrees. Entry 2: trimmed by expert 0's threshold, expert 1 alone. Entry 3: sum 0.
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    experts = [torch.tensor([3.0, 0.0, 1.5, 3.0]), torch.tensor([5.0, 4.0, -1.0, -1.0])]
    thresholds = torch.tensor([1.0, 2.0])
    for backend in fastmerge.backends.usable_backends(torch.device("cpu")):
        got = fastmerge.ops.ties_combine(base, experts, thresholds, scale=0.5, backend=backend)
        assert got.tolist() == [2.5, 2.5, 0.0, 1.0], backend


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_experts", [1, 2, 5])
def test_matches_reference(backend, device, dtype, num_experts):
    for n in _sizes(backend):
        for tied in (False, True):
            base, experts = _inputs(n, num_experts, dtype, seed=n + 1, tied=tied)
            for fraction, scale in ((0.3, 0.7), (1.0, 1.0), (1e-9, -1.3)):
                thr = _thresholds(base, experts, fraction)
                got = fastmerge.ops.ties_combine(
                    base.to(device),
                    [e.to(device) for e in experts],
                    thr.to(device),
                    scale=scale,
                    backend=backend,
                )
                want = _want(base, experts, thr, scale)
                assert got.dtype == dtype and got.shape == base.shape
                assert torch.equal(got.cpu(), want), (n, tied, fraction)
                assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_output_dtype_and_mixed_inputs(backend, device, out_dtype):
    base, experts = _inputs(97, 3, torch.float32, seed=5)
    experts = [experts[0].half(), experts[1], experts[2].bfloat16()]
    thr = _thresholds(base, experts, 0.5)
    out = torch.full((97,), 7.0, dtype=out_dtype, device=device)
    got = fastmerge.ops.ties_combine(
        base.to(device), [e.to(device) for e in experts], thr.to(device), out=out, backend=backend
    )
    assert got is out
    want = _want(base, [e.float() for e in experts], thr, 1.0, out_dtype)
    assert torch.equal(got.cpu(), want)
    # float64 inputs: the half types are rounded through float32, as torch does.
    base, experts = _inputs(97, 2, torch.float64, seed=7)
    thr = _thresholds(base, experts, 0.5)
    got = fastmerge.ops.ties_combine(
        base.to(device),
        [e.to(device) for e in experts],
        thr.to(device),
        scale=1 / 3,
        out=torch.empty(97, dtype=out_dtype, device=device),
        backend=backend,
    )
    assert torch.equal(got.cpu(), _want(base, experts, thr, 1 / 3, out_dtype))


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_and_shaped(backend, device):
    empty = torch.empty(0, 4, device=device)
    got = fastmerge.ops.ties_combine(empty, [empty], torch.zeros(1), backend=backend)
    assert got.shape == (0, 4)
    base, experts = _inputs(60, 2, torch.float32, seed=6)
    thr = _thresholds(base, experts, 0.3)
    got = fastmerge.ops.ties_combine(
        base.reshape(6, 10).to(device),
        [e.reshape(6, 10).to(device) for e in experts],
        thr.to(device),
        backend=backend,
    )
    assert got.shape == (6, 10)
    assert torch.equal(got.cpu().flatten(), _want(base, experts, thr, 1.0))


def test_bad_input_names_the_argument():
    base = torch.zeros(4)
    with pytest.raises(ValueError, match="thresholds"):
        fastmerge.ops.ties_combine(base, [torch.ones(4)], torch.zeros(2))
    with pytest.raises(ValueError, match=r"experts\[0\] has shape"):
        fastmerge.ops.ties_combine(base, [torch.ones(3)], torch.zeros(1))
    with pytest.raises(ValueError, match="out"):
        fastmerge.ops.ties_combine(base, [torch.ones(4)], torch.zeros(1), out=torch.empty(5))
    with pytest.raises(ValueError, match="experts is empty"):
        fastmerge.ops.ties_combine(base, [], torch.zeros(0))


@pytest.mark.aot
@pytest.mark.triton
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on this machine")
def test_triton_combine_compiles_without_fma_and_with_exact_division():
    """On a GPU the Triton combine must round like the reference: no fused multiply-add
    (the launch options disable it) and a correctly rounded division."""
    pytest.importorskip("triton")
    assert triton_kernels_checked("ties_combine") >= 4
