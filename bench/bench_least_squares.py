"""LeastSquares (streamed Gram/cross accumulation + ridge solve) against torch.linalg.lstsq.

Workload ``n16384-d1024-k1024``: N = 16,384 samples of d = 1,024 inputs and d_out = 1,024
targets, float32, seeded; the inputs are Gaussian (well conditioned) and the targets a
random linear map of them plus noise. One group per device, ``least_squares-<workload>``
(``-cuda`` appended on a GPU):

* ``fastmerge``: ``LeastSquares(d, d_out, bias=False).update(x, y).solve()`` from scratch
  (float32 GEMMs into float64, upper block triangle of the Gram, float64 Cholesky solve
  with the default ridge 1e-4 * trace / d);
* ``fastmerge-stream16``: the same, fed as 16 batches of 1,024 samples;
* ``torch.linalg.lstsq``: on the stacked float32 data (default driver);
* ``torch.linalg.lstsq-float64``: on the data converted to float64 beforehand (untimed).

Accuracy is checked before timing: every provider's residual ``||X W^T - Y||`` is within
``RESIDUAL_RTOL`` relative of the float64 lstsq residual (the minimum), and the excess is
stored as ``residual_excess`` in the extra info.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch
from conftest import SEED, Workload, devices, label, run_benchmark

import fastmerge

N, D, K = 16384, 1024, 1024
WORKLOAD = f"n{N}-d{D}-k{K}"
RESIDUAL_RTOL = 1e-6
PROVIDERS = (
    "fastmerge",
    "fastmerge-stream16",
    "torch.linalg.lstsq",
    "torch.linalg.lstsq-float64",
)


@functools.cache
def ls_workload(device: str) -> Workload:
    """x: (N, D), y: (N, K) float32; y = x W^T + noise."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(N, D, generator=gen)
    w = torch.randn(K, D, generator=gen) / D**0.5
    y = x @ w.T + 0.3 * torch.randn(N, K, generator=gen)
    return Workload(WORKLOAD, ("x", "y"), (x.to(device), y.to(device)))


@functools.cache
def best_residual(device: str) -> float:
    """||X W^T - Y|| at the float64 least-squares solution."""
    x, y = (t.double() for t in ls_workload(device).tensors)
    return float((x @ torch.linalg.lstsq(x, y).solution - y).norm())


def _peer(provider: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The function timed for `provider` (set-up untimed); it returns B (D, K), Y ~ X B."""
    if provider == "fastmerge":
        return lambda: fastmerge.LeastSquares(D, K, bias=False).update(x, y).solve()[0].T
    if provider == "fastmerge-stream16":

        def streamed() -> torch.Tensor:
            ls = fastmerge.LeastSquares(D, K, bias=False)
            for first in range(0, N, N // 16):
                ls.update(x[first : first + N // 16], y[first : first + N // 16])
            return ls.solve()[0].T

        return streamed
    if provider == "torch.linalg.lstsq":
        return lambda: torch.linalg.lstsq(x, y).solution
    if provider == "torch.linalg.lstsq-float64":
        x64, y64 = x.double(), y.double()
        return lambda: torch.linalg.lstsq(x64, y64).solution
    raise ValueError(provider)


CASES = [pytest.param(dev, prov, id=f"{dev}-{prov}") for dev in devices() for prov in PROVIDERS]


@pytest.mark.parametrize(("device", "provider"), CASES)
def bench_least_squares(benchmark: Any, device: str, provider: str) -> None:
    wl = ls_workload(device)
    label(benchmark, "least_squares", wl, device, provider)
    x, y = wl.tensors
    fn = _peer(provider, x, y)
    b = fn().double()
    excess = float((x.double() @ b - y.double()).norm()) / best_residual(device) - 1
    benchmark.extra_info["residual_excess"] = excess
    assert abs(excess) <= RESIDUAL_RTOL, f"{provider}: residual {excess:.2e} above the minimum"
    # FLOPs of the normal equations' products: X^T X (symmetric: N D^2) + X^T Y (2 N D K).
    benchmark.extra_info["flops"] = N * D * D + 2 * N * D * K
    run_benchmark(benchmark, fn, device, min_rounds=5)
