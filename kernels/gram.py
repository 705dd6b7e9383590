"""Triton kernels for Gram matrices ``G[i, j] = Σ_e x_i[e] · x_j[e]`` of k tensors.

Each program stages a block of entries of all k inputs as a (KP, BLOCK) float64 tile (KP =
k rounded up to a power of two; the rows past k are masked to zero), every input read once
in its own dtype: its data pointer and dtype code come from small tables, and a runtime
branch on the code (uniform over the launch) picks the element type of its load. With a
base, ``x_i = t_i - base`` is subtracted and rounded in the compute dtype (float32, or
float64) before the widening. The tile's outer products ``X[:, None, :] * X[None, :, :]``
are summed in float64. Two kernels: one over contiguous entries (the whole tensor, or each
row; long vectors are cut into chunks), one over the rows of a block of columns. Each
program writes its partial (k, k) matrices to a float64 buffer that torch sums (in
float64) over the chunks or row ranges.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._aot import FLOAT_TYPES, aot_entry
from ._launch import launch
from ._tables import CHUNK_SIZE, TRITON_DTYPES, int64_on

#: Elements of one program's (KP, KP, BLOCK) product tile.
TILE_BUDGET = 4096
#: Most chunks per vector (whole tensor, rows) and most row ranges (columns).
MAX_CHUNKS = 1024
MAX_ROW_SPLITS = 64
#: Rows of a column block one program walks, at least.
SPLIT_ROWS = 1024
#: dtype codes of the inputs (fastmerge/_dtypes.py).
_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


@triton.jit
def _load_row(addresses_ptr, codes_ptr, i, offsets, mask, COMPUTE: tl.constexpr):
    """Input i at `offsets`, loaded in its own dtype and converted exactly to COMPUTE."""
    address = tl.load(addresses_ptr + i)
    code = tl.load(codes_ptr + i)
    if code == 0:
        x = tl.load(address.to(tl.pointer_type(tl.float16)) + offsets, mask=mask, other=0.0)
        x = x.to(tl.float32).to(COMPUTE)
    elif code == 1:
        x = tl.load(address.to(tl.pointer_type(tl.bfloat16)) + offsets, mask=mask, other=0.0)
        x = x.to(tl.float32).to(COMPUTE)
    elif code == 2:
        x = tl.load(address.to(tl.pointer_type(tl.float32)) + offsets, mask=mask, other=0.0)
        x = x.to(COMPUTE)
    else:
        x = tl.load(address.to(tl.pointer_type(tl.float64)) + offsets, mask=mask, other=0.0)
        x = x.to(COMPUTE)
    return x


@triton.jit
def _tile(
    addresses_ptr,
    codes_ptr,
    base_ptr,
    offsets,
    mask,
    count,
    HAS_BASE: tl.constexpr,
    COMPUTE: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(KP, BLOCK) float64: row i < count is x_i at `offsets` (0 where masked), rows past
    count are 0 (the tables are padded to KP entries)."""
    rows = tl.arange(0, KP)
    if HAS_BASE:
        b = tl.load(base_ptr + offsets, mask=mask, other=0.0)
        if b.dtype.is_fp64():
            b = b.to(COMPUTE)
        else:
            b = b.to(tl.float32).to(COMPUTE)  # the half types through float32, exactly
    tile = tl.zeros([KP, BLOCK], dtype=tl.float64)
    for i in tl.static_range(KP):
        valid = mask & ((offsets * 0 + i) < count)  # as a tensor: the interpreter needs one
        x = _load_row(addresses_ptr, codes_ptr, i, offsets, valid, COMPUTE)
        if HAS_BASE:
            x = tl.where(valid, x - b, 0.0)
        tile = tl.where(rows[:, None] == i, x.to(tl.float64)[None, :], tile)
    return tile


