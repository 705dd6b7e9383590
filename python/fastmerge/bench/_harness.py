"""The timing harness: warm-up, calibration, adaptive repeat count, median and IQR.

pytest is not needed: the wheel's users run ``fastmerge bench`` without a test
environment. One *round* runs the timed callable ``inner`` times back to back and records
the mean time per call; ``inner`` grows (1, 2, 4, ...) until a round lasts at least
``ROUND_S``, so that microsecond calls are not swamped by the timer's own cost, while a
call that takes longer than that runs once per round. The number of rounds is what fits in
the budget, clamped to ``[min_rounds, max_rounds]``.

CUDA work is timed with CUDA events around each round (recorded on the current stream)
after a synchronize, so the time is the device's, and the host waits before the next round.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

ROUND_S = 1e-3  # shortest round worth timing with perf_counter (its cost is ~0.1 us)


@dataclass(frozen=True)
class Budget:
    """How long to time one case: `seconds` of rounds, at least `min_rounds`, at most
    `max_rounds`.

    Example:
        >>> Budget(0.5, 5, 100).seconds
        0.5
    """

    seconds: float
    min_rounds: int
    max_rounds: int


DEFAULT = Budget(seconds=1.0, min_rounds=10, max_rounds=1000)
QUICK = Budget(seconds=0.05, min_rounds=3, max_rounds=50)


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and interquartile range over rounds.

    Example:
        >>> Timing(1e-3, 1e-4, 10, 1).median
        0.001
    """

    median: float
    iqr: float
    rounds: int
    inner: int


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _round_cpu(fn: Callable[[], Any], inner: int, sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - start) / inner


def _round_cuda(fn: Callable[[], Any], inner: int) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / inner


def measure(
    fn: Callable[[], Any],
    *,
    device: str = "cpu",
    budget: Budget = DEFAULT,
    min_rounds: Optional[int] = None,
    warmup: bool = True,
) -> Timing:
    """Time `fn` (no arguments): warm up, calibrate the calls per round, then time rounds.

    `min_rounds` lowers (or raises) the budget's minimum for slow cases; ``warmup=False``
    skips the warm-up call for cases that take minutes (the first round then counts).
    The garbage collector is off while rounds run (as pytest-benchmark's
    ``--benchmark-disable-gc``), so a collection does not land in one round.

    Example:
        >>> t = measure(lambda: sum(range(100)), budget=QUICK)
        >>> t.median > 0 and t.rounds >= 3
        True
    """
    sync = _sync(device)
    one = (
        functools.partial(_round_cuda, fn)
        if device.startswith("cuda")
        else functools.partial(_round_cpu, fn, sync=sync)
    )
    low = budget.min_rounds if min_rounds is None else min_rounds
    times: list[float] = []
    if warmup:
        fn()  # allocator, thread pool, lazy imports, kernel compilation
        sync()
    inner = 1
    while True:  # calibration (timeit's autorange): double until a round lasts ROUND_S
        per_call = one(inner)
        if per_call * inner >= ROUND_S or inner >= 1 << 20:
            break
        inner *= 2
    times.append(per_call)  # the last calibration round ran `inner` calls: a real round
    rounds = int(min(budget.max_rounds, max(low, budget.seconds / max(per_call * inner, 1e-9))))
    enabled = gc.isenabled()
    gc.disable()
    try:
        while len(times) < rounds:
            times.append(one(inner))
    finally:
        if enabled:
            gc.enable()
    return summarize(times, inner)


def summarize(times: list[float], inner: int = 1) -> Timing:
    """Median and interquartile range of per-call times.

    Example:
        >>> summarize([1.0, 2.0, 3.0, 4.0, 5.0]).median, summarize([1.0, 2.0, 3.0, 4.0, 5.0]).iqr
        (3.0, 2.0)
    """
    if not times:
        raise ValueError("summarize needs at least one time")
    if len(times) < 2:
        return Timing(times[0], 0.0, 1, inner)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(statistics.median(times), q3 - q1, len(times), inner)


_CACHES: list[Any] = []


def cached(fn: Callable) -> Callable:
    """``functools.lru_cache(maxsize=1)`` whose cache :func:`clear_caches` empties: a
    suite's workload is built once for all its providers, then freed before the next
    suite (the TIES workload alone is 3.4 GB).

    Example:
        >>> square = cached(lambda n: n * n)
        >>> square(3), clear_caches()
        (9, None)
    """
    wrapped = functools.lru_cache(maxsize=1)(fn)
    _CACHES.append(wrapped)
    return wrapped


def clear_caches() -> None:
    """Empty every :func:`cached` workload."""
    for cache in _CACHES:
        cache.cache_clear()
    gc.collect()
