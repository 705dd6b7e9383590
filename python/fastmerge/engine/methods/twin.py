"""``merge_method: twin`` in ``fastmerge merge``: Twin-Merging's shared model and factors.

The configuration::

    merge_method: twin
    base_model: ./base
    models:
      - model: ./expert-math
        name: math            # task name (default: task0, task1, ...)
      - model: ./expert-code
        name: code
    parameters:
      shared: ties            # task_arithmetic (default) | ties | dare | average
      shared_kwargs: {density: 0.3, scale: 1.0}
      rank: 0.1               # fraction of min(shape) (float) or the rank itself (int)
      exclude: "embed"        # regexes: which 2-D tensors get factors (others: dense deltas)
    dtype: bfloat16           # optional: the inputs' floating tensors are cast first
    seed: 0                   # randomized SVD sketches

The output directory is a loadable Hugging Face style checkpoint of the shared model
(safetensors shards, index, the base's config and tokenizer files,
``fastmerge_config.yaml``) with the whole :class:`~fastmerge.twin.TwinMerger` (shared
state, factors, dense deltas, manifest) in its ``twin/`` subdirectory, loadable with
``TwinMerger.load(out / "twin")``. Everything is written into one temporary directory that
is renamed into place only when complete.

Unlike the streaming methods, :class:`~fastmerge.twin.TwinMerger` holds the base, the
experts, the shared state and the factors in memory while it builds.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ... import merge as merge_methods
from ...io import Checkpoint, CheckpointError, ShardedWriter
from ...io.writer import check_output_dir
from ...merge import key_selector
from ...twin.merger import SHARED_METHODS, TwinMerger
from ...twin.svd import METHODS as SVD_METHODS
from ...twin.svd import check_rank
from ..config import (
    ConfigError,
    MergeConfig,
    ModelEntry,
    check_keys,
    model_entries,
    output_dtype,
    seed_of,
    tokenizer_path,
)
from ..output import MergeSummary, add_extra_files, open_models, output_specs, peak_rss_bytes
from ..registry import MergeMethod, _short, register

TOP_LEVEL_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "tokenizer_source",
    "seed",
)
MODEL_KEYS = ("model", "name")
#: parameter -> default.
PARAMETERS: dict[str, Any] = {
    "shared": "task_arithmetic",
    "shared_kwargs": {},
    "rank": 0.1,
    "include": None,
    "exclude": None,
    "svd": "auto",
}
#: The subdirectory of the output that holds :meth:`TwinMerger.save`'s files.
TWIN_DIR = "twin"


def parse_twin(raw: dict[str, Any], source: str = "config") -> MergeConfig:
    """Validate a ``merge_method: twin`` configuration (already loaded from YAML).

    Raises:
        ConfigError: unknown keys (listing the valid ones), no base model, duplicate task
            names, a bad ``rank``, ``shared``, ``shared_kwargs``, ``include``/``exclude``
            or ``svd``.

    Example:
        >>> cfg = parse_twin({"merge_method": "twin", "base_model": "b",
        ...     "models": [{"model": "x", "name": "math"}, "y"], "parameters": {"rank": 4}})
        >>> [e.name for e in cfg.experts], cfg.shared["rank"], cfg.shared["shared"]
        (['math', 'task1'], 4, 'task_arithmetic')
    """
    check_keys(raw, TOP_LEVEL_KEYS, source)
    base = raw.get("base_model")
    if base is None:
        raise ConfigError(f"{source}: merge_method twin needs a base_model")
    experts = _experts(raw.get("models"), source)
    params = _parameters(raw.get("parameters"), f"{source}: parameters")
    return MergeConfig(
        method="twin",
        base=Path(str(base)),
        experts=experts,
        shared=params,
        dtype=output_dtype(raw.get("dtype"), f"{source}: dtype"),
        tokenizer_source=tokenizer_path(raw, Path(str(base)), source),
        seed=seed_of(raw, source),
        include=params["include"],
        exclude=params["exclude"],
        raw=raw,
        source=source,
    )


def _experts(models: Any, source: str) -> list[ModelEntry]:
    experts = []
    for i, entry in enumerate(model_entries(models, MODEL_KEYS, source)):
        name = entry.get("name", f"task{i}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{source}: models[{i}] name must be a non-empty string")
        if any(e.name == name for e in experts):
            raise ConfigError(f"{source}: models[{i}] repeats the task name {name!r}")
        experts.append(ModelEntry(Path(str(entry["model"])), {}, name=name))
    return experts


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    check_keys(raw, list(PARAMETERS), where)
    params = {**PARAMETERS, **raw}
    shared = params["shared"]
    if not isinstance(shared, str) or shared not in SHARED_METHODS:
        raise ConfigError(
            f"{where}: shared {_short(shared)} is not supported; valid: {', '.join(SHARED_METHODS)}"
        )
    rank = params["rank"]
    if isinstance(rank, int) and not isinstance(rank, bool) and not 0 < rank < 2**31:
        raise ConfigError(f"{where}: rank must be a positive integer below 2^31 or a fraction")
    params["shared_kwargs"] = _shared_kwargs(shared, params["shared_kwargs"], where)
    try:
        check_rank(params["rank"])
        key_selector(params["include"], params["exclude"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if params["svd"] not in SVD_METHODS:
        raise ConfigError(
            f"{where}: svd {_short(params['svd'])} is not one of {', '.join(SVD_METHODS)}"
        )
    return params


def _shared_kwargs(shared: str, kwargs: Any, where: str) -> dict[str, Any]:
    """`kwargs` checked against the keyword arguments of the shared merge function."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}: shared_kwargs must be a mapping")
    signature = inspect.signature(getattr(merge_methods, shared))
    valid = [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    check_keys(kwargs, valid, f"{where} shared_kwargs (for {shared})")
    return dict(kwargs)


def _inputs(model: Checkpoint, dtype: Optional[torch.dtype], device: str):
    """The lazy checkpoint itself, or its tensors cast to `dtype` / moved to `device`."""
    if dtype is None and torch.device(device).type == "cpu":
        return model
    out = {}
    for name, tensor in model.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.to(device)
    return out


def build_twin(
    cfg: MergeConfig, models: list[Checkpoint], *, device: str = "cpu", progress: bool = False
) -> TwinMerger:
    """The :class:`TwinMerger` of a parsed ``twin`` configuration; `models` are the opened
    base and experts (:func:`fastmerge.engine.output.open_models` of ``cfg.all_models()``).

    Raises:
        ConfigError: the shared merge rejected ``shared_kwargs`` (a wrong value type).
    """
    params = cfg.shared
    base = _inputs(models[0], cfg.dtype, device)
    experts = {e.name: _inputs(m, cfg.dtype, device) for e, m in zip(cfg.experts, models[1:])}
    try:
        return TwinMerger(
            base,
            experts,
            shared=params["shared"],
            shared_kwargs=params["shared_kwargs"],
            rank=params["rank"],
            include=params["include"],
            exclude=params["exclude"],
            svd=params["svd"],
            seed=cfg.seed,
            progress=progress,
        ).to("cpu")
    except (TypeError, ValueError) as exc:  # e.g. a string where shared_kwargs needs a number
        if isinstance(exc, (ConfigError, CheckpointError)):
            raise
        raise ConfigError(
            f"twin: the shared merge {params['shared']} failed with shared_kwargs "
            f"{params['shared_kwargs']} ({exc})"
        ) from None


def run_twin(
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
    """Build the Twin merger of `cfg` and write the output directory (see the module
    documentation); called by :func:`fastmerge.engine.run` (`trust_remote_code` is
    unused: twin runs no code from the configuration).

    Returns:
        the :class:`~fastmerge.engine.output.MergeSummary`.

    Example:
        >>> import tempfile, safetensors.torch
        >>> d = Path(tempfile.mkdtemp())
        >>> safetensors.torch.save_file({"w": torch.zeros(4, 4)}, d / "base.safetensors")
        >>> for i, sign in enumerate((1.0, -1.0)):
        ...     safetensors.torch.save_file({"w": sign * torch.eye(4)}, d / f"e{i}.safetensors")
        >>> cfg = parse_twin({"merge_method": "twin", "base_model": str(d / "base.safetensors"),
        ...     "models": [str(d / "e0.safetensors"), str(d / "e1.safetensors")],
        ...     "parameters": {"rank": 4}})
        >>> run_twin(cfg, d / "out", shard_bytes=1 << 30).tensors
        1
        >>> TwinMerger.load(d / "out" / TWIN_DIR).task_state("task1")["w"].diagonal().tolist()
        [-1.0, -1.0, -1.0, -1.0]
    """
    start = time.perf_counter()
    check_output_dir(out_dir, overwrite)
    models = open_models(cfg.all_models(), allow_pickle)
    try:
        bytes_read = sum(m.info(n).nbytes for m in models for n in m)
        twin = build_twin(cfg, models, device=device, progress=progress)
        specs = output_specs(models[0], cfg.dtype)
    finally:
        for m in models:
            m.close()
    writer = ShardedWriter(
        out_dir,
        specs,
        max_shard_bytes=shard_bytes,
        overwrite=overwrite,
        metadata={"merged_by": "fastmerge", "merge_method": "twin"},
        fsync=fsync,
    )
    try:
        for name in writer.order:
            writer.write(name, twin.shared_state[name].contiguous())
        add_extra_files(writer, cfg)
        twin.save(writer.tmp_dir / TWIN_DIR)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    twin_bytes = sum(f.stat().st_size for f in (Path(out_dir) / TWIN_DIR).iterdir())
    return MergeSummary(
        len(specs),
        bytes_read,
        writer.bytes_written + twin_bytes,
        time.perf_counter() - start,
        peak_rss_bytes(),
        list(writer.notes),
    )


METHOD = register(
    MergeMethod(
        name="twin",
        description="Twin-Merging: a shared model plus SVD-compressed task knowledge and a router",
        reference="https://arxiv.org/abs/2406.15479",
        base="required",
        min_models=1,
        run=run_twin,
        parse=parse_twin,
        options=tuple(f"parameters.{k}" for k in PARAMETERS) + ("models[].name",),
    )
)
