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

from typing import Iterator, Sequence

from coalesce_core.stream import fingerprint as FP
from coalesce_core.stream import records as R

from .fs import BS, DIR, LNK, REG, ZERO, Inode, SimFS, View, nblocks
from .ops import changed_inodes_of, pair_walk

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

    def inode(self, ino: int) -> Inode | None:
        rec = self.v.inode(ino)
        return rec if rec is not None and self.q is not None and rec.qtree == self.q else None

    def name_in(self, dino: int, ino: int) -> str | None:
        r = self.rev.get(dino)
        if r is None:
            drec = self.v.inode(dino)
            if drec is None or drec.kind != DIR:
                return None
            r = {}
            for n, i in sorted(self.v.dir(drec).items(), reverse=True):
                r[i] = n
            self.rev[dino] = r
            self.rev_entries += len(r)
        return r.get(ino)

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


def _under(path: str, prefixes: set[str]) -> bool:
    parts = path.split("/")
    return any("/".join(parts[:i]) in prefixes for i in range(1, len(parts) + 1))


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
        self._added: list[tuple[str, int, int]] = []  # the additions not sent as renames
        self._added_paths: set[str] | None = None
        # the tops of the subtrees created and removed (what lies below them is too)
        self.created: set[str] = set()
        self.removed: set[str] = set()
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
        self.created.add(path)
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

    @property
    def added_paths(self) -> set[str]:
        """The paths of the additions (made when a hard link first asks: most diffs have none)."""
        if self._added_paths is None:
            self._added_paths = {p for p, _i, _d in self._added}
        return self._added_paths

    def _surviving_link(self, ino: int, path: str) -> str | None:
        """A name of ``ino`` that the applier already has (unchanged since the base)."""
        if self.nsB is None or self.nsB.inode(ino) is None or self.nsB.path(ino) is None:
            return None
        cands: Sequence[str | None] = [self.nsT.path(ino)]
        if cands[0] is None or cands[0] == path or _under(cands[0], self.added_paths):
            cands = self.nsT.all_paths(ino)
        for c in cands:
            if c is not None and c != path and not _under(c, self.added_paths):
                return c
        return None

    def remove(self, ino: int, path: str) -> Iterator[object]:
        """Records that remove ``path`` and everything below it, children first (iterative: any depth)."""
        assert self.B is not None
        self.removed.add(path)
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
        q = self.qT
        nsB, nsT = self.nsB, self.nsT
        assert nsB is not None
        root: tuple[Inode, Inode] | None = None  # the qtree root's inode, when it changed
        removed: list[tuple[str, int, int]] = []  # (path, inode, directory it left)
        added: list[tuple[str, int, int]] = []  # (path, inode, directory it entered)
        modified: list[tuple[int, str, Inode, Inode]] = []
        for ino, rb, rt in changed_inodes_of(self.fs, B.root, T.root, q):
            rb = rb if rb is not None and rb.qtree == q else None
            rt = rt if rt is not None and rt.qtree == q else None
            pb = nsB.path(ino) if rb is not None else None
            if pb is None:  # created: its creation is found from its directory
                continue
            pt = nsT.path(ino) if rt is not None else None
            if pt is None:
                continue
            assert rb is not None and rt is not None  # pb and pt are None without them
            if rb.kind != rt.kind:
                continue
            if rb.kind == DIR:
                eb, et = B.dir(rb), T.dir(rt)
                if rb.top != rt.top or rb.size != rt.size:
                    for n, i in eb.items():
                        if et.get(n) != i:
                            removed.append((f"{pb}/{n}" if pb else n, i, ino))
                    for n, i in et.items():
                        if eb.get(n) != i:
                            added.append((f"{pt}/{n}" if pt else n, i, ino))
            if ino != q:
                modified.append((ino, pt, rb, rt))
            else:
                root = (rb, rt)
        renames = self._plan_renames(removed, added)
        key = lambda item: item[0].replace("/", "\x00")  # noqa: E731  # path order, one string per entry
        removed.sort(key=key)
        for path, ino, _d in removed:
            if ino not in renames and not _under(path, self.removed):
                yield from self.remove(ino, path)
        for ino, (old, new) in sorted(renames.items(), key=lambda kv: kv[1]):
            yield R.Rename(old=old, new=new)
        added.sort(key=key)
        self._added = [a for a in added if a[1] not in renames]
        for path, ino, _d in added:
            if ino not in renames and not _under(path, self.created):
                yield from self.create(ino, path)
        dirs = []
        for ino, path, rb, rt in modified:
            if ino in self.full:
                continue
            path = self.linked.get(ino, path)
            if rt.kind == DIR:
                dirs.append((path, rb, rt))
                continue
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
        for path, rb, rt in sorted(dirs, key=lambda d: -len(d[0].split("/"))):
            yield from self._attr_delta(path, rb, rt, moved=rb.top != rt.top or rb.size != rt.size)
        if root is not None:
            rb, rt = root
            yield from self._attr_delta(R.ROOT, rb, rt, moved=rb.top != rt.top or rb.size != rt.size)

    def _plan_renames(self, removed: list, added: list) -> dict[int, tuple[str, str]]:
        """Moves that can be sent as one ``Rename`` each: an inode (a directory, or a file or
        symlink with one link) whose entry left one directory and appeared in another, where both
        directories stay at the same path and no other move involves either name.  Everything
        else falls back to removal + creation."""
        nsB, nsT, q = self.nsB, self.nsT, self.qT
        assert nsB is not None
        olds: dict[int, list] = {}
        news: dict[int, list] = {}
        for p, i, d in removed:
            olds.setdefault(i, []).append((p, d))
        for p, i, d in added:
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
        while cands:
            rem_pref = {p for p, i, _d in removed if i not in cands}
            add_pref = {p for p, i, _d in added if i not in cands}
            old_paths = {c[0] for c in cands.values()}
            new_paths = {c[1] for c in cands.values()}

            def stable(d: int) -> bool:
                if d == q:
                    return True
                pb, pt = nsB.path(d), nsT.path(d)
                return pb is not None and pb == pt and not _under(pb, rem_pref) and not _under(pb, add_pref)

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
