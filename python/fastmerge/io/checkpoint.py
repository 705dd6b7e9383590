"""Opening a checkpoint of any common layout as one lazy ``Mapping[str, Tensor]``.

Layouts: a ``.safetensors`` file; a directory with ``model.safetensors.index.json`` (the
sharded Hugging Face layout) or ``model.safetensors``; a directory of ``*.safetensors``
files; and, only when the caller allows pickle, ``.bin`` / ``.pt`` / ``.pth`` files or a
directory with ``pytorch_model.bin[.index.json]``, loaded with ``torch.load(...,
weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Union

import torch

from .safetensors import CheckpointError, SafetensorsReader, TensorInfo

PathLike = Union[str, "os.PathLike[str]"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class Checkpoint(Mapping):
    """A lazy mapping over the tensors of one or more files (shards).

    ``checkpoint[name]`` reads that tensor from its shard on every access;
    ``checkpoint.info(name)`` describes it without reading; ``checkpoint.file_of(name)``
    names its file (for error messages). Build one with :func:`open_checkpoint`.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> d = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"w": torch.ones(2)}, d + "/model.safetensors")
        >>> ckpt = open_checkpoint(d)
        >>> list(ckpt), ckpt["w"].tolist(), ckpt.file_of("w").endswith("model.safetensors")
        (['w'], [1.0, 1.0], True)
    """

    def __init__(self, path: PathLike, shards: Mapping[str, Mapping[str, torch.Tensor]]):
        self.path = os.fspath(path)
        self._shard_of = dict(shards)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._shard_of[name][name]

    def __contains__(self, name: object) -> bool:  # Mapping's default would read it
        return name in self._shard_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._shard_of)

    def __len__(self) -> int:
        return len(self._shard_of)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape, size (and offset in its file) of `name`; reads nothing from
        safetensors files."""
        shard = self._shard_of[name]
        if isinstance(shard, SafetensorsReader):
            return shard.info(name)
        t = shard[name]
        nbytes = t.numel() * t.element_size()
        return TensorInfo(name, t.dtype, tuple(t.shape), 0, nbytes)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of `name` (only those bytes are read from safetensors).

        Example:
            >>> import tempfile, torch, safetensors.torch
            >>> path = tempfile.mkdtemp() + "/m.safetensors"
            >>> safetensors.torch.save_file({"w": torch.arange(6.0).reshape(3, 2)}, path)
            >>> open_checkpoint(path).read_rows("w", 1, 3).tolist()
            [[2.0, 3.0], [4.0, 5.0]]
        """
        shard = self._shard_of[name]
        if isinstance(shard, SafetensorsReader):
            return shard.read_rows(shard.info(name), start, stop)
        return shard[name][start:stop].contiguous()

    def file_of(self, name: str) -> str:
        """The file that holds `name`."""
        return getattr(self._shard_of[name], "path", self.path)

    def close(self) -> None:
        """Close the files' descriptors."""
        for shard in self._shard_of.values():
            if isinstance(shard, SafetensorsReader):
                shard.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, {len(self)} tensors)"


def open_checkpoint(path: PathLike, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint lazily: only headers (and the index) are read now.

    Args:
        path: a ``.safetensors`` file, a sharded directory with
            ``model.safetensors.index.json``, a Hugging Face model directory, or (with
            `allow_pickle`) a ``.bin``/``.pt``/``.pth`` file or a directory of them.
        allow_pickle: accept pickle checkpoints, loaded with ``weights_only=True`` (and
            memory-mapped when the file is in the zip format).

    Raises:
        CheckpointError: missing path, no weights found, a pickle file without
            `allow_pickle`, a corrupt file, an index naming a missing shard or a key its
            shard lacks, or a key in two shards (the message names the file and key).

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> path = tempfile.mkdtemp() + "/m.safetensors"
        >>> safetensors.torch.save_file({"w": torch.zeros(3)}, path)
        >>> open_checkpoint(path).info("w").shape
        (3,)
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        return Checkpoint(p, _open_file(p, allow_pickle))
    if (p / SAFETENSORS_INDEX).is_file():
        return Checkpoint(p, _open_index(p / SAFETENSORS_INDEX, allow_pickle))
    files = sorted(p.glob("*.safetensors"))
    if files:
        return Checkpoint(p, _union(files, allow_pickle))
    if (p / PICKLE_INDEX).is_file():
        _check_pickle(p / PICKLE_INDEX, allow_pickle)
        return Checkpoint(p, _open_index(p / PICKLE_INDEX, allow_pickle))
    pickles = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if pickles:
        return Checkpoint(p, _union(pickles, allow_pickle))
    raise CheckpointError(f"{p}: no *.safetensors (or pickle) weights in this directory")


def _check_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise CheckpointError(
            f"{path}: pickle checkpoint refused (it can run code when loaded); convert it to "
            "safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"
        )


def _open_file(path: Path, allow_pickle: bool) -> dict[str, Mapping[str, torch.Tensor]]:
    """name -> the mapping (reader or loaded dict) that holds it, for one file."""
    if path.suffix in PICKLE_SUFFIXES:
        _check_pickle(path, allow_pickle)
        tensors = _load_pickle(path)
        return dict.fromkeys(tensors, tensors)
    reader = SafetensorsReader(path)
    return dict.fromkeys(reader, reader)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load with weights_only=True ({first})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def _union(files: list[Path], allow_pickle: bool) -> dict[str, Mapping[str, torch.Tensor]]:
    shards: dict[str, Mapping[str, torch.Tensor]] = {}
    owner: dict[str, Path] = {}
    for f in files:
        for name, shard in _open_file(f, allow_pickle).items():
            if name in shards:
                raise CheckpointError(f"{f}: key {name!r} is also in {owner[name]}")
            shards[name], owner[name] = shard, f
    return shards


def _inside(directory: Path, filename: str) -> bool:
    """Whether `filename` (from an index) names a file inside `directory`: a relative
    path that does not climb out with ``..``. Symlinks are followed as any reader would
    (the Hugging Face cache links every snapshot file to its blob store)."""
    if os.path.isabs(filename) or "\x00" in filename:
        return False
    norm = os.path.normpath(filename)
    return norm not in (".", "..") and not norm.startswith(".." + os.sep)


def _open_index(index: Path, allow_pickle: bool) -> dict[str, Mapping[str, torch.Tensor]]:
    """name -> shard for a sharded checkpoint, checking the index against the shards."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: corrupt index ({str(exc)[:200]})") from None
    except RecursionError:
        raise CheckpointError(f"{index}: corrupt index (JSON nested too deeply)") from None
    opened: dict[str, dict[str, Mapping[str, torch.Tensor]]] = {}
    shards: dict[str, Mapping[str, torch.Tensor]] = {}
    for name, filename in weight_map.items():
        if filename not in opened:
            if not isinstance(filename, str) or not _inside(index.parent, filename):
                raise CheckpointError(
                    f"{index}: key {str(name)[:200]!r} points outside the checkpoint's "
                    f"directory ({str(filename)[:200]!r})"
                )
            file = index.parent / filename
            if not file.is_file():
                raise CheckpointError(f"{index}: shard {filename} (key {name!r}) is missing")
            opened[filename] = _open_file(file, allow_pickle)
        if name not in opened[filename]:
            raise CheckpointError(f"{index.parent / filename}: no key {name!r} (the index has it)")
        shards[name] = opened[filename][name]
    return shards
