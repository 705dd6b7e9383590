"""``dare_ties``: DARE's random drop and rescale, then TIES' sign election.

Each delta entry is kept with probability ``density``, reproducibly from the
configuration's ``seed`` (the mask depends only on the seed, the tensor name and the
model's position). With ``rescale`` (the default) the kept deltas are scaled to keep their
L1 norm, as mergekit does; ``rescale_rule: density`` divides them by ``density`` (the
paper's rule). Then signs are elected and the agreeing deltas summed as in ``ties`` (not
normalized by default). mergekit draws its masks from torch's global generator: the two
agree in distribution (keep rate, rescale, expected value), not entry by entry.
Reference: Yu et al. 2024, https://arxiv.org/abs/2311.03099.
"""

from __future__ import annotations

from ..registry import register
from ._task_vectors import method

METHOD = register(
    method(
        "dare_ties",
        "DARE random drop and rescale, then TIES sign election",
        "https://arxiv.org/abs/2311.03099",
        sparsify="random",
        consensus=True,
        normalize=False,
        rescale=True,
    )
)
