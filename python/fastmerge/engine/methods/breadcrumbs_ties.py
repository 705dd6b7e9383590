"""``breadcrumbs_ties``: Model Breadcrumbs' band selection, then TIES' sign election.

The deltas kept as in ``breadcrumbs``, then signs elected and the agreeing deltas summed as
in ``ties`` (not normalized by default).
Reference: Davari and Belilovsky 2024, https://arxiv.org/abs/2312.06795.
"""

from __future__ import annotations

from ..registry import register
from ._task_vectors import method

METHOD = register(
    method(
        "breadcrumbs_ties",
        "Breadcrumbs band selection, then TIES sign election",
        "https://arxiv.org/abs/2312.06795",
        sparsify="magnitude_outliers",
        consensus=True,
        normalize=False,
        rescale=False,
    )
)
