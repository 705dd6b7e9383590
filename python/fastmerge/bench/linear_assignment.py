"""linear_assignment: fastmerge's JV solver vs scipy, lap, lapjv and torch-linear-assignment.

Groups ``<family>-<n>`` time one square problem, n from 8 to 4,096 (the small sizes measure
the per-call overhead; ``--quick``: 8, 64, 256); ``batch-<B>x<n>`` time a batch (fastmerge
and ``torch-linear-assignment`` in one call, the other peers in a Python loop over it).
Families: ``uniform`` (i.i.d. U(0, 1)) and ``correlation``: the negated correlation
between the units of a random ReLU layer and a noisy, permuted copy, the matrices
permutation-based merging solves. Every provider gets the same float64 matrix. Peers
(the ``bench`` extra): ``scipy.optimize.linear_sum_assignment``, ``lap.lapjv``,
``lapjv.lapjv`` and ``torch_linear_assignment.batch_linear_assignment`` (a (B, n, n) torch
tensor in one call; on the CPU its 0.1 line solves each problem with scipy).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from fastmerge.ops import linear_assignment

from ._harness import cached
from ._peers import optional
from ._suite import Case

SIZES = (8, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
BATCHES = ((32, 512), (8, 2048))
QUICK_SIZES = (8, 64, 256)
QUICK_BATCHES = ((8, 64),)
FAMILIES = ("uniform", "correlation")
#: Peers that take a (B, n, m) torch tensor and solve the whole batch in one call.
BATCHED_PEERS = frozenset({"torch-linear-assignment"})


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
    tla = optional("torch_linear_assignment")
    if tla is not None:
        found["torch-linear-assignment"] = tla.batch_linear_assignment
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
        if provider == "fastmerge" or provider in BATCHED_PEERS:
            tensor = torch.from_numpy(costs).to(device)
            if provider == "fastmerge":
                return lambda: linear_assignment(tensor)
            batched = tensor if batch else tensor[None]
            return lambda: solve(batched)
        if batch == 0:
            return lambda: solve(costs)
        return lambda: [solve(c) for c in costs]

    return setup


def cases(device: str, quick: bool) -> list[Case]:
    """Single problems per family and size, then batches; fastmerge first in each group.

    Example:
        >>> cases("cpu", True)[0].case
        'uniform-8'
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
