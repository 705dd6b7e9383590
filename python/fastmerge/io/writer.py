"""Writing a state dict as safetensors shards plus an index, atomically.

Every output tensor's name, dtype and shape is known before the merge starts (they are
the base model's), so the shards are planned up front: each shard's header is written
first and each tensor's bytes are appended as soon as it is merged. Nothing but the
tensor being written is held in memory, whatever the shard size.

The files go to a temporary directory beside the output (same file system) that is
renamed into place only when every shard, the index and the extra files are complete;
on any exception it is removed, so an interrupted write leaves no output.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .safetensors import CheckpointError, header_bytes, tensor_bytes

PathLike = Union[str, "os.PathLike[str]"]

INDEX_NAME = "model.safetensors.index.json"
#: Default maximum shard size (Hugging Face's default for save_pretrained is 5 GB).
DEFAULT_SHARD_BYTES = 5_000_000_000


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one output tensor.

    Example:
        >>> import torch
        >>> TensorSpec("w", torch.bfloat16, (4, 4)).nbytes
        32
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Shard:
    """One planned output file: its name, its tensors in file order, the rank writing it."""

    filename: str
    specs: tuple[TensorSpec, ...]
    rank: int = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def partition_names(specs: Sequence[TensorSpec], world_size: int) -> list[int]:
    """The rank that merges each tensor: a deterministic, size-balanced assignment
    (largest tensors first, each to the least-loaded rank, ties to the lowest rank).

    Example:
        >>> import torch
        >>> specs = [TensorSpec(n, torch.float32, (s,)) for n, s in [("a", 8), ("b", 5), ("c", 4)]]
        >>> partition_names(specs, 2)
        [0, 1, 1]
    """
    if int(world_size) < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [(0, r) for r in range(int(world_size))]
    ranks = [0] * len(specs)
    for i in sorted(range(len(specs)), key=lambda i: (-specs[i].nbytes, i)):
        load, r = heapq.heappop(loads)
        ranks[i] = r
        heapq.heappush(loads, (load + specs[i].nbytes, r))
    return ranks


def plan_shards(
    specs: Sequence[TensorSpec],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    world_size: int = 1,
) -> list[Shard]:
    """Pack tensors (in order) into shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own); with several ranks, each rank's tensors (from
    :func:`partition_names`) fill that rank's own shards. Files are named
    ``model-00001-of-0000N.safetensors``.

    Example:
        >>> import torch
        >>> specs = [TensorSpec(n, torch.float32, (4,)) for n in "abc"]
        >>> for shard in plan_shards(specs, 32):
        ...     print(shard.filename, [t.name for t in shard.specs])
        model-00001-of-00002.safetensors ['a', 'b']
        model-00002-of-00002.safetensors ['c']
    """
    if int(max_shard_bytes) < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    ranks = partition_names(specs, world_size)
    groups: list[tuple[int, list[TensorSpec]]] = []
    for r in range(int(world_size)):
        current: list[TensorSpec] = []
        size = 0
        for spec, owner in zip(specs, ranks):
            if owner != r:
                continue
            if current and size + spec.nbytes > max_shard_bytes:
                groups.append((r, current))
                current, size = [], 0
            current.append(spec)
            size += spec.nbytes
        if current:
            groups.append((r, current))
    n = max(len(groups), 1)
    return [
        Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(group), r)
        for i, (r, group) in enumerate(groups)
    ]


def check_output_dir(out_dir: PathLike, overwrite: bool) -> Path:
    """`out_dir` as a Path, after checking that it may be written.

    Raises:
        CheckpointError: it exists and `overwrite` is False, or it is a file.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: output directory exists (pass --overwrite to replace it)")
    return out


