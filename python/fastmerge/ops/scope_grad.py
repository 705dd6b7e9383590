"""``scope_grad``: the fused backward of scope-based penalties.

The gradient of any function f(mean_i, std_i) of the tensors' scopes is, for every
element w of tensor i, ``df/dmean_i / n_i + df/dstd_i * (w - mean_i) / (n_i std_i)``:
affine in ``w - mean_i``. This op writes ``alpha_i + beta_i * (x_i - mean_i)`` for all
tensors in one pass; :func:`fastmerge.wsa_penalty` uses it for its backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .. import backends
from .._tensors import TensorLike, as_tensor_list
from ..reference import scope_grad as reference
from ._library import define, resolve
from ._marshal import contiguous, device_tables, pointer_args

CUDA_CHUNK_SIZE = 1 << 16


def scope_grad(
    tensors: Sequence[TensorLike],
    mean: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> list[torch.Tensor]:
    """``alpha[i] + beta[i] * (tensors[i] - mean[i])`` for every tensor, in one pass.

    Outputs have each input's shape and dtype. Half-precision and float32 inputs are
    computed in float32, float64 inputs in float64.

    Args:
        tensors: a list of tensors on one device.
        mean, alpha, beta: per-tensor coefficients, shape ``(len(tensors),)``.
        backend: as for :func:`fastmerge.scope_stats`.

    Example:
        >>> import torch, fastmerge
        >>> x = torch.tensor([1.0, 3.0])
        >>> one = torch.ones(1, dtype=torch.float64)
        >>> fastmerge.ops.scope_grad([x], 2 * one, 0 * one, 0.5 * one)[0].tolist()
        [-0.5, 0.5]
    """
    ts = as_tensor_list(tensors, "tensors")
    if not ts:
        return []
    device = ts[0].device
    coefficients = torch.stack(
        [
            _coefficient(c, name, len(ts), device)
            for c, name in ((mean, "mean"), (alpha, "alpha"), (beta, "beta"))
        ]
    )
    return scope_grad_op([t.detach() for t in ts], coefficients, backend)


def _kernel(
    tensors: list[torch.Tensor], coefficients: torch.Tensor, backend: Optional[str]
) -> list[torch.Tensor]:
    if not tensors:
        return []
    name = resolve(backend, tensors[0].device)
    return _IMPLEMENTATIONS[name](contiguous(tensors), coefficients.contiguous())


def _fake(
    tensors: list[torch.Tensor], coefficients: torch.Tensor, backend: Optional[str]
) -> list[torch.Tensor]:
    return [t.new_empty(t.shape) for t in tensors]  # contiguous, like the kernels' outputs


def _coefficient(value: torch.Tensor, name: str, n: int, device: torch.device) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1)
    if value.shape[0] != n:
        raise ValueError(f"{name} must have one entry per tensor ({n}), got {value.shape[0]}")
    return value


def _run_reference(tensors: list[torch.Tensor], coefficients: torch.Tensor) -> list[torch.Tensor]:
    return reference.scope_grad(tensors, coefficients[0], coefficients[1], coefficients[2])


def _run_cpu(tensors: list[torch.Tensor], coefficients: torch.Tensor) -> list[torch.Tensor]:
    tensors = contiguous(tensors)
    outputs = [torch.empty_like(t) for t in tensors]
    addresses, numels, codes = pointer_args(tensors)
    backends.cpu_extension().scope_grad(
        addresses, [o.data_ptr() for o in outputs], numels, codes, coefficients.data_ptr()
    )
    return outputs


def _run_cuda(tensors: list[torch.Tensor], coefficients: torch.Tensor) -> list[torch.Tensor]:
    tensors = contiguous(tensors)
    device = tensors[0].device
    outputs = [torch.empty_like(t) for t in tensors]
    addresses, numels, codes = pointer_args(tensors)
    tensor_table, chunk_table, chunks = device_tables(
        [addresses, [o.data_ptr() for o in outputs], codes], numels, CUDA_CHUNK_SIZE, device
    )
    with torch.cuda.device(device):
        backends.cuda_extension().scope_grad(
            tensor_table.data_ptr(),
            len(tensors),
            chunk_table.data_ptr(),
            int(chunks.tensor.shape[0]),
            coefficients.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream,
        )
    return outputs


def _run_triton(tensors: list[torch.Tensor], coefficients: torch.Tensor) -> list[torch.Tensor]:
    return backends.triton_kernels().scope_grad.scope_grad(contiguous(tensors), coefficients)


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}

scope_grad_op = define(
    "scope_grad",
    "(Tensor[] tensors, Tensor coefficients, str? backend) -> Tensor[]",
    _kernel,
    _fake,
)
