"""Chunk tables for the GPU backends (CUDA and Triton), built on the host with numpy.

Every tensor is cut into chunks of at most ``chunk_size`` elements; one chunk is one
CUDA block or Triton program. The CPU extension plans its own table in C++
(csrc/include/fastmerge/chunks.h) with the same rule.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ChunkTable(NamedTuple):
    tensor: np.ndarray  # int64 (C,): which tensor each chunk belongs to
    begin: np.ndarray  # int64 (C,): first element of the chunk in its tensor
    length: np.ndarray  # int64 (C,): elements in the chunk (> 0)
    first_chunk: np.ndarray  # int64 (T,): index of each tensor's first chunk


def plan_chunks(numels: np.ndarray, chunk_size: int) -> ChunkTable:
    """Cut tensors of the given sizes into chunks; empty tensors get none.

    Example:
        >>> plan_chunks(np.array([5, 0, 2]), 4).length.tolist()
        [4, 1, 2]
    """
    numels = np.asarray(numels, dtype=np.int64)
    counts = -(-numels // chunk_size)
    first_chunk = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    tensor = np.repeat(np.arange(numels.shape[0], dtype=np.int64), counts)
    within = np.arange(tensor.shape[0], dtype=np.int64) - first_chunk[tensor]
    begin = within * chunk_size
    length = np.minimum(chunk_size, numels[tensor] - begin)
    return ChunkTable(tensor, begin, length, first_chunk)
