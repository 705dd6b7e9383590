"""``della``: DELLA-Merging: magnitude-ranked random drop (MAGPRUNE), then TIES.

Per row (dim 1 of a 2-D tensor; a 1-D tensor is one row), the entry of ascending
magnitude rank r of C is kept with probability ``density − ε + 2ε (r − 1)/(C − 1)`` (so
larger deltas survive more often; ε = ``epsilon``, and ``density ± epsilon`` must lie in
(0, 1); ties in magnitude ranked by position in the row), reproducibly from ``seed``
(:func:`fastmerge.ops.magprune`: exact per-row ranks and a counter-based hash); kept
deltas keep their L1 norm (``rescale``, the default), signs are elected and the agreeing
deltas averaged (``normalize``, the default). mergekit draws its masks from torch's global
generator: the two agree in distribution.
Reference: Deep et al. 2024, https://arxiv.org/abs/2406.11617.
"""

from __future__ import annotations

from ..registry import register
from ._task_vectors import method

METHOD = register(
    method(
        "della",
        "DELLA: magnitude-ranked random drop, rescale, TIES sign election",
        "https://arxiv.org/abs/2406.11617",
        sparsify="della_magprune",
        consensus=True,
        normalize=True,
        rescale=True,
    )
)
