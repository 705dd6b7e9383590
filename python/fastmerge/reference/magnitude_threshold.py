"""Reference TIES trim threshold: per expert, the k-th largest ``|expert - base|``."""

from __future__ import annotations

import torch


def compute_dtype(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64, else float32: the dtype τ = θ - base is formed in."""
    if base.dtype == torch.float64 or any(e.dtype == torch.float64 for e in experts):
        return torch.float64
    return torch.float32


def magnitude_threshold(base: torch.Tensor, experts: list[torch.Tensor], k: int) -> torch.Tensor:
    """(T,) k-th largest of ``|experts[t] - base|`` over the flattened entries, in the
    compute dtype (see :func:`compute_dtype`); ``1 <= k <= base.numel()``."""
    dtype = compute_dtype(base, experts)
    b = base.reshape(-1).to(dtype)
    n = b.numel()
    values = [(e.reshape(-1).to(dtype) - b).abs().kthvalue(n - k + 1).values for e in experts]
    return torch.stack(values) if values else torch.empty(0, dtype=dtype, device=base.device)
