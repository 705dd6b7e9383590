"""Shared helpers of the source-tree benchmarks that still run under pytest-benchmark
(``bench_pleas.py``, ``bench_merge_cli.py``): the seed, a named tensor list, the group
label and the machine description (the packaged one, :mod:`fastmerge.bench._machine`).

The throughput suites of the ops and methods ship with the wheel as
:mod:`fastmerge.bench` (``fastmerge bench --list``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from fastmerge.bench._machine import describe

SEED = 0


@dataclass(frozen=True)
class Workload:
    """A named list of tensors and its size."""

    name: str
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def machine_description() -> dict[str, Any]:
    """CPU model, cores, threads, load and library versions of this machine."""
    return describe("cpu")


def label(benchmark: Any, op: str, workload: Workload, device: str, provider: str) -> None:
    """Name the benchmark's group (``<op>-<workload>[-<device>]``) and record the columns
    that ``report.py`` needs in its extra_info."""
    benchmark.group = f"{op}-{workload.name}" + ("" if device == "cpu" else f"-{device}")
    benchmark.extra_info.update(
        op=op,
        workload=workload.name,
        device=device,
        provider=provider,
        tensors=len(workload.tensors),
        numel=workload.numel,
        bytes=workload.nbytes,
    )


@pytest.fixture(scope="session")
def machine() -> dict[str, Any]:
    """The machine description (also stored in the JSON under machine_info["fastmerge"])."""
    return machine_description()


def pytest_benchmark_update_machine_info(config: Any, machine_info: dict[str, Any]) -> None:
    """Add fastmerge's machine description to pytest-benchmark's JSON output."""
    machine_info["fastmerge"] = machine_description()
