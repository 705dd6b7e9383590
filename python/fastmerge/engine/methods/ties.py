"""``ties``: TIES-Merging: trim, elect sign, disjoint merge.

Each task vector keeps its ``int(density · n)`` largest-magnitude entries (mergekit's
rounding; entries tied with the threshold are kept too), the sign of the weighted sum of
the trimmed deltas is elected per entry, and only the agreeing deltas are averaged
(weighted, divided by their weights' sum with ``normalize``, the default).
``rescale: true`` is refused. Reference: Yadav et al. 2023, https://arxiv.org/abs/2306.01708.
"""

from __future__ import annotations

from typing import Optional

from ..registry import register
from ._task_vectors import method


def check(task) -> Optional[str]:
    if task.shared["rescale"]:
        return "rescale: true is not supported (TIES does not rescale)"
    return None


METHOD = register(
    method(
        "ties",
        "TIES: trim to density by magnitude, elect signs, merge the agreeing deltas",
        "https://arxiv.org/abs/2306.01708",
        trim="magnitude",
        consensus=True,
        normalize=True,
        rescale=False,
        check=check,
    )
)
