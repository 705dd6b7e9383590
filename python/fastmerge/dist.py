"""torch.distributed reductions of fastmerge's mergeable accumulators.

Every accumulator of sufficient statistics merges exactly (``a.merge(b)``), so splitting
the data across the ranks of a torch.distributed process group (gloo on CPU, NCCL on
GPU; launched with ``torchrun``) is the same mechanism as streaming over batches: each
rank feeds its own shard, then :func:`all_reduce_` sums the partials so that every rank
holds the statistics of all the data, identical on every rank.

* :class:`~fastmerge.ScopeStats`: the (mean, std, count) triples of all ranks are
  gathered and Chan-merged in rank order (one ``all_gather``), so the result is exactly
  ``s_0.merge(s_1).merge(...)``.
* :class:`~fastmerge.FeatureStats`: its sums are shifted by per-unit shifts that differ
  per rank, so the lowest rank holding samples broadcasts its shifts, every rank
  re-expresses its sums around them (the same exact algebra as
  :meth:`~fastmerge.FeatureStats.merge`) and one flattened float64 ``all_reduce`` sums
  the counts, moments and cross-product (or Gram) blocks.
* :class:`~fastmerge.LeastSquares`: pending float32 sums are flushed, then one flattened
  float64 ``all_reduce`` sums ``X^T X``, ``X^T Y`` and the column sums.

Before any of that, one small ``all_gather`` compares what each rank holds (kind, sizes,
counts), so that mismatched accumulators raise the same ``ValueError`` on every rank
instead of hanging in a collective. Ranks without samples take part with empty statistics.

This module is the lower layer: it imports none of the accumulators. Each accumulator
implements the :class:`Reducible` protocol, one ``_all_reduce(group)`` method that
knows its own algebra (what to compare, which tensors to sum or gather, how to rebuild)
and runs it on the generic collectives below (:func:`describe_ranks`,
:func:`sum_tensors`, :func:`gather_tensor`, :func:`broadcast_tensor`); its public
``.all_reduce()`` and :func:`all_reduce_` both end there.

The PLeaS functions that stream data (:func:`fastmerge.pleas.collect_features`,
:func:`~fastmerge.pleas.match`, :func:`~fastmerge.pleas.solve_least_squares`,
:func:`~fastmerge.pleas.recompute_batchnorm`, :func:`~fastmerge.pleas.merge`) take
``distributed=None``: reduce automatically when a process group with more than one rank is
initialized (:func:`should_reduce`), ``False`` never, ``True`` always. So does
:func:`fastmerge.wsa.permutation_align`. :func:`fastmerge.wsa.scope_of` takes
``distributed=False`` (off by default: replicated DDP parameters must not be counted once
per rank; turn it on when every rank holds a shard of each parameter).
:func:`fastmerge.wsa.interpolation_curve` stays rank-local. Because ``None`` reduces
whenever a multi-rank group exists, calling these functions on one rank only (``if rank
== 0:``) needs ``distributed=False``, or the rank waits for the others.

``fastmerge merge`` under ``torchrun`` (:mod:`fastmerge.cli.distributed`) shards the
tensors over the ranks; rank 0 writes the index.

On NCCL the collectives run on the current CUDA device (CPU accumulators travel there and
back); with gloo, or a mixed ``cpu:gloo,cuda:nccl`` backend, they run on the CPU.

Example:
    >>> fastmerge.dist.is_distributed()  # no process group in this process
    False
"""

from __future__ import annotations

import contextlib
import datetime
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Protocol, TypeVar, Union, runtime_checkable

import torch
import torch.distributed as tdist

__all__ = [
    "Reducible",
    "all_reduce_",
    "all_reduce_values",
    "barrier",
    "broadcast_tensor",
    "describe_ranks",
    "gather_tensor",
    "home_device",
    "is_distributed",
    "kind_code",
    "launched_by_torchrun",
    "process_group_from_launcher",
    "rank_and_world_size",
    "should_reduce",
    "sum_tensors",
]

Group = Optional[Any]  # a torch.distributed ProcessGroup; None is the default (world) group


