"""gta_combine: every backend against the reference, bit for bit; the reference against
a mergekit-style formulation; the random keep's hash against splitmix64."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import fastmerge
from fastmerge.reference import gta_combine as reference

from ..conftest import backend_params
from .ptx import triton_kernels_checked
from .test_magnitude_threshold import DTYPES, _inputs

INF = math.inf
# 1, odd sizes around the Triton block (1024) and the CPU block (512).
CPU_SIZES = [1, 63, 65, 1025]
TRITON_SIZES = [1, 65, 1025]


def _split_size(num_experts: int) -> int:
    """One entry past the size where the CPU kernel starts a second thread: the work,
    n (T + 1) input elements, reaches twice its minimum per thread (2^18)."""
    return -(-(2 * (1 << 18)) // (num_experts + 1)) + 1


def _gta(base, experts, weights, backend="reference", device="cpu", **options):
    return fastmerge.ops.gta_combine(
        base.to(device), [e.to(device) for e in experts], weights, backend=backend, **options
    )


def _options(config: str, num: int, tied: bool) -> tuple[list[float], dict]:
    """(weights, options) of a named configuration for `num` experts. The deltas of
    `_inputs` are multiples of 0.25 up to 0.75 (tied) or about 0.01 (t + 1) in size."""
    unit = 0.25 if tied else 0.01
    equal = [1.0] * num
    unequal = [1.0, 0.5, -0.75][:num]  # one negative weight from three experts on
    lower = [unit * (t + 1) * 0.5 for t in range(num)]
    upper = [unit * (t + 1) * 2.0 for t in range(num)]
    scales = [2.0, 1 / 0.7, 1.25][:num]
    keep = [0.5, 1.0, 0.0][:num] if num == 3 else [0.7, 0.3][:num]
    configs = {
        "sum": (equal, {}),
        "weighted-normalized": (unequal, dict(normalize=True, lam=0.6)),
        "consensus": (equal, dict(consensus=True)),
        "consensus-weighted-normalized": (unequal, dict(consensus=True, normalize=True)),
        "consensus-drop": (equal, dict(consensus=True, zero_sum="drop", normalize=True)),
        "bands-scales": (
            unequal,
            dict(lower=lower, upper=upper, scales=scales, consensus=True, lam=1.3),
        ),
        "random": (unequal, dict(keep_probability=keep, scales=scales, seed=1234)),
        "everything": (
            unequal,
            dict(
                lower=lower,
                upper=upper,
                scales=scales,
                keep_probability=keep,
                seed=-7,
                offset=1000,
                consensus=True,
                zero_sum="drop",
                normalize=True,
                lam=0.9,
            ),
        ),
    }
    return configs[config]


CONFIGS = [
    "sum",
    "weighted-normalized",
    "consensus",
    "consensus-weighted-normalized",
    "consensus-drop",
    "bands-scales",
    "random",
    "everything",
]


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and torch.equal(
        got.cpu().contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
    )


# ---- the hash of the random keep -------------------------------------------------------


def _splitmix64(state: int, count: int) -> list[int]:
    """Vigna's splitmix64 generator, written out independently of the reference."""
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        out.append(z ^ (z >> 31))
    return out


def test_keys_and_hash_are_splitmix64():
    # The published first output of splitmix64 seeded with 0.
    assert reference.expert_keys(0, 1) == [0xE220A8397B1DCDAF]
    # key_t is output t of a generator seeded with the seed; -1 and 2^64 - 1 are one seed.
    assert reference.expert_keys(12345, 4) == _splitmix64(12345, 4)
    assert reference.expert_keys(-1, 3) == reference.expert_keys(2**64 - 1, 3)
    assert reference.expert_keys(2**64 + 5, 2) == reference.expert_keys(5, 2)
    # The entry hash in torch int64 arithmetic: outputs of a generator seeded with the key.
    for key in reference.expert_keys(99, 3) + [0, 2**64 - 1, 2**63]:
        start = 2**40 - 3
        index = torch.arange(start, start + 6, dtype=torch.int64)
        bits = reference.hash_bits(key, index).tolist()
        want = _splitmix64((key + start * 0x9E3779B97F4A7C15) % 2**64, 6)
        assert [b % 2**64 for b in bits] == want
        u = reference.uniforms(key, start, 6)
        assert u.tolist() == [(h >> 11) * 2.0**-53 for h in want]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.93])
