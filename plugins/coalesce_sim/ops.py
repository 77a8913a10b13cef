"""Namespace operations on the active FS: apply (with purgatory), remove/purge, native rollback.

Everything here mutates the in-memory overlay of :class:`.fs.SimFS`; the
caller (the hook) writes ONE consistency point at the end of the primitive,
also when it fails part-way (the partial state stays, as the hookspec says).
"""

from __future__ import annotations

from typing import Iterable, Iterator

from coalesce_core.errors import HostilePath, StreamError
from coalesce_core.stream import limits
from coalesce_core.stream import records as R

from .fs import _QID, DIR, IPB, ISZ, LNK, PPB, QTREE_OFF, REG, ROOT_INO, ZERO, Inode, SimFS, fsname, nblocks


def check_qtree_name(qtree: str) -> str:
    R.check_path(qtree, what="qtree")
    if "/" in qtree:
        raise HostilePath(f"qtree {qtree!r} is not a top-level directory name")
    return qtree


def qtree_root(fs: SimFS, name: str, *, create: bool) -> int | None:
    ino = fs.a_dir(ROOT_INO).get(name)
    if ino is None and create:
        ino = fs.a_new(DIR, 0o755, 0, ROOT_INO)
        fs.a_existing(ino).qtree = ino
        fs.a_dir_set(ROOT_INO, name, ino)
        fs.a_touch(ROOT_INO).nlink += 1
    return ino


# ------------------------------------------------------------------ inode-file walk
def _wrap(top: int, h: int, to_h: int):
    old: int | list = top
    for _ in range(to_h - h):
        old = [old] + [0] * (PPB - 1) if old else 0
    return old


def pair_walk(fs: SimFS, a: tuple[int, int], b: tuple[int, int], limit: int) -> Iterator[tuple[int, int, int]]:
    """(fbn, ptr_a, ptr_b) of every leaf where two buffer trees differ, skipping equal subtrees."""
    h = max(a[1], b[1])
    if h == 0:
        return
    stack = [(_wrap(a[0], a[1], h) if a[1] else 0, _wrap(b[0], b[1], h) if b[1] else 0, h - 1, 0)]
    while stack:
        pa, pb, level, base = stack.pop()
        if isinstance(pa, int) and isinstance(pb, int) and pa == pb:
            continue
        if base >= limit:
            continue
        if level == 0:
            yield base, pa, pb
            continue
        ka = pa if isinstance(pa, list) else (fs.ptrs(pa) if pa else (0,) * PPB)
        kb = pb if isinstance(pb, list) else (fs.ptrs(pb) if pb else (0,) * PPB)
        span = PPB ** (level - 1)
        for i in range(PPB - 1, -1, -1):
            if ka[i] != kb[i] or isinstance(ka[i], list) or isinstance(kb[i], list):
                stack.append((ka[i], kb[i], level - 1, base + i * span))


def _changed_blocks(fs: SimFS, ra: Inode, rb: Inode) -> list[tuple[int, int, int]]:
    limit = max(nblocks(ra.size * ISZ), nblocks(rb.size * ISZ))
    return sorted(pair_walk(fs, (ra.top, ra.height), (rb.top, rb.height), limit))


def _slots(
    fs: SimFS, blocks: Iterable[tuple[int, int, int]], q: int | None = None
) -> Iterator[tuple[int, Inode | None, Inode | None]]:
    for bi, pa, pb in blocks:
        ba = fs.read(pa) if pa else ZERO
        bb = fs.read(pb) if pb else ZERO
        for s in range(IPB):
            o = s * ISZ
            sa, sb = ba[o : o + ISZ], bb[o : o + ISZ]
            if sa != sb:
                if q is not None and not (
                    (sa[0] and _QID.unpack_from(sa, QTREE_OFF)[0] == q)
                    or (sb[0] and _QID.unpack_from(sb, QTREE_OFF)[0] == q)
                ):
                    continue
                ia, ib = Inode.unpack(sa), Inode.unpack(sb)
                yield bi * IPB + s, (ia if ia.kind else None), (ib if ib.kind else None)


def changed_inodes(fs: SimFS, ra: Inode, rb: Inode) -> Iterator[tuple[int, Inode | None, Inode | None]]:
    """Inodes whose 128-byte records differ between two root inodes (cost follows the change)."""
    yield from _slots(fs, _changed_blocks(fs, ra, rb))


