"""``sce``: Select, Calculate, Erase: variance-selected, energy-weighted, sign-elected.

With τ_i = θ_i − base (i = 1..N):

1. **select** (``select_topk`` < 1): keep the entries of the ``int(topk · nnz)`` largest
   variances across the models (``Var_i τ_i``, population variance; nnz = entries of
   non-zero variance), zero the others in every τ_i;
2. **calculate**: model weights ``w_i = mean(τ_i²) / Σ_j mean(τ_j²)`` (uniform when the sum
   is below 1e-6);
3. **erase**: elect the sign of Σ τ_i per entry (a sum of 0 elects +) and keep agreeing
   entries: ``sce = base + Σ w_i m_i τ_i / max(Σ w_i m_i, 1e-6)``. The election is on
   the unweighted deltas (TIES elects on the weighted ones).

The selection is one exact radix selection on the variances
(:func:`fastmerge.ops.magnitude_threshold`; every entry tied with the threshold is kept,
mergekit's top-k keeps exactly k); the energies come from one Gram pass
(:func:`fastmerge.ops.gram`), the election and weighted mean from in-place torch passes.
Reference: Wan et al. 2024, https://arxiv.org/abs/2408.07990.
"""

from __future__ import annotations

import torch

from ... import ops
from ..registry import MergeMethod, Parameter, register


def select_mask(taus: list[torch.Tensor], topk: float) -> torch.Tensor:
    """Where the variance across the models is among the top `topk` of the non-zero ones
    (two passes over the deltas, as torch.var: the mean, then the squared deviations)."""
    mean = torch.zeros_like(taus[0])
    for tau in taus:
        mean += tau
    mean /= len(taus)
    var = torch.zeros_like(mean)
    for tau in taus:
        deviation = tau - mean
        var.addcmul_(deviation, deviation)
    var /= len(taus)
    del mean
    k = int(torch.count_nonzero(var).item() * topk)
    if k == 0:
        return torch.zeros_like(var, dtype=torch.bool)
    thr = ops.magnitude_threshold(torch.zeros_like(var), [var], k)[0]
    return var >= thr


def merge(task, tensors, statistics=None):
    """The SCE merge of one tensor."""
    base = tensors[task.base_index]
    taus = [x - base for j, x in enumerate(tensors) if j != task.base_index]
    if not taus:
        return base
    topk = task.shared["select_topk"]
    if topk < 1:
        mask = select_mask(taus, topk) if topk > 0 else torch.zeros_like(base, dtype=torch.bool)
        for tau in taus:
            tau.mul_(mask)
    n = max(base.numel(), 1)
    energy = [x / n for x in torch.diagonal(ops.gram(taus)).tolist()]  # mean(τ_i²)
    total = sum(energy)
    weights = [e / total for e in energy] if abs(total) >= 1e-6 else [1 / len(taus)] * len(taus)
    return erase(base, taus, weights)


def erase(base: torch.Tensor, taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``base + Σ w_i m_i τ_i / max(Σ w_i m_i, 1e-6)``, m_i: τ_i has the sign of Σ_j τ_j
    (the election is on the unweighted deltas, unlike TIES', so this is not
    :func:`fastmerge.ops.gta_combine`)."""
    total = torch.zeros_like(base)
    for tau in taus:
        total += tau
    positive = total >= 0
    merged, divisor = total.zero_(), torch.zeros_like(base)
    for w, tau in zip(weights, taus):
        agrees = torch.where(positive, tau > 0, tau < 0)
        merged.add_(tau.mul_(agrees), alpha=w)
        divisor.add_(agrees, alpha=w)
    return merged.div_(divisor.clamp_(min=1e-6)).add_(base)


METHOD = register(
    MergeMethod(
        name="sce",
        description="SCE: variance-selected, energy-weighted, sign-elected task vectors",
        reference="https://arxiv.org/abs/2408.07990",
        parameters=(
            Parameter(
                "select_topk",
                float,
                "global",
                1.0,
                low=0.0,
                high=1.0,
                doc="fraction of the highest-variance entries kept",
            ),  # fmt: skip
            Parameter("int8_mask", bool, "global", False, doc="accepted; no effect in fastmerge"),
        ),
        base="required",
        min_models=1,
        merge=merge,
        blockwise=lambda task: False,
    )
)
