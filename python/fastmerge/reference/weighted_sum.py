"""Reference weighted sum: ``Σ_i w_i · t_i`` in the accumulation dtype, rounded once."""

from __future__ import annotations

from typing import Optional

import torch


def accumulate_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32: the dtype the sum is formed in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def weighted_sum(
    tensors: list[torch.Tensor],
    weights: list[float],
    out: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Write ``Σ_i weights[i] * tensors[i]`` into `out` (any float dtype, the inputs' shape).

    Every input is converted exactly to the accumulation dtype (`dtype`, by default
    :func:`accumulate_dtype`), each weight is rounded to it, the sum starts from the first
    product and adds the others in order (each product and each sum rounded separately:
    no fused multiply-add), and the result is rounded to ``out.dtype`` once.
    """
    dtype = dtype or accumulate_dtype(tensors)
    device = tensors[0].device
    acc = None
    for w, t in zip(weights, tensors):
        product = torch.tensor(w, dtype=dtype, device=device) * t.to(dtype)
        acc = product if acc is None else acc + product
    out.copy_(acc.reshape(out.shape).to(out.dtype))
    return out
