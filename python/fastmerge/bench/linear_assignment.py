"""linear_assignment: fastmerge's JV solver vs scipy, lap and lapjv, single and batched.

Groups ``<family>-<n>`` time one square problem; ``batch-<B>x<n>`` time a batch
(fastmerge in one call, each peer in a Python loop over it). Families: ``uniform``
(i.i.d. U(0, 1)) and ``correlation``: the negated correlation between the units of a
random ReLU layer and a noisy, permuted copy, the matrices permutation-based merging
solves. Every provider gets the same float64 matrix. Peers (the ``bench`` extra):
``scipy.optimize.linear_sum_assignment``, ``lap.lapjv``, ``lapjv.lapjv``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from fastmerge.ops import linear_assignment

from ._harness import cached
from ._peers import optional
from ._suite import Case

SIZES = (256, 1024, 2048, 4096)
BATCHES = ((32, 512), (8, 2048))
QUICK_SIZES = (64, 256)
QUICK_BATCHES = ((8, 64),)
FAMILIES = ("uniform", "correlation")


def peers() -> dict[str, Callable[[np.ndarray], Any]]:
    """The installed peers by provider name (a note for each missing one).

    Example:
        >>> isinstance(peers(), dict)
        True
    """
    found: dict[str, Callable[[np.ndarray], Any]] = {}
    scipy_optimize = optional("scipy.optimize")
    if scipy_optimize is not None:
        found["scipy"] = scipy_optimize.linear_sum_assignment
    lap = optional("lap")
    if lap is not None:
        found["lap.lapjv"] = lambda c: lap.lapjv(c, extend_cost=c.shape[0] != c.shape[1])
    lapjv = optional("lapjv")
    if lapjv is not None:
        found["lapjv.lapjv"] = lapjv.lapjv
    return found


def cost_matrix(family: str, n: int, seed: int = 0) -> np.ndarray:
    """A seeded (n, n) float64 cost matrix of `family`.

    Example:
        >>> cost_matrix("uniform", 3).shape
        (3, 3)
    """
    rng = np.random.default_rng(seed)
    if family == "uniform":
        return rng.random((n, n))
    if family != "correlation":
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    x = rng.standard_normal((1024, 64))
    w = rng.standard_normal((64, n))
    w_b = w[:, rng.permutation(n)] + 0.5 * rng.standard_normal((64, n))
    a, b = np.maximum(x @ w, 0), np.maximum(x @ w_b, 0)
    a = (a - a.mean(0)) / (a.std(0) + 1e-12)
    b = (b - b.mean(0)) / (b.std(0) + 1e-12)
    return -(a.T @ b) / a.shape[0]


@cached
def _costs(family: str, n: int, batch: int) -> np.ndarray:
    if batch == 0:
        return cost_matrix(family, n)
    return np.stack([cost_matrix(family, n, seed) for seed in range(batch)])


def _setup(provider: str, solve: Any, family: str, n: int, batch: int, device: str) -> Callable:
    def setup() -> Callable[[], Any]:
        costs = _costs(family, n, batch)
        if provider == "fastmerge":
            tensor = torch.from_numpy(costs).to(device)
            return lambda: linear_assignment(tensor)
        if batch == 0:
            return lambda: solve(costs)
        return lambda: [solve(c) for c in costs]

    return setup


def cases(device: str, quick: bool) -> list[Case]:
    """Single problems per family and size, then batches; fastmerge first in each group.

    Example:
        >>> cases("cpu", True)[0].case
        'uniform-64'
    """
    solvers: dict[str, Any] = {"fastmerge": None, **peers()}
    out = []
    for family in FAMILIES:
        for n in QUICK_SIZES if quick else SIZES:
            for p, solve in solvers.items():
                setup = _setup(p, solve, family, n, 0, device)
                slow = None if quick or n < 2048 else 3
                out.append(Case(f"{family}-{n}", p, setup, p == "fastmerge", "n", n, slow))
    for b, n in QUICK_BATCHES if quick else BATCHES:
        for p, solve in solvers.items():
            setup = _setup(p, solve, "uniform", n, b, device)
            out.append(Case(f"batch-{b}x{n}", p, setup, p == "fastmerge", "batch", b, 3))
    return out
