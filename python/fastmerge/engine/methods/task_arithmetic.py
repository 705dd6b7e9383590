"""``task_arithmetic``: the base plus the weighted sum of the task vectors.

``base + λ Σ_i w_i (θ_i − base)`` (divided by Σ w_i with ``normalize``, where it is not
0). ``density`` and ``rescale`` are accepted, as mergekit accepts them, and have no effect.
One fused pass (:func:`fastmerge.ops.gta_combine`).
Reference: Ilharco et al. 2023, https://arxiv.org/abs/2212.04089.
"""

from __future__ import annotations

from ..registry import register
from ._task_vectors import method

METHOD = register(
    method(
        "task_arithmetic",
        "base + lambda * weighted sum of the task vectors",
        "https://arxiv.org/abs/2212.04089",
        sparsify=None,
        consensus=False,
        normalize=False,
        rescale=False,
    )
)
