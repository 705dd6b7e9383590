"""Triton kernel for the TIES combine: trim, elect signs and average in one launch.

One program per BLOCK entries. The number of experts is a runtime value, so the kernel
walks the experts twice: once to sum the trimmed τ (the elected sign), once more to
recompute the same τ and add up the ones that agree. Arithmetic as in
:mod:`fastmerge.ops.ties_combine`: sums in expert order from 0, ``div_rn`` for the
mean (plain ``/`` is approximate on the GPU) and no fused multiply-add (the launch sets
``enable_fp_fusion=False``), so the result is bit for bit the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import FLOAT_TYPES, aot_entry, compute_name, compute_type
from ._launch import launch
from ._rounding import to_out as _to_out
from ._tables import TRITON_DTYPES, int64_on

BLOCK = 1024
#: Compile options of every launch: the product scale * mean is rounded before the add.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def ties_combine_kernel(
    base_ptr,  # DTYPE (n,)
    addresses_ptr,  # int64 (T,): data pointer of each expert
    thresholds_ptr,  # COMPUTE (T,)
    scale_ptr,  # COMPUTE (1,): a tensor, since Triton passes Python floats as float32
    out_ptr,  # OUT (n,)
    n,
    num_experts,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    b = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    zero = tl.zeros([BLOCK], dtype=COMPUTE)
    total = zero
    for t in range(num_experts):
        kept = _trimmed(addresses_ptr, thresholds_ptr, t, offsets, mask, b, DTYPE, COMPUTE)
        total = total + kept
    agreeing = zero
    count = zero
    for t in range(num_experts):
        kept = _trimmed(addresses_ptr, thresholds_ptr, t, offsets, mask, b, DTYPE, COMPUTE)
        agrees = ((total > 0) & (kept > 0)) | ((total < 0) & (kept < 0))
        agreeing = agreeing + tl.where(agrees, kept, zero)
        count = count + tl.where(agrees, 1.0, 0.0).to(COMPUTE)
    mean = tl.where(count > 0, _divide(agreeing, tl.maximum(count, 1.0), COMPUTE), zero)
    product = tl.load(scale_ptr) * mean
    tl.store(out_ptr + offsets, _to_out(b + product, OUT), mask=mask)


@triton.jit
def _divide(x, y, COMPUTE: tl.constexpr):
    """Correctly rounded x / y (float32 ``/`` may be approximate on the GPU)."""
    if COMPUTE == tl.float32:
        q = tl.math.div_rn(x, y)
    else:
        q = x / y  # float64 division is always correctly rounded
    return q


@triton.jit
def _trimmed(addresses_ptr, thresholds_ptr, t, offsets, mask, b, DTYPE, COMPUTE):
    """Expert t's τ where |τ| >= its threshold, else 0."""
    expert_ptr = tl.load(addresses_ptr + t).to(tl.pointer_type(DTYPE))
    threshold = tl.load(thresholds_ptr + t)
    tau = tl.load(expert_ptr + offsets, mask=mask, other=0.0).to(COMPUTE) - b
    return tl.where(tl.abs(tau) >= threshold, tau, 0.0).to(COMPUTE)


def ties_combine(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    thresholds: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Write the TIES merge of flat, contiguous inputs of one dtype into `out`."""
    n = base.numel()
    launch(
        ties_combine_kernel,
        (triton.cdiv(n, BLOCK),),
        base.device,
        base,
        int64_on([e.data_ptr() for e in experts], base.device),
        thresholds,
        torch.full((1,), scale, dtype=thresholds.dtype, device=base.device),
        out,
        n,
        len(experts),
        DTYPE=TRITON_DTYPES[base.dtype],
        COMPUTE=TRITON_DTYPES[thresholds.dtype],
        OUT=TRITON_DTYPES[out.dtype],
        BLOCK=BLOCK,
        **COMPILE_OPTIONS,
    )


AOT_SIGNATURES = {
    f"ties_combine_kernel[{name}->{out_name}]": aot_entry(
        ties_combine_kernel,
        {
            "base_ptr": f"*{name}",
            "addresses_ptr": "*i64",
            "thresholds_ptr": f"*{compute_name(name)}",
            "scale_ptr": f"*{compute_name(name)}",
            "out_ptr": f"*{out_name}",
            "n": "i64",
            "num_experts": "i32",
        },
        {
            "DTYPE": FLOAT_TYPES[name],
            "COMPUTE": compute_type(name),
            "OUT": FLOAT_TYPES[out_name],
            "BLOCK": BLOCK,
        },
    )
    # Every input dtype, written back in its own dtype and in float32.
    for name in FLOAT_TYPES
    for out_name in dict.fromkeys((name, "fp32"))
}
