"""Translate a parsed ``btrfs send -p BASE TARGET`` stream into per-qtree change records.

The send stream describes the whole subvolume with paths that are valid at
the moment of each command: new inodes are born under temporary (orphan)
names at the subvolume root (``o<ino>-<gen>-<n>``) and renamed into place, a
displaced entry is parked under an orphan name, a rename may appear as LINK
+ UNLINK.  Replaying it literally per qtree is impossible (the orphan names
live outside every qtree), so the translation works on **identities**, never
on paths: a path names a file-system object only at one moment.

1. **Replay the namespace** (:class:`StreamState`).  Each object the stream
   touches is one :class:`Node`: a base object is identified by its inode
   number in the base PCPI (all its hard links are one node), a new object
   by the MK* command that made it.  ``cur`` maps every path the stream
   touched to its node; a path first seen is resolved through its longest
   known prefix to a base path (``A/d`` renamed to ``A/e`` makes ``A/e/x``
   the base object ``A/d/x``) and that base path to its inode by ``lstat`` of
   the base PCPI.  Data commands record dirty byte ranges, TRUNCATE the
   lowest size, CHMOD/CHOWN/UTIMES and xattr commands dirty attributes; the
   file data of the stream is discarded.  The replay checks itself: an
   object renamed to an orphan name must carry that name's inode number, and
   every final name must hold the node's inode in the target PCPI.  Where a
   check fails, the qtree falls back to the tree-compare diff (correct, only
   slower) with a warning.

2. **Emit records per qtree** (:class:`_Emitter`) from *edges*: a name is
   the pair (parent object, name).  A name whose edge is the same in both
   PCPIs is kept, whatever happened to the paths of its ancestors (it moves
   with its parent); every other name of an object is removed or added.  A
   directory with a changed edge moves; a file keeps its identity through a
   kept name (or an unmentioned hard link, found with
   :func:`coalesce_btrfs.inopaths.ino_paths`), else it moves, departs or
   arrives.  Objects that arrive from outside the qtree (another qtree, or
   new) are created in full from the target PCPI.  Order, which meets the
   order contract of coalesce_core.stream.records:

   1. moved objects are parked under a free ``.coalesce-mv.<n>`` name in the
      qtree root, deepest base path first (this breaks rename cycles, as the
      kernel's orphan names do);
   2. removed names and departed directories' whole base subtrees are
      removed, deepest first;
   3. parked objects and arrivals are put in place, shallowest final path
      first;
   4. further hard links of placed or kept objects;
   5. data (dirty ranges read from the target PCPI, holes kept), xattrs and
      attributes of objects present in both PCPIs;
   6. SetAttr records deepest first, then the qtree root's attributes.

   A change to the qtree root itself (created, deleted, replaced, renamed)
   falls back to the tree-compare diff of the two PCPIs for that qtree.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from typing import Iterable, Iterator, cast

from coalesce_core.errors import CorruptStream
from coalesce_core.stream.records import HardLink, MkDir, Rename, RmDir, Symlink, Truncate, Unlink, Write
from coalesce_posix import walk

from . import inopaths
from .sendstream import Command

log = logging.getLogger("coalesce.btrfs")

_KIND = {"MKFILE": "f", "MKDIR": "d", "SYMLINK": "l", "MKNOD": None, "MKFIFO": None, "MKSOCK": None}
_DATA_CMDS = ("WRITE", "UPDATE_EXTENT", "CLONE", "ENCODED_WRITE", "FALLOCATE")
_ORPHAN = re.compile(r"^o(\d+)-(\d+)-(\d+)$")
#: the largest changed tail of a file that is overwritten in place instead of truncated first
_OVERWRITE_MAX = walk.CHUNK
#: the prefix of the names moved objects are parked under in the qtree root during an update
PARK_PREFIX = ".coalesce-mv."


class _Lost(Exception):
    """The replay disagrees with a PCPI: it no longer knows which object a path names."""


class Node:
    """One file-system object the stream touched."""

    __slots__ = (
        "seq",
        "ino",
        "new",
        "kind",
        "base_path",
        "base_names",
        "ranges",
        "min_trunc",
        "data_dirty",
        "xattr_dirty",
        "attr_dirty",
        "others",
    )

    def __init__(self, seq: int, ino: int | None, kind: str | None, new: bool, base_path: str | None) -> None:
        self.seq = seq
        self.ino = ino  # inode number (base objects: in the base PCPI; new: the MK command's)
        self.new = new
        self.kind = kind  # "d", "f", "l" or None (special files: not replicated)
        self.base_path = base_path  # the first base name the stream used (a directory has only one)
        self.base_names: set[str] = set()  # every base name the stream used
        self.ranges: list[tuple[int, int]] = []
        self.min_trunc: int | None = None
        self.data_dirty = False
        self.xattr_dirty = False
        self.attr_dirty = False
        self.others: list[str] = []  # names in the target PCPI the stream never used (hard links)

    @property
    def dirty(self) -> bool:
        return self.data_dirty or self.xattr_dirty or self.attr_dirty

    def __repr__(self) -> str:
        return f"Node(#{self.seq}, ino={self.ino}, base={self.base_path!r}, new={self.new}, kind={self.kind})"


def _dec(p: bytes) -> str:
    s = os.fsdecode(bytes(p))  # "" is the subvolume root itself (e.g. its UTIMES)
    if (
        s.startswith("/")
        or "\x00" in s
        or "//" in s
        or s.endswith("/")
        or any(part in (".", "..") for part in s.split("/"))
    ):
        raise CorruptStream(f"btrfs send stream path {s!r} is not a plain path relative to the subvolume")
    return s


def _parent(p: str) -> str:
    return p.rpartition("/")[0]


def _name(p: str) -> str:
    return p.rpartition("/")[2]


def _depth(p: str) -> int:
    return p.count("/")


def _qtree_of(p: str) -> str:
    return p.partition("/")[0]


def _lstat_kept(kept: dict[str, os.stat_result | None], root: str, path: str) -> os.stat_result | None:
    """lstat of ``path`` below ``root`` ("" is ``root`` itself; None: missing), looked up once and kept in
    ``kept`` (a PCPI does not change). None too when a component on its way is not a directory in that
    image, a symlink included: a path that came from the other image or the stream is never followed
    through a symlink to another object (docs/verification.md: identity is the inode, never the path).
    Every entry kept was reached through directories only, so a path whose parent is kept costs one
    lstat; the ancestors not kept yet are looked up top-down, iteratively (any depth)."""
    if path in kept:
        return kept[path]
    todo = [path]  # path, then its ancestors up to the nearest one kept (or the top), deepest first
    p, ancestor_ok = path, True
    while "/" in p:
        p = p.rpartition("/")[0]
        if p in kept:
            st = kept[p]
            ancestor_ok = st is not None and stat.S_ISDIR(st.st_mode)
            break
        todo.append(p)
    if not ancestor_ok:
        for q in todo:
            kept[q] = None
        return None
    for i in range(len(todo) - 1, -1, -1):
        q = todo[i]
        st = kept[q] = walk.lstat_or_none(os.path.join(root, q) if q else root)
        if i and (st is None or not stat.S_ISDIR(st.st_mode)):
            for deeper in todo[:i]:
                kept[deeper] = None
            return None
    return kept[path]


class _PathDict(dict):
    """A dict keyed by paths that lists a path's subtree without scanning every key.

    ``under[p]`` holds every key strictly below ``p`` (ancestors need not be
    keys themselves).  A send stream renames each new file into place, so a
    full scan per RENAME made a stream of N new files cost O(N^2)."""

    def __init__(self) -> None:
        super().__init__()
        self.under: dict[str, set[str]] = {}

    def __setitem__(self, key: str, value: Node) -> None:
        if key not in self:
            p = key
            while "/" in p:
                p = p.rpartition("/")[0]
                self.under.setdefault(p, set()).add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        p = key
        while "/" in p:
            p = p.rpartition("/")[0]
            below = self.under.get(p)
            if below is not None:
                below.discard(key)
                if not below:
                    del self.under[p]

    def pop(self, key: str, *default: Node) -> Node:  # type: ignore[override]
        if key in self:
            value = dict.__getitem__(self, key)
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def subtree(self, path: str) -> list[str]:
        """``path`` (if it is a key) and every key below it, parents first."""
        keys = list(self.under.get(path, ()))
        if path in self:
            keys.append(path)
        keys.sort(key=lambda k: (_depth(k), k))
        return keys


class StreamState:
    """The namespace replay of one send stream (shared by every qtree of the volume).

    ``base_root`` and ``target_root`` are the mounted base and target PCPIs.
    Thread-safe for concurrent :meth:`records` calls (one per qtree)."""

    def __init__(self, commands: Iterable[Command], base_root: str, target_root: str) -> None:
        self.base_root = base_root
        self.target_root = target_root
        self.cur: _PathDict = _PathDict()
        self.nodes: list[Node] = []
        self.by_ino: dict[int, Node] = {}  # base objects by their inode number
        self._bst: dict[str, os.stat_result | None] = {}
        self._tst: dict[str, os.stat_result | None] = {}
        self.commands = 0
        self.lost: str | None = None  # why the replay cannot be trusted (whole volume)
        self.lost_qtrees: dict[str, str] = {}  # qtree -> why its final names disagree with the target
        self._prepared = False
        self._lock = threading.Lock()
        self.finals: dict[int, list[str]] = {}
        self.index: dict[str, list[Node]] = {}
        for c in commands:
            self.commands += 1
            if self.lost is None:
                try:
                    self._one(c)
                except _Lost as exc:
                    self.lost = str(exc)

    # -- looking things up in the two PCPIs ------------------------------------
    def bstat(self, path: str) -> os.stat_result | None:
        """lstat of volume-relative ``path`` in the base PCPI ("" is its root)."""
        return _lstat_kept(self._bst, self.base_root, path)

    def tstat(self, path: str) -> os.stat_result | None:
        """lstat of volume-relative ``path`` in the target PCPI."""
        return _lstat_kept(self._tst, self.target_root, path)

    def base_of(self, path: str) -> str | None:
        """The base path of the object at current path ``path``; None for an object the stream made."""
        n = self.cur.get(path)
        if n is not None:
            return n.base_path
        p = path
        while "/" in p:
            p = _parent(p)
            anc = self.cur.get(p)
            if anc is not None:
                if anc.new or anc.kind != "d" or anc.base_path is None:
                    raise _Lost(
                        f"{path!r} is named inside {p!r}, which is not a directory of the base PCPI "
                        "and was not created by the stream before"
                    )
                return anc.base_path + path[len(p) :]
        return path

    # -- replay ----------------------------------------------------------------
    def _new_node(self, ino: int | None, kind: str | None, new: bool, base_path: str | None) -> Node:
        n = Node(len(self.nodes), ino, kind, new, base_path)
        self.nodes.append(n)
        return n

    def lookup(self, path: str) -> Node:
        n = self.cur.get(path)
        if n is not None:
            return n
        base = self.base_of(path)
        assert base is not None
        st = self.bstat(base)
        if st is None:
            raise _Lost(f"the stream names {path!r} (base path {base!r}), which is not in the base PCPI")
        n = self.by_ino.get(st.st_ino)
        if n is None:
            n = self._new_node(st.st_ino, walk.kind_of(st), False, base)
            self.by_ino[st.st_ino] = n
        n.base_names.add(base)
        self.cur[path] = n
        return n

    @staticmethod
    def _check_orphan(path: str, n: Node) -> None:
        """An orphan name carries its object's inode number: a mismatch means the replay is wrong."""
        m = _ORPHAN.match(path)
        if m is not None and n.ino is not None and int(m.group(1)) != n.ino:
            raise _Lost(f"the stream parks inode {m.group(1)} as {path!r}, but the replay has inode {n.ino} there")

    def _one(self, c: Command) -> None:
        name = c.name
        if name in ("SUBVOL", "SNAPSHOT", "END", "UNSPEC", "FILEATTR", "ENABLE_VERITY"):
            return
        if name in _KIND:
            path = _dec(c.path())
            ino = c.attrs.get("INO")
            n = self._new_node(ino if isinstance(ino, int) else None, _KIND[name], True, None)
            self._check_orphan(path, n)
            for k in self.cur.subtree(path):
                del self.cur[k]
            self.cur[path] = n
        elif name == "RENAME":
            old, new = _dec(c.path()), _dec(c.path("PATH_TO"))
            n = self.lookup(old)
            self._check_orphan(new, n)
            for k in self.cur.subtree(new):  # a replaced target loses its names
                del self.cur[k]
            moved = {k: self.cur.pop(k) for k in self.cur.subtree(old)}
            for k, m in moved.items():
                self.cur[new + k[len(old) :]] = m
        elif name == "LINK":
            path, existing = _dec(c.path()), _dec(c.path("PATH_LINK"))
            self.cur[path] = self.lookup(existing)
        elif name in ("UNLINK", "RMDIR"):
            path = _dec(c.path())
            self.lookup(path)
            for k in self.cur.subtree(path):
                del self.cur[k]
        elif name in _DATA_CMDS:
            n = self.lookup(_dec(c.path()))
            off = c.attrs.get("FILE_OFFSET", 0)
            if name == "WRITE":
                ln = len(c.attrs.get("DATA", b""))
            elif name == "UPDATE_EXTENT":
                ln = c.attrs.get("SIZE", 0)
            elif name == "CLONE":
                ln = c.attrs.get("CLONE_LEN", 0)
            elif name == "ENCODED_WRITE":
                ln = c.attrs.get("UNENCODED_FILE_LEN", 0)
            else:
                ln = c.attrs.get("SIZE", 0)
            n.data_dirty = True
            if ln:
                n.ranges.append((off, ln))
        elif name == "TRUNCATE":
            n = self.lookup(_dec(c.path()))
            size = c.attrs.get("SIZE", 0)
            n.data_dirty = True
            n.min_trunc = size if n.min_trunc is None else min(n.min_trunc, size)
        elif name in ("CHMOD", "CHOWN", "UTIMES"):
            self.lookup(_dec(c.path())).attr_dirty = True
        elif name in ("SET_XATTR", "REMOVE_XATTR"):
            self.lookup(_dec(c.path())).xattr_dirty = True
        else:
            raise CorruptStream(
                f"btrfs send command {name} is not understood by this version of coalesce",
                hint="a newer send protocol? run with the default protocol or upgrade coalesce",
            )

    # -- after the stream --------------------------------------------------------
    def prepare(self) -> None:
        """Final names, unmentioned hard links and the per-qtree index (once, on first use)."""
        with self._lock:
            if not self._prepared:
                self._prepare()
                self._prepared = True

    def _prepare(self) -> None:
        finals: dict[int, list[str]] = {}
        for path, n in self.cur.items():
            finals.setdefault(n.seq, []).append(path)
        for v in finals.values():
            v.sort(key=lambda p: (_depth(p), p))
        self.finals = finals
        if self.lost is not None:
            return
        for n in self.nodes:  # every final name holds its node's inode
            for f in finals.get(n.seq, ()):
                st = self.tstat(f)
                if (
                    st is None
                    or (n.ino is not None and st.st_ino != n.ino)
                    or (n.kind is not None and walk.kind_of(st) != n.kind)
                ):
                    q = _qtree_of(f)
                    self.lost_qtrees.setdefault(
                        q, f"the replay puts {n!r} at {f!r}, which the target PCPI does not hold there"
                    )
        self._find_other_names(finals)
        index: dict[str, list[Node]] = {}
        for n in self.nodes:
            qs = (
                {_qtree_of(p) for p in n.base_names}
                | {_qtree_of(p) for p in finals.get(n.seq, ())}
                | {_qtree_of(p) for p in n.others}
            )
            for q in qs:
                index.setdefault(q, []).append(n)
        self.index = index

    def _find_other_names(self, finals: dict[int, list[str]]) -> None:
        """Names of touched files that the stream never used (their other hard links)."""
        new_inos = {n.ino for n in self.nodes if n.new and n.ino is not None}
        wanted: list[Node] = []
        for n in self.nodes:
            if n.kind not in ("f", "l") or n.ino is None:
                continue
            known = finals.get(n.seq, [])
            if known:
                st = self.tstat(known[0])
                more = st is not None and st.st_nlink > len(known)
            elif n.new or n.ino in new_inos:
                more = False  # gone; a new object may hold its inode number now
            else:
                bst = self.bstat(n.base_path or "")
                more = n.dirty and bst is not None and bst.st_nlink > len(n.base_names)
            if more:
                wanted.append(n)
        if not wanted:
            return
        try:
            for n in wanted:
                assert n.ino is not None  # wanted holds only nodes with an inode number (above)
                known_set = set(finals.get(n.seq, ()))
                n.others = sorted(p for p in inopaths.ino_paths(self.target_root, n.ino) if p not in known_set)
        except OSError as exc:
            log.warning(
                "BTRFS_IOC_INO_PATHS is refused (%s): walking the target PCPI for %d hard-linked files",
                exc,
                len(wanted),
            )
            by_ino = {cast(int, n.ino): n for n in wanted}  # wanted: only nodes with an inode number
            found: dict[int, list[str]] = {}
            for rel, st in walk.iter_tree(self.target_root):
                if st.st_ino in by_ino and not stat.S_ISDIR(st.st_mode):
                    found.setdefault(st.st_ino, []).append(rel)
            for ino, n in by_ino.items():
                known_set = set(finals.get(n.seq, ()))
                n.others = sorted(p for p in found.get(ino, ()) if p not in known_set)

    def root_touched(self, qtree: str) -> bool:
        """True when the qtree's root directory itself was created, removed, replaced or moved."""
        n = self.cur.get(qtree)
        if n is not None and (n.new or n.base_path != qtree):
            return True
        st = self.bstat(qtree)
        if st is not None:
            b = self.by_ino.get(st.st_ino)
            if b is not None and qtree not in self.finals.get(b.seq, ()):
                return True
        return False

    def records(self, qtree: str) -> Iterator[object]:
        """The change records of ``qtree`` (without Begin/End)."""
        self.prepare()
        why = self.lost or self.lost_qtrees.get(qtree)
        if why is not None:
            log.warning(
                "btrfs send stream of qtree %r cannot be translated (%s): comparing the two PCPIs instead", qtree, why
            )
        if why is not None or self.root_touched(qtree):
            yield from walk.tree_diff(os.path.join(self.base_root, qtree), os.path.join(self.target_root, qtree))
            return
        yield from _Emitter(self, qtree).run()


