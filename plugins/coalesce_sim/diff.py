"""Diff of one qtree between two PCPIs, and the canonical fingerprint.

The diff walks the two inode files in parallel and skips every subtree whose
block pointer is equal on both sides (:func:`.ops.changed_inodes`); the inodes
that differ and carry the qtree's id (a field test, no path walk) are the
change.  The walk is done once per pair of images and indexed by qtree id
(:func:`.ops.change_index`), so the diffs of many qtrees between the same two
PCPIs cost their own change each, not the whole volume's.  For those it
compares directory entries and file buffer trees (again skipping equal
pointers), so the cost follows the change, not the qtree.

Records come out in the order contract of coalesce_core.stream.records:

1. removals (entries of kept directories that vanished or now name another
   inode), each removed subtree depth-first; then the renames;
2. additions (entries that appeared), each created subtree top-down with its
   content; a hard-linked file already present or created earlier becomes a
   ``HardLink``;
3. content and attribute changes of kept files and symlinks;
4. attribute changes of kept directories, deepest first (after their contents).

A move is one ``Rename`` (between removals and additions) when both parent
directories stay where they were and no other move involves either name;
other moves fall back to removal + creation (always correct; docs/sim.md).
"""

from __future__ import annotations

from typing import Container, Iterator, Sequence

from coalesce_core.stream import fingerprint as FP
from coalesce_core.stream import records as R

from .fs import BS, DIR, LNK, REG, ZERO, Inode, SimFS, View, nblocks
from .ops import changed_inodes_of, pair_walk
from .spill import SortedRows, path_key

CHUNK_BLOCKS = R.MAX_DATA // BS


#: a Namespace forgets its memos past this many paths or directory entries (bounded memory)
MEMO_LIMIT = 65536


