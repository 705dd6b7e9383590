"""``fastmerge merge`` on several ranks: ``torchrun --nproc-per-node N -m fastmerge.cli merge ...``.

Every rank merges the tensors that :func:`fastmerge.io.partition_names` assigns to it and
writes its own shards into the output's shared temporary directory; then all ranks vote
twice, with one tiny ``all_reduce`` each, so that a failure anywhere leaves nothing behind
and every rank reports it:

1. "my shards are written" (the barrier before publishing): if any rank failed, every
   rank removes what it wrote and raises;
2. "rank 0 wrote the index and moved the directory into place": if rank 0 failed there,
   every rank raises.

A rank that fails casts its remaining votes as failures, so no rank waits for it. A rank
that stops responding (stopped, stuck, killed without its process group noticing) makes
the others wait at most `timeout_s` (``fastmerge merge --timeout``): with gloo, each vote
starts with a monitored barrier, so the error names the ranks that did not arrive.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as tdist

from .. import dist
from ..io import new_run_id, staging_dir
from .config import MergeConfig, PathLike
from .errors import Interrupted
from .output import MergeSummary
from .run import run

__all__ = ["DEFAULT_TIMEOUT_S", "OtherRankFailed", "run_merge_distributed"]

#: The votes every rank casts, in this order: shards written, output published.
_VOTES = 2
#: How long a rank waits for the others at a vote (and to form the process group).
DEFAULT_TIMEOUT_S = 300.0
_MISSING = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")


class OtherRankFailed(RuntimeError):
    """Another rank of a distributed merge failed; this rank's output was removed."""


class _Agreement:
    """All-rank votes; a rank that fails casts the votes it still owes as failures."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.cast = 0
        self.timeout_s = float(timeout_s)
        self.broken = False  # a vote timed out: the group cannot be trusted any more

    def _unresponsive(self, exc: BaseException) -> OtherRankFailed:
        rank, world = dist.rank_and_world_size()
        found = _MISSING.search(str(exc))
        if found:
            who = f"rank(s) {found.group(1).strip()} did not answer"
        elif rank != 0:
            who = "rank 0 did not answer"
        elif world == 2:  # not named (a lost connection): of two ranks, it is rank 1
            who = "rank(s) 1 did not answer"
        else:
            who = "another rank did not answer"
        self.broken = True
        return OtherRankFailed(
            f"rank {rank} of {world}: {who} within --timeout {self.timeout_s:g} s (stopped, "
            "stuck or dead); the output was not written"
        )

    def vote(self, ok: bool) -> bool:
        """True when every rank voted ok.

        Raises:
            OtherRankFailed: a rank did not vote within the timeout (naming it, with gloo).
        """
        if self.broken:
            return False
        timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            if tdist.get_backend() == "gloo":  # names the ranks that do not arrive
                tdist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
            flag = torch.tensor([1.0 if ok else 0.0], dtype=torch.float64)
            (agreed,) = dist.all_reduce_values(flag.tolist(), op="min")
        except RuntimeError as exc:  # gloo/NCCL timeouts and lost peers
            raise self._unresponsive(exc) from None
        self.cast += 1
        return agreed == 1.0

    def barrier(self) -> None:
        """The first vote, as the writer's barrier before rank 0 publishes."""
        if not self.vote(True):
            raise OtherRankFailed("another rank failed while merging; the output was not written")

    def fail(self) -> None:
        try:
            while self.cast < _VOTES and not self.broken:
                self.vote(False)
        except OtherRankFailed:  # the rank's own error is the one to report
            pass


def _rank_device(device: str) -> str:
    """A bare ``cuda`` means this rank's GPU (``LOCAL_RANK``) when there are several ranks."""
    if device != "cuda" or not torch.cuda.is_available():
        return device
    local = int(os.environ.get("LOCAL_RANK", dist.rank_and_world_size()[0]))
    return f"cuda:{local % torch.cuda.device_count()}"


def _shared_run_id() -> str:
    """One run id for every rank: rank 0's random one, sent to all (48 bits, exact in
    the float64 reduction)."""
    rank, _ = dist.rank_and_world_size()
    mine = float(int(new_run_id(), 16)) if rank == 0 else 0.0
    (value,) = dist.all_reduce_values([mine], op="sum")
    return f"{int(value):012x}"


def run_merge_distributed(
    config: Union[MergeConfig, PathLike], out_dir: PathLike, **options: Any
) -> MergeSummary:
    """:func:`~fastmerge.engine.run` on every rank of the initialized
    torch.distributed process group, each rank merging its share of the tensors; without
    a group (or with one rank) it is ``run`` itself. Every rank returns the summary
    of the whole merge (tensors and bytes summed, time and peak memory the largest).

    Args:
        options: as for ``run`` (``device="cuda"`` means each rank's own GPU);
            ``rank``, ``world_size`` and ``barrier`` come from the process group;
            ``timeout_s``: how long a rank waits for the others at each vote.

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
    timeout_s = options.pop("timeout_s", DEFAULT_TIMEOUT_S)
    rank, world_size = dist.rank_and_world_size()
    if world_size == 1:
        return run(config, out_dir, **options)
    options["device"] = _rank_device(options.get("device", "cpu"))
    agreement = _Agreement(timeout_s)
    run_id = _shared_run_id()  # every rank writes into this run's own directory
    try:
        summary = run(
            config,
            out_dir,
            rank=rank,
            world_size=world_size,
            barrier=agreement.barrier,
            run_id=run_id,
            **options,
        )
    except BaseException as exc:
        if not isinstance(exc, Interrupted):  # a signal stops the ranks without votes
            agreement.fail()
        if rank == 0:  # every rank has aborted by now: clear what a late rank re-created
            shutil.rmtree(staging_dir(Path(out_dir), run_id), ignore_errors=True)
        raise
    if not agreement.vote(True):
        raise OtherRankFailed("rank 0 failed to publish the output; nothing was written")
    return _whole_merge(summary)


def _whole_merge(mine: MergeSummary) -> MergeSummary:
    counts = dist.all_reduce_values([mine.tensors, mine.bytes_read, mine.bytes_written])
    longest = dist.all_reduce_values([mine.seconds, mine.peak_rss_bytes], op="max")
    return MergeSummary(int(counts[0]), int(counts[1]), int(counts[2]), longest[0],
                        int(longest[1]), mine.notes)  # fmt: skip
