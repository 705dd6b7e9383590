"""Triton kernel for the nearswap ``w·b + (1 - w)·a``, ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``.

One program per BLOCK entries, one launch. a and b may have different dtypes: their data
pointers and dtype codes are scalar arguments, and a runtime branch on each code (uniform
over the launch) picks the element type of its load, so one compiled kernel serves every
pair of input dtypes. Arithmetic as in :mod:`fastmerge.ops.nearswap`: t and 1e-6 come
rounded to the compute dtype from a small table, every step is rounded separately (the
launch sets ``enable_fp_fusion=False``, so no multiply-add is fused) and ``t / d`` is the
IEEE division (``div_rn`` in float32, as Triton's ``/`` is the approximate
``div.full.f32`` there; ``/`` in float64, which is ``div.rn.f64``); so the result is bit
for bit the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import FLOAT_TYPES, aot_entry
from ._launch import launch
from ._rounding import to_out as _to_out  # the rounding to the output dtype, as torch does it
from ._tables import TRITON_DTYPES

BLOCK = 1024
#: Compile options of every launch: each product is rounded before it is added.
COMPILE_OPTIONS = {"enable_fp_fusion": False}
#: dtype codes of the inputs (fastmerge/_dtypes.py).
_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
#: The floor of |a - b| (fastmerge.reference.nearswap.EPSILON).
EPSILON = 1e-6


@triton.jit
def nearswap_kernel(
    a_address,  # int64: data pointer of a
    a_code,  # int32: dtype code of a
    b_address,  # int64: data pointer of b
    b_code,  # int32: dtype code of b
    params_ptr,  # COMPUTE (2,): t, 1e-6
    out_ptr,  # OUT (n,)
    n,
    COMPUTE: tl.constexpr,
    OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = _load(a_address, a_code, offsets, mask, COMPUTE)
    y = _load(b_address, b_code, offsets, mask, COMPUTE)
    t = tl.load(params_ptr)
    eps = tl.load(params_ptr + 1)
    d = tl.abs(x - y)
    d = tl.where(d < eps, eps, d)  # a NaN fails the comparison and stays
    if COMPUTE == tl.float64:
        w = t / d  # div.rn.f64 (precise_divf is float32 only)
    else:
        w = tl.math.div_rn(t, d)  # not `/`: div.full.f32 is approximate
    w = tl.where(w < 0.0, 0.0, w)
    w = tl.where(w > 1.0, 1.0, w)
    result = w * y + (1.0 - w) * x
    tl.store(out_ptr + offsets, _to_out(result, OUT), mask=mask)


@triton.jit
def _load(address, code, offsets, mask, COMPUTE: tl.constexpr):
    """One block of an input, loaded in its own dtype and widened exactly."""
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
    return x


def nearswap(
    a: torch.Tensor, b: torch.Tensor, t: float, dtype: torch.dtype, out: torch.Tensor
) -> None:
    """Write the nearswap of flat, contiguous `a` and `b` into flat `out`, computed in
    `dtype` (float32 or float64)."""
    n = out.numel()
    launch(
        nearswap_kernel,
        (triton.cdiv(n, BLOCK),),
        out.device,
        a.data_ptr(),
        _CODES[a.dtype],
        b.data_ptr(),
        _CODES[b.dtype],
        torch.tensor([t, EPSILON], dtype=dtype).to(out.device),
        out,
        n,
        COMPUTE=TRITON_DTYPES[dtype],
        OUT=TRITON_DTYPES[out.dtype],
        BLOCK=BLOCK,
        **COMPILE_OPTIONS,
    )


AOT_SIGNATURES = {
    f"nearswap_kernel[{compute}->{out_name}]": aot_entry(
        nearswap_kernel,
        {
            "a_address": "i64",
            "a_code": "i32",
            "b_address": "i64",
            "b_code": "i32",
            "params_ptr": f"*{compute}",
            "out_ptr": f"*{out_name}",
            "n": "i64",
        },
        {"COMPUTE": FLOAT_TYPES[compute], "OUT": FLOAT_TYPES[out_name], "BLOCK": BLOCK},
    )
    for compute in ("fp32", "fp64")
    for out_name in FLOAT_TYPES
}
