"""``multislerp``: barycentric interpolation of several models on the hypersphere.

With v_i the models' tensors (their task vectors θ_i − base with a ``base_model``),
weights w_i (divided by their sum with ``normalize_weights``, the default), n_i = ‖v_i‖,
u_i = v_i / (n_i + ε) and ε = ``eps``: the weighted mean m = Σ w_i u_i is normalized,
the tangent vector T = Σ w_i (u_i − ⟨u_i, m̂⟩ m̂) mapped back to the sphere,

    multislerp = (m̂ cos ‖T‖ + T sin ‖T‖ / ‖T‖) · Σ w_i n_i   (+ base),

with ‖T‖ + ε for ‖T‖. When ‖m‖ < ε (antipodal inputs), two models fall back to
``w_0 v_0 + w_1 v_1`` and more are refused, as in mergekit. One model is returned as is.
Every quantity is a linear combination of the v_i whose coefficients follow from their
Gram matrix: two passes (:func:`fastmerge.ops.gram`, one weighted sum). Reference:
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..registry import MergeMethod, Parameter, register
from ._spherical import combine, gram, norms


def coefficients(g: torch.Tensor, w: torch.Tensor, eps: float, where: str) -> torch.Tensor:
    """The coefficients of the v_i in the result (without the base)."""
    n = norms(g)
    a = w / (n + eps)  # mean = Σ a_i v_i
    mean_norm = torch.sqrt((a @ g @ a).clamp_min(0))
    if mean_norm < eps:
        if len(w) == 2:
            return w.clone()
        raise ConfigError(
            f"multislerp: the weighted mean of the unit tensors is zero (antipodal inputs "
            f"whose weights balance out); change the weights ({where})"
        )
    m = a / mean_norm
    s = (w * (g @ m) / (n + eps)).sum()  # Σ w_i ⟨u_i, m̂⟩
    tangent = a - s * m
    tn = torch.sqrt((tangent @ g @ tangent).clamp_min(0)) + eps
    return (m * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (n * w).sum()


def merge(task, tensors, statistics=None):
    """The multi-SLERP of one tensor."""
    b = task.base_index
    xs = [x for j, x in enumerate(tensors) if j != b]
    if len(xs) == 1:
        return xs[0]
    w = torch.tensor([p["weight"] for j, p in enumerate(task.per_input) if j != b],
                     dtype=torch.float64)  # fmt: skip
    if task.shared["normalize_weights"]:
        w = w / w.sum()
    base = tensors[b] if b is not None else None
    c = coefficients(gram(xs, base=base), w, task.shared["eps"], task.group)
    if base is None:
        return combine(xs, c, task.dtype)
    return combine([base, *xs], torch.cat([(1 - c.sum()).reshape(1), c]), task.dtype)


METHOD = register(
    MergeMethod(
        name="multislerp",
        description="barycentric interpolation of several models on the hypersphere",
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        parameters=(
            Parameter("weight", float, "non_base", 1.0, doc="the model's weight"),
            Parameter("normalize_weights", bool, "global", True, doc="divide by the weights' sum"),
            Parameter("eps", float, "global", 1e-8, low=0.0, doc="guard of the divisions"),
        ),
        base="optional",
        min_models=1,
        merge=merge,
        blockwise=lambda task: False,
    )
)