class Namespace:
    """Path lookups of one qtree in one image, by primary-parent pointers (memoised, at most
    MEMO_LIMIT paths and as many directory entries: then the memos start again)."""

    def __init__(self, view: View, q: int | None) -> None:
        self.v = view
        self.q = q
        self.paths: dict[int, str | None] = {}
        self.rev: dict[int, dict[int, str]] = {}
        self.rev_entries = 0
        #: the window of one directory past MEMO_LIMIT entries (_name_in_large): (directory, lowest
        #: and highest inode number it answers for, inode -> name)
        self.window: tuple[int, int, int, dict[int, bytes]] | None = None

    def inode(self, ino: int) -> Inode | None:
        rec = self.v.inode(ino)
        return rec if rec is not None and self.q is not None and rec.qtree == self.q else None

    def name_in(self, dino: int, ino: int) -> str | None:
        """The name of ``ino`` in directory ``dino`` (the smallest, for a hard-linked file), None if
        it has none.  A directory of at most MEMO_LIMIT entries is memoised whole; a larger one by
        :meth:`_name_in_large`, a window at a time."""
        r = self.rev.get(dino)
        if r is None:
            drec = self.v.inode(dino)
            if drec is None or drec.kind != DIR:
                return None
            if drec.size // 7 > MEMO_LIMIT:  # an entry takes at least 7 bytes: maybe past MEMO_LIMIT
                return self._name_in_large(dino, drec, ino)
            r = {}
            for n, i in sorted(self.v.dir(drec).items(), reverse=True):
                r[i] = n
            self.rev[dino] = r
            self.rev_entries += len(r)
        return r.get(ino)

    def _name_in_large(self, dino: int, drec: Inode, ino: int) -> str | None:
        """:meth:`name_in` in a directory that may hold more than MEMO_LIMIT entries: one scan of its
        blocks keeps the names of the MEMO_LIMIT smallest inode numbers at or above ``ino`` (the
        window, one per Namespace).  The diff looks changed inodes up in inode order, so one scan
        answers up to MEMO_LIMIT lookups (before, each lookup past the memo decoded the directory
        whole again: quadratic)."""
        w = self.window
        if w is not None and w[0] == dino and w[1] <= ino <= w[2]:
            name = w[3].get(ino)
            return None if name is None else name.decode("utf-8", "surrogateescape")
        found: dict[int, bytes] = {}
        cap = -1  # past a cut: the largest inode number the window still holds
        for name, i in self.v.dir_entries(drec):
            if i < ino or (cap >= 0 and i > cap) or i in found:
                continue  # in name order: the first name of an inode is its smallest
            found[i] = name
            if len(found) >= 2 * MEMO_LIMIT:
                found = dict(sorted(found.items())[:MEMO_LIMIT])
                cap = max(found)
        if len(found) > MEMO_LIMIT:
            found = dict(sorted(found.items())[:MEMO_LIMIT])
            cap = max(found)
        self.window = (dino, ino, cap if cap >= 0 else 1 << 62, found)
        hit = found.get(ino)
        return None if hit is None else hit.decode("utf-8", "surrogateescape")

    def path(self, ino: int) -> str | None:
        """Path of ``ino`` in the qtree's namespace ('' = qtree root), None if not reachable.

        Iterative (a tree of any depth): climbs the primary parents up to the qtree root or an
        inode whose path is known, then names the way down."""
        if ino == self.q:
            return ""
        if ino in self.paths:
            return self.paths[ino]
        if len(self.paths) >= MEMO_LIMIT or self.rev_entries >= MEMO_LIMIT:
            self.paths, self.rev, self.rev_entries = {}, {}, 0
        chain: list[int] = []
        cur = ino
        while cur != self.q and cur not in self.paths:
            self.paths[cur] = None  # cycle guard
            chain.append(cur)
            rec = self.inode(cur)
            if rec is None or not rec.parent or self.name_in(rec.parent, cur) is None:
                break
            cur = rec.parent
        for c in reversed(chain):
            rec = self.inode(c)
            out = None
            if rec is not None and rec.parent:
                name = self.name_in(rec.parent, c)
                pp = ("" if rec.parent == self.q else self.paths.get(rec.parent)) if name is not None else None
                if pp is not None:
                    out = f"{pp}/{name}" if pp else name
                elif rec.kind != DIR and rec.nlink > 1:
                    out = next(iter(self.all_paths(c)), None)
            self.paths[c] = out
        return self.paths[ino]

    def all_paths(self, ino: int) -> list[str]:
        """Every name of ``ino`` in the namespace (a walk of the qtree: hard links only)."""
        out: list[str] = []
        if self.q is None:
            return out
        stack = [(self.q, "")]
        while stack:
            d, p = stack.pop()
            drec = self.v.existing(d)
            for n, i in self.v.dir(drec).items():
                cp = f"{p}/{n}" if p else n
                if i == ino:
                    out.append(cp)
                r = self.v.inode(i)
                if r is not None and r.kind == DIR:
                    stack.append((i, cp))
        return sorted(out)


def _entry_changes(B: View, rb: Inode, T: View, rt: Inode) -> Iterator[tuple[int, bytes, int]]:
    """``(0, name, ino)`` of each entry of directory ``rb`` that ``rt`` lacks or has for another
    inode, ``(1, name, ino)`` of each entry of ``rt`` that ``rb`` lacks or has for another inode:
    a merge of the two sorted entry lists, one block at a time (never a whole directory)."""
    eb, et = B.dir_entries(rb), T.dir_entries(rt)
    b, t = next(eb, None), next(et, None)
    while b is not None or t is not None:
        if t is None or (b is not None and b[0] < t[0]):
            assert b is not None
            yield 0, b[0], b[1]
            b = next(eb, None)
        elif b is None or t[0] < b[0]:
            yield 1, t[0], t[1]
            t = next(et, None)
        else:
            if b[1] != t[1]:
                yield 0, b[0], b[1]
                yield 1, t[0], t[1]
            b, t = next(eb, None), next(et, None)


def _below(path: str, top: str | None) -> bool:
    """Whether ``path`` is ``top`` or below it."""
    return top is not None and (path == top or path.startswith(top + "/"))


def _entered(path: str, rows: SortedRows | None, moved: Container[int]) -> bool:
    """Whether ``path`` or a directory above it is the path of one of ``rows`` (entries added or
    removed) whose inode is not among ``moved``."""
    if rows is None:
        return False
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        ino = rows.ino_at("/".join(parts[:i]))
        if ino is not None and ino not in moved:
            return True
    return False


