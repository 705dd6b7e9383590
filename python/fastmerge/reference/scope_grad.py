"""Reference fused scope gradient: out_i = alpha_i + beta_i * (x_i - mean_i), in float64."""

from __future__ import annotations

import torch


def scope_grad(
    tensors: list[torch.Tensor], mean: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> list[torch.Tensor]:
    """One output per tensor, in the tensor's dtype and shape."""
    return [
        (alpha[i] + beta[i] * (t.detach().to(torch.float64) - mean[i])).to(t.dtype)
        for i, t in enumerate(tensors)
    ]
