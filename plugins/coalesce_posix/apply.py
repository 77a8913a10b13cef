"""The POSIX applier: change records into a qtree of a mounted file system (I10).

Every path is resolved relative to an open directory descriptor of the qtree
root, one component at a time, with ``O_NOFOLLOW | O_DIRECTORY``: an existing
symlink (or any non-directory) on the way raises HostilePath before anything
is written for that record; ``..`` and absolute paths never reach the file
system (``check_path`` refuses them, again here, whatever the record's
constructor did).  The final component is operated on with ``*at`` calls
(``dir_fd``, ``follow_symlinks=False``, ``O_NOFOLLOW``), so a symlink in the
qtree is stored and changed, never followed.  Resolved directories are kept
open by path for the rest of the stream (at most 64); when the stream
renames, discards or removes a directory, its entry and those below it are
dropped, so a kept descriptor never stands for a path that now names
something else (a symlink put there included).  Records are applied one at a
time in stream order; a large Write, and what comes while it is written, is
applied by a writer thread while the next records are pulled
(:meth:`Applier._apply_stream`).

Deleted or replaced entries go to the qtree's purgatory, a directory of the
same file system outside the qtree (``rename`` is atomic and cheap there);
``coalesce_purge_purgatory`` deletes it at jump-ahead.

Failures raise BackendError subclasses (ENOSPC -> :class:`NoSpace`) or the
StreamError of the record, and leave a partial qtree for the rollback path;
the applier never touches a PCPI (they are read-only snapshots anyway).
"""

from __future__ import annotations

import errno
import itertools
import os
import queue
import stat
import threading
import time
from collections import OrderedDict
from typing import Any, Iterable

from coalesce_core.errors import BackendError, CorruptStream, HostilePath
from coalesce_core.stream import records as R

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NEWFILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NOFOLLOW_ERRNOS = (errno.ELOOP, errno.ENOTDIR)
# Applier._apply_stream: a Write of at least _PIPE_MIN bytes goes to the writer thread, where
# at most _PIPE_DEPTH records wait (memory: a few MiB)
_PIPE_MIN = 256 << 10
_PIPE_DEPTH = 4


class ApplyFailed(BackendError):
    """Applying a change stream failed part-way; the qtree is partial and takes the rollback path."""


class NoSpace(ApplyFailed):
    """The destination file system is full (ENOSPC / EDQUOT) mid-apply."""


def _fs(path: str) -> bytes:
    return os.fsencode(path)


