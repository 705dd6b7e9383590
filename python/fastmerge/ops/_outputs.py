"""The `out` handling the elementwise ops share (``weighted_sum``, ``nearswap``): a new
output whose pages fault in cheaply, the checks of a given one, and the overlap rule."""

from __future__ import annotations

from typing import Optional

import torch

from .._dtypes import KERNEL_DTYPE_CODES, dtype_names
from ._library import tracing


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new output; a large CPU one in memory whose pages fault in cheaply (huge pages):
    for a streamed merge the first touch of a fresh output costs more than the kernel."""
    if device.type == "cpu" and not tracing():  # traced: the graph allocates
        from ..io._memory import empty_tensor  # a helper of the allocator only

        return empty_tensor(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def check_out(out, out_dtype: Optional[torch.dtype], shape, device, inputs: str) -> None:
    """Refuse an `out` of the wrong type, dtype, shape or device, or not contiguous
    (`inputs` names the op's inputs in the messages, e.g. ``"the tensors"``)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype not in KERNEL_DTYPE_CODES:
        raise TypeError(f"out has dtype {out.dtype}; supported dtypes are {dtype_names()}")
    if out_dtype is not None and out.dtype != out_dtype:
        raise ValueError(f"out has dtype {out.dtype} but out_dtype is {out_dtype}")
    if out.shape != shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but {inputs} have {tuple(shape)}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but {inputs} are on {device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def overlaps(tensor: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `out` overlaps `tensor` other than by being it exactly (same memory, same
    dtype: read and written element by element, which the kernels allow)."""
    start = out.data_ptr()
    end = start + out.numel() * out.element_size()
    t_start = tensor.data_ptr()
    t_end = t_start + tensor.numel() * tensor.element_size()
    return t_start < end and start < t_end and not (t_start == start and tensor.dtype == out.dtype)
