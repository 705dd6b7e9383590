"""``dare_linear``: DARE's random drop and rescale, then a weighted sum.

As ``dare_ties`` without the sign election: ``base + λ Σ_i w_i · rescale(mask_i ⊙ τ_i)``
(divided by Σ w_i with ``normalize``). Masks and rescale as in ``dare_ties``.
Reference: Yu et al. 2024, https://arxiv.org/abs/2311.03099.
"""

from __future__ import annotations

from ..registry import register
from ._task_vectors import method

METHOD = register(
    method(
        "dare_linear",
        "DARE random drop and rescale, then a weighted sum of the task vectors",
        "https://arxiv.org/abs/2311.03099",
        sparsify="random",
        consensus=False,
        normalize=False,
        rescale=True,
    )
)