class Differ:
    def __init__(self, fs: SimFS, qtree: str, base: View | None, target: View) -> None:
        self.fs = fs
        self.qtree = qtree
        self.B = base
        self.T = target
        self.qT = target.qtree_root(qtree)
        self.qB = base.qtree_root(qtree) if base is not None else None
        self.nsB = Namespace(base, self.qB) if base is not None else None
        self.nsT = Namespace(target, self.qT)
        self.linked: dict[int, str] = {}
        self.added: SortedRows | None = None  # the entries added (an incremental diff's)
        self.renames: dict[int, tuple[str, str]] = {}  # the moves sent as renames
        # the tops of the last subtrees created and removed (what lies below them is too; in path
        # order, everything below a top comes right after it)
        self.created: str | None = None
        self.removed: str | None = None
        # inodes of the base image sent whole (created again, not linked): their changes are in
        # the creation; an inode new in the target is never among the changed ones looked up
        self.full: set[int] = set()

    # -- content
    def _content(self, path: str, rec: Inode, fbns: list[int]) -> Iterator[object]:
        size = rec.size
        run: list[int] = []

        def flush() -> Iterator[object]:
            if not run:
                return
            buf = bytearray()
            for f in run:
                p = self.fs.get_ptr(rec.top, rec.height, f)
                buf += self.fs.read(p) if p else ZERO
            off = run[0] * BS
            yield R.Write(path=path, offset=off, data=bytes(buf[: max(0, min(len(buf), size - off))]))
            run.clear()

        for f in fbns:
            if run and (f != run[-1] + 1 or len(run) >= CHUNK_BLOCKS):
                yield from flush()
            run.append(f)
        yield from flush()

    def _xattrs(self, path: str, old: dict[str, bytes], new: dict[str, bytes]) -> Iterator[object]:
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                yield R.SetXattr(path=path, name=k, value=new.get(k))

    @staticmethod
    def _attrs(path: str, rec: Inode) -> R.SetAttr:
        return R.SetAttr(
            path=path, mode=None if rec.kind == LNK else rec.mode, uid=rec.uid, gid=rec.gid, mtime_ns=rec.mtime
        )

    # -- creation / removal of whole subtrees
    def create(self, ino: int, path: str) -> Iterator[object]:
        """Records that create ``ino`` at ``path`` and, for a directory, everything below it in
        pre-order, a directory's attributes after its contents (iterative: any depth)."""
        T = self.T
        self.created = path
        stack: list[tuple[int, str, Inode | None]] = [(ino, path, None)]
        while stack:
            ino, path, created_dir = stack.pop()
            if created_dir is not None:  # its contents are created
                yield from self._xattrs(path, {}, T.xattrs(created_dir))
                yield self._attrs(path, created_dir)
                continue
            rec = T.inode(ino)
            if rec is None:
                continue
            if (rec.kind != REG or rec.nlink == 1) and self.nsB is not None and self.nsB.inode(ino) is not None:
                self.full.add(ino)
            if rec.kind == DIR:
                yield R.MkDir(path=path, mode=rec.mode)
                stack.append((ino, path, rec))
                for name, child in sorted(T.dir(rec).items(), reverse=True):
                    stack.append((child, f"{path}/{name}", None))
                continue
            yield from self._create_leaf(ino, path, rec)

    def _create_leaf(self, ino: int, path: str, rec: Inode) -> Iterator[object]:
        """Records that create the file or symlink ``ino`` at ``path``."""
        T = self.T
        if rec.kind == LNK:
            yield R.Symlink(path=path, target=T.data(rec).decode("utf-8", "surrogateescape"))
            yield self._attrs(path, rec)
            return
        if rec.nlink > 1:
            if ino in self.linked:
                yield R.HardLink(path=path, existing=self.linked[ino])
                return
            existing = self._surviving_link(ino, path)
            if existing is not None:
                self.linked[ino] = existing
                yield R.HardLink(path=path, existing=existing)
                return
            self.linked[ino] = path
            self.full.add(ino)
        yield R.MkFile(path=path, mode=rec.mode)
        fbns = [f for f, _p in self.fs.leaves(rec.top, rec.height) if f < nblocks(rec.size)]
        yield from self._content(path, rec, fbns)
        if rec.size and (not fbns or (fbns[-1] + 1) * BS < rec.size):
            yield R.Truncate(path=path, size=rec.size)
        yield from self._xattrs(path, {}, T.xattrs(rec))
        yield self._attrs(path, rec)

    def _surviving_link(self, ino: int, path: str) -> str | None:
        """A name of ``ino`` that the applier already has (unchanged since the base)."""
        if self.nsB is None or self.nsB.inode(ino) is None or self.nsB.path(ino) is None:
            return None
        cands: Sequence[str | None] = [self.nsT.path(ino)]
        if cands[0] is None or cands[0] == path or _entered(cands[0], self.added, self.renames):
            cands = self.nsT.all_paths(ino)
        for c in cands:
            if c is not None and c != path and not _entered(c, self.added, self.renames):
                return c
        return None

    def remove(self, ino: int, path: str) -> Iterator[object]:
        """Records that remove ``path`` and everything below it, children first (iterative: any depth)."""
        assert self.B is not None
        self.removed = path
        stack: list[tuple[int, str, bool]] = [(ino, path, False)]
        while stack:
            ino, path, emptied = stack.pop()
            if emptied:
                yield R.RmDir(path=path)
                continue
            rec = self.B.inode(ino)
            if rec is not None and rec.kind == DIR:
                stack.append((ino, path, True))
                for name, child in sorted(self.B.dir(rec).items(), reverse=True):
                    stack.append((child, f"{path}/{name}", False))
            else:
                yield R.Unlink(path=path)

    # -- the stream
    def changes(self) -> Iterator[object]:
        T, B = self.T, self.B
        if self.qT is None:
            return
        if B is None or self.qB != self.qT:
            if B is not None and self.qB is not None:
                for name, child in sorted(B.dir(B.existing(self.qB)).items()):
                    yield from self.remove(child, name)
            for name, child in sorted(T.dir(T.existing(self.qT)).items()):
                yield from self.create(child, name)
            rt = T.inode(self.qT)
            assert rt is not None  # the qtree root (qtree_root found it)
            yield from self._xattrs(R.ROOT, {}, T.xattrs(rt))
            yield self._attrs(R.ROOT, rt)
            return
        removed, added, dirs = SortedRows(), SortedRows(), SortedRows()
        try:
            yield from self._incremental(removed, added, dirs)
        finally:
            for rows in (removed, added, dirs):
                rows.close()

    def _kept(self) -> Iterator[tuple[int, str, str, Inode, Inode]]:
        """``(ino, base path, target path, base record, target record)`` of the changed inodes of
        the qtree that are in both images with the same kind, in inode order (one walk of the
        pair's change: :func:`.ops.changed_inodes_of`)."""
        q, nsB, nsT = self.qT, self.nsB, self.nsT
        assert q is not None and nsB is not None and self.B is not None
        for ino, rb, rt in changed_inodes_of(self.fs, self.B.root, self.T.root, q):
            if rb is None or rt is None or rb.qtree != q or rt.qtree != q:
                continue  # created or removed: found from its directory (no path looked up)
            pb = nsB.path(ino)
            pt = nsT.path(ino) if pb is not None else None
            if pb is not None and pt is not None and rb.kind == rt.kind:
                yield ino, pb, pt, rb, rt

    def _incremental(self, removed: SortedRows, added: SortedRows, dirs: SortedRows) -> Iterator[object]:
        """The records of an incremental diff (the order of the module's docstring).  What it keeps
        until it ends: the entries added and removed (path, inode, directory), and the kept
        directories whose attributes it sends last, in :class:`.spill.SortedRows` (on disk past
        their bound); in memory only the entries that may be moves (an inode in both images).
        The changed files are read again by a second walk of the change, after the additions."""
        T, B = self.T, self.B
        assert B is not None
        q = self.qT
        nsB, nsT = self.nsB, self.nsT
        assert nsB is not None
        self.added = added
        root: tuple[Inode, Inode] | None = None  # the qtree root's inode, when it changed
        moves: tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]] = ([], [])  # maybe moved
        for ino, pb, pt, rb, rt in self._kept():
            if rb.kind == DIR:
                if rb.top != rt.top or rb.size != rt.size:
                    for side, name, i in _entry_changes(B, rb, T, rt):
                        n = name.decode("utf-8", "surrogateescape")
                        p = (f"{pb}/{n}" if pb else n) if side == 0 else (f"{pt}/{n}" if pt else n)
                        (removed, added)[side].add(path_key(p), p, i, ino)
                        if nsB.inode(i) is not None and nsT.inode(i) is not None:
                            moves[side].append((p, i, ino))
                if ino != q:
                    dirs.add((0xFFFFFFFF - len(pt.split("/"))).to_bytes(4, "big"), pt, ino)
            if ino == q:
                root = (rb, rt)
        renames = self._plan_renames(removed, added, *moves)
        self.renames = renames
        del moves
        for path, ino, _d in removed:
            if ino not in renames and not _below(path, self.removed):
                yield from self.remove(ino, path)
        for ino, (old, new) in sorted(renames.items(), key=lambda kv: kv[1]):
            yield R.Rename(old=old, new=new)
        for path, ino, _d in added:
            if ino not in renames and not _below(path, self.created):
                yield from self.create(ino, path)
        for ino, _pb, path, rb, rt in self._kept():
            if ino in self.full or rt.kind == DIR:
                continue
            path = self.linked.get(ino, path)
            if rt.kind == LNK and (rb.top != rt.top or rb.size != rt.size):
                yield R.Unlink(path=path)
                yield R.Symlink(path=path, target=T.data(rt).decode("utf-8", "surrogateescape"))
                yield self._attrs(path, rt)
                continue
            wrote = False
            if rt.kind == REG and (rb.top != rt.top or rb.size != rt.size or rb.height != rt.height):
                if rb.size != rt.size:
                    wrote = True
                    yield R.Truncate(path=path, size=rt.size)
                lim = nblocks(rt.size)
                fbns = sorted(f for f, _a, _b in pair_walk(self.fs, (rb.top, rb.height), (rt.top, rt.height), lim))
                for rec in self._content(path, rt, fbns):
                    wrote = True
                    yield rec
            yield from self._attr_delta(path, rb, rt, moved=wrote)
        for path, ino, _d in dirs:
            if ino in self.full:
                continue
            rb, rt = B.existing(ino), T.existing(ino)
            yield from self._attr_delta(path, rb, rt, moved=rb.top != rt.top or rb.size != rt.size)
        if root is not None:
            rb, rt = root
            yield from self._attr_delta(R.ROOT, rb, rt, moved=rb.top != rt.top or rb.size != rt.size)

    def _plan_renames(
        self, removed: SortedRows, added: SortedRows, olds_in: list, news_in: list
    ) -> dict[int, tuple[str, str]]:
        """Moves that can be sent as one ``Rename`` each: an inode (a directory, or a file or
        symlink with one link) whose entry left one directory and appeared in another, where both
        directories stay at the same path and no other move involves either name.  Everything
        else falls back to removal + creation.  ``olds_in`` and ``news_in``: the entries removed
        and added whose inode is in both images (the only ones that can move)."""
        nsB, nsT, q = self.nsB, self.nsT, self.qT
        assert nsB is not None
        olds: dict[int, list] = {}
        news: dict[int, list] = {}
        for p, i, d in olds_in:
            olds.setdefault(i, []).append((p, d))
        for p, i, d in news_in:
            news.setdefault(i, []).append((p, d))
        cands: dict[int, tuple[str, str, int, int]] = {}
        for i, o in olds.items():
            n = news.get(i)
            if len(o) != 1 or not n or len(n) != 1:
                continue
            rb, rt = nsB.inode(i), nsT.inode(i)
            if rb is None or rt is None or rb.kind != rt.kind or (rb.kind != DIR and (rb.nlink > 1 or rt.nlink > 1)):
                continue
            if nsB.path(i) is None or nsT.path(i) is None:
                continue
            cands[i] = (o[0][0], n[0][0], o[0][1], n[0][1])
        del olds, news
        while cands:
            old_paths = {c[0] for c in cands.values()}
            new_paths = {c[1] for c in cands.values()}

            def stable(d: int) -> bool:
                if d == q:
                    return True
                pb, pt = nsB.path(d), nsT.path(d)
                return (
                    pb is not None and pb == pt and not _entered(pb, removed, cands) and not _entered(pb, added, cands)
                )

            drop = [
                i
                for i, (o, n, db, dt) in cands.items()
                if n in old_paths or o in new_paths or not stable(db) or not stable(dt)
            ]
            if not drop:
                break
            for i in drop:
                del cands[i]
        return {i: (c[0], c[1]) for i, c in cands.items()}

    def _attr_delta(self, path: str, rb: Inode, rt: Inode, moved: bool = False) -> Iterator[object]:
        """xattrs and attributes of a kept entry that changed; ``moved``: the records before changed
        what moves its mtime on a destination (its data, a directory's entries), so the attributes
        are sent even where the two images agree on them."""
        assert self.B is not None
        if rb.xtop != rt.xtop or rb.xsize != rt.xsize:
            yield from self._xattrs(path, self.B.xattrs(rb), self.T.xattrs(rt))
        if moved or (rb.mode, rb.uid, rb.gid, rb.mtime) != (rt.mode, rt.uid, rt.gid, rt.mtime):
            yield self._attrs(path, rt)


