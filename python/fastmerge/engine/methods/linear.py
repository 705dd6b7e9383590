"""``linear``: the weighted average of the models (model soups).

Per tensor, with each model's ``weight`` w_i: ``Σ_i w_i θ_i / Σ_i w_i`` with ``normalize``
(the default), else ``Σ_i w_i θ_i``. A base model, when the configuration names one, is one
more input (as in mergekit), with its own ``weight``. One fused pass
(:func:`fastmerge.ops.weighted_sum`): each input is read once, the output written once, in
float32 arithmetic. Reference: Wortsman et al. 2022, https://arxiv.org/abs/2203.05482.
"""

from __future__ import annotations

from typing import Optional

from ... import ops
from ..registry import MergeMethod, Parameter, register


def _coefficients(task) -> list[float]:
    weights = [p["weight"] for p in task.per_input]
    if task.shared["normalize"]:
        total = sum(weights)
        return [w / total for w in weights]
    return weights


def merge(task, tensors, statistics=None):
    """The linear merge of one tensor (or of the same rows of every input)."""
    return ops.weighted_sum(tensors, _coefficients(task), out_dtype=task.dtype)


def check(task) -> Optional[str]:
    if task.shared["normalize"] and sum(p["weight"] for p in task.per_input) == 0:
        return "the weights sum to 0 and normalize is true"
    return None


METHOD = register(
    MergeMethod(
        name="linear",
        description="weighted average of the models",
        reference="https://arxiv.org/abs/2203.05482",
        parameters=(
            Parameter("weight", float, "model", 1.0, doc="the model's weight"),
            Parameter("normalize", bool, "global", True, doc="divide by the sum of weights"),
        ),
        base="optional",
        merge=merge,
        check=check,
    )
)
