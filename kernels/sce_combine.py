"""Triton kernels for SCE: the variance across the models, the energies of the selected
deltas, and the sign election with the weighted mean, one launch each.

One program per BLOCK entries. The number of experts is a runtime value, so a program
walks the experts once per step (the mean, the squared deviations, the kept sum, the
agreeing ones), recomputing τ from loads that the cache holds. Arithmetic as in
:mod:`fastmerge.ops.sce_combine`: sums in expert order from 0, ``div_rn`` for the
divisions (plain ``/`` is approximate on the GPU) and no fused multiply-add (the launches
set ``enable_fp_fusion=False``), so the variances and the merge are bit for bit the
reference's. The energies are per-program float64 tree sums, added up by torch.
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
#: Compile options of every launch: every product rounded before its sum.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _divide(x, y, COMPUTE: tl.constexpr):
    """Correctly rounded x / y (float32 ``/`` may be approximate on the GPU)."""
    if COMPUTE == tl.float32:
        q = tl.math.div_rn(x, y)
    else:
        q = x / y  # float64 division is always correctly rounded
    return q


@triton.jit
def _tau(addresses_ptr, t, offsets, mask, b, DTYPE: tl.constexpr, COMPUTE: tl.constexpr):
    expert_ptr = tl.load(addresses_ptr + t).to(tl.pointer_type(DTYPE))
    return tl.load(expert_ptr + offsets, mask=mask, other=0.0).to(COMPUTE) - b


@triton.jit
def _variance(addresses_ptr, num_experts, offsets, mask, b, DTYPE, COMPUTE, BLOCK):
    zero = tl.zeros([BLOCK], dtype=COMPUTE)
    count = zero + num_experts.to(COMPUTE)
    total = zero
    for t in range(num_experts):
        total = total + _tau(addresses_ptr, t, offsets, mask, b, DTYPE, COMPUTE)
    mean = _divide(total, count, COMPUTE)
    acc = zero
    for t in range(num_experts):
        d = _tau(addresses_ptr, t, offsets, mask, b, DTYPE, COMPUTE) - mean
        acc = acc + d * d
    return _divide(acc, count, COMPUTE)


@triton.jit
def _keep(var, threshold_ptr, SELECT: tl.constexpr):
    if SELECT:
        keep = var >= tl.load(threshold_ptr)
    else:
        keep = var == var  # unused: every entry kept
    return keep


@triton.jit
def sce_variance_kernel(
    base_ptr,  # DTYPE (n,)
    addresses_ptr,  # int64 (T,): data pointer of each expert
    var_ptr,  # COMPUTE (n,)
    n,
    num_experts,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    b = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    var = _variance(addresses_ptr, num_experts, offsets, mask, b, DTYPE, COMPUTE, BLOCK)
    tl.store(var_ptr + offsets, var, mask=mask)


@triton.jit
def sce_energies_kernel(
    base_ptr,  # DTYPE (n,)
    addresses_ptr,  # int64 (T,)
    threshold_ptr,  # COMPUTE (1,)
    sums_ptr,  # float64 (programs, T)
    n,
    num_experts,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    SELECT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    b = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    zero = tl.zeros([BLOCK], dtype=COMPUTE)
    if SELECT:
        var = _variance(addresses_ptr, num_experts, offsets, mask, b, DTYPE, COMPUTE, BLOCK)
    else:
        var = zero
    keep = _keep(var, threshold_ptr, SELECT)
    for t in range(num_experts):
        kept = tl.where(keep, _tau(addresses_ptr, t, offsets, mask, b, DTYPE, COMPUTE), zero)
        x = kept.to(tl.float64)
        tl.store(sums_ptr + pid.to(tl.int64) * num_experts + t, tl.sum(x * x, axis=0))


@triton.jit
def sce_combine_kernel(
    base_ptr,  # DTYPE (n,)
    addresses_ptr,  # int64 (T,)
    threshold_ptr,  # COMPUTE (1,)
    weights_ptr,  # COMPUTE (T,)
    out_ptr,  # OUT (n,)
    n,
    num_experts,
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    OUT: tl.constexpr,
    SELECT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    b = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    zero = tl.zeros([BLOCK], dtype=COMPUTE)
    if SELECT:
        var = _variance(addresses_ptr, num_experts, offsets, mask, b, DTYPE, COMPUTE, BLOCK)
    else:
        var = zero
    keep = _keep(var, threshold_ptr, SELECT)
    total = zero
    for t in range(num_experts):
        total = total + tl.where(
            keep, _tau(addresses_ptr, t, offsets, mask, b, DTYPE, COMPUTE), zero
        )
    positive = total >= 0
    merged = zero
    divisor = zero
    for t in range(num_experts):
        kept = tl.where(keep, _tau(addresses_ptr, t, offsets, mask, b, DTYPE, COMPUTE), zero)
        w = tl.load(weights_ptr + t)
        agrees = tl.where(positive, kept > 0, kept < 0)
        merged = merged + tl.where(agrees, w * kept, zero)
        divisor = divisor + tl.where(agrees, zero + w, zero)
    floor = zero + 1e-6
    result = _divide(merged, tl.where(divisor < floor, floor, divisor), COMPUTE) + b
    tl.store(out_ptr + offsets, _to_out(result, OUT), mask=mask)


def _threshold(threshold, compute: torch.dtype, device: torch.device) -> torch.Tensor:
    if threshold is None:
        return torch.zeros(1, dtype=compute, device=device)
    return threshold


def sce_variance(base: torch.Tensor, experts: list[torch.Tensor], var: torch.Tensor) -> None:
    """Write the variances of flat, contiguous inputs of one dtype into `var`."""
    n = base.numel()
    launch(
        sce_variance_kernel, (triton.cdiv(n, BLOCK),), base.device,
        base, int64_on([e.data_ptr() for e in experts], base.device), var, n, len(experts),
        DTYPE=TRITON_DTYPES[base.dtype], COMPUTE=TRITON_DTYPES[var.dtype], BLOCK=BLOCK,
        **COMPILE_OPTIONS,
    )  # fmt: skip


def sce_energies(
    base: torch.Tensor, experts: list[torch.Tensor], threshold: torch.Tensor | None
) -> torch.Tensor:
    """float64 (T,) sums of the squared kept τ of flat, contiguous inputs of one dtype."""
    n = base.numel()
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    programs = triton.cdiv(n, BLOCK)
    sums = torch.empty(programs, len(experts), dtype=torch.float64, device=base.device)
    launch(
        sce_energies_kernel, (programs,), base.device,
        base, int64_on([e.data_ptr() for e in experts], base.device),
        _threshold(threshold, compute, base.device), sums, n, len(experts),
        DTYPE=TRITON_DTYPES[base.dtype], COMPUTE=TRITON_DTYPES[compute],
        SELECT=threshold is not None, BLOCK=BLOCK, **COMPILE_OPTIONS,
    )  # fmt: skip
    return sums.sum(dim=0)


def sce_combine(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    threshold: torch.Tensor | None,
    weights: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Write the SCE merge of flat, contiguous inputs of one dtype into `out`."""
    n = base.numel()
    launch(
        sce_combine_kernel, (triton.cdiv(n, BLOCK),), base.device,
        base, int64_on([e.data_ptr() for e in experts], base.device),
        _threshold(threshold, weights.dtype, base.device), weights, out, n, len(experts),
        DTYPE=TRITON_DTYPES[base.dtype], COMPUTE=TRITON_DTYPES[weights.dtype],
        OUT=TRITON_DTYPES[out.dtype], SELECT=threshold is not None, BLOCK=BLOCK,
        **COMPILE_OPTIONS,
    )  # fmt: skip


