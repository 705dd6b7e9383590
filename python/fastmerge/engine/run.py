"""The executor: merge checkpoints larger than memory, one output tensor at a time.

:func:`run` is the library entry point of ``fastmerge merge``. The inputs are opened
lazily (headers only), the whole merge is planned and checked before anything is
written (:mod:`fastmerge.engine.plan`), then the tasks run in the order the inputs lie in
their files: a background thread reads the next tasks' input tensors within a byte
budget, each tensor is merged by its method and appended to its planned output shard at
once. Peak memory is a few tensors. Tensors larger than ``block_bytes`` are merged in row
blocks when the method allows it. The output directory appears only when complete.

:func:`run`'s ``rank``/``world_size`` select the tensors this process merges (a
deterministic, size-balanced assignment, :func:`fastmerge.io.partition_names`); every rank
writes its own shards into one shared temporary directory and rank 0, after ``barrier()``,
writes the index and moves the directory into place (see
:mod:`fastmerge.engine.distributed`).

Whole-model methods (``twin``, ``pleas``) build the merge in memory their own way, then
write it the same way.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from .._version import __version__
from ..io import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_PREFETCH_BYTES,
    DEFAULT_SHARD_BYTES,
    CheckpointError,
    Prefetcher,
    ShardedWriter,
    TensorSpec,
)
from ..io._memory import allocate_large_blocks_with_mmap
from ..io.writer import check_output_dir
from .config import MergeConfig, load_config
from .errors import ConfigError
from .output import (
    MergeSummary,
    add_extra_files,
    config_updates,
    open_models,
    peak_rss_bytes,
)
from .plan import MergePlan, TensorTask, plan_merge

PathLike = Union[str, "os.PathLike[str]"]


def resolve_models(cfg: MergeConfig, allow_pickle: bool = False) -> list[Path]:
    """The local directory or file of every model of `cfg` (``cfg.all_models()`` order):
    paths as they are, Hugging Face ids (``org/name@revision``) from the hub cache
    (downloaded when online). For a ``base+adapter`` reference, the base's."""
    return resolve_inputs(cfg, allow_pickle)[0]


def resolve_inputs(cfg: MergeConfig, allow_pickle: bool = False
                   ) -> tuple[list[Path], list[Optional[Path]]]:  # fmt: skip
    """:func:`resolve_models`, and beside each model the directory of its LoRA adapter
    (``model: base+adapter``, as mergekit writes it) or None."""
    from .hub import parse_model_reference, resolve_model

    paths: list[Path] = []
    adapters: list[Optional[Path]] = []
    for ref in cfg.all_models():
        try:
            parsed = parse_model_reference(str(ref), allow_lora=True)
            paths.append(resolve_model(parsed.model, include_bin=allow_pickle))
            adapters.append(None if parsed.lora is None else resolve_model(parsed.lora))
        except (CheckpointError, ConfigError) as exc:
            text = " ".join(str(exc).split())
            text = text if len(text) <= 600 else text[:597] + "..."
            raise type(exc)(f"{cfg.source}: {_model_key(cfg, ref)}: {text}") from None
    return paths, adapters


def _with_adapters(cfg: MergeConfig, checkpoints: list, adapters: list[Optional[Path]]
                   ) -> list:  # fmt: skip
    """Each checkpoint with its LoRA adapter (if any) merged into it as tensors are read."""
    if all(a is None for a in adapters):
        return checkpoints
    from ..lora import adapt_checkpoint

    out = []
    for ref, ckpt, adapter in zip(cfg.all_models(), checkpoints, adapters):
        if adapter is not None:
            try:
                ckpt = adapt_checkpoint(ckpt, adapter, f"base model {ckpt.path}")
            except CheckpointError as exc:
                text = " ".join(str(exc).split())
                raise type(exc)(f"{cfg.source}: {_model_key(cfg, ref)}: {text}") from None
        out.append(ckpt)
    return out


def _model_key(cfg: MergeConfig, ref: Path) -> str:
    """Where the configuration names the model `ref` (for messages)."""
    if cfg.base is not None and str(cfg.base) == str(ref):
        return "base_model"
    for i, entry in enumerate(cfg.experts):
        if str(entry.path) == str(ref):
            return f"models[{entry.index if entry.index is not None else i}].model"
    for k, s in enumerate(cfg.slices or []):
        for j, src in enumerate(s.sources):
            if str(src.model) == str(ref):
                return f"slices[{k}].sources[{j}].model"
    return "model"


