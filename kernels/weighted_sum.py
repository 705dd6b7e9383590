"""Triton kernel for the weighted sum ``Σ_t w_t · x_t``: one launch, any number of inputs.

One program per BLOCK entries. The inputs may have different dtypes: each input's data
pointer and dtype code come from small int64 tables, and a runtime branch on the code
(uniform over the launch) picks the element type of its load. Arithmetic as in
:mod:`fastmerge.ops.weighted_sum`: the sum starts from the first product and adds the
others in input order, with no fused multiply-add (the launch sets
``enable_fp_fusion=False``), so the result is bit for bit the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import FLOAT_TYPES, aot_entry
from ._launch import launch
from ._rounding import to_out as _to_out
from ._tables import TRITON_DTYPES, int64_on

BLOCK = 1024
#: Compile options of every launch: each product is rounded before it is added.
COMPILE_OPTIONS = {"enable_fp_fusion": False}
#: dtype codes of the inputs (fastmerge/_dtypes.py).
_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


@triton.jit
def weighted_sum_kernel(
    addresses_ptr,  # int64 (T,): data pointer of each input
    codes_ptr,  # int32 (T,): dtype code of each input
    weights_ptr,  # COMPUTE (T,)
    out_ptr,  # OUT (n,)
    n,
    count,
    COMPUTE: tl.constexpr,
    OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    acc = _term(addresses_ptr, codes_ptr, weights_ptr, 0, offsets, mask, COMPUTE)
    for t in range(1, count):
        acc = acc + _term(addresses_ptr, codes_ptr, weights_ptr, t, offsets, mask, COMPUTE)
    tl.store(out_ptr + offsets, _to_out(acc, OUT), mask=mask)


@triton.jit
def _term(addresses_ptr, codes_ptr, weights_ptr, t, offsets, mask, COMPUTE: tl.constexpr):
    """w_t · x_t for one block, x_t loaded in its own dtype and widened exactly."""
    address = tl.load(addresses_ptr + t)
    code = tl.load(codes_ptr + t)
    w = tl.load(weights_ptr + t)
    if code == 0:
        x = tl.load(address.to(tl.pointer_type(tl.float16)) + offsets, mask=mask, other=0.0)
        x = x.to(tl.float32).to(COMPUTE)
    elif code == 1:
        x = tl.load(address.to(tl.pointer_type(tl.bfloat16)) + offsets, mask=mask, other=0.0)
        x = x.to(tl.float32).to(COMPUTE)
    elif code == 2:
        x = tl.load(address.to(tl.pointer_type(tl.float32)) + offsets, mask=mask, other=0.0)
        x = x.to(COMPUTE)
    else:
        x = tl.load(address.to(tl.pointer_type(tl.float64)) + offsets, mask=mask, other=0.0)
        x = x.to(COMPUTE)
    return w * x


def weighted_sum(
    tensors: list[torch.Tensor], weights: list[float], dtype: torch.dtype, out: torch.Tensor
) -> None:
    """Write ``Σ weights[t] * tensors[t]`` of flat, contiguous inputs into flat `out`,
    accumulated in `dtype` (float32 or float64)."""
    n = out.numel()
    device = out.device
    launch(
        weighted_sum_kernel,
        (triton.cdiv(n, BLOCK),),
        device,
        int64_on([t.data_ptr() for t in tensors], device),
        torch.tensor([_CODES[t.dtype] for t in tensors], dtype=torch.int32).to(device),
        torch.tensor(weights, dtype=dtype).to(device),
        out,
        n,
        len(tensors),
        COMPUTE=TRITON_DTYPES[dtype],
        OUT=TRITON_DTYPES[out.dtype],
        BLOCK=BLOCK,
        **COMPILE_OPTIONS,
    )


AOT_SIGNATURES = {
    f"weighted_sum_kernel[{compute}->{out_name}]": aot_entry(
        weighted_sum_kernel,
        {
            "addresses_ptr": "*i64",
            "codes_ptr": "*i32",
            "weights_ptr": f"*{compute}",
            "out_ptr": f"*{out_name}",
            "n": "i64",
            "count": "i32",
        },
        {"COMPUTE": FLOAT_TYPES[compute], "OUT": FLOAT_TYPES[out_name], "BLOCK": BLOCK},
    )
    for compute in ("fp32", "fp64")
    for out_name in FLOAT_TYPES
}
