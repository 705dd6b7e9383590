"""``model_stock``: interpolate between the base and the experts' average by their angle.

With w_0 the base, w_1..w_N the experts (N >= 2) and offsets δ_i = w_i − w_0:
cos θ is the mean of the pairwise cosines ⟨δ_i, δ_j⟩ / max(‖δ_i‖‖δ_j‖, 1e-6) (each
clamped to [−1, 1]), t = N cos θ / (1 + (N − 1) cos θ) (0 where the denominator is below
1e-6 in magnitude: the base is kept), and

    model_stock = t · (Σ_i w_i / N) + (1 − t) · w_0,

over the whole tensor, or with ``filter_wise`` per row (last dimension; a 1-D tensor is
one row). Two passes: the offsets' Gram matrix (:func:`fastmerge.ops.gram` with the base
subtracted on the fly), then one weighted sum. Reference: Jang et al. 2024,
https://arxiv.org/abs/2403.19522.
"""

from __future__ import annotations

import torch

from ..registry import MergeMethod, Parameter, register
from ._spherical import combine, gram, norms


def interpolation(g: torch.Tensor) -> torch.Tensor:
    """t (per tensor or per row) from the offsets' Gram matrices `g` (..., N, N)."""
    count = g.shape[-1]
    n = norms(g)
    i, j = torch.triu_indices(count, count, 1)
    cos = (g[..., i, j] / (n[..., i] * n[..., j]).clamp_min(1e-6)).clamp(-1, 1).mean(-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0, count * cos / torch.where(singular, 1, denominator))


def merge(task, tensors, statistics=None):
    """The model stock merge of one tensor."""
    b = task.base_index
    base = tensors[b]
    experts = [x for j, x in enumerate(tensors) if j != b]
    axis = -1 if task.shared["filter_wise"] and base.dim() > 1 else None
    t = interpolation(gram(experts, base=base, axis=axis))
    count = len(experts)
    c = torch.cat([(1 - t).unsqueeze(-1), (t / count).unsqueeze(-1).expand(*t.shape, count)], -1)
    return combine([base, *experts], c, task.dtype, axis)


METHOD = register(
    MergeMethod(
        name="model_stock",
        description="interpolate base and experts' average by the experts' angle",
        reference="https://arxiv.org/abs/2403.19522",
        parameters=(Parameter("filter_wise", bool, "global", False, doc="one angle per row"),),
        base="required",
        min_models=3,
        merge=merge,
        blockwise=lambda task: False,
    )
)
