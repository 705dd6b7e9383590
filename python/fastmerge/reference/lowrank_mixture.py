"""Reference routed low-rank mixture: ``y = x W^T + b + sum_t g_t (x V_t^T) U_t^T`` per
sample, written with einsum, computed in float32 for half inputs (float64 for float64)."""

from __future__ import annotations

from typing import Optional

import torch


def lowrank_mixture(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    us: torch.Tensor,
    vs: torch.Tensor,
    gates: torch.Tensor,
) -> torch.Tensor:
    """x: (N, L, d_in); weight: (d_out, d_in); bias: (d_out,) or None; us: (T, d_out, r);
    vs: (T, r, d_in); gates: (N, T). Returns (N, L, d_out) in x's dtype; differentiable."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc, w, u, v, g = (t.to(compute) for t in (x, weight, us, vs, gates))
    down = torch.einsum("nld,trd->nltr", xc, v) * g[:, None, :, None]
    y = torch.einsum("nld,od->nlo", xc, w) + torch.einsum("nltr,tor->nlo", down, u)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def merge_lowrank(
    weight: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, gate_row: torch.Tensor
) -> torch.Tensor:
    """The merged weight ``weight + sum_t gate_row[t] us[t] @ vs[t]`` (d_out, d_in)."""
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = torch.einsum("t,tor,trd->od", gate_row.to(compute), us.to(compute), vs.to(compute))
    return (weight.to(compute) + delta).to(weight.dtype)