@runtime_checkable
class Reducible(Protocol):
    """What :func:`all_reduce_` needs of an accumulator: one method that combines the
    partial statistics of every rank of `group` with this module's collectives and returns
    the result (``self`` when reduced in place). :class:`~fastmerge.ScopeStats`,
    :class:`~fastmerge.FeatureStats` and :class:`~fastmerge.LeastSquares` implement it.

    Example:
        >>> isinstance(fastmerge.LeastSquares(2, 1), fastmerge.dist.Reducible)
        True
    """

    def _all_reduce(self, group: Group) -> Any: ...


Accumulator = TypeVar("Accumulator", bound=Reducible)

# Length of the per-rank description gathered before every reduction (padded with zeros);
# its first entry is the accumulator kind's code (kind_code), the rest are the kind's own.
_META_LENGTH = 6
_KIND_NAMES: dict[float, str] = {}


# ---- the process group ----------------------------------------------------------------


def _initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def is_distributed(group: Group = None) -> bool:
    """Whether a torch.distributed process group is initialized and has more than one rank.

    Example:
        >>> fastmerge.dist.is_distributed()
        False
    """
    return _initialized() and tdist.get_world_size(group) > 1


def rank_and_world_size(group: Group = None) -> tuple[int, int]:
    """``(rank, world size)`` of this process in `group`; ``(0, 1)`` without a process group.

    Example:
        >>> fastmerge.dist.rank_and_world_size()
        (0, 1)
    """
    if not _initialized():
        return 0, 1
    return tdist.get_rank(group), tdist.get_world_size(group)


def should_reduce(distributed: Optional[bool], group: Group = None) -> bool:
    """Resolve the ``distributed=`` argument of fastmerge's data-streaming functions.

    ``None``: reduce when :func:`is_distributed`; ``False``: never; ``True``: reduce, and
    raise if no process group is initialized.

    Raises:
        TypeError: `distributed` is not None or a bool.
        RuntimeError: ``True`` without an initialized process group.

    Example:
        >>> fastmerge.dist.should_reduce(None), fastmerge.dist.should_reduce(False)
        (False, False)
    """
    if distributed is None:
        return is_distributed(group)
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    if distributed:
        _require_group()
    return distributed


def barrier(group: Group = None) -> None:
    """Wait for every rank of `group`; nothing to wait for without a process group.

    Example:
        >>> fastmerge.dist.barrier()
    """
    if _initialized():
        tdist.barrier(group)


def launched_by_torchrun() -> bool:
    """Whether a launcher such as ``torchrun`` started this process as one of several ranks
    (``RANK`` set and ``WORLD_SIZE`` > 1 in the environment).

    Example:
        >>> fastmerge.dist.launched_by_torchrun()  # a plain python process
        False
    """
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@contextlib.contextmanager
def process_group_from_launcher(
    backend: str = "gloo", timeout_s: float = 1800.0
) -> Iterator[tuple[int, int]]:
    """For the ``with`` block, join the process group that ``torchrun`` describes in the
    environment (``init_method="env://"``) unless one is initialized already, and leave it
    afterwards; yields ``(rank, world size)``. Outside torchrun it does nothing and yields
    ``(0, 1)`` (or the existing group's rank and size).

    Example:
        >>> with fastmerge.dist.process_group_from_launcher() as (rank, world_size):
        ...     rank, world_size
        (0, 1)
    """
    created = False
    if launched_by_torchrun() and not _initialized():
        tdist.init_process_group(
            backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s)
        )
        created = True
    try:
        yield rank_and_world_size()
    finally:
        if created:
            tdist.destroy_process_group()


def _require_group() -> None:
    if not tdist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not tdist.is_initialized():
        raise RuntimeError(
            "no torch.distributed process group is initialized: launch with torchrun and call "
            "torch.distributed.init_process_group() first (or pass distributed=False)"
        )


# ---- reductions ---------------------------------------------------------------------------


