"""Closed-form divergences between a layer's scope N(m, s^2) and a target N(mt, st^2).

Each function returns (value, d value / d m, d value / d s) elementwise, so the
penalty's backward needs no autograd graph through the statistics.
"""

from __future__ import annotations

from typing import Callable

import torch

Divergence = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor],
]


def kl(m: torch.Tensor, s: torch.Tensor, mt: torch.Tensor, st: torch.Tensor):
    """KL(N(m, s^2) || N(mt, st^2)) = log(st/s) + (s^2 + (m - mt)^2) / (2 st^2) - 1/2."""
    diff = m - mt
    value = torch.log(st / s) + (s * s + diff * diff) / (2 * st * st) - 0.5
    return value, diff / (st * st), -1.0 / s + s / (st * st)


def reverse_kl(m: torch.Tensor, s: torch.Tensor, mt: torch.Tensor, st: torch.Tensor):
    """KL(N(mt, st^2) || N(m, s^2)) = log(s/st) + (st^2 + (m - mt)^2) / (2 s^2) - 1/2."""
    diff = m - mt
    spread = st * st + diff * diff
    value = torch.log(s / st) + spread / (2 * s * s) - 0.5
    return value, diff / (s * s), 1.0 / s - spread / (s * s * s)


def wasserstein(m: torch.Tensor, s: torch.Tensor, mt: torch.Tensor, st: torch.Tensor):
    """Squared 2-Wasserstein distance of two Gaussians: (m - mt)^2 + (s - st)^2."""
    dm, ds = m - mt, s - st
    return dm * dm + ds * ds, 2 * dm, 2 * ds


DIVERGENCES: dict[str, Divergence] = {"kl": kl, "reverse_kl": reverse_kl, "w2": wasserstein}
