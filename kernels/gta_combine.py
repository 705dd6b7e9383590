"""Triton kernel for the generalized task arithmetic combine: band trim, hashed random
keep, rescale, weights, sign election and normalization in one launch.

One program per BLOCK entries. The number of experts is a runtime value, so with
consensus the kernel walks the experts twice: once to sum the weighted deltas (the
elected sign), once more to recompute the same deltas and add up the ones that count.
Arithmetic as in :mod:`fastmerge.ops.gta_combine`: sums in expert order from 0,
``div_rn`` for the division (plain ``/`` is approximate on the GPU) and no fused
multiply-add (the launch sets ``enable_fp_fusion=False``), so the result is bit for bit
the reference's. The random keep's hash is splitmix64 on int64 values: products wrap
modulo 2**64 and logical right shifts are arithmetic shifts and a mask, which gives the
bits of the unsigned arithmetic of the C++ and CUDA kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._aot import FLOAT_TYPES, aot_entry, compute_name, compute_type
from ._launch import launch
from ._rounding import to_out as _to_out
from ._tables import TRITON_DTYPES, int64_on
from .ties_combine import _divide

BLOCK = 1024
#: Compile options of every launch: every product is rounded before it is added.
COMPILE_OPTIONS = {"enable_fp_fusion": False}

# splitmix64's constants as the int64 values with their bits.
_GOLDEN = tl.constexpr(-7046029254386353131)  # 0x9E3779B97F4A7C15
_MIX1 = tl.constexpr(-4658895280553007687)  # 0xBF58476D1CE4E5B9
_MIX2 = tl.constexpr(-7723592293110705685)  # 0x94D049BB133111EB


@triton.jit
def gta_combine_kernel(
    base_ptr,  # DTYPE (n,)
    addresses_ptr,  # int64 (T,): data pointer of each expert
    params_ptr,  # COMPUTE (4, T): weights, lower, upper, scales
    random_ptr,  # int64 (2, T): key bits, keep_below (read only when RANDOM)
    scalars_ptr,  # COMPUTE (2,): lam, 1e-8 (tensors: Triton passes Python floats as float32)
    out_ptr,  # OUT (n,)
    n,
    offset,  # flat index of base[0] in the whole tensor (int64)
    num_experts,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    OUT: tl.constexpr,
    RANDOM: tl.constexpr,
    CONSENSUS: tl.constexpr,
    DROP_ZERO: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    b = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    index = offsets + offset
    zero = tl.zeros([BLOCK], dtype=COMPUTE)
    total = zero
    for t in range(num_experts):
        wd = _weighted_delta(
            addresses_ptr, params_ptr, random_ptr, t, num_experts, offsets, index, mask, b,
            DTYPE, COMPUTE, RANDOM,
        )  # fmt: skip
        total = total + wd
    if CONSENSUS:
        if DROP_ZERO:
            up = total > 0
            down = total < 0
        else:  # +1 where total >= 0, else (negative or NaN) -1
            up = total >= 0
            down = (total < 0) | (total != total)
        mixed = zero
        divisor = zero
        for t in range(num_experts):
            wd = _weighted_delta(
                addresses_ptr, params_ptr, random_ptr, t, num_experts, offsets, index, mask, b,
                DTYPE, COMPUTE, RANDOM,
            )  # fmt: skip
            counted = (up & (wd > 0)) | (down & (wd < 0))
            mixed = mixed + tl.where(counted, wd, zero)
            divisor = divisor + tl.where(counted, tl.load(params_ptr + t), 0.0).to(COMPUTE)
        divisor = tl.where(divisor == 0, 1.0, divisor).to(COMPUTE)
    else:
        mixed = total
        divisor = zero
        if NORMALIZE:  # one number: the sum of all weights, 1 where it is below 1e-8
            for t in range(num_experts):
                divisor = divisor + tl.load(params_ptr + t)
            tiny = tl.abs(divisor) < tl.load(scalars_ptr + 1)
            divisor = tl.where(tiny, 1.0, divisor).to(COMPUTE)
    if NORMALIZE:
        mixed = _divide(mixed, divisor, COMPUTE)
    product = tl.load(scalars_ptr) * mixed
    tl.store(out_ptr + offsets, _to_out(b + product, OUT), mask=mask)


@triton.jit
def _weighted_delta(
    addresses_ptr, params_ptr, random_ptr, t, num_experts, offsets, index, mask, b,
    DTYPE, COMPUTE, RANDOM,
):  # fmt: skip
    """Expert t's weights[t] * (kept ? τ * scales[t] : 0)."""
    expert_ptr = tl.load(addresses_ptr + t).to(tl.pointer_type(DTYPE))
    weight = tl.load(params_ptr + t)
    lower = tl.load(params_ptr + num_experts + t)
    upper = tl.load(params_ptr + 2 * num_experts + t)
    scale = tl.load(params_ptr + 3 * num_experts + t)
    tau = tl.load(expert_ptr + offsets, mask=mask, other=0.0).to(COMPUTE) - b
    magnitude = tl.abs(tau)
    kept = (magnitude >= lower) & (magnitude <= upper)
    if RANDOM:
        key = tl.load(random_ptr + t)
        below = tl.load(random_ptr + num_experts + t)
        kept = kept & _random_keep(key, below, index)
    product = tau * scale
    return weight * tl.where(kept, product, 0.0).to(COMPUTE)


