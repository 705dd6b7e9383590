"""Element types the kernels accept, and their codes (see csrc/include/fastmerge/dtypes.h)."""

from __future__ import annotations

import torch

#: dtype -> code understood by the C++/CUDA kernels. Keep in sync with dtypes.h.
KERNEL_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float16: 0,
    torch.bfloat16: 1,
    torch.float32: 2,
    torch.float64: 3,
}

SUPPORTED_DTYPES = tuple(KERNEL_DTYPE_CODES)


def dtype_names() -> str:
    """The supported dtypes as text, for error messages."""
    return ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
