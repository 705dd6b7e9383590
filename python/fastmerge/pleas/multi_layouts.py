"""The N-model partial layout ``[merged | only-0 | ... | only-(N-1)]`` of one group.

:func:`multi_layout` turns a :class:`~fastmerge.pleas.MultiMatch` (N models aligned to a
common order) and a ratio ``r`` into a :class:`MultiLayout`: the best-aligned ``d - k``
positions are merged across all N models and ``k = r d`` units are kept from every model,
width ``d + (N - 1) k``. For N = 2 it is :func:`~fastmerge.pleas.partial_layout`'s
``[merged | only-A | only-B]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .groups import PermutationSpec
from .matching import _check_ratio, kept_units
from .multi_matching import MultiMatch

__all__ = ["MultiLayout", "identity_multi_layouts", "multi_layout"]


@dataclass(frozen=True)
class MultiLayout:
    """One group's partial merge of N models: ``width = n_merged + N * n_kept`` units
    ordered ``[merged | only-0 | only-1 | ... | only-(N-1)]``.

    * ``merged``: (N, size - n_kept), ``merged[i, c]`` is model i's unit in merged unit c
      (the reference's row ascending; ``merged[i] = perms[i][merged positions]``);
    * ``only``: (N, n_kept), the units kept from model i alone, ascending.

    For N = 2 the rows are :class:`~fastmerge.pleas.PartialLayout`'s ``merged_a``,
    ``merged_b`` and ``only_a``, ``only_b``.

    Example:
        >>> lay = fastmerge.pleas.MultiLayout(
        ...     "g", 3, torch.tensor([[0, 2], [1, 0], [2, 1]]), torch.tensor([[1], [2], [0]]))
        >>> lay.n_models, lay.width, lay.n_kept, lay.ratio
        (3, 5, 1, 0.3333333333333333)
    """

    name: str
    size: int
    merged: torch.Tensor
    only: torch.Tensor

    @property
    def n_models(self) -> int:
        """Number of models N."""
        return int(self.merged.shape[0])

    @property
    def n_merged(self) -> int:
        """Number of merged units (each averages one unit of every model)."""
        return int(self.merged.shape[1])

    @property
    def n_kept(self) -> int:
        """Number of units kept from each model separately."""
        return int(self.only.shape[1])

    @property
    def width(self) -> int:
        """Merged width ``n_merged + N * n_kept = size + (N - 1) * n_kept``."""
        return self.n_merged + self.n_models * self.n_kept

    @property
    def ratio(self) -> float:
        """The realized ratio ``n_kept / size``."""
        return self.n_kept / self.size if self.size else 0.0


def multi_layout(match: MultiMatch, ratio: float) -> MultiLayout:
    """Partial merge of one group at ``ratio`` r: the best-aligned ``round((1 - r) d)``
    positions are merged across all N models, the other ``k`` are kept from every model
    (width ``d + (N - 1) k``). Rounding as :func:`~fastmerge.pleas.partial_layout`.

    Example:
        >>> m = fastmerge.pleas.MultiMatch(
        ...     "g", 3, torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0]]),
        ...     torch.tensor([-0.1, -0.9, -0.2], dtype=torch.float64),
        ...     torch.zeros(3, dtype=torch.float64), torch.tensor([0, 2, 1]))
        >>> lay = fastmerge.pleas.multi_layout(m, 1 / 3)
        >>> lay.merged.tolist(), lay.only.tolist(), lay.width
        ([[0, 2], [2, 1], [1, 0]], [[1], [0], [2]], 5)
    """
    if not isinstance(match, MultiMatch):
        raise TypeError(f"match must be a MultiMatch, got {type(match).__name__}")
    r = _check_ratio(ratio)
    d = match.size
    k = kept_units(d, r)
    order = match.order.to(torch.long).cpu()
    perms = match.perms.to(torch.long).cpu()
    merged_pos = torch.sort(order[: d - k]).values
    kept_pos = order[d - k :]
    return MultiLayout(
        name=match.name,
        size=d,
        merged=perms[:, merged_pos],
        only=torch.sort(perms[:, kept_pos], dim=1).values,
    )


def identity_multi_layouts(spec: PermutationSpec, n_models: int) -> dict[str, MultiLayout]:
    """Every group fully merged with the identity alignment (unit j of every model together).

    Example:
        >>> from torch import nn
        >>> from fastmerge.pleas.multi_layouts import identity_multi_layouts
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> spec = fastmerge.pleas.permutation_groups(model, torch.randn(2, 4))
        >>> identity_multi_layouts(spec, 3)["0"].merged.tolist()
        [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    """
    return {
        name: MultiLayout(
            name,
            g.size,
            torch.arange(g.size).repeat(n_models, 1),
            torch.zeros(n_models, 0, dtype=torch.long),
        )
        for name, g in spec.groups.items()
    }
