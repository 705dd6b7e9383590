"""What a suite module provides, and helpers the suites share.

A suite is a module of :mod:`fastmerge.bench` with a docstring (its first line is the
``--list`` summary) and a function ``cases(device: str, quick: bool) -> list[Case]``.
Each :class:`Case` names its group (``case``), its ``provider`` and a ``setup`` that builds
the inputs (untimed) and returns the callable to time. The runner times every case and
adds the ratio column: each row's median over the median of the group's first
``ours=True`` row (so a peer's ratio is fastmerge's speed-up over it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from fastmerge import backends


@dataclass(frozen=True)
class Case:
    """One timed provider of one group.

    Args:
        case: the group, e.g. ``"resnet50"`` or ``"uniform-1024"``; rows of a group are
            compared with each other.
        provider: e.g. ``"fastmerge-cpu"`` or ``"scipy"``.
        setup: builds the inputs (untimed) and returns the function to time.
        ours: a fastmerge provider (the group's first one is the ratio's reference).
        x_name, x_value: the size the group varies (``"n"``, 1024), for plots.
        min_rounds: fewer (or more) rounds than the budget's minimum, for slow cases.
        warmup: False for cases that take minutes a call (no warm-up call).
        scale: the measured time is multiplied by this, e.g. 4.0 for a peer timed on a
            quarter of the batch (its time is linear in it).
        target_us: the time the call should take at most (``call_overhead``), or None.

    Example:
        >>> Case("tiny", "fastmerge-cpu", lambda: (lambda: None), ours=True).provider
        'fastmerge-cpu'
    """

    case: str
    provider: str
    setup: Callable[[], Callable[[], Any]]
    ours: bool = False
    x_name: str = ""
    x_value: Any = None
    min_rounds: Optional[int] = None
    warmup: bool = True
    scale: float = 1.0
    target_us: Optional[float] = None


def devices_for(device: str) -> str:
    """`device` checked: ``"cpu"`` or ``"cuda"`` (a GPU must be present for the latter).

    Example:
        >>> devices_for("cpu")
        'cpu'
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    return device


def fastmerge_backends(device: str) -> list[str]:
    """fastmerge backends worth timing on `device`: the usable ones except the slow
    reference, and never Triton on the CPU (that is its interpreter).

    Example:
        >>> "cpu" in fastmerge_backends("cpu")
        True
    """
    usable = backends.usable_backends(torch.device(device))
    return [b for b in usable if b != "reference" and not (b == "triton" and device == "cpu")]
