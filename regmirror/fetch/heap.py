"""Giving the memory of a finished download back to the system.

A blob body arrives in chunks of up to 1 MiB (``regmirror.fetch.body``), held until
the writer threads wrote and hashed them. glibc serves such chunks from its heap and
keeps them when they are freed: after a fetch, ~10-15 MB of free heap would stay in
the process's RSS until the next fetch reused it. ``trim_heap`` asks glibc to return
its free memory (``malloc_trim(0)``, a few milliseconds at most); it does nothing
where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


def trim_heap() -> bool:
    """Return the heap's free memory to the system; False when it cannot."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
