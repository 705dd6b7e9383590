"""The merge configuration: mergekit's YAML, parsed and checked before anything is read.

Every mergekit key that changes the result is understood::

    merge_method: task_arithmetic
    base_model: ./base
    models:
      - model: ./expert-a
        parameters:
          weight: [0.2, 0.8]            # a gradient over the layers
      - model: ./expert-b
        parameters:
          weight:
            - filter: self_attn         # tensors whose name contains "self_attn"
              value: 0.5
            - value: 1.0                # all the others
    parameters: {lambda: 0.9}
    dtype: float32                      # compute/cast dtype; out_dtype: the written one
    tokenizer_source: union             # or base, a model; or a `tokenizer:` block
    chat_template: chatml

or, instead of ``models``, ``slices`` of layers (``sources`` with ``model`` and
``layer_range``, per-slice ``base_model`` and ``parameters``), e.g. to stack layers with
``passthrough``. fastmerge adds ``seed`` (random masks), ``include`` and ``exclude``
(regexes of tensor names to merge; the others are copied from the base). mergekit keys
that fastmerge does not run (``modules``, ``residual_weight``, multi-stage ``name``) are
refused by name. What each parameter means is in :mod:`fastmerge.engine.params`; which
parameters a method takes is in its file under :mod:`fastmerge.engine.methods`.

``merge_method: twin`` and ``pleas`` are fastmerge's own whole-model methods with their
own keys (see :mod:`fastmerge.engine.methods.twin` and ``.pleas``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..io import CheckpointError
from .errors import ConfigError
from .params import check_setting
from .registry import MergeMethod, _short, get_method

PathLike = Union[str, "os.PathLike[str]"]

TOP_LEVEL_KEYS = (
    "merge_method",
    "models",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "seed",
    "include",
    "exclude",
)
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
#: mergekit keys fastmerge refuses, with the reason.
UNSUPPORTED = {
    "modules": "multi-module merges (`modules:`) are not supported; use `models` or `slices`",
    "name": "multi-stage configurations (`name:` per stage, mergekit-multi) are not supported; "
    "run one `fastmerge merge` per stage",
    "residual_weight": "`residual_weight` in slices is not supported",
}
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass
class ModelEntry:
    """One input model: its reference (a path or ``org/name[@revision]``), its own raw
    parameter settings, (``twin``) its task name, and its position in ``models`` (for
    messages: ``models[2].density``)."""

    path: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    name: Optional[str] = None
    index: Optional[int] = None


@dataclass
class SliceSource:
    """One source of an output slice: layers ``layer_range[0]:layer_range[1]`` of a model."""

    model: Path
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputSlice:
    """A run of output layers merged from the same layers of its sources."""

    sources: list[SliceSource]
    base_model: Optional[Path] = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


@dataclass
class MergeConfig:
    """A parsed, checked merge configuration.

    For the streaming methods, `experts` are the ``models`` entries other than the base
    (or None of them with ``slices``), `parameters` the top-level raw settings (resolved
    per tensor by the planner). For ``twin``/``pleas``, `shared` holds their parsed
    parameters.

    Example:
        >>> cfg = parse_config({"merge_method": "ties", "base_model": "b",
        ...                     "models": [{"model": "x", "parameters": {"density": 0.3}}]})
        >>> cfg.method, cfg.experts[0].parameters, str(cfg.base)
        ('ties', {'density': 0.3}, 'b')
    """

    method: str
    base: Optional[Path]
    experts: list[ModelEntry]
    shared: dict[str, Any] = field(default_factory=dict)
    dtype: Optional[torch.dtype] = None
    out_dtype: Optional[torch.dtype] = None
    tokenizer_source: Optional[Path] = None
    seed: int = 0
    include: Any = None
    exclude: Any = None
    raw: dict[str, Any] = field(default_factory=dict)
    module_path: Optional[Path] = None  # ``pleas``: a directory prepended to sys.path
    slices: Optional[list[OutputSlice]] = None
    parameters: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None  # a fastmerge.engine.tokenizer.TokenizerSettings, or None
    source: str = "config"
    base_parameters: dict[str, Any] = field(default_factory=dict)  # the base's own entry
    base_label: str = "base_model"  # where the base's own settings are, for messages

    @property
    def output_dtype(self) -> Optional[torch.dtype]:
        """Dtype of the merged floating tensors (None: the first input's), as mergekit:
        ``out_dtype``, else ``dtype``."""
        return self.out_dtype or self.dtype

    @property
    def method_info(self) -> MergeMethod:
        """The registered :class:`~fastmerge.engine.registry.MergeMethod`."""
        return get_method(self.method, self.source)

    def all_models(self) -> list[Path]:
        """Every distinct model reference: the base first (when there is one), then the
        others in order of first mention."""
        seen: list[Path] = []
        refs = [self.base] if self.base is not None else []
        refs += [e.path for e in self.experts]
        for s in self.slices or []:
            refs += [s.base_model] if s.base_model is not None else []
            refs += [src.model for src in s.sources]
        for r in refs:
            if r is not None and not any(same_model(r, x) for x in seen):
                seen.append(r)
        return seen


def same_model(a: Any, b: Any) -> bool:
    """Whether two model references name the same model (same resolved local path, or
    the same string)."""
    if str(a) == str(b):
        return True
    try:
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in a path
        return False


def load_config(path: PathLike) -> MergeConfig:
    """Read and check a YAML merge configuration; relative model paths are taken
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
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = f"byte {exc.start} is {exc.object[exc.start]:#x}"
        raise ConfigError(f"{p}: not a YAML text file (not UTF-8: {byte})") from None
    try:
        raw = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{p}: YAML nested too deeply") from None
    # ValueError: an integer of more than 4300 digits, a date out of range; TypeError,
    # OverflowError: other values PyYAML's constructors cannot build.
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(exc).split())[:300]})") from None
    return parse_config(raw, source=str(p))


