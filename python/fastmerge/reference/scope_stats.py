"""Reference weight-scope statistics: a float64 two-pass mean and population std."""

from __future__ import annotations

import math

import torch


def scope_stats(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Rows (mean, std, count) of each tensor as a float64 (3, len(tensors)) tensor."""
    device = tensors[0].device if tensors else torch.device("cpu")
    rows = []
    for t in tensors:
        x = t.detach().reshape(-1).to(torch.float64)
        if x.numel() == 0:
            nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
            rows.append(torch.stack([nan, nan, torch.zeros_like(nan)]))
            continue
        mean = x.mean()
        std = (x - mean).square().mean().sqrt()
        rows.append(
            torch.stack(
                [mean, std, torch.tensor(float(x.numel()), dtype=torch.float64, device=device)]
            )
        )
    if not rows:
        return torch.empty((3, 0), dtype=torch.float64, device=device)
    return torch.stack(rows, dim=1)
