"""Reading POSIX trees: the canonical fingerprint, full-create records
(baselines, cross-qtree moves) and the tree-compare diff.

The reading side works on read-only images (btrfs snapshots, ZFS snapshot
directories or read-only clones) and on the live qtree for fingerprints.
It never follows a symlink: entries are examined with ``lstat`` and only
directories found by the walk itself are descended into.  Special files
(devices, FIFOs, sockets) have no change record and no fingerprint kind;
they are skipped (docs/real-backends.md).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import weakref
from typing import Callable, Iterable, Iterator

from coalesce_core.errors import BackendError
from coalesce_core import fingerprint as fp
from coalesce_core.records import (
    MAX_DATA, ROOT, HardLink, MkDir, MkFile, RmDir, SetAttr, SetXattr, Symlink, Truncate, Unlink, Write,
)

CHUNK = MAX_DATA
_HAVE_SEEK = hasattr(os, "SEEK_DATA")
_HAVE_FADVISE = hasattr(os, "posix_fadvise")


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
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def listdir_sorted(path: str) -> list[str]:
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(names, key=lambda n: n.encode("utf-8", "surrogateescape"))


def iter_tree(root: str, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry below ``root/rel`` in pre-order, sorted by name."""
    base = os.path.join(root, rel) if rel else root
    for name in listdir_sorted(base):
        r = join(rel, name)
        st = lstat_or_none(os.path.join(root, r))
        if st is None:
            continue
        yield r, st
        if stat.S_ISDIR(st.st_mode):
            yield from iter_tree(root, r)


# ---------------------------------------------------------------------------
# fingerprint
# ---------------------------------------------------------------------------
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while True:
            b = os.read(fd, CHUNK)
            if not b:
                break
            h.update(b)
    finally:
        os.close(fd)
    return h.hexdigest()


def entries(root: str) -> Iterator[fp.Entry]:
    """Fingerprint entries of the tree below ``root`` (``root`` itself excluded)."""
    for rel, st in iter_tree(root):
        k = kind_of(st)
        full = os.path.join(root, rel)
        if k == "d":
            yield fp.Entry(path=rel, kind="d", mode=st.st_mode & 0o7777)
        elif k == "f":
            yield fp.Entry(path=rel, kind="f", mode=st.st_mode & 0o7777, size=st.st_size,
                           content_sha256=file_sha256(full))
        elif k == "l":
            # Linux symlinks have no settable permission bits: canonical mode 0.
            yield fp.Entry(path=rel, kind="l", mode=0, target=os.fsdecode(os.readlink(full)))


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
            if exc.errno == errno.ENXIO:      # only a hole up to EOF
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
            threading.Thread(target=_read_ahead, args=(files, self._state), name="coalesce-readahead",
                             daemon=True).start()
        weakref.finalize(self, self._state.stop)

    def next(self) -> None:
        self._state.advance()

    def close(self) -> None:
        self._state.stop()


class _ReadAheadState:
    def __init__(self, ahead: int) -> None:
        self.cond = threading.Condition()
        self.ahead = ahead
        self.pos = 0                # files the reader has started on
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


