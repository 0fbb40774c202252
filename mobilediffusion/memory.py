"""Giving freed memory back to the OS (glibc), for processes that load and drop whole models."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS. glibc keeps freed blocks under its mmap
    threshold (which rises to 32 MB as large blocks are freed, so most weight tensors end up below it) in
    its heap, where the process's resident size keeps counting them (GBs after an SD-size model, and the
    process grows with every model switch); malloc_trim returns them. Elsewhere (not Linux, or not glibc,
    e.g. musl) only the collection runs."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to trim
            pass


__all__ = ["release_memory"]