class Applier:
    """Applies one change stream to ``<volume_root>/<qtree>``.

    ``purgatory`` is the directory (same file system, outside the qtree) that
    receives deleted and replaced entries, or None to delete them at once.
    """

    def __init__(self, volume_root: str, qtree: str, purgatory: str | None) -> None:
        R.check_path(qtree, what="qtree")
        if "/" in qtree:
            raise HostilePath(f"qtree name {qtree!r} must be one directory name")
        self.volume_root = volume_root
        self.qtree = qtree
        self.purgatory = purgatory
        self._purg_fd: int | None = None
        self._root_fd: int | None = None
        self._vol_fd: int | None = None  # the volume root, for the qtree root's attributes
        self._dirs: OrderedDict[str, int] = OrderedDict()  # parent path -> fd (LRU)
        self._file: tuple[str, int] | None = None  # last written file
        # (uid, gid, permission bits) of the regular files and directories this applier created
        # or opened for writing, read from the descriptor then: a later SetAttr of the same path
        # needs no lstat (on FUSE one round trip to the daemon per file).  Valid only while the
        # namespace does not move: every rename, link, removal or discard clears it.
        self._known: dict[str, tuple[int, int, int]] = {}
        self._seq = itertools.count()
        self.records = 0
        self.bytes = 0
        self.released: str | None = None

    # -- descriptors --------------------------------------------------------
    def _open_root(self) -> int:
        if self._root_fd is None:
            vfd = os.open(self.volume_root, O_DIR)
            try:
                try:
                    os.mkdir(self.qtree, 0o755, dir_fd=vfd)
                except FileExistsError:
                    pass
                try:
                    self._root_fd = os.open(self.qtree, O_DIR, dir_fd=vfd)
                except OSError as exc:
                    if exc.errno in _NOFOLLOW_ERRNOS:
                        raise HostilePath(
                            f"qtree {self.qtree!r} in {self.volume_root} is not a directory (a symlink?)",
                            hint="remove the impostor entry; the qtree must be a real directory",
                        ) from exc
                    raise
            finally:
                os.close(vfd)
        return self._root_fd

    def _purgatory_fd(self) -> int:
        if self._purg_fd is None:
            assert self.purgatory is not None
            os.makedirs(self.purgatory, 0o700, exist_ok=True)
            self._purg_fd = os.open(self.purgatory, O_DIR)
        return self._purg_fd

    def _forget(self) -> None:
        """Drop every cached descriptor."""
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        self._close_file()

    def _forget_dir(self, path: str) -> None:
        """Drop the cached descriptors of directory ``path`` and of every directory below it.

        Called when the directory at ``path`` is renamed, moved to purgatory or
        removed: a cached descriptor follows the directory it was opened on, so
        it no longer names what ``path`` names.  A rename or removal of anything
        else leaves every cached directory where it was."""
        below = path + "/"
        for key in [k for k in self._dirs if k == path or k.startswith(below)]:
            os.close(self._dirs.pop(key))

    def _close_file(self) -> None:
        if self._file is not None:
            os.close(self._file[1])
            self._file = None

    def close(self) -> None:
        self._forget()
        for attr in ("_root_fd", "_purg_fd", "_vol_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)

    def _parent(self, path: str) -> tuple[int, str]:
        """(fd of the parent directory, final name) of qtree-relative ``path``."""
        R.check_path(path)
        parent, _, name = path.rpartition("/")
        if not parent:
            return self._open_root(), name
        fd = self._dirs.get(parent)
        if fd is not None:
            self._dirs.move_to_end(parent)
            return fd, name
        below = parent + "/"
        for key in reversed(self._dirs):
            if key.startswith(below) and "/" not in key[len(below) :]:
                # a directory just below it is open (a tree removed deepest first): its "..",
                # which is the directory at ``parent`` (a kept descriptor never outlives its path)
                cur = os.open("..", O_DIR, dir_fd=self._dirs[key])
                return self._keep_dir(parent, cur), name
        # from the deepest directory of the path already open (a deep tree is created one level
        # at a time: its next parent is the last one's child), else from the root
        known = parent
        while True:
            known = known.rpartition("/")[0]
            if not known or known in self._dirs:
                break
        cur = self._dirs[known] if known else self._open_root()
        walked = [known] if known else []
        opened: list[int] = []
        try:
            for comp in (parent[len(known) + 1 :] if known else parent).split("/"):
                walked.append(comp)
                try:
                    nfd = os.open(comp, O_DIR, dir_fd=cur)
                except OSError as exc:
                    if exc.errno in _NOFOLLOW_ERRNOS:
                        where = "/".join(walked)
                        try:
                            st = os.lstat(comp, dir_fd=cur)
                            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                        except OSError:
                            what = "not a directory"
                        if what == "a symlink":
                            raise HostilePath(
                                f"{path!r}: {where!r} in qtree {self.qtree!r} is a symlink; the applier never follows one",
                                hint="the stream tries to write through a symlink (I10); the update is rolled back",
                            ) from exc
                        raise CorruptStream(
                            f"{path!r}: {where!r} in qtree {self.qtree!r} is {what}",
                            hint="the stream does not match the replica; the update is rolled back",
                        ) from exc
                    if exc.errno == errno.ENOENT:
                        raise CorruptStream(
                            f"{path!r}: directory {'/'.join(walked)!r} does not exist in qtree {self.qtree!r}",
                            hint="the stream does not match the replica (order contract); it is rolled back",
                        ) from exc
                    raise
                opened.append(nfd)
                cur = nfd
        except BaseException:
            for f in opened:
                os.close(f)
            raise
        for f in opened[:-1]:
            os.close(f)
        return self._keep_dir(parent, cur), name

    def _keep_dir(self, path: str, fd: int) -> int:
        """Keep ``fd``, the directory at ``path``, for the rest of the stream (at most 64, LRU)."""
        self._dirs[path] = fd
        if len(self._dirs) > 64:
            _, old = self._dirs.popitem(last=False)
            os.close(old)
        return fd

    def _attr_target(self, path: str) -> tuple[int, str]:
        """:meth:`_parent` for the attribute records, which may name the qtree root (:data:`ROOT`):
        then the volume root and the qtree's name (the root was opened without following a link)."""
        if path != R.ROOT:
            return self._parent(path)
        if self._vol_fd is None:
            self._open_root()
            self._vol_fd = os.open(self.volume_root, O_DIR)
        return self._vol_fd, self.qtree

    @staticmethod
    def _lstat(dfd: int, name: str) -> os.stat_result | None:
        try:
            return os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            return None

    # -- purgatory ------------------------------------------------------------
    def _discard(self, path: str, dfd: int, name: str, st: os.stat_result) -> None:
        """Move the entry ``path`` (``name`` in ``dfd``) to purgatory (or delete it when there is none)."""
        self._close_file()
        self._known.clear()
        if self.purgatory is not None:
            pname = purgatory_name(next(self._seq), name)
            os.rename(name, pname, src_dir_fd=dfd, dst_dir_fd=self._purgatory_fd())
        else:
            _remove_entry(dfd, name, st)
        if stat.S_ISDIR(st.st_mode):
            self._forget_dir(path)

    # -- records --------------------------------------------------------------
    def apply(self, records: Iterable[Any]) -> dict[str, int]:
        it = iter(records)
        try:
            first = next(it)
        except StopIteration:
            self._open_root()
            self.close()
            return {"records": 0, "bytes": 0}
        if isinstance(first, R.Begin):
            # Begin names the *source* qtree, which may differ from the replica's
            stream = R.changes_only(itertools.chain([first], it))
        else:
            stream = itertools.chain([first], it)
        self._open_root()
        try:
            self._apply_stream(stream)
        finally:
            self.close()
        return {"records": self.records, "bytes": self.bytes}

    def _apply_stream(self, stream: Iterable[Any]) -> None:
        """Apply the records in order; large Writes (and what follows them while they
        are written) in a writer thread.

        Pulling a record runs the diff (reading the source PCPI) and the codec
        (checksums), applying a Write is a ``pwrite``: both release the GIL on
        large buffers, so a Write of at least ``_PIPE_MIN`` bytes is handed to
        a writer thread while this thread pulls the next records, as ``btrfs
        send`` and ``btrfs receive`` overlap in two processes.  Records that
        come while the writer has work queue behind it; others are applied
        here at once (for small records both threads would mostly run Python
        and only contend for the GIL).  Only this thread touches the records
        iterator (the caller may close it as soon as apply returns).  Every
        record pulled is applied before apply returns or raises, as when
        records were applied one at a time, and an apply error comes before
        anything the source raises later (it concerns an earlier record)."""
        writer: _Writer | None = None
        it = iter(stream)
        try:
            while True:
                try:
                    rec = next(it)
                except StopIteration:
                    break
                except BaseException:
                    if writer is not None:
                        writer.drain()
                    raise
                if writer is not None and writer.busy():
                    writer.put(rec)
                elif type(rec) is R.Write and len(rec.data) >= _PIPE_MIN:
                    if writer is None:
                        writer = _Writer(self)
                    writer.put(rec)
                else:
                    if writer is not None:
                        writer.drain()  # idle: raises its failure, if its last record failed
                    self._apply_one(rec)
            if writer is not None:
                writer.drain()
        finally:
            if writer is not None:
                writer.stop()

    def _apply_one(self, rec: Any) -> None:
        if isinstance(rec, (R.Begin, R.End)):
            raise CorruptStream(f"unexpected {type(rec).__name__} record inside the stream")
        try:
            self.one(rec)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._release_partial_file()
            raise self._os_error(rec, exc) from exc
        self.records += 1

    def _release_partial_file(self) -> None:
        """On ENOSPC, release the file being written (best effort): the update has
        failed anyway and its rollback restores the file, but the rollback needs
        space for its PCPI.  Truncate it; where even that needs space (btrfs
        copy-on-write metadata), unlink it (deletions use the reserve)."""
        if self._file is None:
            return
        path, fd = self._file
        try:
            os.ftruncate(fd, 0)
        except OSError:
            self._close_file()
            try:
                dfd, name = self._parent(path)
                os.unlink(name, dir_fd=dfd)
            except (OSError, CorruptStream, HostilePath):
                return
        os.sync()  # commit, so that copy-on-write file systems unpin the freed extents
        self.released = path

    def _os_error(self, rec: object, exc: OSError) -> BackendError:
        where = os.path.join(self.volume_root, self.qtree)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            released = (
                f"; the partial file {self.released!r} was released to make room for the rollback"
                if self.released
                else ""
            )
            return NoSpace(
                f"no space left on the destination file system while applying {type(rec).__name__} "
                f"to {getattr(rec, 'path', getattr(rec, 'old', '?'))!r} in {where}: {exc.strerror}{released}",
                hint="the update fails and the replica rolls back; free space or grow the volume "
                "(PCPIs and exported images are untouched)",
            )
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) and isinstance(rec, R.SetXattr):
            return ApplyFailed(
                f"the file system under {where} does not support extended attributes ({rec.name!r} on {rec.path!r})",
                hint="enable xattrs on the destination (zfs-fuse has none; OpenZFS: xattr=sa) or use a source without them",
            )
        return ApplyFailed(
            f"applying {rec!r:.200} to {where} failed: {exc}",
            hint="the update fails and the replica takes the rollback path",
        )

    def one(self, rec: Any) -> None:
        if isinstance(rec, R.Write):
            fd = self._file_fd(rec.path)
            view = memoryview(rec.data)
            off = rec.offset
            while view:
                n = os.pwrite(fd, view, off)
                view = view[n:]
                off += n
            self.bytes += len(rec.data)
        elif isinstance(rec, R.Truncate):
            os.ftruncate(self._file_fd(rec.path), rec.size)
        elif isinstance(rec, R.MkFile):
            mode = rec.mode & 0o7777
            dfd, name = self._parent(rec.path)
            self._close_file()
            try:
                # O_EXCL: an existing entry, a symlink included, fails with EEXIST (never followed)
                fd = os.open(name, _O_NEWFILE, mode, dir_fd=dfd)
            except FileExistsError:
                st = self._lstat(dfd, name)
                if st is not None:
                    self._discard(rec.path, dfd, name, st)
                    dfd, name = self._parent(rec.path)
                fd = os.open(name, _O_NEWFILE, mode, dir_fd=dfd)
            self._file = (rec.path, fd)
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)  # the umask took bits away
            self._remember(rec.path, st, mode)
        elif isinstance(rec, R.MkDir):
            mode = rec.mode & 0o7777
            dfd, name = self._parent(rec.path)
            try:
                os.mkdir(name, mode, dir_fd=dfd)
            except FileExistsError:
                st = self._lstat(dfd, name)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    return  # idempotent replay
                if st is not None:
                    self._discard(rec.path, dfd, name, st)
                    dfd, name = self._parent(rec.path)
                os.mkdir(name, mode, dir_fd=dfd)
            st = os.lstat(name, dir_fd=dfd)
            if stat.S_IMODE(st.st_mode) != mode:  # the umask took bits away
                fd = os.open(name, O_DIR, dir_fd=dfd)
                try:
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
            self._remember(rec.path, st, mode)
        elif isinstance(rec, R.Symlink):
            self._known.clear()
            dfd, name = self._parent(rec.path)
            st = self._lstat(dfd, name)
            if st is not None:
                if stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=dfd) == _fs(rec.target):
                    return
                self._discard(rec.path, dfd, name, st)
                dfd, name = self._parent(rec.path)
            os.symlink(_fs(rec.target), name, dir_fd=dfd)
        elif isinstance(rec, R.HardLink):
            self._known.clear()
            R.check_path(rec.existing, what="hard link source")
            sfd, sname = self._parent(rec.existing)
            sst = self._lstat(sfd, sname)
            if sst is None:
                raise CorruptStream(
                    f"hard link {rec.path!r}: source {rec.existing!r} does not exist in qtree {self.qtree!r}"
                )
            if stat.S_ISDIR(sst.st_mode):
                raise CorruptStream(f"hard link {rec.path!r}: source {rec.existing!r} is a directory")
            dfd, name = self._parent(rec.path)
            st = self._lstat(dfd, name)
            if st is not None:
                if (st.st_dev, st.st_ino) == (sst.st_dev, sst.st_ino):
                    return
                self._discard(rec.path, dfd, name, st)
                sfd, sname = self._parent(rec.existing)
                dfd, name = self._parent(rec.path)
            os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        elif isinstance(rec, R.Rename):
            self._known.clear()
            R.check_path(rec.new, what="rename target")
            sfd, sname = self._parent(rec.old)
            sst = self._lstat(sfd, sname)
            dfd, dname = self._parent(rec.new)
            dst = self._lstat(dfd, dname)
            if sst is None:
                if dst is not None:
                    return  # replay: already renamed
                raise CorruptStream(
                    f"rename {rec.old!r} -> {rec.new!r}: {rec.old!r} does not exist in qtree {self.qtree!r}"
                )
            if dst is not None:
                if (dst.st_dev, dst.st_ino) == (sst.st_dev, sst.st_ino):
                    return
                self._discard(rec.new, dfd, dname, dst)
                sfd, sname = self._parent(rec.old)
                dfd, dname = self._parent(rec.new)
            self._close_file()
            os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            if stat.S_ISDIR(sst.st_mode):
                self._forget_dir(rec.old)
        elif isinstance(rec, R.Unlink):
            self._known.clear()
            dfd, name = self._parent(rec.path)
            st = self._lstat(dfd, name)
            if st is None:
                return
            if stat.S_ISDIR(st.st_mode):
                raise CorruptStream(f"unlink {rec.path!r}: it is a directory in qtree {self.qtree!r}")
            self._discard(rec.path, dfd, name, st)
        elif isinstance(rec, R.RmDir):
            self._known.clear()
            dfd, name = self._parent(rec.path)
            st = self._lstat(dfd, name)
            if st is None:
                return
            if not stat.S_ISDIR(st.st_mode):
                raise CorruptStream(f"rmdir {rec.path!r}: not a directory in qtree {self.qtree!r}")
            try:
                os.rmdir(name, dir_fd=dfd)
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise
                raise CorruptStream(
                    f"rmdir {rec.path!r}: directory not empty in qtree {self.qtree!r}",
                    hint="the stream does not match the replica; it is rolled back",
                ) from exc
            self._forget_dir(rec.path)
        elif isinstance(rec, R.SetAttr):
            self._setattr(rec)
        elif isinstance(rec, R.SetXattr):
            self._known.pop(rec.path, None)  # a POSIX ACL (system.posix_acl_access) changes the mode
            dfd, name = self._attr_target(rec.path)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ApplyFailed(
                        f"xattr {rec.name!r} on symlink {rec.path!r}: not supported by the POSIX applier",
                        hint="Linux keeps no user xattrs on symlinks",
                    ) from exc
                raise
            try:
                if rec.value is None:
                    try:
                        os.removexattr(fd, rec.name)
                    except OSError as exc:
                        if exc.errno != errno.ENODATA:
                            raise
                else:
                    os.setxattr(fd, rec.name, rec.value)
            finally:
                os.close(fd)
        else:
            raise CorruptStream(f"unknown change record {rec!r:.200}")

    def _file_fd(self, path: str) -> int:
        if self._file is not None and self._file[0] == path:
            return self._file[1]
        self._close_file()
        dfd, name = self._parent(path)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError as exc:
            raise CorruptStream(
                f"write to {path!r}: no such file in qtree {self.qtree!r}",
                hint="the stream does not match the replica; it is rolled back",
            ) from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise HostilePath(
                    f"write to {path!r}: it is a symlink in qtree {self.qtree!r}; never followed"
                ) from exc
            if exc.errno == errno.EISDIR:
                raise CorruptStream(f"write to {path!r}: it is a directory") from exc
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CorruptStream(f"write to {path!r}: not a regular file")
        self._file = (path, fd)
        self._remember(path, st, stat.S_IMODE(st.st_mode))
        return fd

    def _remember(self, path: str, st: os.stat_result, mode: int) -> None:
        """Note the owner and permission bits of ``path``, just created or opened by this applier.
        Not with set-id bits (a write by a process without CAP_FSETID clears them)."""
        if mode & (stat.S_ISUID | stat.S_ISGID):
            self._known.pop(path, None)
            return
        if len(self._known) >= 200_000:
            self._known.clear()
        self._known[path] = (st.st_uid, st.st_gid, mode)

    def _setattr(self, rec: R.SetAttr) -> None:
        dfd, name = self._attr_target(rec.path)
        known = self._known.pop(rec.path, None)
        if known is not None:
            # created or written by this stream (nothing renamed or removed since): its owner
            # and mode are known without an lstat, and its times are always set (it was written)
            st = None
            uid, gid, imode, link = *known, False
        else:
            st = self._lstat(dfd, name)
            if st is None:
                raise CorruptStream(f"setattr {rec.path!r}: no such entry in qtree {self.qtree!r}")
            uid, gid, imode, link = st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), stat.S_ISLNK(st.st_mode)
        # what already holds is not set again (the same owner, mode, times): a chown
        # or chmod costs a metadata update each, and most SetAttr records only move mtime
        chowned = (rec.uid is not None and rec.uid != uid) or (rec.gid is not None and rec.gid != gid)
        if chowned:
            os.chown(
                name,
                -1 if rec.uid is None else rec.uid,
                -1 if rec.gid is None else rec.gid,
                dir_fd=dfd,
                follow_symlinks=False,
            )
        # chown clears the set-id bits, so after one the mode is always set again
        if rec.mode is not None and not link and (chowned or imode != rec.mode & 0o7777):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            try:
                os.fchmod(fd, rec.mode & 0o7777)
            finally:
                os.close(fd)
        if rec.mtime_ns is not None:
            if self._file is not None and self._file[0] == rec.path:
                self._close_file()
                st = None  # a FUSE file system may set the times at close
            if st is None or st.st_mtime_ns != rec.mtime_ns or st.st_atime_ns != rec.mtime_ns:
                os.utime(name, ns=(rec.mtime_ns, rec.mtime_ns), dir_fd=dfd, follow_symlinks=False)


