"""The one way a Triton kernel of fastmerge is launched: on the inputs' device, on a grid
the GPU accepts.

Triton takes the device and the stream of a launch from ``torch.cuda.current_device()``,
not from the tensors, so inputs on ``cuda:1`` while device 0 is current would run on the
wrong GPU (reading another device's addresses). :func:`launch` makes the inputs' device
current around the launch, as the CUDA backend does with ``torch.cuda.device``.

A CUDA grid holds at most 2**31 - 1 programs along x and 65535 along y and z; a larger
grid fails at launch with an opaque "invalid argument". :func:`launch` checks the grid
first and raises a :class:`ValueError` naming the kernel, the axis and what it counts.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional, Sequence

import torch

#: Most programs along grid axes x, y and z (CUDA's limits, which Triton passes through).
GRID_LIMITS = (2**31 - 1, 65535, 65535)
_AXIS_NAMES = "xyz"


def grid_error(
    kernel_name: str, grid: Sequence[int], axes: Optional[Sequence[str]] = None
) -> Optional[str]:
    """Why `grid` cannot be launched (a message naming the kernel, the axis and what it
    counts, from `axes`), or None when every axis is within :data:`GRID_LIMITS`.

    Example:
        >>> grid_error("k", (10, 65535)) is None
        True
        >>> grid_error("k", (1, 65536), ("row tiles", "experts"))
        "k: grid axis y (experts) has 65536 programs, more than CUDA's limit of 65535"
    """
    if len(grid) > 3:
        return f"{kernel_name}: a grid has at most 3 axes, got {len(grid)}"
    for index, programs in enumerate(grid):
        limit = GRID_LIMITS[index]
        if programs > limit:
            what = f" ({axes[index]})" if axes is not None and index < len(axes) else ""
            return (
                f"{kernel_name}: grid axis {_AXIS_NAMES[index]}{what} has {programs} programs, "
                f"more than CUDA's limit of {limit}"
            )
    return None


def device_context(device: torch.device) -> ContextManager[Any]:
    """The context in which a launch on `device` runs: that CUDA device made current
    (torch's current stream of that device is then Triton's stream too), else nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(
    kernel: Any,
    grid: Sequence[int],
    device: torch.device,
    *args: Any,
    axes: Optional[Sequence[str]] = None,
    **kwargs: Any,
) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` with `device` (the inputs' device) current,
    after checking the grid against CUDA's limits (`axes` says what each axis counts, for
    the error message)."""
    grid = tuple(int(g) for g in grid)
    name = getattr(kernel, "__name__", None) or type(kernel).__name__
    error = grid_error(name, grid, axes)
    if error is not None:
        raise ValueError(error)
    # Looked up at call time (not bound at import), so tests can stand in a recorder.
    with device_context(device):
        kernel[grid](*args, **kwargs)
