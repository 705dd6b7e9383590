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

Three passes over the tensors, τ never stored: the variances
(:func:`fastmerge.ops.sce_variance`, only when ``select_topk`` < 1), then one exact radix
selection on them (:func:`fastmerge.ops.magnitude_threshold`; every entry tied with the
threshold is kept, mergekit's top-k keeps exactly k), then :func:`fastmerge.ops.sce_combine`
(the energies of the kept deltas in one pass, the election and weighted mean in another).
Reference: Wan et al. 2024, https://arxiv.org/abs/2408.07990.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import ops
from ..registry import MergeMethod, Parameter, register


def select_threshold(
    base: torch.Tensor, experts: list[torch.Tensor], topk: float
) -> Optional[torch.Tensor]:
    """The variance threshold of the top `topk` of the non-zero variances across the
    models of ``τ_i = experts[i] - base`` (None: nothing is selected).

    Example:
        >>> base = torch.zeros(4)
        >>> experts = [torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([-1.0, 0.0, 2.0, 1.0])]
        >>> select_threshold(base, experts, 0.5).tolist(), select_threshold(base, experts, 0.4)
        (4.0, None)
    """
    var = ops.sce_variance(base, experts)
    k = int(torch.count_nonzero(var).item() * topk)
    if k == 0:
        return None
    return ops.magnitude_threshold(torch.zeros_like(var), [var], k)[0]


def merge(task, tensors, statistics=None):
    """The SCE merge of one tensor."""
    base = tensors[task.base_index]
    experts = [x for j, x in enumerate(tensors) if j != task.base_index]
    if not experts:
        return base
    topk = task.shared["select_topk"]
    threshold = None
    if topk < 1:
        threshold = select_threshold(base, experts, topk) if topk > 0 else None
        if threshold is None:  # every delta erased: the base
            return base.clone()
    return ops.sce_combine(base, experts, threshold=threshold)


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
