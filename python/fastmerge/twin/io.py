"""Saving and loading a :class:`TwinMerger` (and its router): safetensors plus a manifest.

Layout of a save directory:

* ``shared.safetensors``: the shared expert's state dict;
* ``factors.safetensors``: ``<key>.us`` (T, m, r) and ``<key>.vs`` (T, r, n) per factored key;
* ``deltas.safetensors``: ``<key>`` (T, *shape) per dense delta;
* ``router.safetensors`` (optional): a :class:`~fastmerge.twin.Router`'s state dict;
* ``manifest.json``: format version, task names, rank, shared method and every key's kind,
  shape, dtype and rank (and the router's sizes).

Everything is written into a temporary directory beside the target and moved into place
with ``os.replace``; an interrupted save leaves neither a partial directory nor a temporary
one, and an existing save is replaced only once the new one is complete.

This module is the file format only, below the objects it stores: it imports neither
:mod:`~fastmerge.twin.merger` nor :mod:`~fastmerge.twin.router` and works on anything
with their attributes (:class:`MergerState`, :class:`RouterState`). The public
:func:`~fastmerge.twin.save_twin`, :func:`~fastmerge.twin.load_twin` (in
:mod:`fastmerge.twin.merger`) and :func:`~fastmerge.twin.load_router` (in
:mod:`fastmerge.twin.router`) build on :func:`write_save`, :func:`read_save` and
:func:`read_router`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol, Union

import torch

from .._version import __version__

FORMAT = "fastmerge.twin"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PathLike = Union[str, os.PathLike]


class MergerState(Protocol):
    """What a save holds of a :class:`~fastmerge.twin.TwinMerger` (its attributes)."""

    task_names: tuple[str, ...]
    rank: Any
    shared_method: str
    shared_state: Mapping[str, torch.Tensor]
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    dense_deltas: Mapping[str, torch.Tensor]


class RouterState(Protocol):
    """What a save holds of a :class:`~fastmerge.twin.Router`: its sizes and state dict."""

    embed_dim: int
    num_tasks: int
    dropout: float

    def state_dict(self) -> Mapping[str, torch.Tensor]: ...


class SavedMerger(NamedTuple):
    """The contents of a save directory's merger files, as :func:`read_save` returns them."""

    task_names: tuple[str, ...]
    rank: Any
    shared_method: str
    shared_state: dict[str, torch.Tensor]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    dense_deltas: dict[str, torch.Tensor]