def all_reduce_(accumulator: Accumulator, group: Group = None) -> Accumulator:
    """Combine the partial statistics of every rank of `group`, so that each rank holds the
    statistics of all ranks' data (the same on every rank); returns the result.

    :class:`~fastmerge.FeatureStats` and :class:`~fastmerge.LeastSquares` are reduced in
    place and returned; :class:`~fastmerge.ScopeStats` is immutable, so the reduced
    statistics are a new object: always use the return value. Every rank must call this
    for the same accumulators in the same order (it is a collective), once: reducing
    reduced statistics would count every rank's data again. A rank without
    samples takes part with empty statistics; where it had no device yet, its result lies
    on the collectives' device (CUDA with NCCL, else the CPU).

    Raises:
        TypeError: not a ScopeStats, FeatureStats or LeastSquares (nor another
            :class:`Reducible`).
        RuntimeError: no process group is initialized.
        ValueError: the ranks hold different kinds or sizes of statistics (raised on every
            rank).

    Example:
        >>> import os, tempfile
        >>> import torch.distributed as tdist
        >>> rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        >>> tdist.init_process_group("gloo", init_method=f"file://{rendezvous}",
        ...                          rank=0, world_size=1)
        >>> stats = fastmerge.FeatureStats().update(torch.ones(4, 2), torch.ones(4, 3))
        >>> fastmerge.dist.all_reduce_(stats).count  # one rank: the statistics stay
        4
        >>> tdist.destroy_process_group()
    """
    if not isinstance(accumulator, Reducible):
        raise TypeError(
            "accumulator must be a ScopeStats, FeatureStats or LeastSquares, got "
            f"{type(accumulator).__name__}"
        )
    _require_group()
    return accumulator._all_reduce(group)


def all_reduce_values(values: list[float], group: Group = None, *, op: str = "sum") -> list[float]:
    """Reduce a few numbers over the ranks of `group` in float64 (``op``: ``"sum"``,
    ``"max"`` or ``"min"``); returns the results, the same on every rank.

    Example:
        >>> import os, tempfile
        >>> import torch.distributed as tdist
        >>> rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        >>> tdist.init_process_group("gloo", init_method=f"file://{rendezvous}",
        ...                          rank=0, world_size=1)
        >>> fastmerge.dist.all_reduce_values([1.0, 2.5])
        [1.0, 2.5]
        >>> tdist.destroy_process_group()
    """
    ops = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be 'sum', 'max' or 'min', got {op!r}")
    _require_group()
    if not values:
        return []
    flat = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return _sum(flat, group, ops[op]).tolist()


# ---- building blocks of the accumulators' reductions ----------------------------------------
# Generic collectives that Reducible._all_reduce implementations are written with. All are
# collectives: every rank of `group` calls them in the same order.


def kind_code(name: str) -> float:
    """The code of an accumulator kind in :func:`describe_ranks`' first entry: the same on
    every rank for the same name (a CRC-32, exact in float64), and remembered so that a
    mismatch names the kinds. Accumulator classes call it once, at definition.

    Example:
        >>> fastmerge.dist.kind_code("LeastSquares") == fastmerge.dist.kind_code("LeastSquares")
        True
    """
    code = float(zlib.crc32(name.encode()))
    _KIND_NAMES[code] = name
    return code


def describe_ranks(
    kind: float, values: Sequence[Union[int, float]], group: Group = None
) -> list[list[float]]:
    """Every rank's short description ``[kind, *values]`` (at most 5 values), by rank, after
    checking that all ranks reduce the same kind (`kind` from :func:`kind_code`). Compare
    the rows before any other collective, so that a mismatch raises on every rank rather
    than hanging.

    Raises:
        ValueError: the ranks reduce different kinds of statistics.

    Example:
        >>> import os, tempfile
        >>> import torch.distributed as tdist
        >>> rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        >>> tdist.init_process_group("gloo", init_method=f"file://{rendezvous}",
        ...                          rank=0, world_size=1)
        >>> kind = fastmerge.dist.kind_code("Example")
        >>> fastmerge.dist.describe_ranks(kind, [3, 4])[0][1:3]
        [3.0, 4.0]
        >>> tdist.destroy_process_group()
    """
    if len(values) >= _META_LENGTH:
        raise ValueError(f"a rank description holds at most {_META_LENGTH - 1} values")
    padded = [kind, *(float(v) for v in values)] + [0.0] * (_META_LENGTH - 1 - len(values))
    rows = [p.tolist() for p in gather_tensor(torch.tensor(padded, dtype=torch.float64), group)]
    kinds = [row[0] for row in rows]
    if len(set(kinds)) > 1:
        raise ValueError(
            "the ranks all-reduce different kinds of statistics at the same time: "
            + ", ".join(f"rank {r}: {_KIND_NAMES.get(k, '?')}" for r, k in enumerate(kinds))
            + " (every rank must reduce the same accumulators in the same order)"
        )
    return rows


