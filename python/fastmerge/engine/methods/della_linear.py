"""``della_linear``: DELLA's MAGPRUNE drop, then a weighted sum.

As ``della`` without the sign election and not normalized by default.
Reference: Deep et al. 2024, https://arxiv.org/abs/2406.11617.
"""

from __future__ import annotations

from ..registry import register
from ._task_vectors import method

METHOD = register(
    method(
        "della_linear",
        "DELLA magnitude-ranked random drop and rescale, then a weighted sum",
        "https://arxiv.org/abs/2406.11617",
        sparsify="della_magprune",
        consensus=False,
        normalize=False,
        rescale=True,
    )
)
