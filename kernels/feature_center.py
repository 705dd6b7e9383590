"""Triton kernel for the FeatureStats prologue: ``out = x - shift`` in the GEMM's dtype and
float64 column sums and sums of squares of what was stored, in one pass.

Programs form a (row split x column block) grid; each loops over its split's rows in
BLOCK_R steps, keeps float64 column sums, and writes them to ``partials[split]``. The
launcher adds the splits up in order, so the sums do not depend on scheduling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import FLOAT_TYPES, aot_entry
from ._launch import launch
from ._tables import TRITON_DTYPES

BLOCK_R = 32
BLOCK_C = 64
#: Rows per split: enough work per program, enough programs for a GPU.
ROWS_PER_SPLIT = 512


@triton.jit
def feature_center_kernel(
    x_ptr,  # (rows, cols), columns contiguous, row stride x_row_stride
    shift_ptr,  # float64 (cols,)
    out_ptr,  # OUT (rows, cols), row stride out_row_stride
    partials_ptr,  # float64 (splits, 2, cols)
    rows,
    cols,
    x_row_stride,
    out_row_stride,
    rows_per_split,
    OUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = c < cols
    shift = tl.load(shift_ptr + c, mask=col_mask, other=0.0).to(OUT)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    first = split * rows_per_split
    last = tl.minimum(rows, first + rows_per_split)
    for start in range(first, last, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        mask = (r < last)[:, None] & col_mask[None, :]
        r64 = r[:, None].to(tl.int64)
        x = tl.load(x_ptr + r64 * x_row_stride + c[None, :], mask=mask, other=0.0)
        d = tl.where(mask, x.to(OUT) - shift[None, :], 0.0)
        tl.store(out_ptr + r64 * out_row_stride + c[None, :], d, mask=mask)
        dd = d.to(tl.float64)
        s1 += tl.sum(dd, axis=0)
        s2 += tl.sum(dd * dd, axis=0)
    base = partials_ptr + (2 * split).to(tl.int64) * cols
    tl.store(base + c, s1, mask=col_mask)
    tl.store(base + cols + c, s2, mask=col_mask)


def feature_center(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``x - shift`` into `out` (float32 or float64, columns contiguous) and return the
    float64 (2, cols) column sums and sums of squares of `out`."""
    rows, cols = x.shape
    splits = max(1, triton.cdiv(rows, ROWS_PER_SPLIT))
    partials = torch.zeros((splits, 2, cols), dtype=torch.float64, device=x.device)
    if cols > 0 and rows > 0:
        launch(
            feature_center_kernel,
            (splits, triton.cdiv(cols, BLOCK_C)),
            x.device,
            x,
            shift,
            out,
            partials,
            rows,
            cols,
            x.stride(0),
            out.stride(0),
            ROWS_PER_SPLIT,
            OUT=TRITON_DTYPES[out.dtype],
            BLOCK_R=BLOCK_R,
            BLOCK_C=BLOCK_C,
            axes=("row splits", f"column tiles ({BLOCK_C} columns each)"),
        )
    return partials.sum(0)


AOT_SIGNATURES = {
    f"feature_center_kernel[{name}->{out_name}]": aot_entry(
        feature_center_kernel,
        {
            "x_ptr": f"*{name}",
            "shift_ptr": "*fp64",
            "out_ptr": f"*{out_name}",
            "partials_ptr": "*fp64",
            "rows": "i32",
            "cols": "i32",
            "x_row_stride": "i64",
            "out_row_stride": "i64",
            "rows_per_split": "i32",
        },
        {"OUT": FLOAT_TYPES[out_name], "BLOCK_R": BLOCK_R, "BLOCK_C": BLOCK_C},
    )
    for name in FLOAT_TYPES
    for out_name in ("fp32", "fp64")
}
