"""``fastmerge merge CONFIG.yaml --out DIR``: merge checkpoints larger than memory.

The merge streams: every input is opened lazily (headers only), all inputs are checked
against each other before anything is written (same keys, shapes and dtypes), then the
tensors are merged one name at a time in the order they lie in the base model's files,
with the next names read ahead on a background thread, and each merged tensor is
appended to its planned output shard at once. Peak memory is a few tensors.

:func:`run_merge` is the library entry point. Its ``rank``/``world_size`` select the
names this process merges (a deterministic, size-balanced assignment,
:func:`fastmerge.io.partition_names`); every rank writes its own shards into one shared
temporary directory and rank 0, after ``barrier()``, writes the index and moves the
directory into place.

``merge_method: twin`` and ``pleas`` are fastmerge's own methods (:mod:`fastmerge.cli.twin`,
:mod:`fastmerge.cli.pleas`): they build the merge in memory, then write it the same way.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .. import merge as methods
from ..io import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_PREFETCH_BYTES,
    DEFAULT_SHARD_BYTES,
    Checkpoint,
    CheckpointError,
    Prefetcher,
    ShardedWriter,
    TensorSpec,
    open_checkpoint,
)
from ..io._memory import allocate_large_blocks_with_mmap
from ..io.writer import check_output_dir
from .config import OWN_METHODS, ConfigError, MergeConfig, load_config

PathLike = Union[str, "os.PathLike[str]"]
CONFIG_NAME = "fastmerge_config.yaml"
#: Files of a model directory that are never copied to the output (the weights).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class MergeSummary:
    """What a merge did: tensors, bytes read and written, time, peak memory.

    Example:
        >>> MergeSummary(10, 4_000_000_000, 1_000_000_000, 2.0, 512 << 20).line()
        'merged 10 tensors: read 4.00 GB, wrote 1.00 GB in 2.00 s (2.50 GB/s), peak RSS 512 MiB'
    """

    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int

    def line(self) -> str:
        """The one-line summary printed at the end of ``fastmerge merge``."""
        rate = (self.bytes_read + self.bytes_written) / max(self.seconds, 1e-9) / 1e9
        return (
            f"merged {self.tensors} tensors: read {self.bytes_read / 1e9:.2f} GB, wrote "
            f"{self.bytes_written / 1e9:.2f} GB in {self.seconds:.2f} s ({rate:.2f} GB/s), "
            f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        )


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports kilobytes).

    Example:
        >>> peak_rss_bytes() > 0
        True
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def open_models(paths: Sequence[Path], allow_pickle: bool) -> list[Checkpoint]:
    """Open every input lazily and check them against the first: same keys, shapes and
    dtypes (from the headers; no tensor is read).

    Raises:
        CheckpointError: a missing or corrupt input, or a mismatch (naming key and files).
    """
    models = [open_checkpoint(p, allow_pickle=allow_pickle) for p in paths]
    ref = models[0]
    for path, model in zip(paths[1:], models[1:]):
        missing = next((k for k in ref if k not in model), None)
        if missing is not None:
            raise CheckpointError(f"{path}: no tensor {missing!r} (it is in {paths[0]})")
        extra = next((k for k in model if k not in ref), None)
        if extra is not None:
            raise CheckpointError(f"{path}: tensor {extra!r} is not in {paths[0]}")
        for name in ref:
            a, b = ref.info(name), model.info(name)
            if a.shape != b.shape or a.dtype != b.dtype:
                raise CheckpointError(
                    f"{model.file_of(name)}: tensor {name!r} is {b.dtype} {list(b.shape)} but "
                    f"{a.dtype} {list(a.shape)} in {ref.file_of(name)}"
                )
    return models


def output_specs(ref: Checkpoint, dtype: Optional[torch.dtype]) -> list[TensorSpec]:
    """The output tensors in the order they lie in the reference's files (sequential
    reads), floating ones in `dtype` when it is given."""
    names = sorted(ref, key=lambda n: (ref.file_of(n), ref.info(n).begin, n))
    specs = []
    for name in names:
        info = ref.info(name)
        out = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        specs.append(TensorSpec(name, out, info.shape))
    return specs


class KeyMerger:
    """How one tensor name is merged, per the configuration's method and parameters.

    ``merge(name, tensors)`` takes ``[base, *experts]`` (for ``linear``: all models),
    whole tensors or the same rows of each; ``thresholds(name, base, experts)`` gives
    the whole-tensor values that row blocks need (None when there are none). Names not
    selected by include/exclude, and non-floating tensors, are copied from the first
    model.
    """

    def __init__(self, cfg: MergeConfig) -> None:
        self.cfg = cfg
        self.selected = methods.key_selector(cfg.include, cfg.exclude)
        weights = [e.parameters["weight"] for e in cfg.experts]
        self.linear_weights = None
        self.tensor_merge = None
        if cfg.method == "linear":
            total = sum(weights)
            if cfg.shared["normalize"]:
                if total == 0:
                    raise ConfigError("linear: the weights sum to 0 and normalize is true")
                self.linear_weights = weights
            else:  # Σ w θ: the weighted average with an extra all-zero model of weight 1 - Σ w
                self.linear_weights = [*weights, 1.0 - total]
            return
        shared = cfg.shared
        if shared.get("rescale") is False and cfg.method.startswith("dare"):
            raise ConfigError(
                f"{cfg.method}: rescale: false is not supported (DARE rescales kept deltas "
                "by 1/density)"
            )
        if cfg.method == "ties" and shared.get("rescale"):
            raise ConfigError("ties: rescale: true is not supported")
        self.tensor_merge = methods.TensorMerge(
            len(cfg.experts),
            weights=weights,
            densities=[e.parameters.get("density", 1.0) for e in cfg.experts],
            trim={"ties": "magnitude", "dare_ties": "random", "dare_linear": "random"}.get(
                cfg.method
            ),
            consensus=cfg.method in ("ties", "dare_ties"),
            normalize=shared["normalize"],
            scale=shared["lambda"],
            keep_rounding="floor",  # top int(density * n) entries, as mergekit keeps
            seed=cfg.seed,
        )

    @property
    def blockwise(self) -> bool:
        """Whether row blocks of a tensor can be merged separately."""
        return self.tensor_merge is None or self.tensor_merge.blockwise

    def merges(self, name: str, dtype: torch.dtype) -> bool:
        """False when `name` is copied from the first model."""
        return self.selected(name) and dtype.is_floating_point

    def thresholds(self, name: str, base: torch.Tensor, experts) -> Optional[list]:
        if self.tensor_merge is None or not self.merges(name, base.dtype):
            return None
        return self.tensor_merge.thresholds(name, base, experts)

    def merge(self, name: str, tensors: list[torch.Tensor], thresholds=None) -> torch.Tensor:
        if not self.merges(name, tensors[0].dtype):
            return tensors[0]
        if self.tensor_merge is not None:
            return self.tensor_merge.merge(name, tensors[0], tensors[1:], thresholds)
        if len(self.linear_weights) > len(tensors):
            tensors = [*tensors, torch.zeros_like(tensors[0])]
        models = [{name: t} for t in tensors]
        return methods.average(models, weights=self.linear_weights)[name]


def key_merger(cfg: MergeConfig) -> KeyMerger:
    """The :class:`KeyMerger` of a configuration (checks the method's options)."""
    return KeyMerger(cfg)


def extra_files(source: Optional[Path]) -> list[Path]:
    """The non-weight files of a model directory (config, tokenizer, ...), to copy."""
    if source is None or not source.is_dir():
        return []
    return sorted(
        f
        for f in source.iterdir()
        if f.is_file()
        and not f.name.startswith(".")
        and f.suffix not in _WEIGHT_SUFFIXES
        and f.name not in _WEIGHT_INDEXES
    )


def _config_json(path: Path, dtype: Optional[torch.dtype]) -> Union[bytes, Path]:
    """config.json, with its dtype entry set to the output dtype when one was asked."""
    if dtype is None:
        return path
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return path
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = str(dtype).removeprefix("torch.")
    return (json.dumps(config, indent=2) + "\n").encode()


def _progress(total_bytes: int, count: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"merging {count} tensors")


def run_merge(
    config: Union[MergeConfig, PathLike],
    out_dir: PathLike,
    *,
    device: str = "cpu",
    threads: Optional[int] = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Optional[Callable[[], None]] = None,
) -> MergeSummary:
    """Merge the checkpoints of `config` (a :class:`MergeConfig` or a YAML path) into
    `out_dir`: safetensors shards of at most `shard_bytes`, their index, the base model's
    config and tokenizer files and ``fastmerge_config.yaml``.

    Everything is validated before anything is written; the output appears only when
    complete (see :class:`fastmerge.io.ShardedWriter`).

    Args:
        device: where tensors are merged (``"cpu"`` or ``"cuda"``); I/O stays on the CPU.
        threads: CPU threads for torch and fastmerge's kernels (default: unchanged).
        prefetch_bytes: read-ahead budget (see :class:`fastmerge.io.Prefetcher`).
        block_bytes: tensors larger than this (per model) are merged in row blocks of
            about this size when the method allows it, so that the T+1 inputs of one
            huge tensor (an embedding) never sit in memory together.
        rank, world_size, barrier: merge only this rank's names (see the module doc);
            `barrier` is required when world_size > 1.

    Raises:
        CheckpointError: missing/corrupt inputs, mismatched models, existing output.
        ConfigError: an invalid configuration.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> from fastmerge.cli.config import parse_config
        >>> d = tempfile.mkdtemp()
        >>> for name, value in [("base", 0.0), ("a", 1.0), ("b", 3.0)]:
        ...     safetensors.torch.save_file({"w": torch.full((4,), value)}, f"{d}/{name}.st")
        >>> cfg = parse_config({"merge_method": "task_arithmetic", "base_model": f"{d}/base.st",
        ...     "models": [{"model": f"{d}/a.st"}, {"model": f"{d}/b.st"}],
        ...     "parameters": {"lambda": 0.5}})
        >>> summary = run_merge(cfg, f"{d}/out")
        >>> safetensors.torch.load_file(f"{d}/out/model-00001-of-00001.safetensors")["w"].tolist()
        [2.0, 2.0, 2.0, 2.0]
    """
    start = time.perf_counter()
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    check_output_dir(out_dir, overwrite)
    if threads is not None:
        _set_threads(threads)
    if cfg.method in OWN_METHODS:
        if world_size > 1:
            raise ConfigError(f"merge_method {cfg.method} runs on one rank only")
        options = {
            "device": device,
            "overwrite": overwrite,
            "allow_pickle": allow_pickle,
            "shard_bytes": shard_bytes,
            "progress": progress,
        }
        return _run_own_method(cfg, out_dir, options)
    allocate_large_blocks_with_mmap()  # freed tensors leave the process at once
    merger = key_merger(cfg)
    models = open_models(cfg.all_models(), allow_pickle)
    specs = output_specs(models[0], cfg.output_dtype)
    target = torch.device(device)
    writer = ShardedWriter(
        out_dir,
        specs,
        max_shard_bytes=shard_bytes,
        overwrite=overwrite,
        metadata={"merged_by": "fastmerge"},
        rank=rank,
        world_size=world_size,
    )
    dtypes = {s.name: s.dtype for s in specs}
    bytes_read = sum(m.info(n).nbytes for n in writer.order for m in models)
    bar = _progress(bytes_read, len(writer.order), progress)
    large = large_tensors(models[0], writer.order, merger, block_bytes)
    try:
        with Prefetcher(models, writer.order, max_bytes=prefetch_bytes, skip=large) as items:
            for name, tensors in items:
                if tensors is None:
                    merge_in_blocks(name, models, merger, writer, dtypes[name], target, block_bytes)
                else:
                    on_device = [t.to(target, non_blocking=True) for t in tensors]
                    merged = merger.merge(name, on_device).to(dtypes[name]).cpu()
                    writer.write(name, merged)
                    del tensors, on_device, merged  # before the next read is allowed
                if bar is not None:
                    bar.update(sum(m.info(name).nbytes for m in models))
        add_extra_files(writer, cfg)
        writer.commit(barrier)
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        for m in models:
            m.close()
    seconds = time.perf_counter() - start
    return MergeSummary(
        len(writer.order), bytes_read, writer.bytes_written, seconds, peak_rss_bytes()
    )


def large_tensors(ref: Checkpoint, names: Sequence[str], merger: KeyMerger, block_bytes: int):
    """The names merged block by block: larger than `block_bytes`, with several rows,
    and a method that allows it."""
    if not merger.blockwise:
        return set()
    return {
        n for n in names if ref.info(n).nbytes > block_bytes and len(ref.info(n).shape) >= 1
        and ref.info(n).shape[0] > 1
    }  # fmt: skip


def merge_in_blocks(name, models, merger: KeyMerger, writer: ShardedWriter, dtype, device,
                    block_bytes: int) -> None:  # fmt: skip
    """Merge one large tensor in row blocks: first the whole-tensor thresholds (the base
    and one expert in memory at a time), then each block of rows of every model."""
    info = models[0].info(name)
    thresholds = None
    if merger.tensor_merge is not None and merger.tensor_merge.trim == "magnitude":
        base = models[0][name].to(device)
        experts = (m[name] for m in models[1:])
        thresholds = merger.thresholds(name, base, experts)
        del base
    rows = info.shape[0]
    step = max(1, block_bytes * rows // max(info.nbytes, 1) // 4)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        blocks = [m.read_rows(name, start, stop).to(device) for m in models]
        writer.write_rows(name, merger.merge(name, blocks, thresholds).to(dtype).cpu())
        del blocks


def _set_threads(threads: int) -> None:
    if int(threads) < 1:
        raise CheckpointError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(int(threads))
    try:
        from .. import set_num_threads

        set_num_threads(int(threads))
    except Exception:  # no CPU extension: only torch's threads matter
        pass


def _run_own_method(cfg: MergeConfig, out_dir: PathLike, options: dict) -> MergeSummary:
    if cfg.method == "twin":
        from .twin import run_twin

        return run_twin(cfg, out_dir, **options)
    from .pleas import run_pleas

    return run_pleas(cfg, out_dir, **options)


def add_extra_files(writer: ShardedWriter, cfg: MergeConfig) -> None:
    """Add the config/tokenizer files of ``cfg.tokenizer_source`` (``config.json`` with
    the output dtype) and ``fastmerge_config.yaml`` to the output being written."""
    import yaml

    for f in extra_files(cfg.tokenizer_source):
        content = _config_json(f, cfg.output_dtype) if f.name == "config.json" else f
        writer.add_file(f.name, content)
    used = dict(cfg.raw)
    used.setdefault("merge_method", cfg.method)
    writer.add_file(CONFIG_NAME, yaml.safe_dump(used, sort_keys=False))


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes from a size such as ``"5GB"``, ``"500MB"``, ``"2GiB"`` or ``"1000000"``.

    Example:
        >>> parse_size("5GB"), parse_size("1.5 MiB"), parse_size("123")
        (5000000000, 1572864, 123)
    """
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number) :]
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except (KeyError, ValueError):
        raise CheckpointError(
            f"--shard-size: cannot read size {text!r} (e.g. 5GB, 500MB)"
        ) from None
    if value < 1:
        raise CheckpointError(f"--shard-size must be positive, got {text!r}")
    return int(value)


def merge_command(args) -> int:
    """Run ``fastmerge merge`` from parsed arguments: 0 on success, 2 with a one-line
    message on stderr for bad input (nothing is written then)."""
    import sys

    from ..dist import process_group_from_launcher
    from .distributed import run_merge_distributed  # torchrun: every rank merges its share

    with process_group_from_launcher() as (rank, world_size):
        try:
            summary = run_merge_distributed(
                args.config,
                args.out,
                device=args.device,
                threads=args.threads,
                overwrite=args.overwrite,
                allow_pickle=args.allow_pickle,
                shard_bytes=parse_size(args.shard_size),
                progress=not args.quiet and rank == 0,
            )
        except (ValueError, OSError, RuntimeError) as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
            print(f"fastmerge merge: error{where}: {message}", file=sys.stderr)
            return 2
    if not args.quiet and rank == 0:
        print(summary.line())
    return 0
