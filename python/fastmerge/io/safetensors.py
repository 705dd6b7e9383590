"""The safetensors file format: a validated header and lazy, positioned reads.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``) and
the tensor bytes, offsets counted from the end of the header. :class:`SafetensorsReader`
validates the whole header when it opens the file (so that a corrupt or truncated file
fails before anything is merged or written) and gives one tensor per access, a new one
each time: a large tensor is a private memory map of just its bytes (the page cache's
pages mapped, not copied; unmapped when the tensor is freed, so touched pages do not
accumulate in the process's resident memory), a small one is read with ``os.preadv``
straight into its own storage (no intermediate copy; the GIL is released during the read,
so a background thread can prefetch while torch computes). ``FASTMERGE_READ=pread`` reads
every tensor that way, large ones into buffers from :func:`fastmerge.io.empty_tensor`
(2 MiB huge pages, which fault in several times faster than 4 KiB pages).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ._memory import empty_tensor

PathLike = Union[str, "os.PathLike[str]"]

#: safetensors dtype names -> torch dtypes (those this torch build has).
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
    }.items()
    if hasattr(torch, attr)
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

#: A header larger than this is refused as corrupt (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: Largest single read: Linux transfers at most about 2 GiB per read call.
_MAX_READ = 1 << 30
#: Tensors of at least this many bytes are memory-mapped (see SafetensorsReader).
MAP_MIN_BYTES = 1 << 20
#: ``FASTMERGE_READ=pread``: read every tensor with positioned reads, map none.
ENV_READ = "FASTMERGE_READ"
#: Reads of at least this many bytes are split over up to :data:`READ_THREADS` threads.
PARALLEL_READ_BYTES = 8 << 20
#: Threads a large read is split over (the calling thread and helpers).
READ_THREADS = max(1, min(4, os.cpu_count() or 1))


def _read_parts(nbytes: int) -> int:
    return max(1, min(READ_THREADS, nbytes // (PARALLEL_READ_BYTES // 2)))


@functools.cache
def _read_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, READ_THREADS - 1), thread_name_prefix="fastmerge-read"
    )


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or merged: missing, corrupt, truncated, or not
    matching the others. The message names the file and, where there is one, the key."""


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in its file and what it is, from the header alone.

    Example:
        >>> import torch
        >>> info = TensorInfo("w", torch.float32, (2, 3), 0, 24)
        >>> info.nbytes, info.numel
        (24, 6)
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype, e.g. ``"BF16"``.

    Example:
        >>> import torch
        >>> dtype_name(torch.bfloat16)
        'BF16'
    """
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def _fail(path: PathLike, what: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: {what}")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a key that appears twice (json.loads
    would keep the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_header(path: PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate the header of a safetensors file.

    Returns ``(tensors, metadata, data_start)``: the tensors by name, the
    ``__metadata__`` strings and the file offset of the first data byte.

    Raises:
        CheckpointError: the file is missing, too short, its header is not JSON (or
            repeats a key, or has a ``__metadata__`` that is not an object of strings),
            names an unknown dtype, has a size inconsistent with its shape, or an offset
            outside the file or overlapping another tensor (the message names file and key).

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> path = tempfile.mkdtemp() + "/m.safetensors"
        >>> safetensors.torch.save_file({"w": torch.ones(2, 3)}, path)
        >>> tensors, metadata, start = read_header(path)
        >>> tensors["w"].shape, tensors["w"].dtype, tensors["w"].nbytes
        ((2, 3), torch.float32, 24)
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"truncated: {size} bytes, not a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise _fail(path, f"truncated or corrupt: header of {length} bytes in {size}")
            raw = f.read(length)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a safetensors file") from None
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:  # the safetensors library refuses such a file too
        raise _fail(path, f"corrupt header: key {str(exc)[:200]!r} appears twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"corrupt header (not JSON: {str(exc)[:200]})") from None
    except RecursionError:
        raise _fail(path, "corrupt header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "corrupt header: __metadata__ is not an object of strings")
    data_start = 8 + length
    tensors = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    _check_layout(path, tensors, size - data_start)
    return tensors, metadata, data_start


def _tensor_info(path: PathLike, name: str, entry: Any) -> TensorInfo:
    """One header entry, checked: known dtype, integer shape, size matching the shape."""
    if not isinstance(entry, dict):
        raise _fail(path, f"key {name!r}: header entry is not an object")
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise _fail(path, f"key {name!r}: unknown dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _fail(path, f"key {name!r}: bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(path, f"key {name!r}: bad data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    expected = info.numel * dtype.itemsize
    if info.nbytes != expected:
        raise _fail(
            path,
            f"key {name!r}: {info.nbytes} bytes for shape {shape} {entry['dtype']} "
            f"({expected} expected)",
        )
    return info


def _check_layout(path: PathLike, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Every tensor inside the data section and no two tensors overlapping."""
    previous_end, previous = 0, None
    for info in sorted(tensors.values(), key=lambda i: (i.begin, i.end)):
        if info.end > data_size:
            raise _fail(
                path,
                f"truncated: key {info.name!r} ends at byte {info.end} of a "
                f"{data_size}-byte data section",
            )
        if info.begin < previous_end and info.nbytes > 0:
            raise _fail(path, f"corrupt: key {info.name!r} overlaps key {previous!r}")
        if info.nbytes > 0:
            previous_end, previous = info.end, info.name