@triton.jit
def gram_segments_kernel(
    addresses_ptr,  # int64 (KP,): data pointer of each input (padded with input 0)
    codes_ptr,  # int32 (KP,): dtype code of each input (padded)
    base_ptr,  # the base (any float dtype), or any pointer when not HAS_BASE
    partials_ptr,  # float64 (segments, chunks, count, count)
    segment_length,  # entries of one vector (segment s starts at s * segment_length)
    chunk_length,  # entries of one chunk of a segment
    count,
    HAS_BASE: tl.constexpr,
    COMPUTE: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    segment = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    chunks = tl.num_programs(1)
    chunk_begin = chunk * chunk_length
    start = segment * segment_length + chunk_begin
    length = tl.minimum(chunk_length, segment_length - chunk_begin)
    acc = tl.zeros([KP, KP], dtype=tl.float64)
    for e0 in range(0, length, BLOCK):
        lanes = e0 + tl.arange(0, BLOCK)
        mask = lanes < length
        x = _tile(
            addresses_ptr, codes_ptr, base_ptr, start + lanes, mask, count,
            HAS_BASE, COMPUTE, KP, BLOCK,
        )  # fmt: skip
        acc += tl.sum(x[:, None, :] * x[None, :, :], axis=2)
    rows = tl.arange(0, KP)
    where = (segment * chunks + chunk) * count * count + rows[:, None] * count + rows[None, :]
    tl.store(partials_ptr + where, acc, mask=(rows[:, None] < count) & (rows[None, :] < count))


@triton.jit
def gram_columns_kernel(
    addresses_ptr,  # int64 (KP,)
    codes_ptr,  # int32 (KP,)
    base_ptr,
    partials_ptr,  # float64 (splits, cols, count, count)
    rows,
    cols,
    split_rows,  # rows of one row range
    count,
    HAS_BASE: tl.constexpr,
    COMPUTE: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    split = tl.program_id(1).to(tl.int64)
    columns = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < cols
    r_begin = split * split_rows
    r_end = tl.minimum(rows, r_begin + split_rows)
    acc = tl.zeros([KP, KP, BLOCK], dtype=tl.float64)
    for r in range(r_begin, r_end):
        x = _tile(
            addresses_ptr, codes_ptr, base_ptr, r * cols + columns, mask, count,
            HAS_BASE, COMPUTE, KP, BLOCK,
        )  # fmt: skip
        acc += x[:, None, :] * x[None, :, :]
    ii = tl.arange(0, KP)[:, None, None]
    jj = tl.arange(0, KP)[None, :, None]
    cc = columns[None, None, :]
    where = ((split * cols + cc) * count + ii) * count + jj
    tl.store(partials_ptr + where, acc, mask=(ii < count) & (jj < count) & mask[None, None, :])


def _tables(tensors: list[torch.Tensor], kp: int, device: torch.device):
    addresses = [t.data_ptr() for t in tensors]
    codes = [_CODES[t.dtype] for t in tensors]
    pad = kp - len(tensors)
    addresses += addresses[:1] * pad
    codes += codes[:1] * pad
    return int64_on(addresses, device), torch.tensor(codes, dtype=torch.int32).to(device)


def gram(
    tensors: list[torch.Tensor], base: Optional[torch.Tensor], mode: str, dtype: torch.dtype
) -> torch.Tensor:
    """float64 (batch, k, k) Gram matrices of contiguous (rows, cols) tensors; `mode`
    ``"whole"``, ``"rows"`` or ``"columns"``; ``t_i - base`` formed in `dtype`."""
    rows, cols = tensors[0].shape
    device = tensors[0].device
    k = len(tensors)
    kp = triton.next_power_of_2(k)
    block = max(1, TILE_BUDGET // (kp * kp))
    addresses, codes = _tables(tensors, kp, device)
    common = {
        "HAS_BASE": base is not None,
        "COMPUTE": TRITON_DTYPES[dtype],
        "KP": kp,
        "BLOCK": block,
    }
    base_arg = tensors[0] if base is None else base
    if mode == "columns":
        splits = max(1, min(MAX_ROW_SPLITS, triton.cdiv(rows, SPLIT_ROWS)))
        split_rows = triton.cdiv(rows, splits)
        partials = torch.empty((splits, cols, k, k), dtype=torch.float64, device=device)
        launch(
            gram_columns_kernel,
            (triton.cdiv(cols, block), splits),
            device,
            addresses,
            codes,
            base_arg,
            partials,
            rows,
            cols,
            split_rows,
            k,
            **common,
        )
        return partials.sum(dim=0)
    segments, length = (1, rows * cols) if mode == "whole" else (rows, cols)
    chunks = max(1, min(MAX_CHUNKS, triton.cdiv(length, CHUNK_SIZE)))
    chunk_length = triton.cdiv(length, chunks)
    partials = torch.empty((segments, chunks, k, k), dtype=torch.float64, device=device)
    launch(
        gram_segments_kernel,
        (segments, chunks),
        device,
        addresses,
        codes,
        base_arg,
        partials,
        length,
        chunk_length,
        k,
        **common,
    )
    return partials.sum(dim=1)


_POINTERS = {"addresses_ptr": "*i64", "codes_ptr": "*i32"}

AOT_SIGNATURES = {
    **{
        f"gram_segments_kernel[{name}]": aot_entry(
            gram_segments_kernel,
            {
                **_POINTERS,
                "base_ptr": "*bf16",
                "partials_ptr": "*fp64",
                "segment_length": "i64",
                "chunk_length": "i64",
                "count": "i32",
            },
            {"HAS_BASE": True, "COMPUTE": FLOAT_TYPES[name], "KP": 8, "BLOCK": TILE_BUDGET // 64},
        )
        for name in ("fp32", "fp64")
    },
    **{
        f"gram_columns_kernel[{name}]": aot_entry(
            gram_columns_kernel,
            {
                **_POINTERS,
                "base_ptr": "*fp32",
                "partials_ptr": "*fp64",
                "rows": "i64",
                "cols": "i64",
                "split_rows": "i64",
                "count": "i32",
            },
            {"HAS_BASE": True, "COMPUTE": FLOAT_TYPES[name], "KP": 4, "BLOCK": TILE_BUDGET // 16},
        )
        for name in ("fp32", "fp64")
    },
}
