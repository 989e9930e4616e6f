"""The process's memory: freed memory handed back to the system between an analysis's stages.

Standard library only (the result writers use it, and Slicer's Load results imports them
without PyTorch or OpenCV).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc (Linux); absent on macOS and Windows
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Give the memory freed so far back to the system.

    glibc keeps freed blocks (a volume-sized temporary among them) in the process for reuse, so
    without this each stage's temporaries would stay in its footprint and add up to the peak
    that the memory budget (`volume_io.MAX_VOXELS`) is measured by. Elsewhere a no-op.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
