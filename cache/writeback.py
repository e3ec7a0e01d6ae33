"""Start writing a file's dirty pages to the disk without waiting for them.

With plenty of RAM the kernel leaves written pages dirty in the page cache
until a threshold of gigabytes, and then writes them while the writer waits.
A store that asks for write-back as soon as a chunk is written keeps the disk
busy while the next chunk is computed and checked, so the work of the CPU and
the disk overlap instead of adding up (``benchmarks/bench_store.py`` measures
it). Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` does this; elsewhere
the call does nothing and the kernel writes in its own time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_SYNC_FILE_RANGE_WRITE = 2


def _load():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load()  # benchmarks/bench_store.py sets it to None to measure what it gains


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing file ``fd``'s dirty pages now; returns at once."""
    if _sync_file_range is not None and _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
        log.debug("sync_file_range failed: %s", os.strerror(ctypes.get_errno()))
