"""Triton kernels for the TIES trim threshold: a radix selection over the bits of |τ|.

The key of |τ| (τ = expert - base in the compute dtype) is its float bits with the sign
cleared, as an int64: its order is the order of |τ|. The selection walks the key from
the top in 11-bit digits (3 passes for float32 keys, 6 for float64). Each pass is one
launch over (chunk, expert) programs: a program histograms, with ``tl.histogram``, the
current digit of the keys whose higher digits equal the expert's prefix so far, and adds
its 2,048 counts to the expert's global histogram (int64: one digit can hold more than
2**31 keys) with atomics. Past 65,535 experts (the grid's y limit) each program walks
the experts y, y + 65,535, .... Between passes a few
torch ops on the device (no host sync) pick the digit holding the k-th largest key and
the rank left inside it. The last prefix is the threshold's bit pattern: exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import FLOAT_TYPES, aot_entry, compute_type
from ._launch import GRID_LIMITS, launch
from ._tables import TRITON_DTYPES, int64_on

DIGIT_BITS = 11
BINS = 1 << DIGIT_BITS
#: Elements per program and per loop step.
CHUNK = 1 << 14
BLOCK = 1024
#: Bit offsets of the digits, from the top: float32 keys have 31 bits, float64 keys 63.
SHIFTS = {torch.float32: (22, 11, 0), torch.float64: (55, 44, 33, 22, 11, 0)}


@triton.jit
def magnitude_histogram_kernel(
    base_ptr,  # DTYPE (n,)
    addresses_ptr,  # int64 (T,): data pointer of each expert
    prefix_ptr,  # int64 (T,): the higher digits selected so far, per expert
    hist_ptr,  # int64 (T, BINS), zeroed: counts of the current digit
    n,
    num_experts,
    shift,  # bit offset of the current digit
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,  # tl.float32 or tl.float64
    BINS: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    first = chunk.to(tl.int64) * CHUNK
    bins = tl.arange(0, BINS)
    for t in range(tl.program_id(1), num_experts, tl.num_programs(1)):
        expert_ptr = tl.load(addresses_ptr + t).to(tl.pointer_type(DTYPE))
        prefix = tl.load(prefix_ptr + t)
        counts = tl.zeros([BINS], dtype=tl.int32)  # at most CHUNK per bin
        for start in range(0, CHUNK, BLOCK):
            offsets = first + start + tl.arange(0, BLOCK)
            mask = offsets < n
            b = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
            e = tl.load(expert_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
            key = _magnitude_key(e - b, COMPUTE)
            top = key >> shift
            match = mask & ((top >> DIGIT_BITS) == prefix)
            # No `mask=` argument (Triton before 3.4 lacks it): the keys that do not match
            # are counted in bin 0 and taken out of it again.
            digit = tl.where(match, top & (BINS - 1), 0).to(tl.int32)
            misses = BLOCK - tl.sum(match.to(tl.int32), axis=0)
            counts += tl.histogram(digit, BINS) - tl.where(bins == 0, misses, 0)
        row = (first * 0 + t) * BINS  # int64, and a tensor (the interpreter's t is an int)
        tl.atomic_add(hist_ptr + row + bins, counts.to(tl.int64))


@triton.jit
def _magnitude_key(tau, COMPUTE: tl.constexpr):
    """|tau|'s bits as a non-negative int64 (order-preserving)."""
    if COMPUTE == tl.float64:
        key = tau.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        key = (tau.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    return key


def _select_digit(hist: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert, the digit holding the rank-th largest key and the rank left inside it."""
    from_top = hist.flip(1).cumsum(1)  # [:, j]: keys in the top j + 1 bins
    index = (from_top < rank[:, None]).sum(1)  # bins entirely above the wanted key
    above = from_top.gather(1, (index - 1).clamp(min=0)[:, None]).squeeze(1)
    above = torch.where(index > 0, above, torch.zeros_like(above))
    return BINS - 1 - index, rank - above


def magnitude_threshold(
    base: torch.Tensor, experts: list[torch.Tensor], k: int, compute: torch.dtype
) -> torch.Tensor:
    """(T,) k-th largest |experts[t] - base| in `compute` (float32/float64); flat,
    contiguous inputs of one dtype, 1 <= k <= n."""
    device = base.device
    n, num_experts = base.numel(), len(experts)
    addresses = int64_on([e.data_ptr() for e in experts], device)
    prefix = torch.zeros(num_experts, dtype=torch.int64, device=device)
    rank = torch.full((num_experts,), k, dtype=torch.int64, device=device)
    hist = torch.empty((num_experts, BINS), dtype=torch.int64, device=device)
    grid = (triton.cdiv(n, CHUNK), min(num_experts, GRID_LIMITS[1]))
    for shift in SHIFTS[compute]:
        hist.zero_()
        launch(
            magnitude_histogram_kernel,
            grid,
            device,
            base,
            addresses,
            prefix,
            hist,
            n,
            num_experts,
            shift,
            DTYPE=TRITON_DTYPES[base.dtype],
            COMPUTE=TRITON_DTYPES[compute],
            BINS=BINS,
            DIGIT_BITS=DIGIT_BITS,
            CHUNK=CHUNK,
            BLOCK=BLOCK,
            axes=(f"chunks of {CHUNK} entries", "experts"),
        )
        digit, rank = _select_digit(hist, rank)
        prefix = prefix * BINS + digit
    if compute == torch.float64:
        return prefix.view(torch.float64)
    return prefix.to(torch.int32).view(torch.float32)


AOT_SIGNATURES = {
    f"magnitude_histogram_kernel[{name}]": aot_entry(
        magnitude_histogram_kernel,
        {
            "base_ptr": f"*{name}",
            "addresses_ptr": "*i64",
            "prefix_ptr": "*i64",
            "hist_ptr": "*i64",
            "n": "i64",
            "num_experts": "i32",
            "shift": "i32",
        },
        {
            "DTYPE": tl_dtype,
            "COMPUTE": compute_type(name),
            "BINS": BINS,
            "DIGIT_BITS": DIGIT_BITS,
            "CHUNK": CHUNK,
            "BLOCK": BLOCK,
        },
    )
    for name, tl_dtype in FLOAT_TYPES.items()
}
