"""Run suites: collect their cases, time each with a progress bar, build the rows."""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from . import _harness, _machine, _peers, _report
from ._suite import Case, devices_for


@dataclass
class Result:
    """A run's rows (JSON columns plus ``ours``), machine, notes and failed cases."""

    rows: list[dict[str, Any]]
    machine: dict[str, Any]
    notes: list[str]
    failures: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per suite

    def text(self) -> str:
        """The report printed by ``fastmerge bench``."""
        return _report.render(self.rows, self.machine, self.notes, self.seconds)


class _Counter:
    """The progress bar without tqdm: ``[3/40] suite: case provider`` on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def set_description(self, text: str) -> None:
        sys.stderr.write(f"\r\033[K[{self.done + 1}/{self.total}] {text}"[:200])
        sys.stderr.flush()

    def update(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        sys.stderr.write("\r\033[K" if sys.stderr.isatty() else "\n")
        sys.stderr.flush()


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total)
    return tqdm(total=total, file=sys.stderr, unit="case", leave=False, dynamic_ncols=True)


def run(
    suites: list[str], device: str = "cpu", quick: bool = False, progress: bool = True
) -> Result:
    """Time every case of `suites` on `device`; ``quick``: small sizes, few rounds.

    Example:
        >>> result = run(["call_overhead"], quick=True, progress=False)  # doctest: +SKIP
        >>> print(result.text())  # doctest: +SKIP
    """
    device = devices_for(device)  # a clear error for "cuda" without a GPU
    budget = _harness.QUICK if quick else _harness.DEFAULT
    plan: list[tuple[str, list[Case]]] = []
    for name in suites:
        module = importlib.import_module(f"{__package__}.{name}")
        plan.append((name, module.cases(device, quick)))
    machine = _machine.describe(device)  # after the imports: the peers' versions are known
    version = machine["fastmerge"]
    where = _machine.short(machine)
    bar = _progress(sum(len(cases) for _, cases in plan), progress)
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    seconds: dict[str, float] = {}
    try:
        for suite, cases in plan:
            start = time.perf_counter()
            for case in cases:
                if bar is not None:
                    bar.set_description(f"{suite}: {case.case} {case.provider}")
                timing = _time(suite, case, device, budget, failures)
                if bar is not None:
                    bar.update(1)
                if timing is None:
                    continue
                rows.append(
                    {
                        "suite": suite,
                        "case": case.case,
                        "provider": case.provider,
                        "metric": "time",
                        "unit": "s",
                        "x_name": case.x_name,
                        "x_value": case.x_value,
                        "median": timing.median * case.scale,
                        "iqr": timing.iqr * case.scale,
                        "target": None if case.target_us is None else case.target_us * 1e-6,
                        "machine": where,
                        "version": version,
                        "ours": case.ours,
                    }
                )
            _harness.clear_caches()  # free the suite's workloads before the next one
            seconds[suite] = time.perf_counter() - start
    finally:
        if bar is not None:
            bar.close()
    _report.add_ratios(rows)
    return Result(rows, machine, _peers.take_notes(), failures, seconds)


def _time(
    suite: str, case: Case, device: str, budget: _harness.Budget, failures: list[str]
) -> Optional[_harness.Timing]:
    """One case's timing, or None (with a note) when its set-up or call raised: a broken
    peer must not cost the rest of the run."""
    try:
        fn = case.setup()
        return _harness.measure(
            fn, device=device, budget=budget, min_rounds=case.min_rounds, warmup=case.warmup
        )
    except Exception as error:  # noqa: BLE001 - reported, and fastmerge's failures fail the run
        message = f"{suite}: {case.case} {case.provider} failed: {type(error).__name__}: {error}"
        _peers.note(message.splitlines()[0])
        if case.ours:
            failures.append(message)
        return None