def diff_stream(fs: SimFS, qtree: str, base: str | None, target: str) -> Iterator[object]:
    """Validate now, then return the lazy Begin ... End stream."""
    T = fs.view(target)
    if T.qtree_root(qtree) is None:
        from coalesce_core.errors import BackendError

        raise BackendError(
            f"qtree {qtree!r} does not exist in PCPI {target!r} of {fs.path}",
            hint=f"qtrees there: {', '.join(T.qtrees()) or 'none'}",
        )
    B = fs.view(base) if base is not None else None
    return R.framed(qtree, base, target, Differ(fs, qtree, B, T).changes())


# ------------------------------------------------------------------ fingerprint
def entries(fs: SimFS, view: View, q: int) -> Iterator[FP.Entry]:
    stack = [(q, "")]
    while stack:
        d, p = stack.pop()
        for name, ino in view.dir(view.existing(d)).items():
            path = f"{p}/{name}" if p else name
            rec = view.inode(ino)
            if rec is None:
                continue
            if rec.kind == DIR:
                yield FP.Entry(path=path, kind="d", mode=rec.mode)
                stack.append((ino, path))
            elif rec.kind == LNK:
                yield FP.Entry(path=path, kind="l", mode=0, target=view.data(rec).decode("utf-8", "surrogateescape"))
            else:
                yield FP.Entry(
                    path=path, kind="f", mode=rec.mode, size=rec.size, content_sha256=content_digest(fs, rec)
                )