class _Writer:
    """The writer thread of :meth:`Applier._apply_stream`: applies the records it is handed, in order."""

    def __init__(self, applier: Applier) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=_PIPE_DEPTH)
        self._failed: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(applier,), name=f"coalesce-apply-{applier.qtree}", daemon=True
        )
        self._thread.start()

    def _run(self, applier: Applier) -> None:
        while True:
            rec = self._queue.get()
            try:
                if rec is None:
                    return
                if self._failed is None:  # after a failure: drain, so that put() never blocks
                    applier._apply_one(rec)
            except BaseException as exc:  # noqa: BLE001 -- raised in the puller's thread
                self._failed = exc
            finally:
                self._queue.task_done()

    def busy(self) -> bool:
        """True while a record handed over is not applied yet (0 is read only once all are)."""
        return self._queue.unfinished_tasks > 0

    def put(self, rec: Any) -> None:
        if self._failed is not None:
            raise self._failed
        self._queue.put(rec)

    def drain(self) -> None:
        """Wait until every record handed over is applied; raise the writer's error."""
        self._queue.join()
        if self._failed is not None:
            raise self._failed

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def purgatory_name(seq: int, name: str) -> str:
    """The name under which the entry ``name`` waits in the purgatory: unique (the time and
    ``seq``), then the start of ``name`` for whoever looks, cut to keep the whole within a
    file name's 255 bytes whatever ``name`` holds (255 bytes of multi-byte UTF-8 included)."""
    raw = os.fsencode(name)[:PURGATORY_NAME_KEEP]
    if len(raw) == PURGATORY_NAME_KEEP:
        while raw and raw[-1] & 0xC0 == 0x80:  # do not cut a UTF-8 character in two
            raw = raw[:-1]
        if raw and raw[-1] & 0xC0 == 0xC0:
            raw = raw[:-1]
    return f"{time.time_ns():x}.{seq}." + os.fsdecode(raw)


