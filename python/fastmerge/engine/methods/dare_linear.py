"""``dare_linear``: DARE's random drop and rescale, then the weighted sum.

As ``dare_ties`` without the sign election. Reference: Yu et al. 2024,
https://arxiv.org/abs/2311.03099.
"""

from __future__ import annotations

from ..registry import register
from ._task_vectors import method
from .dare_ties import check

METHOD = register(
    method(
        "dare_linear",
        "DARE random drop and rescale, then the weighted sum of the deltas",
        "https://arxiv.org/abs/2311.03099",
        trim="random",
        consensus=False,
        normalize=False,
        rescale=True,
        check=check,
    )
)
