"""scope_stats (per-tensor mean and population std of a tensor list) against its peers.

One group per workload and device, ``scope_stats-<workload>`` (``-cuda`` appended on a GPU):

* ``fastmerge-<backend>``: ``fastmerge.scope_stats`` with each usable fast backend;
* ``torch.std_mean-loop``: ``torch.std_mean(t, unbiased=False)`` for each tensor;
* ``torch._foreach_norm``: one norm per tensor, a fused multi-tensor kernel;
* ``torch.sum-flat``: one ``torch.sum`` over a pre-flattened tensor of the same size,
  the memory-bandwidth yardstick.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from conftest import WORKLOADS, devices, fastmerge_backends, label, load_workload, run_benchmark

import fastmerge

TORCH_PEERS = ("torch.std_mean-loop", "torch._foreach_norm", "torch.sum-flat")


def _peer(provider: str, tensors: list[torch.Tensor]) -> Callable[[], object]:
    """The function timed for `provider` (any flattening happens here, untimed)."""
    if provider.startswith("fastmerge-"):
        backend = provider.removeprefix("fastmerge-")
        return lambda: fastmerge.scope_stats(tensors, backend=backend)
    if provider == "torch.std_mean-loop":
        return lambda: [torch.std_mean(t, unbiased=False) for t in tensors]
    if provider == "torch._foreach_norm":
        return lambda: torch._foreach_norm(tensors)
    if provider == "torch.sum-flat":
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return lambda: torch.sum(flat)
    raise ValueError(provider)


CASES = [
    pytest.param(wl, dev, prov, id=f"{wl}-{dev}-{prov}")
    for dev in devices()
    for wl in WORKLOADS
    for prov in [f"fastmerge-{b}" for b in fastmerge_backends(dev)] + list(TORCH_PEERS)
]


@pytest.mark.parametrize(("workload", "device", "provider"), CASES)
def bench_scope_stats(benchmark: Any, workload: str, device: str, provider: str) -> None:
    wl = load_workload(workload, device)
    label(benchmark, "scope_stats", wl, device, provider)
    run_benchmark(benchmark, _peer(provider, list(wl.tensors)), device)
