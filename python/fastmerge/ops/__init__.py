"""Public ops: each validates its input, picks a backend and calls it.

One op, one file per backend, same name everywhere: ``scope_stats`` is
``csrc/cpu/scope_stats.cpp``, ``csrc/cuda/scope_stats.cu``, ``kernels/scope_stats.py``,
``fastmerge/reference/scope_stats.py`` and ``tests/ops/test_scope_stats.py``.

The namespace rule: every op is here, as ``fastmerge.ops.<op>``; the handful that users
call daily, listed once in :data:`TOP_LEVEL`, are also ``fastmerge.<op>`` (the same
objects). ``tests/test_namespace.py`` holds ``fastmerge``'s top level to that list.
"""

from .conv_gram import conv_gram
from .feature_center import feature_center
from .feature_cost import feature_cost
from .gram import gram
from .gta_combine import gta_combine
from .linear_assignment import linear_assignment
from .lowrank_mixture import clear_lowrank_cache, lowrank_mixture, merge_lowrank
from .magnitude_threshold import magnitude_threshold
from .magprune import magprune
from .nearswap import nearswap
from .sce_combine import sce_combine, sce_variance
from .scope_grad import scope_grad
from .scope_stats import scope_stats
from .ties_combine import ties_combine
from .weighted_sum import weighted_sum

#: The ops that ``import fastmerge`` re-exports as ``fastmerge.<op>`` (the only list).
TOP_LEVEL = ("linear_assignment", "lowrank_mixture", "merge_lowrank", "scope_stats")

__all__ = [
    "conv_gram",
    "feature_center",
    "feature_cost",
    "gram",
    "gta_combine",
    "linear_assignment",
    "lowrank_mixture",
    "merge_lowrank",
    "clear_lowrank_cache",
    "magnitude_threshold",
    "magprune",
    "nearswap",
    "sce_combine",
    "sce_variance",
    "scope_grad",
    "scope_stats",
    "ties_combine",
    "weighted_sum",
]
