"""Reading POSIX trees: the canonical fingerprint, full-create records
(baselines, cross-qtree moves) and the tree-compare diff.

The reading side works on read-only images (btrfs snapshots, ZFS snapshot
directories or read-only clones) and on the live qtree for fingerprints.
It never follows a symlink: entries are examined with ``lstat`` and only
directories found by the walk itself are descended into.  Special files
(devices, FIFOs, sockets) have no change record and no fingerprint kind;
they are skipped (docs/real-backends.md).  Every walk keeps its own stack (a
tree of any depth), paths longer than PATH_MAX are reached from an open
directory (:class:`Reader`), and file contents are read only where the file
has data (SEEK_DATA/SEEK_HOLE): a sparse file costs its data, not its size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import threading
import weakref
from collections import OrderedDict
from typing import Callable, Iterable, Iterator

from coalesce_core.errors import BackendError
from coalesce_core.stream import fingerprint as fp
from coalesce_core.stream import records as R

CHUNK = R.MAX_DATA
_HAVE_SEEK = hasattr(os, "SEEK_DATA")
_HAVE_FADVISE = hasattr(os, "posix_fadvise")
#: Linux's PATH_MAX: a path argument of this many bytes or more (its NUL included) is ENAMETOOLONG
PATH_MAX = 4096
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
#: zeros of a new file that fill whole blocks of this size (aligned in the file) stay holes
ZERO_BLOCK = 4096
_ZEROS = bytes(ZERO_BLOCK)
_NONZERO = re.compile(rb"[^\x00]")


def join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def kind_of(st: os.stat_result) -> str | None:
    if stat.S_ISDIR(st.st_mode):
        return "d"
    if stat.S_ISREG(st.st_mode):
        return "f"
    if stat.S_ISLNK(st.st_mode):
        return "l"
    return None


def lstat_or_none(path: str) -> os.stat_result | None:
    """``lstat`` of ``path`` (of any length); None when it is missing."""
    if not fits(path):
        with _long(path) as (rd, rel):
            return rd.lstat(rel)
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def lstat_below(root: str, rel: str) -> os.stat_result | None:
    """``lstat`` of ``rel`` (qtree- or image-relative, "" is ``root``) in the image ``root``, reached
    one component at a time from ``root`` with ``O_NOFOLLOW | O_DIRECTORY``: None when it is missing
    or a component on its way is not a directory *in this image* -- a symlink is never followed, so
    a path that came from another image (a base's entry, a record, a diff's name) whose parent is a
    symlink here does not exist here (docs/verification.md: identity is the inode, never the path).
    Any length."""
    if not rel:
        return lstat_or_none(root)
    *dirs, name = rel.split("/")
    try:
        fd = open_path(root, _O_DIR)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        for comp in dirs:
            nfd = os.open(comp, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.lstat(name, dir_fd=fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink where a directory was asked for
            return None
        raise
    finally:
        os.close(fd)


def listdir_sorted(path: str) -> list[str]:
    """The names in directory ``path`` (of any length), sorted by bytes; [] when it is missing."""
    if not fits(path):
        with _long(path) as (rd, rel):
            return rd.listdir(rel)
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(names, key=lambda n: n.encode("utf-8", "surrogateescape"))


def fits(path: str) -> bool:
    """True when ``path`` can be handed to a system call as it is (shorter than PATH_MAX bytes)."""
    return len(path) < PATH_MAX // 4 or len(os.fsencode(path)) < PATH_MAX


class Reader:
    """Reads the tree below ``root`` by relative paths of any length.

    A file system bounds a name (255 bytes), not a path: a deep tree has paths
    longer than PATH_MAX, which only the system calls that take a whole path
    refuse.  A path that fits is used as it is; a longer one is reached from
    the deepest of its directories already open here (else from the deepest
    one whose path fits), one component at a time with ``O_NOFOLLOW |
    O_DIRECTORY``, so no symlink is followed on the way.  The ``keep`` most
    recently used directories stay open, so a walk in pre-order opens each
    deep directory about once.  A ``(dir_fd, name)`` pair from :meth:`at` is
    valid until the next call.  Close it (or use it as a context manager)."""

    def __init__(self, root: str, keep: int = 16) -> None:
        self.root = root
        self._keep = keep
        self._dirs: OrderedDict[str, int] = OrderedDict()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def at(self, rel: str) -> tuple[int | None, str]:
        """``(dir_fd, name)`` for an ``*at`` call on ``rel``: ``(None, whole path)`` when it fits."""
        full = self.path(rel)
        if fits(full):
            return None, full
        parent, _, name = rel.rpartition("/")
        return self._dir(parent), name

    def _dir(self, rel: str) -> int:
        """An open descriptor of directory ``rel`` (kept: never close it)."""
        fd = self._dirs.get(rel)
        if fd is not None:
            self._dirs.move_to_end(rel)
            return fd
        known = rel
        while True:
            known = known.rpartition("/")[0]
            if not known or known in self._dirs:
                break
        if known:
            cur = self._dirs[known]
        else:
            known = rel
            while not fits(self.path(known)):
                known = known.rpartition("/")[0]
            cur = self._keep_fd(known, os.open(self.path(known), _O_DIR))
            if known == rel:
                return cur
        for comp in rel[len(known) + 1 :].split("/") if known else rel.split("/"):
            known = f"{known}/{comp}" if known else comp
            cur = self._keep_fd(known, os.open(comp, _O_DIR, dir_fd=cur))
        return cur

    def _keep_fd(self, rel: str, fd: int) -> int:
        self._dirs[rel] = fd
        if len(self._dirs) > self._keep:
            _, old = self._dirs.popitem(last=False)
            os.close(old)
        return fd

    def lstat(self, rel: str) -> os.stat_result | None:
        """``lstat`` of ``rel``; None when it (or a directory on its way) is missing."""
        try:
            dfd, name = self.at(rel)
            return os.lstat(name, dir_fd=dfd)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def listdir(self, rel: str) -> list[str]:
        """The names in directory ``rel``, sorted by bytes; [] when it is missing."""
        full = self.path(rel)
        if fits(full):
            return listdir_sorted(full)
        try:
            names = os.listdir(self._dir(rel))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(names, key=lambda n: n.encode("utf-8", "surrogateescape"))

    def open(self, rel: str, flags: int = _O_READ) -> int:
        """A new descriptor of ``rel`` (``O_NOFOLLOW`` in ``flags``: a symlink is not opened)."""
        dfd, name = self.at(rel)
        return os.open(name, flags, dir_fd=dfd)

    def readlink(self, rel: str) -> str:
        dfd, name = self.at(rel)
        return os.readlink(name, dir_fd=dfd)

    def xattrs(self, rel: str) -> dict[str, bytes]:
        """:func:`read_xattrs` of ``rel`` (a file or directory)."""
        full = self.path(rel)
        if fits(full):
            return read_xattrs(full)
        fd = self.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return _read_xattrs(fd, _diff_root(self.root))
        finally:
            os.close(fd)

    def walk(self, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
        """(relative path, lstat) of every entry below ``rel`` in pre-order, sorted by name
        (iterative: any depth)."""
        pending = [join(rel, n) for n in reversed(self.listdir(rel))]
        while pending:
            r = pending.pop()
            st = self.lstat(r)
            if st is None:
                continue
            yield r, st
            if stat.S_ISDIR(st.st_mode):
                pending.extend(join(r, n) for n in reversed(self.listdir(r)))


@contextlib.contextmanager
def _long(path: str) -> Iterator[tuple["Reader", str]]:
    """A :class:`Reader` and the relative path by which it reaches ``path`` (of any length)."""
    parts = "/".join(p for p in path.split("/") if p)
    with Reader("/" if path.startswith("/") else ".", keep=1) as rd:
        yield rd, parts


def open_path(path: str, flags: int = _O_READ) -> int:
    """``os.open(path, flags)`` for a ``path`` of any length (no symlink followed on the way when it is long)."""
    if fits(path):
        return os.open(path, flags)
    with _long(path) as (rd, rel):
        return rd.open(rel, flags)


def readlink_path(path: str) -> str:
    """``os.readlink(path)`` for a ``path`` of any length."""
    if fits(path):
        return os.readlink(path)
    with _long(path) as (rd, rel):
        return rd.readlink(rel)


def iter_tree(root: str, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry below ``root/rel`` in pre-order, sorted by name."""
    with Reader(root) as rd:
        yield from rd.walk(rel)


