"""Shared launcher helpers: dtype groups and pointer tables for multi-tensor kernels."""

from __future__ import annotations

from collections import defaultdict

import torch
import triton.language as tl

TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

#: Elements per program: one chunk of the chunk table.
CHUNK_SIZE = 1 << 14
#: Elements a program loads per loop step.
BLOCK_SIZE = 1024


def group_by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Tensor indices per dtype: a Triton kernel is compiled for one element type, so a
    list of mixed dtypes takes one launch per dtype (the common case is one)."""
    groups: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[t.dtype].append(i)
    return groups


def int64_on(values, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int64).to(device)