def plan(config: Union[MergeConfig, PathLike], *, allow_pickle: bool = False,
         trust_remote_code: bool = False) -> MergePlan:  # fmt: skip
    """The checked plan of a merge, without merging: what ``fastmerge merge --dry-run``
    prints (:meth:`MergePlan.describe`). The caller closes ``plan.checkpoints``.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> from fastmerge.engine import parse_config
        >>> d = tempfile.mkdtemp()
        >>> for name in ("a", "b"):
        ...     safetensors.torch.save_file({"w": torch.ones(2)}, f"{d}/{name}.safetensors")
        >>> p = plan(parse_config({"merge_method": "linear", "models": [
        ...     {"model": f"{d}/a.safetensors", "parameters": {"weight": 1.0}},
        ...     {"model": f"{d}/b.safetensors", "parameters": {"weight": 3.0}}]}))
        >>> [(t.name, [q["weight"] for q in t.per_input]) for t in p.tasks]
        [('w', [1.0, 3.0])]
    """
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if not cfg.method_info.streams:
        raise ConfigError(f"{cfg.source}: merge_method {cfg.method} has no per-tensor plan")
    paths, adapters = resolve_inputs(cfg, allow_pickle)
    checkpoints = open_models(paths, allow_pickle, same_keys=False)
    try:
        checkpoints = _with_adapters(cfg, checkpoints, adapters)
        merge_plan = plan_merge(cfg, paths, checkpoints)
        _plan_vocabulary(merge_plan, trust_remote_code)
    except BaseException:
        for c in checkpoints:
            c.close()
        raise
    return merge_plan


def _plan_vocabulary(merge_plan: MergePlan, trust_remote_code: bool = False) -> None:
    """Build the output vocabulary (when the configuration asks for one) and point the
    embedding tasks at it."""
    cfg = merge_plan.config
    if cfg.tokenizer is None:
        return
    from .tokenizer import embedding_names, plan_vocabulary

    refs = cfg.all_models()
    base = next((j for j, r in enumerate(refs) if r == cfg.base), None)
    vocab = plan_vocabulary(merge_plan.models, base, cfg.tokenizer,
                            references=[str(r) for r in refs],
                            trust_remote_code=trust_remote_code)  # fmt: skip
    merge_plan.vocabulary = vocab
    if vocab is None or not vocab.permutes:
        return
    infos = embedding_names([t.name for t in merge_plan.tasks], _template_config(merge_plan))
    for task in merge_plan.tasks:
        info = infos.get(task.name)
        if info is not None:
            task.vocab = info.kind
            task.vocab_axis = info.axis
            shape = list(task.shape)
            shape[info.axis] = vocab.vocab_size
            task.shape = tuple(shape)


def _template_config(merge_plan: MergePlan) -> dict:
    from .plan import model_config

    return model_config(merge_plan.models[merge_plan.template])


class _TaskInputs:
    """The plan as a lazy mapping ``task name -> [input tensors]`` for the prefetcher
    (``info(name).nbytes``: the bytes those reads take)."""

    class _Size:
        def __init__(self, nbytes: int) -> None:
            self.nbytes = nbytes

    def __init__(self, merge_plan: MergePlan) -> None:
        self.ckpts = merge_plan.checkpoints
        self.tasks = {t.name: t for t in merge_plan.tasks}

    def __getitem__(self, name: str) -> list[torch.Tensor]:
        return [self.ckpts[i.model][i.name] for i in self.tasks[name].inputs]

    def info(self, name: str) -> _TaskInputs._Size:
        task = self.tasks[name]
        return self._Size(sum(self.ckpts[i.model].info(i.name).nbytes for i in task.inputs))


def _prepare(tensors: Sequence[torch.Tensor], cfg: MergeConfig, device: torch.device
             ) -> list[torch.Tensor]:  # fmt: skip
    """Inputs as the methods take them: on `device`, rounded to ``dtype`` first when the
    configuration sets one (mergekit casts inputs to it), and all of one dtype (float32,
    or float64 when an input is float64) when their dtypes differ."""
    out = [t.to(device, non_blocking=True) for t in tensors]
    if cfg.dtype is not None:
        out = [t.to(cfg.dtype) if t.dtype.is_floating_point else t for t in out]
    if len({t.dtype for t in out}) > 1:
        wide = torch.float64 if any(t.dtype == torch.float64 for t in out) else torch.float32
        out = [t.to(wide) for t in out]
    return out


