"""One adapter from user inputs (torch, numpy, DLPack objects) to torch tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._dtypes import KERNEL_DTYPE_CODES, dtype_names

TensorLike = Any  # torch.Tensor, numpy.ndarray, or any object with __dlpack__


def as_tensor(value: TensorLike, name: str) -> torch.Tensor:
    """Return `value` as a torch tensor without copying when possible.

    Accepts torch tensors, numpy arrays and DLPack-capable objects (JAX, CuPy, ...).
    `name` is used in the error message for anything else.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if hasattr(value, "__dlpack__"):
        return torch.from_dlpack(value)
    raise TypeError(
        f"{name} must be a torch.Tensor, numpy.ndarray or DLPack-capable array, "
        f"got {type(value).__name__}"
    )


def as_tensor_list(values: Sequence[TensorLike], name: str) -> list[torch.Tensor]:
    """Validate a list of floating tensors on one device and return them as torch tensors.

    Raises TypeError for a non-list argument or an unsupported dtype, and ValueError for
    tensors on different devices; every message names the offending position.
    """
    if isinstance(values, (torch.Tensor, np.ndarray)) or not isinstance(values, Sequence):
        raise TypeError(
            f"{name} must be a list or tuple of tensors, got {type(values).__name__}"
            + (" (wrap a single tensor in a list)" if hasattr(values, "shape") else "")
        )
    tensors = [
        v if type(v) is torch.Tensor else as_tensor(v, f"{name}[{i}]") for i, v in enumerate(values)
    ]
    if not tensors:
        return tensors
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.dtype not in KERNEL_DTYPE_CODES:
            raise TypeError(
                f"{name}[{i}] has dtype {t.dtype}; supported dtypes are {dtype_names()}"
            )
        if t.device != device:
            raise ValueError(
                f"{name}[{i}] is on {t.device} but {name}[0] is on {device}; "
                "all tensors must be on one device"
            )
    return tensors
