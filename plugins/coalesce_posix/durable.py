"""The durability barrier: what an apply or a rollback wrote is on stable storage before it returns.

The agent commits ``done`` (or a rollback's success) right after the primitive
returns, and recovery trusts that record; data still in the page cache at a
power cut would leave a ``done`` replica whose image is partial, and the
jump-ahead would export it (I3).  hookspecs ``coalesce_apply`` and
``coalesce_rollback`` make this part of their contract.
"""

from __future__ import annotations

import ctypes
import os

from coalesce_core.errors import BackendError

from .libc import libc


def syncfs(path: str) -> None:
    """syncfs(2) on the file system holding ``path``: its dirty data and metadata are written and
    flushed; a write-back error (EIO, ENOSPC since Linux 5.8) raises BackendError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc().syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise BackendError(
                f"could not make the changes under {path} durable: {os.strerror(err)}",
                hint="the file system reported a write-back error: check its device and free space; "
                "the update is rolled back and retried",
            )
    finally:
        os.close(fd)
