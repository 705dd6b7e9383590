"""``nuslerp``: SLERP between two models by their weights, optionally about a base.

With weights w_0, w_1 of the two (non-base) models, t = w_1 / (w_0 + w_1) (0.5 when the
sum is below 1e-6), and v_i the models' tensors, or their task vectors θ_i − base when a
``base_model`` is given:

    nuslerp = sin((1 − t) θ) / sin θ · v_0 + sin(t θ) / sin θ · v_1   (+ base)

with cos θ = ⟨v_0, v_1⟩ / (‖v_0‖‖v_1‖) (norms below 1e-7 taken as 1e-7), falling back to
``(1 − t) v_0 + t v_1`` where ``1 − cos² θ <= 1e-16``. θ is taken over the whole tensor
(``nuslerp_flatten``, the default), else per row over the last dimension, or with
``nuslerp_row_wise`` per column (vectors along the first dimension). Two passes: the
Gram matrices (:func:`fastmerge.ops.gram`, float64), then one weighted sum (whole tensor)
or one multiply-add per input (per row or column). Reference: mergekit's NuSLERP
(https://github.com/arcee-ai/mergekit).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..registry import MergeMethod, Parameter, register
from ._spherical import combine, gram, norms

NORM_EPS = 1e-7
COLINEAR_EPS = 1e-8


def coefficients(t: float, g: torch.Tensor) -> torch.Tensor:
    """(..., 2) coefficients of v_0 and v_1 from their Gram matrices `g` (..., 2, 2)."""
    n = norms(g).clamp_min(NORM_EPS)
    cos = (g[..., 0, 1] / (n[..., 0] * n[..., 1])).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.sin(theta)
    safe = torch.where(colinear, 1, sin)
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / safe)
    return torch.stack([c0, c1], -1)


def _axis(task) -> Optional[int]:
    if task.shared["nuslerp_flatten"]:
        return None
    return 0 if task.shared["nuslerp_row_wise"] else -1


def merge(task, tensors, statistics=None):
    """The NuSLERP of one tensor."""
    b = task.base_index
    pair = [x for j, x in enumerate(tensors) if j != b]
    w0, w1 = (p["weight"] for j, p in enumerate(task.per_input) if j != b)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    base = tensors[b] if b is not None else None
    axis = _axis(task)
    if axis is not None and tensors[0].dim() <= 1:
        axis = None  # one vector: mergekit's per-row and per-column views are the whole
    c = coefficients(t, gram(pair, base=base, axis=axis))
    if base is None:
        return combine(pair, c, task.dtype, axis)
    rest = 1 - c.sum(-1, keepdim=True)  # base + c0 (a - base) + c1 (b - base)
    return combine([base, *pair], torch.cat([rest, c], -1), task.dtype, axis)


def check(task) -> Optional[str]:
    others = len(task.inputs) - (task.base_index is not None)
    if others != 2:
        return f"takes exactly 2 models besides the base model, got {others}"
    return None


METHOD = register(
    MergeMethod(
        name="nuslerp",
        description="SLERP of two models by their weights, optionally of their task vectors",
        reference="https://github.com/arcee-ai/mergekit",
        parameters=(
            Parameter("weight", float, "non_base", 1.0, doc="the model's weight"),
            Parameter(
                "nuslerp_flatten",
                bool,
                "global",
                True,
                doc="one angle per tensor (else per row or column)",
            ),  # fmt: skip
            Parameter(
                "nuslerp_row_wise",
                bool,
                "global",
                False,
                doc="without flatten: vectors along the first dimension",
            ),  # fmt: skip
        ),
        base="optional",
        min_models=2,
        max_models=3,
        merge=merge,
        blockwise=lambda task: False,
        check=check,
    )
)
