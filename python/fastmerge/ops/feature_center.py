"""``feature_center``: the prologue of :class:`fastmerge.FeatureStats`, fused.

One pass over a (rows, cols) block of activations writes ``x - shift`` in the dtype of
the GEMM that follows (float32, or float64 for float64 activations) and returns the
float64 column sums and sums of squares of what it wrote. The shift is rounded to that
dtype before the subtraction, so the sums describe exactly the values the GEMM reads.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from .._dtypes import KERNEL_DTYPE_CODES, dtype_names
from .._tensors import TensorLike, as_tensor
from ..reference import feature_center as reference
from ._library import define, resolve

#: Output dtypes (the GEMM's) the kernels write.
OUT_DTYPES = (torch.float32, torch.float64)
#: Row splits of the CUDA kernel: each split's column sums are added up in order.
CUDA_ROWS_PER_SPLIT = 256
CUDA_MAX_SPLITS = 128


def feature_center(
    x: TensorLike,
    shift: TensorLike,
    *,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x - shift`` and the float64 column sums of it and of its square, in one pass.

    Args:
        x: (rows, cols) activations, float16, bfloat16, float32 or float64.
        shift: (cols,) per-column shift; it is rounded to the output dtype first.
        out_dtype: ``torch.float32`` or ``torch.float64``; default float64 for float64
            `x`, else float32.
        out: optional (rows, cols) tensor to write into (its dtype wins over
            `out_dtype`); its columns must be contiguous.
        backend: as for :func:`fastmerge.scope_stats`.

    Returns:
        ``(out, sums)``: the shifted values, and float64 ``sums`` of shape (2, cols) with
        ``sums[0] = out.sum(0)`` and ``sums[1] = (out ** 2).sum(0)`` accumulated in float64.

    Example:
        >>> import torch, fastmerge
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 14.0]])
        >>> out, sums = fastmerge.ops.feature_center(x, torch.tensor([2.0, 12.0]))
        >>> out.tolist(), sums.tolist()
        ([[-1.0, -2.0], [1.0, 2.0]], [[0.0, 0.0], [2.0, 8.0]])
    """
    x_t = as_tensor(x, "x")
    if x_t.dtype not in KERNEL_DTYPE_CODES:
        raise TypeError(f"x has dtype {x_t.dtype}; supported dtypes are {dtype_names()}")
    if x_t.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, cols), got shape {tuple(x_t.shape)}")
    rows, cols = x_t.shape
    device = x_t.device
    x_t = x_t.detach()
    if cols > 1 and x_t.stride(1) != 1:
        x_t = x_t.contiguous()
    shift_t = as_tensor(shift, "shift")
    if not shift_t.dtype.is_floating_point:
        raise TypeError(f"shift must be a floating tensor, got dtype {shift_t.dtype}")
    if shift_t.shape != (cols,):
        raise ValueError(f"shift must have shape ({cols},), got {tuple(shift_t.shape)}")
    if shift_t.device != device:
        raise ValueError(f"shift is on {shift_t.device} but x is on {device}")
    shift_t = shift_t.detach().to(torch.float64).contiguous()
    if out is None:
        dtype = out_dtype or (torch.float64 if x_t.dtype == torch.float64 else torch.float32)
        if dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be torch.float32 or torch.float64, got {dtype}")
        out = torch.empty((rows, cols), dtype=dtype, device=device)
    else:
        if not isinstance(out, torch.Tensor) or out.dtype not in OUT_DTYPES:
            raise TypeError("out must be a float32 or float64 torch.Tensor")
        if out.shape != (rows, cols) or out.device != device:
            raise ValueError(
                f"out must have shape {(rows, cols)} on {device}, got {tuple(out.shape)} "
                f"on {out.device}"
            )
        if cols > 1 and out.stride(1) != 1:
            raise ValueError("out must have contiguous columns (stride 1 along dim 1)")
    return out, _OP(x_t, shift_t, out, backend)


def _kernel(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor, backend) -> torch.Tensor:
    """Write x - shift into `out`; return the (2, cols) float64 sums."""
    name = resolve(backend, x.device)
    with torch.no_grad():
        return _IMPLEMENTATIONS[name](x, shift, out)


def _fake(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor, backend) -> torch.Tensor:
    return x.new_empty((2, x.shape[1]), dtype=torch.float64)


def _run_reference(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return reference.feature_center(x, shift, out)


def _native_args(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> list:
    """The shared leading arguments of the CPU and CUDA kernels (pointers, codes, strides)."""
    rows, cols = x.shape
    return [
        x.data_ptr(),
        KERNEL_DTYPE_CODES[x.dtype],
        rows,
        cols,
        x.stride(0),
        shift.data_ptr(),
        out.data_ptr(),
        KERNEL_DTYPE_CODES[out.dtype],
        out.stride(0),
    ]


def _run_cpu(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    sums = torch.empty((2, x.shape[1]), dtype=torch.float64)
    backends.cpu_extension().feature_center(*_native_args(x, shift, out), sums.data_ptr())
    return sums


def _run_cuda(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    rows, cols = x.shape
    device = x.device
    splits = max(1, min(CUDA_MAX_SPLITS, -(-rows // CUDA_ROWS_PER_SPLIT)))
    partials = torch.zeros((splits, 2, cols), dtype=torch.float64, device=device)
    with torch.cuda.device(device):
        backends.cuda_extension().feature_center(
            *_native_args(x, shift, out),
            splits,
            partials.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream,
        )
    return partials.sum(0)


def _run_triton(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return backends.triton_kernels().feature_center.feature_center(x, shift, out)


_IMPLEMENTATIONS = {
    "reference": _run_reference,
    "cpu": _run_cpu,
    "cuda": _run_cuda,
    "triton": _run_triton,
}

_OP = define(
    "feature_center",
    "(Tensor x, Tensor shift, Tensor(a!) out, str? backend) -> Tensor",
    _kernel,
    _fake,
)