def merge_task(task: TensorTask, tensors: list[torch.Tensor], cfg: MergeConfig, device,
               vocabulary=None, statistics=None) -> torch.Tensor:  # fmt: skip
    """One output tensor (or block of rows) from its inputs' tensors (or rows), in the
    task's dtype, on the CPU."""
    if task.copy and task.vocab is None:
        return tensors[0].to(task.dtype)
    prepared = _prepare(tensors, cfg, device)
    if task.vocab is not None:
        prepared = _align(task, prepared, vocabulary)
    if task.copy:  # an excluded embedding: the first input's, on the output vocabulary
        return prepared[0].to(task.dtype).cpu()
    merged = task.method.merge(task, prepared, statistics)
    return merged.to(task.dtype).cpu()


def _align(task: TensorTask, tensors: list[torch.Tensor], vocabulary) -> list[torch.Tensor]:
    """The task's inputs re-indexed to the output vocabulary (each model's rows of the
    output tokens, the missing ones filled as mergekit fills them)."""
    by_model: list[Optional[torch.Tensor]] = [None] * len(vocabulary.models)
    for inp, t in zip(task.inputs, tensors):
        by_model[inp.model] = t
    aligned = vocabulary.align(by_model, task.vocab, axis=task.vocab_axis)
    return [aligned[inp.model] for inp in task.inputs]


def _blockwise(task: TensorTask, merge_plan: MergePlan, block_bytes: int) -> bool:
    info = merge_plan.checkpoints[task.inputs[0].model].info(task.inputs[0].name)
    return (
        task.vocab is None
        and len(task.shape) >= 1
        and task.shape[0] > 1
        and info.nbytes > block_bytes
        and (task.copy or task.method.blockwise(task))
    )


def merge_in_blocks(task: TensorTask, merge_plan: MergePlan, writer: ShardedWriter, device,
                    block_bytes: int) -> None:  # fmt: skip
    """Merge one large tensor in row blocks: first the method's whole-tensor statistics
    (the base and one other input in memory at a time), then each block of rows of
    every input."""
    cfg, ckpts = merge_plan.config, merge_plan.checkpoints
    statistics = None
    if not task.copy and task.method.statistics is not None:
        b = task.base_index or 0
        read = lambda inp: _prepare([ckpts[inp.model][inp.name]], cfg, device)[0]  # noqa: E731
        base = read(task.inputs[b])
        others = (read(inp) for j, inp in enumerate(task.inputs) if j != b)
        statistics = task.method.statistics(task, base, others)
        del base
    info = ckpts[task.inputs[0].model].info(task.inputs[0].name)
    rows = task.shape[0]
    step = max(1, block_bytes * rows // max(info.nbytes, 1) // 4)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        blocks = [ckpts[i.model].read_rows(i.name, start, stop) for i in task.inputs]
        writer.write_rows(task.name, merge_task(task, blocks, cfg, device, None, statistics))
        del blocks


def _progress(total_bytes: int, count: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"merging {count} tensors")


def check_device(device: str) -> torch.device:
    """The torch device of ``--device``, after checking that it can run here.

    Raises:
        ConfigError: not a device name, a device type other than cpu/cuda, CUDA asked
            for where torch has no CUDA support or no GPU is visible, a GPU index that
            does not exist.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("mps:0")
        Traceback (most recent call last):
        ...
        fastmerge.engine.errors.ConfigError: --device: 'mps:0' is not supported; use cpu, ...
    """
    shown = repr(str(device)[:40])
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device: {shown} is not a device (cpu, cuda, cuda:N)") from None
    if target.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {shown} is not supported; use cpu, cuda or cuda:N")
    if target.type == "cuda":
        if torch.version.cuda is None:
            raise ConfigError(
                f"--device {device}: this torch ({torch.__version__}) was built without CUDA"
            )
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is visible to torch here")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)"
            )
    return target


