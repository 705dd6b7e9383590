"""Reference nearswap: ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``, ``w·b + (1 - w)·a``."""

from __future__ import annotations

from typing import Optional

import torch

#: The floor of the distance ``|a - b|``, rounded to the compute dtype.
EPSILON = 1e-6


def compute_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """float64 when a or b is float64, else float32: the dtype the formula is evaluated in."""
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def nearswap(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    out: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Write the nearswap of `a` and `b` (one shape) into `out` (any float dtype, that shape).

    In the compute dtype (`dtype`, by default :func:`compute_dtype`), each input converted
    exactly and `t` and 1e-6 rounded to it, every step rounded separately (no fused
    multiply-add): ``d = |a - b|``; ``d = 1e-6 if d < 1e-6 else d``; ``w = t / d`` (a true
    division); ``w = 0 if w < 0 else w``; ``w = 1 if w > 1 else w``; the result
    ``(w * b) + ((1 - w) * a)`` rounded to ``out.dtype`` once. A NaN passes through every
    comparison (a NaN in a or b gives a NaN), and a negative zero w (a t < 0 underflowing)
    stays negative, as in torch.clamp.
    """
    dtype = dtype or compute_dtype(a, b)
    x, y = a.to(dtype), b.to(dtype)
    scalar = {"dtype": dtype, "device": a.device}
    eps = torch.tensor(EPSILON, **scalar)
    zero, one = torch.tensor(0.0, **scalar), torch.tensor(1.0, **scalar)
    d = (x - y).abs()
    d = torch.where(d < eps, eps, d)
    w = torch.tensor(float(t), **scalar) / d
    w = torch.where(w < zero, zero, w)
    w = torch.where(w > one, one, w)
    result = (w * y) + ((one - w) * x)
    out.copy_(result.reshape(out.shape).to(out.dtype))
    return out
