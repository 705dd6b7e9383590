"""Writing a state dict as safetensors shards plus an index, atomically.

Every output tensor's name, dtype and shape is known before the merge starts (they are
the base model's), so the shards are planned up front: each shard's header is written
first and each tensor's bytes are appended as soon as it is merged. Nothing but the
tensor being written is held in memory, whatever the shard size.

The files go to the run's own staging directory beside the output (same file system;
:mod:`fastmerge.io.publish`) that is renamed into place only when every shard, the index
and the extra files are complete and fsynced; on any exception it is removed, so an
interrupted write leaves no output, and a run killed outright leaves a directory that the
next run removes.

Tensor bytes go to the files with unbuffered ``os.write`` calls straight from the
tensor's memory (no copy in Python), on a background thread by default: the caller's
next tensor is merged while the previous one is written, within a byte budget
(``write_behind_bytes``). A write error there is raised in the caller, at its next call.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import shutil
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .publish import Staging, new_run_id
from .safetensors import CheckpointError, header_bytes, tensor_bytes

PathLike = Union[str, "os.PathLike[str]"]

INDEX_NAME = "model.safetensors.index.json"
#: Default maximum shard size (Hugging Face's default for save_pretrained is 5 GB).
DEFAULT_SHARD_BYTES = 5_000_000_000
#: Default budget of bytes handed to the background writer but not yet written.
DEFAULT_WRITE_BEHIND_BYTES = 256 << 20
#: Largest single write: Linux transfers at most about 2 GiB per call.
_MAX_WRITE = 1 << 30


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
    each is checked against its planned dtype and shape when it is handed over.

    With ``write_behind_bytes > 0`` (the default, 256 MiB) the bytes are written by a
    background thread, in order, while the caller goes on: :meth:`write` returns once the
    tensor is queued (it waits while more than that many bytes are queued). The writer
    keeps a reference to the tensor until its bytes are written, so the caller may drop
    its own at once, but must not modify the tensor in place until then (:meth:`flush`
    waits for it). A failed write (a full disk) is raised by the next :meth:`write`,
    :meth:`write_rows`, :meth:`flush` or :meth:`commit`. ``write_behind_bytes=0`` writes
    in the calling thread.

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
        write_behind_bytes: int = DEFAULT_WRITE_BEHIND_BYTES,
        run_id: Optional[str] = None,
        fsync: bool = True,
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
        self._shard_open = False
        if run_id is None and self.world_size > 1:
            raise ValueError("ShardedWriter with world_size > 1 needs the run_id all ranks share")
        self.fsync = bool(fsync)
        self._staging = Staging(self.out_dir, run_id or new_run_id(), owner=self.rank == 0,
                                fsync=self.fsync)  # fmt: skip
        self.tmp_dir = self._staging.tmp_dir
        #: What the run did about leftovers of interrupted runs (one line each).
        self.notes = self._staging.notes
        if self.notes:  # again: cleaning up may have put an old output back at out_dir
            try:
                check_output_dir(out_dir, overwrite)
            except CheckpointError as exc:
                self._staging.remove()
                raise CheckpointError("; ".join([str(exc), *self.notes])) from None
        self.bytes_written = 0
        self._files = _FileWriter(int(write_behind_bytes), fsync=self.fsync)
        # a writer dropped without commit() or abort() stops its thread and closes its
        # file, and (rank 0) removes its staging directory
        owned = self._staging if self.rank == 0 else None
        self._finalizer = weakref.finalize(self, _drop, self._files, owned)

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
        if not self._shard_open:
            self._open_shard()
        data = tensor_bytes(tensor)
        shared = tensor.device.type == "cpu" and tensor.is_contiguous()  # not a copy
        self._files.write(data, tensor if shared else None)

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
        self._files.open(self.tmp_dir / shard.filename, header_bytes(entries, self.metadata))
        self._shard_open = True

    def _close_shard(self) -> None:
        self._files.close()
        self._shard_open = False
        self._shard_index += 1
        self._in_shard = 0

    def flush(self) -> None:
        """Wait until every tensor handed over so far is written to its file (the page
        cache; nothing is fsync'ed); raises the error of a failed write."""
        self._files.flush()

    def add_file(self, relative: str, content: Union[bytes, str, Path]) -> None:
        """Add an extra file (rank 0 only): `content` is bytes, text, or a Path to copy."""
        if self.rank != 0:
            return
        target = self.tmp_dir / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            elif isinstance(content, str):
                target.write_text(content)
            else:
                target.write_bytes(content)
        except OSError as exc:
            raise CheckpointError(f"{target}: cannot write ({exc.strerror or exc})") from None

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
        try:
            self._files.finish()  # every byte written and every shard closed
        except BaseException:
            self.abort()
            raise
        if self.world_size > 1:
            if barrier is None:
                self.abort()
                raise ValueError("commit() with world_size > 1 needs a barrier")
            barrier()
        if self.rank != 0:
            return
        try:
            text = json.dumps(self.index(), indent=2)
            self.add_file(INDEX_NAME, text + "\n")
            self._staging.publish(self.overwrite)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove everything written so far (this rank's shards; rank 0: the directory)."""
        self._files.cancel()
        self._shard_open = False
        if self.world_size == 1 or self.rank == 0:
            self._staging.remove()
        else:
            for shard in self._mine:
                (self.tmp_dir / shard.filename).unlink(missing_ok=True)


def _drop(files: _FileWriter, staging: Optional[Staging]) -> None:
    """What happens to a writer dropped without commit() or abort() (as when an exception
    comes between its creation and the caller's ``try``)."""
    files.cancel()
    if staging is not None:
        staging.remove()


def _version(tensor: Optional[torch.Tensor]) -> Optional[int]:
    if tensor is None:
        return None
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


def _write_all(fd: int, data: memoryview) -> None:
    view = data if data.format == "B" and data.ndim == 1 else data.cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done : done + _MAX_WRITE])


