"""``ties``: TIES-Merging: trim, elect sign, disjoint merge.

Each task vector keeps its ``max(1, int(density · n))`` largest-magnitude entries (entries
tied with the k-th largest are kept too; mergekit keeps exactly k, breaking ties by its
sort order), the sign of the weighted sum of the trimmed deltas is elected per entry (a sum
of exactly 0 elects +, as in mergekit; ``zero_sum: drop`` for the paper's sgn(0) = 0), and
only the agreeing deltas are summed, divided by the sum of their weights with ``normalize``
(the default). ``rescale: true`` keeps each trimmed delta's L1 norm. Two passes: exact radix
selection (:func:`fastmerge.ops.magnitude_threshold`), then :func:`fastmerge.ops.gta_combine`.
Reference: Yadav et al. 2023, https://arxiv.org/abs/2306.01708.
"""

from __future__ import annotations

from ..registry import register
from ._task_vectors import method

METHOD = register(
    method(
        "ties",
        "TIES: trim to density by magnitude, elect signs, merge the agreeing deltas",
        "https://arxiv.org/abs/2306.01708",
        sparsify="magnitude",
        consensus=True,
        normalize=True,
        rescale=False,
    )
)
