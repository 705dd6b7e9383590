"""``fastmerge merge`` on several ranks: ``torchrun --nproc-per-node N -m fastmerge.cli merge ...``.

Every rank merges the tensors that :func:`fastmerge.io.partition_names` assigns to it and
writes its own shards into the output's shared temporary directory; then all ranks vote
twice, with one tiny ``all_reduce`` each, so that a failure anywhere leaves nothing behind
and every rank reports it:

1. "my shards are written" (the barrier before publishing): if any rank failed, every
   rank removes what it wrote and raises;
2. "rank 0 wrote the index and moved the directory into place": if rank 0 failed there,
   every rank raises.

A rank that fails casts its remaining votes as failures, so no rank waits for it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Union

import torch

from .. import dist
from .config import MergeConfig, PathLike
from .output import MergeSummary
from .run import run

__all__ = ["OtherRankFailed", "run_merge_distributed"]

#: The votes every rank casts, in this order: shards written, output published.
_VOTES = 2


class OtherRankFailed(RuntimeError):
    """Another rank of a distributed merge failed; this rank's output was removed."""


class _Agreement:
    """All-rank votes; a rank that fails casts the votes it still owes as failures."""

    def __init__(self) -> None:
        self.cast = 0

    def vote(self, ok: bool) -> bool:
        """True when every rank voted ok."""
        flag = torch.tensor([1.0 if ok else 0.0], dtype=torch.float64)
        (agreed,) = dist.all_reduce_values(flag.tolist(), op="min")
        self.cast += 1
        return agreed == 1.0

    def barrier(self) -> None:
        """The first vote, as the writer's barrier before rank 0 publishes."""
        if not self.vote(True):
            raise OtherRankFailed("another rank failed while merging; the output was not written")

    def fail(self) -> None:
        while self.cast < _VOTES:
            self.vote(False)


def _rank_device(device: str) -> str:
    """A bare ``cuda`` means this rank's GPU (``LOCAL_RANK``) when there are several ranks."""
    if device != "cuda" or not torch.cuda.is_available():
        return device
    local = int(os.environ.get("LOCAL_RANK", dist.rank_and_world_size()[0]))
    return f"cuda:{local % torch.cuda.device_count()}"


def _partial_dir(out_dir: PathLike) -> Path:
    """The temporary directory that the ranks share (named by fastmerge.io's writer)."""
    out = Path(out_dir)
    return out.resolve().parent / f".{out.name}.fastmerge-partial"


def run_merge_distributed(
    config: Union[MergeConfig, PathLike], out_dir: PathLike, **options: Any
) -> MergeSummary:
    """:func:`~fastmerge.engine.run` on every rank of the initialized
    torch.distributed process group, each rank merging its share of the tensors; without
    a group (or with one rank) it is ``run`` itself. Every rank returns the summary
    of the whole merge (tensors and bytes summed, time and peak memory the largest).

    Args:
        options: as for ``run`` (``device="cuda"`` means each rank's own GPU);
            ``rank``, ``world_size`` and ``barrier`` come from the process group.

    Raises:
        OtherRankFailed: another rank failed (that rank raises its own error).
        CheckpointError, ConfigError: as for ``run``, on every rank that hit them.

    Example:
        >>> import tempfile, torch, safetensors.torch
        >>> from fastmerge.engine import parse_config
        >>> d = tempfile.mkdtemp()
        >>> for name, value in [("a", 1.0), ("b", 3.0)]:
        ...     path = f"{d}/{name}.safetensors"
        ...     safetensors.torch.save_file({"w": torch.full((2,), value)}, path)
        >>> cfg = parse_config({"merge_method": "linear",
        ...     "models": [{"model": f"{d}/a.safetensors"}, {"model": f"{d}/b.safetensors"}]})
        >>> run_merge_distributed(cfg, f"{d}/out").tensors  # no process group: one rank
        1
    """
    for name in ("rank", "world_size", "barrier"):
        if name in options:
            raise TypeError(f"run_merge_distributed() sets {name} itself from the process group")
    rank, world_size = dist.rank_and_world_size()
    if world_size == 1:
        return run(config, out_dir, **options)
    options["device"] = _rank_device(options.get("device", "cpu"))
    agreement = _Agreement()
    try:
        summary = run(
            config,
            out_dir,
            rank=rank,
            world_size=world_size,
            barrier=agreement.barrier,
            **options,
        )
    except BaseException:
        agreement.fail()
        if rank == 0:  # every rank has aborted by now: clear what a late rank re-created
            shutil.rmtree(_partial_dir(out_dir), ignore_errors=True)
        raise
    if not agreement.vote(True):
        raise OtherRankFailed("rank 0 failed to publish the output; nothing was written")
    return _whole_merge(summary)


def _whole_merge(mine: MergeSummary) -> MergeSummary:
    counts = dist.all_reduce_values([mine.tensors, mine.bytes_read, mine.bytes_written])
    longest = dist.all_reduce_values([mine.seconds, mine.peak_rss_bytes], op="max")
    return MergeSummary(int(counts[0]), int(counts[1]), int(counts[2]), longest[0], int(longest[1]))