class _Arriving(walk.FileData):
    """How files of an arriving subtree are created: a file that already lives in the qtree
    under another name (a hard link the stream never mentioned) is linked to it, and every
    hard link is made after the placements (step 4), when its target is in place."""

    def __init__(self, emitter: "_Emitter") -> None:
        self.e = emitter

    def created(self, root: str, rel: str, dest: str, st: os.stat_result) -> Iterator[object]:
        if st.st_nlink > 1:
            present = self.e.present_name(st.st_ino)
            if present is not None:
                self.e.links[(st.st_dev, st.st_ino)] = present
                self.e.later.append((dest, present))
                return iter(())
        return super().created(root, rel, dest, st)

    def linked(self, dest: str, existing: str) -> Iterator[object]:
        self.e.later.append((dest, existing))
        return iter(())


class _Emitter:
    """The records of one qtree, from the replay (see the module's docstring for the order)."""

    def __init__(self, st: StreamState, qtree: str) -> None:
        self.st = st
        self.q = qtree
        self.pre = qtree + "/"
        self.attrs: list = []
        self.parked: dict[str, str] = {}  # base rel path -> park name
        self.later: list[tuple[str, str]] = []  # (name, existing name) hard links made in step 4
        self.links: dict = {}  # (st_dev, st_ino) in the target -> rel path created/kept
        self.data = _Arriving(self)

    def inq(self, p: str | None) -> bool:
        return p is not None and p.startswith(self.pre)

    def rel(self, p: str) -> str:
        return p[len(self.pre) :]

    # -- identities -------------------------------------------------------------
    def ident_base(self, path: str) -> object:
        """The object at volume-relative ``path`` of the base PCPI."""
        st = self.st.bstat(path)
        if st is None:
            raise CorruptStream(f"btrfs translation: {path!r} is not in the base PCPI")
        return self.st.by_ino.get(st.st_ino) or ("ino", st.st_ino)

    def ident_final(self, path: str) -> object:
        """The object at volume-relative ``path`` once the stream is applied."""
        n = self.st.cur.get(path)
        if n is not None:
            return n
        base = self.st.base_of(path)
        assert base is not None
        return self.ident_base(base)

    def edge_base(self, path: str) -> tuple[object, str]:
        return self.ident_base(_parent(path)), _name(path)

    def edge_final(self, path: str) -> tuple[object, str]:
        return self.ident_final(_parent(path)), _name(path)

    def present_name(self, ino: int) -> str | None:
        """A name (qtree-relative) of untouched inode ``ino`` that the qtree held in the base PCPI
        at the same place, so that it exists in the replica; None if there is none."""
        try:
            names = inopaths.ino_paths(self.st.target_root, ino)
        except OSError:
            return None
        for f in sorted(names):
            if not f.startswith(self.pre) or f in self.st.cur:
                continue
            b = self.st.base_of(f)
            bst = self.st.bstat(b) if b is not None else None
            if b is not None and b.startswith(self.pre) and bst is not None and bst.st_ino == ino:
                return self.rel(f)
        return None

    def _park_name(self, seq: int) -> str:
        """A name in the qtree root that neither PCPI holds."""
        k = 0
        while True:
            name = f"{PARK_PREFIX}{seq}" + (f".{k}" if k else "")
            if self.st.bstat(self.pre + name) is None and self.st.tstat(self.pre + name) is None:
                return name
            k += 1

    def _resolve(self, brel: str) -> str:
        """Where base entry ``brel`` (qtree-relative) is after the parking renames."""
        p = brel
        while True:
            t = self.parked.get(p)
            if t is not None:
                return t + brel[len(p) :]
            if "/" not in p:
                return brel
            p = _parent(p)

    # -- the records ----------------------------------------------------------------
    def run(self) -> Iterator[object]:
        """The records of steps 1-6, then the qtree root's own attributes (its mtime moves in
        the replica whenever an entry of the root changes, parked names included)."""
        n = 0
        for rec in self._changes():
            n += 1
            yield rec
        yield from walk.root_records(
            os.path.join(self.st.base_root, self.q), os.path.join(self.st.target_root, self.q), force=n > 0
        )

    def _changes(self) -> Iterator[object]:
        st = self.st
        pre = self.pre
        park: dict[int, str] = {}  # node seq -> the base path it is parked from
        place: list[tuple[str, str, Node]] = []  # (final path, how, node): "parked", "mkdir", "tree", "file"
        removed: dict[str, str] = {}  # base path -> kind, files' removed names
        departed: list[str] = []  # base paths of departed directories
        changed: list[tuple[Node, str]] = []  # (node, final path) present in both PCPIs
        extra: list[tuple[str, str]] = []  # (final path, existing final path): step 4
        handled: set[str] = set()  # final paths placed one by one (not by a subtree walk)
        dev = (st.tstat("") or os.lstat(st.target_root)).st_dev
        for n in st.index.get(self.q, ()):
            if n.kind not in ("d", "f", "l"):
                continue  # special files are not replicated
            bq = [] if n.new else sorted(b for b in n.base_names if b.startswith(pre))
            fq = [f for f in st.finals.get(n.seq, ()) if f.startswith(pre)]
            if n.kind == "d":
                b = bq[0] if bq else None
                f = fq[0] if fq else None
                if b is not None and f is not None:
                    if self.edge_base(b) != self.edge_final(f):
                        park[n.seq] = b
                        place.append((f, "parked", n))
                        handled.add(f)
                    changed.append((n, f))
                elif b is not None:
                    departed.append(b)
                elif f is not None:
                    place.append((f, "mkdir" if n.new else "tree", n))
                    handled.add(f)
                continue
            finals = {self.edge_final(f): f for f in fq}
            kept_b = set()
            kept_f = []
            for b in bq:
                f = finals.get(self.edge_base(b))
                if f is not None:
                    kept_b.add(b)
                    kept_f.append(f)
            gone = [b for b in bq if b not in kept_b]
            added = [f for f in fq if f not in kept_f]
            # unmentioned names: present before too when their position was in the qtree then
            others = [u for u in n.others if u.startswith(pre)]
            stayed = [u for u in others if self.inq(st.base_of(u))]
            anchor = kept_f[0] if kept_f else (stayed[0] if stayed else None)
            handled.update(added)
            if anchor is not None:
                for b in gone:
                    removed[b] = n.kind
                extra.extend((f, anchor) for f in added)
                changed.append((n, anchor))
                first = anchor
            elif gone and added:
                park[n.seq] = gone[0]
                for b in gone[1:]:
                    removed[b] = n.kind
                place.append((added[0], "parked", n))
                extra.extend((f, added[0]) for f in added[1:])
                changed.append((n, added[0]))
                first = added[0]
            elif gone:
                for b in gone:
                    removed[b] = n.kind
                continue
            elif added:
                place.append((added[0], "file", n))  # its creation registers it in self.links
                extra.extend((f, added[0]) for f in added[1:])
                continue
            else:
                continue
            if n.ino is not None:  # names met in arriving subtrees link to it
                self.links[(dev, n.ino)] = self.rel(first)

        # 1. park moved objects, deepest base path first
        for seq, b in sorted(park.items(), key=lambda t: (-_depth(t[1]), t[1])):
            tmp = self._park_name(seq)
            yield Rename(old=self.rel(b), new=tmp)
            self.parked[self.rel(b)] = tmp

        # 2. removed names, and departed directories with their whole base subtrees
        for b in departed:
            self._collect_subtree(b, removed)
        for b in sorted(removed, key=lambda p: (-_depth(p), p)):
            cur = self._resolve(self.rel(b))
            yield RmDir(path=cur) if removed[b] == "d" else Unlink(path=cur)

        # 3. parked objects and arrivals, shallowest final path first
        place.sort(key=lambda t: (_depth(t[0]), t[0]))
        # the data of new regular files is read from the target PCPI: ask for it ahead
        ahead = walk.ReadAhead(
            [(os.path.join(st.target_root, f), 0) for f, how, n in place if how == "file" and n.kind == "f"]
        )
        try:
            for final, how, n in place:
                frel = self.rel(final)
                if how == "file" and n.kind == "f":
                    ahead.next()
                if how == "parked":
                    yield Rename(old=self.parked[self.rel(park[n.seq])], new=frel)
                    continue
                tst = st.tstat(final)
                if tst is None or walk.kind_of(tst) is None:
                    continue
                if how == "mkdir":
                    yield MkDir(path=frel, mode=tst.st_mode & 0o7777)
                    yield from walk.xattr_records(frel, {}, walk.read_xattrs(os.path.join(st.target_root, final)))
                    self.attrs.append(walk.setattr_record(frel, tst))
                else:
                    yield from walk.create_records(
                        st.target_root,
                        final,
                        dest_rel=frel,
                        links=self.links,
                        attrs_out=self.attrs,
                        skip=lambda p: p in handled,
                        st=tst,
                        data=self.data,
                    )
        finally:
            ahead.close()

        # 4. further names of placed and kept objects
        for f, existing in sorted(extra):
            yield HardLink(path=self.rel(f), existing=self.rel(existing))
        for f, existing in self.later:  # in the order met: a name links to one made before it
            yield HardLink(path=f, existing=existing)

        # 5. data, xattrs and attributes of objects present in both PCPIs
        # data commands change regular files only
        ahead = walk.ReadAhead(
            [(os.path.join(st.target_root, f), min(n.ranges)[0] if n.ranges else 0) for n, f in changed if n.data_dirty]
        )
        try:
            for n, final in changed:
                if n.data_dirty:
                    ahead.next()
                frel = self.rel(final)
                tst = st.tstat(final)
                bpath = n.base_path or ""
                bst = st.bstat(bpath)
                if tst is None or bst is None:
                    continue
                if n.data_dirty and stat.S_ISREG(tst.st_mode):
                    yield from self._data(final, frel, n, bst.st_size, tst.st_size)
                if n.xattr_dirty and walk.kind_of(tst) != "l":
                    yield from walk.xattr_records(
                        frel,
                        walk.read_xattrs(os.path.join(st.base_root, bpath)),
                        walk.read_xattrs(os.path.join(st.target_root, final)),
                    )
                if stat.S_ISLNK(tst.st_mode) and walk.readlink_path(
                    os.path.join(st.base_root, bpath)
                ) != walk.readlink_path(os.path.join(st.target_root, final)):
                    yield Unlink(path=frel)
                    target = walk.readlink_path(os.path.join(st.target_root, final))
                    yield Symlink(path=frel, target=os.fsdecode(target))
                    self.attrs.append(walk.setattr_record(frel, tst))
                elif n.data_dirty or (n.attr_dirty and stat.S_ISDIR(tst.st_mode)) or walk.attrs_differ(bst, tst):
                    # data written or entries changed in the replica move its mtime there, even where
                    # the source's mtime ends where it began (set back, or the same clock tick); a file
                    # whose inode only changed elsewhere (a link removed outside the qtree) has none
                    self.attrs.append(walk.setattr_record(frel, tst))
        finally:
            ahead.close()

        yield from walk.sorted_attrs(self.attrs)

    def _collect_subtree(self, top: str, out: dict[str, str]) -> None:
        """``top`` (a departed directory) and everything below it in the base PCPI, except what was parked."""
        stack = [top]
        while stack:
            b = stack.pop()
            if self.rel(b) in self.parked or b in out:
                continue
            bst = self.st.bstat(b)
            k = walk.kind_of(bst) if bst is not None else None
            if k is None:
                continue
            out[b] = k
            if k == "d":
                stack.extend(walk.join(b, name) for name in walk.listdir_sorted(os.path.join(self.st.base_root, b)))

    def _data(self, final: str, frel: str, n: Node, bsize: int, tsize: int) -> Iterator[object]:
        """The dirty ranges of a changed file, read from the target PCPI (holes kept).

        Records cannot punch a hole: a hole inside the old file is kept by a
        Truncate below it followed by the target's data segments only, from
        there to the end of file (the Truncate drops every later byte, changed
        or not).  Where to truncate, if anywhere, is :func:`_cut`'s choice; the
        dirty ranges below it are overwritten byte for byte (zeros included).
        A last range that reaches the old end of file is cut, except one of at
        most one Write (:data:`_OVERWRITE_MAX`) that holds no hole, the
        rewritten small file: its Truncate to 0 cost a record, a system call and
        a flush of the file when the applier closes it (btrfs flushes a file
        truncated to 0 at close); opening, truncating, writing and closing
        10,000 4 KiB files took 0.40-0.44 s of CPU, 0.18-0.19 s without the
        truncation (docs/benchmarks-journal.md, "Profiled and fixed: throughput on btrfs").  For a large file both ways measured the same (the flush
        only moves from the close to the destination PCPI), so larger
        ranges keep the Truncate.  The final Truncate comes only when the size
        the records leave differs from the target's.
        """
        mt = n.min_trunc
        cur_size = mt if mt is not None and mt < bsize else bsize
        ranges = list(n.ranges)
        if mt is not None and tsize > mt:
            ranges.append((mt, tsize - mt))
        merged: list[tuple[int, int]] = []
        for off, ln in sorted(ranges):
            end = min(off + ln, tsize)
            if end <= off:
                continue
            if merged and off <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((off, end))
        fd = walk.open_path(os.path.join(self.st.target_root, final))
        try:
            cut = _cut(fd, merged, cur_size, tsize)
            if cut is not None:
                cur_size = cut
            if cur_size < bsize:
                yield Truncate(path=frel, size=cur_size)
            size = cur_size  # the file's size after the records so far
            for start, end in merged:
                if cut is not None and start >= cut:
                    break
                overwrite_end = min(end, cur_size)
                pos = start
                while pos < overwrite_end:
                    k = min(walk.CHUNK, overwrite_end - pos)
                    data = os.pread(fd, k, pos)
                    if not data:
                        break
                    yield Write(path=frel, offset=pos, data=data)
                    pos += len(data)
                if end > max(start, cur_size):
                    for w in walk.write_records(frel, fd, max(start, cur_size), end, skip_zero=False):
                        size = max(size, w.offset + len(w.data))
                        yield w
            if cut is not None:
                for w in walk.write_records(frel, fd, cut, tsize, skip_zero=False):
                    size = max(size, w.offset + len(w.data))
                    yield w
        finally:
            os.close(fd)
        if size != tsize:
            yield Truncate(path=frel, size=tsize)