def sum_tensors(parts: Sequence[torch.Tensor], group: Group = None) -> list[torch.Tensor]:
    """The elementwise sums over the ranks of `parts` (tensors of the same dtype, the same
    shapes on every rank), in one flattened ``all_reduce``; new tensors of the parts' shapes
    on the first part's device (the inputs stay as they were).

    Example:
        >>> import os, tempfile
        >>> import torch.distributed as tdist
        >>> rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        >>> tdist.init_process_group("gloo", init_method=f"file://{rendezvous}",
        ...                          rank=0, world_size=1)
        >>> a, b = torch.ones(2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
        >>> [t.shape for t in fastmerge.dist.sum_tensors([a, b])]
        [torch.Size([2]), torch.Size([1, 2])]
        >>> tdist.destroy_process_group()
    """
    if not parts:
        return []
    flat = _sum(torch.cat([p.reshape(-1) for p in parts]), group)
    pieces = torch.split(flat, [p.numel() for p in parts])
    return [piece.reshape(p.shape) for piece, p in zip(pieces, parts)]


def gather_tensor(t: torch.Tensor, group: Group = None) -> list[torch.Tensor]:
    """Every rank's `t` (of the same shape and dtype on every rank), in rank order, on the
    collectives' device (:func:`home_device`).

    Example:
        >>> import os, tempfile
        >>> import torch.distributed as tdist
        >>> rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        >>> tdist.init_process_group("gloo", init_method=f"file://{rendezvous}",
        ...                          rank=0, world_size=1)
        >>> fastmerge.dist.gather_tensor(torch.arange(3.0))
        [tensor([0., 1., 2.])]
        >>> tdist.destroy_process_group()
    """
    local = _to_home(t, group)
    parts = [torch.empty_like(local) for _ in range(tdist.get_world_size(group))]
    tdist.all_gather(parts, local, group=group)
    return parts


def broadcast_tensor(t: torch.Tensor, group_rank: int, group: Group = None) -> torch.Tensor:
    """`t` of rank `group_rank` of `group` (a rank within the group), on every rank, on t's
    device; every rank passes a tensor of the same shape and dtype.

    Example:
        >>> import os, tempfile
        >>> import torch.distributed as tdist
        >>> rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        >>> tdist.init_process_group("gloo", init_method=f"file://{rendezvous}",
        ...                          rank=0, world_size=1)
        >>> fastmerge.dist.broadcast_tensor(torch.ones(2), 0)
        tensor([1., 1.])
        >>> tdist.destroy_process_group()
    """
    buffer = _to_home(t, group).clone()
    source = group_rank if group is None else tdist.get_global_rank(group, group_rank)
    tdist.broadcast(buffer, src=source, group=group)
    return buffer.to(t.device)


def home_device(group: Group = None) -> torch.device:
    """The device the collectives of `group` run on: CUDA for NCCL, else the CPU (where a
    rank without data allocates its empty statistics).

    Example:
        >>> import os, tempfile
        >>> import torch.distributed as tdist
        >>> rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        >>> tdist.init_process_group("gloo", init_method=f"file://{rendezvous}",
        ...                          rank=0, world_size=1)
        >>> fastmerge.dist.home_device()
        device(type='cpu')
        >>> tdist.destroy_process_group()
    """
    if tdist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- collectives ------------------------------------------------------------------------


def _to_home(t: torch.Tensor, group: Group) -> torch.Tensor:
    return t.to(home_device(group)).contiguous()


def _sum(flat: torch.Tensor, group: Group, op: Any = None) -> torch.Tensor:
    """Elementwise sum (or `op`) of `flat` over the ranks, on flat's device."""
    buffer = _to_home(flat, group)
    if buffer.data_ptr() == flat.data_ptr():
        buffer = buffer.clone()  # the caller's tensor stays as it was
    tdist.all_reduce(buffer, op=tdist.ReduceOp.SUM if op is None else op, group=group)
    return buffer.to(flat.device)
