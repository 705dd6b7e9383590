"""``merge_method: pleas`` in ``fastmerge merge``: PLeaS merges of two models.

PLeaS works on ``nn.Module`` s and needs data, so the configuration names two Python
callables as ``"package.module:function"``::

    merge_method: pleas
    module_path: ./my_project          # optional: a directory prepended to sys.path
    models:
      - model: ./model-a               # two checkpoints of one architecture
      - model: ./model-b
    parameters:
      model: my_models:build_resnet    # () -> nn.Module of the architecture
      data: my_models:calibration      # () -> iterable of input batches
      budget: 1.5                      # FLOPs of the merged model / one model's, in [1, 2]
      allocation: greedy               # optional (default: greedy; zipit: stagewise)
      ridge: 1.0e-4
      data_free: false
      method: pleas                    # pleas | zipit | permute | average
    seed: 0                            # torch's seed while the functions run

The ``model`` function is called twice; each instance gets one checkpoint with
``load_state_dict``. :func:`fastmerge.pleas.merge` merges them; the merged model's
``state_dict`` is written as safetensors shards with their index,
``fastmerge_config.yaml`` and ``pleas_info.json`` (the merge's ``fastmerge_info``: method,
budget, per-group ratios and widths, relative FLOPs, least-squares fits). The merged model
is wider than the inputs where units were kept from both (``widths``), so it loads into
the merged architecture, not into the ``model`` function's. The output appears only when
complete.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from ...io import CheckpointError, ShardedWriter, TensorSpec, open_checkpoint
from ...io.writer import check_output_dir
from ..config import ConfigError, MergeConfig, ModelEntry, check_keys, model_entries, seed_of
from ..output import CONFIG_NAME, MergeSummary, peak_rss_bytes
from ..registry import MergeMethod, register

TOP_LEVEL_KEYS = ("merge_method", "models", "parameters", "module_path", "seed")
MODEL_KEYS = ("model",)
#: parameter -> default (None: no default, or fastmerge.pleas.merge's own).
PARAMETERS: dict[str, Any] = {
    "model": None,
    "data": None,
    "budget": 1.0,
    "allocation": None,
    "ridge": 1e-4,
    "data_free": False,
    "method": "pleas",
    "cost": "neg_sq_distance",
    "sequential": False,
}
_NUMBERS = ("budget", "ridge")
_FLAGS = ("data_free", "sequential")
INFO_NAME = "pleas_info.json"


def parse_pleas(raw: dict[str, Any], source: str = "config") -> MergeConfig:
    """Validate a ``merge_method: pleas`` configuration (already loaded from YAML). The
    callables are only imported when the merge runs.

    Raises:
        ConfigError: unknown keys (listing the valid ones), not exactly two models, a
            missing or malformed ``model``/``data`` callable name, a value of the wrong type.

    Example:
        >>> cfg = parse_pleas({"merge_method": "pleas", "models": ["a", "b"],
        ...     "parameters": {"model": "nets:mlp", "data": "nets:batches", "budget": 1.5}})
        >>> cfg.shared["budget"], cfg.shared["method"], [str(e.path) for e in cfg.experts]
        (1.5, 'pleas', ['a', 'b'])
    """
    check_keys(raw, TOP_LEVEL_KEYS, source)
    entries = model_entries(raw.get("models"), MODEL_KEYS, source)
    if len(entries) != 2:
        raise ConfigError(
            f"{source}: merge_method pleas merges exactly 2 models, got {len(entries)}"
        )
    module_path = raw.get("module_path")
    if module_path is not None and not isinstance(module_path, str):
        raise ConfigError(f"{source}: module_path must be a directory path, got {module_path!r}")
    return MergeConfig(
        method="pleas",
        base=None,
        experts=[ModelEntry(Path(str(e["model"]))) for e in entries],
        shared=_parameters(raw.get("parameters"), f"{source}: parameters"),
        seed=seed_of(raw, source),
        raw=raw,
        module_path=Path(module_path) if module_path is not None else None,
        source=source,
    )


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with 'model' and 'data'")
    check_keys(raw, list(PARAMETERS), where)
    params = {**PARAMETERS, **raw}
    for key in ("model", "data"):
        _split_callable(params[key], key)
    for key in _NUMBERS:
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        params[key] = float(value)
    for key in _FLAGS:
        if not isinstance(params[key], bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {params[key]!r}")
    for key, valid in _choices().items():
        if params[key] is not None and params[key] not in valid:
            raise ConfigError(f"{where}: {key} {params[key]!r} is not one of {', '.join(valid)}")
    return params


def _choices() -> dict[str, tuple[str, ...]]:
    from ...pleas.allocation import STRATEGIES
    from ...pleas.matching import COST_KINDS
    from ...pleas.merging import METHODS

    return {"allocation": STRATEGIES, "method": METHODS, "cost": COST_KINDS}


def _split_callable(spec: Any, key: str) -> tuple[str, str]:
    module, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not (sep and module and attr):
        raise ConfigError(
            f"parameters.{key} must name a function as 'package.module:function', got {spec!r}"
        )
    return module, attr


@contextmanager
def module_path(directory: Optional[Path]) -> Iterator[None]:
    """`directory` first on ``sys.path`` for the duration (nothing when None), so that a
    user's local file can be imported.

    Example:
        >>> import sys, tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> with module_path(d):
        ...     sys.path[0] == str(d.resolve())
        True
    """
    if directory is None:
        yield
        return
    if not directory.is_dir():
        raise ConfigError(f"module_path: {directory} is not a directory")
    entry = str(directory.resolve())
    sys.path.insert(0, entry)
    importlib.invalidate_caches()  # the directory may hold files written just now
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


def resolve_callable(spec: str, key: str) -> Callable[..., Any]:
    """The function named ``"package.module:function"`` (a dotted attribute path after the
    colon is allowed).

    Raises:
        ConfigError: a malformed name, a module that cannot be imported, a missing
            attribute or one that is not callable; the message names `key`.

    Example:
        >>> resolve_callable("math:sqrt", "model")(4.0)
        2.0
    """
    module_name, attr = _split_callable(spec, key)
    try:
        obj: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # any failure while importing the user's module
        raise ConfigError(
            f"parameters.{key}: cannot import {module_name!r} ({_failure(exc)})"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"parameters.{key}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"parameters.{key}: {spec!r} is not callable")
    return obj


def _failure(exc: BaseException) -> str:
    """One line for an exception of the user's code (sys.exit too), bounded in length."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({text})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _call(fn: Callable[[], Any], spec: str, key: str) -> Any:
    try:
        return fn()
    except (Exception, SystemExit) as exc:  # the user's function failed: say which one
        if isinstance(exc, SystemExit):
            raise ConfigError(f"parameters.{key}: {spec}() exited: {_failure(exc)}") from None
        raise ConfigError(f"parameters.{key}: {spec}() raised {_failure(exc)}") from None


