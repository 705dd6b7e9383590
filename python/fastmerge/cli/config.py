"""The merge configuration: mergekit's YAML form for the methods both tools have.

A mergekit file works unchanged for ``linear``, ``task_arithmetic``, ``ties``,
``dare_ties`` and ``dare_linear``::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./expert-a
        parameters: {weight: 1.0, density: 0.3}
      - model: ./expert-b
        parameters: {weight: 1.0, density: 0.3}
    parameters: {normalize: true}
    dtype: float32

Per-model ``parameters`` override the top-level ones. Defaults are mergekit's: ``weight``
1 (mergekit requires it), ``density`` 1, ``lambda`` 1, ``normalize`` true for ``linear``
and ``ties`` and false otherwise, ``rescale`` true for the DARE methods. fastmerge adds
three optional top-level keys: ``seed`` (DARE masks), ``include`` and ``exclude`` (regexes
of the tensor names to merge; the others are copied from the base). Unknown keys, and
values fastmerge does not support (gradient lists, ``tokenizer_source: union``, ...), are
errors that say what is accepted.

fastmerge's own methods ``twin`` (:mod:`fastmerge.cli.twin`) and ``pleas``
(:mod:`fastmerge.cli.pleas`) have their own keys, described in those modules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..io import CheckpointError

PathLike = Union[str, "os.PathLike[str]"]

TOP_LEVEL_KEYS = (
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "seed",
    "include",
    "exclude",
)
MODEL_KEYS = ("model", "parameters")
#: method -> the parameters it accepts, with mergekit's defaults (None: no default).
METHOD_PARAMETERS: dict[str, dict[str, Any]] = {
    "linear": {"weight": 1.0, "normalize": True},
    "task_arithmetic": {"weight": 1.0, "normalize": False, "lambda": 1.0, "int8_mask": False},
    "ties": {
        "weight": 1.0,
        "density": 1.0,
        "normalize": True,
        "lambda": 1.0,
        "int8_mask": False,
        "rescale": False,
    },
    "dare_ties": {
        "weight": 1.0,
        "density": 1.0,
        "normalize": False,
        "lambda": 1.0,
        "int8_mask": False,
        "rescale": True,
    },
    "dare_linear": {
        "weight": 1.0,
        "density": 1.0,
        "normalize": False,
        "lambda": 1.0,
        "int8_mask": False,
        "rescale": True,
    },
}
#: fastmerge's own methods, parsed and run by :mod:`fastmerge.cli.twin` / ``.pleas``.
OWN_METHODS = ("twin", "pleas")
#: Parameters that belong to each model (the others are shared by all models).
PER_MODEL = ("weight", "density")
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


class ConfigError(ValueError):
    """A merge configuration fastmerge cannot run; the message says what is accepted."""


@dataclass
class ModelEntry:
    """One input model and its own parameters (weight, density)."""

    path: Path
    parameters: dict[str, float] = field(default_factory=dict)
    name: Optional[str] = None  # the task name (``twin``)


@dataclass
class MergeConfig:
    """A parsed, validated merge configuration.

    Example:
        >>> cfg = parse_config({"merge_method": "ties", "base_model": "b",
        ...                     "models": [{"model": "x", "parameters": {"density": 0.3}}]})
        >>> cfg.method, cfg.experts[0].parameters, cfg.shared["normalize"]
        ('ties', {'weight': 1.0, 'density': 0.3}, True)
    """

    method: str
    base: Optional[Path]
    experts: list[ModelEntry]
    shared: dict[str, Any]
    dtype: Optional[torch.dtype] = None
    out_dtype: Optional[torch.dtype] = None
    tokenizer_source: Optional[Path] = None
    seed: int = 0
    include: Any = None
    exclude: Any = None
    raw: dict[str, Any] = field(default_factory=dict)
    module_path: Optional[Path] = None  # ``pleas``: a directory prepended to sys.path

    @property
    def output_dtype(self) -> Optional[torch.dtype]:
        """Dtype of the merged floating tensors (None: the base's), as mergekit:
        ``out_dtype``, else ``dtype``."""
        return self.out_dtype or self.dtype

    def all_models(self) -> list[Path]:
        """The base (when there is one) followed by the experts."""
        return ([self.base] if self.base is not None else []) + [e.path for e in self.experts]


def load_config(path: PathLike) -> MergeConfig:
    """Read and validate a YAML merge configuration; relative model paths are taken
    relative to the current directory (as mergekit does).

    Raises:
        ConfigError: unreadable YAML or an invalid configuration.
        CheckpointError: the file does not exist.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such config file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from None
    return parse_config(raw, source=str(p))


def _unknown(keys, valid, where: str) -> None:
    bad = [k for k in keys if k not in valid]
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r}; valid keys: {', '.join(valid)}")