class ShardedWriter:
    """Write planned safetensors shards, an index and extra files into a temporary
    directory, and move it to `out_dir` on :meth:`commit` (or at the end of a ``with``
    block without an exception; with one, everything is removed).

    Tensors must be written in :attr:`order` (this rank's tensors, shard by shard);
    each is checked against its planned dtype and shape.

    Example:
        >>> import tempfile, torch
        >>> out = tempfile.mkdtemp() + "/merged"
        >>> specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.int64, ())]
        >>> with ShardedWriter(out, specs, max_shard_bytes=8) as writer:
        ...     for name, value in zip(writer.order, [torch.ones(2), torch.tensor(3)]):
        ...         writer.write(name, value)
        >>> for name in sorted(os.listdir(out)):
        ...     print(name)
        model-00001-of-00002.safetensors
        model-00002-of-00002.safetensors
        model.safetensors.index.json
    """

    def __init__(
        self,
        out_dir: PathLike,
        specs: Sequence[TensorSpec],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        metadata: Optional[dict[str, str]] = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.out_dir = check_output_dir(out_dir, overwrite)
        self.overwrite = overwrite
        self.metadata = {"format": "pt", **(metadata or {})}
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        self.shards = plan_shards(specs, max_shard_bytes, self.world_size)
        self._mine = [s for s in self.shards if s.rank == self.rank]
        self.order = [spec.name for shard in self._mine for spec in shard.specs]
        self._position = 0  # index into self.order of the next tensor
        self._shard_index = 0  # index into self._mine of the open (or next) shard
        self._in_shard = 0  # tensors written into the open shard
        self._rows_done = 0  # rows of the current tensor written by write_rows
        self._file = None
        self.tmp_dir = self._make_tmp_dir()
        self.bytes_written = 0

    def _make_tmp_dir(self) -> Path:
        parent = self.out_dir.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        if self.world_size == 1:
            return Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=parent))
        # Every rank must find the same directory: its name is deterministic.
        tmp = parent / f".{self.out_dir.name}.fastmerge-partial"
        tmp.mkdir(exist_ok=True)
        return tmp

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor whole (dtype and shape must match the plan)."""
        expected = self._expect(name, tensor.dtype)
        if tuple(tensor.shape) != expected.shape or self._rows_done:
            raise ValueError(
                f"write({name!r}): got shape {tuple(tensor.shape)}, planned {expected.shape}"
                + (" (rows of it were already written)" if self._rows_done else "")
            )
        self._append(tensor)
        self._finish_tensor(expected)

    def write_rows(self, name: str, rows: torch.Tensor) -> None:
        """Append the next rows (a slice along the first dimension) of the next tensor;
        the tensor is complete when all its rows are written."""
        expected = self._expect(name, rows.dtype)
        if not expected.shape or tuple(rows.shape[1:]) != expected.shape[1:]:
            raise ValueError(
                f"write_rows({name!r}): rows of shape {tuple(rows.shape)} do not fit "
                f"{expected.shape}"
            )
        if self._rows_done + rows.shape[0] > expected.shape[0]:
            raise ValueError(f"write_rows({name!r}): more than {expected.shape[0]} rows")
        self._append(rows)
        self._rows_done += rows.shape[0]
        if self._rows_done == expected.shape[0]:
            self._finish_tensor(expected)

    def _expect(self, name: str, dtype: torch.dtype) -> TensorSpec:
        if self._position >= len(self.order):
            raise ValueError(f"write({name!r}): every planned tensor is already written")
        expected = self._mine[self._shard_index].specs[self._in_shard]
        if name != expected.name:
            raise ValueError(f"write({name!r}): expected {expected.name!r} next")
        if dtype != expected.dtype:
            raise ValueError(f"write({name!r}): got {dtype}, planned {expected.dtype}")
        return expected

    def _append(self, tensor: torch.Tensor) -> None:
        if self._file is None:
            self._open_shard()
        self._file.write(tensor_bytes(tensor))

    def _finish_tensor(self, spec: TensorSpec) -> None:
        self.bytes_written += spec.nbytes
        self._rows_done = 0
        self._position += 1
        self._in_shard += 1
        if self._in_shard == len(self._mine[self._shard_index].specs):
            self._close_shard()

    def _open_shard(self) -> None:
        shard = self._mine[self._shard_index]
        entries = [(s.name, s.dtype, s.shape) for s in shard.specs]
        self._file = open(self.tmp_dir / shard.filename, "wb")  # noqa: SIM115 (closed in _close_shard)
        self._file.write(header_bytes(entries, self.metadata))

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        self._shard_index += 1
        self._in_shard = 0

    def add_file(self, relative: str, content: Union[bytes, str, Path]) -> None:
        """Add an extra file (rank 0 only): `content` is bytes, text, or a Path to copy."""
        if self.rank != 0:
            return
        target = self.tmp_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        elif isinstance(content, str):
            target.write_text(content)
        else:
            target.write_bytes(content)

    def index(self) -> dict:
        """The ``model.safetensors.index.json`` content of the whole plan."""
        total = sum(s.nbytes for s in self.shards)
        weight_map = {spec.name: s.filename for s in self.shards for spec in s.specs}
        return {"metadata": {"total_size": total}, "weight_map": weight_map}

    def commit(self, barrier: Optional[Callable[[], None]] = None) -> None:
        """Finish: check that all of this rank's tensors were written, wait on `barrier`
        (needed when world_size > 1), then (rank 0) write the index and move the
        temporary directory to `out_dir`, replacing it when `overwrite` was given."""
        if self._position != len(self.order):
            missing = self.order[self._position]
            self.abort()
            raise ValueError(f"commit(): tensor {missing!r} was never written")
        if self.world_size > 1:
            if barrier is None:
                self.abort()
                raise ValueError("commit() with world_size > 1 needs a barrier")
            barrier()
        if self.rank != 0:
            return
        try:
            text = json.dumps(self.index(), indent=2)
            (self.tmp_dir / INDEX_NAME).write_text(text + "\n")
            self._replace()
        except BaseException:
            self.abort()
            raise

    def _replace(self) -> None:
        old = None
        if self.out_dir.exists():
            if not self.overwrite:  # appeared while merging
                raise CheckpointError(f"{self.out_dir}: output directory exists")
            old = Path(
                tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.tmp_dir.parent)
            )
            os.replace(self.out_dir, old / "previous")
        os.replace(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove everything written so far (this rank's shards; rank 0: the directory)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.world_size == 1 or self.rank == 0:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        else:
            for shard in self._mine:
                (self.tmp_dir / shard.filename).unlink(missing_ok=True)