def open_under(root: str, rel: str, flags: int = _O_READ) -> int:
    """A new descriptor of ``root/rel``, whatever the length of the path (:class:`Reader`)."""
    with Reader(root, keep=1) as rd:
        return rd.open(rel, flags)


def xattrs_under(root: str, rel: str) -> dict[str, bytes]:
    """:func:`read_xattrs` of ``root/rel``, whatever the length of the path."""
    with Reader(root, keep=1) as rd:
        return rd.xattrs(rel)


# ---------------------------------------------------------------------------
# fingerprint
# ---------------------------------------------------------------------------
def content_digest_fd(fd: int, size: int | None = None) -> str:
    """The content digest (:class:`coalesce_core.stream.fingerprint.ContentDigest`) of the open regular
    file ``fd`` of ``size`` bytes (default: its size now), reading only its data: holes are found
    with SEEK_DATA/SEEK_HOLE and read as zeros, so a 1 TiB sparse file costs its data.  A file
    system that reports no holes (zfs-fuse) has its zeros read."""
    if size is None:
        size = os.fstat(fd).st_size
    digest = fp.ContentDigest(size)
    for off, length in data_segments(fd, 0, size):
        pos, end = off, off + length
        while pos < end:
            data = os.pread(fd, min(CHUNK, end - pos), pos)
            if not data:
                break  # shorter than it was: the rest reads as zeros
            digest.update(pos, data)
            pos += len(data)
    return digest.hexdigest()


def entries(root: str) -> Iterator[fp.Entry]:
    """Fingerprint entries of the tree below ``root`` (``root`` itself excluded)."""
    with Reader(root) as rd:
        for rel, st in rd.walk():
            k = kind_of(st)
            if k == "d":
                yield fp.Entry(path=rel, kind="d", mode=st.st_mode & 0o7777)
            elif k == "f":
                fd = rd.open(rel)
                try:
                    digest = content_digest_fd(fd, st.st_size)
                finally:
                    os.close(fd)
                yield fp.Entry(path=rel, kind="f", mode=st.st_mode & 0o7777, size=st.st_size, content_sha256=digest)
            elif k == "l":
                # Linux symlinks have no settable permission bits: canonical mode 0.
                yield fp.Entry(path=rel, kind="l", mode=0, target=os.fsdecode(rd.readlink(rel)))


