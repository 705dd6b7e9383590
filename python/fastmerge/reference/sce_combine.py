"""Reference SCE combine: the variance across the models, the energies of the selected
deltas, and the sign-elected weighted mean, in plain torch. See
:func:`fastmerge.ops.sce_combine` for the arithmetic every backend shares.
"""

from __future__ import annotations

import torch

from .magnitude_threshold import compute_dtype


def _taus(base: torch.Tensor, experts: list[torch.Tensor]) -> list[torch.Tensor]:
    dtype = compute_dtype(base, experts)
    b = base.reshape(-1).to(dtype)
    return [e.reshape(-1).to(dtype) - b for e in experts]


def sce_variance(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """Flat population variance of τ_t = experts[t] - base across t, in the compute dtype:
    ``mean = (Σ_t τ_t) / T``, then ``(Σ_t (τ_t - mean)²) / T``, sums in order from 0,
    every operation rounded on its own."""
    taus = _taus(base, experts)
    total = torch.zeros_like(taus[0])
    for tau in taus:
        total = total + tau
    mean = total / len(taus)
    acc = torch.zeros_like(mean)
    for tau in taus:
        deviation = tau - mean
        acc = acc + deviation * deviation
    return acc / len(taus)


def _kept(base, experts, threshold):
    taus = _taus(base, experts)
    if threshold is None:
        return taus
    keep = sce_variance(base, experts) >= threshold.to(taus[0].dtype)
    return [torch.where(keep, tau, torch.zeros_like(tau)) for tau in taus]


def sce_energies(
    base: torch.Tensor, experts: list[torch.Tensor], threshold: torch.Tensor | None
) -> torch.Tensor:
    """float64 (T,) ``Σ kept τ_t²``; kept: variance >= `threshold` (all when None)."""
    return torch.stack([(k.to(torch.float64) ** 2).sum() for k in _kept(base, experts, threshold)])


def sce_combine(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    threshold: torch.Tensor | None,
    weights: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``base + Σ w_t m_t τ_t / max(Σ w_t m_t, 1e-6)`` into `out` (base's entries),
    m_t: kept τ_t has the sign elected by ``Σ_t kept τ_t >= 0`` (+) and is not 0."""
    kept = _kept(base, experts, threshold)
    dtype = kept[0].dtype
    w = weights.to(dtype)
    total = torch.zeros_like(kept[0])
    for k in kept:
        total = total + k
    positive = total >= 0
    merged, divisor = torch.zeros_like(total), torch.zeros_like(total)
    zero = torch.zeros_like(total)
    for t, k in enumerate(kept):
        agrees = torch.where(positive, k > 0, k < 0)
        merged = merged + torch.where(agrees, w[t] * k, zero)
        divisor = divisor + torch.where(agrees, w[t], zero)
    floor = torch.tensor(1e-6, dtype=dtype, device=total.device)
    result = merged / torch.maximum(divisor, floor) + base.reshape(-1).to(dtype)
    out.copy_(result.reshape(out.shape).to(out.dtype))
    return out
