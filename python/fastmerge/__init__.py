"""fastmerge: fast, exact model-merging primitives and merging methods.

Every op is in :mod:`fastmerge.ops`; the ones used daily (``fastmerge.ops.TOP_LEVEL``)
are re-exported here. Primitives (each with reference, cpu, cuda and triton backends):

* :func:`scope_stats` — fused per-tensor mean/std/count over a list of tensors.
* :func:`wsa_penalty` — the Weight Scope Alignment penalty with a fused backward.
* :class:`FeatureStats` — mergeable feature statistics and cost matrices for unit matching.
* :class:`LeastSquares`, :func:`ridge_solve` — mergeable Gram/cross accumulation and a
  batched, masked ridge solve for layer-wise least squares (PLeaS).

See ``fastmerge info`` for what is built and usable on this machine.

Example:
    >>> import torch, fastmerge
    >>> fastmerge.scope_stats([torch.zeros(2, 2)]).std.tolist()
    [0.0]
"""

from __future__ import annotations

from typing import Any

from . import backends, dist, merge, ops, pleas, twin, wsa
from ._version import __version__
from .backends import BackendUnavailableError
from .features import FeatureStats
from .least_squares import LeastSquares, ridge_solve
from .ops import linear_assignment, lowrank_mixture, merge_lowrank, scope_stats  # ops.TOP_LEVEL
from .stats import ScopeStats
from .wsa import wsa_penalty


def set_num_threads(n: int) -> None:
    """Set the number of CPU threads of fastmerge's kernels (default: all cores, or
    ``$FASTMERGE_NUM_THREADS``). Independent of ``torch.set_num_threads``.

    Example:
        >>> fastmerge.set_num_threads(2)
    """
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    backends.cpu_extension().set_num_threads(int(n))


def get_num_threads() -> int:
    """Number of CPU threads fastmerge's kernels use.

    Example:
        >>> fastmerge.get_num_threads() >= 1
        True
    """
    return int(backends.cpu_extension().get_num_threads())


def __getattr__(name: str) -> Any:
    """``fastmerge.cli`` on first use: the library does not import its own command line."""
    if name == "cli":
        import importlib

        return importlib.import_module(".cli", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "FeatureStats",
    "LeastSquares",
    "ScopeStats",
    "__version__",
    "backends",
    "dist",
    "get_num_threads",
    "linear_assignment",
    "lowrank_mixture",
    "merge_lowrank",
    "merge",
    "ops",
    "pleas",
    "ridge_solve",
    "scope_stats",
    "set_num_threads",
    "twin",
    "wsa",
    "wsa_penalty",
]
