"""Reference feature-matching costs from shifted moments, in plain float64 PyTorch.

Per-unit moments with n = count and shift s (same for model b):
``dmean = sum / n``, ``mean = s + dmean``, ``var = sumsq / n - dmean^2`` (0 when it is at most
1e-14 of ``sumsq / n``: a constant unit up to rounding), and for every pair (i, j)
``cov = cross / n - dmean_a dmean_b``. Then: covariance = cov; correlation =
cov / (std_a std_b) clipped to [-1, 1], 0 where a std is 0; inner_product =
cov + mean_a mean_b; neg_sq_distance = -(var_a + var_b - 2 cov + (mean_a - mean_b)^2),
at most 0.
"""

from __future__ import annotations

import torch

#: Variance at most this fraction of the mean square around the shift counts as 0.
CONSTANT_UNIT_RTOL = 1e-14


def unit_moments(
    sum_: torch.Tensor, sumsq: torch.Tensor, shift: torch.Tensor, count: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dmean, mean, var, inv_std) per unit; inv_std is 0 for a constant unit."""
    inv_n = 1.0 / count
    dmean = sum_ * inv_n
    square = sumsq * inv_n
    var = square - dmean * dmean
    var = torch.where(var <= CONSTANT_UNIT_RTOL * square, torch.zeros_like(var), var)
    inv_std = torch.where(var == 0, torch.zeros_like(var), 1.0 / var.sqrt())
    return dmean, shift + dmean, var, inv_std


def feature_cost(
    cross: torch.Tensor,
    sum_a: torch.Tensor,
    sum_b: torch.Tensor,
    sumsq_a: torch.Tensor,
    sumsq_b: torch.Tensor,
    shift_a: torch.Tensor,
    shift_b: torch.Tensor,
    count: float,
    kind: str,
) -> torch.Tensor:
    """The (rows, cols) float64 cost matrix of `kind`."""
    f64 = torch.float64
    cross, sum_a, sum_b, sumsq_a, sumsq_b, shift_a, shift_b = (
        t.to(f64) for t in (cross, sum_a, sum_b, sumsq_a, sumsq_b, shift_a, shift_b)
    )
    a_dmean, a_mean, a_var, a_inv = unit_moments(sum_a, sumsq_a, shift_a, count)
    b_dmean, b_mean, b_var, b_inv = unit_moments(sum_b, sumsq_b, shift_b, count)
    cov = cross * (1.0 / count) - a_dmean[:, None] * b_dmean[None, :]
    if kind == "covariance":
        return cov
    if kind == "correlation":
        corr = cov * a_inv[:, None] * b_inv[None, :]
        return torch.where(corr < -1, -1.0, torch.where(corr > 1, 1.0, corr))
    if kind == "inner_product":
        return cov + a_mean[:, None] * b_mean[None, :]
    if kind == "neg_sq_distance":
        dm = a_mean[:, None] - b_mean[None, :]
        sq = a_var[:, None] + b_var[None, :] - 2.0 * cov + dm * dm
        return torch.where(sq < 0, 0.0, -sq)
    raise ValueError(f"unknown kind {kind!r}")
