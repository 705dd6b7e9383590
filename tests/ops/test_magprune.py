"""magprune: every backend against the reference, bit for bit (the kept deltas; the norms
to float64 rounding); the reference's ranks, keep rates and hash against plain torch,
gta_combine's random keep and mergekit's probabilities; bad input."""

from __future__ import annotations

import math

import pytest
import torch

import fastmerge
from fastmerge.ops.magprune import keep_bounds, row_layout
from fastmerge.reference.gta_combine import random_keep

from ..conftest import backend_params

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Empty, one entry, odd 1-D, 2-D with odd widths, more dimensions (ranked along dim 1),
# and a 2-D tensor large enough for the CPU kernel to take two threads (2 * 2^16 entries).
CPU_SHAPES = [(0,), (0, 4), (1,), (97,), (5, 13), (3, 4, 5), (2, 3, 2, 2), (260, 511)]
# The Triton interpreter is slow: tiny sizes only.
TRITON_SHAPES = [(0, 3), (1,), (33,), (5, 13), (3, 4, 5)]


def _pair(shape, base_dtype=torch.float32, expert_dtype=None, seed=0):
    """base ~ N(0, 1), expert = base + deltas of scales 1e-4..1, with exact ties: a few
    deltas of 0 and repeated values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    n = base.numel()
    scale = 10.0 ** (torch.rand(shape, generator=g, dtype=torch.float64) * 4 - 4)
    expert = base + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    flat = expert.view(-1)
    flat[: min(n, 3)] = base.view(-1)[: min(n, 3)]  # τ = 0, three times
    if n > 8:
        flat[5:8] = base.view(-1)[5:8] + 0.125  # τ = 0.125 three times (exact in float32)
    return base.to(base_dtype), expert.to(expert_dtype or base_dtype)


def _run(base, expert, backend, device="cpu", **options):
    options = {"density": 0.5, "epsilon": 0.3, "seed": 11, "expert_index": 2, **options}
    density, epsilon = options.pop("density"), options.pop("epsilon")
    kept, norms = fastmerge.ops.magprune(
        base.to(device), expert.to(device), density, epsilon, backend=backend, **options
    )
    return kept.cpu(), norms.cpu()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits (signed zeros included; any NaN matches any NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    a, b = a[~nan].contiguous(), b[~nan].contiguous()
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_equal_the_reference(backend, device, dtype):
    shapes = TRITON_SHAPES if backend == "triton" else CPU_SHAPES
    for shape in shapes:
        base, expert = _pair(shape, dtype)
        want, want_norms = _run(base, expert, "reference")
        got, norms = _run(base, expert, backend, device)
        assert _same(got, want), (shape, (got != want).sum().item())
        torch.testing.assert_close(norms, want_norms, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_mixed_dtypes_out_dtypes_and_offsets(backend, device):
    base, expert = _pair((6, 17), torch.bfloat16, torch.float32, seed=1)
    want, want_norms = _run(base, expert, "reference")
    assert want.dtype == torch.float32  # the compute dtype by default
    got, norms = _run(base, expert, backend, device)
    assert _same(got, want)
    torch.testing.assert_close(norms, want_norms, rtol=1e-12, atol=0.0)
    for out_dtype in (torch.bfloat16, torch.float64):
        out = torch.empty(6, 17, dtype=out_dtype, device=device)
        got, _ = _run(base, expert, backend, device, out=out)
        assert got.dtype == out_dtype and _same(got, want.to(out_dtype))
    # a block of whole rows with its offset gets the whole tensor's mask and norms
    rows = slice(2, 5)
    got, norms = _run(base[rows], expert[rows], backend, device, offset=2 * 17)
    assert _same(got, want[rows])
    whole = (expert[rows].float() - base[rows].float()).abs().double().sum()
    torch.testing.assert_close(norms[0], whole, rtol=1e-12, atol=0.0)


def test_cpu_result_does_not_depend_on_the_thread_count():
    cpu = fastmerge.backends.cpu_extension()
    base, expert = _pair((300, 700), seed=2)
    before = cpu.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            cpu.set_num_threads(threads)
            results.append(_run(base, expert, "cpu"))
    finally:
        cpu.set_num_threads(before)
    for kept, norms in results[1:]:
        assert torch.equal(kept, results[0][0]) and torch.equal(norms, results[0][1])


def test_reference_ranks_ties_by_position_and_nan_last():
    # rank = stable ascending order of |τ|: ties by index, NaN above inf, -0 == +0
    tau = torch.tensor([[0.5, -0.5, float("nan"), float("inf"), -0.0, 0.0, 0.25]])
    ranks = fastmerge.reference.magprune.ranks(tau.abs())
    assert ranks.tolist() == [[3, 4, 6, 5, 0, 1, 2]]
    # density = epsilon = 1/2: p runs from 0 (rank 0: never kept) to 1 (rank C - 1: kept)
    base = torch.zeros(4, 3)
    expert = torch.tensor([[1.0, 1.0, 1.0], [3.0, -2.0, 1.0], [0.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    for backend in fastmerge.backends.usable_backends(torch.device("cpu")):
        for seed in range(20):
            kept, _ = _run(base, expert, backend, density=0.5, epsilon=0.5, seed=seed)
            assert kept[:, 2].tolist()[0] == 1.0 and kept[0, 0] == 0.0, backend  # ties
            assert kept[1, 0] == 3.0 and kept[1, 2] == 0.0, backend  # largest, smallest
            assert kept[3, 0] == 2.0 and kept[3, 1] == 0.0, backend


def test_reference_equals_plain_torch_ranks_and_gta_combines_hash():
    base, expert = _pair((4, 3, 5), seed=3)  # rows along dim 1: width 3, 20 rows
    assert row_layout(base.shape) == (3, 5)
    seed, t, d, eps = 5, 1, 0.4, 0.2
    kept, norms = _run(base, expert, "reference", density=d, epsilon=eps, seed=seed,
                       expert_index=t)  # fmt: skip
    tau = expert - base
    # plain torch: ranks along dim 1 (mergekit's argsort(dim=1)), stable
    ranks = tau.abs().argsort(dim=1, stable=True).argsort(dim=1)
    below, step = keep_bounds(d, eps, 3)
    index = torch.arange(tau.numel()).reshape(tau.shape)
    bits = [random_keep(seed, t, (below + r * step) / 2**53, int(e), 1)
            for r, e in zip(ranks.reshape(-1).tolist(), index.reshape(-1).tolist())]  # fmt: skip
    keep = torch.cat(bits).reshape(tau.shape)
    assert torch.equal(kept, torch.where(keep, tau, 0.0))
    assert norms.tolist() == pytest.approx([tau.abs().sum().item(), kept.abs().sum().item()])
    # epsilon 0: every rank has p = density, and the mask is gta_combine's random keep
    kept, _ = _run(base, expert, "reference", density=d, epsilon=0.0, seed=seed, expert_index=t)
    mask = random_keep(seed, t, d, 0, tau.numel()).reshape(tau.shape)
    assert torch.equal(kept, torch.where(mask, tau, 0.0))


def test_integer_bounds_are_mergekits_probabilities():
    # mergekit: p = density - eps + 2 eps (rank - min) / (max - min), ranks 1..C
    for width in (2, 3, 768, 4097):
        for d, eps in ((0.5, 0.1), (0.3, 0.29), (0.9, 0.1)):
            below, step = keep_bounds(d, eps, width)
            r = torch.arange(width, dtype=torch.float64)
            want = d - eps + 2 * eps * r / (width - 1)
            got = (below + r * step) / 2**53
            assert (got - want).abs().max().item() <= width * 2.0**-53


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_keep_rates_follow_the_ranks_within_three_sigma(backend):
    rows, cols, d, eps = 300, 257, 0.4, 0.3
    base = torch.zeros(rows, cols)
    tau = torch.rand(rows, cols, generator=torch.Generator().manual_seed(4)) + 0.1
    kept, norms = _run(base, tau, backend, density=d, epsilon=eps, seed=9)
    keep = kept != 0
    assert torch.equal(kept[keep], tau[keep])

    def within(count: int, n: int, p: float) -> bool:
        return abs(count - n * p) <= 3 * math.sqrt(n * p * (1 - p))

    assert within(keep.sum().item(), rows * cols, d)
    ranks = tau.argsort(1).argsort(1).double() / (cols - 1)
    for lo, hi in ((0.0, 0.2), (0.4, 0.6), (0.8, 1.0001)):
        band = (ranks >= lo) & (ranks < hi)
        p = d - eps + 2 * eps * ranks[band].mean().item()
        assert within(keep[band].sum().item(), band.sum().item(), p), (lo, hi)
    assert norms[1].item() == pytest.approx(tau[keep].double().sum().item(), rel=1e-12)
    # other seeds and experts draw other masks; the same ones the same
    again, _ = _run(base, tau, backend, density=d, epsilon=eps, seed=9)
    assert torch.equal(again, kept)
    for other in ({"seed": 10}, {"seed": 9, "expert_index": 0}):
        drawn, _ = _run(base, tau, backend, density=d, epsilon=eps, **other)
        assert not torch.equal(drawn, kept)


def test_out_may_be_an_input_and_not_overlap_one():
    base, expert = _pair((4, 9), seed=5)
    want, _ = _run(base, expert, "reference")
    for backend in fastmerge.backends.usable_backends(torch.device("cpu")):
        target = expert.clone()
        got, _ = _run(base, target, backend, out=target)
        assert got is target and _same(got, want), backend
    with pytest.raises(ValueError, match="out overlaps expert"):
        big = torch.zeros(40)
        fastmerge.ops.magprune(torch.zeros(36), big[:36], 0.5, 0.1, out=big[4:])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda b, e: fastmerge.ops.magprune(b, e[:2], 0.5, 0.1), ValueError, "expert has shape"),
        (lambda b, e: fastmerge.ops.magprune(b, e, 0.5, 0.6), ValueError, "density 0.5 and eps"),
        (lambda b, e: fastmerge.ops.magprune(b, e, 0.9, 0.2), ValueError, "leave \\[0, 1\\]"),
        (lambda b, e: fastmerge.ops.magprune(b, e, 0.5, -0.1), ValueError, "epsilon must be >= 0"),
        (lambda b, e: fastmerge.ops.magprune(b, e, float("nan"), 0.1), ValueError, "density"),
        (lambda b, e: fastmerge.ops.magprune(b, e, "0.5", 0.1), TypeError, "density must be a"),
        (lambda b, e: fastmerge.ops.magprune(b, e, 0.5, 0.1, seed=True), TypeError, "seed"),
        (lambda b, e: fastmerge.ops.magprune(b, e, 0.5, 0.1, seed=1.5), TypeError, "seed"),
        (
            lambda b, e: fastmerge.ops.magprune(b, e, 0.5, 0.1, expert_index=-1),
            ValueError,
            "expert_index",
        ),  # fmt: skip
        (lambda b, e: fastmerge.ops.magprune(b, e, 0.5, 0.1, offset=-1), ValueError, "offset"),
        (lambda b, e: fastmerge.ops.magprune(b, e.int(), 0.5, 0.1), TypeError, "expert has dtype"),
        (
            lambda b, e: fastmerge.ops.magprune(b, e, 0.5, 0.1, out=torch.empty(3)),
            ValueError,
            "out has shape",
        ),  # fmt: skip
        (
            lambda b, e: fastmerge.ops.magprune(b, e, 0.5, 0.1, backend="cuda"),
            fastmerge.backends.BackendUnavailableError,
            "no cuda backend",
        ),  # fmt: skip
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, message):
    base, expert = _pair((3, 4), seed=6)
    with pytest.raises(error, match=message):
        call(base, expert)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_special_rows_equal_the_reference(backend, device, dtype):
    # a constant row (one key), keys differing only in the last bits (one radix pass),
    # NaN, inf and signed zeros, and a row spanning the whole exponent range
    one = torch.tensor(1.0, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    rows = torch.stack(
        [
            torch.full((9,), 0.25, dtype=dtype),
            torch.nextafter(one, 2 * one) ** torch.arange(9, dtype=dtype),
            torch.tensor(
                [
                    float("nan"),
                    1.0,
                    float("inf"),
                    -0.0,
                    0.0,
                    -1.0,
                    float("-inf"),
                    float("nan"),
                    2.0,
                ],
                dtype=dtype,
            ),  # fmt: skip
            torch.tensor([tiny, 1e30, -3.0, 1e-30, 5.0, -tiny, 7.0, 1e-3, 0.5], dtype=dtype),
        ]
    )
    base = torch.zeros_like(rows)
    for options in ({}, {"density": 0.5, "epsilon": 0.5}, {"density": 0.2, "epsilon": 0.0}):
        want, want_norms = _run(base, rows, "reference", **options)
        got, norms = _run(base, rows, backend, device, **options)
        assert _same(got, want), options
        torch.testing.assert_close(norms, want_norms, rtol=1e-12, atol=0.0, equal_nan=True)
