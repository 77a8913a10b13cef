"""The write-anywhere file system of the sim backend (patent Background, Figs. 1-3).

Layout (see docs/sim.md for the picture):

* Volume blocks (vbn) live on the RAID-4 device of :mod:`.raid`.  Stripes 0 and
  1 hold the two alternating superblock copies (each written on every data
  disk of its stripe); everything else is allocated in whole free stripes.
* The **superblock** holds the CP counter, the geometry, the stripe high-water
  mark, the **root inode** of the active file system (the inode file's buffer
  tree) and the root of the volume **meta file** (PCPI table + export table),
  protected by a SHA-256.  CP ``n`` writes copy ``n % 2``.
* **Inodes** (128 bytes, 32 per block) live in the inode file.  Every inode has
  a data buffer tree (``height``/``top``: height 1 = one data block, height h =
  an indirect block of 512 pointers over 512^(h-2)-block children) and an
  xattr tree.  Directories are files of ``(name, ino)`` entries; symlinks keep
  their target as data.  Every inode carries its **qtree id** (the inode
  number of its qtree's root directory) and a primary parent.
* A **consistency point** (:meth:`SimFS.commit`) writes every dirty block to
  freshly allocated free stripes (never over a live block), fsyncs the disks,
  then writes the superblock copy and fsyncs it: the root switch is atomic.
  A power cut (:meth:`SimFS.power_cut`) loses what was not flushed, so the
  volume reopens at the last CP whose superblock was flushed (or at the one in
  flight, if its superblock happened to reach the disk).
* A **PCPI** is a copy of the root inode (name, creation CP) in the meta file.
* The **block map** is a lazy reference count per block (references from parent
  blocks, inode records and roots; Rodeh, "B-trees, shadowing and clones"):
  taking a PCPI adds one reference to the inode file's top block; deleting it
  drops that reference and frees, recursively, only the blocks no one else
  references.  Neither walks the volume.  The map is derived at mount by a walk
  over *metadata* blocks only (indirect and inode-file blocks; data blocks are
  leaves and never read) and kept in memory; blocks freed in a CP are reusable
  only after that CP's superblock is on disk.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import random
import struct
import threading
import time
from array import array
from typing import Any, Iterator, Self

from coalesce_core.errors import BackendError
from coalesce_core.stream.records import MAX_FILE_SIZE

from .dirblocks import BlockMemo, DirOverlay, block_entries, decode_dir, fsname
from .raid import BS, ZERO, PowerCut, Raid, SimCrash

PPB = BS // 8  # pointers per indirect block
ISZ = 128  # inode size
IPB = BS // ISZ  # inodes per inode-file block
MAX_PCPIS = 255
ROOT_INO = 1
FIRST_INO = 2
SB_STRIPES = 2  # stripes 0 and 1: superblock copies A and B
MAGIC = b"CSIMSB01"
VERSION = 1

FREE, REG, DIR, LNK, ROOTK, METAK = 0, 1, 2, 3, 4, 5
KIND_NAMES = {REG: "file", DIR: "dir", LNK: "symlink"}

_INODE = struct.Struct("<4B8I2Q2q2Q")
QTREE_OFF = 24  # offset of the qtree id in a packed inode (after 4 B and 5 I fields)
_QID = struct.Struct("<I")
_TREES = struct.Struct("<BBB65xQQ")  # kind, height, xheight, ..., top, xtop of a packed inode (no full decode)
_SB = struct.Struct("<8sIIIQQQ")
_PTRS = struct.Struct(f"<{PPB}Q")


class Inode:
    __slots__ = (
        "kind",
        "height",
        "xheight",
        "flags",
        "mode",
        "uid",
        "gid",
        "nlink",
        "gen",
        "qtree",
        "parent",
        "purg",
        "size",
        "xsize",
        "mtime",
        "ctime",
        "top",
        "xtop",
    )
    # the fields of a packed inode (_INODE), all integers; set by __init__ and unpack through __slots__
    kind: int
    height: int
    xheight: int
    flags: int
    mode: int
    uid: int
    gid: int
    nlink: int
    gen: int
    qtree: int
    parent: int
    purg: int
    size: int
    xsize: int
    mtime: int
    ctime: int
    top: int
    xtop: int

    def __init__(self, kind: int = FREE, **kw: int) -> None:
        self.kind = kind
        for f in self.__slots__[1:]:
            setattr(self, f, kw.get(f, 0))

    @classmethod
    def unpack(cls, buf: bytes, off: int = 0) -> "Inode":
        obj = cls.__new__(cls)
        for f, v in zip(cls.__slots__, _INODE.unpack_from(buf, off)):
            setattr(obj, f, v)
        return obj

    def pack(self) -> bytes:
        return _INODE.pack(*(getattr(self, f) for f in self.__slots__)).ljust(ISZ, b"\0")

    def copy(self) -> "Inode":
        return Inode.unpack(self.pack())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Inode) and self.pack() == other.pack()

    def __repr__(self) -> str:
        return "Inode(" + ", ".join(f"{f}={getattr(self, f)}" for f in self.__slots__ if getattr(self, f)) + ")"


def nblocks(size: int) -> int:
    return (size + BS - 1) // BS


def height_for(nb: int) -> int:
    if nb == 0:
        return 0
    h, cap = 1, 1
    while cap < nb:
        cap *= PPB
        h += 1
    return h


def encode_xattrs(x: dict[str, bytes]) -> bytes:
    out = bytearray()
    for k in sorted(x, key=fsname):
        kb = fsname(k)
        out += struct.pack("<HI", len(kb), len(x[k])) + kb + x[k]
    return bytes(out)


def decode_xattrs(data: bytes) -> dict[str, bytes]:
    out, off = {}, 0
    while off + 6 <= len(data):
        n, m = struct.unpack_from("<HI", data, off)
        off += 6
        out[data[off : off + n].decode("utf-8", "surrogateescape")] = data[off + n : off + n + m]
        off += n + m
    return out


def blocks_of(data: bytes) -> dict[int, bytes]:
    return {i: data[i * BS : (i + 1) * BS].ljust(BS, b"\0") for i in range(nblocks(len(data)))}


class View:
    """Read-only view of one file-system image (a PCPI or the committed active FS)."""

    def __init__(self, fs: "SimFS", root: Inode) -> None:
        self.fs = fs
        self.root = root

    def inode(self, ino: int) -> Inode | None:
        if ino <= 0 or ino >= self.root.size:
            return None
        bi, slot = divmod(ino, IPB)
        p = self.fs.get_ptr(self.root.top, self.root.height, bi)
        if not p:
            return None
        rec = Inode.unpack(self.fs.read(p), slot * ISZ)
        return rec if rec.kind else None

    def existing(self, ino: int) -> Inode:
        """:meth:`inode` of an inode the caller knows is in use (a directory entry or a qtree root)."""
        rec = self.inode(ino)
        assert rec is not None, ino
        return rec

    def data(self, rec: Inode) -> bytes:
        return self.fs.read_tree(rec.top, rec.height, rec.size)

    def dir(self, rec: Inode) -> dict[str, int]:
        if not rec.top:
            return {}
        hit = self.fs.dircache.get(rec.top)
        if hit is not None and hit[0] == (rec.height, rec.size):
            return hit[1]
        d = decode_dir(self.data(rec))
        fs = self.fs
        if len(fs.dircache) > 4096 or fs.dircache_entries > fs.DIRCACHE_ENTRIES:
            fs.dircache.clear()
            fs.dircache_entries = 0
        fs.dircache[rec.top] = ((rec.height, rec.size), d)
        fs.dircache_entries += len(d)
        return d

    def dir_entries(self, rec: Inode) -> Iterator[tuple[bytes, int]]:
        """``(name, ino)`` of a directory's entries in the order they are stored (by the bytes of
        the name: :mod:`.dirblocks`), one block read at a time: a large directory is never
        decoded whole (the diff's comparison of two versions of it, :mod:`.diff`)."""
        for fbn, vbn in self.fs.leaves(rec.top, rec.height):
            if fbn * BS >= rec.size:
                break
            yield from block_entries(self.fs.read(vbn), min(BS, rec.size - fbn * BS))

    def xattrs(self, rec: Inode) -> dict[str, bytes]:
        if not rec.xtop:
            return {}
        return decode_xattrs(self.fs.read_tree(rec.xtop, rec.xheight, rec.xsize))

    def qtree_root(self, name: str) -> int | None:
        root = self.inode(ROOT_INO)
        if root is None:
            return None
        ino = self.dir(root).get(name)
        if ino is None:
            return None
        rec = self.inode(ino)
        return ino if rec is not None and rec.kind == DIR else None

    def qtrees(self) -> list[str]:
        root = self.inode(ROOT_INO)
        if root is None:
            return []
        return sorted(n for n, i in self.dir(root).items() if (r := self.inode(i)) is not None and r.kind == DIR)


class SimFS:
    """One open sim volume: RAID device, buffer cache, block map, active FS and PCPIs."""

    CACHE_BLOCKS = 8192  # 32 MiB of cached blocks per open volume
    DIRTY_LIMIT = 64 << 20  # an apply writes an extra CP when this much data is dirty
    #: ... or when its overlay holds this many inodes (about 1 KiB each with their entries): an
    #: update creating a million small files holds a bounded overlay, not one inode per file
    OVERLAY_INODES = 16384
    #: decoded directories are cached up to 4096 directories or this many entries in all (a
    #: directory of many entries, or many of them, does not hold the process's memory)
    DIRCACHE_ENTRIES = 65536
    #: the capability VolumeHandle.max_file_size: a buffer tree addresses 512^(h-1) blocks at any
    #: height h (2^63 bytes is height 7) and the inode's size is a u64; the stream's 2^63 - 1 bounds it
    max_file_size: int | None = MAX_FILE_SIZE
    opens: int  # handles open_sim gave out (set and counted there)
    fill: int | None  # the stripe a CP is filling (set by _cp_begin)
    fill_idx: int

    def __init__(self, path: str, *, fsync: bool = True, readonly: bool = False) -> None:
        """Mount the volume at ``path``: for writing (the handle holds the volume's shared lock,
        :mod:`.volumelock`), or ``readonly``: the newest CP on the media is read as it is (no
        superblock repair, no block map: :meth:`derive_block_map`), and nothing is ever written."""
        self.path = os.path.abspath(path)
        self.readonly = readonly
        self.raid = Raid(self.path, fsync=fsync, readonly=readonly, lock=not readonly)
        self.lock = threading.RLock()
        self.broken: BaseException | None = None
        self.closed = False
        self.stats = {"block_reads": 0, "cache_misses": 0, "change_index_builds": 0, "change_index_hits": 0, "cps": 0}
        self.cache: dict[int, bytes] = {}
        self.dircache: dict[int, tuple] = {}  # dir top vbn -> ((height, size), entries)
        self.dircache_entries = 0  # entries decoded into it since it was last emptied
        self.dirblocks = BlockMemo()  # the last directory blocks an update looked names up in
        self.cp_cond = threading.Condition(self.lock)
        self.cp_failures = 0  # CPs that failed (volume remounted): wait_durable's callers lost changes
        self.cp_error = ""
        self.idx_lock = threading.Lock()
        self.change_idx: dict[tuple, dict] = {}  # (root a, root b) -> ops.change_index
        self.idx_tops: dict[int, set[tuple]] = {}  # top vbn -> keys of change_idx naming it
        self._mount()

    def __repr__(self) -> str:
        return f"SimFS(sim://{self.path})"

    # ---------------------------------------------------------------- format / mount
    @classmethod
    def format(cls, path: str, *, ndata: int = 3, max_bytes: int = 0, fsync: bool = True) -> Self:
        Raid.format(path, ndata)
        raid = Raid(path, fsync=fsync)
        root = Inode(ROOTK, size=FIRST_INO)
        meta = Inode(METAK)
        max_stripes = (max_bytes // (BS * ndata)) if max_bytes else 0
        sb = cls._sb_bytes(0, ndata, SB_STRIPES, max_stripes, root, meta)
        for s in range(SB_STRIPES):
            raid.write_stripe(s, [sb] * ndata)
        raid.sync()
        raid.close()
        fs = cls(path, fsync=fsync)
        return fs

    @staticmethod
    def _sb_bytes(cp: int, ndata: int, hwm: int, max_stripes: int, root: Inode, meta: Inode) -> bytes:
        body = _SB.pack(MAGIC, VERSION, BS, ndata, cp, hwm, max_stripes) + root.pack() + meta.pack()
        return (body + hashlib.sha256(body).digest()).ljust(BS, b"\0")

    def _read_superblock(self) -> tuple:
        best = None
        n = self.raid.ndata
        for s in range(SB_STRIPES):
            copies = [self.raid.read_stripe_copy(s, d) for d in range(n)]
            if all(c is None for c in copies):
                copies = [self.raid.read(s * n)]
            for blk in copies:
                if blk is None:
                    continue
                blen = _SB.size + 2 * ISZ
                body, digest = blk[:blen], blk[blen : blen + 32]
                if body[:8] != MAGIC or hashlib.sha256(body).digest() != digest:
                    continue
                _m, ver, bs, ndata, cp, hwm, maxs = _SB.unpack_from(body)
                if ver != VERSION or bs != BS or ndata != n:
                    continue
                if best is None or cp > best[0]:
                    best = (cp, hwm, maxs, Inode.unpack(body, _SB.size), Inode.unpack(body, _SB.size + ISZ), blk)
        if best is None:
            raise BackendError(f"no valid superblock in {self.path}", hint="the volume is damaged or not a sim volume")
        if not self.readonly:
            self._heal_superblock(best[0] % SB_STRIPES, best[5])
        return best[:5]

    def _heal_superblock(self, stripe: int, blk: bytes) -> None:
        """After a crash in the middle of a superblock write, some copies (or the parity) of the
        newest superblock stripe may be old: rewrite the whole stripe so a later disk failure
        cannot bring the older copy back."""
        n = self.raid.ndata
        copies = [self.raid.read_stripe_copy(stripe, d) for d in range(n + 1)]
        want = [blk] * n
        if all(c is None or c == blk for c in copies[:n]) and (copies[n] is None or copies[n] == self._parity(want)):
            return
        self.raid.write_stripe(stripe, want)
        self.raid.sync()

    @staticmethod
    def _parity(blocks: list[bytes]) -> bytes:
        from .raid import xor_blocks

        return xor_blocks(blocks)

    def _mount(self) -> None:
        self.cp, self.hwm, self.max_stripes, self.root, self.meta_rec = self._read_superblock()
        self.cp_built = self.cp  # CPs built (== self.cp, the CPs on disk, unless one is flushing)
        self.flushing = False
        self.cache.clear()
        self.dircache.clear()
        self.dirblocks.clear()
        with self.idx_lock:
            self.change_idx.clear()
            self.idx_tops.clear()
        self.meta = json.loads(self.read_tree(self.meta_rec.top, self.meta_rec.height, self.meta_rec.size) or b"{}")
        self.meta.setdefault("pcpis", [])
        self.meta.setdefault("exports", {})
        self.rc: dict[int, int] = {}
        self.suse: dict[int, int] = {}
        self.free_stripes: list[int] = []
        #: blocks freed since the last CP was built, reusable once the next CP is on disk: 8 bytes
        #: each (releasing a PCPI can free millions; a block is freed at most once per CP)
        self.pending = array("Q")
        self._reset_overlay()
        if self.readonly:
            return
        self.derive_block_map()
        if self.view().inode(ROOT_INO) is None:
            self._a_put(ROOT_INO, Inode(DIR, mode=0o755, nlink=2, parent=ROOT_INO, mtime=time.time_ns()))
            self.commit()

    def derive_block_map(self) -> None:
        """The block map and the stripe use counts, from one walk over the metadata of every image
        (a read-only mount derives them only when asked: ``coalesce sim info``)."""
        self.rc = self._count_refs()
        self.suse = {}
        for vbn in self.rc:
            s = vbn // self.raid.ndata
            self.suse[s] = self.suse.get(s, 0) + 1
        self.free_stripes = [s for s in range(SB_STRIPES, self.hwm) if s not in self.suse]
        heapq.heapify(self.free_stripes)

    def _reset_overlay(self) -> None:
        self.ov_inodes: dict[int, Inode | None] = {}
        self.dirty: set[int] = set()
        self.ov_dirs: dict[int, DirOverlay] = {}
        self.dirty_dirs: set[int] = set()
        self.ov_x: dict[int, dict[str, bytes]] = {}
        self.dirty_x: set[int] = set()
        self.ov_data: dict[int, dict[int, bytes]] = {}
        self.floor: dict[int, int] = {}
        self.meta_dirty = False
        self.dirty_bytes = 0
        self.next_ino = self.root.size

    def pcpi_roots(self) -> dict[str, Inode]:
        return {p["name"]: Inode.unpack(bytes.fromhex(p["root"])) for p in self.meta["pcpis"]}

    def _roots(self) -> list[tuple[Inode, str]]:
        return [(self.root, "i"), (self.meta_rec, "m")] + [(r, "i") for r in self.pcpi_roots().values()]

    def _count_refs(self) -> dict[int, int]:
        rc: dict[int, int] = {}
        stack: list[tuple[int, str, int]] = []

        def ref(p: int, k: str, lv: int) -> None:
            c = rc.get(p)
            if c is None:
                rc[p] = 1
                if lv > 0 or k == "i":
                    stack.append((p, k, lv))
            else:
                rc[p] = c + 1

        for rec, k in self._roots():
            if rec.top:
                ref(rec.top, k, rec.height - 1)
        while stack:
            for c in self._children(*stack.pop()):
                ref(*c)
        return rc

    def _children(self, p: int, k: str, lv: int) -> Iterator[tuple[int, str, int]]:
        if lv > 0:
            for c in _PTRS.unpack(self.read(p)):
                if c:
                    yield c, k, lv - 1
        elif k == "i":
            blk = self.read(p)
            for o in range(0, BS, ISZ):
                if blk[o]:
                    _kind, h, xh, top, xtop = _TREES.unpack_from(blk, o)
                    if top:
                        yield top, "f", h - 1
                    if xtop:
                        yield xtop, "f", xh - 1

    # ---------------------------------------------------------------- blocks
    def check(self) -> None:
        if self.closed:
            raise BackendError(f"sim volume {self.path} was closed", hint="open the volume again")
        if self.broken is not None:
            raise BackendError(
                f"sim volume {self.path} crashed ({self.broken}); reopen it",
                hint="open the volume again: it restarts at its last complete consistency point",
            )

    def power_cut(self, rng: random.Random | None = None) -> dict[str, int]:
        """Cut the power of the volume (:meth:`Raid.power_cut`): the writes not yet flushed are
        lost (with ``rng``: a random subset, some torn), nothing more reaches the disks, the handle
        refuses work and the volume's in-memory state (the changes since the last CP, a CP being
        written) is gone.  Reopening mounts the last CP whose superblock is on the media.  Every
        primitive that returned before the cut had its CP flushed, so none of its work is lost."""
        fates = self.raid.power_cut(rng)
        if self.broken is None:
            self.broken = self.raid.dead
        return fates

    def read(self, vbn: int) -> bytes:
        self.stats["block_reads"] += 1
        b = self.cache.get(vbn)
        if b is None:
            self.stats["cache_misses"] += 1
            b = self.raid.read(vbn)
            self._cache_put(vbn, b)
        return b

    def _cache_put(self, vbn: int, b: bytes) -> None:
        if len(self.cache) >= self.CACHE_BLOCKS:
            for k in list(self.cache)[: self.CACHE_BLOCKS // 4]:
                del self.cache[k]
        self.cache[vbn] = b

    def ptrs(self, vbn: int) -> tuple[int, ...]:
        return _PTRS.unpack(self.read(vbn))

    def get_ptr(self, top: int, height: int, fbn: int) -> int:
        if height == 0 or fbn >= PPB ** (height - 1):
            return 0
        node = top
        for level in range(height - 1, 0, -1):
            if not node:
                return 0
            idx = (fbn // PPB ** (level - 1)) % PPB
            node = struct.unpack_from("<Q", self.read(node), idx * 8)[0]
        return node

    def leaves(self, top: int, height: int, base: int = 0) -> Iterator[tuple[int, int]]:
        """(fbn, vbn) of every non-hole data block of a tree."""
        if not top or height == 0:
            return
        if height == 1:
            yield base, top
            return
        span = PPB ** (height - 2)
        for i, c in enumerate(self.ptrs(top)):
            if c:
                yield from self.leaves(c, height - 1, base + i * span)

    def read_tree(self, top: int, height: int, size: int) -> bytes:
        if size == 0:
            return b""
        buf = bytearray(nblocks(size) * BS)
        for fbn, vbn in self.leaves(top, height):
            if fbn * BS < len(buf):
                buf[fbn * BS : (fbn + 1) * BS] = self.read(vbn)
        return bytes(buf[:size])

    def view(self, snapshot: str | None = None) -> View:
        if snapshot is None:
            return View(self, self.root)
        roots = self.pcpi_roots()
        if snapshot not in roots:
            raise BackendError(
                f"PCPI {snapshot!r} does not exist on {self.path}", hint=f"PCPIs: {', '.join(sorted(roots)) or 'none'}"
            )
        return View(self, roots[snapshot])

    # ---------------------------------------------------------------- change index memo (ops.change_index)
    CHANGE_INDEXES = 8

    def remember_change_index(self, key: tuple, idx: dict) -> None:
        """Keep ``idx`` for the image pair ``key`` (caller holds idx_lock); the oldest goes past 8."""
        while len(self.change_idx) >= self.CHANGE_INDEXES:
            self._forget_change_index(next(iter(self.change_idx)))
        self.change_idx[key] = idx
        for top in (key[0], key[3]):
            self.idx_tops.setdefault(top, set()).add(key)

    def _forget_change_index(self, key: tuple) -> None:
        self.change_idx.pop(key, None)
        for top in (key[0], key[3]):
            keys = self.idx_tops.get(top)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.idx_tops[top]

    def _freed_top(self, p: int) -> None:
        """Block ``p`` is no longer allocated: drop the change indexes of images it was the top of."""
        with self.idx_lock:
            for key in list(self.idx_tops.get(p, ())):
                self._forget_change_index(key)

    # ---------------------------------------------------------------- block map
    def _incref(self, p: int) -> None:
        self.rc[p] += 1

    def _decref(self, p: int, k: str, lv: int) -> None:
        stack = [(p, k, lv)]
        while stack:
            p, k, lv = stack.pop()
            c = self.rc[p] - 1
            if c:
                self.rc[p] = c
                continue
            kids = list(self._children(p, k, lv))
            del self.rc[p]
            self.pending.append(p)
            if p in self.idx_tops:
                self._freed_top(p)
            stack.extend(kids)

    def _take_stripe(self) -> int:
        while self.free_stripes:
            s = heapq.heappop(self.free_stripes)
            if not self.suse.get(s) and s not in self.cp_stripes:
                return s
        if self.max_stripes and self.cp_hwm >= self.max_stripes:
            raise BackendError(
                f"sim volume {self.path} is full (ENOSPC: {self.max_stripes} stripes)",
                hint="delete PCPIs, purge purgatories, or create the volume larger",
            )
        s = self.cp_hwm
        self.cp_hwm += 1
        return s

    def _alloc(self, data: bytes) -> int:
        n = self.raid.ndata
        if self.fill is None or self.fill_idx == n:
            self.fill = self._take_stripe()
            self.fill_idx = 0
            self.cp_stripes[self.fill] = [ZERO] * n
        vbn = self.fill * n + self.fill_idx
        self.cp_stripes[self.fill][self.fill_idx] = data
        self.fill_idx += 1
        self.rc[vbn] = 1
        self.suse[self.fill] = self.suse.get(self.fill, 0) + 1
        self.new_blocks.add(vbn)
        self._cache_put(vbn, data)
        self.dircache.pop(vbn, None)
        self.dirblocks.forget(vbn)
        return vbn

    def _alloc_leaf(self, k: str, data: bytes) -> int:
        vbn = self._alloc(data)
        if k == "i":
            for o in range(0, BS, ISZ):
                if data[o]:
                    _kind, _h, _xh, top, xtop = _TREES.unpack_from(data, o)
                    for p in (top, xtop):
                        if p and p not in self.new_blocks:
                            self._incref(p)
        return vbn

    def _build(
        self,
        k: str,
        old_top: int,
        old_h: int,
        changes: dict[int, bytes],
        nb: int,
        floor: int,
        reuse_equal: bool = False,
    ) -> tuple[int, int]:
        """New buffer tree of ``nb`` blocks: the old tree (blocks < floor) overlaid with ``changes``."""
        new_h = height_for(nb)
        if new_h == 0:
            return 0, 0
        old: int | list
        old = old_top if old_h else 0
        if old and old_h > new_h:
            for _ in range(old_h - new_h):
                old = self.ptrs(old)[0] if old else 0
        elif old and old_h < new_h:
            for _ in range(new_h - old_h):
                old = [old] + [0] * (PPB - 1)
        items = sorted((f, d) for f, d in changes.items() if f < nb)
        return self._build_node(k, old, new_h - 1, 0, items, nb, floor, reuse_equal), new_h

    def _build_over(self, old_top: int, old_h: int, leaves: list[int]) -> tuple[int, int]:
        """New buffer tree over the data blocks ``leaves`` (allocated in this CP or kept from the old
        tree; no holes), in order: a directory whose blocks were split, merged or dropped moves
        the blocks after them.  An indirect block of the old tree (same height) that would come out
        the same is kept; a new one references its children (+1 on each block not new)."""
        h = height_for(len(leaves))
        if h == 0:
            return 0, 0
        # the old tree's indirect blocks by depth (0: its top), if it has the new tree's height
        olds: list[list[int]] = [[old_top] if old_top and old_h == h else []]
        for _ in range(h - 2):
            olds.append([c for p in olds[-1] for c in (self.ptrs(p) if p else (0,) * PPB)])
        level = leaves
        for lv in range(1, h):
            was_level = olds[h - 1 - lv]
            up: list[int] = []
            for j in range(0, len(level), PPB):
                kids = level[j : j + PPB]
                kids += [0] * (PPB - len(kids))
                was = was_level[j // PPB] if j // PPB < len(was_level) else 0
                if was and list(self.ptrs(was)) == kids:
                    up.append(was)
                    continue
                up.append(self._alloc(_PTRS.pack(*kids)))
                for p in kids:
                    if p and p not in self.new_blocks:
                        self._incref(p)
            level = up
        return level[0], h

    def _build_node(
        self, k: str, old, level: int, base: int, changes: list, nb: int, floor: int, reuse_equal: bool
    ) -> int:
        span = PPB**level
        if base >= floor:
            old = 0
        if base >= nb:
            return 0
        if not changes and isinstance(old, int) and base + span <= min(nb, floor):
            return old
        if level == 0:
            if changes:
                d = changes[-1][1]
                if k != "m" and d == ZERO:
                    return 0
                if reuse_equal and isinstance(old, int) and old and self.read(old) == d:
                    return old
                return self._alloc_leaf(k, d)
            return old if isinstance(old, int) else 0
        kids_old = old if isinstance(old, list) else (list(self.ptrs(old)) if old else [0] * PPB)
        cspan = PPB ** (level - 1)
        groups: dict[int, list] = {}
        for f, d in changes:
            groups.setdefault((f - base) // cspan, []).append((f, d))
        out = [0] * PPB
        for i in range(PPB):
            cb = base + i * cspan
            if cb >= nb:
                break
            co = kids_old[i]
            ch = groups.get(i)
            if not ch and not co:
                continue
            out[i] = self._build_node(k, co, level - 1, cb, ch or [], nb, floor, reuse_equal)
        if not any(out):
            return 0
        if isinstance(old, int) and old and out == kids_old:
            return old
        vbn = self._alloc(_PTRS.pack(*out))
        for p in out:
            if p and p not in self.new_blocks:
                self._incref(p)
        return vbn

    # ---------------------------------------------------------------- active FS overlay
    def a_inode(self, ino: int) -> Inode | None:
        if ino in self.ov_inodes:
            return self.ov_inodes[ino]
        rec = self.view().inode(ino)
        self.ov_inodes[ino] = rec
        return rec

    def a_existing(self, ino: int) -> Inode:
        """:meth:`a_inode` of an inode the caller knows is in use (a directory entry, a qtree root
        or its purgatory); unlike :meth:`a_touch` it does not mark it dirty."""
        rec = self.a_inode(ino)
        assert rec is not None, ino
        return rec

    def _a_put(self, ino: int, rec: Inode | None) -> None:
        self.ov_inodes[ino] = rec
        self.dirty.add(ino)

    def a_touch(self, ino: int) -> Inode:
        rec = self.a_inode(ino)
        assert rec is not None
        self.dirty.add(ino)
        return rec

    def a_dir(self, ino: int) -> DirOverlay:
        """Directory ``ino`` as the overlay has it: its block pointers, with the blocks changed
        since the last CP decoded (:mod:`.dirblocks`; never decoded whole)."""
        d = self.ov_dirs.get(ino)
        if d is None:
            rec = self.a_inode(ino)
            assert rec is not None and rec.kind == DIR, (ino, rec)
            d = DirOverlay(self, rec.top, rec.height, rec.size)
            self.ov_dirs[ino] = d
        return d

    def a_dir_set(self, dino: int, name: str, ino: int | None) -> None:
        d = self.a_dir(dino)
        if ino is None:
            d.remove(name)
        else:
            d.set(name, ino)
        self.dirty_dirs.add(dino)
        self.dirty.add(dino)

    def a_xattrs(self, ino: int) -> dict[str, bytes]:
        x = self.ov_x.get(ino)
        if x is None:
            rec = self.a_inode(ino)
            assert rec is not None
            x = self.view().xattrs(rec) if rec.xtop else {}
            self.ov_x[ino] = x
        return x

    def a_set_xattr(self, ino: int, name: str, value: bytes | None) -> None:
        x = self.a_xattrs(ino)
        if value is None:
            x.pop(name, None)
        else:
            x[name] = value
        self.dirty_x.add(ino)
        self.dirty.add(ino)

    def a_new(self, kind: int, mode: int, qtree: int, parent: int) -> int:
        ino = self.next_ino
        self.next_ino += 1
        now = time.time_ns()
        self._a_put(
            ino,
            Inode(
                kind,
                mode=mode & 0o7777,
                nlink=2 if kind == DIR else 1,
                gen=1,
                qtree=qtree,
                parent=parent,
                mtime=now,
                ctime=now,
            ),
        )
        if kind == DIR:
            self.ov_dirs[ino] = DirOverlay(self, 0, 0, 0)
            self.dirty_dirs.add(ino)
        self.ov_data[ino] = {}
        self.floor[ino] = 0
        return ino

    def a_free(self, ino: int) -> None:
        self._a_put(ino, None)
        for m in (self.ov_dirs, self.ov_x, self.ov_data, self.floor):
            m.pop(ino, None)
        self.dirty_dirs.discard(ino)
        self.dirty_x.discard(ino)

    def _a_block(self, ino: int, rec: Inode, fbn: int) -> bytes:
        ov = self.ov_data.get(ino)
        if ov is not None and fbn in ov:
            return ov[fbn]
        if fbn >= self.floor.get(ino, 1 << 62):
            return ZERO
        p = self.get_ptr(rec.top, rec.height, fbn)
        return self.read(p) if p else ZERO

    def a_read(self, ino: int, off: int, n: int) -> bytes:
        rec = self.a_inode(ino)
        assert rec is not None
        end = min(off + n, rec.size)
        out = bytearray()
        for fbn in range(off // BS, nblocks(end)):
            out += self._a_block(ino, rec, fbn)
        s = off - (off // BS) * BS
        return bytes(out[s : s + max(0, end - off)])

    def a_write(self, ino: int, off: int, data: bytes) -> None:
        rec = self.a_touch(ino)
        ov = self.ov_data.setdefault(ino, {})
        held = len(ov)
        pos, end = off, off + len(data)
        mv = memoryview(data)
        while pos < end:
            fbn, bo = divmod(pos, BS)
            take = min(BS - bo, end - pos)
            if bo == 0 and take == BS:
                ov[fbn] = bytes(mv[pos - off : pos - off + BS])
            else:
                blk = bytearray(self._a_block(ino, rec, fbn)) if fbn < nblocks(rec.size) else bytearray(BS)
                blk[bo : bo + take] = mv[pos - off : pos - off + take]
                ov[fbn] = bytes(blk)
            pos += take
        self.dirty_bytes += (len(ov) - held) * BS  # what the overlay holds: whole blocks, also for a 1-byte write
        rec.size = max(rec.size, end)

    def a_truncate(self, ino: int, size: int) -> None:
        rec = self.a_touch(ino)
        ov = self.ov_data.setdefault(ino, {})
        if size < rec.size:
            nb = nblocks(size)
            if size % BS:
                fbn = size // BS
                blk = bytearray(self._a_block(ino, rec, fbn))
                blk[size % BS :] = bytes(BS - size % BS)
                ov[fbn] = bytes(blk)
            for f in [f for f in ov if f >= nb]:
                del ov[f]
            self.floor[ino] = min(self.floor.get(ino, 1 << 62), nb)
        rec.size = size

    def a_set_data(self, ino: int, data: bytes) -> None:
        self.a_truncate(ino, 0)
        self.a_write(ino, 0, data)

    # ---------------------------------------------------------------- consistency point
    def is_dirty(self) -> bool:
        return bool(self.dirty or self.meta_dirty)

    def commit(self) -> bool:
        """Write one consistency point now, covering every change made so far (durable when this
        returns); False if nothing was dirty.  A group CP in flight (:meth:`wait_durable`) is
        waited for first: one CP's I/O at a time."""
        with self.lock:
            while self.flushing:
                self.cp_cond.wait()
            self.check()
            if not self.is_dirty():
                return False
            job = self._cp_guard(self._cp_begin)
            self._cp_guard(self._cp_flush, job)
            self._cp_finish(job)
            return True

    def durable_target(self) -> int:
        """The CP number that makes everything this thread has seen and changed durable (call
        with the lock held, at the end of a primitive): the CP being written if the overlay is
        clean, else the next one."""
        return self.cp_built + (1 if self.is_dirty() else 0)

    def wait_durable(self, need: int, failures: int) -> None:
        """Group commit: return once CP ``need`` is on disk (see :meth:`durable_target`).

        Concurrent primitives share CPs: if a CP is being flushed, wait for it (the changes made
        meanwhile are in the overlay and go into the next one); otherwise become the leader and
        write the next CP, covering every change made so far by any thread.  The leader builds the
        CP and writes its stripes under the lock, but flushes (fdatasync, superblock,
        fdatasync) *outside* it, so other primitives keep changing the overlay (on top of the new
        in-memory image) in the meantime.  ``failures`` is :attr:`cp_failures` as read when the
        caller's primitive began: if a CP failed since, the volume was remounted at its last
        complete CP and the caller's changes are gone, so this raises ``BackendError``."""
        while True:
            with self.lock:
                if self.cp_failures != failures:
                    raise BackendError(
                        f"a consistency point of {self.path} failed ({self.cp_error}); these changes were lost",
                        hint="the volume is back at its last complete consistency point; retry",
                    )
                if self.cp >= need:
                    return  # on disk, even if the volume died since
                self.check()
                if self.flushing:
                    self.cp_cond.wait()
                    continue
                job = self._cp_guard(self._cp_begin)
            self._cp_guard(self._cp_flush, job)
            with self.lock:
                self._cp_finish(job)

    def _cp_guard(self, fn, *args):
        try:
            return fn(*args)
        except BaseException as exc:
            with self.lock:
                self.cp_failures += 1
                self.cp_error = str(exc) or type(exc).__name__
                self.flushing = False
                try:
                    if isinstance(exc, PowerCut):
                        self.broken = self.broken or exc  # the power cut closes nothing: other threads may be reading
                    elif isinstance(exc, SimCrash):
                        self.broken = exc
                        self.raid.close()
                    else:
                        self._mount()
                finally:
                    self.cp_cond.notify_all()
            if isinstance(exc, OSError):
                raise BackendError(
                    f"I/O error writing a consistency point of {self.path}: {exc}",
                    hint="the volume is back at its last complete consistency point",
                ) from exc
            raise

    def _cp_begin(self) -> tuple[int, bytes, array[int]]:
        """Build the CP (lock held): new blocks to free stripes, written (not yet flushed); the
        in-memory image switches to it and the overlay starts empty on top of it."""
        self.new_blocks: set[int] = set()
        self.fill = None
        self.fill_idx = 0
        self.cp_stripes: dict[int, list[bytes]] = {}
        self.cp_hwm = self.hwm
        big = 1 << 62
        ifile_slots: dict[int, dict[int, bytes]] = {}
        for ino in sorted(self.dirty):
            rec = self.ov_inodes.get(ino)
            if rec is not None:
                if ino in self.dirty_dirs:
                    leaves = self.ov_dirs[ino].leaves(lambda data: self._alloc_leaf("f", data))
                    rec.size = len(leaves) * BS
                    rec.top, rec.height = self._build_over(rec.top, rec.height, leaves)
                elif ino in self.ov_data:
                    rec.top, rec.height = self._build(
                        "f", rec.top, rec.height, self.ov_data.get(ino, {}), nblocks(rec.size), self.floor.get(ino, big)
                    )
                if ino in self.dirty_x:
                    xd = encode_xattrs(self.ov_x[ino])
                    rec.xsize = len(xd)
                    rec.xtop, rec.xheight = self._build(
                        "f", rec.xtop, rec.xheight, blocks_of(xd), nblocks(len(xd)), nblocks(len(xd)), reuse_equal=True
                    )
            bi, slot = divmod(ino, IPB)
            ifile_slots.setdefault(bi, {})[slot] = rec.pack() if rec is not None else bytes(ISZ)
        root = self.root.copy()
        root.size = self.next_ino
        changes = {}
        for bi, slots in ifile_slots.items():
            p = self.get_ptr(self.root.top, self.root.height, bi)
            blk = bytearray(self.read(p) if p else ZERO)
            for s, b in slots.items():
                blk[s * ISZ : (s + 1) * ISZ] = b
            changes[bi] = bytes(blk)
        root.top, root.height = self._build(
            "i", self.root.top, self.root.height, changes, nblocks(root.size * ISZ), big
        )
        meta = self.meta_rec.copy()
        if self.meta_dirty:
            md = json.dumps(self.meta, sort_keys=True).encode()
            meta.size = len(md)
            meta.top, meta.height = self._build(
                "m", meta.top, meta.height, blocks_of(md), nblocks(len(md)), nblocks(len(md)), reuse_equal=True
            )
        for new, old, k in ((root, self.root, "i"), (meta, self.meta_rec, "m")):
            if new.top and new.top not in self.new_blocks and new.top != old.top:
                self._incref(new.top)
            if old.top and old.top != new.top:
                self._decref(old.top, k, old.height - 1)
        # write the new blocks (full stripes, never a live block); the root switch is _cp_flush's
        for s in sorted(self.cp_stripes):
            self.raid.write_stripe(s, self.cp_stripes[s])
        cp = self.cp_built + 1
        sb = self._sb_bytes(cp, self.raid.ndata, self.cp_hwm, self.max_stripes, root, meta)
        self.hwm, self.root, self.meta_rec = self.cp_hwm, root, meta
        self.cp_built = cp
        freed, self.pending = self.pending, array("Q")
        self.flushing = True
        self._reset_overlay()
        return cp, sb, freed

    def _cp_flush(self, job: tuple[int, bytes, array[int]]) -> None:
        """Make CP ``job`` durable: flush its blocks, then write the superblock copy and flush."""
        cp, sb, _freed = job
        self.raid.sync()
        self.raid.write_stripe(cp % SB_STRIPES, [sb] * self.raid.ndata)
        self.raid.sync()

    def _cp_finish(self, job: tuple[int, bytes, array[int]]) -> None:
        """CP ``job`` is on disk (lock held): the blocks the old image alone referenced become free."""
        cp, _sb, freed = job
        self.cp = cp
        self.stats["cps"] += 1
        n = self.raid.ndata
        for vbn in freed:
            s = vbn // n
            left = self.suse[s] - 1
            if left:
                self.suse[s] = left
            else:
                del self.suse[s]
                heapq.heappush(self.free_stripes, s)
            self.cache.pop(vbn, None)
        self.flushing = False
        self.cp_cond.notify_all()

    # ---------------------------------------------------------------- PCPIs and exports
    def pcpi_names(self) -> list[str]:
        return [p["name"] for p in self.meta["pcpis"]]

    def snapshot_create(self, name: str) -> str:
        with self.lock:
            self.check()
            if not name or "\0" in name or "/" in name or len(fsname(name)) > 255:
                raise BackendError(f"{name!r} is not a valid PCPI name", hint="1-255 bytes, no '/' or NUL")
            self.commit()
            if name in self.pcpi_names():
                return name
            if len(self.meta["pcpis"]) >= MAX_PCPIS:
                raise BackendError(
                    f"sim volume {self.path} already holds {MAX_PCPIS} PCPIs; cannot take {name!r}",
                    hint="a volume holds at most 255 PCPIs (as WAFL): release PCPIs you no longer need",
                )
            if self.root.top:
                self._incref(self.root.top)
            self.meta["pcpis"].append(
                {"name": name, "cp": self.cp + 1, "time": time.time(), "root": self.root.pack().hex()}
            )
            self.meta_dirty = True
            self.commit()
            return name

    def snapshot_delete(self, name: str) -> bool:
        with self.lock:
            self.check()
            self.commit()
            roots = self.pcpi_roots()
            if name not in roots:
                return False
            r = roots[name]
            self.meta["pcpis"] = [p for p in self.meta["pcpis"] if p["name"] != name]
            self.meta["exports"] = {k: v for k, v in self.meta["exports"].items() if v != name}
            if r.top:
                self._decref(r.top, "i", r.height - 1)
            self.meta_dirty = True
            self.commit()
            return True

    def set_exports(self, mapping: dict[str, str | None]) -> None:
        with self.lock:
            self.check()
            self.commit()
            names = set(self.pcpi_names())
            for replica, snap in mapping.items():
                if snap is not None and snap != "@active" and snap not in names:
                    raise BackendError(f"cannot export PCPI {snap!r} for {replica!r}: it does not exist")
            table = {k: v for k, v in mapping.items() if v is not None}
            if table != self.meta["exports"]:
                self.meta["exports"] = table
                self.meta_dirty = True
                self.commit()

    def exports(self) -> dict[str, str | None]:
        return dict(self.meta["exports"])

    # ---------------------------------------------------------------- inspection
    def fsck(self) -> list[str]:
        """Recompute the block map from the trees and compare (tests, `scrub`)."""
        problems = []
        fresh = self._count_refs()
        if fresh != self.rc:
            diff = {k for k in set(fresh) | set(self.rc) if fresh.get(k) != self.rc.get(k)}
            problems.append(
                f"block map differs from the trees at {len(diff)} blocks, e.g. "
                + ", ".join(f"{k}: map {self.rc.get(k)} trees {fresh.get(k)}" for k in sorted(diff)[:5])
            )
        n = self.raid.ndata
        for vbn in self.rc:
            if vbn // n < SB_STRIPES or vbn // n >= self.hwm:
                problems.append(f"block {vbn} outside the data area")
        counts: dict[int, int] = {}
        for vbn in self.rc:
            counts[vbn // n] = counts.get(vbn // n, 0) + 1
        if counts != self.suse:
            problems.append("stripe use counts differ from the block map")
        for s in self.free_stripes:
            if self.suse.get(s):
                problems.append(f"stripe {s} is on the free list but holds blocks")
        return problems

    def blocks_of_root(self, root: Inode) -> set[int]:
        seen: set[int] = set()
        stack: list[tuple[int, str, int]] = [(root.top, "i", root.height - 1)] if root.top else []
        while stack:
            p, k, lv = stack.pop()
            if p in seen:
                continue
            seen.add(p)
            stack.extend(self._children(p, k, lv))
        return seen

    def unique_blocks(self, root: Inode) -> int:
        """Blocks that releasing the PCPI with this root would free: the delete cascade, simulated
        on an overlay of the block map (cost follows the answer, not the volume)."""
        if not root.top:
            return 0
        drops: dict[int, int] = {}
        freed = 0
        stack = [(root.top, "i", root.height - 1)]
        while stack:
            p, k, lv = stack.pop()
            d = drops.get(p, 0) + 1
            drops[p] = d
            if self.rc[p] - d == 0:
                freed += 1
                stack.extend(self._children(p, k, lv))
        return freed

    def info(self) -> dict:
        n = self.raid.ndata
        disks = []
        for i in range(n + 1):
            disks.append(
                {
                    "disk": self.raid.disk_label(i),
                    "role": "parity" if i == n else "data",
                    "state": "failed" if i == self.raid.failed else "ok",
                    "stripes": self.hwm,
                }
            )
        active = self.blocks_of_root(self.root)
        pcpis = []
        roots = self.pcpi_roots()
        walk = len(self.rc) * max(1, len(roots)) <= 4_000_000  # full walks only while they are cheap
        for p in self.meta["pcpis"]:
            r = roots[p["name"]]
            pcpis.append(
                {
                    "name": p["name"],
                    "cp": p["cp"],
                    "time": p["time"],
                    "blocks": len(self.blocks_of_root(r)) if walk else None,
                    "unique_blocks": self.unique_blocks(r),
                }
            )
        used = len(self.rc)
        total = (self.max_stripes - SB_STRIPES) * n if self.max_stripes else None
        return {
            "path": self.path,
            "block_size": BS,
            "data_disks": n,
            "parity": "degraded" if self.raid.failed is not None else "ok",
            "failed_disk": self.raid.disk_label(self.raid.failed) if self.raid.failed is not None else None,
            "cp": self.cp,
            "stripes": self.hwm,
            "max_stripes": self.max_stripes or None,
            "used_blocks": used,
            "free_blocks": total - used if total is not None else None,
            "free_stripes": len(self.free_stripes),
            "active_blocks": len(active),
            "inodes": self.root.size,
            "pcpis": pcpis,
            "max_pcpis": MAX_PCPIS,
            "qtrees": self.view().qtrees(),
            "exports": self.exports(),
            "disks": disks,
        }

    def scrub(self, repair: bool = False) -> dict:
        """Verify the parity of every stripe below the high-water mark.  Each mismatch gets a
        verdict: in a superblock stripe the SHA-256 of each copy shows which disks are wrong (the
        stripe is rewritten from the newest valid copy); a stripe without live blocks holds nothing
        to lose (parity is recomputed from its data); a stripe with live blocks cannot be decided,
        since data blocks carry no checksum, and ``repair`` then refuses (BackendError) before
        writing anything: rebuilding that parity from data it cannot trust could make a bad block
        permanent."""
        with self.lock:
            if self.raid.failed is not None:
                return {"checked": 0, "mismatches": [], "degraded": True, "repaired": 0}
            bad: list[dict[str, Any]] = []
            fixes: dict[int, bytes | str] = {}  # stripe -> the superblock to rewrite it with, or "parity"
            for s in range(self.hwm):
                if self.raid.check_stripe(s):
                    continue
                live = s < SB_STRIPES or bool(self.suse.get(s))
                fix, verdict = self._scrub_verdict(s, live)
                if fix is not None:
                    fixes[s] = fix
                bad.append({"stripe": s, "live": live, "decided": fix is not None, "verdict": verdict})
            undecided = [b["stripe"] for b in bad if not b["decided"]]
            if repair and undecided:
                raise BackendError(
                    f"not repairing {self.path}: the parity of {len(undecided)} stripe(s) holding live blocks "
                    f"({', '.join(map(str, undecided[:10]))}{' ...' if len(undecided) > 10 else ''}) disagrees with "
                    "their data, and sim keeps no checksum of data blocks, so whether a data block or the parity "
                    "is wrong cannot be told; nothing was written",
                    hint="find the wrong side first: if every image on the volume reads right (`coalesce verify "
                    "--full` for a destination), the parity is wrong: `coalesce sim fail-disk VOLUME parity`, then "
                    "`coalesce sim reconstruct VOLUME`; if a data disk is wrong, fail that disk and reconstruct it",
                )
            if repair:
                for s, fix in fixes.items():
                    if isinstance(fix, bytes):
                        self.raid.write_stripe(s, [fix] * self.raid.ndata)
                    else:
                        self.raid.repair_stripe(s)
                self.raid.sync()
            return {"checked": self.hwm, "mismatches": bad, "degraded": False, "repaired": len(bad) if repair else 0}

    def _scrub_verdict(self, s: int, live: bool) -> tuple[bytes | str | None, str]:
        """How stripe ``s``, whose parity mismatches, is repaired: (the superblock to rewrite it
        with | "parity" | None: undecidable, a sentence)."""
        if s < SB_STRIPES:
            n = self.raid.ndata
            copies = [self.raid.read_stripe_copy(s, d) for d in range(n)]
            valid = [(self._sb_cp(c), c) for c in copies if c is not None and self._sb_cp(c) is not None]
            if not valid:
                return "parity", "superblock stripe with no valid copy (an older slot): parity recomputed from the data"
            cp, best = max(valid, key=lambda v: v[0] or 0)
            wrong = [self.raid.disk_label(d) for d, c in enumerate(copies) if c != best]
            said = ", ".join(wrong) if wrong else "the parity"
            return best, f"superblock stripe: the checksums show {said} wrong; rewritten from the valid copy (CP {cp})"
        if not live:
            return "parity", "no live block: parity recomputed from the data"
        return None, "holds live blocks: data or parity wrong, no checksum to tell (not repaired)"

    @staticmethod
    def _sb_cp(blk: bytes) -> int | None:
        """The CP of a superblock copy whose checksum holds, else None."""
        blen = _SB.size + 2 * ISZ
        body, digest = blk[:blen], blk[blen : blen + 32]
        if body[:8] != MAGIC or hashlib.sha256(body).digest() != digest:
            return None
        return _SB.unpack_from(body)[4]

    def fail_disk(self, disk: str | int) -> str:
        with self.lock:
            i = self.raid.parse_disk(disk)
            self.raid.fail(i)
            self.cache.clear()
            return self.raid.disk_label(i)

    def reconstruct(self) -> int:
        with self.lock:
            n = self.raid.reconstruct(max(self.hwm, self.raid.nstripes_on_disk()))
            self.cache.clear()
            return n

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            while self.flushing:
                self.cp_cond.wait()
            if self.broken is None and self.is_dirty():
                self.commit()
            self.raid.close()
            self.closed = True