def change_index(fs: SimFS, ra: Inode, rb: Inode) -> dict[int, list[tuple[int, int, int]]]:
    """qtree id -> the inode-file blocks ``(bi, ptr_a, ptr_b)`` where that qtree's inodes differ
    between two images: one walk of the whole change, memoised on the volume for the pair.

    The transfers of one cycle diff every qtree between the same two PCPIs; without the
    index each diff walked (and decoded) the change of *all* qtrees to keep its own, so a
    cycle where N qtrees changed cost O(N^2).  A memoised index stays valid while both top
    blocks are allocated (a live block never changes); :meth:`.fs.SimFS._decref` drops it
    when either top is freed."""
    key = (ra.top, ra.height, ra.size, rb.top, rb.height, rb.size)
    with fs.idx_lock:
        idx = fs.change_idx.get(key)
        if idx is not None:
            fs.stats["change_index_hits"] += 1
            return idx
        fs.stats["change_index_builds"] += 1
        idx = {}
        for bi, pa, pb in _changed_blocks(fs, ra, rb):
            ba = fs.read(pa) if pa else ZERO
            bb = fs.read(pb) if pb else ZERO
            qs: set[int] = set()
            for s in range(IPB):
                o = s * ISZ
                if ba[o : o + ISZ] != bb[o : o + ISZ]:
                    if ba[o]:
                        qs.add(_QID.unpack_from(ba, o + QTREE_OFF)[0])
                    if bb[o]:
                        qs.add(_QID.unpack_from(bb, o + QTREE_OFF)[0])
            for q in qs:
                idx.setdefault(q, []).append((bi, pa, pb))
        fs.remember_change_index(key, idx)
        return idx


def changed_inodes_of(fs: SimFS, ra: Inode, rb: Inode, q: int) -> Iterator[tuple[int, Inode | None, Inode | None]]:
    """:func:`changed_inodes` restricted to inodes of qtree ``q`` on either side (cost follows
    that qtree's change once the pair's :func:`change_index` exists)."""
    yield from _slots(fs, change_index(fs, ra, rb).get(q, ()), q)


