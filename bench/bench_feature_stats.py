"""FeatureStats (streamed feature statistics -> correlation matrix) against its peers.

Workload ``n16384-d1024``: N = 16,384 samples of d = 1,024 units per model, float32,
seeded; model b's units are noisy mixtures of model a's. One group per device,
``feature_stats-n16384-d1024`` (``-cuda`` appended on a GPU):

* ``fastmerge-<backend>``: ``FeatureStats().update(xa, xb).correlation()``, the (d, d)
  cross-correlation from scratch (shifts, fused centring pass, GEMM, fused epilogue);
* ``fastmerge-<backend>-stream16``: the same, fed as 16 batches of 1,024 samples;
* ``fastmerge-<backend>-full``: ``FeatureStats(full=True)``, the (2d, 2d) correlation of
  the concatenated units (what ``torch.corrcoef`` gives);
* ``torch.matmul``: a plain float32 (d x N) @ (N x d) product, the FLOP-rate yardstick;
* ``torch.corrcoef-concat``: ``torch.corrcoef`` of the concatenated (2d x N) features,
  concatenated and transposed beforehand (untimed), as ZipIt/PLeaS code does it.

``flops`` in the extra info is 2 * rows * cols * N for a (rows, cols) output: the FLOPs of
the one matrix product the output stands for.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch
from conftest import SEED, Workload, devices, fastmerge_backends, label, run_benchmark

import fastmerge

N, D = 16384, 1024
WORKLOAD = f"n{N}-d{D}"
TORCH_PEERS = ("torch.matmul", "torch.corrcoef-concat")


@functools.cache
def feature_workload(device: str) -> Workload:
    """xa, xb: (N, D) float32; b's units mix a's units (permuted) with noise."""
    gen = torch.Generator().manual_seed(SEED)
    xa = torch.randn(N, D, generator=gen) * 0.5 + 1.0
    mix = torch.randn(N, D, generator=gen)
    xb = 0.8 * xa[:, torch.randperm(D, generator=gen)] + 0.6 * mix - 0.5
    return Workload(WORKLOAD, ("xa", "xb"), (xa.to(device), xb.to(device)))


def _peer(provider: str, xa: torch.Tensor, xb: torch.Tensor) -> tuple[Callable[[], object], int]:
    """The function timed for `provider` (set-up untimed) and its output size rows * cols."""
    if provider.startswith("fastmerge-"):
        backend, _, variant = provider.removeprefix("fastmerge-").partition("-")
        if variant == "full":
            return (
                lambda: (
                    fastmerge.FeatureStats(full=True, backend=backend).update(xa, xb).correlation()
                ),
                (2 * D) ** 2,
            )
        if variant == "stream16":

            def streamed() -> torch.Tensor:
                stats = fastmerge.FeatureStats(backend=backend)
                for first in range(0, N, N // 16):
                    stats.update(xa[first : first + N // 16], xb[first : first + N // 16])
                return stats.correlation()

            return streamed, D * D
        return lambda: fastmerge.FeatureStats(backend=backend).update(xa, xb).correlation(), D * D
    if provider == "torch.matmul":
        at = xa.T.contiguous()
        return lambda: torch.matmul(at, xb), D * D
    if provider == "torch.corrcoef-concat":
        features = torch.cat([xa, xb], dim=1).T.contiguous()
        return lambda: torch.corrcoef(features), (2 * D) ** 2
    raise ValueError(provider)


CASES = [
    pytest.param(dev, prov, id=f"{dev}-{prov}")
    for dev in devices()
    for prov in [
        f"fastmerge-{b}{variant}"
        for b in fastmerge_backends(dev)
        for variant in ("", "-stream16", "-full")
    ]
    + list(TORCH_PEERS)
]


@pytest.mark.parametrize(("device", "provider"), CASES)
def bench_feature_stats(benchmark: Any, device: str, provider: str) -> None:
    wl = feature_workload(device)
    label(benchmark, "feature_stats", wl, device, provider)
    fn, outputs = _peer(provider, *wl.tensors)
    benchmark.extra_info["flops"] = 2 * outputs * N
    run_benchmark(benchmark, fn, device)
