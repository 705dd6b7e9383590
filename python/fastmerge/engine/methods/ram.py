"""``ram``: Reinforced Agent Merging: unique deltas kept whole, shared ones averaged.

With τ_i = θ_i − base and ε = ``epsilon``, an entry of τ_i contributes where |τ_i| > ε;
c = the number of models contributing to the entry. Entries with c = 1 keep their delta,
entries with c > 1 take the mean of the contributing deltas:

    ram = base + Σ_i [|τ_i| > ε] · τ_i / max(c, 1).

Elementwise torch passes (a few per expert). Reference: https://arxiv.org/abs/2601.13572.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..registry import MergeMethod, Parameter, register


def contributions(task, tensors) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(base, the task vectors with non-contributing entries zeroed, c)."""
    base = tensors[task.base_index]
    eps = task.shared["epsilon"]
    taus = [x - base for j, x in enumerate(tensors) if j != task.base_index]
    counts = torch.zeros_like(base)
    for tau in taus:
        live = tau.abs() > eps
        tau.mul_(live)
        counts += live
    return base, taus, counts


def merge(task, tensors, statistics=None):
    """The RAM merge of one tensor."""
    return combine(*contributions(task, tensors))


def combine(base: torch.Tensor, taus: list[torch.Tensor], counts: torch.Tensor,
            lambdas: Optional[list[float]] = None) -> torch.Tensor:  # fmt: skip
    """RAM from the contributions (``lambdas``: RAM+'s factors of the unique deltas).

    Where c = 1 only one model contributes, so Σ_i λ_i τ_i is its scaled delta; where
    c > 1 the contributions are averaged: ``base + where(c == 1, Σ λ_i τ_i, Σ τ_i / c)``."""
    total = torch.zeros_like(base)
    for tau in taus:
        total += tau
    if lambdas is None:
        return total.div_(counts.clamp_(min=1)).add_(base)
    unique = torch.zeros_like(base)
    for lam, tau in zip(lambdas, taus):
        unique.add_(tau, alpha=lam)
    return torch.where(counts == 1, unique, total.div_(counts.clamp(min=1))).add_(base)


def epsilon(default: float) -> Parameter:
    return Parameter("epsilon", float, "global", default, low=0.0,
                     doc="deltas up to this magnitude do not contribute")  # fmt: skip


METHOD = register(
    MergeMethod(
        name="ram",
        description="RAM: unique deltas kept whole, overlapping ones averaged",
        reference="https://arxiv.org/abs/2601.13572",
        parameters=(epsilon(1e-5),),
        base="required",
        min_models=1,
        merge=merge,
    )
)
