"""Benchmarks of ``fastmerge.linear_assignment`` against the common CPU solvers.

Groups ``linear_assignment-<family>-<n>`` time one square problem; groups
``linear_assignment-batch-<B>x<n>`` time a batch (fastmerge in one call, each peer in a
Python loop over the batch). Peers, each when installed (the ``bench`` extra):
``scipy.optimize.linear_sum_assignment``, ``lap.lapjv``, ``lapjv.lapjv``. The report's
ratio column is the fastest peer's median over each provider's.

Families: ``uniform`` (i.i.d. U(0, 1) costs) and ``correlation``: the negated
correlation between the hidden units of a random ReLU layer and of a noisy, permuted
copy of it, the matrices that permutation-based merging solves. All peers get the same
float64 matrix.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Callable

import numpy as np
import pytest
import torch
from conftest import Workload, label, run_benchmark

import fastmerge

SIZES = (256, 1024, 2048, 4096)
BATCHES = ((32, 512), (8, 2048))
FAMILIES = ("uniform", "correlation")


def _peers() -> dict[str, Callable[[np.ndarray], Any]]:
    peers: dict[str, Callable[[np.ndarray], Any]] = {}
    if importlib.util.find_spec("scipy"):
        from scipy.optimize import linear_sum_assignment

        peers["scipy"] = linear_sum_assignment
    if importlib.util.find_spec("lap"):
        import lap

        peers["lap.lapjv"] = lambda c: lap.lapjv(c, extend_cost=c.shape[0] != c.shape[1])
    if importlib.util.find_spec("lapjv"):
        import lapjv

        peers["lapjv.lapjv"] = lapjv.lapjv
    return peers


PEERS = _peers()


@functools.cache
def cost_matrix(family: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if family == "uniform":
        return rng.random((n, n))
    # Two "networks": a random ReLU layer and a noisy copy with its units permuted.
    x = rng.standard_normal((1024, 64))
    w = rng.standard_normal((64, n))
    w_b = w[:, rng.permutation(n)] + 0.5 * rng.standard_normal((64, n))
    a, b = np.maximum(x @ w, 0), np.maximum(x @ w_b, 0)
    a = (a - a.mean(0)) / (a.std(0) + 1e-12)
    b = (b - b.mean(0)) / (b.std(0) + 1e-12)
    return -(a.T @ b) / a.shape[0]


def _check_optimal(cost: np.ndarray, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Untimed: fastmerge's assignment costs what scipy's does (when scipy is there)."""
    if "scipy" not in PEERS or cost.shape[-1] > 2048:
        return
    want_r, want_c = PEERS["scipy"](cost)
    got = cost[rows.numpy(), cols.numpy()].sum()
    assert np.isclose(got, cost[want_r, want_c].sum(), rtol=1e-12, atol=1e-9)


SINGLE = [
    pytest.param(f, n, p, id=f"{f}-{n}-{p}")
    for f in FAMILIES
    for n in SIZES
    for p in ["fastmerge-cpu", *PEERS]
]


@pytest.mark.parametrize(("family", "n", "provider"), SINGLE)
def bench_linear_assignment(benchmark: Any, family: str, n: int, provider: str) -> None:
    cost = cost_matrix(family, n)
    tensor = torch.from_numpy(cost)
    label(
        benchmark,
        "linear_assignment",
        Workload(f"{family}-{n}", ("cost",), (tensor,)),
        "cpu",
        provider,
    )
    if provider == "fastmerge-cpu":
        _check_optimal(cost, *fastmerge.linear_assignment(tensor))
        fn = functools.partial(fastmerge.linear_assignment, tensor, backend="cpu")
    else:
        fn = functools.partial(PEERS[provider], cost)
    run_benchmark(benchmark, fn, "cpu", min_rounds=3 if n >= 2048 else 10)


BATCHED = [
    pytest.param(b, n, p, id=f"batch-{b}x{n}-{p}")
    for b, n in BATCHES
    for p in ["fastmerge-cpu", *PEERS]
]


@pytest.mark.parametrize(("batch", "n", "provider"), BATCHED)
def bench_linear_assignment_batch(benchmark: Any, batch: int, n: int, provider: str) -> None:
    costs = np.stack([cost_matrix("uniform", n, seed) for seed in range(batch)])
    tensor = torch.from_numpy(costs)
    label(
        benchmark,
        "linear_assignment",
        Workload(f"batch-{batch}x{n}", ("cost",), (tensor,)),
        "cpu",
        provider,
    )
    if provider == "fastmerge-cpu":
        fn = functools.partial(fastmerge.linear_assignment, tensor, backend="cpu")
    else:
        solve = PEERS[provider]
        fn = functools.partial(lambda cs: [solve(c) for c in cs], costs)
    run_benchmark(benchmark, fn, "cpu", min_rounds=3)