def _build_model(fn: Callable[[], Any], spec: str, path: Path, allow_pickle: bool) -> nn.Module:
    """A new instance from the ``model`` function, with the weights of checkpoint `path`.

    Raises:
        ConfigError: the function did not return an ``nn.Module``.
        CheckpointError: the checkpoint is missing/corrupt or does not fit the module.
    """
    module = _call(fn, spec, "model")
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"parameters.model: {spec}() returned {type(module).__name__}, not an nn.Module"
        )
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    try:
        state = dict(checkpoint.items())
    finally:
        checkpoint.close()
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # missing/unexpected keys, shape mismatches
        raise CheckpointError(f"{path}: does not fit the module of {spec} ({exc})") from None
    return module.eval()


def _load_data(fn: Callable[[], Any], spec: str) -> Iterable[Any]:
    """The batches from the ``data`` function (ConfigError unless it returns an iterable)."""
    data = _call(fn, spec, "data")
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, torch.Tensor)):
        raise ConfigError(
            f"parameters.data: {spec}() returned {type(data).__name__}, not an iterable of batches"
        )
    return data


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def check_trusted(cfg: MergeConfig, trust_remote_code: bool) -> None:
    """Refuse, before anything is imported, to run the configuration's Python functions
    unless the caller opted in.

    Raises:
        ConfigError: naming the keys whose code would run, and the flag that allows it.

    Example:
        >>> cfg = parse_pleas({"merge_method": "pleas", "models": ["a", "b"],
        ...     "parameters": {"model": "nets:mlp", "data": "nets:batches"}})
        >>> try:
        ...     check_trusted(cfg, trust_remote_code=False)
        ... except ConfigError as exc:
        ...     print(str(exc)[:70])
        config: parameters.model, parameters.data: merge_method pleas imports
    """
    if trust_remote_code:
        return
    params = cfg.shared
    keys = "parameters.model, parameters.data" + (", module_path" if cfg.module_path else "")
    raise ConfigError(
        f"{cfg.source}: {keys}: merge_method pleas imports and runs the Python functions "
        f"{str(params['model'])[:100]!r} and {str(params['data'])[:100]!r} named in the "
        "configuration; pass --trust-remote-code (trust_remote_code=True) to allow it"
    )


