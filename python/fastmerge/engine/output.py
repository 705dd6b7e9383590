"""What every merge writes besides the tensors, and its summary.

* :class:`MergeSummary`: tensors, bytes read and written, time, peak memory (the line
  ``fastmerge merge`` prints at the end);
* :func:`open_models`: the inputs opened lazily and checked against each other;
* :func:`add_extra_files`: the config and tokenizer files of the template model (with
  ``config.json`` updated: dtype, layer count, vocabulary size) and the configuration used.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ..io import Checkpoint, CheckpointError, ShardedWriter, TensorSpec, open_checkpoint

CONFIG_NAME = "fastmerge_config.yaml"
#: Files of a model directory that are never copied to the output (the weights).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Tokenizer files: written by the vocabulary plan when there is one, else copied.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip


@dataclass
class MergeSummary:
    """What a merge did: tensors, bytes read and written, time, peak memory.

    Example:
        >>> MergeSummary(10, 4_000_000_000, 1_000_000_000, 2.0, 512 << 20).line()
        'merged 10 tensors: read 4.00 GB at 2.00 GB/s, wrote 1.00 GB, in 2.00 s; peak RSS 512 MiB'
    """

    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    #: What the run did about leftovers of interrupted runs (one line each).
    notes: list = field(default_factory=list)

    @property
    def read_rate(self) -> float:
        """Input bytes per second (the throughput fastmerge's benchmarks report)."""
        return self.bytes_read / max(self.seconds, 1e-9)

    def line(self) -> str:
        """The one-line summary printed at the end of ``fastmerge merge``; the rate counts
        the input bytes only."""
        return (
            f"merged {self.tensors} tensors: read {self.bytes_read / 1e9:.2f} GB at "
            f"{self.read_rate / 1e9:.2f} GB/s, wrote {self.bytes_written / 1e9:.2f} GB, in "
            f"{self.seconds:.2f} s; peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        )


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports kilobytes).

    Example:
        >>> peak_rss_bytes() > 0
        True
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def open_models(paths: Sequence[Path], allow_pickle: bool, *, same_keys: bool = True
                ) -> list[Checkpoint]:  # fmt: skip
    """Open every input lazily; with `same_keys`, check them against the first: same
    keys, shapes and dtypes (from the headers; no tensor is read).

    Raises:
        CheckpointError: a missing or corrupt input, or a mismatch (naming key and files).
    """
    models = [open_checkpoint(p, allow_pickle=allow_pickle) for p in paths]
    if not same_keys:
        return models
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


def extra_files(source: Optional[Path], *, tokenizer: bool = True) -> list[Path]:
    """The non-weight files of a model directory (config, tokenizer, ...), to copy
    (without the tokenizer's files when `tokenizer` is False)."""
    if source is None or not source.is_dir():
        return []
    return sorted(
        f
        for f in source.iterdir()
        if f.is_file()
        and not f.name.startswith(".")
        and f.suffix not in WEIGHT_SUFFIXES
        and f.name not in WEIGHT_INDEXES
        and (tokenizer or f.name not in TOKENIZER_FILES)
    )


def updated_config_json(path: Path, updates: Mapping[str, Any],
                        transform: Optional[Callable[[dict], dict]] = None
                        ) -> Union[bytes, Path]:  # fmt: skip
    """config.json with `updates` applied to the keys it has (a dtype as its name) and
    then `transform`, or the file itself when there is nothing to change or it is
    unreadable."""
    if not updates and transform is None:
        return path
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return path
    if not isinstance(config, dict):
        return path
    for key, value in updates.items():
        if key in config:
            config[key] = (
                str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
            )
    if transform is not None:
        config = transform(config)
    return (json.dumps(config, indent=2) + "\n").encode()


def config_updates(dtype: Optional[torch.dtype], num_layers: Optional[int] = None
                   ) -> dict[str, Any]:  # fmt: skip
    """The config.json keys an output changes: its dtype and its layer count (slices); the
    vocabulary size is the vocabulary plan's (``VocabularyPlan.update_config``).

    Example:
        >>> config_updates(torch.bfloat16, num_layers=6)["num_hidden_layers"]
        6
    """
    updates: dict[str, Any] = {}
    if dtype is not None:
        updates.update(torch_dtype=dtype, dtype=dtype)
    if num_layers is not None:
        updates.update(num_hidden_layers=num_layers, n_layer=num_layers, num_layers=num_layers)
    return updates


def add_extra_files(writer: ShardedWriter, cfg: Any, *, source: Optional[Path] = None,
                    updates: Optional[Mapping[str, Any]] = None,
                    transform: Optional[Callable[[dict], dict]] = None,
                    tokenizer_files: bool = True) -> None:  # fmt: skip
    """Add the config/tokenizer files of `source` (default ``cfg.tokenizer_source``;
    ``config.json`` with `updates`, default the output dtype, then `transform`) and
    ``fastmerge_config.yaml`` to the output being written."""
    import yaml

    source = cfg.tokenizer_source if source is None else source
    if updates is None:
        updates = config_updates(cfg.output_dtype)
    for f in extra_files(source, tokenizer=tokenizer_files):
        content = updated_config_json(f, updates, transform) if f.name == "config.json" else f
        writer.add_file(f.name, content)
    used = dict(cfg.raw)
    used.setdefault("merge_method", cfg.method)
    writer.add_file(CONFIG_NAME, yaml.safe_dump(used, sort_keys=False))
