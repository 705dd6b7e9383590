"""``scope_stats``: fused mean / population std / count of many tensors in one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .. import backends
from .._dtypes import KERNEL_DTYPE_CODES
from .._tensors import TensorLike, as_tensor_list
from ..reference import scope_stats as reference
from ..stats import ScopeStats
from ._marshal import contiguous, device_tables, pointer_args

#: Elements per CUDA block.
CUDA_CHUNK_SIZE = 1 << 16


def scope_stats(tensors: Sequence[TensorLike], *, backend: Optional[str] = None) -> ScopeStats:
    """Mean, population std and count of every tensor of a list, in one fused pass.

    The statistics are float64 whatever the input dtype (float16, bfloat16, float32,
    float64) and are accurate to about 1e-12 relative even when a tensor's |mean| is
    many times its std (shifted sums per chunk, merged with Chan's update). An empty
    tensor gives count 0 and NaN mean and std; a NaN or inf in a tensor makes only
    that tensor's statistics non-finite.

    Args:
        tensors: a list or tuple of tensors (torch, numpy or DLPack) on one device, of
            any shapes.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; default: the
            fastest usable one for the tensors' device (see :mod:`fastmerge.backends`).

    Returns:
        :class:`~fastmerge.ScopeStats` with float64 ``mean``, ``std``, ``count`` on the
        tensors' device.

    Example:
        >>> import torch, fastmerge
        >>> model = torch.nn.Linear(4, 3)
        >>> stats = fastmerge.scope_stats([p for p in model.parameters()])
        >>> stats.count.tolist()
        [12.0, 3.0]
    """
    table = _cpu_fast_path(tensors, backend) if backend in (None, "cpu") else None
    if table is None:
        ts = as_tensor_list(tensors, "tensors")
        if not ts:
            empty = torch.empty(0, dtype=torch.float64)
            return ScopeStats(empty, empty.clone(), empty.clone())
        name = backends.resolve_backend(backend, ts[0].device)
        with torch.no_grad():
            table = _IMPLEMENTATIONS[name](ts)
    return ScopeStats(table[0], table[1], table[2])


def _cpu_fast_path(tensors: Sequence[TensorLike], backend: Optional[str]) -> Optional[torch.Tensor]:
    """The common case, a list of contiguous CPU torch tensors, with the per-tensor
    checks done in C++ (they dominate for thousands of small tensors). Returns None
    whenever anything needs the general path, which then validates and reports."""
    if type(tensors) is not list or not tensors or type(tensors[0]) not in _TENSOR_TYPES:
        return None
    if backends.resolve_backend(backend, tensors[0].device) != "cpu":
        return None
    out = torch.empty((3, len(tensors)), dtype=torch.float64)
    bad = backends.cpu_extension().scope_stats_tensors(tensors, KERNEL_DTYPE_CODES, out.data_ptr())
    return out if bad < 0 else None


_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _run_reference(tensors: list[torch.Tensor]) -> torch.Tensor:
    return reference.scope_stats(tensors)


def _run_cpu(tensors: list[torch.Tensor]) -> torch.Tensor:
    tensors = contiguous(tensors)
    out = torch.empty((3, len(tensors)), dtype=torch.float64)
    backends.cpu_extension().scope_stats(*pointer_args(tensors), out.data_ptr())
    return out


def _run_cuda(tensors: list[torch.Tensor]) -> torch.Tensor:
    tensors = contiguous(tensors)
    device = tensors[0].device
    addresses, numels, codes = pointer_args(tensors)
    tensor_table, chunk_table, chunks = device_tables(
        [addresses, codes, numels], numels, CUDA_CHUNK_SIZE, device
    )
    num_tensors, num_chunks = len(tensors), int(chunks.tensor.shape[0])
    out = torch.full((3, num_tensors), float("nan"), dtype=torch.float64, device=device)
    out[2] = torch.tensor(numels, dtype=torch.float64)
    partials = torch.empty((num_chunks, 3), dtype=torch.float64, device=device)
    counters = torch.zeros(num_tensors, dtype=torch.int32, device=device)
    with torch.cuda.device(device):
        backends.cuda_extension().scope_stats(
            tensor_table.data_ptr(),
            num_tensors,
            chunk_table.data_ptr(),
            num_chunks,
            CUDA_CHUNK_SIZE,
            partials.data_ptr(),
            counters.data_ptr(),
            out.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream,
        )
    return out


def _run_triton(tensors: list[torch.Tensor]) -> torch.Tensor:
    return backends.triton_kernels().scope_stats.scope_stats(contiguous(tensors))


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}
