"""scope_stats: per-tensor mean and std of a tensor list vs torch loops and a flat sum.

Groups are the workloads (:mod:`fastmerge.bench._workloads`; ``--quick``: ``tiny2000``
only). Providers: ``fastmerge-<backend>`` (each usable fast backend);
``torch.std_mean-loop`` (``torch.std_mean(t, unbiased=False)`` per tensor);
``torch._foreach_norm`` (one fused multi-tensor norm); ``torch.sum-flat`` (one sum over a
pre-flattened tensor of the same size: the memory-bandwidth yardstick).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fastmerge.ops import scope_stats

from . import _workloads
from ._suite import Case, fastmerge_backends

WORKLOADS = ("resnet50", "transformer70m", "tiny2000")
QUICK_WORKLOADS = ("tiny2000",)
TORCH_PEERS = ("torch.std_mean-loop", "torch._foreach_norm", "torch.sum-flat")


def _setup(provider: str, workload: str, device: str) -> Callable[[], Callable[[], Any]]:
    def setup() -> Callable[[], Any]:
        ts = list(_workloads.tensors(workload, device))
        if provider.startswith("fastmerge-"):
            backend = provider.removeprefix("fastmerge-")
            return lambda: scope_stats(ts, backend=backend)
        if provider == "torch.std_mean-loop":
            return lambda: [torch.std_mean(t, unbiased=False) for t in ts]
        if provider == "torch._foreach_norm":
            return lambda: torch._foreach_norm(ts)
        flat = torch.cat([t.reshape(-1) for t in ts])  # flattening is not timed
        return lambda: torch.sum(flat)

    return setup


def cases(device: str, quick: bool) -> list[Case]:
    """One group per workload: fastmerge's backends, then the torch peers.

    Example:
        >>> [c.provider for c in cases("cpu", True)][-1]
        'torch.sum-flat'
    """
    ours = [f"fastmerge-{b}" for b in fastmerge_backends(device)]
    return [
        Case(wl, p, _setup(p, wl, device), ours=p in ours, x_name="workload", x_value=wl)
        for wl in (QUICK_WORKLOADS if quick else WORKLOADS)
        for p in ours + list(TORCH_PEERS)
    ]