def _signatures() -> dict:
    table = {}
    for name, tl_dtype in FLOAT_TYPES.items():
        compute = compute_name(name)
        common = {"DTYPE": tl_dtype, "COMPUTE": compute_type(name)}
        table[f"sce_variance_kernel[{name}]"] = aot_entry(
            sce_variance_kernel,
            {"base_ptr": f"*{name}", "addresses_ptr": "*i64", "var_ptr": f"*{compute}",
             "n": "i64", "num_experts": "i32"},
            {**common, "BLOCK": BLOCK},
        )  # fmt: skip
        for select in (False, True):
            table[f"sce_energies_kernel[{name},select={select}]"] = aot_entry(
                sce_energies_kernel,
                {"base_ptr": f"*{name}", "addresses_ptr": "*i64",
                 "threshold_ptr": f"*{compute}", "sums_ptr": "*fp64", "n": "i64",
                 "num_experts": "i32"},
                {**common, "SELECT": select, "BLOCK": BLOCK},
            )  # fmt: skip
            for out_name in dict.fromkeys((name, "fp32")):
                table[f"sce_combine_kernel[{name}->{out_name},select={select}]"] = aot_entry(
                    sce_combine_kernel,
                    {"base_ptr": f"*{name}", "addresses_ptr": "*i64",
                     "threshold_ptr": f"*{compute}", "weights_ptr": f"*{compute}",
                     "out_ptr": f"*{out_name}", "n": "i64", "num_experts": "i32"},
                    {**common, "OUT": FLOAT_TYPES[out_name], "SELECT": select, "BLOCK": BLOCK},
                )  # fmt: skip
    return table


AOT_SIGNATURES = _signatures()