# ------------------------------------------------------------------ apply
class Applier:
    def __init__(self, fs: SimFS, qtree: str, use_purgatory: bool) -> None:
        self.fs = fs
        self.use_purgatory = use_purgatory
        q = qtree_root(fs, check_qtree_name(qtree), create=True)
        assert q is not None  # create=True makes it
        self.q = q
        self.nrec = 0
        self.nbytes = 0
        # directory path -> inode of the directories resolved by this applier (and back); an entry
        # goes when its directory leaves its name (rename, removal), so it never names another one
        self._dirs: dict[str, int] = {}
        self._paths: dict[int, str] = {}

    # -- helpers
    def resolve(self, path: str) -> tuple[int, str, int | None]:
        """(parent directory inode, final name, inode at the name or None), never through a symlink.
        Starts from the deepest directory of the path resolved before (a deep tree is created one
        level at a time), so a record costs the components it adds, not the depth."""
        fs = self.fs
        parent, _, name = R.check_path(path).rpartition("/")
        cur = self.q if not parent else self._dirs.get(parent)
        if cur is not None:
            return cur, name, fs.a_dir(cur).get(name)
        known = parent
        while True:
            known = known.rpartition("/")[0]
            if not known or known in self._dirs:
                break
        cur = self._dirs[known] if known else self.q
        parts = parent.split("/")
        first = known.count("/") + 1 if known else 0
        if len(self._dirs) + len(parts) - first > 4096:
            self._dirs.clear()
            self._paths.clear()
        sofar = known
        for i in range(first, len(parts)):
            p = parts[i]
            ino = fs.a_dir(cur).get(p)
            rec = fs.a_inode(ino) if ino is not None else None
            if rec is None or rec.kind != DIR:
                sub = "/".join(parts[: i + 1])  # only for the message: a deep path has thousands of parts
                if rec is None:
                    raise StreamError(
                        f"{path!r:.300}: directory {sub!r:.300} does not exist",
                        hint="the stream violates the order contract or does not match this replica",
                    )
                if rec.kind == LNK:
                    raise HostilePath(
                        f"{path!r:.300} goes through the symlink {sub!r:.300}; appliers never follow symlinks (I10)"
                    )
                raise StreamError(f"{path!r:.300}: {sub!r:.300} is not a directory")
            assert ino is not None  # rec is its inode
            cur = ino
            sofar = f"{sofar}/{p}" if sofar else p
            self._dirs[sofar] = cur  # every directory on the way: the next record may
            self._paths[cur] = sofar  # name one of them (a tree removed deepest first)
        return cur, name, fs.a_dir(cur).get(name)

    def _forget_dir(self, ino: int, path: str | None = None) -> None:
        """Directory ``ino`` (at ``path``, if known) leaves its name: drop it and what is below it."""
        known = self._paths.pop(ino, None)
        if known is not None:
            del self._dirs[known]
        if not self.fs.a_dir(ino):
            return  # empty: nothing below it
        for p in filter(None, (known, path)):
            below = [k for k in self._dirs if k.startswith(p + "/")]
            for k in below:
                del self._paths[self._dirs.pop(k)]
        if known is None and path is None:
            self._dirs.clear()  # a non-empty directory of unknown path: anything may be below it
            self._paths.clear()

    def purgatory(self) -> int:
        qrec = self.fs.a_touch(self.q)
        if not qrec.purg:
            qrec.purg = self.fs.a_new(DIR, 0o700, self.q, 0)
        return qrec.purg

    def fix_parent(self, ino: int, dino: int) -> None:
        """``ino`` lost its name in ``dino``: keep its primary parent pointing at a directory that links it."""
        rec = self.fs.a_inode(ino)
        if rec is None or rec.parent != dino or ino in self.fs.a_dir(dino).values():
            return
        found = find_link_active(self.fs, self.q, ino)
        self.fs.a_touch(ino).parent = found if found is not None else 0

    def remove_entry(self, dino: int, name: str, ino: int) -> None:
        fs = self.fs
        rec = fs.a_touch(ino)
        fs.a_dir_set(dino, name, None)
        if rec.kind == DIR:
            fs.a_touch(dino).nlink -= 1
            self._forget_dir(ino)
        if rec.kind != DIR and rec.nlink > 1:
            rec.nlink -= 1
            self.fix_parent(ino, dino)
        elif self.use_purgatory:
            pd = self.purgatory()
            fs.a_dir_set(pd, str(ino), ino)
            rec.parent = pd
            if rec.kind == DIR:
                fs.a_touch(pd).nlink += 1
        else:
            destroy(fs, self.q, ino)

    def make(self, path: str, kind: int, mode: int) -> int:
        parent, name, ex = self.resolve(path)
        if ex is not None:
            self.remove_entry(parent, name, ex)
        ino = self.fs.a_new(kind, mode, self.q, parent)
        self.fs.a_dir_set(parent, name, ino)
        if kind == DIR:
            self.fs.a_touch(parent).nlink += 1
        return ino

    def regular(self, path: str) -> int:
        _p, _n, ino = self.resolve(path)
        if ino is None:
            raise StreamError(f"{path!r} does not exist", hint="Write/Truncate must address an existing file")
        rec = self.fs.a_existing(ino)
        if rec.kind == LNK:
            raise HostilePath(f"{path!r} is a symlink; writing through it could leave the qtree (I10)")
        if rec.kind != REG:
            raise StreamError(f"{path!r} is not a regular file")
        return ino

    # -- records
    def apply(self, rec: object) -> None:
        fs = self.fs
        ino: int | None  # the inode a record names (None: no such entry)
        if isinstance(rec, R.MkDir):
            parent, name, ex = self.resolve(rec.path)
            if ex is not None and fs.a_existing(ex).kind == DIR:
                fs.a_touch(ex).mode = rec.mode & 0o7777
                return
            self.make(rec.path, DIR, rec.mode)
        elif isinstance(rec, R.MkFile):
            parent, name, ex = self.resolve(rec.path)
            if ex is not None and fs.a_existing(ex).kind == REG and fs.a_existing(ex).nlink == 1:
                fs.a_truncate(ex, 0)
                fs.a_touch(ex).mode = rec.mode & 0o7777
                return
            self.make(rec.path, REG, rec.mode)
        elif isinstance(rec, R.Symlink):
            parent, name, ex = self.resolve(rec.path)
            if ex is not None:
                er = fs.a_existing(ex)
                if er.kind == LNK and fs.a_read(ex, 0, er.size) == fsname(rec.target):
                    return
            ino = self.make(rec.path, LNK, 0o777)
            fs.a_set_data(ino, fsname(rec.target))
        elif isinstance(rec, R.HardLink):
            _ep, _en, eino = self.resolve(rec.existing)
            if eino is None:
                raise StreamError(f"hard link {rec.path!r}: {rec.existing!r} does not exist")
            if fs.a_existing(eino).kind == DIR:
                raise StreamError(f"hard link {rec.path!r}: {rec.existing!r} is a directory")
            parent, name, ex = self.resolve(rec.path)
            if ex == eino:
                return
            if ex is not None:
                self.remove_entry(parent, name, ex)
            fs.a_dir_set(parent, name, eino)
            fs.a_touch(eino).nlink += 1
        elif isinstance(rec, R.Rename):
            op, on, oino = self.resolve(rec.old)
            np_, nn, nino = self.resolve(rec.new)
            if oino is None:
                if nino is not None:
                    return  # replayed
                raise StreamError(f"rename: {rec.old!r} does not exist")
            if nino == oino:
                return
            orec = fs.a_existing(oino)
            if orec.kind == DIR:
                p = np_
                while p != self.q:
                    if p == oino:
                        raise StreamError(f"rename: cannot move {rec.old!r} into itself ({rec.new!r})")
                    p = fs.a_existing(p).parent
            if nino is not None:
                self.remove_entry(np_, nn, nino)
            fs.a_dir_set(op, on, None)
            fs.a_dir_set(np_, nn, oino)
            fs.a_touch(oino).parent = np_
            if orec.kind == DIR:
                self._forget_dir(oino, rec.old)
                fs.a_touch(op).nlink -= 1
                fs.a_touch(np_).nlink += 1
        elif isinstance(rec, R.Unlink):
            parent, name, ex = self.resolve(rec.path)
            if ex is None:
                return
            if fs.a_existing(ex).kind == DIR:
                raise StreamError(f"unlink: {rec.path!r} is a directory")
            self.remove_entry(parent, name, ex)
        elif isinstance(rec, R.RmDir):
            parent, name, ex = self.resolve(rec.path)
            if ex is None:
                return
            if fs.a_existing(ex).kind != DIR:
                raise StreamError(f"rmdir: {rec.path!r} is not a directory")
            if fs.a_dir(ex):
                raise StreamError(f"rmdir: {rec.path!r} is not empty")
            self.remove_entry(parent, name, ex)
        elif isinstance(rec, R.Write):
            ino = self.regular(rec.path)
            limits.check_record(rec, fs.max_file_size or R.MAX_FILE_SIZE, f"sim volume {fs.path}")
            fs.a_write(ino, rec.offset, rec.data)
            self.nbytes += len(rec.data)
        elif isinstance(rec, R.Truncate):
            ino = self.regular(rec.path)
            limits.check_record(rec, fs.max_file_size or R.MAX_FILE_SIZE, f"sim volume {fs.path}")
            fs.a_truncate(ino, rec.size)
        elif isinstance(rec, R.SetAttr):
            ino = self.q if rec.path == R.ROOT else self.resolve(rec.path)[2]
            if ino is None:
                raise StreamError(f"setattr: {rec.path!r} does not exist")
            r = fs.a_touch(ino)
            if rec.mode is not None and r.kind != LNK:
                r.mode = rec.mode & 0o7777
            if rec.uid is not None:
                r.uid = rec.uid
            if rec.gid is not None:
                r.gid = rec.gid
            if rec.mtime_ns is not None:
                r.mtime = rec.mtime_ns
        elif isinstance(rec, R.SetXattr):
            ino = self.q if rec.path == R.ROOT else self.resolve(rec.path)[2]
            if ino is None:
                raise StreamError(f"setxattr: {rec.path!r} does not exist")
            fs.a_set_xattr(ino, rec.name, rec.value)
        else:
            raise StreamError(f"unknown change record {type(rec).__name__}")
        self.nrec += 1


