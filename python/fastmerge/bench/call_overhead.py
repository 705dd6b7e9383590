"""call_overhead: median wall time of one eager call of every op on a tiny input.

What a call costs when the work is nothing: argument checks, backend choice, output
allocation, the trip into the extension. Targets: 5 us for ``linear_assignment`` (8 x 8,
beside ``scipy.optimize.linear_sum_assignment`` on the same matrix) and 10 us for
``scope_stats`` on a two-tensor list and a 16-element TIES merge with ``ties_combine``; one
tiny call of each remaining op is shown beside them, without a target. ``torch.add`` of
two 16-element tensors is the yardstick of torch's own dispatch cost on this machine. The
sizes are the same with ``--quick``; only the rounds differ.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from fastmerge import ops

from ._peers import optional
from ._suite import Case

LINEAR_ASSIGNMENT_TARGET_US = 5.0
TARGET_US = 10.0
#: The calls with a target (us); the other ops' rows are for information.
TARGETS_US = {
    "linear_assignment": LINEAR_ASSIGNMENT_TARGET_US,
    "scope_stats": TARGET_US,
    "ties_combine": TARGET_US,
}


def _vec(seed: int, n: int, device: str) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(device)


def _cost() -> np.ndarray:
    return np.random.default_rng(0).random((8, 8))


def _calls(device: str) -> dict[str, Callable[[], Any]]:
    """op name -> its tiny call; the inputs are built here, outside the timing."""
    a, b, c = (_vec(seed, 16, device) for seed in range(3))
    square, row = a.view(4, 4), _vec(3, 4, device)
    f64 = {"dtype": torch.float64, "device": device}
    cross, zeros, ones = torch.randn(4, 4).to(**f64), torch.zeros(4, **f64), torch.ones(4, **f64)
    one2 = torch.ones(2, **f64)
    cost = torch.from_numpy(_cost()).to(device)
    image, pixels = _vec(4, 9, device).view(1, 1, 3, 3), _vec(5, 8, device).view(1, 2, 2, 2)
    x, eye = _vec(6, 8, device).view(2, 4), torch.eye(4, device=device)
    us, vs = torch.ones(2, 4, 1, device=device), torch.ones(2, 1, 4, device=device)
    gates, thresholds = torch.ones(2, 2, device=device), torch.tensor([0.5, 0.5], device=device)
    return {
        "linear_assignment": lambda: ops.linear_assignment(cost),
        "scope_stats": lambda: ops.scope_stats([square, row]),
        "ties_combine": lambda: ops.ties_combine(a, [b, c], thresholds),
        "magnitude_threshold": lambda: ops.magnitude_threshold(a, [b, c], 4),
        "weighted_sum": lambda: ops.weighted_sum([a, b], [0.5, 0.5]),
        "nearswap": lambda: ops.nearswap(a, b, 0.5),
        "gta_combine": lambda: ops.gta_combine(a, [b, c], [1.0, 1.0]),
        "gram": lambda: ops.gram([a, b]),
        "scope_grad": lambda: ops.scope_grad([square, row], one2, 0 * one2, one2),
        "feature_center": lambda: ops.feature_center(square, row),
        "feature_cost": lambda: ops.feature_cost(
            cross, zeros, zeros, 8 * ones, 8 * ones, zeros, zeros, 8
        ),
        "conv_gram": lambda: ops.conv_gram(image, pixels, 2),
        "lowrank_mixture": lambda: ops.lowrank_mixture(x, eye, None, us, vs, gates),
        "merge_lowrank": lambda: ops.merge_lowrank(eye, us, vs, gates[0]),
        "torch.add": lambda: torch.add(a, b),
    }


def _pick(device: str, name: str) -> Callable[[], Callable[[], Any]]:
    return lambda: _calls(device)[name]


def _scipy(solve: Callable[[np.ndarray], Any]) -> Callable[[], Callable[[], Any]]:
    cost = _cost()
    return lambda: lambda: solve(cost)


def cases(device: str, quick: bool) -> list[Case]:
    """One group per op (provider ``fastmerge``), scipy beside linear_assignment, and the
    torch.add yardstick.

    Example:
        >>> [c.case for c in cases("cpu", True)][:2]
        ['linear_assignment', 'linear_assignment']
    """
    out = []
    for name in _calls(device):
        if name == "torch.add":
            out.append(Case("yardstick", name, _pick(device, name), False, "numel", 16))
            continue
        target = TARGETS_US.get(name)
        out.append(Case(name, "fastmerge", _pick(device, name), True, target_us=target))
        if name == "linear_assignment":
            scipy_optimize = optional("scipy.optimize")
            if scipy_optimize is not None:
                out.append(Case(name, "scipy", _scipy(scipy_optimize.linear_sum_assignment)))
    return out
