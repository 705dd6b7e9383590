"""Memory for streamed tensors: returned to the system promptly, faulted in cheaply.

Two costs dominate a merge that streams gigabytes through fresh buffers, and neither is
the data's own: glibc keeping freed blocks (:func:`allocate_large_blocks_with_mmap`), and
the first touch of every new 4 KiB page (a page fault and a zeroed page each: filling a
new 128 MiB buffer from the page cache runs at ~2.3 GB/s here, into a buffer already
touched at ~15 GB/s). :func:`empty_tensor` gives large buffers their own memory map,
aligned to 2 MiB and advised to use transparent huge pages, which takes most of that
second cost away (~12 GB/s for the same read) while memory still goes back to the system
the moment the tensor is freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import mmap
from collections.abc import Sequence
from typing import Union

import torch

#: glibc's mallopt parameter number for the mmap threshold.
_M_MMAP_THRESHOLD = -3
#: Size and alignment of a transparent huge page (x86-64, arm64 with 4 KiB pages).
HUGE_PAGE = 1 << 21
#: Buffers at least this large get a huge-page-aligned memory map of their own.
LARGE_BUFFER_BYTES = 2 * HUGE_PAGE
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.cache
def allocate_large_blocks_with_mmap(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of `threshold` bytes or more with its own memory
    map, returned to the system as soon as it is freed.

    By default glibc raises that threshold (up to 32 MB) each time such a block is
    freed, after which tensors of a few MB come from heap arenas (one per thread) that
    are not given back: streaming thousands of tensors then grows the resident memory by
    hundreds of MB. Setting the threshold explicitly turns that adjustment off. Returns
    False where there is no glibc (nothing changes).

    Example:
        >>> allocate_large_blocks_with_mmap() in (True, False)
        True
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


@functools.cache
def huge_pages_available() -> bool:
    """True when this system backs memory advised with ``MADV_HUGEPAGE`` by transparent
    huge pages (Linux with THP ``always`` or ``madvise``).

    Example:
        >>> huge_pages_available() in (True, False)
        True
    """
    if getattr(mmap, "MADV_HUGEPAGE", None) is None or not hasattr(mmap.mmap, "madvise"):
        return False
    try:
        with open(_THP_SETTING) as f:
            setting = f.read()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def empty_tensor(
    shape: Union[int, Sequence[int]], dtype: torch.dtype = torch.uint8
) -> torch.Tensor:
    """A new uninitialized, contiguous CPU tensor, like :func:`torch.empty`.

    One of at least :data:`LARGE_BUFFER_BYTES` bytes, where transparent huge pages are
    available, lives in an anonymous memory map of its own whose data starts on a 2 MiB
    boundary and is advised ``MADV_HUGEPAGE``: its first touch then faults in 2 MiB pages,
    not 4 KiB ones (512 times fewer faults). The map is unmapped as soon as the tensor and
    every view of it are freed, so memory goes back to the system at once, as with
    :func:`allocate_large_blocks_with_mmap`; the tensor's storage is exactly its own bytes.
    Anything smaller, or without huge pages, is ``torch.empty``.

    (Recycling freed buffers instead, to skip the kernel's zeroing of new pages, was
    measured slower here: more system time and ~50% more peak memory.)

    Example:
        >>> t = empty_tensor((1024, 1024), torch.float32)
        >>> t.shape, t.dtype, t.is_contiguous()
        (torch.Size([1024, 1024]), torch.float32, True)
    """
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < LARGE_BUFFER_BYTES or not huge_pages_available():
        return torch.empty(shape, dtype=dtype)
    # one huge page of slack to move the start to a 2 MiB boundary; the slack is never
    # touched, so it costs address space only
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    del whole
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # THP switched off meanwhile: plain pages, still correct
        pass
    # the tensor keeps `region` alive through the buffer it was made from
    data = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=start)
    return data.view(dtype).view(shape)