def write_records(path_rel: str, fd: int, start: int, end: int, *, skip_zero: bool) -> Iterator[Write]:
    """Write records carrying bytes ``[start, end)`` of the open file ``fd`` (holes skipped)."""
    for off, length in list(data_segments(fd, start, end)):
        pos, stop = off, off + length
        while pos < stop:
            n = min(CHUNK, stop - pos)
            data = os.pread(fd, n, pos)
            if not data:
                break
            if not (skip_zero and data.count(0) == len(data)):
                yield Write(path=path_rel, offset=pos, data=data)
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
    """xattrs of a file or directory (never of a symlink: Linux has no user xattrs on them)."""
    root = _diff_root(path)
    if root is not None and _XATTR_ROOTS.roots[root] is False:
        return {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            if root is not None:
                _XATTR_ROOTS.roots[root] = False
            return {}
        raise
    out = {}
    for n in sorted(names):
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                continue
            raise
    return out


def xattr_records(rel: str, base: dict[str, bytes], target: dict[str, bytes]) -> Iterator[SetXattr]:
    for n in sorted(set(base) | set(target)):
        if n not in target:
            yield SetXattr(path=rel, name=n, value=None)
        elif base.get(n) != target[n]:
            yield SetXattr(path=rel, name=n, value=target[n])


def setattr_record(rel: str, st: os.stat_result) -> SetAttr:
    mode = None if stat.S_ISLNK(st.st_mode) else st.st_mode & 0o7777
    return SetAttr(path=rel, mode=mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns)


def attrs_differ(a: os.stat_result, b: os.stat_result) -> bool:
    return ((a.st_mode & 0o7777) != (b.st_mode & 0o7777) or a.st_uid != b.st_uid or a.st_gid != b.st_gid
            or a.st_mtime_ns != b.st_mtime_ns)


def file_create_records(root: str, rel: str, st: os.stat_result, dest_rel: str | None = None) -> Iterator[object]:
    """MkFile + data (+ Truncate when the data ends before the size) + xattrs for the regular file ``root/rel``
    (created at ``dest_rel``)."""
    dest = dest_rel or rel
    full = os.path.join(root, rel)
    yield MkFile(path=dest, mode=st.st_mode & 0o7777)
    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    written = 0                     # the size the records give the new file
    try:
        size = os.fstat(fd).st_size
        for w in write_records(dest, fd, 0, size, skip_zero=True):
            written = w.offset + len(w.data)
            yield w
    finally:
        os.close(fd)
    if written != size:             # a hole (or zeros) at the end
        yield Truncate(path=dest, size=size)
    yield from xattr_records(dest, {}, read_xattrs(full))


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
        yield HardLink(path=dest, existing=existing)

    def updated(self, base: str, target: str, rel: str, b: os.stat_result, t: os.stat_result) -> Iterator[object]:
        """Records that turn the file ``base/rel`` into ``target/rel`` (same inode): data and xattrs."""
        bpath, tpath = os.path.join(base, rel), os.path.join(target, rel)
        yield from file_update_records(bpath, tpath, rel, b.st_size, t.st_size)
        yield from xattr_records(rel, read_xattrs(bpath), read_xattrs(tpath))

    def finish(self) -> Iterator[object]:
        """Records held back by :meth:`created`, :meth:`linked` or :meth:`updated`."""
        return iter(())


#: the default: data read from the images
READ = FileData()


def create_records(root: str, rel: str, *, dest_rel: str | None = None, links: dict | None = None,
                   skip: Callable[[str], bool] | None = None, attrs_out: list | None = None,
                   st: os.stat_result | None = None, data: "FileData | None" = None) -> Iterator[object]:
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
    attrs_list: list = [] if own_attrs else attrs_out
    links = {} if links is None else links
    dest = dest_rel or rel
    if st is None:
        st = lstat_or_none(os.path.join(root, rel))
    if st is None:
        return
    yield from _create_one(root, rel, dest, st, links, skip, attrs_list, data or READ)
    if own_attrs:
        yield from sorted_attrs(attrs_list)


def _create_one(root, rel, dest, st, links, skip, attrs_list, data=READ):
    k = kind_of(st)
    full = os.path.join(root, rel)
    if k == "d":
        yield MkDir(path=dest, mode=st.st_mode & 0o7777)
        yield from xattr_records(dest, {}, read_xattrs(full))
        for name in listdir_sorted(full):
            crel = join(rel, name)
            if skip is not None and skip(crel):
                continue
            cst = lstat_or_none(os.path.join(root, crel))
            if cst is not None:
                yield from _create_one(root, crel, join(dest, name), cst, links, skip, attrs_list, data)
    elif k == "f":
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in links:
            yield from data.linked(dest, links[key])
            return
        if st.st_nlink > 1:
            links[key] = dest
        yield from data.created(root, rel, dest, st)
    elif k == "l":
        yield Symlink(path=dest, target=os.fsdecode(os.readlink(full)))
    else:
        return
    attrs_list.append(setattr_record(dest, st))


def sorted_attrs(attrs_list: Iterable[SetAttr]) -> list[SetAttr]:
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
    yield from xattr_records(ROOT, read_xattrs(base) if b is not None and base else {}, read_xattrs(target))
    if force or b is None or attrs_differ(b, t):
        yield setattr_record(ROOT, t)


# ---------------------------------------------------------------------------
# the tree-compare diff
# ---------------------------------------------------------------------------
def tree_diff(base: str | None, target: str, *, same_lineage: bool = True,
              prune: set[str] | None = None, quick_before_ns: int | None = None,
              data: FileData = READ) -> Iterator[object]:
    """Change records that turn the tree below ``base`` into the tree below ``target``.

    ``same_lineage``: both trees are images of the same file system (a
    snapshot and a later snapshot, or clones of them), so an inode number
    names the same file in both; an entry whose inode changed was replaced
    and is recreated, an entry whose inode, size, mtime and ctime are equal
    and whose ctime is older than ``quick_before_ns`` (the creation time of
    the base image: a change after it would have moved the ctime, which no
    user can set, past it -- this holds with zfs-fuse's one-second
    timestamps too) is unchanged without reading it.  Otherwise files are
    compared by content (every chunk read on both sides).

    ``prune``: when given, the set of qtree-relative directories that may
    contain a change ("" is the root; from ``zfs diff``): an unchanged
    directory outside it is not descended into, so the cost follows the change.

    ``data``: where the data of changed regular files come from (:class:`FileData`).

    Order: removals (deepest first), then creations and updates in pre-order,
    then what ``data`` held back, then SetAttr deepest first; renames are not
    detected (a rename is a removal plus a creation), so this is the
    fallback, not the fast path.
    """
    base = base if base and os.path.isdir(base) else None
    # a file system without xattrs is asked once per image, not once per file (read_xattrs)
    _XATTR_ROOTS.roots = {os.path.normpath(r): None for r in (base, target) if r}
    try:
        yield from _removals(base, target, "", same_lineage, prune)
        attrs_list: list = []
        links: dict = {}
        quick = quick_before_ns if same_lineage else None
        yield from _updates(base, target, "", quick, links, attrs_list, prune, same_lineage, data)
        yield from data.finish()
        yield from sorted_attrs(attrs_list)
        yield from root_records(base, target, force=False)
    finally:
        _XATTR_ROOTS.roots = None


def _replaced(b: os.stat_result, t: os.stat_result, same_lineage: bool) -> bool:
    if kind_of(b) != kind_of(t):
        return True
    if same_lineage and kind_of(t) != "d" and b.st_ino != t.st_ino:
        return True
    return False


def _removals(base, target, rel, same_lineage, prune=None):
    if base is None:
        return
    for name in listdir_sorted(os.path.join(base, rel) if rel else base):
        r = join(rel, name)
        b = lstat_or_none(os.path.join(base, r))
        if b is None or kind_of(b) is None:
            continue
        t = lstat_or_none(os.path.join(target, r))
        if t is None or kind_of(t) is None or _replaced(b, t, same_lineage):
            yield from _remove_subtree(base, r, b)
        elif kind_of(b) == "d" and (prune is None or r in prune):
            yield from _removals(base, target, r, same_lineage, prune)


def _remove_subtree(base, rel, st):
    if stat.S_ISDIR(st.st_mode):
        for name in listdir_sorted(os.path.join(base, rel)):
            r = join(rel, name)
            c = lstat_or_none(os.path.join(base, r))
            if c is not None and kind_of(c) is not None:
                yield from _remove_subtree(base, r, c)
        yield RmDir(path=rel)
    else:
        yield Unlink(path=rel)


def _updates(base, target, rel, quick, links, attrs_list, prune, same_lineage, data):
    for name in listdir_sorted(os.path.join(target, rel) if rel else target):
        r = join(rel, name)
        t = lstat_or_none(os.path.join(target, r))
        if t is None or kind_of(t) is None:
            continue
        b = lstat_or_none(os.path.join(base, r)) if base else None
        if b is not None and kind_of(b) is None:
            b = None
        if b is None or _replaced(b, t, same_lineage):
            yield from _create_one(target, r, r, t, links, None, attrs_list, data)
            continue
        k = kind_of(t)
        if k == "d":
            yield from xattr_records(r, read_xattrs(os.path.join(base, r)), read_xattrs(os.path.join(target, r)))
            if prune is None or r in prune:
                yield from _updates(base, target, r, quick, links, attrs_list, prune, same_lineage, data)
        elif k == "l":
            bt, tt = os.readlink(os.path.join(base, r)), os.readlink(os.path.join(target, r))
            if bt != tt:
                yield Unlink(path=r)
                yield Symlink(path=r, target=os.fsdecode(tt))
                attrs_list.append(setattr_record(r, t))
                continue
        else:
            if t.st_nlink > 1:
                links.setdefault((t.st_dev, t.st_ino), r)
            quick_same = (quick is not None and b.st_ino == t.st_ino and b.st_size == t.st_size
                          and b.st_mtime_ns == t.st_mtime_ns and b.st_ctime_ns == t.st_ctime_ns
                          and b.st_ctime_ns < quick)
            if not quick_same:
                yield from data.updated(base, target, r, b, t)
        if attrs_differ(b, t):
            attrs_list.append(setattr_record(r, t))


def file_update_records(bpath: str, tpath: str, rel: str, bsize: int, tsize: int) -> Iterator[object]:
    """Records that turn the file ``bpath`` into ``tpath``: Writes for the chunks that differ, and the size."""
    if bsize != tsize and bsize <= CHUNK and tsize <= CHUNK:
        # one chunk on each side, of different lengths, so it differs: the records are those of
        # the compare below without reading the base copy (on FUSE, zfs-fuse, its open, read and
        # close are three round trips to the daemon)
        tfd = os.open(tpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = os.pread(tfd, tsize, 0) if tsize else b""
        finally:
            os.close(tfd)
        if len(data) != tsize:
            raise BackendError(f"{tpath}: read {len(data)} of {tsize} bytes from a PCPI (it changed?)")
        if tsize < bsize:
            yield Truncate(path=rel, size=tsize)
        if data and not (bsize == 0 and data.count(0) == len(data)):
            yield Write(path=rel, offset=0, data=data)
        if tsize > bsize:
            yield Truncate(path=rel, size=tsize)
        return
    bfd = os.open(bpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    tfd = os.open(tpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if tsize < bsize:
            yield Truncate(path=rel, size=tsize)
        yield from compare_range(bfd, tfd, rel, bsize, 0, tsize)
        if tsize > bsize:
            yield Truncate(path=rel, size=tsize)
    finally:
        os.close(bfd)
        os.close(tfd)


def compare_range(bfd: int, tfd: int, rel: str, bsize: int, start: int, end: int) -> Iterator[Write]:
    """Writes for the chunks of ``[start, end)`` in which the target file ``tfd`` differs from its base
    copy ``bfd`` of ``bsize`` bytes (past ``bsize`` the copy being changed holds zeros)."""
    pos = start
    while pos < end:
        n = min(CHUNK, end - pos)
        tb = os.pread(tfd, n, pos)
        bb = os.pread(bfd, n, pos) if pos < bsize else b""
        if tb != bb:
            if not (pos >= bsize and tb.count(0) == len(tb)):
                yield Write(path=rel, offset=pos, data=tb)
        pos += n