def _unknown(keys: Any, valid: Sequence[str], where: str) -> None:
    bad = [k for k in keys if k not in valid]
    if bad:
        shown = repr(bad[0]) if isinstance(bad[0], str) and len(bad[0]) < 60 else "a key"
        raise ConfigError(f"{where}: unknown key {shown}; valid keys: {', '.join(valid)}")


def check_keys(raw: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    """ConfigError naming the first key of `raw` not in `valid`, listing the valid ones
    (mergekit keys that fastmerge refuses say why).

    Example:
        >>> check_keys({"rank": 1, "colour": 2}, ("rank",), "twin parameters")
        Traceback (most recent call last):
        ...
        fastmerge.engine.errors.ConfigError: twin parameters: unknown key 'colour'; valid keys: rank
    """
    for key in raw:
        if key in UNSUPPORTED and key not in valid:
            raise ConfigError(f"{where}: {UNSUPPORTED[key]}")
    _unknown(raw, valid, where)


def model_reference(value: Any, where: str) -> Path:
    """A ``model:`` value (a path or hub id string) as a Path; anything else is refused,
    and so is a string that can be neither (a NUL byte, a lone surrogate, a path
    component longer than the 255 bytes a file name may have).

    Example:
        >>> model_reference("x" * 300, "cfg: base_model")
        Traceback (most recent call last):
        ...
        fastmerge.engine.errors.ConfigError: cfg: base_model: a path component of 300 bytes ...
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a model path or hub id (a string)")
    if len(value) > 4096:
        raise ConfigError(f"{where}: a model reference of {len(value)} characters is too long")
    if "\0" in value:
        raise ConfigError(f"{where}: a model reference cannot contain a NUL byte")
    try:
        parts = value.encode("utf-8").split(b"/")
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in the YAML)
        raise ConfigError(f"{where}: a model reference must be valid Unicode text") from None
    longest = max(len(part) for part in parts)
    if longest > 255:
        raise ConfigError(
            f"{where}: a path component of {longest} bytes is longer than a file name can be"
        )
    return Path(value)


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
        check_keys(entry, valid, where)
        model_reference(entry["model"], f"{where}.model")
        entries.append(entry)
    return entries


def output_dtype(value: Any, key: str = "dtype") -> Optional[torch.dtype]:
    """The torch dtype of a config's ``dtype`` value (None stays None).

    Example:
        >>> output_dtype("bf16")
        torch.bfloat16
    """
    if value is None:
        return None
    if not isinstance(value, str) or value not in DTYPES:
        shown = repr(value) if isinstance(value, str) and len(value) < 40 else "that value"
        raise ConfigError(f"{key}: unsupported dtype {shown}; valid: {', '.join(DTYPES)}")
    return DTYPES[value]


def tokenizer_path(raw: Mapping[str, Any], default: Optional[Path], source: str) -> Optional[Path]:
    """Where config/tokenizer files are copied from by the whole-model methods:
    ``tokenizer_source`` (a path, or ``base``/absent for `default`); ``union`` is refused
    there (it needs the streaming engine's vocabulary alignment).

    Example:
        >>> tokenizer_path({}, Path("base"), "cfg")
        PosixPath('base')
    """
    value = raw.get("tokenizer_source")
    if value == "union":
        raise ConfigError(
            f"{source}: tokenizer_source 'union' is not supported for merge_method "
            f"{raw.get('merge_method')}; use 'base' or a path"
        )
    if value in (None, "base"):
        return default
    return model_reference(value, f"{source}: tokenizer_source")


def seed_of(raw: Mapping[str, Any], source: str) -> int:
    """The ``seed`` key (default 0), checked to be an integer.

    Example:
        >>> seed_of({"seed": 3}, "cfg")
        3
    """
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or abs(seed) >= 2**63:
        raise ConfigError(f"{source}: seed must be an integer (a 64-bit one)")
    return seed


def _patterns(value: Any, key: str, source: str) -> Any:
    if value is None:
        return value
    items = [value] if isinstance(value, str) else value
    strings = isinstance(items, list) and all(isinstance(v, str) for v in items)
    if not strings or len(items) >= 4096:
        raise ConfigError(f"{source}: {key} must be a regex or a list of regexes")
    for i, pattern in enumerate(items):
        at = f"{key}[{i}]" if isinstance(value, list) else key
        try:
            re.compile(pattern)
            nested = _nested_repeat(pattern)
        except (re.error, OverflowError, RecursionError) as exc:  # OverflowError: a{99999999999}
            raise ConfigError(
                f"{source}: {at}: {_short(pattern)} is not a valid regex ({str(exc)[:100]})"
            ) from None
        if nested:
            raise ConfigError(
                f"{source}: {at}: {_short(pattern)} repeats a repetition (like (a+)+), which "
                "can take exponential time on a tensor name; write it without the nesting"
            )
    return value


def _nested_repeat(pattern: str) -> bool:
    """Whether a regex has an unbounded repeat of something that repeats (``(a+)+``,
    ``(.*)*x``, ``(\\w+\\.?)+``): Python's re backtracks through every split of a name
    then, for minutes. (Ambiguous alternatives under a repeat, ``(a|a)*``, are not seen.)"""
    try:
        from re import _parser as parser  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.9, 3.10
        import sre_parse as parser  # type: ignore[no-redef]
    repeats = (parser.MAX_REPEAT, parser.MIN_REPEAT)

    def walk(node: Any, inside: bool) -> bool:
        if isinstance(node, parser.SubPattern):
            for op, av in node:
                unbounded = op in repeats and av[1] == parser.MAXREPEAT
                if op in repeats and inside and av[1] > 1:
                    return True
                if walk(av, inside or unbounded):
                    return True
        elif isinstance(node, (list, tuple)):
            return any(walk(x, inside) for x in node)
        return False

    return walk(parser.parse(pattern), False)


def _settings(raw: Any, method: MergeMethod, key: str, scopes: tuple[str, ...]) -> dict:
    """Raw parameter settings of one place in the YAML (`key`: ``cfg.yaml: parameters``,
    ``cfg.yaml: models[0].parameters``), with names and shapes checked."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: must be a mapping")
    valid = [p.name for p in method.parameters]
    if not valid and raw:
        raise ConfigError(f"{key}: merge_method {method.name} takes no parameters")
    _unknown(raw, valid, key)
    for name, setting in raw.items():
        p = method.parameter(name)
        if p.scope not in scopes:
            raise ConfigError(
                f"{key}.{name}: {name} is a {p.scope} parameter of "
                f"{method.name}; set it in the top-level (or slice) parameters"
            )
        check_setting(setting, f"{key}.{name}")
    return dict(raw)


def parse_config(raw: Any, source: str = "config") -> MergeConfig:
    """Check a configuration already loaded from YAML (a dict).

    Raises:
        ConfigError: unknown keys, an unknown method, missing models or base model,
            a malformed parameter setting (the message names the key and the valid ones).

    Example:
        >>> parse_config({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}],
        ...               "dtype": "bfloat16"}).output_dtype
        torch.bfloat16
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a merge configuration must be a YAML mapping")
    method = get_method(raw.get("merge_method"), source)
    if method.parse is not None:
        return method.parse(raw, source)
    check_keys(raw, TOP_LEVEL_KEYS, source)
    has_models, has_slices = raw.get("models") is not None, raw.get("slices") is not None
    if has_models == has_slices:
        raise ConfigError(f"{source}: give exactly one of 'models' and 'slices'")
    base = raw.get("base_model")
    base = model_reference(base, f"{source}: base_model") if base is not None else None
    everywhere = ("global", "model", "non_base")
    parameters = _settings(raw.get("parameters"), method, f"{source}: parameters", everywhere)
    experts, slices = [], None
    if has_models:
        for i, entry in enumerate(model_entries(raw["models"], MODEL_KEYS, source)):
            where = f"{source}: models[{i}]"
            own = _settings(
                entry.get("parameters"), method, f"{where}.parameters", ("model", "non_base")
            )
            experts.append(ModelEntry(Path(str(entry["model"])), own, index=i))
    else:
        slices = _slices(raw["slices"], method, source)
    if (
        method.base == "required"
        and base is None
        and not any(s.base_model is not None for s in slices or [])
    ):
        raise ConfigError(f"{source}: merge_method {method.name} needs a base_model")
    cfg = MergeConfig(
        method=method.name,
        base=base,
        experts=[e for e in experts if base is None or not same_model(e.path, base)],
        dtype=output_dtype(raw.get("dtype"), f"{source}: dtype"),
        out_dtype=output_dtype(raw.get("out_dtype"), f"{source}: out_dtype"),
        seed=seed_of(raw, source),
        include=_patterns(raw.get("include"), "include", source),
        exclude=_patterns(raw.get("exclude"), "exclude", source),
        raw=raw,
        slices=slices,
        parameters=parameters,
        source=source,
    )
    # The base model's own `parameters` entry (mergekit lists the base among the models).
    base_entry = next((e for e in experts if base is not None and same_model(e.path, base)), None)
    cfg.base_parameters = base_entry.parameters if base_entry is not None else {}
    if base_entry is not None and base_entry.parameters:
        cfg.base_label = f"models[{base_entry.index}]"  # its settings come from there
    if not cfg.experts and not slices:
        raise ConfigError(f"{source}: no models besides the base model")
    if any(raw.get(k) is not None for k in ("tokenizer_source", "tokenizer", "chat_template")):
        from .tokenizer import parse_tokenizer_settings  # imports transformers: only when needed

        cfg.tokenizer = parse_tokenizer_settings(raw, source)
        _check_tokenizer_source(cfg)
    return cfg


def _check_tokenizer_source(cfg: MergeConfig) -> None:
    """A tokenizer source that is a path must be a model of the merge or an existing
    directory (a hub id is resolved later); caught here, before any model is read."""
    settings = cfg.tokenizer
    value = getattr(settings, "source", None)
    if not isinstance(value, str) or value in ("base", "union"):
        return
    if any(same_model(value, m) for m in cfg.all_models()):
        return
    looks_local = value.startswith(("/", "./", "../", "~")) or value.count("/") > 1
    if looks_local and not Path(value).expanduser().is_dir():
        raise ConfigError(
            f"{cfg.source}: {getattr(settings, 'key', 'tokenizer_source')}: {value[:200]!r} is "
            "neither a model of this merge nor an existing directory"
        )


def _slices(raw: Any, method: MergeMethod, source: str) -> list[OutputSlice]:
    everywhere = ("global", "model", "non_base")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: 'slices' must be a non-empty list of {{sources: [...]}}")
    slices = []
    for i, entry in enumerate(raw):
        where = f"{source}: slices[{i}]"
        if not isinstance(entry, dict) or "sources" not in entry:
            raise ConfigError(f"{where} must be a mapping with 'sources'")
        check_keys(entry, SLICE_KEYS, where)
        sources_raw = entry["sources"]
        if not isinstance(sources_raw, list) or not sources_raw:
            raise ConfigError(f"{where}.sources must be a non-empty list")
        sources = []
        for j, src in enumerate(sources_raw):
            w = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"{w} must be a mapping with 'model' and 'layer_range'")
            check_keys(src, SOURCE_KEYS, w)
            lr = src["layer_range"]
            if (
                not isinstance(lr, list)
                or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                or not 0 <= lr[0] < lr[1]
            ):
                raise ConfigError(f"{w}.layer_range must be [start, stop] with 0 <= start < stop")
            params = _settings(
                src.get("parameters"), method, f"{w}.parameters", ("model", "non_base")
            )
            model = model_reference(src["model"], f"{w}.model")
            sources.append(SliceSource(model, (lr[0], lr[1]), params))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) != 1:
            raise ConfigError(
                f"{where}: all sources of a slice must have the same number of layers"
            )
        base = entry.get("base_model")
        slices.append(
            OutputSlice(
                sources,
                model_reference(base, f"{where}.base_model") if base is not None else None,
                _settings(entry.get("parameters"), method, f"{where}.parameters", everywhere),
            )
        )
    return slices
