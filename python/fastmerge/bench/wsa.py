"""wsa: the WSA penalty's forward and backward vs autograd through a per-layer loop.

Group: the workload (``transformer70m``; ``--quick``: ``tiny2000``). Providers:
``fastmerge-<backend>``: ``torch.autograd.grad(fastmerge.wsa_penalty(params, (0, 0.02)),
params)``; ``autograd-loop``: the same KL penalty written per layer with
``torch.std_mean`` and differentiated by autograd.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from fastmerge.wsa import wsa_penalty

from . import _workloads
from ._suite import Case, fastmerge_backends

TARGET = (0.0, 0.02)
MIN_ROUNDS = 25  # each round allocates the gradients: timings spread on a busy CPU


def kl_loop(params: list[torch.Tensor], target: tuple[float, float]) -> torch.Tensor:
    """Sum over layers of KL(N(m, s^2) || N(mt, st^2)) in plain differentiable torch.

    Example:
        >>> p = [torch.tensor([0.0, 0.04], requires_grad=True)]
        >>> round(kl_loop(p, (0.02, 0.02)).item(), 6)
        0.0
    """
    mt, st = target
    terms = []
    for w in params:
        std, mean = torch.std_mean(w, unbiased=False)
        terms.append(
            math.log(st) - torch.log(std) + (std**2 + (mean - mt) ** 2) / (2 * st**2) - 0.5
        )
    return torch.stack(terms).sum()


def _setup(provider: str, workload: str, device: str) -> Callable[[], Callable[[], Any]]:
    def setup() -> Callable[[], Any]:
        params = [
            t.detach().clone().requires_grad_(True) for t in _workloads.tensors(workload, device)
        ]
        if provider == "autograd-loop":
            return lambda: torch.autograd.grad(kl_loop(params, TARGET), params)
        backend = provider.removeprefix("fastmerge-")
        return lambda: torch.autograd.grad(wsa_penalty(params, TARGET, backend=backend), params)

    return setup


def cases(device: str, quick: bool) -> list[Case]:
    """fastmerge's backends, then the autograd loop.

    Example:
        >>> cases("cpu", True)[-1].provider
        'autograd-loop'
    """
    wl = "tiny2000" if quick else "transformer70m"
    ours = [f"fastmerge-{b}" for b in fastmerge_backends(device)]
    return [
        Case(wl, p, _setup(p, wl, device), ours=p in ours, min_rounds=None if quick else MIN_ROUNDS)
        for p in ours + ["autograd-loop"]
    ]