class SavedRouter(NamedTuple):
    """A saved router's constructor sizes and state dict, as :func:`read_router` returns."""

    embed_dim: int
    num_tasks: int
    dropout: float
    state: dict[str, torch.Tensor]


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as exc:  # a core dependency, but say what to do if it is missing
        raise ImportError("saving a TwinMerger needs safetensors: pip install safetensors") from exc
    return st


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _writable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory (safetensors refuses tied weights and
    views of one storage, so the second user of a storage gets a copy)."""
    storages: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def manifest_of(merger: MergerState, router: Optional[RouterState] = None) -> dict[str, Any]:
    """The JSON manifest describing `merger` (and `router`).

    Example:
        >>> twin = fastmerge.twin.TwinMerger({"w": torch.zeros(2, 2)}, [{"w": torch.eye(2)}])
        >>> manifest_of(twin)["tensors"]["w"]
        {'shape': [2, 2], 'dtype': 'float32', 'kind': 'shared'}
    """
    tensors: dict[str, Any] = {}
    for key, value in merger.shared_state.items():
        entry: dict[str, Any] = {"shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
        if key in merger.factors:
            entry.update(kind="factors", rank=int(merger.factors[key][0].shape[-1]))
        elif key in merger.dense_deltas:
            entry.update(kind="dense")
        else:
            entry.update(kind="shared")
        tensors[key] = entry
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastmerge_version": __version__,
        "task_names": list(merger.task_names),
        "rank": merger.rank,
        "shared_method": merger.shared_method,
        "keys": list(merger.shared_state),
        "tensors": tensors,
    }
    if router is not None:
        manifest["router"] = {
            "embed_dim": router.embed_dim,
            "num_tasks": router.num_tasks,
            "dropout": router.dropout,
        }
    return manifest


def write_save(
    merger: MergerState, directory: PathLike, *, router: Optional[RouterState] = None
) -> None:
    """Write `merger` (and `router`) to `directory`, atomically; no type checks (those are
    :func:`fastmerge.twin.save_twin`'s, which calls this).

    `directory` must not exist, be empty, or hold an earlier save (it is then replaced once
    the new one is complete); anything else raises FileExistsError rather than deleting a
    user's files.

    Example:
        >>> import tempfile, os
        >>> twin = fastmerge.twin.TwinMerger({"w": torch.zeros(3, 3)}, [{"w": torch.eye(3)}])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_save(twin, os.path.join(tmp, "twin"))
        ...     sorted(os.listdir(os.path.join(tmp, "twin")))
        ['deltas.safetensors', 'factors.safetensors', 'manifest.json', 'shared.safetensors']
    """
    target = Path(directory)
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_files(merger, router, tmp)
        _replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise FileExistsError(
            f"{target} is a non-empty directory without a {MANIFEST}: refusing to replace it"
        )


def _write_files(merger: MergerState, router: Optional[RouterState], tmp: Path) -> None:
    st = _safetensors()
    st.save_file(_writable(merger.shared_state), str(tmp / "shared.safetensors"))
    factors = {}
    for key, (us, vs) in merger.factors.items():
        factors[f"{key}.us"], factors[f"{key}.vs"] = us, vs
    st.save_file(_writable(factors), str(tmp / "factors.safetensors"))
    st.save_file(_writable(dict(merger.dense_deltas)), str(tmp / "deltas.safetensors"))
    if router is not None:
        st.save_file(_writable(router.state_dict()), str(tmp / "router.safetensors"))
    manifest = json.dumps(manifest_of(merger, router), indent=1)
    (tmp / MANIFEST).write_text(manifest + "\n")


def _replace_directory(tmp: Path, target: Path) -> None:
    """Move the finished `tmp` to `target`; an old `target` is moved aside first and only
    deleted once the new one is in place."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "save")
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / "save", target)  # put the previous save back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: PathLike) -> dict[str, Any]:
    """The manifest of a save directory (ValueError if it is not a Twin-Merging save).

    Example:
        >>> import tempfile
        >>> twin = fastmerge.twin.TwinMerger({"w": torch.zeros(2, 2)}, [{"w": torch.eye(2)}])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     twin.save(tmp)
        ...     read_manifest(tmp)["task_names"]
        ['task0']
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a TwinMerger save")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {manifest['format_version']}; this fastmerge reads "
            f"up to {FORMAT_VERSION}"
        )
    return manifest


def read_save(directory: PathLike, *, device: str = "cpu") -> SavedMerger:
    """The merger files of a save directory written by :func:`write_save`, tensors on
    `device` (:func:`fastmerge.twin.load_twin` makes a TwinMerger of them).

    Example:
        >>> import tempfile
        >>> twin = fastmerge.twin.TwinMerger({"w": torch.zeros(2, 2)}, [{"w": torch.eye(2)}])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_save(twin, tmp)
        ...     read_save(tmp).task_names
        ('task0',)
    """
    st = _safetensors()
    root = Path(directory)
    manifest = read_manifest(root)
    shared = st.load_file(str(root / "shared.safetensors"), device=device)
    factors = st.load_file(str(root / "factors.safetensors"), device=device)
    deltas = st.load_file(str(root / "deltas.safetensors"), device=device)
    saved = SavedMerger(
        task_names=tuple(manifest["task_names"]),
        rank=manifest["rank"],
        shared_method=manifest["shared_method"],
        shared_state={key: shared[key] for key in manifest["keys"]},
        factors={},
        dense_deltas={},
    )
    for key, entry in manifest["tensors"].items():
        if entry["kind"] == "factors":
            saved.factors[key] = (factors[f"{key}.us"], factors[f"{key}.vs"])
        elif entry["kind"] == "dense":
            saved.dense_deltas[key] = deltas[key]
    return saved


def read_router(directory: PathLike, *, device: str = "cpu") -> Optional[SavedRouter]:
    """The router saved beside a merger (sizes and state dict, tensors on `device`), or
    None if none was saved (:func:`fastmerge.twin.load_router` makes a Router of it).

    Example:
        >>> import tempfile
        >>> twin = fastmerge.twin.TwinMerger({"w": torch.zeros(2, 2)}, [{"w": torch.eye(2)}])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     write_save(twin, tmp, router=fastmerge.twin.Router(4, 2))
        ...     read_router(tmp).num_tasks
        2
    """
    manifest = read_manifest(directory)
    sizes = manifest.get("router")
    if sizes is None:
        return None
    state = _safetensors().load_file(str(Path(directory) / "router.safetensors"), device=device)
    return SavedRouter(sizes["embed_dim"], sizes["num_tasks"], sizes["dropout"], state)
