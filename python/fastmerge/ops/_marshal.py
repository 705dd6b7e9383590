"""Turning tensor lists into the raw-pointer arguments of the native kernels."""

from __future__ import annotations

import numpy as np
import torch

from .._chunks import ChunkTable, plan_chunks
from .._dtypes import KERNEL_DTYPE_CODES


def contiguous(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as dense buffers (copies only the non-contiguous ones)."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def pointer_args(tensors: list[torch.Tensor]) -> tuple[list[int], list[int], list[int]]:
    """(data pointers, element counts, dtype codes) of contiguous tensors."""
    codes = KERNEL_DTYPE_CODES
    return (
        [t.data_ptr() for t in tensors],
        [t.numel() for t in tensors],
        [codes[t.dtype] for t in tensors],
    )


def device_tables(
    columns: list[list[int]], numels: list[int], chunk_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, ChunkTable]:
    """The int64 tensor table (given columns, one row each) and chunk table on `device`.

    The tensor table has the rows of `columns` followed by each tensor's first chunk;
    the chunk table has rows (tensor index, begin, length).
    """
    chunks = plan_chunks(np.asarray(numels, dtype=np.int64), chunk_size)
    tensor_rows = np.array([*columns, chunks.first_chunk], dtype=np.int64).reshape(
        len(columns) + 1, len(numels)
    )
    chunk_rows = np.stack([chunks.tensor, chunks.begin, chunks.length])
    tensor_table = torch.from_numpy(tensor_rows).to(device, non_blocking=False)
    chunk_table = torch.from_numpy(np.ascontiguousarray(chunk_rows)).to(device)
    return tensor_table, chunk_table, chunks
