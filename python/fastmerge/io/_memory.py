"""Returning freed tensor memory to the operating system promptly."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: glibc's mallopt parameter number for the mmap threshold.
_M_MMAP_THRESHOLD = -3


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
