"""TIES merging (trim, elect sign, disjoint mean) over state dicts.

Per tensor and per expert t, τ_t = θ_t - base is trimmed to its k = ceil(density · n)
largest magnitudes; every entry's sign is elected as the sign of Σ_t trimmed τ_t; the
trimmed entries that agree with it are averaged (0 where none agree, or where the sum
is 0), and the result is ``base + scale · mean``.

Ties at the threshold: every entry with ``|τ_t| >= h_t``, h_t the k-th largest
magnitude, is kept, so a few more than k entries survive when magnitudes tie exactly at
h_t. The threshold is an exact selection (:func:`fastmerge.ops.magnitude_threshold`, a
histogram selection, no sort) and the combine is one fused pass
(:func:`fastmerge.ops.ties_combine`); the result is bit-for-bit that of a per-tensor
``torch.kthvalue`` implementation with the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch

from .. import ops
from ._select import Patterns, StateDict, merge_selected


def keep_count(density: float, n: int) -> int:
    """How many entries of an n-entry tensor TIES keeps: ``ceil(density · n)``, with a
    relative tolerance of 1e-9 so that decimal densities round as written (0.3 · 10 is
    3, not 4); at least 1 for a non-empty tensor.

    Example:
        >>> from fastmerge.merge import keep_count
        >>> keep_count(0.3, 10), keep_count(0.2, 7), keep_count(1.0, 5), keep_count(1e-9, 5)
        (3, 2, 5, 1)
    """
    if n <= 0:
        return 0
    exact = float(density) * n
    return min(n, max(1, math.ceil(exact - 1e-9 * exact)))


def check_density(density: float) -> float:
    """`density` as a float in (0, 1], else ValueError."""
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return density


def ties(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    density: float = 0.2,
    scale: float = 1.0,
    include: Patterns = None,
    exclude: Patterns = None,
    backend: Optional[str] = None,
) -> dict[str, torch.Tensor]:
    """TIES-merge experts fine-tuned from `base`.

    Args:
        base: the pre-trained state dict (name -> tensor; may be a lazy mapping: every
            key is read once from every model).
        experts: one or more fine-tuned state dicts with the base's keys and shapes.
        density: fraction of each task vector's entries kept per tensor, in (0, 1].
        scale: factor λ of the merged task vector.
        include, exclude: regex or list of regexes selecting the keys to merge
            (``re.search``); other keys and non-floating tensors are copied from the base.
        backend: backend of the two kernels (default: the fastest usable one).

    Returns:
        A new state dict in the base's dtypes (computed in float32, float64 for float64).

    Raises:
        ValueError: no experts, density outside (0, 1], or an expert whose keys or
            shapes differ from the base's (the message names the key and the expert).

    Example:
        >>> import torch
        >>> from fastmerge.merge import ties
        >>> base = {"w": torch.zeros(4), "steps": torch.tensor(7)}
        >>> experts = [{"w": torch.tensor([3.0, -1.0, 0.5, 2.0]), "steps": torch.tensor(9)},
        ...            {"w": torch.tensor([1.0, 2.0, -4.0, -0.1]), "steps": torch.tensor(9)}]
        >>> merged = ties(base, experts, density=0.5)
        >>> merged["w"].tolist(), merged["steps"].item()
        ([3.0, 2.0, -4.0, 2.0], 7)
    """
    density = check_density(density)

    def merge_key(key: str, b: torch.Tensor, tensors: list) -> torch.Tensor:
        tensors = [t.to(b.device) for t in tensors]
        thresholds = ops.magnitude_threshold(b, tensors, keep_count(density, b.numel()),
                                             backend=backend)  # fmt: skip
        return ops.ties_combine(b, tensors, thresholds, scale=scale, backend=backend)

    return merge_selected(base, experts, include, exclude, merge_key)
