"""PEFT LoRA adapters: read, validate, and apply to a base checkpoint tensor by tensor.

A PEFT LoRA adapter directory holds ``adapter_config.json`` (``peft_type: LORA``, ``r``,
``lora_alpha``, ``rank_pattern``/``alpha_pattern``, ``use_rslora``, ``fan_in_fan_out``)
and ``adapter_model.safetensors`` with, per adapted module ``M`` of the base model:

* a linear layer: ``base_model.model.M.lora_A.weight`` (r, in) and
  ``base_model.model.M.lora_B.weight`` (out, r); its weight changes by
  ``scale * B @ A`` (transposed with ``fan_in_fan_out``);
* an embedding: ``base_model.model.M.lora_embedding_A`` (r, vocab) and
  ``base_model.model.M.lora_embedding_B`` (dim, r); its weight changes by
  ``scale * (B @ A).T``;
* optionally ``base_model.model.M.lora_B.bias`` (added to ``M.bias``, as mergekit writes
  it) and full tensors ``base_model.model.NAME`` that replace the base's ``NAME``
  (``modules_to_save``; ``M.base_layer.weight``, which PEFT saves with an adapted
  embedding, replaces ``M.weight``).

``scale`` is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), ``r`` and
``alpha`` of the module from ``rank_pattern``/``alpha_pattern`` when a pattern matches
its name (PEFT's rule: the pattern matches the name's end at a dot boundary), else the
config's ``r`` and ``lora_alpha``.

:func:`adapt_checkpoint` wraps a base :class:`fastmerge.io.Checkpoint` so that every
tensor it reads has the adapter merged in (``W + scale * B @ A``), computed only when that
tensor is read: what ``model: base+adapter`` means in a merge configuration.

Example:
    >>> import json, tempfile, torch, safetensors.torch
    >>> d = tempfile.mkdtemp()
    >>> _ = open(f"{d}/adapter_config.json", "w").write(json.dumps(
    ...     {"peft_type": "LORA", "r": 1, "lora_alpha": 2}))
    >>> safetensors.torch.save_file({
    ...     "base_model.model.fc.lora_A.weight": torch.ones(1, 3),
    ...     "base_model.model.fc.lora_B.weight": torch.ones(2, 1)},
    ...     f"{d}/adapter_model.safetensors")
    >>> adapter = load_adapter(d)
    >>> adapter.modules, adapter.delta("fc").tolist()
    (['fc'], [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..io import Checkpoint, CheckpointError, TensorInfo, open_checkpoint

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PREFIX",
    "AdaptedCheckpoint",
    "LoraAdapter",
    "LoraError",
    "LoraModule",
    "adapt_checkpoint",
    "load_adapter",
    "pattern_value",
]

PathLike = Union[str, "os.PathLike[str]"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Every tensor name of a PEFT adapter (of a causal LM) starts with this.
PREFIX = "base_model.model."

_SUFFIXES = {
    ".lora_A.weight": ("linear", "a"),
    ".lora_B.weight": ("linear", "b"),
    ".lora_embedding_A": ("embedding", "a"),
    ".lora_embedding_B": ("embedding", "b"),
}
_BIAS = ".lora_B.bias"


class LoraError(CheckpointError):
    """A LoRA adapter, or a LoRA extraction's input, that fastmerge cannot use; the
    message names the directory and the module or key at fault.

    Example:
        >>> raise LoraError("adapters/x: not a PEFT adapter (no adapter_config.json)")
        Traceback (most recent call last):
        ...
        fastmerge.lora.adapter.LoraError: adapters/x: not a PEFT adapter (no adapter_config.json)
    """


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """The value of the first key of `patterns` matching the module `name` as PEFT matches
    ``rank_pattern``/``alpha_pattern`` keys (a regular expression matching the end of the
    name at a dot boundary), else `default`.

    Example:
        >>> pattern_value({"q_proj": 4}, "model.layers.0.self_attn.q_proj", 16)
        4
        >>> pattern_value({"q_proj": 4}, "model.layers.0.self_attn.k_proj", 16)
        16
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its `kind` (``"linear"`` or ``"embedding"``), the adapter's
    keys of its factors, its rank and scale, and whether its weight is stored transposed
    (``fan_in_fan_out``).

    Example:
        >>> LoraModule("fc", "linear", "A", "B", rank=4, scale=2.0).weight
        'fc.weight'
    """

    name: str
    kind: str
    key_a: str
    key_b: str
    rank: int
    scale: float
    transposed: bool = False

    @property
    def weight(self) -> str:
        """The name of the base tensor this module changes."""
        return f"{self.name}.weight"


class LoraAdapter:
    """A validated PEFT LoRA adapter, its tensors read from disk only when asked for.

    ``modules`` are the adapted modules' names; :meth:`delta` gives one module's weight
    change, :meth:`apply` one base tensor with the adapter merged in. Build one with
    :func:`load_adapter`.

    Example:
        >>> import json, tempfile, torch, safetensors.torch
        >>> d = tempfile.mkdtemp()
        >>> _ = open(f"{d}/adapter_config.json", "w").write(json.dumps(
        ...     {"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
        >>> safetensors.torch.save_file({
        ...     "base_model.model.fc.lora_A.weight": torch.ones(1, 2),
        ...     "base_model.model.fc.lora_B.weight": torch.ones(2, 1)},
        ...     f"{d}/adapter_model.safetensors")
        >>> load_adapter(d).apply("fc.weight", torch.zeros(2, 2)).tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        tensors: Checkpoint,
        modules: dict[str, LoraModule],
        biases: dict[str, str],
        full: dict[str, str],
    ) -> None:
        self.path = path
        self.config = config
        self._tensors = tensors
        self._modules = modules
        self._by_weight = {m.weight: m for m in modules.values()}
        self._biases = biases  # base bias name -> adapter key
        self._full = full  # base tensor name -> adapter key

    @property
    def modules(self) -> list[str]:
        """The adapted modules' names (as in the base model's state dict)."""
        return list(self._modules)

    def module(self, name: str) -> LoraModule:
        """The description of the adapted module `name`."""
        try:
            return self._modules[name]
        except KeyError:
            raise LoraError(f"{self.path}: the adapter has no module {name!r}") from None

    @property
    def targets(self) -> list[str]:
        """The base tensors the adapter changes (weights, biases, replaced tensors)."""
        return [*self._by_weight, *self._biases, *self._full]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored ``(A, B)`` of module `name` (PEFT's layout, unscaled)."""
        m = self.module(name)
        return self._tensors[m.key_a], self._tensors[m.key_b]

    def delta(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` of module `name` in its weight's layout, in float32 (float64
        for float64 factors)."""
        m = self.module(name)
        a, b = self.factors(name)
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        d = (b.to(dtype) @ a.to(dtype)).mul_(m.scale)
        return d.T if (m.kind == "embedding") != m.transposed else d

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Base tensor `name` with the adapter merged in (a new tensor of its dtype; the
        input itself when the adapter leaves it alone)."""
        return self.apply_rows(name, tensor, 0, tensor.shape[0] if tensor.dim() else 0)

    def apply_rows(self, name: str, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of base tensor `name` (given as `rows`) with the adapter
        merged in."""
        if name in self._full:  # replaced first, then changed as any other tensor
            rows = self._tensors[self._full[name]][start:stop].to(rows.dtype)
        if name in self._biases:
            bias = self._tensors[self._biases[name]][start:stop]
            return (rows.to(torch.float32) + bias.to(torch.float32)).to(rows.dtype)
        m = self._by_weight.get(name)
        if m is None:
            return rows
        a, b = self.factors(m.name)
        dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        a, b = a.to(dtype), b.to(dtype)
        if (m.kind == "embedding") != m.transposed:  # weight = (B @ A).T: rows of A.T @ B.T
            d = a[:, start:stop].T @ b.T
        else:
            d = b[start:stop] @ a
        return torch.add(rows.to(dtype), d, alpha=m.scale).to(rows.dtype)  # not in place

    def check_base(self, base: Mapping[str, Any], where: str = "base model") -> None:
        """Raise LoraError unless every tensor the adapter changes is in `base` (a
        :class:`~fastmerge.io.Checkpoint`) with the shape the adapter's factors give."""
        info = getattr(base, "info", None)
        for m in self._modules.values():
            if m.weight not in base:
                raise LoraError(
                    f"{self.path}: module {m.name!r} has no weight {m.weight!r} in the {where}"
                )
            shape = info(m.weight).shape if info else tuple(base[m.weight].shape)
            a = self._tensors.info(m.key_a).shape
            b = self._tensors.info(m.key_b).shape
            want = (b[0], a[1])
            if (m.kind == "embedding") != m.transposed:
                want = want[::-1]
            if tuple(shape) != want:
                raise LoraError(
                    f"{self.path}: module {m.name!r}: the adapter's factors make a "
                    f"{list(want)} change but {m.weight!r} is {list(shape)} in the {where} "
                    "(an adapter of another model?)"
                )
        for name, key in [*self._biases.items(), *self._full.items()]:
            if name not in base:
                raise LoraError(f"{self.path}: {key!r}: the {where} has no tensor {name!r}")
            shape = info(name).shape if info else tuple(base[name].shape)
            if tuple(self._tensors.info(key).shape) != tuple(shape):
                raise LoraError(
                    f"{self.path}: {key!r} is {list(self._tensors.info(key).shape)} but "
                    f"{name!r} is {list(shape)} in the {where}"
                )

    def close(self) -> None:
        """Close the adapter's file."""
        self._tensors.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self._modules)} modules)"


def load_adapter(path: PathLike) -> LoraAdapter:
    """Open and validate the PEFT LoRA adapter in directory `path` (headers only: the
    factors are read when used).

    Raises:
        LoraError: not a directory, no ``adapter_config.json`` (not a PEFT adapter), a
            ``peft_type`` other than LORA, DoRA, only pickle weights, a module with one
            factor or mismatched factor shapes, a rank that differs from the config's.

    Example:
        >>> import tempfile
        >>> load_adapter(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        fastmerge.lora.adapter.LoraError: ...: not a PEFT adapter directory (no adapter_config.json)
    """
    p = Path(path)
    if not p.is_dir():
        raise LoraError(
            f"{p}: a LoRA adapter must be a directory (adapter_config.json + "
            f"{ADAPTER_WEIGHTS}){'' if p.exists() else '; it does not exist'}"
        )
    config = _read_config(p)
    weights = p / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = (p / "adapter_model.bin").is_file()
        hint = (
            " (only the pickle adapter_model.bin: re-save it with safetensors)" if pickled else ""
        )
        raise LoraError(f"{p}: no {ADAPTER_WEIGHTS}{hint}")
    tensors = open_checkpoint(weights)
    try:
        modules, biases, full = _parse_keys(p, config, tensors)
    except BaseException:
        tensors.close()
        raise
    return LoraAdapter(p, config, tensors, modules, biases, full)


def _read_config(p: Path) -> dict[str, Any]:
    file = p / ADAPTER_CONFIG
    if not file.is_file():
        raise LoraError(f"{p}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise LoraError(f"{file}: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(config, dict):
        raise LoraError(f"{file}: must be a JSON object")
    kind = config.get("peft_type")
    if str(kind).upper() != "LORA":
        raise LoraError(f"{file}: peft_type is {kind!r}; only LoRA adapters (LORA) are supported")
    if config.get("use_dora"):
        raise LoraError(f"{file}: DoRA adapters (use_dora: true) are not supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LoraError(f"{file}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise LoraError(f"{file}: {key} must be an object of module pattern -> number")
    return config


def _parse_keys(p: Path, config: dict[str, Any], tensors: Checkpoint):
    """modules, biases (base name -> key), full tensors (base name -> key) of the file."""
    parts: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    biases: dict[str, str] = {}
    full: dict[str, str] = {}
    for key in tensors:
        if not key.startswith(PREFIX):
            raise LoraError(
                f"{p / ADAPTER_WEIGHTS}: key {key!r} does not start with {PREFIX!r} "
                "(not a PEFT adapter of a model)"
            )
        if "lora_magnitude_vector" in key:
            raise LoraError(f"{p}: {key!r}: DoRA adapters are not supported")
        for suffix, (kind, which) in _SUFFIXES.items():
            if key.endswith(suffix):
                name = key[len(PREFIX) : -len(suffix)]
                if kinds.setdefault(name, kind) != kind:
                    raise LoraError(f"{p}: module {name!r} has both linear and embedding factors")
                parts.setdefault(name, {})[which] = key
                break
        else:
            if key.endswith(_BIAS):
                biases[key[len(PREFIX) : -len(_BIAS)] + ".bias"] = key
            elif ".lora_" in key:
                raise LoraError(
                    f"{p}: {key!r}: not a LoRA factor fastmerge knows "
                    "(lora_A/lora_B, lora_embedding_A/B)"
                )
            else:  # a whole tensor (modules_to_save; PEFT's saved embedding base_layer)
                full[key[len(PREFIX) :].replace(".base_layer.", ".")] = key
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    transposed = bool(config.get("fan_in_fan_out", False))
    modules: dict[str, LoraModule] = {}
    for name, found in parts.items():
        missing = {"a", "b"} - set(found)
        if missing:
            present = next(iter(found.values()))
            raise LoraError(
                f"{p}: module {name!r} has {present!r} but no lora_{missing.pop().upper()} factor"
            )
        a, b = tensors.info(found["a"]).shape, tensors.info(found["b"]).shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise LoraError(
                f"{p}: module {name!r}: factors A {list(a)} and B {list(b)} do not "
                "chain (A is r x in, B is out x r)"
            )
        rank = int(pattern_value(rank_pattern, name, r0))
        if rank != a[0]:
            raise LoraError(
                f"{p}: module {name!r}: the factors have rank {a[0]} but the config says r = {rank}"
            )
        alpha = float(pattern_value(alpha_pattern, name, alpha0))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[name] = LoraModule(
            name,
            kinds[name],
            found["a"],
            found["b"],
            rank,
            scale,
            transposed and kinds[name] == "linear",
        )
    if not modules and not full and not biases:
        raise LoraError(f"{p / ADAPTER_WEIGHTS}: holds no LoRA factors")
    return modules, biases, full


class AdaptedCheckpoint(Checkpoint):
    """A base checkpoint with a LoRA adapter merged into every tensor it changes, lazily:
    ``ckpt[name]`` reads the base tensor and adds that module's ``scale * B @ A``; other
    tensors are the base's as they are. Build one with :func:`adapt_checkpoint`.

    Example:
        >>> import json, tempfile, torch, safetensors.torch
        >>> d = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"fc.weight": torch.zeros(2, 2)}, f"{d}/m.safetensors")
        >>> _ = open(f"{d}/adapter_config.json", "w").write(json.dumps(
        ...     {"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
        >>> safetensors.torch.save_file({
        ...     "base_model.model.fc.lora_A.weight": torch.ones(1, 2),
        ...     "base_model.model.fc.lora_B.weight": torch.ones(2, 1)},
        ...     f"{d}/adapter_model.safetensors")
        >>> adapt_checkpoint(open_checkpoint(f"{d}/m.safetensors"), d)["fc.weight"].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """

    def __init__(self, base: Checkpoint, adapter: LoraAdapter) -> None:
        super().__init__(base.path, {})
        self.base = base
        self.adapter = adapter
        self._changed = set(adapter.targets)

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.base[name]
        return self.adapter.apply(name, t) if name in self._changed else t

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        rows = self.base.read_rows(name, start, stop)
        if name not in self._changed:
            return rows
        return self.adapter.apply_rows(name, rows, start, stop)

    def file_of(self, name: str) -> str:
        return self.base.file_of(name)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __repr__(self) -> str:
        return f"AdaptedCheckpoint({self.base!r} + {self.adapter!r})"


def adapt_checkpoint(
    base: Checkpoint, adapter: Union[LoraAdapter, PathLike], where: Optional[str] = None
) -> AdaptedCheckpoint:
    """`base` with `adapter` (a :class:`LoraAdapter` or its directory) merged in lazily,
    after checking that every tensor the adapter changes is in `base` with a matching
    shape (the LoraError names the module; `where` names the base in it).

    Example:
        >>> import tempfile, safetensors.torch
        >>> d = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"w": torch.ones(1)}, f"{d}/m.safetensors")
        >>> adapt_checkpoint(open_checkpoint(f"{d}/m.safetensors"), d)
        Traceback (most recent call last):
        ...
        fastmerge.lora.adapter.LoraError: ...: not a PEFT adapter directory (no adapter_config.json)
    """
    if not isinstance(adapter, LoraAdapter):
        adapter = load_adapter(adapter)
    adapter.check_base(base, where or f"base model {base.path}")
    return AdaptedCheckpoint(base, adapter)
