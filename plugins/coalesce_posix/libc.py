"""The C library, for the Linux system calls Python does not wrap (syncfs, renameat2)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    """The process's C library, loaded once, with errno kept for ``ctypes.get_errno``."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
