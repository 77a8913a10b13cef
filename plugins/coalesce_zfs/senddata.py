"""The data of a zfs diff taken from ``zfs send -i base target`` instead of read through the images.

On zfs-fuse every read of a PCPI is a FUSE request to the one daemon: the
tree compare reads a rewritten file twice (its base copy and its target
copy) at about 4 s of daemon CPU per GiB each, while ``zfs send -i`` reads
the changed blocks inside the daemon (about 1-2 s per GiB with the pipe)
and names exactly the blocks that changed (docs/benchmarks.md, issue 9).
So the tree compare still walks both images for the namespace (names,
kinds, inode numbers, sizes, modes, owners, times, xattrs), but the data
of the files it finds changed come from the stream:

* :meth:`SendData.created` and :meth:`SendData.updated` register a file by
  its inode number, which on ZFS is its object number (zfs-fuse and OpenZFS
  both report ``st_ino = z_id``), and hold its records back;
* :meth:`SendData.finish` runs ``zfs send -i`` and, object by object as the
  stream reaches them, yields a new file's MkFile, the WRITE blocks of the
  registered files (clipped to the file's size, contiguous blocks joined up
  to one Write of MAX_DATA), then what the stream did not cover.

Why that is exact: applying an incremental stream to the base snapshot
gives the target, so a byte of an object that no WRITE or FREE names is the
same in both snapshots.  For a file that was at the same name with the same
inode in the base image, the copy being changed is that base copy: the
stream's WRITEs, a Truncate to the new size, and the ranges the stream FREEs
(holes in the target) compared against the base copy give the target.  A
file new at its name starts empty: its WRITEs, then every range neither
WRITE nor FREE covered is read from the target image (a file moved from
another name or qtree has no blocks in the stream and is read whole, as the
tree compare would).  Records go out in the stream's object order, so each
file is opened once by the applier; names and attributes keep the tree
compare's order (removals first, SetAttr last).

If ``zfs send`` writes no stream, or one of a format the reader does not
know (coalesce_zfs.sendstream), nothing of it has been used yet: every
registered file is read from the images as the tree compare does, with a
warning.  A failure after the BEGIN record raises (StreamError, or
BackendError with zfs's message) and the update takes the rollback path.
``COALESCE_ZFS_DIFF=walk`` turns the stream off (the zfs backend's docstring).
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

from coalesce_core.errors import CorruptStream, StreamError
from coalesce_core.records import MAX_DATA, HardLink, MkFile, Truncate, Write
from coalesce_posix import walk
from coalesce_posix.run import StreamingCommand

from . import sendstream as S

_log = logging.getLogger("coalesce.zfs")


class _File:
    """One registered name of a changed regular file, and what the stream has covered of it."""

    __slots__ = ("dest", "rel", "new", "bsize", "tsize", "mode", "links", "started", "finished", "written",
                 "holes", "end")

    def __init__(self, dest: str, rel: str, new: bool, bsize: int, tsize: int, mode: int) -> None:
        self.dest = dest            # its path in the change stream
        self.rel = rel              # its path in the target image, relative to the image's qtree
        self.new = new              # created at this name (else: the same inode at the same name in the base)
        self.bsize = bsize          # size of the copy being changed (0 for a new file)
        self.tsize = tsize
        self.mode = mode
        self.links: list[str] = []  # further names of a new file (HardLink records after its data)
        self.started = False        # its MkFile (new) or Truncate (changed size) went out
        self.finished = False       # a new file's gaps, size, xattrs and further names went out
        self.written: list[list[int]] = []      # merged [start, end) ranges of WRITE data
        self.holes: list[tuple[int, int]] = []  # [start, end) ranges the stream FREEs, not yet handled
        self.end = 0                # the size the records so far give a new file


class SendData(walk.FileData):
    """:class:`walk.FileData` with the data from a ``zfs send -i`` stream (module docstring).

    ``argv`` runs ``zfs send -i DS@BASE DS@TARGET`` (its BEGIN record must
    name ``toname``, ``DS@TARGET``); ``base`` and ``target`` are the qtree's
    directories in the two images.  ``stats`` counts what came from where."""

    def __init__(self, argv: list[str], toname: str, base: str, target: str) -> None:
        self.argv = argv
        self.toname = toname
        self.base = base
        self.target = target
        self.files: dict[int, list[_File]] = {}     # object number -> its registered names
        self.by_dest: dict[str, _File] = {}         # new files by path, for HardLink
        self.stats = {"files": 0, "objects": 0, "stream_bytes": 0, "read_bytes": 0, "fallback": 0}

    # -- the walk registers ------------------------------------------------------------------
    def _register(self, ino: int, f: _File) -> None:
        self.files.setdefault(ino, []).append(f)
        self.stats["files"] += 1

    def created(self, root: str, rel: str, dest: str, st: os.stat_result) -> Iterator[object]:
        f = _File(dest, rel, True, 0, st.st_size, st.st_mode & 0o7777)
        self._register(st.st_ino, f)
        self.by_dest[dest] = f
        return iter(())

    def linked(self, dest: str, existing: str) -> Iterator[object]:
        f = self.by_dest.get(existing)
        if f is None:
            yield HardLink(path=dest, existing=existing)
        else:
            f.links.append(dest)

    def updated(self, base: str, target: str, rel: str, b: os.stat_result, t: os.stat_result) -> Iterator[object]:
        # every name, as the tree compare does: the names of one inode here need not be one file there
        self._register(t.st_ino, _File(rel, rel, False, b.st_size, t.st_size, t.st_mode & 0o7777))
        yield from walk.xattr_records(rel, walk.read_xattrs(os.path.join(base, rel)),
                                      walk.read_xattrs(os.path.join(target, rel)))

    # -- the stream ----------------------------------------------------------------------------
    def finish(self) -> Iterator[object]:
        if not self.files:
            return
        begun = False
        try:
            with StreamingCommand(self.argv, hint="the update fails and is retried next cycle") as send:
                records = S.records(send.stdout)
                begin = next(records)
                begun = True
                if not begin.incremental or begin.toname != self.toname:
                    raise CorruptStream(f"`{' '.join(self.argv)}` sent {begin.toname!r} "
                                        f"({'incremental' if begin.incremental else 'full'}), not an incremental "
                                        f"stream of {self.toname!r}")
                yield from self._from_stream(records)
        except StreamError as exc:
            if begun:
                raise
            # nothing of the stream was used: StreamingCommand added zfs's exit status and message
            _log.warning("zfs send gave no stream to use (%s); reading the changed files from the images instead",
                         exc.message)
            self.stats["fallback"] = 1
            yield from self._all_from_images()
            return
        # the stream was read to its END and `zfs send` exited 0
        for entries in self.files.values():
            for f in entries:
                if not f.started:
                    yield from self._start(f)
                yield from self._rest(f)

    def _from_stream(self, records: Iterator[S.Record]) -> Iterator[object]:
        cur: list[_File] = []            # the registered names of the object being written
        cur_obj = -1
        run_off, run_parts, run_len = 0, [], 0   # contiguous WRITE data not yet yielded
        for rec in records:
            t = type(rec)
            if t is S.Write:
                self.stats["stream_bytes"] += len(rec.data)
                entries = self.files.get(rec.object)
                if entries is None:
                    continue
                if rec.type != S.DMU_OT_PLAIN_FILE_CONTENTS:
                    raise CorruptStream(f"zfs send: object {rec.object}, the inode number of "
                                        f"{entries[0].rel!r}, is not a file's data (type {rec.type})",
                                        hint="set COALESCE_ZFS_DIFF=walk to compare the images instead")
                if rec.object != cur_obj:
                    yield from self._flush(cur, run_off, run_parts)
                    for f in cur:
                        yield from self._rest(f)
                    run_parts, run_len = [], 0
                    cur, cur_obj = entries, rec.object
                    self.stats["objects"] += 1
                    for f in cur:
                        if not f.started:
                            yield from self._start(f)
                tsize = max(f.tsize for f in cur)
                if rec.offset >= tsize:
                    continue
                data = rec.data if rec.offset + len(rec.data) <= tsize else rec.data[:tsize - rec.offset]
                if run_parts and (rec.offset != run_off + run_len or run_len + len(data) > MAX_DATA):
                    yield from self._flush(cur, run_off, run_parts)
                    run_parts, run_len = [], 0
                if not run_parts:
                    run_off = rec.offset
                run_parts.append(data)
                run_len += len(data)
            elif t is S.Free:
                for f in self.files.get(rec.object, ()):
                    end = f.tsize if rec.length == S.TO_END else min(f.tsize, rec.offset + rec.length)
                    if rec.offset < end:
                        f.holes.append((rec.offset, end))
        yield from self._flush(cur, run_off, run_parts)
        for f in cur:
            yield from self._rest(f)

    @staticmethod
    def _flush(entries: list[_File], off: int, parts: list[bytes]) -> Iterator[object]:
        if not parts:
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        for f in entries:
            n = min(len(data), f.tsize - off)
            if n <= 0:
                continue
            piece = data if n == len(data) else data[:n]
            if not (f.new and piece.count(0) == n):     # a new file's zeros stay a hole, as in the tree compare
                yield Write(path=f.dest, offset=off, data=piece)
                f.end = max(f.end, off + n)
            w = f.written
            if w and w[-1][1] == off:
                w[-1][1] = off + n
            else:
                w.append([off, off + n])

    # -- per file --------------------------------------------------------------------------------
    @staticmethod
    def _start(f: _File) -> Iterator[object]:
        f.started = True
        if f.new:
            yield MkFile(path=f.dest, mode=f.mode)
        elif f.bsize != f.tsize:
            yield Truncate(path=f.dest, size=f.tsize)

    def _rest(self, f: _File) -> Iterator[object]:
        """What the stream's data of ``f`` leave to do: a new file's gaps (read from the target image),
        size, xattrs and further names, once; a changed file's FREEd ranges, compared with its base copy."""
        tpath = os.path.join(self.target, f.rel)
        if f.new and not f.finished:
            f.finished = True
            gaps = _gaps([(s, e) for s, e in f.written] + f.holes, f.tsize)
            if gaps:
                fd = os.open(tpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    for start, end in gaps:
                        for w in walk.write_records(f.dest, fd, start, end, skip_zero=True):
                            self.stats["read_bytes"] += len(w.data)
                            f.end = max(f.end, w.offset + len(w.data))
                            yield w
                finally:
                    os.close(fd)
            if f.end != f.tsize:
                yield Truncate(path=f.dest, size=f.tsize)
            yield from walk.xattr_records(f.dest, {}, walk.read_xattrs(tpath))
            for name in f.links:
                yield HardLink(path=name, existing=f.dest)
        elif not f.new and f.holes:
            bfd = os.open(os.path.join(self.base, f.rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                tfd = os.open(tpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    for start, end in _merge(sorted(f.holes)):
                        for w in walk.compare_range(bfd, tfd, f.dest, f.bsize, start, end):
                            self.stats["read_bytes"] += len(w.data)
                            yield w
                finally:
                    os.close(tfd)
            finally:
                os.close(bfd)
        f.holes = []

    def _all_from_images(self) -> Iterator[object]:
        """Every registered file as the tree compare makes it (the stream could not be used)."""
        for entries in self.files.values():
            for f in entries:
                f.started = f.finished = True
                tpath = os.path.join(self.target, f.rel)
                if f.new:
                    yield from walk.file_create_records(self.target, f.rel, os.lstat(tpath), f.dest)
                    for name in f.links:
                        yield HardLink(path=name, existing=f.dest)
                else:
                    yield from walk.file_update_records(os.path.join(self.base, f.rel), tpath, f.dest,
                                                        f.bsize, f.tsize)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with the overlapping and touching ones joined."""
    out: list[list[int]] = []
    for s, e in ranges:
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _gaps(covered: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The parts of ``[0, size)`` that the ``covered`` ranges leave out."""
    out, pos = [], 0
    for s, e in _merge(sorted(covered)):
        if s >= size:
            break
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
    if pos < size:
        out.append((pos, size))
    return out
