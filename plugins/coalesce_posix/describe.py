"""Descriptions of the paths of a mounted image, for verification (the
``coalesce_describe`` hooks of btrfs and zfs; coalesce_core.verify).

Nothing is followed: every path is resolved one component at a time from
the qtree's directory with ``O_NOFOLLOW | O_DIRECTORY`` (a symlink or a
non-directory on the way makes the path absent), entries are examined with
``fstatat(AT_SYMLINK_NOFOLLOW)``, and only regular files and directories are
opened.  The directories of recently described paths stay open in a small
cache, so a batch in path order resolves each parent once.  Special files
(devices, FIFOs, sockets) describe as absent and are left out of directory
entries: no change record carries them (docs/real-backends.md).

What a POSIX file system holds (:func:`holds_of`): owners and xattrs (the
applier sets both and fails where it cannot), and mtimes at the resolution
of the file system type: nanoseconds, except zfs-fuse (``fuse.zfs``), which
keeps whole seconds.  Where the file system will not list an entry's xattrs
(ENOTSUP), its description carries none (``xattrs`` None) and they are not
compared: zfs-fuse's read-only clones of a PCPI answer every listxattr so
once one inode without xattrs was asked about.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import OrderedDict
from typing import Iterator, Mapping, Sequence, TypedDict

from coalesce_core.stream import fingerprint
from coalesce_core.stream.fingerprint import BLOCK
from coalesce_core.stream.records import check_path_or_root
from coalesce_core.verify import Description, Holds, XattrFields, join, parent_of, xattr_fields

from .walk import content_digest_fd

#: mtime resolution (ns) of file system types that keep less than nanoseconds
MTIME_RESOLUTION = {"fuse.zfs": 10**9}

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP)


def fs_type(path: str) -> str | None:
    """The type of the file system mounted at or above ``path`` (from /proc/self/mountinfo)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    path = os.path.realpath(path)
    best, kind = -1, None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mnt = fields[4].replace("\\040", " ")
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best:
            best, kind = len(mnt), right.split()[0]
    return kind


def holds_of(root: str) -> Holds:
    """What the file system of ``root`` keeps of an entry."""
    xattrs = True
    try:
        os.listxattr(root, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _NO_XATTRS:
            xattrs = False
    return Holds(owners=True, xattrs=xattrs, mtime_ns=MTIME_RESOLUTION.get(fs_type(root) or "", 1))


class _Dirs:
    """Open directory descriptors of a qtree by qtree-relative path, at most ``size`` of them."""

    def __init__(self, qfd: int, size: int = 256) -> None:
        self.fds: OrderedDict[str, int] = OrderedDict({"": qfd})
        self.size = size

    def fd(self, path: str) -> int | None:
        """The open directory ``path`` (resolved without following anything), or None."""
        fd = self.fds.get(path)
        if fd is not None:
            self.fds.move_to_end(path)
            return fd
        parts = path.split("/")
        i = len(parts) - 1
        while i > 0 and "/".join(parts[:i]) not in self.fds:
            i -= 1
        cur = "/".join(parts[:i])
        fd = self.fds[cur]
        for part in parts[i:]:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None
                raise
            cur = join(cur, part)
            self._put(cur, nfd)
            fd = nfd
        return fd

    def _put(self, path: str, fd: int) -> None:
        self.fds[path] = fd
        while len(self.fds) > self.size:
            old, ofd = next(iter(self.fds.items()))
            if old == "":
                self.fds.move_to_end("")
                continue
            del self.fds[old]
            os.close(ofd)

    def close(self) -> None:
        for path, fd in self.fds.items():
            if path:
                os.close(fd)
        self.fds = OrderedDict()


def _xattrs(fd: int) -> XattrFields:
    """The xattr fields of the Description of an open file or directory (verify.xattr_fields);
    None when the file system will not list
    them (no xattr support; zfs-fuse's read clones stop listing any once asked about an inode
    without xattrs): then they are not compared (verify.Description), which is said in
    docs/verification.md."""
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno in _NO_XATTRS:
            return xattr_fields(None)
        raise
    values = {}
    for n in names:
        try:
            values[n] = os.getxattr(fd, n)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, *_NO_XATTRS):
                continue
            raise
    return xattr_fields(values)


def _one_block(data: bytes) -> str:
    """ContentDigest of a file of at most one block holding ``data``, without the general machinery
    (most files are small); used only if it agrees with ContentDigest (checked below, at import)."""
    h = hashlib.sha256(_TAG + len(data).to_bytes(8, "big"))
    if data and (data[0] or data.count(0) != len(data)):  # a first byte not zero: not a block of zeros
        h.update(b"\0" * 8 + data)
    return h.hexdigest()


