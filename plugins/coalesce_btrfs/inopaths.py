"""Every name of an inode in a btrfs subvolume: the ``BTRFS_IOC_INO_PATHS`` ioctl
(what ``btrfs inspect-internal inode-resolve`` prints).

A send stream names a changed file by one of its paths only; the other hard
links of the file, possibly in other qtrees, are found here.  Needs
CAP_SYS_ADMIN, as ``btrfs send`` does.  Where the ioctl is refused (not root,
not btrfs) :func:`ino_paths` raises OSError and the caller walks the image.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

_ARGS = struct.Struct("=QQ4QQ")  # struct btrfs_ioctl_ino_path_args: inum, size, reserved[4], fspath
_HEAD = struct.Struct("=IIII")  # struct btrfs_data_container: bytes_left, bytes_missing, elem_cnt, elem_missed
_IOC_WRITE_READ = 3
BTRFS_IOC_INO_PATHS = (_IOC_WRITE_READ << 30) | (_ARGS.size << 16) | (0x94 << 8) | 35
_MAX_BUFFER = 64 << 20


def ino_paths(subvolume_root: str, ino: int) -> list[str]:
    """The paths (relative to ``subvolume_root``) of every name of inode ``ino``.

    ``subvolume_root`` must be the root directory of a subvolume (a PCPI).
    Raises OSError when the ioctl is not available; an inode without names
    gives ``[]``.
    """
    size = 64 << 10
    fd = os.open(subvolume_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            buf = ctypes.create_string_buffer(size)
            args = bytearray(_ARGS.pack(ino, size, 0, 0, 0, 0, ctypes.addressof(buf)))
            try:
                fcntl.ioctl(fd, BTRFS_IOC_INO_PATHS, args, True)
            except FileNotFoundError:
                return []
            raw = buf.raw
            _left, missing, count, missed = _HEAD.unpack_from(raw, 0)
            if (missing or missed) and size < _MAX_BUFFER:
                size *= 4
                continue
            if missing or missed:
                raise OSError(f"inode {ino} has more names than {_MAX_BUFFER} bytes hold")
            out = []
            for i in range(count):
                (off,) = struct.unpack_from("=Q", raw, _HEAD.size + 8 * i)
                start = _HEAD.size + off
                out.append(os.fsdecode(raw[start : raw.index(b"\0", start)]))
            return out
    finally:
        os.close(fd)