#: bytes of an entry's own name kept in its purgatory name (the prefix takes at most 37)
PURGATORY_NAME_KEEP = 200

#: directories :func:`_remove_entry` keeps open at once, whatever the depth of the tree
_REMOVE_KEEP = 32


def _remove_entry(dfd: int, name: str, st: os.stat_result) -> None:
    """Remove entry ``name`` of the open directory ``dfd`` (a whole subtree for a directory),
    without following symlinks, iteratively (any depth) and with at most ``_REMOVE_KEEP``
    descriptors open: a directory whose descriptor was closed on the way down is reopened as
    ``..`` of its child on the way up, and must be the same directory (device and inode)."""
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dfd)
        return
    # one frame per directory being emptied: [fd or None, (st_dev, st_ino), name in its parent, names left]
    frames: list[list] = []

    def enter(parent_fd: int, child: str) -> None:
        fd = os.open(child, O_DIR, dir_fd=parent_fd)
        try:
            fst = os.fstat(fd)
            frames.append([fd, (fst.st_dev, fst.st_ino), child, iter(os.listdir(fd))])
        except BaseException:
            os.close(fd)
            raise
        if len(frames) > _REMOVE_KEEP and frames[-_REMOVE_KEEP - 1][0] is not None:
            os.close(frames[-_REMOVE_KEEP - 1][0])
            frames[-_REMOVE_KEEP - 1][0] = None

    try:
        enter(dfd, name)
        while frames:
            top = frames[-1]
            child = next(top[3], None)
            if child is not None:
                cst = os.lstat(child, dir_fd=top[0])
                if stat.S_ISDIR(cst.st_mode):
                    enter(top[0], child)
                else:
                    os.unlink(child, dir_fd=top[0])
                continue
            frames.pop()
            try:
                if frames and frames[-1][0] is None:
                    pfd = os.open("..", O_DIR, dir_fd=top[0])
                    pst = os.fstat(pfd)
                    frames[-1][0] = pfd
                    if (pst.st_dev, pst.st_ino) != frames[-1][1]:
                        raise OSError(errno.ESTALE, f"the tree under {name!r} moved while it was removed")
            finally:
                os.close(top[0])
            os.rmdir(top[2], dir_fd=frames[-1][0] if frames else dfd)
    finally:
        for frame in frames:
            if frame[0] is not None:
                os.close(frame[0])


def rmtree(path: str) -> bool:
    """Remove ``path`` recursively (any depth) without following symlinks; False if it was absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    parent, name = os.path.split(os.path.normpath(path))
    pfd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # as lstat: only the last is not followed
    try:
        _remove_entry(pfd, name, st)
    finally:
        os.close(pfd)
    return True
