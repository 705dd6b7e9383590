"""``slerp``: spherical linear interpolation between the base and one other model.

Per tensor (flattened), with a = base, b = the other model, ``t`` in [0, 1] (a gradient
over the layers, as usual): θ = arccos(⟨a, b⟩ / (‖a‖‖b‖)) and

    slerp(a, b; t) = sin((1 − t) θ) / sin θ · a + sin(t θ) / sin θ · b,

falling back to ``(1 − t) a + t b`` when the tensors are nearly colinear
(|cos θ| > 0.9995, mergekit's threshold) and taking a norm below 1e-8 as 1, as mergekit
does. Two passes: the 2×2 Gram matrix in float64 (:func:`fastmerge.ops.gram`; mergekit
sums in float32), then one weighted sum (in row blocks for large tensors). Reference:
Shoemake 1985, https://en.wikipedia.org/wiki/Slerp.
"""

from __future__ import annotations

import math

import torch

from ..registry import MergeMethod, Parameter, register
from ._spherical import combine, gram, norms

#: Above this |cos θ| the tensors are taken as colinear (linear interpolation).
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def coefficients(t: float, g) -> tuple[float, float]:
    """The coefficients of a and b from their Gram matrix `g` (2×2)."""
    na, nb = (n if n > NORM_EPS else 1.0 for n in norms(g).tolist())
    dot = max(-1.0, min(1.0, g[0, 1].item() / (na * nb)))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def statistics(task, base, others) -> tuple[float, float]:
    """The coefficients of the whole tensor (for a merge in row blocks)."""
    return coefficients(task.shared["t"], gram([base, next(iter(others))]))


def merge(task, tensors, statistics=None):
    """The SLERP of one tensor, or of the same rows of both inputs given the whole
    tensor's coefficients (base first)."""
    b = task.base_index
    pair = [tensors[b], tensors[1 - b]]
    ca, cb = statistics if statistics is not None else coefficients(task.shared["t"], gram(pair))
    return combine(pair, torch.tensor([ca, cb], dtype=torch.float64), task.dtype)


METHOD = register(
    MergeMethod(
        name="slerp",
        description="spherical interpolation between the base and one other model",
        reference="https://en.wikipedia.org/wiki/Slerp",
        parameters=(
            Parameter(
                "t",
                float,
                "global",
                low=0.0,
                high=1.0,
                doc="position from the base (0) to the other model (1)",
            ),  # fmt: skip
        ),
        base="required",
        min_models=2,
        max_models=2,
        merge=merge,
        statistics=statistics,
    )
)
