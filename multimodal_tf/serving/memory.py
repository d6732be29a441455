"""Returning freed heap memory to the operating system after large requests.

A large request (thousands of decoded images) makes TF's kernels allocate
gigabytes through glibc malloc from many threads, so from many malloc
arenas. When the request ends the memory is freed, but glibc keeps freed
chunks in each arena, and only the main arena's top is ever returned
automatically: RSS stays at its peak for good. ``malloc_trim(0)`` walks every
arena and returns free pages with ``madvise(MADV_DONTNEED)``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

logger = logging.getLogger(__name__)

# Trimming walks every arena (milliseconds); under a stream of large requests
# once a second is enough to keep RSS near the working set.
MIN_INTERVAL_SECONDS = 1.0

_lock = threading.Lock()
_last = 0.0
_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            libc.malloc_trim.restype = ctypes.c_int
            _libc = libc
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            _libc = False
    return _libc


def trim_heap(force: bool = False) -> bool:
    """Returns free heap pages to the OS (glibc only); at most once per MIN_INTERVAL_SECONDS.

    Returns:
        whether malloc_trim ran.
    """
    global _last
    libc = _load_libc()
    if not libc:
        return False
    with _lock:
        now = time.monotonic()
        if not force and now - _last < MIN_INTERVAL_SECONDS:
            return False
        _last = now
    libc.malloc_trim(0)
    return True


def rss_bytes() -> int:
    """This process's resident set size (Linux), for logs and tests."""
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")
