"""``dare_ties``: DARE's random drop and rescale, then TIES' sign election.

Each delta entry is kept with probability ``density`` and the kept ones are divided by
``density`` (``rescale: true``, the default; ``false`` is refused), reproducibly from the
configuration's ``seed``; then signs are elected and the agreeing deltas summed as in
``ties`` (not normalized by default). Reference: Yu et al. 2024,
https://arxiv.org/abs/2311.03099.
"""

from __future__ import annotations

from typing import Optional

from ..registry import register
from ._task_vectors import method


def check(task) -> Optional[str]:
    if not task.shared["rescale"]:
        return "rescale: false is not supported (DARE rescales kept deltas by 1/density)"
    return None


METHOD = register(
    method(
        "dare_ties",
        "DARE random drop and rescale, then TIES sign election",
        "https://arxiv.org/abs/2311.03099",
        trim="random",
        consensus=True,
        normalize=False,
        rescale=True,
        check=check,
    )
)
