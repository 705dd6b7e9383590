"""Throughput benchmarks that ship with the wheel: ``fastmerge bench [OP|all]``.

One module per suite (``scope_stats``, ``linear_assignment``, ...); each times fastmerge
beside its peers (torch baselines, and the optional ``bench`` extra: scipy, lap, lapjv,
torch-linear-assignment) with the small harness in :mod:`fastmerge.bench._harness`, no
pytest needed. docs/benchmarks.md describes the JSON rows and how to add a suite.

Example:
    >>> from fastmerge import bench
    >>> "call_overhead" in bench.SUITES
    True
    >>> result = bench.run(["call_overhead"], quick=True, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

from ._runner import Result, run

#: Suite names in the order ``all`` runs them (fast ones first).
SUITES = (
    "call_overhead",
    "scope_stats",
    "wsa",
    "linear_assignment",
    "feature_stats",
    "least_squares",
    "lowrank_mixture",
    "ties",
    "twin",
    "regmean",
)


def summary(name: str) -> str:
    """The first line of suite `name`'s docstring (``fastmerge bench --list``).

    Example:
        >>> summary("call_overhead").startswith("call_overhead")
        True
    """
    doc = importlib.import_module(f"{__name__}.{name}").__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else name


__all__ = ["SUITES", "Result", "run", "summary"]