def test_reference_keep_rate_is_p(p):
    n = 200_000
    sigma = math.sqrt(n * p * (1 - p))
    masks = [reference.random_keep(2024, t, p, 0, n) for t in range(3)]
    for mask in masks:
        assert abs(int(mask.sum()) - n * p) < 3 * sigma
    # independent between experts, and between the halves of one mask
    both = int((masks[0] & masks[1]).sum())
    assert abs(both - n * p * p) < 3 * math.sqrt(n * p * p * (1 - p * p))
    assert not torch.equal(masks[0], masks[1])
    other_seed = reference.random_keep(2025, 0, p, 0, n)
    assert abs(int((masks[0] & other_seed).sum()) - n * p * p) < 3 * math.sqrt(
        n * p * p * (1 - p * p)
    )
    u = reference.uniforms(reference.expert_keys(2024, 1)[0], 0, n)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 3 * math.sqrt(1 / 12 / n)
    # offset: entries offset..offset+k-1 of the whole mask
    assert torch.equal(reference.random_keep(2024, 0, p, 777, 1000), masks[0][777:1777])


@pytest.mark.parametrize("backend,device", backend_params())
def test_masks_match_the_reference_bit_for_bit(backend, device):
    """τ = 1 everywhere and weights 1, 2, 4: the result minus base spells out each
    expert's mask as the bits of an integer."""
    n = 1025 if backend == "triton" else _split_size(3) + 100
    base = torch.zeros(n)
    experts = [torch.ones(n)] * 3
    for seed, offset, keep in ((0, 0, [0.5, 0.25, 0.9]), (-3, 2**40 + 11, [0.1, 1.0, 0.0])):
        got = _gta(base, experts, [1.0, 2.0, 4.0], backend, device, keep_probability=keep,
                   seed=seed, offset=offset).cpu()  # fmt: skip
        want = sum(
            (2**t) * reference.random_keep(seed, t, keep[t], offset, n).float() for t in range(3)
        )
        assert torch.equal(got, want), (seed, offset)
        # float64 inputs: the same mask
        got64 = _gta(base.double(), experts, [1.0, 2.0, 4.0], backend, device,
                     keep_probability=keep, seed=seed, offset=offset).cpu()  # fmt: skip
        assert torch.equal(got64, want.double())


# ---- every backend against the reference --------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_experts", [1, 2, 3])
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(backend, device, dtype, num_experts, config):
    sizes = TRITON_SIZES if backend == "triton" else CPU_SIZES
    for n in sizes:
        for tied in (False, True):
            base, experts = _inputs(n, num_experts, dtype, seed=n + 3 * num_experts, tied=tied)
            weights, options = _options(config, num_experts, tied)
            got = _gta(base, experts, weights, backend, device, **options)
            want = _gta(base, experts, weights, **options)
            assert got.shape == base.shape
            assert _same_bits(got, want), (n, tied)


@pytest.mark.parametrize("num_experts", [1, 3])
@pytest.mark.parametrize("config", ["sum", "consensus-weighted-normalized", "everything"])
def test_cpu_past_the_thread_split(num_experts, config):
    n = _split_size(num_experts)
    base, experts = _inputs(n, num_experts, torch.float32, seed=num_experts)
    weights, options = _options(config, num_experts, False)
    want = _gta(base, experts, weights, **options)
    threads = fastmerge.get_num_threads()
    try:
        for count in (1, 2, 3):
            fastmerge.set_num_threads(count)
            got = _gta(base, experts, weights, "cpu", **options)
            assert _same_bits(got, want), count
    finally:
        fastmerge.set_num_threads(threads)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_output_dtype_and_mixed_inputs(backend, device, out_dtype):
    base, experts = _inputs(97, 3, torch.float32, seed=5)
    mixed = [experts[0].half(), experts[1], experts[2].bfloat16()]
    weights, options = _options("everything", 3, False)
    out = torch.full((97,), 7.0, dtype=out_dtype, device=device)
    got = _gta(base, mixed, weights, backend, device, out=out, **options)
    assert got is out
    want = _gta(base, [e.float() for e in mixed], weights, out=torch.empty(97, dtype=out_dtype),
                **options)  # fmt: skip
    assert _same_bits(got, want)
    # float64 among the inputs: everything in float64, the half types exactly widened
    base64, experts64 = _inputs(97, 2, torch.float64, seed=7)
    inputs = [experts64[0], experts64[1].float()]
    weights, options = _options("consensus-weighted-normalized", 2, False)
    got = _gta(base64.half(), inputs, weights, backend, device, lam=1 / 3,
               out=torch.empty(97, dtype=out_dtype, device=device))  # fmt: skip
    want = _gta(base64.half().double(), [e.double() for e in inputs], weights, lam=1 / 3,
                out=torch.empty(97, dtype=out_dtype))  # fmt: skip
    assert _same_bits(got, want)
    assert got.dtype == out_dtype


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_and_shaped(backend, device):
    empty = torch.empty(0, 4, device=device)
    got = fastmerge.ops.gta_combine(empty, [empty, empty], [1.0, 2.0], keep_probability=[0.5, 1],
                                    consensus=True, backend=backend)  # fmt: skip
    assert got.shape == (0, 4) and got.dtype == torch.float32
    base, experts = _inputs(60, 2, torch.float32, seed=6)
    weights, options = _options("everything", 2, False)
    got = _gta(base.reshape(6, 10), [e.reshape(6, 10) for e in experts], weights, backend,
               device, **options)  # fmt: skip
    assert got.shape == (6, 10)
    assert _same_bits(got.flatten(), _gta(base, experts, weights, **options))


