"""Reference TIES combine: trim by per-expert thresholds, elect signs, disjoint mean."""

from __future__ import annotations

import torch

from .magnitude_threshold import compute_dtype


def ties_combine(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    thresholds: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``base + scale * mean`` into `out` (any float dtype, base's shape), where per
    entry ``mean`` is the mean of the trimmed τ_t (``|τ_t| >= thresholds[t]``, else 0)
    whose sign is the sign of their sum, 0 where that sum is 0. Sums run over t in order
    0..T-1 in the compute dtype; the multiply and the add are rounded separately."""
    dtype = compute_dtype(base, experts)
    b = base.to(dtype)
    kept = []
    for t, e in enumerate(experts):
        tau = e.to(dtype) - b
        kept.append(torch.where(tau.abs() >= thresholds[t].to(dtype), tau, torch.zeros_like(tau)))
    total = torch.zeros_like(b)
    for k in kept:
        total = total + k
    agreeing_sum = torch.zeros_like(b)
    count = torch.zeros_like(b)
    for k in kept:
        agrees = torch.where(total > 0, k > 0, k < 0) & (total != 0)
        agreeing_sum = agreeing_sum + torch.where(agrees, k, torch.zeros_like(k))
        count = count + agrees.to(dtype)
    mean = torch.where(count > 0, agreeing_sum / count.clamp(min=1), torch.zeros_like(b))
    scale_t = torch.tensor(scale, dtype=dtype, device=b.device)
    out.copy_((b + scale_t * mean).to(out.dtype))
    return out