class _FileWriter:
    """One output file at a time, written in order: ``open(path, header)``, any number of
    ``write(bytes)``, ``close()``. With a budget > 0 a background thread does the work
    and the calls return at once (``write`` waits while the budget is used up); the first
    error is kept and raised by the next call. ``finish()`` waits for everything and
    stops the thread; ``cancel()`` drops what is queued, closes the file and stops it."""

    def __init__(self, budget: int, fsync: bool = True) -> None:
        self.budget = max(0, budget)
        self.fsync = fsync
        self._fd: Optional[int] = None  # used by the thread only, when there is one
        self._path: Optional[Path] = None
        self._queue: deque = deque()
        self._pending = 0  # bytes queued or being written
        self._busy = False
        self._error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    # -- the caller's side ---------------------------------------------------------------

    def open(self, path: Path, header: bytes) -> None:
        self._submit(("open", path, header), len(header))

    def write(self, data: memoryview, source: Optional[torch.Tensor] = None) -> None:
        """Queue `data`; `source`, the tensor whose memory it is, is checked for in-place
        changes (torch's version counter) made before its bytes were written."""
        self._submit(("write", data, source, _version(source)), data.nbytes)

    def close(self) -> None:
        self._submit(("close",), 0)

    def flush(self) -> None:
        with self._cond:
            while self._queue or self._busy:
                self._cond.wait()
            self._raise_error()

    def finish(self) -> None:
        self.flush()
        self._stop()
        if self._fd is not None:  # a shard left open by an unfinished plan
            self._run(("close",))

    def cancel(self) -> None:
        with self._cond:
            self._queue.clear()
            self._pending = 0
            self._cond.notify_all()
        self._stop()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        self._error = None

    def _submit(self, op: tuple, nbytes: int) -> None:
        if self.budget == 0:
            self._raise_error()
            try:
                self._run(op)
            except BaseException as exc:
                self._error = exc
                raise
            return
        with self._cond:
            self._raise_error()
            while self._pending > 0 and self._pending + nbytes > self.budget:
                self._cond.wait()
                self._raise_error()
            self._queue.append(op)
            self._pending += nbytes
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="fastmerge-writer", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        with self._cond:
            thread = self._thread
            self._thread = None
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    # -- the thread's side ---------------------------------------------------------------

    def _loop(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cond:
                while not self._queue and self._thread is me:
                    self._cond.wait()
                if not self._queue:  # stopped
                    return
                op = self._queue.popleft()
                self._busy = True
            size = op[1].nbytes if op[0] == "write" else len(op[2]) if op[0] == "open" else 0
            try:
                self._run(op)
            except BaseException as exc:  # raised in the caller at its next call
                with self._cond:
                    self._error = exc
                    self._queue.clear()
                    self._pending = 0
            with self._cond:
                self._busy = False
                self._pending = max(0, self._pending - size)
                self._cond.notify_all()
            del op  # the tensor's memory may go now

    def _run(self, op: tuple) -> None:
        try:
            self._run_op(op)
        except OSError as exc:  # a full disk, a lost mount: name the file
            where = op[1] if op[0] == "open" else self._path
            raise CheckpointError(f"{where}: cannot write ({exc.strerror or exc})") from None

    def _run_op(self, op: tuple) -> None:
        if op[0] == "write":
            _write_all(self._fd, op[1])
            if op[2] is not None and _version(op[2]) != op[3]:
                raise RuntimeError(
                    "a tensor given to ShardedWriter.write was modified in place before it "
                    "was written; keep it unchanged until flush() (or write_behind_bytes=0)"
                )
        elif op[0] == "open":
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
            self._fd = os.open(op[1], flags, 0o666)
            self._path = op[1]
            _write_all(self._fd, memoryview(op[2]))
        else:
            fd, self._fd = self._fd, None
            if fd is not None:
                try:
                    if self.fsync:  # on this thread, while the caller merges on
                        os.fsync(fd)
                finally:
                    os.close(fd)
