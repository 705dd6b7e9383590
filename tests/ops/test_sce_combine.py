"""sce_combine and sce_variance: every backend against the reference (bit for bit, the
energy weights to float64 rounding), and against SCE written out in plain torch."""

from __future__ import annotations

import shutil

import pytest
import torch

import fastmerge
from fastmerge.ops.sce_combine import _ENERGIES_OP
from fastmerge.reference import sce_combine as reference

from ..conftest import backend_params
from .ptx import triton_kernels_checked
from .test_magnitude_threshold import DTYPES, _inputs, _sizes


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bit for bit (NaNs too), ignoring the NaN payloads."""
    got, want = got.cpu(), want.cpu()
    nan = torch.isnan(got)
    return bool(torch.equal(nan, torch.isnan(want)) and torch.equal(got[~nan], want[~nan]))


def _threshold(base, experts, fraction):
    var = reference.sce_variance(base, experts)
    k = max(1, int(fraction * torch.count_nonzero(var).item()))
    return fastmerge.ops.magnitude_threshold(torch.zeros_like(var), [var], k, backend="reference")


def _want(base, experts, threshold, weights, out_dtype=None):
    out = torch.empty(base.shape, dtype=out_dtype or base.dtype)
    w = torch.as_tensor(weights, dtype=torch.float64)
    if base.numel():
        reference.sce_combine(base, experts, threshold, w, out)
    return out


def _sce_in_torch(base, experts, topk):
    """SCE as its paper writes it, in float64: select by variance, energies, erase."""
    taus = torch.stack([e.double() - base.double() for e in experts])
    if topk < 1:
        var = taus.var(dim=0, unbiased=False)
        k = int(topk * torch.count_nonzero(var).item())
        thr = var.flatten().topk(k).values[-1]
        taus = taus * (var >= thr)
    energy = (taus**2).mean(dim=tuple(range(1, taus.dim())))
    w = energy / energy.sum()
    sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    agrees = (torch.sign(taus) == sign).double()
    wm = w.view(-1, *[1] * base.dim()) * agrees
    return base.double() + (wm * taus).sum(0) / wm.sum(0).clamp(min=1e-6)


def test_hand_computed_example():
    # entry 0: both agree (+), weighted mean; entry 1: sum 0 elects +, only expert 0;
    # entry 2: sum < 0, only expert 1; entry 3: no delta, base itself
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    experts = [torch.tensor([3.0, 3.0, 2.0, 1.0]), torch.tensor([5.0, -1.0, -3.0, 1.0])]
    for backend in fastmerge.backends.usable_backends(torch.device("cpu")):
        if backend == "cuda":
            continue
        got = fastmerge.ops.sce_combine(base, experts, weights=[0.25, 0.75], backend=backend)
        assert got.tolist() == [1.0 + (0.5 + 3.0) / 1.0, 3.0, -3.0, 1.0], backend
        var = fastmerge.ops.sce_variance(base, experts, backend=backend)
        assert var.tolist() == [1.0, 4.0, 6.25, 0.0], backend
        got = fastmerge.ops.sce_combine(
            base, experts, threshold=4.0, weights=[1, 1], backend=backend
        )
        assert got.tolist() == [1.0, 3.0, -3.0, 1.0], backend


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_experts", [1, 3])
def test_matches_reference(backend, device, dtype, num_experts):
    if backend == "cuda":
        pytest.skip("no cuda backend: CUDA tensors take triton")
    for n in _sizes(backend):
        for tied in (False, True):
            base, experts = _inputs(n, num_experts, dtype, seed=n + 3, tied=tied)
            on = [base.to(device), [e.to(device) for e in experts]]
            var = fastmerge.ops.sce_variance(*on, backend=backend)
            assert _same(var, reference.sce_variance(base, experts)), (n, tied)
            for fraction in (None, 0.3, 1.0):
                thr = None if fraction is None else _threshold(base, experts, fraction)
                weights = [0.5, 0.25, 0.125][:num_experts]
                got = fastmerge.ops.sce_combine(
                    *on, threshold=None if thr is None else thr.to(device), weights=weights,
                    backend=backend,
                )  # fmt: skip
                assert got.dtype == dtype and got.shape == base.shape
                assert _same(got, _want(base, experts, thr, weights)), (n, tied, fraction)
                # the energy weights: float64 sums in another order, weights rounded to C
                got = fastmerge.ops.sce_combine(*on, threshold=thr, backend=backend)
                sums = reference.sce_energies(base, experts, thr)
                e = sums / n
                w = e / e.sum() if e.sum() >= 1e-6 else torch.full_like(e, 1 / num_experts)
                torch.testing.assert_close(got.cpu(), _want(base, experts, thr, w))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_output_dtype_mixed_inputs_and_in_place(backend, device, out_dtype):
    if backend == "cuda":
        pytest.skip("no cuda backend")
    base, experts = _inputs(97, 3, torch.float32, seed=5)
    experts = [experts[0].half(), experts[1], experts[2].bfloat16()]
    thr = _threshold(base, [e.float() for e in experts], 0.5)
    out = torch.full((97,), 7.0, dtype=out_dtype, device=device)
    got = fastmerge.ops.sce_combine(
        base.to(device), [e.to(device) for e in experts], threshold=thr, weights=[1, 2, 3],
        out=out, backend=backend,
    )  # fmt: skip
    assert got is out
    assert _same(got, _want(base, [e.float() for e in experts], thr, [1, 2, 3], out_dtype))
    base, experts = _inputs(50, 2, torch.float64, seed=6)
    target = experts[1].clone().to(device)
    got = fastmerge.ops.sce_combine(base.to(device), [experts[0].to(device), target],
                                    weights=[1, 1], out=target, backend=backend)  # fmt: skip
    assert got is target and _same(got, _want(base, experts, None, [1, 1]))


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_equals_sce_in_float64(topk):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(37, 29, generator=g, dtype=torch.float64)
    experts = [base + torch.randn(37, 29, generator=g, dtype=torch.float64) * s for s in (1, 2, 3)]
    thr = None
    if topk < 1:
        var = fastmerge.ops.sce_variance(base, experts)
        k = int(topk * torch.count_nonzero(var).item())
        thr = fastmerge.ops.magnitude_threshold(torch.zeros_like(var), [var], k)
    got = fastmerge.ops.sce_combine(base, experts, threshold=thr)
    torch.testing.assert_close(got, _sce_in_torch(base, experts, topk), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_special_values_and_empty(backend):
    nan, inf = float("nan"), float("inf")
    base = torch.tensor([0.0, 0.0, 0.0, 1.0, -0.0, 2.0])
    experts = [torch.tensor([nan, inf, 1.0, 1.0, -0.0, 3.0]),
               torch.tensor([1.0, -inf, -1.0, 1.0, 0.0, 1.0])]  # fmt: skip
    want = _want(base, experts, None, [0.5, 0.5])
    assert _same(
        fastmerge.ops.sce_combine(base, experts, weights=[0.5, 0.5], backend=backend), want
    )
    for thr in (0.5, 1e30):
        want = _want(base, experts, torch.tensor([thr]), [0.5, 0.5])
        got = fastmerge.ops.sce_combine(base, experts, threshold=thr, backend=backend,
                                        weights=[0.5, 0.5])  # fmt: skip
        assert _same(got, want), thr
    # nothing kept: no energy, uniform weights, the base itself
    got = fastmerge.ops.sce_combine(base[3:], [e[3:] for e in experts], threshold=1e30)
    assert torch.equal(got, base[3:])
    empty = torch.zeros(0, 3)
    assert fastmerge.ops.sce_combine(empty, [empty, empty], backend=backend).shape == (0, 3)
    assert fastmerge.ops.sce_variance(empty, [empty], backend=backend).shape == (0, 3)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda b, e: fastmerge.ops.sce_combine(b, [e[:2]]),
            ValueError,
            "experts\\[0\\] has shape",
        ),
        (lambda b, e: fastmerge.ops.sce_combine(b, []), ValueError, "experts is empty"),
        (lambda b, e: fastmerge.ops.sce_combine(b, [e.int()]), TypeError, "experts\\[0\\]"),
        (lambda b, e: fastmerge.ops.sce_combine(b, [e], weights=[1, 2]), ValueError, "weights"),
        (
            lambda b, e: fastmerge.ops.sce_combine(b, [e], weights=[float("nan")]),
            ValueError,
            "weights must be finite",
        ),  # fmt: skip
        (
            lambda b, e: fastmerge.ops.sce_combine(b, [e], threshold=torch.ones(2)),
            ValueError,
            "threshold must be one number",
        ),  # fmt: skip
        (
            lambda b, e: fastmerge.ops.sce_combine(b, [e], out=torch.empty(3)),
            ValueError,
            "out has shape",
        ),  # fmt: skip
        (
            lambda b, e: fastmerge.ops.sce_combine(b, [e], out=torch.empty(4, 3).t()),
            ValueError,
            "out must be contiguous",
        ),  # fmt: skip
        (
            lambda b, e: fastmerge.ops.sce_combine(b, [e], backend="cuda"),
            fastmerge.backends.BackendUnavailableError,
            "no cuda backend",
        ),  # fmt: skip
        (
            lambda b, e: fastmerge.ops.sce_variance(b, [e], backend="cuda"),
            fastmerge.backends.BackendUnavailableError,
            "no cuda backend",
        ),  # fmt: skip
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, message):
    base = torch.zeros(3, 4)
    with pytest.raises(error, match=message):
        call(base, torch.ones(3, 4))


def test_out_must_not_overlap_an_input():
    big = torch.zeros(40)
    with pytest.raises(ValueError, match="out overlaps experts\\[0\\]"):
        fastmerge.ops.sce_combine(torch.zeros(36), [big[:36]], out=big[4:])


@pytest.mark.aot
@pytest.mark.triton
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on this machine")
def test_triton_kernels_compile_without_fma_and_with_exact_division():
    """On a GPU the Triton kernels must round like the reference: no fused multiply-add
    (the launch options disable it) and correctly rounded divisions."""
    pytest.importorskip("triton")
    from fastmerge.kernels.sce_combine import AOT_SIGNATURES

    no_division = tuple(name for name in AOT_SIGNATURES if "energies" in name and "=False" in name)
    assert triton_kernels_checked("sce_combine", no_division) == len(AOT_SIGNATURES)


def test_cpu_energies_match_the_reference_whatever_the_thread_count():
    base, experts = _inputs(100003, 5, torch.float32, seed=9)
    thr = _threshold(base, experts, 0.4)
    b, es = base, experts
    want = reference.sce_energies(b, es, thr)
    previous = fastmerge.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            fastmerge.set_num_threads(threads)
            results.append(_ENERGIES_OP(b, es, thr.reshape(1), "cpu"))
            merged = fastmerge.ops.sce_combine(b, es, threshold=thr, backend="cpu")
            results.append(merged)
    finally:
        fastmerge.set_num_threads(previous)
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])
    torch.testing.assert_close(results[0], want, rtol=1e-13, atol=0)
