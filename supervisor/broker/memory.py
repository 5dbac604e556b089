"""Give the broker's freed heap back to the OS once workers are gone.

A burst of sessions leaves glibc's arenas (notably the ZeroMQ I/O thread's) holding
free pages at their high-water mark; RSS then stays up after every session was
reaped, which is the symptom this project exists to remove. malloc_trim(0) returns
those pages (madvise) in well under a millisecond for a heap this size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_trim = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _trim = getattr(_libc, "malloc_trim", None)  # glibc only (not musl)
    except OSError:
        _trim = None


def release_free_memory() -> bool:
    """Return free heap pages to the OS; False where the C library cannot."""
    if _trim is None:
        return False
    _trim(0)
    return True
