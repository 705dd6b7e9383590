"""The WSA penalty, forward and backward, against plain autograd.

Group ``wsa_penalty-transformer70m`` (``-cuda`` appended on a GPU):

* ``fastmerge-<backend>``: ``fastmerge.wsa_penalty(params, (0.0, 0.02))`` (KL, summed over
  layers) and its gradient with respect to every parameter;
* ``autograd-loop``: the same penalty written as a loop over layers,
  ``std, mean = torch.std_mean(w, unbiased=False)`` then
  ``KL = log(st / s) + (s^2 + (m - mt)^2) / (2 st^2) - 1/2``, differentiated by autograd.

Gradients come from ``torch.autograd.grad``, so nothing accumulates between rounds.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
from conftest import devices, fastmerge_backends, label, load_workload, run_benchmark

import fastmerge

WORKLOAD = "transformer70m"
TARGET = (0.0, 0.02)
MIN_ROUNDS = 25  # each round allocates 290 MB of gradients: timings spread widely on a busy CPU


def kl_loop(params: list[torch.Tensor], target: tuple[float, float]) -> torch.Tensor:
    """Sum over layers of KL(N(m, s^2) || N(mt, st^2)), in plain differentiable torch."""
    mt, st = target
    terms = []
    for w in params:
        std, mean = torch.std_mean(w, unbiased=False)
        kl = math.log(st) - torch.log(std) + (std**2 + (mean - mt) ** 2) / (2 * st**2) - 0.5
        terms.append(kl)
    return torch.stack(terms).sum()


def _peer(provider: str, params: list[torch.Tensor]) -> Callable[[], object]:
    """Forward and backward for `provider`."""
    if provider == "autograd-loop":
        return lambda: torch.autograd.grad(kl_loop(params, TARGET), params)
    backend = provider.removeprefix("fastmerge-")
    return lambda: torch.autograd.grad(
        fastmerge.wsa_penalty(params, TARGET, backend=backend), params
    )


CASES = [
    pytest.param(dev, prov, id=f"{WORKLOAD}-{dev}-{prov}")
    for dev in devices()
    for prov in [f"fastmerge-{b}" for b in fastmerge_backends(dev)] + ["autograd-loop"]
]


@pytest.mark.parametrize(("device", "provider"), CASES)
def bench_wsa_penalty(benchmark: Any, device: str, provider: str) -> None:
    wl = load_workload(WORKLOAD, device)
    params = [t.detach().clone().requires_grad_(True) for t in wl.tensors]
    # Untimed sanity check: both peers compute the same penalty (float64 vs float32 sums).
    loop_value = kl_loop(params, TARGET).item()
    fm_value = fastmerge.wsa_penalty(params, TARGET).item()
    assert math.isclose(loop_value, fm_value, rel_tol=1e-4), (loop_value, fm_value)
    label(benchmark, "wsa_penalty", wl, device, provider)
    run_benchmark(benchmark, _peer(provider, params), device, min_rounds=MIN_ROUNDS)