def _scalar(value: Any, name: str, where: str, kind: type) -> Any:
    if isinstance(value, (list, dict)):
        raise ConfigError(
            f"{where}: parameter {name!r} must be a single value; per-layer gradients and "
            "filters are not supported by fastmerge"
        )
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: parameter {name!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: parameter {name!r} must be a number, got {value!r}")
    return float(value)


def _parameters(raw: Any, valid: dict[str, Any], where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: parameters must be a mapping")
    _unknown(raw, list(valid), f"{where} parameters")
    return {k: _scalar(v, k, where, type(valid[k])) for k, v in raw.items()}


def _dtype(value: Any, key: str) -> Optional[torch.dtype]:
    if value is None:
        return None
    if value not in DTYPES:
        raise ConfigError(f"{key}: unsupported dtype {value!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[value]


def _same_path(a: Any, b: Any) -> bool:
    return Path(str(a)).resolve() == Path(str(b)).resolve()


def parse_config(raw: Any, source: str = "config") -> MergeConfig:
    """Validate a configuration already loaded from YAML (a dict).

    Raises:
        ConfigError: unknown keys, an unknown method, missing models or base model,
            unsupported parameter values (the message names the key and the valid ones).

    Example:
        >>> parse_config({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}],
        ...               "dtype": "bfloat16"}).output_dtype
        torch.bfloat16
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a merge configuration must be a YAML mapping")
    method = raw.get("merge_method")
    if method in OWN_METHODS:
        return _parse_own_method(raw, source)
    _unknown(raw, TOP_LEVEL_KEYS, source)
    if method not in METHOD_PARAMETERS:
        raise ConfigError(
            f"{source}: merge_method {method!r} is not supported; valid: "
            f"{', '.join([*METHOD_PARAMETERS, *OWN_METHODS])}"
        )
    valid = METHOD_PARAMETERS[method]
    shared = dict(valid)
    shared.update(_parameters(raw.get("parameters"), valid, source))
    base = raw.get("base_model")
    if method != "linear" and base is None:
        raise ConfigError(f"{source}: merge_method {method} needs a base_model")
    experts = []
    for i, entry in enumerate(model_entries(raw.get("models"), MODEL_KEYS, source)):
        where = f"{source}: models[{i}]"
        if method != "linear" and base is not None and _same_path(entry["model"], base):
            continue  # mergekit lists the base among the models; it is not an expert
        own = _parameters(entry.get("parameters"), valid, where)
        params = {k: own.get(k, shared[k]) for k in PER_MODEL if k in valid}
        experts.append(ModelEntry(Path(str(entry["model"])), params))
    if not experts:
        raise ConfigError(f"{source}: no models besides the base model")
    tokenizer = raw.get("tokenizer_source")
    if tokenizer == "union":
        raise ConfigError(
            f"{source}: tokenizer_source 'union' is not supported; use 'base' or a path"
        )
    if tokenizer in (None, "base"):  # linear has no base model: the first model's files
        tokenizer = base if base is not None else experts[0].path
    tokenizer_path = tokenizer
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{source}: seed must be an integer, got {seed!r}")
    return MergeConfig(
        method=method,
        base=Path(str(base)) if base is not None and method != "linear" else None,
        experts=experts,
        shared={k: v for k, v in shared.items() if k not in PER_MODEL},
        dtype=_dtype(raw.get("dtype"), "dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), "out_dtype"),
        tokenizer_source=Path(str(tokenizer_path)) if tokenizer_path is not None else None,
        seed=seed,
        include=raw.get("include"),
        exclude=raw.get("exclude"),
        raw=raw,
    )


def _parse_own_method(raw: dict[str, Any], source: str) -> MergeConfig:
    if raw["merge_method"] == "twin":
        from .twin import parse_twin  # imported late: it imports this module

        return parse_twin(raw, source)
    from .pleas import parse_pleas

    return parse_pleas(raw, source)


def model_entries(models: Any, valid: Sequence[str], source: str) -> list[dict[str, Any]]:
    """The ``models`` list as mappings with a ``model`` key and only `valid` keys (a bare
    path stands for ``{model: PATH}``).

    Example:
        >>> model_entries(["a", {"model": "b", "name": "math"}], ("model", "name"), "cfg")
        [{'model': 'a'}, {'model': 'b', 'name': 'math'}]
    """
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{source}: 'models' must be a non-empty list of {{model: PATH}}")
    entries = []
    for i, entry in enumerate(models):
        where = f"{source}: models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{where} must be a mapping with a 'model' key")
        _unknown(entry, valid, where)
        entries.append(entry)
    return entries


def check_keys(raw: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    """ConfigError naming the first key of `raw` not in `valid`, listing the valid ones.

    Example:
        >>> check_keys({"rank": 1, "colour": 2}, ("rank",), "twin parameters")
        Traceback (most recent call last):
        ...
        fastmerge.cli.config.ConfigError: twin parameters: unknown key 'colour'; valid keys: rank
    """
    _unknown(raw, valid, where)


def output_dtype(value: Any, key: str = "dtype") -> Optional[torch.dtype]:
    """The torch dtype of a config's ``dtype`` value (None stays None).

    Example:
        >>> output_dtype("bf16")
        torch.bfloat16
    """
    return _dtype(value, key)


def tokenizer_path(raw: Mapping[str, Any], default: Optional[Path], source: str) -> Optional[Path]:
    """Where config/tokenizer files are copied from: ``tokenizer_source`` (a path, or
    ``base``/absent for `default`); ``union`` is refused.

    Example:
        >>> tokenizer_path({}, Path("base"), "cfg")
        PosixPath('base')
    """
    value = raw.get("tokenizer_source")
    if value == "union":
        raise ConfigError(
            f"{source}: tokenizer_source 'union' is not supported; use 'base' or a path"
        )
    if value in (None, "base"):
        return default
    return Path(str(value))


def seed_of(raw: Mapping[str, Any], source: str) -> int:
    """The ``seed`` key (default 0), checked to be an integer.

    Example:
        >>> seed_of({"seed": 3}, "cfg")
        3
    """
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{source}: seed must be an integer, got {seed!r}")
    return seed
