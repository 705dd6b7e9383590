"""Triton kernel for fused weight-scope statistics.

One program per chunk of the chunk table: it reduces its chunk to shifted sums in
float64 (shift = the chunk's first element, so no cancellation when |mean| >> std) and
writes (count, mean, M2). The launcher then combines each tensor's chunk partials
exactly: mean = sum(n_c m_c) / N, M2 = sum(M2_c) + sum(n_c (m_c - mean)^2).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fastmerge._chunks import plan_chunks

from ._aot import FLOAT_TYPES, aot_entry
from ._launch import launch
from ._tables import BLOCK_SIZE, CHUNK_SIZE, TRITON_DTYPES, group_by_dtype, int64_on


@triton.jit
def scope_stats_kernel(
    addresses_ptr,  # int64 (T,): data pointer of each tensor in this launch
    chunk_tensor_ptr,  # int64 (C,)
    chunk_begin_ptr,  # int64 (C,)
    chunk_length_ptr,  # int64 (C,)
    partials_ptr,  # float64 (C, 3): count, mean, M2 per chunk
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c)
    begin = tl.load(chunk_begin_ptr + c)
    length = tl.load(chunk_length_ptr + c)
    x_ptr = tl.load(addresses_ptr + t).to(tl.pointer_type(DTYPE)) + begin
    shift = tl.load(x_ptr).to(tl.float64)
    s1 = tl.zeros([BLOCK], dtype=tl.float64)
    s2 = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, length, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < length
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
        d = tl.where(mask, x - shift, 0.0)
        s1 += d
        s2 += d * d
    total1 = tl.sum(s1, axis=0)
    total2 = tl.sum(s2, axis=0)
    n = length.to(tl.float64)
    delta = total1 / n
    tl.store(partials_ptr + 3 * c, n)
    tl.store(partials_ptr + 3 * c + 1, shift + delta)
    tl.store(partials_ptr + 3 * c + 2, total2 - total1 * delta)


def scope_stats(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Rows (mean, std, count), float64 (3, T), of contiguous tensors on one device."""
    device = tensors[0].device
    numels = np.array([t.numel() for t in tensors], dtype=np.int64)
    chunk_tensor, chunk_partials = [], []
    for dtype, indices in group_by_dtype(tensors).items():
        chunks = plan_chunks(numels[indices], CHUNK_SIZE)
        num_chunks = int(chunks.tensor.shape[0])
        if num_chunks == 0:
            continue
        partials = torch.empty((num_chunks, 3), dtype=torch.float64, device=device)
        launch(
            scope_stats_kernel,
            (num_chunks,),
            device,
            int64_on([tensors[i].data_ptr() for i in indices], device),
            int64_on(chunks.tensor, device),
            int64_on(chunks.begin, device),
            int64_on(chunks.length, device),
            partials,
            DTYPE=TRITON_DTYPES[dtype],
            BLOCK=BLOCK_SIZE,
        )
        chunk_tensor.append(int64_on(np.asarray(indices, dtype=np.int64)[chunks.tensor], device))
        chunk_partials.append(partials)
    return _combine(chunk_tensor, chunk_partials, numels, device)


def _combine(
    chunk_tensor: list[torch.Tensor],
    chunk_partials: list[torch.Tensor],
    numels: np.ndarray,
    device: torch.device,
) -> torch.Tensor:
    num_tensors = numels.shape[0]
    out = torch.full((3, num_tensors), float("nan"), dtype=torch.float64, device=device)
    out[2] = torch.as_tensor(numels, dtype=torch.float64)
    if not chunk_tensor:
        return out
    owner = torch.cat(chunk_tensor)
    parts = torch.cat(chunk_partials)
    n, m, m2 = parts[:, 0], parts[:, 1], parts[:, 2]
    zeros = torch.zeros(num_tensors, dtype=torch.float64, device=device)
    count = zeros.index_add(0, owner, n)
    mean = zeros.index_add(0, owner, n * m) / count
    spread = m - mean[owner]
    m2_total = zeros.index_add(0, owner, m2 + n * spread * spread)
    nonempty = count > 0
    out[0] = torch.where(nonempty, mean, out[0])
    out[1] = torch.where(nonempty, (m2_total / count).clamp_min(0).sqrt(), out[1])
    return out


AOT_SIGNATURES = {
    f"scope_stats_kernel[{name}]": aot_entry(
        scope_stats_kernel,
        {
            "addresses_ptr": "*i64",
            "chunk_tensor_ptr": "*i64",
            "chunk_begin_ptr": "*i64",
            "chunk_length_ptr": "*i64",
            "partials_ptr": "*fp64",
        },
        {"DTYPE": tl_dtype, "BLOCK": BLOCK_SIZE},
    )
    for name, tl_dtype in FLOAT_TYPES.items()
}