@pytest.mark.parametrize("backend,device", backend_params())
def test_row_blocks_with_offsets_equal_the_whole(backend, device):
    rows, cols = 9, 130
    base, experts = _inputs(rows * cols, 3, torch.float32, seed=11)
    base = base.reshape(rows, cols)
    experts = [e.reshape(rows, cols) for e in experts]
    weights, options = _options("everything", 3, False)
    options.pop("offset")
    whole = _gta(base, experts, weights, backend, device, **options).cpu()
    assert _same_bits(whole, _gta(base, experts, weights, **options))
    parts = []
    for r0, r1 in ((0, 4), (4, 5), (5, 9)):
        parts.append(
            _gta(
                base[r0:r1],
                [e[r0:r1] for e in experts],
                weights,
                backend,
                device,
                offset=r0 * cols,
                **options,
            ).cpu()
        )
    assert _same_bits(torch.cat(parts), whole)
    # the offset is what makes them agree: without it, the block's mask is the first rows'
    alone = _gta(base[5:9], [e[5:9] for e in experts], weights, backend, device, **options)
    assert not torch.equal(alone.cpu(), whole[5:9])


# ---- semantics ------------------------------------------------------------------------


def test_hand_computed_example():
    base = torch.ones(5)
    experts = [
        torch.tensor([2.0, 1.25, 0.0, 1.5, 1.5]),
        torch.tensor([2.0, 4.0, 2.0, 0.5, 1.0]),
        torch.tensor([0.0, 1.0, 3.0, 1.5, 2.0]),
    ]
    # τ0 = [1, .25, -1, .5, .5] (lower .5: entry 1 dropped), scale 2
    # τ1 = [1, 3, 1, -.5, 0] (upper 2: entry 1 dropped), weight .5
    # τ2 = [-1, 0, 2, .5, 1], weight -1
    # w·d: [2, .5, 1], [0, 0, -0], [-2, .5, -2], [1, -.25, -.5], [1, 0, -1]
    # sums: 3.5, 0, -3.5, .25, 0
    options = dict(lower=[0.5, 0.0, 0.0], upper=[INF, 2.0, INF], scales=[2.0, 1.0, 1.0],
                   normalize=True, lam=0.5)  # fmt: skip
    weights = [1.0, 0.5, -1.0]
    cases = {
        # counted sums / counted weights (0 -> 1): 3.5/.5, 0/1, -4/1 (1 - 1 = 0), 1/1, 1/1
        ("positive", True): [4.5, 1.0, -1.0, 1.5, 1.5],
        # the zero sum of entry 4: nothing is kept
        ("drop", True): [4.5, 1.0, -1.0, 1.5, 1.0],
        # sums / (1 + .5 - 1)
        ("positive", False): [4.5, 1.0, -2.5, 1.25, 1.0],
    }
    for backend in fastmerge.backends.usable_backends(torch.device("cpu")):
        for (rule, consensus), want in cases.items():
            got = fastmerge.ops.gta_combine(base, experts, weights, consensus=consensus,
                                            zero_sum=rule, backend=backend, **options)  # fmt: skip
            assert got.tolist() == want, (backend, rule, consensus)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_zero_sum_rules(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    base = torch.zeros(3)
    # entry 0: deltas +1 and -1 with equal weights, an exact zero sum; entry 1: +2, -1;
    # entry 2: both zero
    experts = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-1.0, -1.0, 0.0])]
    run = lambda **kw: fastmerge.ops.gta_combine(  # noqa: E731
        base, experts, [0.5, 0.5], consensus=True, backend=backend, **kw
    ).tolist()
    assert run() == [0.5, 1.0, 0.0]  # mergekit: the positive delta wins at 0
    assert run(zero_sum="drop") == [0.0, 1.0, 0.0]  # the paper: nothing is kept
    assert run(normalize=True) == [1.0, 2.0, 0.0]  # 0.5 / 0.5, 1 / 0.5, 0 / 1
    assert run(normalize=True, zero_sum="drop") == [0.0, 2.0, 0.0]
    # without consensus the sum is the sum: 0, .5, 0; normalized by the weights' sum 1
    plain = fastmerge.ops.gta_combine(base, experts, [0.5, 0.5], backend=backend)
    assert plain.tolist() == [0.0, 0.5, 0.0]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_keep_probability_zero_and_one(backend):
    base, experts = _inputs(300, 3, torch.float32, seed=8)
    weights = [1.0, 0.5, -0.75]
    for consensus in (False, True):
        opts = dict(consensus=consensus, normalize=True, backend=backend)
        everything = fastmerge.ops.gta_combine(base, experts, weights, **opts)
        kept = fastmerge.ops.gta_combine(base, experts, weights, keep_probability=[1, 1.5, 1],
                                         seed=3, **opts)  # fmt: skip
        assert torch.equal(kept, everything)
        # p = 0 (and below): the expert is never kept, as with an unreachable lower bound
        none = fastmerge.ops.gta_combine(base, experts, weights, keep_probability=[1, 0, -2],
                                         seed=3, **opts)  # fmt: skip
        banded = fastmerge.ops.gta_combine(base, experts, weights, lower=[0, INF, INF], **opts)
        assert torch.equal(none, banded)
        assert not torch.equal(none, everything)


