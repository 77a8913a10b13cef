"""Descriptions of qtree paths for verification (the ``coalesce_describe`` hook; coalesce_core.verify).

A path is resolved from the qtree's root inode through directory entries,
one component at a time (a symlink is never followed; a missing component or
a non-directory on the way makes the path absent).  A regular file's content
digest is fed its data blocks only, so holes cost nothing; its identity is
its inode number.  A sim volume keeps permission bits, owners, nanosecond
mtimes and xattrs of every inode (:data:`HOLDS`).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence, TypedDict

from coalesce_core.stream.fingerprint import content_digest_of_pieces, part_digest_of_pieces
from coalesce_core.stream.records import check_path_or_root
from coalesce_core.verify import Description, Holds, parent_of, xattr_fields

from .fs import BS, DIR, LNK, REG, Inode, SimFS, View, fsname, nblocks
from .ops import check_qtree_name

HOLDS = Holds(owners=True, xattrs=True, mtime_ns=1)
_KIND = {DIR: "d", REG: "f", LNK: "l"}


class _Common(TypedDict):
    """The Description fields every kind of inode has."""

    uid: int
    gid: int
    mtime_ns: int


def _content(fs: SimFS, rec) -> str:
    limit = nblocks(rec.size)
    pieces = ((f * BS, fs.read(vbn)) for f, vbn in fs.leaves(rec.top, rec.height) if f < limit)
    return content_digest_of_pieces(rec.size, pieces)


def _part(fs: SimFS, rec, ranges: Sequence[tuple[int, int]]) -> str:
    """The part digest of ``rec`` over ``ranges``: only the blocks inside them are looked up and read."""
    size = rec.size

    def pieces() -> Iterator[tuple[int, memoryview]]:
        for start, end in ranges:
            end = min(end, size)
            for f in range(start // BS, -(-end // BS)):
                vbn = fs.get_ptr(rec.top, rec.height, f)
                if vbn:
                    lo, hi = max(start, f * BS), min(end, (f + 1) * BS)
                    yield lo, memoryview(fs.read(vbn))[lo - f * BS : hi - f * BS]

    return part_digest_of_pieces(size, ranges, pieces())


def _describe(
    fs: SimFS, view: View, path: str, ino: int | None, content: bool, ranges: Sequence[tuple[int, int]] | None = None
) -> Description:
    rec = view.inode(ino) if ino else None
    if rec is None or rec.kind not in _KIND:
        return Description.absent(path)
    common = _Common(uid=rec.uid, gid=rec.gid, mtime_ns=rec.mtime)
    if rec.kind == DIR:
        entries = []
        for name, child in sorted(view.dir(rec).items(), key=lambda kv: fsname(kv[0])):
            crec = view.inode(child)
            if crec is not None and crec.kind in _KIND:
                entries.append((name, _KIND[crec.kind]))
        return Description(
            path=path,
            kind="d",
            mode=rec.mode & 0o7777,
            **xattr_fields(view.xattrs(rec)),
            entries=tuple(entries),
            **common,
        )
    if rec.kind == LNK:
        return Description(path=path, kind="l", target=view.data(rec).decode("utf-8", "surrogateescape"), **common)
    return Description(
        path=path,
        kind="f",
        mode=rec.mode & 0o7777,
        size=rec.size,
        **xattr_fields(view.xattrs(rec)),
        content=_content(fs, rec) if content and ranges is None else None,
        ident=ino,
        nlink=rec.nlink,
        part=_part(fs, rec, ranges) if content and ranges is not None else None,
        **common,
    )


#: inode records a describe call keeps (_Memo): the entries of a batch of large directories
#: would otherwise hold one record per entry
MEMO_INODES = 4096


class _Memo(View):
    """A view whose inode records are each read once per describe call (the image does not change
    under the lock): a path's parent, the file itself and a directory's entries read the same ones,
    up to MEMO_INODES records (then the memo starts again)."""

    def __init__(self, view: View) -> None:
        super().__init__(view.fs, view.root)
        self.recs: dict[int, Inode | None] = {}

    def inode(self, ino: int) -> Inode | None:
        try:
            return self.recs[ino]
        except KeyError:
            if len(self.recs) >= MEMO_INODES:
                self.recs.clear()
            rec = self.recs[ino] = super().inode(ino)
            return rec


def describe(
    fs: SimFS,
    qtree: str,
    snapshot: str | None,
    paths: Sequence[tuple[str, bool]],
    ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None,
) -> list[Description]:
    """One Description per ``(path, content)`` of ``qtree`` in ``snapshot`` (None: the active FS),
    the paths in ``ranges`` with their part digests over those ranges (the hookspec).
    The caller holds ``fs.lock``."""
    check_qtree_name(qtree)
    for p, _c in paths:
        check_path_or_root(p)
    view = _Memo(fs.view(snapshot))
    q = view.qtree_root(qtree)
    resolved: dict[str, int | None] = {"": q}

    def resolve(path: str) -> int | None:
        if path in resolved:
            return resolved[path]
        todo = []
        p = path
        while p not in resolved:
            todo.append(p)
            p = parent_of(p)
        ino = resolved[p]
        for p in reversed(todo):
            rec = view.inode(ino) if ino else None
            ino = view.dir(rec).get(p.rpartition("/")[2]) if rec is not None and rec.kind == DIR else None
            resolved[p] = ino
        if len(resolved) > 4096:  # a bound on the memo: keep only the qtree root
            resolved.clear()
            resolved[""] = q
            resolved[path] = ino
        return ino

    got = ranges or {}
    return [_describe(fs, view, p, resolve(p), c, got.get(p)) for p, c in paths]