def content_digest(fs: SimFS, rec: Inode) -> str:
    """The content digest (coalesce_core.stream.fingerprint) of a regular file, from the data blocks of its
    buffer tree: holes are never read, so it costs the file's data, not its size."""
    digest = FP.ContentDigest(rec.size)
    for fbn, vbn in fs.leaves(rec.top, rec.height):
        if fbn * BS >= rec.size:
            break
        digest.update(fbn * BS, fs.read(vbn))
    return digest.hexdigest()


def fingerprint(fs: SimFS, qtree: str, snapshot: str | None) -> str:
    view = fs.view(snapshot)
    q = view.qtree_root(qtree)
    if q is None:
        return FP.digest([])
    return FP.digest(entries(fs, view, q))


def tree_dict(fs: SimFS, qtree: str, snapshot: str | None = None) -> dict[str, object]:
    """The qtree as a plain dict {path: ("d", mode) | ("f", mode, bytes) | ("l", target)} (tests, tools)."""
    view = fs.view(snapshot)
    q = view.qtree_root(qtree)
    out: dict[str, object] = {}
    if q is None:
        return out
    stack = [(q, "")]
    while stack:
        d, p = stack.pop()
        for name, ino in view.dir(view.existing(d)).items():
            path = f"{p}/{name}" if p else name
            rec = view.existing(ino)
            if rec.kind == DIR:
                out[path] = ("d", rec.mode)
                stack.append((ino, path))
            elif rec.kind == LNK:
                out[path] = ("l", view.data(rec).decode("utf-8", "surrogateescape"))
            else:
                out[path] = ("f", rec.mode, view.data(rec))
    return out
