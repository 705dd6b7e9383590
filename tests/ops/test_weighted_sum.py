"""weighted_sum: every backend against the reference, bit for bit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastmerge
from fastmerge.reference.weighted_sum import weighted_sum as reference

from ..conftest import backend_params

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# 1, odd, around the CPU block (1024) and its thread alignment (64), and past the size
# where the CPU splits the work over two threads (2^17 elements read and written each).
CPU_SIZES = [1, 2, 63, 65, 97, 1023, 1024, 1025, 100003]
# The Triton interpreter is slow: around its block (1024) only.
TRITON_SIZES = [1, 97, 1025]
WEIGHTS = [0.3, -1.7, 2.5, 1e-3, -0.0625, 7.0]


def _sizes(backend: str) -> list[int]:
    return TRITON_SIZES if backend == "triton" else CPU_SIZES


def _inputs(n: int, count: int, dtypes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if not isinstance(dtypes, (list, tuple)):
        dtypes = [dtypes] * count
    return [(torch.randn(n, generator=g) * (t + 1)).to(dtypes[t]) for t in range(count)]


def _want(tensors, weights, out_dtype=None, dtype=None):
    out = torch.empty(tensors[0].shape, dtype=out_dtype or tensors[0].dtype)
    if out.numel():
        reference([t.reshape(-1) for t in tensors], weights, out.view(-1), dtype)
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


def test_hand_computed_example():
    a = torch.tensor([1.0, 2.0, -4.0])
    b = torch.tensor([3.0, 5.0, 0.5], dtype=torch.bfloat16)
    c = torch.tensor([0.0, -8.0, 2.0], dtype=torch.float16)
    for backend in fastmerge.backends.usable_backends(torch.device("cpu")):
        got = fastmerge.ops.weighted_sum([a, b, c], [0.5, 0.25, 0.125], backend=backend)
        assert got.dtype == torch.float32
        assert got.tolist() == [1.25, 1.25, -1.625], backend


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 2, 5])
def test_matches_reference(backend, device, dtype, count):
    weights = WEIGHTS[:count]
    for n in _sizes(backend):
        tensors = _inputs(n, count, dtype, seed=n + count)
        got = fastmerge.ops.weighted_sum([t.to(device) for t in tensors], weights, backend=backend)
        want = _want(tensors, weights)
        assert got.shape == (n,)
        assert _same_bits(got.cpu(), want), (n, (got.cpu().double() - want.double()).abs().max())


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_mixed_input_dtypes_and_out_dtype(backend, device, out_dtype):
    n = 1025
    # float32 and the half types: accumulated in float32
    tensors = _inputs(n, 3, [torch.float32, torch.bfloat16, torch.float16], seed=3)
    weights = [0.5, -1.25, 1 / 3]
    got = fastmerge.ops.weighted_sum(
        [t.to(device) for t in tensors], weights, out_dtype=out_dtype, backend=backend
    )
    assert got.dtype == out_dtype
    assert _same_bits(got.cpu(), _want(tensors, weights, out_dtype))
    # any float64 input: accumulated in float64; the half types rounded through float32
    tensors = _inputs(n, 4, [torch.bfloat16, torch.float64, torch.float16, torch.float32], 4)
    weights = [1 / 3, -0.1, 2.0, 0.7]
    out = torch.full((n,), 7.0, dtype=out_dtype, device=device)
    got = fastmerge.ops.weighted_sum(
        [t.to(device) for t in tensors], weights, out=out, backend=backend
    )
    assert got is out
    assert _same_bits(got.cpu(), _want(tensors, weights, out_dtype))


@pytest.mark.parametrize("backend,device", backend_params())
def test_float64_accumulation_on_request(backend, device):
    """Task arithmetic as a weighted sum, (1 - λT)·base + λ Σ θ_t: its terms cancel, and
    float64 accumulation keeps the result within float32 rounding of the exact value."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(1025, generator=g) * 0.02
    experts = [base + 1e-3 * torch.randn(1025, generator=g) for _ in range(8)]
    tensors, weights = [base, *experts], [1 - 2.0 * 8] + [2.0] * 8
    got = fastmerge.ops.weighted_sum(
        [t.to(device) for t in tensors], weights, backend=backend, accumulate_dtype=torch.float64
    )
    assert got.dtype == torch.float32
    assert _same_bits(got.cpu(), _want(tensors, weights, dtype=torch.float64))
    exact = base.double() + 2.0 * sum(e.double() - base.double() for e in experts)
    assert torch.equal(got.cpu(), exact.float())  # rounded once here (exact products)
    plain = fastmerge.ops.weighted_sum([t.to(device) for t in tensors], weights, backend=backend)
    assert (plain.cpu().double() - exact).abs().max() > 0  # float32 accumulation is not


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_shaped_and_strided(backend, device):
    empty = torch.empty(0, 4, device=device)
    got = fastmerge.ops.weighted_sum([empty, empty], [1.0, 2.0], backend=backend)
    assert got.shape == (0, 4) and got.dtype == torch.float32
    got = fastmerge.ops.weighted_sum(
        [torch.empty(0, device=device)], [1.0], out_dtype=torch.bfloat16, backend=backend
    )
    assert got.shape == (0,) and got.dtype == torch.bfloat16
    a, b = _inputs(60, 2, torch.float32, seed=6)
    got = fastmerge.ops.weighted_sum(
        [a.reshape(6, 10).to(device), b.reshape(6, 10).to(device)], [0.5, 0.5], backend=backend
    )
    assert got.shape == (6, 10)
    assert _same_bits(got.cpu(), _want([a.reshape(6, 10), b.reshape(6, 10)], [0.5, 0.5]))
    # a transposed (non-contiguous) input is read in its logical order
    at = a.reshape(6, 10).t()
    bt = b.reshape(10, 6)
    got = fastmerge.ops.weighted_sum([at.to(device), bt.to(device)], [1.0, -2.0], backend=backend)
    assert _same_bits(got.cpu(), _want([at.contiguous(), bt], [1.0, -2.0]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("backend,device", backend_params())
def test_special_values(backend, device):
    inf, nan = float("inf"), float("nan")
    a = torch.tensor([0.0, -0.0, 1e-40, 3e38, inf, nan, 1.0, -0.0, 70000.0, 1.0])
    b = torch.tensor([-0.0, -0.0, 1e-40, 3e38, 1.0, 1.0, -inf, 0.0, 1.0, 1.0 + 2**-9])
    for weights in ([1.0, 1.0], [-1.0, 0.5], [0.0, 1.0]):
        for out_dtype in DTYPES:
            got = fastmerge.ops.weighted_sum(
                [a.to(device), b.to(device)], weights, out_dtype=out_dtype, backend=backend
            )
            assert _same_bits(got.cpu(), _want([a, b], weights, out_dtype)), (weights, out_dtype)
    # a single input: the first product itself (negative zero stays negative)
    got = fastmerge.ops.weighted_sum([a.to(device)], [-1.0], backend=backend)
    assert _same_bits(got.cpu(), _want([a], [-1.0]))


@pytest.mark.parametrize("backend,device", backend_params())
def test_out_may_be_an_input(backend, device):
    a, b = _inputs(1025, 2, torch.float32, seed=8)
    want = _want([a, b], [0.5, 2.0])
    a_dev, b_dev = a.to(device), b.to(device)
    got = fastmerge.ops.weighted_sum([a_dev, b_dev], [0.5, 2.0], out=a_dev, backend=backend)
    assert got is a_dev
    assert _same_bits(got.cpu(), want)


def test_cpu_result_does_not_depend_on_thread_count():
    tensors = _inputs(300_001, 3, [torch.float32, torch.bfloat16, torch.float32], seed=9)
    before = fastmerge.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            fastmerge.set_num_threads(threads)
            results.append(fastmerge.ops.weighted_sum(tensors, [0.1, 0.2, 0.7], backend="cpu"))
    finally:
        fastmerge.set_num_threads(before)
    assert all(_same_bits(r, results[0]) for r in results[1:])
    assert _same_bits(results[0], _want(tensors, [0.1, 0.2, 0.7]))


def test_accuracy_against_float64():
    """The float32 result is the float64 sum rounded once, up to the float32 rounding of
    the products and partial sums: within a few ulps of the exact value."""
    tensors = _inputs(10_000, 4, torch.float32, seed=10)
    weights = [0.25, 0.25, 0.25, 0.25]
    got = fastmerge.ops.weighted_sum(tensors, weights)
    exact = sum(w * t.double() for w, t in zip(weights, tensors))
    scale = sum(abs(w) * t.double().abs() for w, t in zip(weights, tensors))
    assert ((got.double() - exact).abs() <= 4 * 2**-24 * scale).all()


def test_bad_input_names_the_argument():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match="tensors is empty"):
        fastmerge.ops.weighted_sum([], [])
    with pytest.raises(TypeError, match="list or tuple"):
        fastmerge.ops.weighted_sum(a, [1.0])
    with pytest.raises(ValueError, match=r"tensors\[1\] has shape \(3,\)"):
        fastmerge.ops.weighted_sum([a, torch.zeros(3)], [1.0, 1.0])
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
        fastmerge.ops.weighted_sum([a, torch.zeros(4, dtype=torch.int64)], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        fastmerge.ops.weighted_sum([a, torch.zeros(4, device="meta")], [1.0, 1.0])
    with pytest.raises(ValueError, match="weights has 1 entries for 2 tensors"):
        fastmerge.ops.weighted_sum([a, a], [1.0])
    with pytest.raises(ValueError, match=r"weights\[1\] is nan"):
        fastmerge.ops.weighted_sum([a, a], [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"weights\[0\] is inf"):
        fastmerge.ops.weighted_sum([a], [float("inf")])
    with pytest.raises(TypeError, match=r"weights\[0\] is not a number"):
        fastmerge.ops.weighted_sum([a], ["x"])
    with pytest.raises(TypeError, match="weights must be a sequence"):
        fastmerge.ops.weighted_sum([a], 1.0)
    with pytest.raises(TypeError, match="out_dtype"):
        fastmerge.ops.weighted_sum([a], [1.0], out_dtype=torch.int32)
    with pytest.raises(ValueError, match="out has shape"):
        fastmerge.ops.weighted_sum([a], [1.0], out=torch.empty(5))
    with pytest.raises(ValueError, match="out has dtype torch.float64 but out_dtype"):
        fastmerge.ops.weighted_sum(
            [a], [1.0], out=torch.empty(4, dtype=torch.float64), out_dtype=torch.float32
        )
    with pytest.raises(ValueError, match="out must be contiguous"):
        fastmerge.ops.weighted_sum([a], [1.0], out=torch.empty(8)[::2])
    with pytest.raises(ValueError, match=r"out overlaps tensors\[0\]"):
        big = torch.zeros(8)
        fastmerge.ops.weighted_sum([big[:4]], [1.0], out=big[2:6])
    with pytest.raises(ValueError, match="accumulate_dtype is float32"):
        fastmerge.ops.weighted_sum(
            [a.double()], [1.0], accumulate_dtype=torch.float32, out_dtype=torch.float32
        )
    with pytest.raises(TypeError, match="accumulate_dtype"):
        fastmerge.ops.weighted_sum([a], [1.0], accumulate_dtype=torch.float16)
    with pytest.raises(fastmerge.BackendUnavailableError, match="cuda"):
        fastmerge.ops.weighted_sum([a], [1.0], backend="cuda")


def test_weights_may_be_any_numbers():
    a = torch.ones(3)
    got = fastmerge.ops.weighted_sum([a, a], torch.tensor([0.5, 1.5]))
    assert got.tolist() == [2.0, 2.0, 2.0]
    got = fastmerge.ops.weighted_sum((a,), (3,))
    assert got.tolist() == [3.0, 3.0, 3.0]


NO_FMA_SCRIPT = textwrap.dedent(
    """
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastmerge.kernels import weighted_sum

    for name, (kernel, signature, constexprs) in weighted_sum.AOT_SIGNATURES.items():
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options=weighted_sum.COMPILE_OPTIONS,
        )
        assert not re.search(r"\\bfma\\.", compiled.asm["ptx"]), name
        print("checked", name)
    """
)


@pytest.mark.aot
@pytest.mark.triton
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on this machine")
def test_triton_kernel_compiles_without_fma():
    """On a GPU the Triton sum must round like the reference: no fused multiply-add."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", NO_FMA_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("checked") == 8