def _mergekit_style(base, experts, weights, *, lower=None, upper=None, scales=None,
                    keep_probability=None, seed=0, offset=0, consensus=False,
                    zero_sum="positive", normalize=False, lam=1.0):  # fmt: skip
    """The semantics to match, written as mergekit's generalized_task_arithmetic does:
    stacked deltas, masks, ``(sum >= 0) * 2 - 1`` (or the sign, for the paper's rule),
    ``divisor[divisor == 0] = 1``."""
    wide = torch.float64 in (base.dtype, *(e.dtype for e in experts))
    dtype = torch.float64 if wide else torch.float32
    num, n = len(experts), base.numel()
    b = base.reshape(-1).to(dtype)
    deltas = torch.stack([e.reshape(-1).to(dtype) - b for e in experts])
    column = lambda v, d: torch.tensor(v if v is not None else [d] * num, dtype=dtype)[:, None]  # noqa: E731
    mask = (deltas.abs() >= column(lower, 0.0)) & (deltas.abs() <= column(upper, INF))
    if keep_probability is not None:
        mask &= torch.stack(
            [reference.random_keep(seed, t, p, offset, n) for t, p in enumerate(keep_probability)]
        )
    deltas = deltas * mask * column(scales, 1.0)
    w = torch.tensor(weights, dtype=dtype)[:, None]
    weighted = deltas * w
    if consensus:
        total = weighted.sum(dim=0)
        if zero_sum == "positive":
            majority = (total >= 0).to(dtype) * 2 - 1
        else:
            majority = total.sign()
        agree = weighted.sign() == majority
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return (b + lam * mixed).to(base.dtype).reshape(base.shape)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("num_experts", [1, 2, 3])
def test_reference_matches_a_mergekit_style_formulation(config, num_experts):
    # Dyadic inputs (multiples of 1/4, weights and scales of few bits): every operation
    # is exact, so any order of the sums gives the same bits.
    base, experts = _inputs(3000, num_experts, torch.float32, seed=num_experts, tied=True)
    weights, options = _options(config, num_experts, True)
    if "scales" in options:
        options["scales"] = [2.0, 0.5, 1.25][:num_experts]
    if options.get("lam") is not None:
        options["lam"] = 0.75
    got = _gta(base, experts, weights, **options)
    assert torch.equal(got, _mergekit_style(base, experts, weights, **options))
    # random float64 inputs: equal up to the rounding of the sums' order
    base, experts = _inputs(3000, num_experts, torch.float64, seed=num_experts + 10)
    weights, options = _options(config, num_experts, False)
    got = _gta(base, experts, weights, **options)
    torch.testing.assert_close(
        got, _mergekit_style(base, experts, weights, **options), rtol=1e-13, atol=1e-15
    )


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend,device", backend_params())
def test_infinities_follow_the_rules(backend, device):
    """±inf deltas are kept (upper defaults to +inf); +inf + -inf is a NaN sum, which the
    positive rule reads as negative and the paper's rule as no sign."""
    base = torch.zeros(4)
    experts = [torch.tensor([INF, INF, 1.0, math.nan]), torch.tensor([-INF, 1.0, -INF, 2.0])]
    for rule in ("positive", "drop"):
        for normalize in (False, True):
            options = dict(consensus=True, zero_sum=rule, normalize=normalize)
            got = _gta(base, experts, [1.0, 1.0], backend, device, **options).cpu()
            want = _gta(base, experts, [1.0, 1.0], **options)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    want = _gta(base, experts, [1.0, 1.0], consensus=True).tolist()
    assert want[0] == -INF and want[1:] == [INF, -INF, 2.0]  # NaN τ is never kept
    assert math.isnan(_gta(base, experts, [1.0, 1.0])[0])