def check_not_an_input(out_dir: PathLike, cfg: MergeConfig) -> None:
    """Refuse an output directory that is an input model (or either part of a
    ``base+adapter`` one), or holds one (``--overwrite`` would replace the input).

    Example:
        >>> import tempfile
        >>> from fastmerge.engine import parse_config
        >>> d = tempfile.mkdtemp()
        >>> check_not_an_input(d, parse_config({"merge_method": "linear", "models": [d, "x"]}))
        Traceback (most recent call last):
        ...
        fastmerge.engine.errors.ConfigError: --out ...: is (or holds) the input model ...
    """
    out = Path(out_dir).resolve()
    for ref in cfg.all_models():
        path = Path(str(ref)).expanduser()
        parts = [path] if path.exists() else [Path(p.strip()).expanduser()
                                              for p in str(ref).split("+")]  # fmt: skip
        for path in parts:
            if not path.exists():
                continue  # a hub id: its files are in the hub's cache
            path = path.resolve()
            if path == out or out in path.parents:
                raise ConfigError(
                    f"--out {out_dir}: is (or holds) the input model {ref}; choose another "
                    "output directory"
                )


def _set_threads(threads: int) -> None:
    if int(threads) < 1:
        raise CheckpointError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(int(threads))
    try:
        from ..backends import cpu_extension

        cpu_extension().set_num_threads(int(threads))
    except Exception:  # no CPU extension: only torch's threads matter
        pass


def run(
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
    write_model_card: bool = False,
    trust_remote_code: bool = False,
    fsync: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier: Optional[Callable[[], None]] = None,
    run_id: Optional[str] = None,
) -> MergeSummary:
    """Merge the checkpoints of `config` (a :class:`MergeConfig` or a YAML path) into
    `out_dir`: safetensors shards of at most `shard_bytes`, their index, the template
    model's config (updated) and tokenizer files (built when the configuration asks for a
    vocabulary), ``fastmerge_config.yaml``, and with `write_model_card` a README.md.

    Everything is checked before anything is written; the output appears only when
    complete (see :class:`fastmerge.io.ShardedWriter`).

    Args:
        device: where tensors are merged (``"cpu"`` or ``"cuda"``); I/O stays on the CPU.
        threads: CPU threads for torch and fastmerge's kernels (default: unchanged).
        prefetch_bytes: read-ahead budget (see :class:`fastmerge.io.Prefetcher`).
        block_bytes: tensors larger than this (per model) are merged in row blocks of
            about this size when the method allows it, so that the inputs of one huge
            tensor (an embedding) never sit in memory together.
        trust_remote_code: allow code named by the configuration to run: ``pleas``'s
            ``model``/``data`` functions, and tokenizers whose files ship Python code.
            Without it such a configuration is refused before anything is imported.
        fsync: fsync every file and directory before publishing (``--no-fsync``: not,
            for scratch merges; a power loss can then leave truncated files).
        rank, world_size, barrier, run_id: merge only this rank's tensors (see the module
            doc); `barrier` and the `run_id` all ranks share (:func:`fastmerge.io.new_run_id`)
            are required when world_size > 1.

    Raises:
        CheckpointError: missing/corrupt inputs, mismatched models, existing output.
        ConfigError: an invalid configuration (naming the key, tensor group and model).

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> from fastmerge.engine import parse_config
        >>> d = tempfile.mkdtemp()
        >>> for name, value in [("base", 0.0), ("a", 1.0), ("b", 3.0)]:
        ...     safetensors.torch.save_file({"w": torch.full((4,), value)}, f"{d}/{name}.st")
        >>> cfg = parse_config({"merge_method": "task_arithmetic", "base_model": f"{d}/base.st",
        ...     "models": [{"model": f"{d}/a.st"}, {"model": f"{d}/b.st"}],
        ...     "parameters": {"lambda": 0.5}})
        >>> summary = run(cfg, f"{d}/out")
        >>> safetensors.torch.load_file(f"{d}/out/model-00001-of-00001.safetensors")["w"].tolist()
        [2.0, 2.0, 2.0, 2.0]
    """
    start = time.perf_counter()
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    check_output_dir(out_dir, overwrite)
    check_not_an_input(out_dir, cfg)
    check_device(device)
    if threads is not None:
        _set_threads(threads)
    method = cfg.method_info
    if not method.streams:
        if world_size > 1:
            raise ConfigError(f"merge_method {cfg.method} runs on one rank only")
        return method.run(
            cfg, out_dir, device=device, overwrite=overwrite, allow_pickle=allow_pickle,
            shard_bytes=shard_bytes, progress=progress, trust_remote_code=trust_remote_code,
            fsync=fsync,
        )  # fmt: skip
    allocate_large_blocks_with_mmap()  # freed tensors leave the process at once
    merge_plan = plan(cfg, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    try:
        return _execute(merge_plan, out_dir, start, device=device, overwrite=overwrite,
                        shard_bytes=shard_bytes, prefetch_bytes=prefetch_bytes,
                        block_bytes=block_bytes, progress=progress, rank=rank,
                        world_size=world_size, barrier=barrier,
                        write_model_card=write_model_card, run_id=run_id, fsync=fsync)  # fmt: skip
    finally:
        for c in merge_plan.checkpoints:
            c.close()


def _execute(merge_plan: MergePlan, out_dir: PathLike, start: float, *, device: str,
             overwrite: bool, shard_bytes: int, prefetch_bytes: int, block_bytes: int,
             progress: bool, rank: int, world_size: int, barrier, write_model_card: bool,
             run_id: Optional[str], fsync: bool) -> MergeSummary:  # fmt: skip
    cfg = merge_plan.config
    target = check_device(device)
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in merge_plan.tasks]
    writer = ShardedWriter(out_dir, specs, max_shard_bytes=shard_bytes, overwrite=overwrite,
                           metadata={"merged_by": "fastmerge", "merge_method": cfg.method},
                           rank=rank, world_size=world_size, run_id=run_id,
                           fsync=fsync)  # fmt: skip
    tasks = {t.name: t for t in merge_plan.tasks}
    reader = _TaskInputs(merge_plan)
    mine = [tasks[n] for n in writer.order]
    bytes_read = sum(reader.info(t.name).nbytes for t in mine)
    bar = _progress(bytes_read, len(mine), progress)
    large = {t.name for t in mine if _blockwise(t, merge_plan, block_bytes)}
    try:
        with Prefetcher([reader], writer.order, max_bytes=prefetch_bytes, skip=large) as items:
            for name, read in items:
                task = tasks[name]
                if read is None:
                    merge_in_blocks(task, merge_plan, writer, target, block_bytes)
                else:
                    merged = merge_task(task, read[0], cfg, target, merge_plan.vocabulary)
                    writer.write(name, merged)
                    del read, merged  # before the next read is allowed
                if bar is not None:
                    bar.update(reader.info(name).nbytes)
        _add_files(writer, merge_plan, write_model_card)
        writer.commit(barrier)
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    return MergeSummary(len(mine), bytes_read, writer.bytes_written, seconds, peak_rss_bytes(),
                        list(writer.notes))  # fmt: skip


