"""Triton kernels for the gated low-rank part of ``fastmerge.lowrank_mixture``.

The base ``x W^T + b`` is one torch GEMM issued by the op; these two kernels add
``sum_t g_t (x V_t^T) U_t^T``:

* ``lowrank_down_kernel``, grid (row tiles, rank tiles, tasks, at most 65,535: past
  that each program walks the tasks z, z + 65,535, ...):
  ``down[m, t r + k] = g[m // tokens, t] * (x[m] . vs[t, k])``;
* ``lowrank_up_kernel``, grid (row tiles, output tiles): ``y[m] += down[m] U_all^T``.

A program skips a task when no row of its tile has a non-zero gate for it (the down
kernel writes zeros there), so top-k routing pays only for the selected tasks' factors in
tiles whose samples agree. Half inputs are converted to float32 on load; float32 products
use IEEE float32 (no TF32, so the error matches torch's float32 GEMM); float64 is summed
in float64 by broadcasting (``tl.dot`` has no float64 path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import FLOAT_TYPES, aot_entry, compute_name, compute_type
from ._launch import GRID_LIMITS, launch

BLOCK_M = 32  # rows per tile
BLOCK_R = 32  # ranks per down tile
BLOCK_O = 64  # outputs per up tile
BLOCK_D = 32  # depth step (d_in for down, rank for up)
BLOCK_D_F64 = 8  # float64 is summed by broadcasting: a shallower step keeps registers low


@triton.jit
def _multiply_add(acc, a, b, F64: tl.constexpr):
    """acc + a @ b: float64 by broadcasting, float32 by tl.dot in IEEE precision."""
    if F64:
        return acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], 1)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def lowrank_down_kernel(
    x_ptr,  # (rows, d_in), contiguous
    vs_ptr,  # (tasks, rank, d_in), contiguous
    gates_ptr,  # (rows // tokens, tasks), contiguous
    down_ptr,  # ACC (rows, tasks * rank)
    rows,
    d_in,
    tasks,
    rank,
    tokens,
    ACC: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask = m < rows
    k_mask = k < rank
    m64 = m.to(tl.int64)
    for task in range(tl.program_id(2), tasks, tl.num_programs(2)):
        gate = tl.load(gates_ptr + (m64 // tokens) * tasks + task, mask=m_mask, other=0.0)
        gate = gate.to(ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC)
        if tl.max(tl.abs(gate), 0) > 0:
            v_rows = (task * rank + k).to(tl.int64) * d_in
            for d0 in range(0, d_in, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_mask = d < d_in
                x = tl.load(
                    x_ptr + m64[:, None] * d_in + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                v = tl.load(
                    vs_ptr + v_rows[None, :] + d[:, None],
                    mask=d_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                acc = _multiply_add(acc, x.to(ACC), v.to(ACC), F64)
        out = down_ptr + m64[:, None] * (tasks * rank) + (task * rank + k).to(tl.int64)[None, :]
        tl.store(out, acc * gate[:, None], mask=m_mask[:, None] & k_mask[None, :])


@triton.jit
def lowrank_up_kernel(
    down_ptr,  # ACC (rows, tasks * rank)
    us_ptr,  # (tasks, d_out, rank), contiguous
    gates_ptr,  # (rows // tokens, tasks), contiguous
    y_ptr,  # ACC (rows, d_out): x W^T + b on entry
    rows,
    d_out,
    tasks,
    rank,
    tokens,
    ACC: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    m_mask = m < rows
    o_mask = o < d_out
    m64 = m.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=ACC)
    for task in range(0, tasks):
        gate = tl.load(gates_ptr + (m64 // tokens) * tasks + task, mask=m_mask, other=0.0)
        if tl.max(tl.abs(gate.to(ACC)), 0) > 0:
            u_rows = (task * d_out + o).to(tl.int64) * rank
            for k0 in range(0, rank, BLOCK_D):
                k = k0 + tl.arange(0, BLOCK_D)
                k_mask = k < rank
                z = tl.load(
                    down_ptr + m64[:, None] * (tasks * rank) + (task * rank + k)[None, :],
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                u = tl.load(
                    us_ptr + u_rows[None, :] + k[:, None],
                    mask=k_mask[:, None] & o_mask[None, :],
                    other=0.0,
                ).to(ACC)
                acc = _multiply_add(acc, z, u, F64)
    mask = m_mask[:, None] & o_mask[None, :]
    out = y_ptr + m64[:, None] * d_out + o[None, :]
    tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)


def add_lowrank(
    y: torch.Tensor,
    x: torch.Tensor,
    us: torch.Tensor,
    vs: torch.Tensor,
    gates: torch.Tensor,
    tokens: int,
) -> None:
    """``y += sum_t gates[m // tokens, t] (x V_t^T) U_t^T`` in place.

    x (rows, d_in), us (T, d_out, r), vs (T, r, d_in), gates (rows // tokens, T):
    contiguous, one dtype; y: (rows, d_out) float32, or float64 for float64 inputs.
    """
    rows, d_in = x.shape
    tasks, d_out, rank = us.shape
    f64 = x.dtype == torch.float64
    acc = tl.float64 if f64 else tl.float32
    depth = BLOCK_D_F64 if f64 else BLOCK_D
    down = torch.empty((rows, tasks * rank), dtype=y.dtype, device=y.device)
    down_grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(rank, BLOCK_R),
                 min(tasks, GRID_LIMITS[2]))  # fmt: skip
    launch(
        lowrank_down_kernel, down_grid, x.device,
        x, vs, gates, down, rows, d_in, tasks, rank, tokens,
        ACC=acc, F64=f64, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_D=depth,
        axes=(f"row tiles ({BLOCK_M} rows each)", f"rank tiles ({BLOCK_R} ranks each)", "tasks"),
    )  # fmt: skip
    launch(
        lowrank_up_kernel, (triton.cdiv(rows, BLOCK_M), triton.cdiv(d_out, BLOCK_O)), x.device,
        down, us, gates, y, rows, d_out, tasks, rank, tokens,
        ACC=acc, F64=f64, BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_O, BLOCK_D=depth,
        axes=(f"row tiles ({BLOCK_M} rows each)", f"output tiles ({BLOCK_O} outputs each)"),
    )  # fmt: skip


def _aot_signatures() -> dict:
    """name -> (kernel, signature, constexprs) of both kernels for every input dtype."""
    signatures = {}
    for name in FLOAT_TYPES:
        f64 = name == "fp64"
        acc_name = compute_name(name)
        scalars = {"rows": "i32", "size": "i32", "tasks": "i32", "rank": "i32", "tokens": "i32"}
        common = {"ACC": compute_type(name), "F64": f64, "BLOCK_M": BLOCK_M}
        depth = BLOCK_D_F64 if f64 else BLOCK_D
        for kernel, pointers, size, constexprs in (
            (
                lowrank_down_kernel,
                {"x_ptr": name, "vs_ptr": name, "gates_ptr": name, "down_ptr": acc_name},
                "d_in",
                {**common, "BLOCK_R": BLOCK_R, "BLOCK_D": depth},
            ),
            (
                lowrank_up_kernel,
                {"down_ptr": acc_name, "us_ptr": name, "gates_ptr": name, "y_ptr": acc_name},
                "d_out",
                {**common, "BLOCK_O": BLOCK_O, "BLOCK_D": depth},
            ),
        ):
            types = {arg: f"*{dtype}" for arg, dtype in pointers.items()}
            types.update({size if k == "size" else k: v for k, v in scalars.items()})
            signatures[f"{kernel.__name__}[{name}]"] = aot_entry(kernel, types, constexprs)
    return signatures


AOT_SIGNATURES = _aot_signatures()
