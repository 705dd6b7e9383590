"""nearswap: every backend against the reference, bit for bit; the reference against
mergekit's formula and an independent numpy evaluation."""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import fastmerge
from fastmerge.reference.nearswap import nearswap as reference

from ..conftest import backend_params
from .ptx import triton_kernels_checked

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
PAIRS = list(itertools.product(DTYPES, DTYPES))
# The CPU kernel splits the work over two threads once 3 n (two inputs read, the output
# written) reaches 2 * 2^17 elements: 87382 is the first size that takes two threads.
CPU_SPLIT = math.ceil(2 * 2**17 / 3)
# 1, odd, around the CPU block (1024) and its thread alignment (64), and one past the
# multi-thread split.
CPU_SIZES = [1, 2, 63, 65, 1023, 1025, CPU_SPLIT]
# The Triton interpreter is slow: around its block (1024) only.
TRITON_SIZES = [1, 63, 1025]
# t = 0 (w = 0: a), t < 0 (w = 0: a), mid values (w spread over (0, 1)), large (w = 1: b).
T_VALUES = [0.0, -0.2, 0.03, 0.7, 1e6]


def _sizes(backend: str) -> list[int]:
    return TRITON_SIZES if backend == "triton" else CPU_SIZES


def _pair(n: int, a_dtype, b_dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """a ~ N(0, 1) and b = a + noise of scales from 1e-7 to 10 (|a - b| on both sides of
    t and of the 1e-6 floor), with b == a exactly in about a tenth of the entries."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64)
    scale = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 8 - 7)
    b = a + torch.randn(n, generator=g, dtype=torch.float64) * scale
    b = torch.where(torch.rand(n, generator=g) < 0.1, a, b)
    return a.to(a_dtype), b.to(b_dtype)


def _want(a, b, t, out_dtype=None) -> torch.Tensor:
    out = torch.empty(a.shape, dtype=out_dtype or a.dtype)
    if out.numel():
        reference(a.reshape(-1), b.reshape(-1), t, out.view(-1))
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit equal (signed zeros included), except that a NaN matches any NaN: NaN
    payloads are not specified (torch's own bfloat16 rounding of NaN gives 0xFFFF)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    a, b = a[~nan].contiguous(), b[~nan].contiguous()
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    diff = (got.double() - want.double()).abs()
    return f"max |diff| {diff.nan_to_num(nan=float('inf')).max().item()}"


# ---- the formula ------------------------------------------------------------------------


def test_hand_computed_example():
    # d = |a - b|, floored at 1e-6; w = t / d clamped to [0, 1]; w b + (1 - w) a.
    a = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, 0.0, 4.0])
    b = torch.tensor([0.5, 1.0, 0.0, 3.0, 1.0, 5e-7, 4.0 + 2**-20], dtype=torch.bfloat16)
    b32 = b.float()
    t = 0.25
    # 0: d = 0.5, w = 0.5: 0.25; 1: a == b, w = 1: 1; 2: d = 2, w = 1/8: 7/8 * 2 = 1.75;
    # 3: a == b: 3; 4: d = 2, w = 1/8: 1/8 - 7/8 = -0.75; 5: d = 5e-7 (bf16) floored to
    # 1e-6, w = 1: b; 6: b rounds to 4 in bfloat16: 4.
    want = [0.25, 1.0, 1.75, 3.0, -0.75, b32[5].item(), 4.0]
    # t = 2.5e-7 on entry 5: w = 2.5e-7 / 1e-6 = 0.25 (not 0.5: the floor), 0.25 b
    small = torch.tensor([0.0]), torch.tensor([5e-7])
    small_want = np.float32(np.float32(2.5e-7) / np.float32(1e-6)) * np.float32(5e-7)
    for backend in fastmerge.backends.usable_backends(torch.device("cpu")):
        got = fastmerge.ops.nearswap(a, b, t, backend=backend)
        assert got.dtype == torch.float32
        assert got.tolist() == want, backend
        got = fastmerge.ops.nearswap(*small, 2.5e-7, backend=backend)
        assert got.item() == float(small_want), backend
        assert abs(got.item() - 1.25e-7) < 1e-13, backend


def _mergekit_formula(a: torch.Tensor, b: torch.Tensor, t) -> torch.Tensor:
    """mergekit 0.1.5's nearswap_merge, verbatim (mergekit/merge_methods/nearswap.py)."""
    absdiff = torch.abs(a - b)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


@pytest.mark.parametrize("t", [0.0, 1e-7, 0.03, 0.7, 1e6])
def test_reference_is_mergekits_formula_in_float32(t):
    a, b = _pair(100_003, torch.float32, torch.float32, seed=1)
    got = _want(a, b, t)
    # with t a float32 tensor, t / x is a true division: the very same bits
    exact = _mergekit_formula(a, b, torch.tensor(t, dtype=torch.float32))
    assert _same_bits(got, exact), _mismatch(got, exact)
    # with t a Python number torch computes t / x as x.reciprocal() * t, which can differ
    # in the last bit of w; the results then differ by about an ulp of |b - a|
    literal = _mergekit_formula(a, b, t)
    bound = 2**-22 * (a - b).abs() + 2**-23 * (a.abs() + b.abs())
    assert ((got - literal).abs() <= bound).all()
    # the mixed dtypes of a merge: bfloat16 inputs, evaluated in float32 like the op does
    a16, b16 = _pair(10_007, torch.bfloat16, torch.bfloat16, seed=2)
    got = _want(a16, b16, t, torch.float32)
    exact = _mergekit_formula(a16.float(), b16.float(), torch.tensor(t, dtype=torch.float32))
    assert _same_bits(got, exact), _mismatch(got, exact)


@pytest.mark.parametrize("float64", [False, True])
def test_reference_against_numpy_step_by_step(float64):
    """Independent of torch: numpy's IEEE float32 (float64) operations, one at a time."""
    a_dtype = torch.float64 if float64 else torch.bfloat16
    a, b = _pair(20_011, a_dtype, torch.float16, seed=3)
    c = np.float64 if float64 else np.float32
    x, y = a.double().numpy().astype(c), b.double().numpy().astype(c)
    for t in T_VALUES + [1e-7]:
        with np.errstate(all="ignore"):
            d = np.abs(x - y)
            d = np.where(d < c(1e-6), c(1e-6), d)
            w = c(t) / d
            w = np.where(w < c(0), c(0), w)
            w = np.where(w > c(1), c(1), w)
            want = (w * y) + ((c(1) - w) * x)
        got = _want(a, b, t, torch.float64 if float64 else torch.float32)
        assert _same_bits(got, torch.from_numpy(want)), (t, _mismatch(got, torch.from_numpy(want)))


# ---- every backend against the reference ------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("a_dtype,b_dtype", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_matches_reference(backend, device, a_dtype, b_dtype):
    for n in _sizes(backend):
        a, b = _pair(n, a_dtype, b_dtype, seed=n)
        for t in T_VALUES:
            got = fastmerge.ops.nearswap(a.to(device), b.to(device), t, backend=backend)
            want = _want(a, b, t)
            assert got.shape == (n,) and got.dtype == a_dtype
            assert _same_bits(got.cpu(), want), (n, t, _mismatch(got.cpu(), want))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_out_dtype(backend, device, out_dtype):
    n = 1025
    for a_dtype, b_dtype in [
        (torch.float32, torch.bfloat16),  # float32 arithmetic
        (torch.float16, torch.float64),  # float64 arithmetic, half output through float32
        (torch.bfloat16, torch.float16),
    ]:
        a, b = _pair(n, a_dtype, b_dtype, seed=5)
        got = fastmerge.ops.nearswap(
            a.to(device), b.to(device), 0.05, out_dtype=out_dtype, backend=backend
        )
        assert got.dtype == out_dtype
        assert _same_bits(got.cpu(), _want(a, b, 0.05, out_dtype)), (a_dtype, b_dtype)
        out = torch.full((n,), 7.0, dtype=out_dtype, device=device)
        got = fastmerge.ops.nearswap(a.to(device), b.to(device), 0.05, out=out, backend=backend)
        assert got is out
        assert _same_bits(got.cpu(), _want(a, b, 0.05, out_dtype)), (a_dtype, b_dtype)


@pytest.mark.parametrize("backend,device", backend_params())
def test_out_may_be_a_or_b(backend, device):
    for dtype in (torch.float32, torch.bfloat16):
        a, b = _pair(1025, dtype, dtype, seed=8)
        want = _want(a, b, 0.1)
        a_dev, b_dev = a.to(device, copy=True), b.to(device, copy=True)
        got = fastmerge.ops.nearswap(a_dev, b_dev, 0.1, out=a_dev, backend=backend)
        assert got is a_dev
        assert _same_bits(got.cpu(), want)
        a_dev, b_dev = a.to(device, copy=True), b.to(device, copy=True)
        got = fastmerge.ops.nearswap(a_dev, b_dev, 0.1, out=b_dev, backend=backend)
        assert got is b_dev
        assert _same_bits(got.cpu(), want)


@pytest.mark.parametrize("backend,device", backend_params())
def test_limits_of_t(backend, device):
    """t <= 0: w = 0, the result is a; a large t: w = 1, the result is b."""
    for a_dtype, b_dtype in [(torch.float32, torch.float32), (torch.float64, torch.bfloat16)]:
        a, b = _pair(1025, a_dtype, b_dtype, seed=9)
        for t in (0.0, -0.0, -0.2, -1e30):
            got = fastmerge.ops.nearswap(a.to(device), b.to(device), t, backend=backend)
            assert torch.equal(got.cpu(), a), t
        got = fastmerge.ops.nearswap(a.to(device), b.to(device), 1e30, backend=backend)
        assert torch.equal(got.cpu(), b.to(a_dtype))
        if a_dtype != b_dtype:
            continue
        # w = t / 1e-6 >= 1 wherever a == b: exactly b there, and never a NaN
        equal = a == b
        assert equal.any()
        got = fastmerge.ops.nearswap(a.to(device), b.to(device), 1e-5, backend=backend).cpu()
        assert torch.equal(got[equal], a[equal])


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_entries_take_the_floor(backend, device, dtype):
    """a == b: d = 1e-6, not 0, so t = 0 gives w = 0 (not 0 / 0 = NaN) and a small t a
    w below 1 (t = 1e-7: w = 0.1, the result 0.1 a + 0.9 a rounded, not 0 / 0)."""
    a = _pair(1025, dtype, dtype, seed=10)[0]
    for t in (0.0, 1e-7, 5e-7, 1e-6, 2e-6):
        got = fastmerge.ops.nearswap(a.to(device), a.to(device), t, backend=backend).cpu()
        assert not got.isnan().any(), t
        assert _same_bits(got, _want(a, a, t)), (t, _mismatch(got, _want(a, a, t)))
        assert torch.allclose(got.double(), a.double(), rtol=2**-20, atol=0), t


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_shaped_and_strided(backend, device):
    empty = torch.empty(0, 4, device=device)
    got = fastmerge.ops.nearswap(empty, empty, 0.5, backend=backend)
    assert got.shape == (0, 4) and got.dtype == torch.float32
    got = fastmerge.ops.nearswap(
        torch.empty(0, device=device),
        torch.empty(0, dtype=torch.float16, device=device),
        0.5,
        out_dtype=torch.bfloat16,
        backend=backend,
    )
    assert got.shape == (0,) and got.dtype == torch.bfloat16
    a, b = _pair(60, torch.float32, torch.float32, seed=6)
    a2, b2 = a.reshape(6, 10), b.reshape(6, 10)
    got = fastmerge.ops.nearswap(a2.to(device), b2.to(device), 0.2, backend=backend)
    assert got.shape == (6, 10)
    assert _same_bits(got.cpu(), _want(a2, b2, 0.2))
    # a transposed (non-contiguous) input is read in its logical order
    at, bt = a.reshape(6, 10).t(), b.reshape(10, 6)
    got = fastmerge.ops.nearswap(at.to(device), bt.to(device), 0.2, backend=backend)
    assert got.is_contiguous()
    assert _same_bits(got.cpu(), _want(at.contiguous(), bt, 0.2))
    got = fastmerge.ops.nearswap(bt.to(device), at.to(device), 0.2, backend=backend)
    assert _same_bits(got.cpu(), _want(bt, at.contiguous(), 0.2))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("backend,device", backend_params())
def test_special_values(backend, device):
    """NaN, infinities, signed zeros, subnormals: whatever the formula gives (a NaN in a or
    b gives a NaN; an infinite a gives w = 0 and a; an infinite b gives 0 * inf = NaN),
    the same on every backend."""
    inf, nan = float("inf"), float("nan")
    a = torch.tensor([0.0, -0.0, 1e-40, 3e38, inf, nan, 1.0, -0.0, 70000.0, 1.0, -3e38, 0.0, -0.0])
    b = torch.tensor([-0.0, -0.0, 2e-40, -3e38, 1.0, 1.0, -inf, 0.0, 1.0, nan, 3e38, 1e-45, 1e30])
    for t in (0.0, -1e-30, 1e-38, 0.5, 1e30):
        for out_dtype in DTYPES:
            got = fastmerge.ops.nearswap(
                a.to(device), b.to(device), t, out_dtype=out_dtype, backend=backend
            )
            assert _same_bits(got.cpu(), _want(a, b, t, out_dtype)), (t, out_dtype)
        got = fastmerge.ops.nearswap(a.double().to(device), b.to(device), t, backend=backend)
        assert _same_bits(got.cpu(), _want(a.double(), b, t)), t
    want = _want(a, b, 0.5)
    assert want[5].isnan() and want[9].isnan() and want[6].isnan()  # NaN a, NaN b, inf b
    assert want[4].item() == inf  # inf a: d = inf, w = 0
    # |a - b| = inf for -3e38 and 3e38 (the subtraction rounded in float32): w = 0, a
    assert want[10] == a[10] and want[3] == a[3]
    # t = -1e-30, d = 1e30: w = -1e-60 underflows to -0 and stays -0 (as in torch.clamp),
    # so w * b = -0 and the result is -0 + -0 = -0 (a w of +0 would give +0)
    assert math.copysign(1.0, _want(a, b, -1e-30)[12].item()) == -1.0


def test_cpu_result_does_not_depend_on_thread_count():
    a, b = _pair(300_001, torch.bfloat16, torch.float32, seed=11)
    before = fastmerge.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            fastmerge.set_num_threads(threads)
            results.append(fastmerge.ops.nearswap(a, b, 0.01, backend="cpu"))
    finally:
        fastmerge.set_num_threads(before)
    assert all(_same_bits(r, results[0]) for r in results[1:])
    assert _same_bits(results[0], _want(a, b, 0.01))


def test_default_backend_and_any_number_for_t():
    a, b = _pair(100, torch.float32, torch.float16, seed=12)
    want = _want(a, b, 0.5)
    assert _same_bits(fastmerge.ops.nearswap(a, b, 0.5), want)
    assert _same_bits(fastmerge.ops.nearswap(a, b, torch.tensor(0.5)), want)
    assert _same_bits(fastmerge.ops.nearswap(a, b, np.float32(0.5)), want)
    assert _same_bits(fastmerge.ops.nearswap(a.numpy(), b.numpy(), 1 / 2), want)
    assert _same_bits(fastmerge.ops.nearswap(a, b, 3), _want(a, b, 3.0))


def test_bad_input_names_the_argument():
    a = torch.zeros(4)
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        fastmerge.ops.nearswap([1.0, 2.0], a, 0.5)
    with pytest.raises(TypeError, match="b has dtype torch.int64"):
        fastmerge.ops.nearswap(a, torch.zeros(4, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="a has dtype torch.bool"):
        fastmerge.ops.nearswap(torch.zeros(4, dtype=torch.bool), a, 0.5)
    with pytest.raises(ValueError, match=r"b has shape \(3,\) but a has \(4,\)"):
        fastmerge.ops.nearswap(a, torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="b is on meta but a is on cpu"):
        fastmerge.ops.nearswap(a, torch.zeros(4, device="meta"), 0.5)
    with pytest.raises(ValueError, match="t is nan"):
        fastmerge.ops.nearswap(a, a, float("nan"))
    with pytest.raises(ValueError, match="t is -inf"):
        fastmerge.ops.nearswap(a, a, -math.inf)
    with pytest.raises(TypeError, match="t is not a number"):
        fastmerge.ops.nearswap(a, a, "0.5")
    with pytest.raises(TypeError, match="t is not a number"):
        fastmerge.ops.nearswap(a, a, None)
    with pytest.raises(TypeError, match="t is a bool"):
        fastmerge.ops.nearswap(a, a, True)
    with pytest.raises(TypeError, match="out_dtype"):
        fastmerge.ops.nearswap(a, a, 0.5, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        fastmerge.ops.nearswap(a, a, 0.5, out=np.zeros(4, dtype=np.float32))
    with pytest.raises(TypeError, match="out has dtype torch.int32"):
        fastmerge.ops.nearswap(a, a, 0.5, out=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="out has shape"):
        fastmerge.ops.nearswap(a, a, 0.5, out=torch.empty(5))
    with pytest.raises(ValueError, match="out has dtype torch.float64 but out_dtype"):
        fastmerge.ops.nearswap(
            a, a, 0.5, out=torch.empty(4, dtype=torch.float64), out_dtype=torch.float32
        )
    with pytest.raises(ValueError, match="out is on meta"):
        fastmerge.ops.nearswap(a, a, 0.5, out=torch.empty(4, device="meta"))
    with pytest.raises(ValueError, match="out must be contiguous"):
        fastmerge.ops.nearswap(a, a, 0.5, out=torch.empty(8)[::2])
    big = torch.zeros(8)
    with pytest.raises(ValueError, match="out overlaps a"):
        fastmerge.ops.nearswap(big[:4], a, 0.5, out=big[2:6])
    with pytest.raises(ValueError, match="out overlaps b"):
        fastmerge.ops.nearswap(a, big[:4], 0.5, out=big[1:5])
    wide = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="out overlaps a"):  # same memory, another dtype
        fastmerge.ops.nearswap(wide.view(torch.float32)[:4], a, 0.5, out=wide)
    with pytest.raises(fastmerge.BackendUnavailableError, match="cuda"):
        fastmerge.ops.nearswap(a, a, 0.5, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastmerge.ops.nearswap(a, a, 0.5, backend="gpu")


@pytest.mark.aot
@pytest.mark.triton
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on this machine")
def test_triton_kernel_compiles_without_fma_and_with_ieee_division():
    """On a GPU the Triton kernel must round like the reference: no fused multiply-add,
    and t / d the IEEE division (Triton's float32 `/` is the approximate div.full)."""
    pytest.importorskip("triton")
    assert triton_kernels_checked("nearswap") == 8


@pytest.mark.aot
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on this machine")
def test_cuda_kernel_compiles_without_fma_and_with_ieee_division(tmp_path):
    """nvcc fuses a * b + c into an FMA unless every step is an explicit _rn intrinsic, and
    the division must be the IEEE one: the PTX of every instantiation says so."""
    source = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "cuda", "nearswap.cu")
    include = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "include")
    ptx = tmp_path / "nearswap.ptx"
    result = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-I", include, "-ptx", source, "-o", str(ptx)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.strip() == "", result.stderr  # no warnings
    text = ptx.read_text()
    assert text.count(".entry") == 8  # float32 / float64 times four output dtypes
    assert not re.search(r"\bfma\.", text)
    assert len(re.findall(r"\bdiv\.rn\.f32\b", text)) >= 4
    assert len(re.findall(r"\bdiv\.rn\.f64\b", text)) >= 4
    assert not re.search(r"\bdiv\.(full|approx)\.", text)