def _data_bytes(fd: int, start: int, end: int, limit: int) -> int:
    """Bytes of data (not hole) in ``[start, end)`` of ``fd``, counted until they pass ``limit``."""
    total = 0
    for _, length in walk.data_segments(fd, start, end):
        total += length
        if total > limit:
            break
    return total


def _cut(fd: int, merged: list[tuple[int, int]], cur_size: int, tsize: int) -> int | None:
    """Where :meth:`_Emitter._data` truncates the old file (of ``cur_size`` bytes) before writing the
    target ``fd`` (of ``tsize`` bytes, dirty ranges ``merged``, sorted and disjoint); None: nowhere.

    The start of a dirty range that holds holes below ``cur_size``, when truncating there writes fewer
    bytes than overwriting: the zeros the overwrites of this range and the later ones would write
    against the unchanged data after its start, which the rewrite must write too (a sparse file
    rewritten with its data elsewhere: the no-data stream names its whole hole as changed, and a
    1 TiB one would fill the destination with zeros).  Else the start of a last range that reaches
    ``cur_size`` and is larger than :data:`_OVERWRITE_MAX` or holds a hole (see ``_data``)."""
    inside = [(s, min(e, cur_size)) for s, e in merged if s < cur_size]
    holes = [e - s - _data_bytes(fd, s, e, e - s) for s, e in inside]
    cut = None
    if merged and merged[-1][0] < cur_size <= merged[-1][1]:
        s, e = inside[-1]
        if e - s > _OVERWRITE_MAX or holes[-1]:
            cut = s
    zeros = sum(holes)
    if not zeros:
        return cut
    unchanged = 0  # data outside the dirty ranges from range k's start to the end of file
    in_holes = 0  # hole bytes the overwrites of range k and later ones would write
    best = 0
    for k in range(len(merged) - 1, -1, -1):
        gap_end = merged[k + 1][0] if k + 1 < len(merged) else tsize
        unchanged += _data_bytes(fd, merged[k][1], gap_end, zeros - unchanged)
        if unchanged >= zeros:
            break  # no earlier range saves bytes either
        if k < len(inside):
            in_holes += holes[k]
            if unchanged - in_holes < best:
                best = unchanged - in_holes
                cut = merged[k][0] if cut is None else min(cut, merged[k][0])
    return cut