def fingerprint(root: str | None) -> str:
    """Canonical digest of the tree below ``root``; a missing root digests as the empty tree."""
    if root is None or not os.path.isdir(root) or os.path.islink(root):
        return fp.digest(())
    return fp.digest(entries(root))


# ---------------------------------------------------------------------------
# data and attributes of one entry, as records
# ---------------------------------------------------------------------------
def data_segments(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data (non-hole) parts of ``[start, end)`` of an open file."""
    if start >= end:
        return
    if not _HAVE_SEEK:
        yield start, end - start
        return
    pos = start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to EOF
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end - pos
                return
            raise
        if d >= end:
            return
        try:
            h = os.lseek(fd, d, os.SEEK_HOLE)
        except OSError:
            h = end
        h = min(h, end)
        if h <= d:
            h = end
        yield d, h - d
        pos = h


class ReadAhead:
    """Start the kernel's reads of files a little before they are read.

    A file of a fresh snapshot is cold, and reading many small ones one after
    the other waits for each read in turn (about 70 us per 4 KiB file on a
    loop device, a large part of what a new small file costs).  A helper
    thread opens the files of ``files`` ((path, offset) pairs, in reading
    order) and asks the kernel for their data (``posix_fadvise WILLNEED`` of
    ``CHUNK`` bytes from the offset), at most ``ahead`` files ahead of the
    reader, who calls :meth:`next` before reading each file and
    :meth:`close` when done.  The asking blocks too (about 60 us a file on
    btrfs), so it runs in its own thread, never in the reader's.  Give it
    regular files of a read-only image only (opening a device node may act on
    the device).  Advisory: a file that cannot be opened is skipped, nothing
    is followed (``O_NOFOLLOW``), nothing is written, and the thread ends at
    :meth:`close`, when the reader is collected, or after the last file."""

    def __init__(self, files: list[tuple[str, int]], ahead: int = 128) -> None:
        self._state = _ReadAheadState(ahead)
        if files and _HAVE_FADVISE:
            threading.Thread(
                target=_read_ahead, args=(files, self._state), name="coalesce-readahead", daemon=True
            ).start()
        weakref.finalize(self, self._state.stop)

    def next(self) -> None:
        self._state.advance()

    def close(self) -> None:
        self._state.stop()


class _ReadAheadState:
    def __init__(self, ahead: int) -> None:
        self.cond = threading.Condition()
        self.ahead = ahead
        self.pos = 0  # files the reader has started on
        self.stopped = False

    def advance(self) -> None:
        with self.cond:
            self.pos += 1
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()


def _read_ahead(files: list[tuple[str, int]], state: _ReadAheadState) -> None:
    for i, (path, offset) in enumerate(files):
        with state.cond:
            while not state.stopped and i >= state.pos + state.ahead:
                state.cond.wait()
            if state.stopped:
                return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, offset, CHUNK, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def nonzero_pieces(offset: int, data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of the parts of ``data`` (at ``offset`` in a file) that are not whole,
    aligned ZERO_BLOCKs of zeros: written into a new file, they leave its zeros as holes.  A
    file system that reports no holes (zfs-fuse has no SEEK_DATA) reads a sparse file's holes as
    zeros; writing a chunk that holds one small island of data whole would allocate the chunk."""
    n, start = len(data), 0
    i = data.find(_ZEROS)
    while i != -1:
        m = _NONZERO.search(data, i + ZERO_BLOCK)
        e = m.start() if m is not None else n
        a = -(-(offset + i) // ZERO_BLOCK) * ZERO_BLOCK - offset  # the run, aligned inwards
        b = e if e == n else (offset + e) // ZERO_BLOCK * ZERO_BLOCK - offset
        if b - a >= ZERO_BLOCK:
            if a > start:
                yield offset + start, data[start:a]
            start = b
        i = data.find(_ZEROS, e) if e < n else -1
    if start < n:
        yield offset + start, data if start == 0 else data[start:]


def write_records(path_rel: str, fd: int, start: int, end: int, *, skip_zero: bool) -> Iterator[R.Write]:
    """Write records carrying bytes ``[start, end)`` of the open file ``fd`` (holes skipped;
    ``skip_zero``, for a new file: its zero blocks too, :func:`nonzero_pieces`)."""
    for off, length in list(data_segments(fd, start, end)):
        pos, stop = off, off + length
        while pos < stop:
            n = min(CHUNK, stop - pos)
            data = os.pread(fd, n, pos)
            if not data:
                break
            if not skip_zero:
                yield R.Write(path=path_rel, offset=pos, data=data)
            else:
                for at, piece in nonzero_pieces(pos, data):
                    yield R.Write(path=path_rel, offset=at, data=piece)
            pos += len(data)


#: per thread, for the tree_diff running in it: image root -> False once listxattr said the
#: file system has no xattrs (zfs-fuse's read clones: asked again, the daemon answers each file
#: with another round trip; the kernel does not remember EOPNOTSUPP)
_XATTR_ROOTS = threading.local()


def _diff_root(path: str) -> str | None:
    """The image root of the tree_diff running in this thread that holds ``path``, if any."""
    for root in getattr(_XATTR_ROOTS, "roots", None) or ():
        if path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
            return root
    return None


def read_xattrs(path: str) -> dict[str, bytes]:
    """xattrs of a file or directory (never of a symlink: Linux has no user xattrs on them); ``path``
    of any length."""
    if not fits(path):
        with _long(path) as (rd, rel):
            fd = rd.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return _read_xattrs(fd, _diff_root(path))
        finally:
            os.close(fd)
    return _read_xattrs(path, _diff_root(path))


def _read_xattrs(path: str | int, root: str | None) -> dict[str, bytes]:
    """:func:`read_xattrs` of a path or an open descriptor, in the tree_diff image ``root`` (if any)."""
    if root is not None and _XATTR_ROOTS.roots[root] is False:
        return {}
    follow = isinstance(path, int)  # a descriptor: no symlink to follow
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            if root is not None:
                _XATTR_ROOTS.roots[root] = False
            return {}
        raise
    out = {}
    for n in sorted(names):
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                continue
            raise
    return out


def xattr_records(rel: str, base: dict[str, bytes], target: dict[str, bytes]) -> Iterator[R.SetXattr]:
    for n in sorted(set(base) | set(target)):
        if n not in target:
            yield R.SetXattr(path=rel, name=n, value=None)
        elif base.get(n) != target[n]:
            yield R.SetXattr(path=rel, name=n, value=target[n])


def setattr_record(rel: str, st: os.stat_result) -> R.SetAttr:
    mode = None if stat.S_ISLNK(st.st_mode) else st.st_mode & 0o7777
    return R.SetAttr(path=rel, mode=mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns)


def attrs_differ(a: os.stat_result, b: os.stat_result) -> bool:
    return (
        (a.st_mode & 0o7777) != (b.st_mode & 0o7777)
        or a.st_uid != b.st_uid
        or a.st_gid != b.st_gid
        or a.st_mtime_ns != b.st_mtime_ns
    )


def file_create_records(root: str, rel: str, st: os.stat_result, dest_rel: str | None = None) -> Iterator[object]:
    """MkFile + data (+ Truncate when the data ends before the size) + xattrs for the regular file ``root/rel``
    (created at ``dest_rel``)."""
    dest = dest_rel or rel
    yield R.MkFile(path=dest, mode=st.st_mode & 0o7777)
    fd = open_under(root, rel)
    written = 0  # the size the records give the new file
    try:
        size = os.fstat(fd).st_size
        for w in write_records(dest, fd, 0, size, skip_zero=True):
            written = w.offset + len(w.data)
            yield w
    finally:
        os.close(fd)
    if written != size:  # a hole (or zeros) at the end
        yield R.Truncate(path=dest, size=size)
    yield from xattr_records(dest, {}, xattrs_under(root, rel))


class FileData:
    """Where :func:`tree_diff` takes the data of a changed regular file from.

    This class reads both images (a new file whole, a changed one chunk by
    chunk against its base copy).  A backend that knows more about what
    changed subclasses it (coalesce_zfs.senddata takes the data from ``zfs
    send``); a subclass may hold a file's records back and yield them from
    :meth:`finish`, which tree_diff calls after the walk and before the
    SetAttr records.  Whatever it does, the records it yields must turn the
    base copy into the target copy byte for byte.
    """

    def created(self, root: str, rel: str, dest: str, st: os.stat_result) -> Iterator[object]:
        """Records that create the regular file ``root/rel`` at ``dest`` (MkFile, data, xattrs)."""
        return file_create_records(root, rel, st, dest)

    def linked(self, dest: str, existing: str) -> Iterator[object]:
        """Records for ``dest``, a further name of the file created at ``existing`` in this stream."""
        yield R.HardLink(path=dest, existing=existing)

    def updated(self, base: str, target: str, rel: str, b: os.stat_result, t: os.stat_result) -> Iterator[object]:
        """Records that turn the file ``base/rel`` into ``target/rel`` (same inode): data and xattrs."""
        bpath, tpath = os.path.join(base, rel), os.path.join(target, rel)
        yield from file_update_records(bpath, tpath, rel, b.st_size, t.st_size)
        yield from xattr_records(rel, xattrs_under(base, rel), xattrs_under(target, rel))

    def finish(self) -> Iterator[object]:
        """Records held back by :meth:`created`, :meth:`linked` or :meth:`updated`."""
        return iter(())


#: the default: data read from the images
READ = FileData()


class KeptLinks(FileData):
    """:class:`FileData` around ``inner`` that keeps a hard-link group one file: a new name of a
    file with several links is held back until :meth:`finish`; by then the walk has passed every kept
    name of the file (a link changes the file's ctime, so the walk's quick test never skips a kept
    name), and the held names become HardLinks to a kept name, or, if the file has none, the first
    is created through ``inner`` and the others linked to it."""

    def __init__(self, inner: FileData) -> None:
        self.inner = inner
        self.kept: dict[int, str] = {}  # inode -> a name it has in both images
        self.held: dict[int, list[tuple]] = {}  # inode -> its new names, in walk order
        self.held_at: dict[str, int] = {}  # a held name -> its inode

    def created(self, root: str, rel: str, dest: str, st: os.stat_result) -> Iterator[object]:
        if st.st_nlink < 2:
            return self.inner.created(root, rel, dest, st)
        self.held.setdefault(st.st_ino, []).append((root, rel, dest, st))
        self.held_at[dest] = st.st_ino
        return iter(())

    def linked(self, dest: str, existing: str) -> Iterator[object]:
        ino = self.held_at.get(existing)
        if ino is None:
            return self.inner.linked(dest, existing)
        self.held[ino].append((None, None, dest, None))
        return iter(())

    def updated(self, base: str, target: str, rel: str, b: os.stat_result, t: os.stat_result) -> Iterator[object]:
        if t.st_nlink > 1:
            self.kept.setdefault(t.st_ino, rel)
        return self.inner.updated(base, target, rel, b, t)

    def finish(self) -> Iterator[object]:
        for ino, names in self.held.items():
            existing = self.kept.get(ino)
            for root, rel, dest, st in names:
                if existing is None:
                    yield from self.inner.created(root, rel, dest, st)
                    existing = dest
                else:
                    yield from self.inner.linked(dest, existing)
        self.held.clear()
        yield from self.inner.finish()


def create_records(
    root: str,
    rel: str,
    *,
    dest_rel: str | None = None,
    links: dict | None = None,
    skip: Callable[[str], bool] | None = None,
    attrs_out: list | None = None,
    st: os.stat_result | None = None,
    data: "FileData | None" = None,
) -> Iterator[object]:
    """Records that create the entry ``root/rel`` (and, for a directory, everything
    below it) at ``dest_rel`` (default ``rel``) in a qtree.

    ``links`` maps (st_dev, st_ino) -> destination path of a file already created
    in this stream, so that hard links stay hard links.  ``skip(rel)`` leaves
    out an entry (and its subtree) that the caller handles itself.  SetAttr
    records are appended to ``attrs_out`` (the caller emits them at the end,
    deepest first, so directory times survive) or yielded last.  ``st``: the
    caller's ``lstat`` of the entry (of a read-only image), if it has one.
    """
    own_attrs = attrs_out is None
    attrs_list: list = [] if attrs_out is None else attrs_out
    links = {} if links is None else links
    dest = dest_rel or rel
    with Reader(root) as rd:
        if st is None:
            st = rd.lstat(rel)
        if st is None:
            return
        yield from _create_one(rd, rel, dest, st, links, skip, attrs_list, data or READ)
    if own_attrs:
        yield from sorted_attrs(attrs_list)


def _create_one(
    rd: Reader,
    rel: str,
    dest: str,
    st: os.stat_result,
    links: dict,
    skip: Callable[[str], bool] | None,
    attrs_list: list,
    data: FileData,
) -> Iterator[object]:
    """:func:`create_records` of one entry of ``rd``'s tree, in pre-order (iterative: any depth);
    a directory's SetAttr is appended after its contents'."""
    dirs: list[tuple[str, str, os.stat_result, Iterator[str]]] = []  # directories being created
    item: tuple[str, str, os.stat_result] | None = (rel, dest, st)
    while True:
        if item is not None:
            r, d, s = item
            k = kind_of(s)
            if k == "d":
                yield R.MkDir(path=d, mode=s.st_mode & 0o7777)
                yield from xattr_records(d, {}, rd.xattrs(r))
                dirs.append((r, d, s, iter(rd.listdir(r))))
            elif k == "f":
                key = (s.st_dev, s.st_ino)
                if s.st_nlink > 1 and key in links:
                    yield from data.linked(d, links[key])
                else:
                    if s.st_nlink > 1:
                        links[key] = d
                    yield from data.created(rd.root, r, d, s)
                    attrs_list.append(setattr_record(d, s))
            elif k == "l":
                yield R.Symlink(path=d, target=os.fsdecode(rd.readlink(r)))
                attrs_list.append(setattr_record(d, s))
            item = None
        if not dirs:
            return
        r, d, s, names = dirs[-1]
        for name in names:
            crel = join(r, name)
            if skip is not None and skip(crel):
                continue
            cst = rd.lstat(crel)
            if cst is not None:
                item = (crel, join(d, name), cst)
                break
        else:
            dirs.pop()
            attrs_list.append(setattr_record(d, s))


def sorted_attrs(attrs_list: Iterable[R.SetAttr]) -> list[R.SetAttr]:
    """SetAttr records deepest first, so a directory's come after its contents'."""
    return sorted(attrs_list, key=lambda r: (-r.path.count("/"), r.path))


def baseline_records(root: str) -> Iterator[object]:
    """Every entry below ``root`` as create records (a baseline), then the attributes of ``root``
    itself (the qtree root); ``root`` may be missing."""
    attrs_list: list = []
    links: dict = {}
    for name in listdir_sorted(root):
        yield from create_records(root, name, links=links, attrs_out=attrs_list)
    yield from sorted_attrs(attrs_list)
    yield from root_records(None, root, force=True)


def root_records(base: str | None, target: str, *, force: bool) -> Iterator[object]:
    """SetXattr and SetAttr records (path ``ROOT``) that give the qtree root at ``base`` the
    attributes of the one at ``target``; the SetAttr comes when they differ or with ``force``
    (the records before it changed the root's entries, which moves its mtime in the replica).
    Nothing when ``target`` is missing."""
    t = lstat_or_none(target)
    if t is None or not stat.S_ISDIR(t.st_mode):
        return
    b = lstat_or_none(base) if base else None
    if b is not None and not stat.S_ISDIR(b.st_mode):
        b = None
    yield from xattr_records(R.ROOT, read_xattrs(base) if b is not None and base else {}, read_xattrs(target))
    if force or b is None or attrs_differ(b, t):
        yield setattr_record(R.ROOT, t)


# ---------------------------------------------------------------------------
# the tree-compare diff
# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
def _parent(path: str) -> str:
    return path.rpartition("/")[0] if "/" in path else R.ROOT


def stamped(records: Iterable[object], target: str) -> Iterator[object]:
    """``records`` (a tree diff into the qtree image ``target``), then a SetAttr from ``target`` for
    every entry whose mtime they move in the replica and that they gave none: a file written or
    truncated, a directory (the qtree root included) an entry was made in or removed from.
    Deepest first; a SetAttr of one entry changes no other entry's mtime."""
    moved: set[str] = set()
    done: set[str] = set()
    for rec in records:
        yield rec
        if isinstance(rec, (R.Write, R.Truncate)):
            moved.add(rec.path)
        elif isinstance(rec, R.SetAttr):
            done.add(rec.path)
        elif isinstance(rec, (R.MkDir, R.MkFile, R.Symlink, R.HardLink, R.Unlink, R.RmDir)):
            moved.add(_parent(rec.path))
        elif isinstance(rec, R.Rename):
            moved.update((_parent(rec.old), _parent(rec.new)))
    for path in sorted(moved - done, key=lambda p: (-p.count("/"), p == R.ROOT, p)):
        st = lstat_below(target, path)  # a removal's parent may be a symlink in ``target``
        if st is not None and kind_of(st) is not None:
            yield setattr_record(path, st)


def tree_diff(
    base: str | None,
    target: str,
    *,
    same_lineage: bool = True,
    prune: set[str] | None = None,
    quick_before_ns: int | None = None,
    xattrs_move_ctime: bool = True,
    data: FileData = READ,
) -> Iterator[object]:
    """Change records that turn the tree below ``base`` into the tree below ``target``.

    ``same_lineage``: both trees are images of the same file system (a
    snapshot and a later snapshot, or clones of them), so an inode number
    names the same file in both; an entry whose inode changed was replaced
    and is recreated, an entry whose inode, size, mtime and ctime are equal
    and whose ctime is older than ``quick_before_ns`` (the creation time of
    the base image: a change after it would have moved the ctime, which no
    user can set, past it -- this holds with zfs-fuse's one-second
    timestamps too) is unchanged without reading it.  Otherwise files are
    compared by content (every chunk read on both sides).  Without
    ``xattrs_move_ctime`` (zfs-fuse: setting or removing an xattr leaves the
    ctime as it was) such a file's xattrs are still compared.

    ``prune``: when given, the set of qtree-relative directories that may
    contain a change ("" is the root; from ``zfs diff``): an unchanged
    directory outside it is not descended into, so the cost follows the change.

    ``data``: where the data of changed regular files come from (:class:`FileData`).

    Order: removals (deepest first), then creations and updates in pre-order,
    then what ``data`` held back, then SetAttr deepest first; renames are not
    detected (a rename is a removal plus a creation), so this is the
    fallback, not the fast path.  The root's SetAttr comes last, and always
    when a record came before it or the root is another directory than the
    base's (a replaced or swapped qtree root): the applier's changes move the
    replica root's mtime even where the two roots' attributes are equal.
    Then a SetAttr from ``target`` for every entry the records change that got none
    (:func:`stamped`): two different directories at one path, or one changed within a tick of
    the kernel's clock, can carry the same mtime.
    """
    base = base if base and os.path.isdir(base) else None
    # a file system without xattrs is asked once per image, not once per file (read_xattrs)
    _XATTR_ROOTS.roots = {os.path.normpath(r): None for r in (base, target) if r}
    rb = Reader(base) if base is not None else None
    rt = Reader(target)

    def changes() -> Iterator[object]:
        n = 0
        if rb is not None:
            for rec in _removals(rb, rt, same_lineage, prune):
                n += 1
                yield rec
        attrs_list: list = []
        links: dict = {}
        # a new name met before its file's kept name links to it
        kept = KeptLinks(data) if rb is not None and not isinstance(data, KeptLinks) else data
        quick = quick_before_ns if same_lineage else None
        for rec in _updates(rb, rt, quick, links, attrs_list, prune, same_lineage, kept, xattrs_move_ctime):
            n += 1
            yield rec
        for rec in kept.finish():
            n += 1
            yield rec
        attrs_list = sorted_attrs(attrs_list)
        yield from attrs_list
        yield from root_records(base, target, force=n + len(attrs_list) > 0 or _root_replaced(rb, rt, same_lineage))

    try:
        yield from stamped(changes(), target)
    finally:
        _XATTR_ROOTS.roots = None
        rt.close()
        if rb is not None:
            rb.close()


def _root_replaced(rb: Reader | None, rt: Reader, same_lineage: bool) -> bool:
    """True when the target's root is another directory than the base's (same lineage only)."""
    if rb is None or not same_lineage:
        return False
    b, t = rb.lstat(""), rt.lstat("")
    return b is not None and t is not None and b.st_ino != t.st_ino


def _replaced(b: os.stat_result, t: os.stat_result, same_lineage: bool) -> bool:
    if kind_of(b) != kind_of(t):
        return True
    if same_lineage and kind_of(t) != "d" and b.st_ino != t.st_ino:
        return True
    return False


def _removals(rb: Reader, rt: Reader, same_lineage: bool, prune: set[str] | None) -> Iterator[object]:
    """Removal records of the base entries the target lacks or replaced, in pre-order of the
    base, each removed subtree deepest first (iterative: any depth)."""
    dirs: list[tuple[str, Iterator[str]]] = [("", iter(rb.listdir("")))]
    while dirs:
        rel, names = dirs[-1]
        name = next(names, None)
        if name is None:
            dirs.pop()
            continue
        r = join(rel, name)
        b = rb.lstat(r)
        if b is None or kind_of(b) is None:
            continue
        t = rt.lstat(r)
        if t is None or kind_of(t) is None or _replaced(b, t, same_lineage):
            yield from _remove_subtree(rb, r, b)
        elif kind_of(b) == "d" and (prune is None or r in prune):
            dirs.append((r, iter(rb.listdir(r))))


def _remove_subtree(rd: Reader, rel: str, st: os.stat_result) -> Iterator[object]:
    """Unlink/RmDir records of ``rel`` and everything below it, children before parents."""
    if not stat.S_ISDIR(st.st_mode):
        yield R.Unlink(path=rel)
        return
    dirs: list[tuple[str, Iterator[str]]] = [(rel, iter(rd.listdir(rel)))]
    while dirs:
        d, names = dirs[-1]
        name = next(names, None)
        if name is None:
            dirs.pop()
            yield R.RmDir(path=d)
            continue
        r = join(d, name)
        c = rd.lstat(r)
        if c is None or kind_of(c) is None:
            continue
        if stat.S_ISDIR(c.st_mode):
            dirs.append((r, iter(rd.listdir(r))))
        else:
            yield R.Unlink(path=r)


def _updates(
    rb: Reader | None,
    rt: Reader,
    quick: int | None,
    links: dict,
    attrs_list: list,
    prune: set[str] | None,
    same_lineage: bool,
    data: FileData,
    xattrs_move_ctime: bool = True,
) -> Iterator[object]:
    """Creation and update records of the target's entries in pre-order (iterative: any depth);
    a kept directory's SetAttr is appended after its contents'."""
    dirs: list[tuple[str, Iterator[str], os.stat_result | None, os.stat_result | None]] = [
        ("", iter(rt.listdir("")), None, None)
    ]
    while dirs:
        rel, names, db, dt = dirs[-1]
        name = next(names, None)
        if name is None:
            dirs.pop()
            if db is not None and dt is not None and attrs_differ(db, dt):
                attrs_list.append(setattr_record(rel, dt))
            continue
        r = join(rel, name)
        t = rt.lstat(r)
        if t is None or kind_of(t) is None:
            continue
        b = rb.lstat(r) if rb is not None else None
        if b is not None and kind_of(b) is None:
            b = None
        if b is None or _replaced(b, t, same_lineage):
            yield from _create_one(rt, r, r, t, links, None, attrs_list, data)
            continue
        assert rb is not None
        k = kind_of(t)
        if k == "d":
            yield from xattr_records(r, rb.xattrs(r), rt.xattrs(r))
            if prune is None or r in prune:
                dirs.append((r, iter(rt.listdir(r)), b, t))
                continue
        elif k == "l":
            bt, tt = rb.readlink(r), rt.readlink(r)
            if bt != tt:
                yield R.Unlink(path=r)
                yield R.Symlink(path=r, target=os.fsdecode(tt))
                attrs_list.append(setattr_record(r, t))
                continue
        else:
            if t.st_nlink > 1:
                links.setdefault((t.st_dev, t.st_ino), r)
            quick_same = (
                quick is not None
                and b.st_ino == t.st_ino
                and b.st_size == t.st_size
                and b.st_mtime_ns == t.st_mtime_ns
                and b.st_ctime_ns == t.st_ctime_ns
                and b.st_ctime_ns < quick
            )
            if not quick_same:
                yield from data.updated(rb.root, rt.root, r, b, t)
            elif not xattrs_move_ctime:
                yield from xattr_records(r, rb.xattrs(r), rt.xattrs(r))
        if attrs_differ(b, t):
            attrs_list.append(setattr_record(r, t))


def file_update_records(bpath: str, tpath: str, rel: str, bsize: int, tsize: int) -> Iterator[object]:
    """Records that turn the file ``bpath`` into ``tpath``: Writes for the chunks that differ, and the size."""
    if bsize != tsize and bsize <= CHUNK and tsize <= CHUNK:
        # one chunk on each side, of different lengths, so it differs: the records are those of
        # the compare below without reading the base copy (on FUSE, zfs-fuse, its open, read and
        # close are three round trips to the daemon)
        tfd = open_path(tpath)
        try:
            data = os.pread(tfd, tsize, 0) if tsize else b""
        finally:
            os.close(tfd)
        if len(data) != tsize:
            raise BackendError(f"{tpath}: read {len(data)} of {tsize} bytes from a PCPI (it changed?)")
        if tsize < bsize:
            yield R.Truncate(path=rel, size=tsize)
        if data and not (bsize == 0 and data.count(0) == len(data)):
            yield R.Write(path=rel, offset=0, data=data)
        if tsize > bsize:
            yield R.Truncate(path=rel, size=tsize)
        return
    bfd = open_path(bpath)
    try:
        tfd = open_path(tpath)
    except BaseException:
        os.close(bfd)
        raise
    try:
        if tsize < bsize:
            yield R.Truncate(path=rel, size=tsize)
        last = None
        for last in update_records(bfd, tfd, rel, bsize, tsize, [(0, tsize)]):
            yield last
        if tsize > bsize and not isinstance(last, R.Truncate):  # the size, unless a rewrite just set it
            yield R.Truncate(path=rel, size=tsize)
    finally:
        os.close(bfd)
        os.close(tfd)


def _zeroed_bytes(bfd: int, tfd: int, bsize: int, ranges: list[tuple[int, int]]) -> tuple[int, int | None]:
    """(bytes, first offset) of the aligned zero blocks of the target ``tfd`` inside ``ranges`` where
    the base copy ``bfd`` (of ``bsize`` bytes) holds data: what :func:`compare_range` would write as
    zeros over data (a hole made in the old file).  Only the base copy's data segments are read:
    over its holes there is no data to zero (a 1 TiB sparse file costs its data, not its size)."""
    total, first = 0, None
    for start, end in ranges:
        for off, length in list(data_segments(bfd, start, min(end, bsize))):
            # from the zero block that holds the segment's start, so the blocks stay aligned
            pos, stop = off // ZERO_BLOCK * ZERO_BLOCK, min(off + length, end, bsize)
            pos = max(pos, start)
            while pos < stop:
                n = min(CHUNK, stop - pos)
                tb = os.pread(tfd, n, pos)
                bb = os.pread(bfd, n, pos)
                if tb != bb:
                    for i in range(0, len(tb) - ZERO_BLOCK + 1, ZERO_BLOCK):
                        if tb[i : i + ZERO_BLOCK] == _ZEROS and bb[i : i + ZERO_BLOCK] != _ZEROS:
                            total += ZERO_BLOCK
                            first = pos + i if first is None else first
                pos += n
    return total, first


def _nonzero_bytes(fd: int, start: int, end: int, limit: int) -> int:
    """Bytes of ``[start, end)`` of ``fd`` outside aligned zero blocks, counted until they pass ``limit``."""
    total = 0
    for off, length in list(data_segments(fd, start, end)):
        pos, stop = off, off + length
        while pos < stop and total <= limit:
            data = os.pread(fd, min(CHUNK, stop - pos), pos)
            if not data:
                break
            total += sum(len(piece) for _, piece in nonzero_pieces(pos, data))
            pos += len(data)
    return total


def update_records(
    bfd: int, tfd: int, rel: str, bsize: int, tsize: int, ranges: list[tuple[int, int]]
) -> Iterator[object]:
    """Records that make the changed ``ranges`` (sorted, disjoint) of the file being changed, the base
    copy ``bfd`` of ``bsize`` bytes already at size ``tsize``, equal to the target ``tfd``.

    Records cannot punch a hole: where the target has zero blocks over the base copy's data (a hole
    made in the old file; zfs-fuse reports no holes, so they read as zeros), overwriting writes the
    zeros and allocates them.  When rewriting the target's non-zero blocks from the first such block
    to the end of file writes fewer bytes, the file is truncated there and rewritten (its zero
    blocks stay holes, :func:`nonzero_pieces`), as btrfs's translation does (docs/real-backends.md)."""
    zeros, first = _zeroed_bytes(bfd, tfd, bsize, ranges)
    if first is None or _nonzero_bytes(tfd, first, tsize, zeros) >= zeros:
        for start, end in ranges:
            yield from compare_range(bfd, tfd, rel, bsize, start, end)
        return
    for start, end in ranges:
        if start < first:
            yield from compare_range(bfd, tfd, rel, bsize, start, min(end, first))
    yield R.Truncate(path=rel, size=first)
    size = first
    for w in write_records(rel, tfd, first, tsize, skip_zero=True):
        size = max(size, w.offset + len(w.data))
        yield w
    if size != tsize:
        yield R.Truncate(path=rel, size=tsize)


def compare_range(bfd: int, tfd: int, rel: str, bsize: int, start: int, end: int) -> Iterator[R.Write]:
    """Writes for the chunks of ``[start, end)`` in which the target file ``tfd`` differs from its base
    copy ``bfd`` of ``bsize`` bytes (past ``bsize`` the copy being changed holds zeros).  Only the
    parts where either copy has data are read: where both have a hole, both hold zeros."""
    segments = sorted([*data_segments(tfd, start, end), *data_segments(bfd, start, min(end, bsize))])
    merged: list[list[int]] = []
    for off, length in segments:
        if merged and off <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], off + length)
        else:
            merged.append([off, off + length])
    for seg_start, seg_end in merged:
        pos = seg_start
        while pos < seg_end:
            n = min(CHUNK, seg_end - pos)
            tb = os.pread(tfd, n, pos)
            bb = os.pread(bfd, min(n, bsize - pos), pos) if pos < bsize else b""
            if len(bb) < len(tb):  # past the old size (or a copy that ended early): zeros
                bb += bytes(len(tb) - len(bb))
            if tb != bb:
                yield from _differing_blocks(rel, pos, tb, bb)
            pos += n


def _differing_blocks(rel: str, offset: int, new: bytes, old: bytes) -> Iterator[R.Write]:
    """Writes of the runs of aligned ZERO_BLOCKs of ``new`` (at ``offset``) that differ from
    ``old``: a block that did not change is not rewritten, so a hole of the old copy that the
    new one still has stays a hole."""
    tv, bv = memoryview(new), memoryview(old)
    run = -1  # start of the run of differing blocks, relative to offset
    i = 0
    while i < len(new):
        j = min(len(new), (offset + i) // ZERO_BLOCK * ZERO_BLOCK + ZERO_BLOCK - offset)
        if tv[i:j] != bv[i:j]:
            run = i if run < 0 else run
        elif run >= 0:
            yield R.Write(path=rel, offset=offset + run, data=new[run:i])
            run = -1
        i = j
    if run >= 0:
        yield R.Write(path=rel, offset=offset + run, data=new[run:] if run else new)
