"""Triton kernel for the fused scope gradient: out_i = alpha_i + beta_i * (x_i - mean_i).

One program per chunk; half precisions and float32 compute in float32, float64 in
float64, as in the CPU and CUDA kernels.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fastmerge._chunks import plan_chunks

from ._aot import FLOAT_TYPES, aot_entry, compute_type
from ._launch import launch
from ._tables import BLOCK_SIZE, CHUNK_SIZE, TRITON_DTYPES, group_by_dtype, int64_on


@triton.jit
def scope_grad_kernel(
    x_addresses_ptr,  # int64 (T,)
    out_addresses_ptr,  # int64 (T,)
    coefficients_ptr,  # float64 (3, T): mean, alpha, beta of this launch's tensors
    num_tensors,
    chunk_tensor_ptr,  # int64 (C,)
    chunk_begin_ptr,  # int64 (C,)
    chunk_length_ptr,  # int64 (C,)
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c)
    begin = tl.load(chunk_begin_ptr + c)
    length = tl.load(chunk_length_ptr + c)
    x_ptr = tl.load(x_addresses_ptr + t).to(tl.pointer_type(DTYPE)) + begin
    out_ptr = tl.load(out_addresses_ptr + t).to(tl.pointer_type(DTYPE)) + begin
    mean = tl.load(coefficients_ptr + t).to(COMPUTE)
    alpha = tl.load(coefficients_ptr + num_tensors + t).to(COMPUTE)
    beta = tl.load(coefficients_ptr + 2 * num_tensors + t).to(COMPUTE)
    for start in range(0, length, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < length
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        tl.store(out_ptr + offsets, (alpha + beta * (x - mean)).to(DTYPE), mask=mask)


def scope_grad(tensors: list[torch.Tensor], coefficients: torch.Tensor) -> list[torch.Tensor]:
    """Outputs like `tensors`; `coefficients` is float64 (3, T) on the tensors' device."""
    device = tensors[0].device
    outputs = [torch.empty_like(t) for t in tensors]
    numels = np.array([t.numel() for t in tensors], dtype=np.int64)
    for dtype, indices in group_by_dtype(tensors).items():
        chunks = plan_chunks(numels[indices], CHUNK_SIZE)
        num_chunks = int(chunks.tensor.shape[0])
        if num_chunks == 0:
            continue
        launch(
            scope_grad_kernel,
            (num_chunks,),
            device,
            int64_on([tensors[i].data_ptr() for i in indices], device),
            int64_on([outputs[i].data_ptr() for i in indices], device),
            coefficients[:, indices].contiguous(),
            len(indices),
            int64_on(chunks.tensor, device),
            int64_on(chunks.begin, device),
            int64_on(chunks.length, device),
            DTYPE=TRITON_DTYPES[dtype],
            COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
            BLOCK=BLOCK_SIZE,
        )
    return outputs


AOT_SIGNATURES = {
    f"scope_grad_kernel[{name}]": aot_entry(
        scope_grad_kernel,
        {
            "x_addresses_ptr": "*i64",
            "out_addresses_ptr": "*i64",
            "coefficients_ptr": "*fp64",
            "num_tensors": "i32",
            "chunk_tensor_ptr": "*i64",
            "chunk_begin_ptr": "*i64",
            "chunk_length_ptr": "*i64",
        },
        {"DTYPE": tl_dtype, "COMPUTE": compute_type(name), "BLOCK": BLOCK_SIZE},
    )
    for name, tl_dtype in FLOAT_TYPES.items()
}
