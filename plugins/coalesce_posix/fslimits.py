"""The largest file the file system under a directory stores (``VolumeHandle.max_file_size``).

Read from ``statfs(2)``: the file system's type and block size.  ext2/3/4 address 2^32 - 1
blocks per file (16 TiB - 4 KiB with 4 KiB blocks, the kernel's ``ext4_max_size`` for extent
files); btrfs, XFS, ZFS, tmpfs and every other type are bounded by the kernel's ``loff_t``
(2^63 - 1; a file system that stores less refuses a write past it with EFBIG, which the
applier reports).
"""

from __future__ import annotations

import ctypes
import os

from coalesce_core.stream.records import MAX_FILE_SIZE

from .libc import libc

EXT_MAGIC = 0xEF53


class _StatFs(ctypes.Structure):
    # the head of struct statfs on 64-bit Linux: __fsword_t f_type, f_bsize (the rest is padding here)
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long), ("_rest", ctypes.c_byte * 104)]


def statfs_type(path: str) -> tuple[int, int]:
    """(f_type, f_bsize) of the file system holding ``path``; OSError if statfs fails."""
    buf = _StatFs()
    if libc().statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return buf.f_type & 0xFFFFFFFF, buf.f_bsize


def limit_of(fs_type: int, block_size: int) -> int:
    """The largest file a file system of ``fs_type`` with ``block_size``-byte blocks stores."""
    if fs_type == EXT_MAGIC and block_size > 0:
        return min(((1 << 32) - 1) * block_size, MAX_FILE_SIZE)
    return MAX_FILE_SIZE


def max_file_size(path: str) -> int:
    """The largest file the file system holding ``path`` stores (2^63 - 1 when statfs fails)."""
    try:
        return limit_of(*statfs_type(path))
    except OSError:
        return MAX_FILE_SIZE
