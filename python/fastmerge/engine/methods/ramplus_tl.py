"""``ramplus_tl``: RAM+ (tensor-local): RAM with unique deltas amplified by their overlap.

As ``ram``, and each model's unique deltas are multiplied by
``λ_i = 1 + r · clamp(ρ_i, 0, α)`` with ρ_i = (its shared contributing entries) /
max(its unique contributing entries, ε), counted over the whole tensor (``r``, ``alpha``,
``epsilon``). Reference: https://arxiv.org/abs/2601.13572.
"""

from __future__ import annotations

from ..registry import MergeMethod, Parameter, register
from .ram import combine, contributions, epsilon


def merge(task, tensors, statistics=None):
    """The RAM+ merge of one tensor."""
    base, taus, counts = contributions(task, tensors)
    eps, r, alpha = task.shared["epsilon"], task.shared["r"], task.shared["alpha"]
    unique_entries = counts == 1
    lambdas = []
    for tau in taus:
        live = tau != 0
        contributing = int(live.sum().item())
        unique = int((live & unique_entries).sum().item())
        rho = (contributing - unique) / max(unique, eps)  # shared / unique entries
        lambdas.append(1 + r * min(max(rho, 0.0), alpha))
    return combine(base, taus, counts, lambdas)


METHOD = register(
    MergeMethod(
        name="ramplus_tl",
        description="RAM+ (tensor-local): RAM with unique deltas amplified by overlap",
        reference="https://arxiv.org/abs/2601.13572",
        parameters=(
            epsilon(1e-5),
            Parameter("r", float, "global", 0.1, doc="amplification rate"),
            Parameter("alpha", float, "global", 0.2, low=0.0, doc="cap of the overlap ratio"),
        ),
        base="required",
        min_models=1,
        merge=merge,
        blockwise=lambda task: False,
    )
)
