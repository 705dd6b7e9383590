"""Mergeable sufficient statistics.

A statistic computed on parts of the data (batches, threads, ranks, shards of a
tensor) merges exactly into the statistic of the whole, so streaming and
distributed collection are one mechanism: ``a.merge(b)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import dist

#: The kind code that fastmerge.dist compares across the ranks before a reduction.
_REDUCTION_KIND = dist.kind_code("ScopeStats")


@dataclass(frozen=True)
class ScopeStats:
    """Weight scope of a list of tensors: per-tensor mean, population std and count.

    All three are 1-D float64 tensors with one entry per input tensor. An empty
    tensor has count 0 and NaN mean and std. ``names`` optionally labels the entries
    (parameter names when built by :func:`fastmerge.wsa.scope_of`).

    Example:
        >>> import torch, fastmerge
        >>> s = fastmerge.scope_stats([torch.ones(3), torch.arange(4.0)])
        >>> s.mean.tolist(), s.std.tolist()
        ([1.0, 1.5], [0.0, 1.118033988749895])
    """

    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor
    names: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        shape = self.mean.shape
        if len(shape) != 1 or self.std.shape != shape or self.count.shape != shape:
            raise ValueError(
                "ScopeStats.mean, .std and .count must be 1-D tensors of one length, got shapes "
                f"{tuple(self.mean.shape)}, {tuple(self.std.shape)}, {tuple(self.count.shape)}"
            )
        if self.names is not None and len(self.names) != self.mean.shape[0]:
            raise ValueError(
                f"ScopeStats.names has {len(self.names)} entries for {self.mean.shape[0]} tensors"
            )

    @classmethod
    def _of_rows(cls, mean: torch.Tensor, std: torch.Tensor, count: torch.Tensor) -> ScopeStats:
        """From the rows of a (3, n) table that scope_stats made: skips the shape checks of
        ``__init__``, which cost as much as the rest of a small call."""
        stats = object.__new__(cls)
        stats.__dict__.update(mean=mean, std=std, count=count, names=None)
        return stats

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    @property
    def var(self) -> torch.Tensor:
        """Population variance, ``std ** 2``."""
        return self.std * self.std

    @classmethod
    def from_values(
        cls,
        mean: torch.Tensor | list[float] | float,
        std: torch.Tensor | list[float] | float,
        count: torch.Tensor | list[float] | float | None = None,
        names: Optional[tuple[str, ...]] = None,
    ) -> ScopeStats:
        """Build scope statistics from plain numbers, e.g. a hand-picked target.

        Example:
            >>> fastmerge.ScopeStats.from_values([0.0, 0.0], [0.02, 0.05]).std.tolist()
            [0.02, 0.05]
        """
        mean_t = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float64, device=mean_t.device).reshape(-1)
        mean_t, std_t = torch.broadcast_tensors(mean_t, std_t)
        if count is None:
            count_t = torch.ones_like(mean_t)
        else:
            count_t = torch.as_tensor(count, dtype=torch.float64, device=mean_t.device)
            count_t = count_t.reshape(-1).expand_as(mean_t)
        return cls(mean_t.clone(), std_t.clone(), count_t.clone(), names)

    def to(self, device: torch.device | str) -> ScopeStats:
        """The same statistics on another device."""
        return ScopeStats(
            self.mean.to(device), self.std.to(device), self.count.to(device), self.names
        )

    def merge(self, other: ScopeStats) -> ScopeStats:
        """Statistics of the union of the data behind `self` and `other`.

        Entry i of the result describes the elements of entry i of both (e.g. two
        shards of the same tensor). Exact up to rounding (Chan et al.'s update).

        Example:
            >>> x = torch.randn(1000, dtype=torch.float64)
            >>> a, b = fastmerge.scope_stats([x[:300]]), fastmerge.scope_stats([x[300:]])
            >>> torch.allclose(a.merge(b).std, x.std(unbiased=False).reshape(1))
            True
        """
        if len(self) != len(other):
            raise ValueError(f"cannot merge ScopeStats of {len(self)} and {len(other)} entries")
        if self.names is not None and other.names is not None and self.names != other.names:
            raise ValueError("cannot merge ScopeStats whose names differ")
        other = other.to(self.mean.device)
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        frac_b = torch.where(n > 0, n_b / n.clamp_min(1), torch.zeros_like(n))
        delta = other.mean - self.mean
        m2 = self.var * n_a + other.var * n_b + delta * delta * n_a * frac_b
        mean = self.mean + delta * frac_b
        var = m2 / n.clamp_min(1)
        # An empty side contributes nothing (its NaN statistics must not leak in).
        mean = torch.where(n_a == 0, other.mean, torch.where(n_b == 0, self.mean, mean))
        var = torch.where(n_a == 0, other.var, torch.where(n_b == 0, self.var, var))
        return ScopeStats(mean, var.clamp_min(0).sqrt(), n, self.names or other.names)

    def all_reduce(self, group: Any = None) -> ScopeStats:
        """The statistics of the union of every rank's data (e.g. each rank holds a shard of
        the same tensors), the same on every rank: every rank's statistics Chan-merged in
        rank order. ScopeStats is immutable, so this returns a new object. A collective:
        every rank calls it (see :func:`fastmerge.dist.all_reduce_`).

        Example:
            >>> import os, tempfile
            >>> import torch.distributed as tdist
            >>> rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
            >>> tdist.init_process_group("gloo", init_method=f"file://{rendezvous}",
            ...                          rank=0, world_size=1)
            >>> fastmerge.scope_stats([torch.arange(4.0)]).all_reduce().mean.tolist()
            [1.5]
            >>> tdist.destroy_process_group()
        """
        return dist.all_reduce_(self, group)

    def _all_reduce(self, group: Any) -> ScopeStats:
        """fastmerge.dist.Reducible: gather every rank's (mean, std, count) and Chan-merge
        them in rank order, so the result is exactly ``s_0.merge(s_1).merge(...)``."""
        rows = dist.describe_ranks(_REDUCTION_KIND, [len(self)], group)
        lengths = [int(row[1]) for row in rows]
        if len(set(lengths)) > 1:
            raise ValueError(
                "cannot all-reduce ScopeStats with different numbers of entries on the ranks: "
                f"{lengths} (by rank)"
            )
        device = self.mean.device
        local = torch.stack([self.mean, self.std, self.count]).to(torch.float64)
        merged: Optional[ScopeStats] = None
        for part in dist.gather_tensor(local, group):
            part = part.to(device)
            rank_stats = ScopeStats(part[0], part[1], part[2], self.names)
            merged = rank_stats if merged is None else merged.merge(rank_stats)
        assert merged is not None
        return merged