def apply_stream(fs: SimFS, qtree: str, records: Iterable[object], use_purgatory: bool) -> dict[str, int]:
    ap = Applier(fs, qtree, use_purgatory)
    for rec in R.changes_only(records):
        ap.apply(rec)
        if fs.dirty_bytes >= fs.DIRTY_LIMIT or len(fs.ov_inodes) >= fs.OVERLAY_INODES:
            fs.commit()  # bound the memory a large stream holds: an extra CP, same result
    return {"records": ap.nrec, "bytes": ap.nbytes}


# ------------------------------------------------------------------ removal
def subtree(fs: SimFS, ino: int) -> list[int]:
    out, stack = [], [ino]
    while stack:
        i = stack.pop()
        out.append(i)
        rec = fs.a_inode(i)
        if rec is not None and rec.kind == DIR:
            stack.extend(fs.a_dir(i).values())
    return out


def destroy(fs: SimFS, q: int, ino: int) -> None:
    """Drop one link to ``ino`` (already unlinked from its directory) and free what nobody links."""
    stack = [ino]
    while stack:
        i = stack.pop()
        rec = fs.a_inode(i)
        if rec is None:
            continue
        if rec.kind == DIR:
            stack.extend(fs.a_dir(i).values())
            fs.a_free(i)
        elif rec.nlink > 1:
            fs.a_touch(i).nlink -= 1
            found = find_link_active(fs, q, i)
            fs.a_touch(i).parent = found if found is not None else 0
        else:
            fs.a_free(i)


