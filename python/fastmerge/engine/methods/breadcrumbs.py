"""``breadcrumbs``: Model Breadcrumbs: drop the largest and the smallest deltas.

Each task vector keeps ``int(density · n)`` entries: the ``int(gamma · n)`` largest
magnitudes are dropped first (fewer when density needs them), then the smallest, so the
ascending magnitude ranks ``[n − k − g', n − g')`` remain (g' the outliers actually
dropped). Then a weighted sum as in ``task_arithmetic``. Two order statistics per expert
(:func:`fastmerge.ops.magnitude_threshold`), then :func:`fastmerge.ops.gta_combine` keeps the
band between them (ties with either bound are kept).
Reference: Davari and Belilovsky 2024, https://arxiv.org/abs/2312.06795.
"""

from __future__ import annotations

from ..registry import register
from ._task_vectors import method

METHOD = register(
    method(
        "breadcrumbs",
        "Model Breadcrumbs: drop the largest and smallest deltas, then sum",
        "https://arxiv.org/abs/2312.06795",
        sparsify="magnitude_outliers",
        consensus=False,
        normalize=False,
        rescale=False,
    )
)
