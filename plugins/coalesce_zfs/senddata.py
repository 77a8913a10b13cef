"""The data of a zfs diff taken from ``zfs send -i base target`` instead of read through the images.

On zfs-fuse every read of a PCPI is a FUSE request to the one daemon: the
tree compare reads a rewritten file twice (its base copy and its target
copy) at about 4 s of daemon CPU per GiB each, while ``zfs send -i`` reads
the changed blocks inside the daemon (about 1-2 s per GiB with the pipe)
and names exactly the blocks that changed (docs/benchmarks-journal.md, "Profiled: coalesce on zfs-fuse against `zfs send -i | zfs receive`").
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

An object number is not an identity on its own: ZFS gives a freed number to
a later object, and the walk then finds "the same inode" at a name whose
base copy is another object's.  The stream's OBJECT record carries the
object's generation (``zp_gen``, the txg that created it): a changed file
whose object was born after the base PCPI (``base_txg``) is *reborn*, and
every range of it that no WRITE covered is compared with the base copy, so
nothing of the old object's bytes is trusted to be the new one's (the
stream sends a new object's blocks in full, so this normally reads only its
holes).

One stream for many qtrees: ``zfs send -i`` covers the whole dataset, so a
diff of each changed qtree that ran its own send would make the daemon read
every qtree's changed blocks once per qtree.  While a SendData reads a
stream to its end it records, for every object, the ranges the stream wrote
and freed and the object's generation (a :class:`BlockMap`, no data), and
publishes it in the volume's :class:`BlockMaps` under the two snapshots' GUIDs.  A later diff between the
same two snapshots that finds the map takes the same records from it, with
the data of its own files read from the target image (changed blocks only,
never the base copy), unless its files hold so large a share of the
stream's data that its own send is cheaper (``READ_COST``).

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
import threading
from collections import OrderedDict
from typing import Iterator

from coalesce_core.errors import BackendError, CorruptStream, StreamError
from coalesce_core.stream.records import MAX_DATA, HardLink, MkFile, Truncate, Write
from coalesce_posix import walk
from coalesce_posix.run import StreamingCommand

from . import sendstream as S

_log = logging.getLogger("coalesce.zfs")


class _File:
    """One registered name of a changed regular file, and what the stream has covered of it."""

    __slots__ = (
        "dest",
        "rel",
        "new",
        "bsize",
        "tsize",
        "mode",
        "links",
        "started",
        "finished",
        "written",
        "holes",
        "end",
        "reborn",
    )

    def __init__(self, dest: str, rel: str, new: bool, bsize: int, tsize: int, mode: int) -> None:
        self.dest = dest  # its path in the change stream
        self.rel = rel  # its path in the target image, relative to the image's qtree
        self.new = new  # created at this name (else: the same inode at the same name in the base)
        self.bsize = bsize  # size of the copy being changed (0 for a new file)
        self.tsize = tsize
        self.mode = mode
        self.links: list[str] = []  # further names of a new file (HardLink records after its data)
        self.started = False  # its MkFile (new) or Truncate (changed size) went out
        self.finished = False  # a new file's gaps, size, xattrs and further names went out
        self.written: list[list[int]] = []  # merged [start, end) ranges of WRITE data
        self.holes: list[tuple[int, int]] = []  # [start, end) ranges the stream FREEs, not yet handled
        self.end = 0  # the size the records so far give a new file
        self.reborn = False  # not new here, but its object was born after the base PCPI


class BlockMap:
    """The ranges one ``zfs send -i`` stream wrote and freed, per object, without the data.

    ``writes``: object -> merged [start, end) ranges of WRITE records (as the
    stream sent them: whole blocks); ``frees``: object -> (offset, length) of
    FREE records; ``types``: the objects whose WRITEs were not a plain file's
    data; ``gens``: object -> generation of its OBJECT record (files and
    directories); ``data_bytes``: the stream's WRITE data in all.  Past ``limit``
    ranges the map stops growing and drops what it has (``overflow``): it is
    not kept."""

    __slots__ = ("writes", "frees", "types", "gens", "data_bytes", "ranges", "limit", "overflow")

    def __init__(self, limit: int = 1_000_000) -> None:
        self.writes: dict[int, list[list[int]]] = {}
        self.frees: dict[int, list[tuple[int, int]]] = {}
        self.types: dict[int, int] = {}
        self.gens: dict[int, int] = {}
        self.data_bytes = 0
        self.ranges = 0
        self.limit = limit
        self.overflow = False

    def add(self, rec: S.Record) -> None:
        if self.overflow:
            return
        if self.ranges >= self.limit:
            self.overflow = True
            self.writes, self.frees, self.types, self.gens = {}, {}, {}, {}
            return
        if type(rec) is S.Write:
            n = len(rec.data)
            self.data_bytes += n
            if rec.type != S.DMU_OT_PLAIN_FILE_CONTENTS:
                self.types[rec.object] = rec.type
            w = self.writes.get(rec.object)
            if w is not None and w[-1][1] == rec.offset:
                w[-1][1] = rec.offset + n
                return
            self.writes.setdefault(rec.object, []).append([rec.offset, rec.offset + n])
        elif type(rec) is S.Free:
            self.frees.setdefault(rec.object, []).append((rec.offset, rec.length))
        elif type(rec) is S.Object and rec.gen is not None:
            self.gens[rec.object] = rec.gen
        else:
            return
        self.ranges += 1

    def bytes_of(self, objects) -> int:
        """WRITE data of ``objects`` in the stream."""
        return sum(e - s for o in objects for s, e in self.writes.get(o, ()))


class BlockMaps:
    """The block maps of the last ``size`` streams read to their end, keyed by (dataset, base GUID,
    target GUID): a snapshot destroyed and taken again under its name has another GUID."""

    MAX_RANGES = 1_000_000  # a stream with more ranges is not kept (about 100 MB of lists)

    def new_map(self) -> BlockMap:
        return BlockMap(self.MAX_RANGES)

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._maps: OrderedDict[tuple, BlockMap] = OrderedDict()
        self.published = 0  # how many maps were kept (tests)

    def get(self, key: tuple) -> BlockMap | None:
        with self._lock:
            m = self._maps.get(key)
            if m is not None:
                self._maps.move_to_end(key)
            return m

    def put(self, key: tuple, m: BlockMap) -> None:
        with self._lock:
            self._maps[key] = m
            self._maps.move_to_end(key)
            self.published += 1
            while len(self._maps) > self.size:
                self._maps.popitem(last=False)


class SendData(walk.FileData):
    """:class:`walk.FileData` with the data from a ``zfs send -i`` stream (module docstring).

    ``argv`` runs ``zfs send -i DS@BASE DS@TARGET`` (its BEGIN record must
    name ``toname``, ``DS@TARGET``); ``base`` and ``target`` are the qtree's
    directories in the two images; ``base_txg``, the base PCPI's createtxg,
    tells a reborn object (module docstring).  With ``maps`` and ``key``
    (dataset, base GUID, target GUID), the stream's block map is shared with the other
    qtrees' diffs (module docstring) and BEGIN must name those GUIDs.
    ``stats`` counts what came from where (``shared``: from another diff's
    block map, no send)."""

    #: a byte read from an image through FUSE costs the daemon about this many times a byte of
    #: `zfs send` (4.2 s against 1.1-1.8 s per GiB on zfs-fuse, docs/benchmarks-journal.md, "Profiled: coalesce on zfs-fuse against `zfs send -i | zfs receive`")
    READ_COST = 3.0

    def __init__(
        self,
        argv: list[str],
        toname: str,
        base: str,
        target: str,
        maps: BlockMaps | None = None,
        key: tuple | None = None,
        base_txg: int | None = None,
    ) -> None:
        self.argv = argv
        self.base_txg = base_txg
        self.toname = toname
        self.base = base
        self.target = target
        self.maps = maps if key is not None else None
        self.key = key
        self.files: dict[int, list[_File]] = {}  # object number -> its registered names
        self.by_dest: dict[str, _File] = {}  # new files by path, for HardLink
        self.stats = {"files": 0, "objects": 0, "stream_bytes": 0, "read_bytes": 0, "fallback": 0, "shared": 0}

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
        yield from walk.xattr_records(
            rel, walk.read_xattrs(os.path.join(base, rel)), walk.read_xattrs(os.path.join(target, rel))
        )

    # -- the stream ----------------------------------------------------------------------------
    def finish(self) -> Iterator[object]:
        if not self.files:
            return
        shared = None
        if self.maps is not None:
            assert self.key is not None  # __init__ keeps maps only with a key
            shared = self.maps.get(self.key)
        if shared is not None and shared.data_bytes >= self.READ_COST * shared.bytes_of(self.files):
            self.stats["shared"] = 1
            yield from self._from_stream(self._from_map(shared), from_map=True)
            yield from self._tail()
            return
        begun = False
        block_map = self.maps.new_map() if self.maps is not None else None
        try:
            with StreamingCommand(self.argv, hint="the update fails and is retried next cycle") as send:
                records = S.records(send.stdout)
                begin = next(records)
                begun = True
                assert isinstance(begin, S.Begin)  # S.records yields BEGIN first or raises
                if not begin.incremental or begin.toname != self.toname:
                    raise CorruptStream(
                        f"`{' '.join(self.argv)}` sent {begin.toname!r} "
                        f"({'incremental' if begin.incremental else 'full'}), not an incremental "
                        f"stream of {self.toname!r}"
                    )
                if self.key is not None and (begin.fromguid, begin.toguid) != tuple(self.key[1:]):
                    raise CorruptStream(
                        f"`{' '.join(self.argv)}` sent a stream between snapshots of GUIDs "
                        f"{begin.fromguid:#x} and {begin.toguid:#x}, not {self.key[1]:#x} and "
                        f"{self.key[2]:#x}",
                        hint="a snapshot was destroyed and taken again during the diff; the update is retried",
                    )
                yield from self._from_stream(records, block_map)
        except StreamError as exc:
            if begun:
                raise
            # nothing of the stream was used: StreamingCommand added zfs's exit status and message
            _log.warning(
                "zfs send gave no stream to use (%s); reading the changed files from the images instead", exc.message
            )
            self.stats["fallback"] = 1
            yield from self._all_from_images()
            return
        # the stream was read to its END and `zfs send` exited 0
        if block_map is not None and not block_map.overflow:
            assert self.maps is not None and self.key is not None
            self.maps.put(self.key, block_map)
        yield from self._tail()

    def _tail(self) -> Iterator[object]:
        """After the last record: the files the stream had no data of, and what is left of the others."""
        for entries in self.files.values():
            for f in entries:
                if not f.started:
                    yield from self._start(f)
                yield from self._rest(f)

    def _from_map(self, m: BlockMap) -> Iterator[S.Record]:
        """The records of the registered objects that the stream of ``m`` had, in object order, with
        the WRITE data read from the target image (up to MAX_DATA per record)."""
        for obj in sorted(self.files):
            if obj in m.gens:
                yield S.Object(object=obj, type=S.DMU_OT_PLAIN_FILE_CONTENTS, blksz=0, gen=m.gens[obj])
            for off, length in m.frees.get(obj, ()):
                yield S.Free(object=obj, offset=off, length=length)
            ranges = m.writes.get(obj)
            if not ranges:
                continue
            if obj in m.types:
                yield S.Write(object=obj, type=m.types[obj], offset=0, data=b"")
                continue
            entries = self.files[obj]
            tsize = max(f.tsize for f in entries)
            tpath = os.path.join(self.target, entries[0].rel)
            fd = walk.open_path(tpath)
            try:
                for start, end in ranges:
                    pos, end = start, min(end, tsize)
                    while pos < end:
                        data = os.pread(fd, min(MAX_DATA, end - pos), pos)
                        if not data:
                            raise BackendError(
                                f"{tpath} ends at {pos}, before the size {tsize} its PCPI image gave it",
                                hint="the image changed under the diff; the update fails and is retried",
                            )
                        self.stats["read_bytes"] += len(data)
                        yield S.Write(object=obj, type=S.DMU_OT_PLAIN_FILE_CONTENTS, offset=pos, data=data)
                        pos += len(data)
            finally:
                os.close(fd)

    def _from_stream(
        self, records: Iterator[S.Record], block_map: BlockMap | None = None, from_map: bool = False
    ) -> Iterator[object]:
        cur: list[_File] = []  # the registered names of the object being written
        cur_obj = -1
        run_off, run_len = 0, 0  # contiguous WRITE data not yet yielded
        run_parts: list[bytes] = []
        for rec in records:
            if block_map is not None:
                block_map.add(rec)
            if type(rec) is S.Write:
                if not from_map:
                    self.stats["stream_bytes"] += len(rec.data)
                entries = self.files.get(rec.object)
                if entries is None:
                    continue
                if rec.type != S.DMU_OT_PLAIN_FILE_CONTENTS:
                    raise CorruptStream(
                        f"zfs send: object {rec.object}, the inode number of "
                        f"{entries[0].rel!r}, is not a file's data (type {rec.type})",
                        hint="set COALESCE_ZFS_DIFF=walk to compare the images instead",
                    )
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
                data = rec.data if rec.offset + len(rec.data) <= tsize else rec.data[: tsize - rec.offset]
                if run_parts and (rec.offset != run_off + run_len or run_len + len(data) > MAX_DATA):
                    yield from self._flush(cur, run_off, run_parts)
                    run_parts, run_len = [], 0
                if not run_parts:
                    run_off = rec.offset
                run_parts.append(data)
                run_len += len(data)
            elif type(rec) is S.Free:
                for f in self.files.get(rec.object, ()):
                    end = f.tsize if rec.length == S.TO_END else min(f.tsize, rec.offset + rec.length)
                    if rec.offset < end:
                        f.holes.append((rec.offset, end))
            elif (
                type(rec) is S.Object and rec.gen is not None and self.base_txg is not None and rec.gen > self.base_txg
            ):
                for f in self.files.get(rec.object, ()):
                    f.reborn = not f.new
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
            if not f.new:
                yield Write(path=f.dest, offset=off, data=piece)
                f.end = max(f.end, off + n)
            else:  # a new file's zero blocks stay holes, as in the tree compare
                for at, part in walk.nonzero_pieces(off, piece):
                    yield Write(path=f.dest, offset=at, data=part)
                    f.end = max(f.end, at + len(part))
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
        size, xattrs and further names, once; a changed file's FREEd ranges (a reborn one's ranges that
        no WRITE covered), compared with its base copy."""
        tpath = os.path.join(self.target, f.rel)
        if f.new and not f.finished:
            f.finished = True
            gaps = _gaps([(s, e) for s, e in f.written] + f.holes, f.tsize)
            if gaps:
                fd = walk.open_path(tpath)
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
        elif not f.new and (f.holes or f.reborn):
            ranges = _gaps([(s, e) for s, e in f.written], f.tsize) if f.reborn else _merge(sorted(f.holes))
            f.reborn = False
            bfd = walk.open_path(os.path.join(self.base, f.rel))
            try:
                tfd = walk.open_path(tpath)
                try:
                    for rec in walk.update_records(bfd, tfd, f.dest, f.bsize, f.tsize, ranges):
                        if isinstance(rec, Write):
                            self.stats["read_bytes"] += len(rec.data)
                        yield rec
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
                    st = walk.lstat_or_none(tpath)
                    assert st is not None  # the walk found f.rel in the target image, a read-only PCPI
                    yield from walk.file_create_records(self.target, f.rel, st, f.dest)
                    for name in f.links:
                        yield HardLink(path=name, existing=f.dest)
                else:
                    yield from walk.file_update_records(os.path.join(self.base, f.rel), tpath, f.dest, f.bsize, f.tsize)


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
