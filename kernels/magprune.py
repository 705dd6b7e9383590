"""Triton kernel for DELLA's MAGPRUNE: per row, the rank of ``|τ|``, the hashed random keep
with a rank-dependent bound, the kept τ and the L1 sums, in one launch.

One program per row (``width`` entries at stride ``inner``), the whole row in one block of
BLOCK (the next power of two) entries. In float32 the order-preserving keys of ``|τ|``
(the float bits, every NaN one key above +inf) are packed with their positions as
``key << 32 | j`` and sorted with ``tl.sort``: position p of the sorted row is the rank of
entry ``j = packed & 0xFFFFFFFF`` (ties by j, as the reference's stable sort). The kept τ
of that entry is then recomputed from a second, gathered load of base and expert and
scattered to the output. In float64 the keys take 63 bits and do not pack with a
position: the launcher ranks the rows with ``torch.argsort(stable=True)`` and the kernel
reads the ranks. The op sends rows wider than :data:`MAX_BLOCK` entries to the reference.
The random keep's hash is gta_combine's (int64 arithmetic wrapping modulo 2**64, logical
shifts as arithmetic shifts and a mask), so the mask is bit for bit the other backends';
the per-row sums are float64 tree sums (the CPU sums in another order: the norms agree to
float64 rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import FLOAT_TYPES, aot_entry, compute_type
from ._launch import launch
from ._rounding import to_out as _to_out
from ._tables import TRITON_DTYPES, int64_on
from .gta_combine import _GOLDEN, _MIX1, _MIX2, _shr

#: The widest row one program sorts; wider rows take the reference path.
MAX_BLOCK = 1 << 14
_FLOAT32_NAN_KEY = tl.constexpr(0x7F800001)
_LOW32 = tl.constexpr(0xFFFFFFFF)
_PAD = tl.constexpr(0x7FFFFFFFFFFFFFFF)


@triton.jit
def magprune_kernel(
    base_ptr,  # DTYPE (n,)
    expert_ptr,  # DTYPE (n,)
    ranks_ptr,  # int64 (rows, width): ranks, read only when RANKED (else a dummy)
    params_ptr,  # int64 (4,): key bits, below, step, offset
    out_ptr,  # OUT (n,)
    norms_ptr,  # float64 (rows, 2): Σ|τ|, Σ kept |τ| of each row
    width,
    inner,
    COMPUTE: tl.constexpr,
    OUT: tl.constexpr,
    RANKED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    i = r // inner
    start = i * width * inner + (r - i * inner)
    j = tl.arange(0, BLOCK).to(tl.int64)
    inside = j < width
    key = tl.load(params_ptr)
    below = tl.load(params_ptr + 1)
    step = tl.load(params_ptr + 2)
    offset = tl.load(params_ptr + 3)
    where = start + j * inner
    tau = _tau(base_ptr, expert_ptr, where, inside, COMPUTE)
    tl.store(norms_ptr + 2 * r, tl.sum(tl.abs(tau).to(tl.float64), axis=0))
    if RANKED:
        rank = tl.load(ranks_ptr + r * width + j, mask=inside, other=0)
    else:
        bits = tl.abs(tau).to(tl.int32, bitcast=True).to(tl.int64) & 0x7FFFFFFF
        bits = tl.minimum(bits, _FLOAT32_NAN_KEY)
        packed = tl.where(inside, (bits << 32) | j, _PAD)
        packed = tl.sort(packed)
        rank = j  # position in the sorted row ...
        j = packed & _LOW32  # ... of this entry
        inside = rank < width
        where = start + j * inner
        tau = _tau(base_ptr, expert_ptr, where, inside, COMPUTE)
    z = (offset + where + 1) * _GOLDEN + key
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    keep = _shr(z, 11) < below + rank * step
    kept = tl.where(keep, tau, 0.0)
    tl.store(out_ptr + where, _to_out(kept, OUT), mask=inside)
    tl.store(norms_ptr + 2 * r + 1, tl.sum(tl.abs(kept).to(tl.float64), axis=0))


@triton.jit
def _tau(base_ptr, expert_ptr, where, inside, COMPUTE: tl.constexpr):
    """τ = expert - base at `where` in the compute dtype (0 outside the row)."""
    b = tl.load(base_ptr + where, mask=inside, other=0.0).to(COMPUTE)
    e = tl.load(expert_ptr + where, mask=inside, other=0.0).to(COMPUTE)
    return e - b


def magprune(
    base: torch.Tensor,
    expert: torch.Tensor,
    key: int,
    below: int,
    step: int,
    offset: int,
    width: int,
    inner: int,
    dtype: torch.dtype,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write the kept τ of flat contiguous `base` and `expert` into flat `out` and return
    the float64 (2,) norms ``[Σ|τ|, Σ kept |τ|]``; τ in `dtype` (float32 or float64);
    rows of at most :data:`MAX_BLOCK` entries."""
    n = out.numel()
    device = out.device
    if base.dtype != expert.dtype:  # one element type per kernel: widen both (exact)
        base, expert = base.to(dtype), expert.to(dtype)
    rows = n // width
    ranked = dtype == torch.float64
    if ranked:
        ranks = _ranks((expert - base).abs(), width, inner)
    else:
        ranks = torch.zeros(1, dtype=torch.int64, device=device)
    norms = torch.empty(rows, 2, dtype=torch.float64, device=device)
    block = max(16, triton.next_power_of_2(width))
    launch(
        magprune_kernel,
        (rows,),
        device,
        base,
        expert,
        ranks,
        int64_on([key, below, step, offset], device),
        out,
        norms,
        width,
        inner,
        COMPUTE=TRITON_DTYPES[dtype],
        OUT=TRITON_DTYPES[out.dtype],
        RANKED=ranked,
        BLOCK=block,
        num_warps=min(16, max(4, block // 256)),
        axes=("rows",),
    )
    return norms.sum(dim=0)


def _ranks(magnitude: torch.Tensor, width: int, inner: int) -> torch.Tensor:
    """(rows, width) int64 ascending ranks of each row of `magnitude` (ties by position;
    NaN above +inf), rows in the kernel's order (row r = (i, k), r = i * inner + k)."""
    rows = magnitude.reshape(-1, width, inner).transpose(1, 2).reshape(-1, width)
    order = torch.argsort(rows, dim=1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(width, device=rows.device).expand_as(order)
    return ranks.scatter_(1, order, positions).contiguous()


AOT_SIGNATURES = {
    f"magprune_kernel[{name}->{out_name},{block}]": aot_entry(
        magprune_kernel,
        {
            "base_ptr": f"*{name}",
            "expert_ptr": f"*{name}",
            "ranks_ptr": "*i64",
            "params_ptr": "*i64",
            "out_ptr": f"*{out_name}",
            "norms_ptr": "*fp64",
            "width": "i64",
            "inner": "i64",
        },
        {
            "COMPUTE": compute_type(name),
            "OUT": FLOAT_TYPES[out_name],
            "RANKED": name == "fp64",
            "BLOCK": block,
        },
    )
    # Every dtype, read and written, at a row width of 1024 (wider blocks compile the same
    # code, only longer: a sort of 4096 takes minutes).
    for name in FLOAT_TYPES
    for out_name in (name,)
    for block in (1024,)
}
