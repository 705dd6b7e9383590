"""Triton kernel for the fused feature-cost epilogue (``csrc/include/fastmerge/feature_cost.h``).

One program per (BLOCK_R x BLOCK_C) tile of the output: it derives the per-unit moments
of its rows and columns from the shifted sums, then writes covariance, correlation,
inner product or negative squared distance for the whole tile in float64. ``KIND`` is a
compile-time constant, so each kind is its own kernel without branches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import aot_entry
from ._launch import launch

#: Kind codes, as in fastmerge/ops/feature_cost.py and feature_cost.h.
KINDS = {"covariance": 0, "correlation": 1, "inner_product": 2, "neg_sq_distance": 3}
#: Variance below this fraction of the mean square around the shift counts as 0.
CONSTANT_UNIT_RTOL = tl.constexpr(1e-14)

BLOCK_R = 32
BLOCK_C = 64


@triton.jit
def _unit_moments(sum_ptr, sumsq_ptr, shift_ptr, index, mask, inv_n):
    s = tl.load(sum_ptr + index, mask=mask, other=0.0)
    q = tl.load(sumsq_ptr + index, mask=mask, other=0.0)
    h = tl.load(shift_ptr + index, mask=mask, other=0.0)
    dmean = s * inv_n
    square = q * inv_n
    var = square - dmean * dmean
    var = tl.where(var <= CONSTANT_UNIT_RTOL * square, 0.0, var)
    inv_std = tl.where(var == 0.0, 0.0, 1.0 / tl.sqrt(tl.where(var == 0.0, 1.0, var)))
    return dmean, h + dmean, var, inv_std


@triton.jit
def feature_cost_kernel(
    cross_ptr,  # float64 (rows, cols), row-major
    sum_a_ptr,  # float64 (rows,)
    sum_b_ptr,  # float64 (cols,)
    sumsq_a_ptr,
    sumsq_b_ptr,
    shift_a_ptr,
    shift_b_ptr,
    out_ptr,  # float64 (rows, cols)
    inv_n_ptr,  # float64 (1,): 1 / count (a Python float argument would become float32)
    rows,
    cols,
    KIND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    inv_n = tl.load(inv_n_ptr)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = r < rows
    col_mask = c < cols
    a_dmean, a_mean, a_var, a_inv_std = _unit_moments(
        sum_a_ptr, sumsq_a_ptr, shift_a_ptr, r, row_mask, inv_n
    )
    b_dmean, b_mean, b_var, b_inv_std = _unit_moments(
        sum_b_ptr, sumsq_b_ptr, shift_b_ptr, c, col_mask, inv_n
    )
    offsets = r[:, None].to(tl.int64) * cols + c[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    cross = tl.load(cross_ptr + offsets, mask=mask, other=0.0)
    cov = cross * inv_n - a_dmean[:, None] * b_dmean[None, :]
    if KIND == 0:
        out = cov
    elif KIND == 1:
        corr = cov * a_inv_std[:, None] * b_inv_std[None, :]
        out = tl.where(corr < -1.0, -1.0, tl.where(corr > 1.0, 1.0, corr))
    elif KIND == 2:
        out = cov + a_mean[:, None] * b_mean[None, :]
    else:
        dm = a_mean[:, None] - b_mean[None, :]
        sq = a_var[:, None] + b_var[None, :] - 2.0 * cov + dm * dm
        out = tl.where(sq < 0.0, 0.0, -sq)
    tl.store(out_ptr + offsets, out, mask=mask)


def feature_cost(
    cross: torch.Tensor,
    sum_a: torch.Tensor,
    sum_b: torch.Tensor,
    sumsq_a: torch.Tensor,
    sumsq_b: torch.Tensor,
    shift_a: torch.Tensor,
    shift_b: torch.Tensor,
    count: float,
    kind: int,
) -> torch.Tensor:
    """float64 (rows, cols) costs from contiguous float64 moments on one device."""
    rows, cols = cross.shape
    out = torch.empty((rows, cols), dtype=torch.float64, device=cross.device)
    if rows == 0 or cols == 0:
        return out
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(cols, BLOCK_C))
    launch(
        feature_cost_kernel,
        grid,
        cross.device,
        cross,
        sum_a,
        sum_b,
        sumsq_a,
        sumsq_b,
        shift_a,
        shift_b,
        out,
        torch.full((1,), 1.0 / float(count), dtype=torch.float64, device=cross.device),
        rows,
        cols,
        KIND=kind,
        BLOCK_R=BLOCK_R,
        BLOCK_C=BLOCK_C,
        axes=(f"row tiles ({BLOCK_R} rows each)", f"column tiles ({BLOCK_C} columns each)"),
    )
    return out


AOT_SIGNATURES = {
    f"feature_cost_kernel[{name}]": aot_entry(
        feature_cost_kernel,
        {
            "cross_ptr": "*fp64",
            "sum_a_ptr": "*fp64",
            "sum_b_ptr": "*fp64",
            "sumsq_a_ptr": "*fp64",
            "sumsq_b_ptr": "*fp64",
            "shift_a_ptr": "*fp64",
            "shift_b_ptr": "*fp64",
            "out_ptr": "*fp64",
            "inv_n_ptr": "*fp64",
            "rows": "i32",
            "cols": "i32",
        },
        {"KIND": code, "BLOCK_R": BLOCK_R, "BLOCK_C": BLOCK_C},
    )
    for name, code in KINDS.items()
}
