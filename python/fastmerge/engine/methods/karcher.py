"""``karcher``: the Karcher (Riemannian) mean of the models on the unit hypersphere.

Per tensor, with x_i every input (equal weights α_i = 1/N), n_i = ‖x_i‖ and units
u_i = x_i / n_i: starting from the normalized mean of the units (inputs with n_i <= tol
left out), iterate up to ``max_iter`` times

    T = Σ α_i θ_i / sin θ_i · (u_i − cos θ_i · m),   cos θ_i = ⟨m, u_i⟩ (θ_i < tol skipped),
    m ← cos ‖T‖ · m + sin ‖T‖ · T / ‖T‖, renormalized,

stopping when ‖T‖ < ``tol``; the result is ``(Σ α_i n_i) · m``. m stays a linear
combination of the inputs, so the whole iteration runs on their Gram matrix
(:func:`fastmerge.ops.gram`, float64) and the tensor is written by one weighted sum:
two passes over memory for any ``max_iter``. Reference: Karcher 1977; mergekit's karcher
method, https://arxiv.org/abs/2603.04972.
"""

from __future__ import annotations

import math

import torch

from ..registry import MergeMethod, Parameter, register
from ._spherical import combine, gram, norms


def coefficients(g: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """The coefficients of the inputs in the Karcher mean, from their Gram matrix."""
    k = g.shape[0]
    n = norms(g)
    alphas = torch.full((k,), 1.0 / k, dtype=torch.float64)
    valid = [i for i in range(k) if n[i] > tol]
    if not valid:
        return torch.zeros(k, dtype=torch.float64)
    weight = torch.zeros(k, dtype=torch.float64)
    weight[valid] = alphas[valid] / alphas[valid].sum()
    inv = torch.where(n > 0, 1 / n.clamp_min(1e-300), 0)  # unit u_i = inv_i x_i

    def length(c: torch.Tensor) -> float:
        return math.sqrt(max((c @ g @ c).item(), 0.0))

    mean = weight * inv
    mean_norm = length(mean)
    if mean_norm < tol:
        mean = torch.zeros(k, dtype=torch.float64)
        mean[valid[0]] = inv[valid[0]]
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros(k, dtype=torch.float64)
        gm = g @ mean
        for i in valid:
            dot = max(-1.0, min(1.0, (gm[i] * inv[i]).item()))
            theta = math.acos(dot)
            if theta < tol:
                continue
            unit = torch.zeros(k, dtype=torch.float64)
            unit[i] = inv[i]
            tangent += weight[i] * (theta / math.sin(theta)) * (unit - dot * mean)
        tn = length(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = length(mean)
        if un > tol:
            mean = mean / un
    return mean * (alphas * n).sum()


def merge(task, tensors, statistics=None):
    """The Karcher mean of one tensor."""
    if len(tensors) == 1:
        return tensors[0]
    c = coefficients(gram(tensors), task.shared["max_iter"], task.shared["tol"])
    return combine(tensors, c, task.dtype)


METHOD = register(
    MergeMethod(
        name="karcher",
        description="Karcher mean of the models on the hypersphere",
        reference="https://arxiv.org/abs/2603.04972",
        parameters=(
            Parameter("max_iter", int, "global", 10, low=0, doc="iterations at most"),
            Parameter("tol", float, "global", 1e-5, low=0.0, doc="stop when the step is below"),
        ),
        base="ignored",
        min_models=1,
        merge=merge,
        blockwise=lambda task: False,
    )
)
