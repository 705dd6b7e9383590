"""The rounding of a kernel's result to its output dtype, shared by every kernel that
writes half-precision outputs, so that one helper gets the special cases right."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_out(x, OUT: tl.constexpr):
    """Round to OUT as torch does: the half types through float32, to nearest even.

    bfloat16 is rounded by hand on the float32 bits, because the interpreter would
    truncate. A NaN needs its own case: adding the rounding bias to a NaN's bits can
    carry into the exponent and the sign (0x7FFFFFFF, the GPU's NaN, would become -0.0;
    0x7F800001 would become infinity), so a NaN keeps its sign and top payload bits,
    quieted, as torch keeps a NaN a NaN.
    """
    if OUT == tl.float64:
        y = x.to(tl.float64)
    elif OUT == tl.float32:
        y = x.to(tl.float32)
    elif OUT == tl.bfloat16:
        f = x.to(tl.float32)
        bits = f.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet = (bits >> 16) | 0x0040
        is_nan = f != f
        y = tl.where(is_nan, quiet, rounded).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(tl.float32).to(OUT)
    return y
