"""Shared builders for the Twin-Merging tests."""

from __future__ import annotations

import copy

import torch
from torch import nn


class Block(nn.Module):
    """A residual MLP block with a norm: Linear layers with biases, and a LayerNorm whose
    per-task deltas are not routed."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


def tiny_net(width=6, hidden=10, out=3, seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Block(width, hidden), Block(width, hidden), nn.Linear(width, out)).to(
        dtype
    )


def perturbed_experts(model: nn.Module, t_count: int, scale=0.1, seed=1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    base = model.state_dict()
    return [
        {
            k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            if v.is_floating_point()
            else v
            for k, v in base.items()
        }
        for _ in range(t_count)
    ]


def naive_outputs(model: nn.Module, twin, inputs, gates, **kwargs):
    """The reference's way: one materialized state dict per sample, batch size 1."""
    rows = []
    plain = copy.deepcopy(model)
    for n in range(gates.shape[0]):
        plain.load_state_dict(twin.reference_state(gates[n]))
        sample = [x[n : n + 1] for x in inputs]
        sample_kw = {k: v[n : n + 1] for k, v in kwargs.items()}
        rows.append(plain(*sample, **sample_kw))
    return rows