_TAG = getattr(fingerprint, "_CONTENT_TAG", b"")
_FAST = bool(_TAG) and all(
    _one_block(b) == fingerprint.content_digest_of(b) for b in (b"", b"\0" * 100, b"x" * 100, bytes(range(256)) * 16)
)


def content_digest(fd: int, size: int) -> str:
    """The content digest of the open regular file ``fd`` of ``size`` bytes, holes skipped
    (walk.content_digest_fd, with a short cut for a file of one block)."""
    if size <= BLOCK and _FAST:
        data = os.pread(fd, size, 0) if size else b""
        if len(data) == size:
            return _one_block(data)
    return content_digest_fd(fd, size)


#: bytes read at a time for a part digest
PART_READ = 1 << 20


def part_digest(fd: int, size: int, ranges: Sequence[tuple[int, int]]) -> str:
    """The part digest (fingerprint.part_digest) of the open regular file ``fd`` of ``size``
    bytes over ``ranges``: only those ranges are read (pread)."""
    d = fingerprint.ContentDigest(size)
    for start, end in ranges:
        pos, end = start, min(end, size)
        while pos < end:
            data = os.pread(fd, min(PART_READ, end - pos), pos)
            if not data:
                break  # shorter than its size (a live file): the digest shows it
            d.update(pos, data)
            pos += len(data)
    return fingerprint.part_digest(size, ranges, d)


def _entries(fd: int) -> tuple[tuple[str, str], ...]:
    out = []
    with os.scandir(fd) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                out.append((e.name, "d"))
            elif e.is_file(follow_symlinks=False):
                out.append((e.name, "f"))
            elif e.is_symlink():
                out.append((e.name, "l"))
    out.sort(key=lambda t: t[0].encode("utf-8", "surrogateescape"))
    return tuple(out)


class _Common(TypedDict):
    """The Description fields every kind of entry has."""

    uid: int
    gid: int
    mtime_ns: int


def _describe(dirs: _Dirs, path: str, content: bool, ranges: Sequence[tuple[int, int]] | None = None) -> Description:
    if path == "":
        pfd, name = None, ""
        st = os.fstat(dirs.fds[""])
    else:
        pfd = dirs.fd(parent_of(path))
        if pfd is None:
            return Description.absent(path)
        name = path.rpartition("/")[2]
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return Description.absent(path)
    mode = st.st_mode
    common = _Common(uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns)
    if stat.S_ISLNK(mode):
        return Description(path=path, kind="l", target=os.fsdecode(os.readlink(name, dir_fd=pfd)), **common)
    if stat.S_ISDIR(mode):
        fd = dirs.fd(path)
        if fd is None:  # replaced since the fstatat (a live file system)
            return Description.absent(path)
        return Description(path=path, kind="d", mode=mode & 0o7777, **_xattrs(fd), entries=_entries(fd), **common)
    if stat.S_ISREG(mode):
        fd = os.open(name, _FILE_FLAGS, dir_fd=pfd)
        try:
            part = part_digest(fd, st.st_size, ranges) if content and ranges is not None else None
            digest = content_digest(fd, st.st_size) if content and part is None else None
            return Description(
                path=path,
                kind="f",
                mode=mode & 0o7777,
                size=st.st_size,
                **_xattrs(fd),
                content=digest,
                ident=st.st_ino,
                nlink=st.st_nlink,
                part=part,
                **common,
            )
        finally:
            os.close(fd)
    return Description.absent(path)


def _open_qtree(qdir: str) -> int | None:
    try:
        return os.open(qdir, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def describe_paths(
    qdir: str, paths: Sequence[tuple[str, bool]], ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None
) -> list[Description]:
    """One Description per ``(path, content)`` of the qtree directory ``qdir``, the paths in
    ``ranges`` with their part digests over those ranges (see the hookspec)."""
    for p, _c in paths:
        check_path_or_root(p)
    qfd = _open_qtree(qdir)
    if qfd is None:
        return [Description.absent(p) for p, _c in paths]
    dirs = _Dirs(qfd)
    try:
        got = ranges or {}
        return [_describe(dirs, p, c, got.get(p)) for p, c in paths]
    finally:
        dirs.close()
        os.close(qfd)


def describe_tree(qdir: str, content: bool) -> Iterator[Description]:
    """Every path of the qtree directory ``qdir`` ("" first), in path order (pre-order, names by
    their bytes).  Iterative; holds at most the pending siblings of the current branch."""
    qfd = _open_qtree(qdir)
    if qfd is None:
        yield Description.absent("")
        return
    dirs = _Dirs(qfd)
    try:
        stack = [""]
        while stack:
            d = _describe(dirs, stack.pop(), content)
            yield d
            if d.kind == "d" and d.entries:
                stack.extend(join(d.path, name) for name, _k in reversed(d.entries))
    finally:
        dirs.close()
        os.close(qfd)
