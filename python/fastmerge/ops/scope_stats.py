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
from ._library import define, resolve
from ._marshal import contiguous, device_tables, pointer_args
from .scope_grad import scope_grad_op

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
        tensors' device. ``mean`` and ``std`` are differentiable with respect to the
        tensors (the backward is one fused :func:`~fastmerge.ops.scope_grad` pass; the
        zero subgradient where std = 0); ``count`` is not.

    Example:
        >>> import torch, fastmerge
        >>> model = torch.nn.Linear(4, 3)
        >>> stats = fastmerge.scope_stats([p for p in model.parameters()])
        >>> stats.count.tolist()
        [12.0, 3.0]
    """
    if type(tensors) is list and tensors and _PLAIN.issuperset(map(type, tensors)):
        ts = tensors  # plain torch tensors: the kernel checks dtypes and devices
    else:
        ts = as_tensor_list(tensors, "tensors")
    if not ts:
        empty = torch.empty(0, dtype=torch.float64)
        return ScopeStats(empty, empty.clone(), empty.clone())
    mean, std, count = torch.unbind(scope_stats_op(ts, backend))  # one call for 3 views
    return ScopeStats._of_rows(mean, std, count)


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _kernel(tensors: list[torch.Tensor], backend: Optional[str]) -> torch.Tensor:
    """The (3, n) float64 table (mean, std, count rows) on real tensors."""
    device = tensors[0].device
    name = resolve(backend, device)
    if name == "cpu":
        # Contiguous CPU tensors of supported dtypes: the per-tensor checks run in C++
        # (they dominate for thousands of small tensors); anything else -1 -> general path.
        out = torch.empty(3, len(tensors), dtype=torch.float64)
        codes = KERNEL_DTYPE_CODES
        if backends.cpu_extension().scope_stats_tensors(tensors, codes, out.data_ptr()) < 0:
            return out
    _check_list(tensors)
    return _IMPLEMENTATIONS[name](tensors)


def _check_list(tensors: list[torch.Tensor]) -> None:
    """The checks of :func:`as_tensor_list` (dtype, one device), naming the culprit."""
    as_tensor_list(tensors, "tensors")


def _fake(tensors: list[torch.Tensor], backend: Optional[str]) -> torch.Tensor:
    _check_list(tensors)
    return tensors[0].new_empty((3, len(tensors)), dtype=torch.float64)


def _setup_context(ctx, inputs, output) -> None:
    tensors, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(output, *tensors)


def _backward(ctx, grad_table: torch.Tensor):
    """d mean / d w = 1/n and d std / d w = (w - mean) / (n std): affine in w - mean, one
    fused scope_grad pass (the zero subgradient where std = 0)."""
    table, *tensors = ctx.saved_tensors
    needed = [i for i, need in enumerate(ctx.needs_input_grad[0]) if need]
    grads: list[Optional[torch.Tensor]] = [None] * len(tensors)
    if needed:
        mean, std, count = table
        n = count.clamp_min(1)
        alpha = grad_table[0] / n
        beta = torch.where(std > 0, grad_table[1] / (n * std), torch.zeros_like(std))
        coefficients = torch.stack([mean, alpha, beta])
        if len(needed) < len(tensors):
            coefficients = coefficients[:, needed]
        computed = scope_grad_op([tensors[i] for i in needed], coefficients, ctx.backend)
        for i, grad in zip(needed, computed):
            grads[i] = grad
    return grads, None


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

scope_stats_op = define(
    "scope_stats",
    "(Tensor[] tensors, str? backend) -> Tensor",
    _kernel,
    _fake,
    backward=_backward,
    setup_context=_setup_context,
)
