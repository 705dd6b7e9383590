"""Streaming checkpoint I/O: lazy safetensors reads, read-ahead, atomic sharded writes.

* :func:`open_checkpoint` opens a ``.safetensors`` file, a sharded directory (with
  ``model.safetensors.index.json``) or a Hugging Face model directory as a lazy
  ``Mapping[str, Tensor]``: headers are validated at once, each tensor is read from disk
  when it is accessed.
* :class:`Prefetcher` reads the next tensor of every model on a background thread,
  within a byte budget.
* :class:`ShardedWriter` writes planned safetensors shards and their index into a
  temporary directory renamed into place only when complete.
* :func:`empty_tensor` allocates large CPU buffers whose pages fault in cheaply (2 MiB
  transparent huge pages), as the reader does for every tensor it reads.

Example:
    >>> import tempfile, torch
    >>> from fastmerge import io
    >>> out = tempfile.mkdtemp() + "/ckpt"
    >>> with io.ShardedWriter(out, [io.TensorSpec("w", torch.float32, (2,))]) as writer:
    ...     writer.write("w", torch.tensor([1.0, 2.0]))
    >>> io.open_checkpoint(out)["w"].tolist()
    [1.0, 2.0]
"""

from ._memory import empty_tensor
from .checkpoint import Checkpoint, open_checkpoint
from .prefetch import DEFAULT_BLOCK_BYTES, DEFAULT_PREFETCH_BYTES, Prefetcher
from .publish import clean_leftovers, new_run_id, staging_dir
from .safetensors import CheckpointError, SafetensorsReader, TensorInfo, read_header
from .writer import (
    DEFAULT_SHARD_BYTES,
    INDEX_NAME,
    Shard,
    ShardedWriter,
    TensorSpec,
    partition_names,
    plan_shards,
)

__all__ = [
    "clean_leftovers",
    "new_run_id",
    "staging_dir",
    "DEFAULT_BLOCK_BYTES",
    "DEFAULT_PREFETCH_BYTES",
    "DEFAULT_SHARD_BYTES",
    "INDEX_NAME",
    "Checkpoint",
    "CheckpointError",
    "Prefetcher",
    "SafetensorsReader",
    "Shard",
    "ShardedWriter",
    "TensorInfo",
    "TensorSpec",
    "empty_tensor",
    "open_checkpoint",
    "partition_names",
    "plan_shards",
    "read_header",
]