# ---- bad input ------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    base, experts = torch.zeros(4), [torch.ones(4), torch.ones(4)]
    run = lambda weights=(1.0, 1.0), **kw: fastmerge.ops.gta_combine(  # noqa: E731
        base, experts, weights, **kw
    )
    for name in ("weights", "lower", "upper", "scales", "keep_probability"):
        arguments = {"weights": (1.0, 1.0), name: [1.0, 1.0, 1.0]}
        with pytest.raises(ValueError, match=rf"{name} must have shape \(2,\)"):
            run(**arguments)
        arguments[name] = torch.ones(2, 1)
        with pytest.raises(ValueError, match=name):
            run(**arguments)
        arguments[name] = [1.0, math.nan]
        with pytest.raises(ValueError, match=f"{name} must"):
            run(**arguments)
    with pytest.raises(TypeError, match="weights"):
        run(weights=1.0)
    with pytest.raises(ValueError, match="weights is required"):
        run(weights=None)
    with pytest.raises(ValueError, match="weights must be finite"):
        run(weights=[1.0, INF])
    with pytest.raises(ValueError, match="scales must be finite"):
        run(scales=[1.0, -INF])
    with pytest.raises(ValueError, match="lam must be finite"):
        run(lam=math.nan)
    with pytest.raises(TypeError, match="lam"):
        run(lam="one")
    with pytest.raises(ValueError, match="zero_sum"):
        run(consensus=True, zero_sum="sum")
    with pytest.raises(TypeError, match="seed"):
        run(seed=1.5)
    with pytest.raises(ValueError, match="offset"):
        run(offset=-1)
    with pytest.raises(ValueError, match=r"experts\[1\] has shape"):
        fastmerge.ops.gta_combine(base, [torch.ones(4), torch.ones(3)], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"experts\[0\] is on meta"):
        fastmerge.ops.gta_combine(base, [torch.ones(4, device="meta")], [1.0])
    with pytest.raises(ValueError, match="experts is empty"):
        fastmerge.ops.gta_combine(base, [], [])
    with pytest.raises(TypeError, match="base"):
        fastmerge.ops.gta_combine(torch.zeros(4, dtype=torch.int32), [torch.ones(4)], [1.0])
    for out in (torch.empty(5), torch.empty(4, dtype=torch.int64), torch.empty(8)[::2], "x"):
        with pytest.raises(ValueError, match="out must be"):
            run(out=out)
    # upper bounds below lower bounds keep nothing, not an error
    assert torch.equal(run(lower=[2.0, 2.0], upper=[1.0, 1.0]), base)


@pytest.mark.aot
@pytest.mark.triton
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on this machine")
def test_triton_combine_compiles_without_fma_and_with_exact_division():
    """On a GPU the Triton combine must round like the reference: no fused multiply-add
    (the launch options disable it) and a correctly rounded division."""
    pytest.importorskip("triton")
    assert triton_kernels_checked("gta_combine") >= 6