def find_link_active(fs: SimFS, q: int, ino: int) -> int | None:
    """A directory of qtree ``q``'s namespace that links ``ino`` (a walk; only for hard links)."""
    stack = [q]
    while stack:
        d = stack.pop()
        ents = fs.a_dir(d)
        if ino in ents.values():
            return d
        for c in ents.values():
            r = fs.a_inode(c)
            if r is not None and r.kind == DIR:
                stack.append(c)
    return None


def remove_qtree(fs: SimFS, qtree: str) -> bool:
    q = fs.a_dir(ROOT_INO).get(check_qtree_name(qtree))
    if q is None:
        return False
    purg = fs.a_existing(q).purg
    inos = subtree(fs, q) + (subtree(fs, purg) if purg else [])
    for i in set(inos):
        fs.a_free(i)
    fs.a_dir_set(ROOT_INO, qtree, None)
    fs.a_touch(ROOT_INO).nlink -= 1
    return True


def purge_purgatory(fs: SimFS, qtree: str) -> bool:
    q = fs.a_dir(ROOT_INO).get(check_qtree_name(qtree))
    if q is None:
        return False
    qrec = fs.a_existing(q)
    if not qrec.purg:
        return False
    purg = qrec.purg
    while True:
        # a block of entries at a time, the last one first (the blocks before it stay where they
        # are), with a CP past the overlay's bounds (as apply_stream): a purgatory of millions of
        # entries is never decoded whole; each CP leaves the entries not yet destroyed
        batch = fs.a_dir(purg).last_block()
        if not batch:
            break
        for name, ino in batch:
            fs.a_dir_set(purg, name, None)
            destroy(fs, q, ino)
            if fs.dirty_bytes >= fs.DIRTY_LIMIT or len(fs.ov_inodes) >= fs.OVERLAY_INODES:
                fs.commit()
                break
    fs.a_free(purg)
    fs.a_touch(q).purg = 0
    return True


# ------------------------------------------------------------------ native rollback
def native_rollback(fs: SimFS, qtree: str, to_pcpi: str | None) -> int:
    """Make ``qtree`` in the active FS equal to ``to_pcpi`` by pointing its inodes at the PCPI's blocks.

    Walks the inode files of the committed active FS and of ``to_pcpi`` (skipping
    equal subtrees), and for every differing inode that belongs to the qtree on
    either side copies the PCPI's 128-byte record into the active inode file
    (or frees the slot).  Data, directory and xattr blocks are shared, not
    copied: the cost follows what changed since ``to_pcpi``.  Returns the number
    of inodes restored.
    """
    check_qtree_name(qtree)
    if to_pcpi is None:
        remove_qtree(fs, qtree)
        return 0
    to = fs.view(to_pcpi)
    q_to = to.qtree_root(qtree)
    if q_to is None:
        remove_qtree(fs, qtree)
        return 0
    q_act = fs.view().qtree_root(qtree)
    qids = {q_to} | ({q_act} if q_act else set())
    n = 0
    for ino, ra, rt in list(changed_inodes(fs, fs.root, to.root)):
        mine_to = rt is not None and rt.qtree == q_to
        if not (mine_to or (ra is not None and ra.qtree in qids)):
            continue
        fs.a_free(ino)
        if mine_to:
            fs.ov_inodes[ino] = rt
        n += 1
    if q_act != q_to:
        if q_act is None:
            fs.a_touch(ROOT_INO).nlink += 1
        fs.a_dir_set(ROOT_INO, qtree, q_to)
    return n
