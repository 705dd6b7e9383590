"""Benchmarks of ``fastmerge.linear_assignment`` against the common CPU solvers.

Groups ``linear_assignment-<family>-<n>`` time one square problem (n from 8 to 4096:
the small sizes measure the per-call overhead); groups ``linear_assignment-batch-<B>x<n>``
time a batch (fastmerge and ``torch-linear-assignment`` in one call, the other peers in a
Python loop over the batch). Peers, each when installed (the ``bench`` extra):
``scipy.optimize.linear_sum_assignment``, ``lap.lapjv``, ``lapjv.lapjv`` and
``torch_linear_assignment.batch_linear_assignment`` (on the CPU its 0.1 line solves each
problem with scipy). The report's ratio column is the fastest peer's median over each
provider's. Every provider of a group runs back to back, so the ratios are side by side.

A call that takes microseconds is timed over a loop of calls per round (the round's
mean per call is what a round records), so that the timer's own cost does not count.

Families: ``uniform`` (i.i.d. U(0, 1) costs) and ``correlation``: the negated
correlation between the hidden units of a random ReLU layer and of a noisy, permuted
copy of it, the matrices that permutation-based merging solves. All peers get the same
float64 matrix.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from typing import Any, Callable

import numpy as np
import pytest
import torch
from conftest import BUDGET_S, Workload, label, run_benchmark

import fastmerge

SIZES = (8, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
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
    if importlib.util.find_spec("torch_linear_assignment"):
        from torch_linear_assignment import batch_linear_assignment

        peers["torch-linear-assignment"] = batch_linear_assignment
    return peers


# Peers that take a (B, n, m) torch tensor and solve the whole batch in one call.
BATCHED_PEERS = frozenset({"torch-linear-assignment"})
# A round lasts at least this long: tiny calls are repeated within it.
MIN_ROUND_S = 2e-4


def _run(benchmark: Any, fn: Callable[[], object], n: int) -> object:
    """`run_benchmark`, except that calls far shorter than a timer tick are looped."""
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-9)
    if once >= MIN_ROUND_S:
        return run_benchmark(benchmark, fn, "cpu", min_rounds=3 if n >= 2048 else 10)
    iterations = int(MIN_ROUND_S / once) + 1
    rounds = int(max(200, min(2000, BUDGET_S / (once * iterations))))
    return benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=5)


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
    elif provider in BATCHED_PEERS:
        fn = functools.partial(PEERS[provider], tensor[None])
    else:
        fn = functools.partial(PEERS[provider], cost)
    _run(benchmark, fn, n)


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
    elif provider in BATCHED_PEERS:
        fn = functools.partial(PEERS[provider], tensor)
    else:
        solve = PEERS[provider]
        fn = functools.partial(lambda cs: [solve(c) for c in cs], costs)
    run_benchmark(benchmark, fn, "cpu", min_rounds=3)