class SafetensorsReader(Mapping):
    """A lazy, read-only ``Mapping[str, Tensor]`` over one safetensors file.

    Opening reads and validates the header only; ``reader[name]`` reads that tensor's
    bytes every time it is accessed, into a fresh CPU tensor of its own.
    ``reader.info(name)`` gives dtype, shape and size without reading.

    How: a tensor of at least :data:`MAP_MIN_BYTES` is a private, copy-on-write memory
    map of just its bytes in the file (``map_tensors=True``, the default; the environment
    variable ``FASTMERGE_READ=pread`` turns it off), as ``safetensors.safe_open`` and
    ``torch.load(mmap=True)`` do: the page cache's pages are mapped, not copied, which
    takes about half of the system time of a streamed merge away. The tensor is writable
    (a write copies that page; the file never changes), and the map is unmapped when the
    tensor and every view of it are freed, so resident memory stays bounded as before.
    As with any memory map, an input file truncated while its tensors are in use makes
    touching them fail (SIGBUS) rather than raise; the size is checked when a tensor is
    mapped. Smaller tensors, and every tensor with ``map_tensors=False``, are read with
    one positioned read (``os.preadv``, split over threads when large) into new memory.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> path = tempfile.mkdtemp() + "/m.safetensors"
        >>> safetensors.torch.save_file({"a": torch.arange(3.0), "b": torch.ones(2)}, path)
        >>> reader = SafetensorsReader(path)
        >>> sorted(reader), reader["a"].tolist(), reader.info("b").shape
        (['a', 'b'], [0.0, 1.0, 2.0], (2,))
    """

    def __init__(self, path: PathLike, *, map_tensors: Optional[bool] = None) -> None:
        self.path = os.fspath(path)
        self.tensors, self.metadata, self._data_start = read_header(self.path)
        self._fd: int | None = None
        if map_tensors is None:
            map_tensors = os.environ.get(ENV_READ, "mmap").strip().lower() != "pread"
        self.map_tensors = bool(map_tensors) and hasattr(mmap, "MAP_PRIVATE")

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.read(info)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read it
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of `name`, from the header (nothing is read)."""
        return self.tensors[name]

    def read(self, info: TensorInfo) -> torch.Tensor:
        """Read one tensor into a new contiguous CPU tensor (thread-safe)."""
        buffer = self._buffer(self._data_start + info.begin, info.nbytes, info.name)
        return buffer.view(info.dtype).reshape(info.shape)

    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` (first dimension) of a tensor: one positioned read
        of just those bytes."""
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise IndexError(f"{self.path}: rows {start}:{stop} of key {info.name!r} {info.shape}")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        offset = self._data_start + info.begin + start * row_bytes
        buffer = self._buffer(offset, (stop - start) * row_bytes, info.name)
        return buffer.view(info.dtype).reshape(stop - start, *info.shape[1:])

    def _buffer(self, offset: int, nbytes: int, name: str) -> torch.Tensor:
        """`nbytes` bytes of the file at `offset` as a new uint8 tensor."""
        if self.map_tensors and nbytes >= MAP_MIN_BYTES:
            return self._map(offset, nbytes, name)
        buffer = empty_tensor(nbytes)
        if nbytes:
            self._read_into(buffer, offset, name)
        return buffer

    def _map(self, offset: int, nbytes: int, name: str) -> torch.Tensor:
        fd = self._descriptor()
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise _fail(self.path, f"key {name!r}: read failed ({exc})") from None
        if offset + nbytes > size:
            raise _fail(self.path, f"truncated while reading key {name!r}")
        start = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        try:
            region = mmap.mmap(
                fd,
                offset - start + nbytes,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start,
            )
        except OSError as exc:
            raise _fail(self.path, f"key {name!r}: cannot map ({exc})") from None
        try:  # let the kernel start reading pages that are not in the page cache yet
            region.madvise(mmap.MADV_WILLNEED, 0, len(region))
        except (OSError, AttributeError, ValueError):
            pass
        # the tensor keeps the map alive (and unmaps it when it is freed)
        return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset - start)

    def _read_into(self, buffer: torch.Tensor, offset: int, name: str) -> None:
        view = memoryview(buffer.numpy()).cast("B")
        fd = self._descriptor()
        parts = _read_parts(len(view))
        if parts == 1:
            self._read_range(fd, view, offset, name)
            return
        # A large read is split over threads: copying from the page cache is CPU work,
        # and each preadv releases the GIL.
        step = -(-len(view) // parts) + 4095 & ~4095
        pieces = [(view[i : i + step], offset + i) for i in range(0, len(view), step)]
        futures = [
            _read_pool().submit(self._read_range, fd, piece, where, name)
            for piece, where in pieces[1:]
        ]
        try:
            self._read_range(fd, *pieces[0], name)
        finally:
            for f in futures:
                f.result()  # re-raises a helper's error

    def _read_range(self, fd: int, view: memoryview, offset: int, name: str) -> None:
        done = 0
        while done < len(view):
            try:
                got = os.preadv(fd, [view[done : done + _MAX_READ]], offset + done)
            except OSError as exc:
                raise _fail(self.path, f"key {name!r}: read failed ({exc})") from None
            if got == 0:
                raise _fail(self.path, f"truncated while reading key {name!r}")
            done += got

    def _descriptor(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise _fail(self.path, f"cannot open ({exc.strerror})") from None
        return self._fd

    def close(self) -> None:
        """Close the file descriptor (a later access reopens it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to do
            pass

    def __repr__(self) -> str:
        return f"SafetensorsReader({self.path!r}, {len(self)} tensors)"


def header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None) -> bytes:
    """The length prefix and JSON header of a file holding `entries` in order, padded
    with spaces to a multiple of 8 bytes so that every tensor is 8-byte aligned.

    Example:
        >>> import torch
        >>> blob = header_bytes([("w", torch.float32, (2,))])
        >>> len(blob) % 8, blob[8:].decode().strip()
        (0, '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}')
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": dtype_name(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor in C order (a view when it is contiguous).

    Example:
        >>> import torch
        >>> bytes(tensor_bytes(torch.tensor([1], dtype=torch.int16)))
        b'\\x01\\x00'
    """
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