@triton.jit
def _shr(z, s: tl.constexpr):
    """Logical right shift of int64 bit patterns."""
    return (z >> s) & ((1 << (64 - s)) - 1)


@triton.jit
def _random_keep(key, below, index):
    """u < p for the entries at flat `index`: mix64(key + (index + 1) * G) >> 11 < below."""
    z = (index + 1) * _GOLDEN + key
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11) < below


def gta_combine(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    params: torch.Tensor,
    random: Optional[torch.Tensor],
    offset: int,
    consensus: bool,
    drop_zero_sum: bool,
    normalize: bool,
    lam: float,
    out: torch.Tensor,
) -> None:
    """Write the generalized task arithmetic merge of flat, contiguous inputs of one
    dtype into `out`; params: (4, T) in the compute dtype, random: int64 (2, T) or None."""
    n = base.numel()
    scalars = torch.tensor([lam, 1e-8], dtype=params.dtype).to(base.device)
    launch(
        gta_combine_kernel,
        (triton.cdiv(n, BLOCK),),
        base.device,
        base,
        int64_on([e.data_ptr() for e in experts], base.device),
        params,
        random if random is not None else int64_on([0, 0], base.device),
        scalars,
        out,
        n,
        offset,
        len(experts),
        DTYPE=TRITON_DTYPES[base.dtype],
        COMPUTE=TRITON_DTYPES[params.dtype],
        OUT=TRITON_DTYPES[out.dtype],
        RANDOM=random is not None,
        CONSENSUS=consensus,
        DROP_ZERO=drop_zero_sum,
        NORMALIZE=normalize,
        BLOCK=BLOCK,
        **COMPILE_OPTIONS,
    )


AOT_SIGNATURES = {
    f"gta_combine_kernel[{name}->{out_name},{mode}]": aot_entry(
        gta_combine_kernel,
        {
            "base_ptr": f"*{name}",
            "addresses_ptr": "*i64",
            "params_ptr": f"*{compute_name(name)}",
            "random_ptr": "*i64",
            "scalars_ptr": f"*{compute_name(name)}",
            "out_ptr": f"*{out_name}",
            "n": "i64",
            "offset": "i64",
            "num_experts": "i32",
        },
        {
            "DTYPE": FLOAT_TYPES[name],
            "COMPUTE": compute_type(name),
            "OUT": FLOAT_TYPES[out_name],
            "RANDOM": full,
            "CONSENSUS": full,
            "DROP_ZERO": False,
            "NORMALIZE": True,
            "BLOCK": BLOCK,
        },
    )
    # Every input dtype, written back in its own dtype, with every feature on; float32
    # and float64 also without the random keep and the consensus.
    for name, out_name, mode, full in (
        *((name, name, "full", True) for name in FLOAT_TYPES),
        ("fp32", "fp32", "plain", False),
        ("fp64", "fp64", "plain", False),
    )
}