def _merge(
    cfg: MergeConfig, *, device: str = "cpu", allow_pickle: bool = False
) -> tuple[nn.Module, int]:
    """Import the callables, build both models, and run :func:`fastmerge.pleas.merge` with
    the configuration's parameters (:func:`check_trusted` first).

    Returns:
        the merged module (with ``fastmerge_info``) and the bytes of the two inputs.
    """
    from ... import pleas

    params = cfg.shared
    with module_path(cfg.module_path), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        build = resolve_callable(params["model"], "model")
        batches = resolve_callable(params["data"], "data")
        a, b = (_build_model(build, params["model"], e.path, allow_pickle) for e in cfg.experts)
        data = _load_data(batches, params["data"])
        merged = pleas.merge(
            a.to(device),
            b.to(device),
            data,
            method=params["method"],
            budget=params["budget"],
            cost=params["cost"],
            allocation=params["allocation"],
            ridge=params["ridge"],
            sequential=params["sequential"],
            data_free=params["data_free"],
        )
    return merged, _nbytes(a) + _nbytes(b)


def jsonable(value: Any) -> Any:
    """`value` with tensors, named tuples and dataclasses turned into JSON types; a
    non-finite float becomes its name (``"nan"``, ``"inf"``).

    Example:
        >>> jsonable({"ratio": torch.tensor(0.5), "fits": (1, float("inf"))})
        {'ratio': 0.5, 'fits': [1, 'inf']}
    """
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if hasattr(value, "_asdict"):  # a named tuple: keep the field names
        return jsonable(value._asdict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    return str(value)


def run_pleas(
    cfg: MergeConfig,
    out_dir: Union[str, os.PathLike],
    *,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    shard_bytes: int,
    progress: bool = False,
    trust_remote_code: bool = False,
    fsync: bool = True,
) -> MergeSummary:
    """Merge the two models of `cfg` and write the output directory (see the module
    documentation); called by :func:`fastmerge.engine.run`. The configuration's functions
    are imported and run only with `trust_remote_code`.

    Returns:
        the :class:`~fastmerge.engine.output.MergeSummary`.

    Example:
        >>> import tempfile, safetensors.torch
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "nets_doc.py").write_text(
        ...     "import torch\\n"
        ...     "def mlp(): return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(),"
        ...     " torch.nn.Linear(8, 2))\\n"
        ...     "def data(): return [torch.ones(4, 3) * i for i in range(3)]\\n")
        >>> for seed in (1, 2):
        ...     _ = torch.manual_seed(seed)
        ...     net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        ...     safetensors.torch.save_file(net.state_dict(), d / f"m{seed}.safetensors")
        >>> cfg = parse_pleas({"merge_method": "pleas", "module_path": str(d),
        ...     "models": [str(d / "m1.safetensors"), str(d / "m2.safetensors")],
        ...     "parameters": {"model": "nets_doc:mlp", "data": "nets_doc:data", "budget": 1.5}})
        >>> run_pleas(cfg, d / "out", shard_bytes=1 << 30, trust_remote_code=True).tensors
        4
        >>> json.loads((d / "out" / INFO_NAME).read_text())["widths"]
        {'0': 12}
    """
    import yaml

    del progress  # fastmerge.pleas.merge has no progress bar
    start = time.perf_counter()
    check_trusted(cfg, trust_remote_code)
    check_output_dir(out_dir, overwrite)
    merged, bytes_read = _merge(cfg, device=device, allow_pickle=allow_pickle)
    state = {k: v.detach().cpu() for k, v in merged.state_dict().items()}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    info = json.dumps(jsonable(merged.fastmerge_info), indent=2) + "\n"
    writer = ShardedWriter(
        out_dir,
        specs,
        max_shard_bytes=shard_bytes,
        overwrite=overwrite,
        metadata={"merged_by": "fastmerge", "merge_method": "pleas"},
        fsync=fsync,
    )
    try:
        for name in writer.order:
            writer.write(name, state[name])
        writer.add_file(CONFIG_NAME, yaml.safe_dump(cfg.raw, sort_keys=False))
        writer.add_file(INFO_NAME, info)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - start
    return MergeSummary(
        len(specs), bytes_read, writer.bytes_written, seconds, peak_rss_bytes(), list(writer.notes)
    )


METHOD = register(
    MergeMethod(
        name="pleas",
        description="PLeaS: partial permutation matching, then layer-wise least squares",
        reference="https://arxiv.org/abs/2407.02447",
        base="ignored",
        min_models=2,
        max_models=2,
        run=run_pleas,
        parse=parse_pleas,
        options=tuple(f"parameters.{k}" for k in PARAMETERS) + ("module_path",),
    )
)
