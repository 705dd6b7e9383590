"""Shared workloads, machine description and timing helper for the fastmerge benchmarks.

Workloads are lists of float32 tensors built from a fixed seed:

* ``resnet50``: the 161 trainable parameters of torchvision's ResNet-50 (conv weights,
  batch-norm weight and bias, fc weight and bias): 25,557,032 elements.
* ``transformer70m``: 291 tensors, 73,127,936 elements: a 32,000 x 512 token embedding,
  18 pre-norm layers of width 512 (q, k, v, o 512 x 512 with biases; MLP 2048 x 512 and
  512 x 2048 with biases; two LayerNorms with weight and bias) and a final LayerNorm.
* ``tiny2000``: 2,000 tensors of 64 elements (128,000 elements): the per-tensor overhead.

``python bench/conftest.py`` prints these totals.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import fastmerge

Shape = tuple[int, ...]
SEED = 0
MIN_ROUNDS = 10  # every peer is timed at least this many times
MAX_ROUNDS = 1000
BUDGET_S = float(os.environ.get("FASTMERGE_BENCH_BUDGET_S", "2.0"))  # timing budget per peer
WORKLOADS = ("resnet50", "transformer70m", "tiny2000")


def resnet50_shapes() -> list[tuple[str, Shape]]:
    """Names and shapes of ResNet-50's trainable parameters (torchvision layout)."""
    shapes: list[tuple[str, Shape]] = [("conv1.weight", (64, 3, 7, 7))]
    shapes += [("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            for i, (cin, cout, k) in enumerate(
                [(inplanes, planes, 1), (planes, planes, 3), (planes, planes * 4, 1)], start=1
            ):
                shapes.append((f"{p}.conv{i}.weight", (cout, cin, k, k)))
                shapes += [(f"{p}.bn{i}.weight", (cout,)), (f"{p}.bn{i}.bias", (cout,))]
            if block == 0:  # projection shortcut
                shapes.append((f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1)))
                shapes += [(f"{p}.downsample.1.weight", (planes * 4,))]
                shapes += [(f"{p}.downsample.1.bias", (planes * 4,))]
            inplanes = planes * 4
    shapes += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return shapes


def transformer70m_shapes(
    layers: int = 18, width: int = 512, mlp: int = 2048, vocab: int = 32000
) -> list[tuple[str, Shape]]:
    """Names and shapes of a pre-norm transformer: embedding, `layers` blocks, final norm."""
    shapes: list[tuple[str, Shape]] = [("embed.weight", (vocab, width))]
    for i in range(layers):
        p = f"layers.{i}"
        shapes += [(f"{p}.ln1.weight", (width,)), (f"{p}.ln1.bias", (width,))]
        for proj in ("q", "k", "v", "o"):
            w = f"{p}.attn.{proj}"
            shapes += [(f"{w}.weight", (width, width)), (f"{w}.bias", (width,))]
        shapes += [(f"{p}.ln2.weight", (width,)), (f"{p}.ln2.bias", (width,))]
        shapes += [(f"{p}.mlp.fc1.weight", (mlp, width)), (f"{p}.mlp.fc1.bias", (mlp,))]
        shapes += [(f"{p}.mlp.fc2.weight", (width, mlp)), (f"{p}.mlp.fc2.bias", (width,))]
    shapes += [("ln_f.weight", (width,)), ("ln_f.bias", (width,))]
    return shapes


def tiny2000_shapes() -> list[tuple[str, Shape]]:
    """2,000 tensors of 64 elements."""
    return [(f"t{i}", (64,)) for i in range(2000)]


SHAPES: dict[str, Callable[[], list[tuple[str, Shape]]]] = {
    "resnet50": resnet50_shapes,
    "transformer70m": transformer70m_shapes,
    "tiny2000": tiny2000_shapes,
}


@dataclass(frozen=True)
class Workload:
    """A named list of float32 tensors and its size."""

    name: str
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def _init(name: str, shape: Shape, gen: torch.Generator) -> torch.Tensor:
    """Seeded values with per-tensor scopes like a network's: fan-in scaled weights, small
    biases, norm weights (the 1-D ``*.weight`` tensors) near one; no tensor is constant."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if len(shape) > 1:
        return x.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
    if name.endswith(".weight"):
        return x.mul_(0.02).add_(1.0)
    return x.mul_(0.02)


@functools.cache
def load_workload(name: str, device: str = "cpu") -> Workload:
    """The workload `name` on `device` (built once per process, seeded)."""
    if device != "cpu":
        cpu = load_workload(name, "cpu")
        return Workload(name, cpu.names, tuple(t.to(device) for t in cpu.tensors))
    gen = torch.Generator().manual_seed(SEED)
    named = SHAPES[name]()
    return Workload(name, tuple(n for n, _ in named), tuple(_init(n, s, gen) for n, s in named))


def devices() -> list[str]:
    """Devices to benchmark on: the CPU, plus CUDA when a GPU is present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fastmerge_backends(device: str) -> list[str]:
    """fastmerge backends worth timing on `device`: usable ones except the slow reference,
    and never Triton on the CPU (that is the interpreter)."""
    usable = fastmerge.backends.usable_backends(torch.device(device))
    return [b for b in usable if b != "reference" and not (b == "triton" and device == "cpu")]


def machine_description() -> dict[str, Any]:
    """CPU model, core count, threads and library versions of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    desc: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastmerge": fastmerge.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return desc


def label(benchmark: Any, op: str, workload: Workload, device: str, provider: str) -> None:
    """Name the benchmark's group (``<op>-<workload>[-<device>]``) and record the columns
    that the report needs in its extra_info."""
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


def run_benchmark(
    benchmark: Any, fn: Callable[[], object], device: str, min_rounds: int = MIN_ROUNDS
) -> object:
    """Time `fn` with pytest-benchmark: warm up, then as many rounds (one call each) as fit
    in BUDGET_S, at least `min_rounds` and at most MAX_ROUNDS. CUDA work is synchronized."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed() -> object:
        out = fn()
        sync()
        return out

    timed()  # warm-up: allocator, thread pool, lazy imports, kernel compilation
    start = time.perf_counter()
    timed()
    once = max(time.perf_counter() - start, 1e-9)
    rounds = int(min(MAX_ROUNDS, max(min_rounds, BUDGET_S / once)))
    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="session")
def machine() -> dict[str, Any]:
    """The machine description (also stored in the JSON under machine_info["fastmerge"])."""
    return machine_description()


def pytest_benchmark_update_machine_info(config: Any, machine_info: dict[str, Any]) -> None:
    """Add fastmerge's machine description to pytest-benchmark's JSON output."""
    machine_info["fastmerge"] = machine_description()


if __name__ == "__main__":
    for wl in WORKLOADS:
        named = SHAPES[wl]()
        total = sum(math.prod(s) for _, s in named)
        print(f"{wl}: {len(named)} tensors, {total:,} elements")