def _add_files(writer: ShardedWriter, merge_plan: MergePlan, write_model_card: bool) -> None:
    """config.json (dtype, layers, vocabulary updated) and the other files of the template
    model; the tokenizer (written by the vocabulary plan whenever the configuration has a
    tokenizer setting, else the template's files); the model card."""
    cfg = merge_plan.config
    template = merge_plan.models[merge_plan.template]
    vocab = merge_plan.vocabulary
    updates = config_updates(cfg.output_dtype, merge_plan.num_layers)
    add_extra_files(writer, cfg, source=template, updates=updates,
                    transform=vocab.update_config if vocab is not None else None,
                    tokenizer_files=vocab is None)  # fmt: skip
    if vocab is not None:
        with tempfile.TemporaryDirectory(prefix="fastmerge-tokenizer-") as tmp:
            for f in vocab.save(Path(tmp)):
                writer.add_file(f.name, f.read_bytes())
    if write_model_card:
        from .card import model_card

        info = cfg.method_info
        refs = [str(r) for r in cfg.all_models()]
        base = str(cfg.base) if cfg.base is not None else None
        text = model_card(
            cfg.raw, method=cfg.method, models=[r for r in refs if r != base], base_model=base,
            fastmerge_version=__version__, method_description=info.description,
            reference=info.reference,
        )  # fmt: skip
        writer.add_file("README.md", text)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: Any) -> int:
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
            f"--shard-size: cannot read size {str(text)[:40]!r} (e.g. 5GB, 500MB)"
        ) from None
    if not value >= 1 or value == float("inf") or value > 2**62:
        raise CheckpointError(
            f"--shard-size must be a positive, finite size, got {str(text)[:40]!r}"
        )
    return int(value)


__all__ = ["MergeSummary", "merge_in_blocks", "merge_task", "parse_size", "plan", "run"]
