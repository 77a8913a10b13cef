"""Directories of the sim file system: sorted blocks of entries, changed a block at a time.

On disk (docs/sim.md, "File system") a directory is a file of ``(name, inode)`` entries, each a
``<HI`` header (name length, inode number) followed by the name's bytes, sorted by those bytes and
never split across a block; the rest of a block is zeros and every block holds at least one entry,
so the first entry of each block orders the blocks.  A block need not be full: a directory written
by an older sim (packed full at every CP) reads the same way.

While an update changes a directory, :class:`DirOverlay` holds its block pointers (one per 4 KiB
block of entries) and decodes only the blocks it changes (:class:`DirBlock`), each charged as a dirty
4 KiB block to ``SimFS.DIRTY_LIMIT``, so a CP flushes them like dirty data.  A lookup by name reads
the O(log blocks) first entries of a binary search and the one block that may hold the name.  A CP
writes the changed blocks (runs of adjacent ones packed again) and points the directory's tree at
them and at the unchanged blocks (:meth:`DirOverlay.leaves`); nothing else of the directory is read
or written.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from .raid import BS

if TYPE_CHECKING:
    from .fs import SimFS

ENTRY = struct.Struct("<HI")  # name length, inode number; the name's bytes follow


def fsname(name: str) -> bytes:
    """The bytes of a name as stored (and ordered) in a directory block."""
    return name.encode("utf-8", "surrogateescape")


def strname(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def block_entries(blk: bytes, end: int = BS) -> Iterator[tuple[bytes, int]]:
    """``(name, ino)`` of the entries of one directory block, in stored order (``end``: the bytes of
    the block that belong to the directory)."""
    off = 0
    while off + ENTRY.size <= end:
        n, ino = ENTRY.unpack_from(blk, off)
        if n == 0:
            break
        yield blk[off + ENTRY.size : off + ENTRY.size + n], ino
        off += ENTRY.size + n


def first_name(blk: bytes) -> bytes:
    """The name of the first (smallest) entry of a directory block."""
    n = ENTRY.unpack_from(blk, 0)[0]
    return blk[ENTRY.size : ENTRY.size + n]


def decode_dir(data: bytes) -> dict[str, int]:
    """Every entry of a directory's data (a whole read: :meth:`.fs.View.dir`)."""
    out: dict[str, int] = {}
    for b in range(0, len(data), BS):
        for name, ino in block_entries(data[b : b + BS]):
            out[strname(name)] = ino
    return out


def pack_blocks(entries: Iterable[tuple[bytes, int]]) -> list[bytes]:
    """Directory blocks holding ``entries`` (sorted by name), each filled as far as it goes."""
    blocks: list[bytes] = []
    cur = bytearray()
    for name, ino in entries:
        ent = ENTRY.pack(len(name), ino) + name
        if len(cur) + len(ent) > BS:
            blocks.append(bytes(cur.ljust(BS, b"\0")))
            cur = bytearray()
        cur += ent
    if cur:
        blocks.append(bytes(cur.ljust(BS, b"\0")))
    return blocks


def encode_dir(entries: dict[str, int]) -> list[bytes]:
    """The blocks of a directory holding ``entries``, packed full."""
    return pack_blocks(sorted((fsname(n), i) for n, i in entries.items()))


class DirBlock:
    """One decoded block of a directory being changed: its entries, their encoded size, and the
    block it was read from (0: a new block)."""

    __slots__ = ("entries", "nbytes", "lo", "orig")

    def __init__(self, entries: dict[bytes, int], orig: int = 0) -> None:
        self.entries = entries
        self.nbytes = sum(ENTRY.size + len(n) for n in entries)
        self.lo: bytes | None = None  # the smallest name, None until asked again
        self.orig = orig

    def first(self) -> bytes:
        if self.lo is None:
            self.lo = min(self.entries)
        return self.lo

    def put(self, name: bytes, ino: int) -> None:
        if name not in self.entries:
            self.nbytes += ENTRY.size + len(name)
            if self.lo is not None and name < self.lo:
                self.lo = name
        self.entries[name] = ino

    def pop(self, name: bytes) -> None:
        del self.entries[name]
        self.nbytes -= ENTRY.size + len(name)
        if name == self.lo:
            self.lo = None

    def split(self) -> tuple["DirBlock", "DirBlock"]:
        """Two blocks holding this one's entries, the lower names in the first, about half the
        bytes each."""
        names = sorted(self.entries)
        half, cut = 0, 0
        while cut < len(names) - 1 and half < self.nbytes // 2:
            half += ENTRY.size + len(names[cut])
            cut += 1
        lower = DirBlock({n: self.entries[n] for n in names[:cut]})
        upper = DirBlock({n: self.entries[n] for n in names[cut:]})
        return lower, upper


class BlockMemo:
    """The entries of the last few directory blocks looked up without being changed, by block
    number (a block's contents never change while it is allocated; :meth:`forget` a block
    allocated again)."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self.blocks: dict[int, dict[bytes, int]] = {}

    def get(self, vbn: int, read: Callable[[int], bytes]) -> dict[bytes, int]:
        hit = self.blocks.get(vbn)
        if hit is None:
            hit = dict(block_entries(read(vbn)))
            if len(self.blocks) >= self.limit:
                del self.blocks[next(iter(self.blocks))]
            self.blocks[vbn] = hit
        return hit

    def forget(self, vbn: int) -> None:
        self.blocks.pop(vbn, None)

    def clear(self) -> None:
        self.blocks.clear()


class DirOverlay:
    """A directory of the active file system as an update sees it: its blocks in name order, each
    the block number of an unchanged block of the last CP or a decoded :class:`DirBlock`.  No slot
    is ever empty (a block whose last entry goes leaves the list)."""

    def __init__(self, fs: "SimFS", top: int, height: int, size: int) -> None:
        self.fs = fs
        self.slots: list[int | DirBlock] = [v for f, v in fs.leaves(top, height) if f * BS < size]

    # -- reading
    def _first(self, i: int) -> bytes:
        s = self.slots[i]
        return s.first() if isinstance(s, DirBlock) else first_name(self.fs.read(s))

    def _find(self, name: bytes) -> int:
        """The slot that holds ``name`` if anything does (the last whose first name is at most
        ``name``; 0 below them all), -1 in an empty directory."""
        lo, hi = 0, len(self.slots)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._first(mid) <= name:
                lo = mid
            else:
                hi = mid
        return lo if self.slots else -1

    def _entries(self, i: int) -> dict[bytes, int]:
        s = self.slots[i]
        return s.entries if isinstance(s, DirBlock) else self.fs.dirblocks.get(s, self.fs.read)

    def get(self, name: str) -> int | None:
        key = fsname(name)
        i = self._find(key)
        return None if i < 0 else self._entries(i).get(key)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __bool__(self) -> bool:
        return bool(self.slots)

    def items(self) -> Iterator[tuple[str, int]]:
        """Every ``(name, ino)`` in name order, one block at a time (do not change the directory
        while iterating)."""
        for s in self.slots:
            if isinstance(s, DirBlock):
                pairs: Iterable[tuple[bytes, int]] = sorted(s.entries.items())
            else:
                pairs = block_entries(self.fs.read(s))
            for name, ino in pairs:
                yield strname(name), ino

    def values(self) -> Iterator[int]:
        for _name, ino in self.items():
            yield ino

    def last_block(self) -> list[tuple[str, int]]:
        """The entries of the last block (what a purge destroys next: the blocks before it stay
        where they are)."""
        if not self.slots:
            return []
        return [(strname(n), i) for n, i in sorted(self._entries(len(self.slots) - 1).items())]

    # -- changing
    def _decoded(self, i: int) -> DirBlock:
        s = self.slots[i]
        if isinstance(s, DirBlock):
            return s
        self.fs.dirblocks.forget(s)
        b = DirBlock(dict(block_entries(self.fs.read(s))), orig=s)
        self.slots[i] = b
        self.fs.dirty_bytes += BS  # held until the CP, like a dirty data block
        return b

    def set(self, name: str, ino: int) -> None:
        key = fsname(name)
        i = self._find(key)
        if i < 0:
            self.slots.append(DirBlock({}))
            self.fs.dirty_bytes += BS
            i = 0
        b = self._decoded(i)
        b.put(key, ino)
        if b.nbytes > BS:
            self.slots[i : i + 1] = b.split()
            self.fs.dirty_bytes += BS

    def remove(self, name: str) -> None:
        key = fsname(name)
        i = self._find(key)
        if i < 0 or key not in self._entries(i):
            return
        b = self._decoded(i)
        b.pop(key)
        if not b.entries:
            del self.slots[i]

    # -- the CP
    def leaves(self, alloc: Callable[[bytes], int]) -> list[int]:
        """The block numbers of the directory's blocks for the CP being built, in order: unchanged
        blocks as they are, each run of adjacent changed blocks packed again and written with
        ``alloc`` (a block that comes out as it was read keeps its block number)."""
        out: list[int] = []
        run: list[DirBlock] = []

        def flush() -> None:
            if not run:
                return
            packed = pack_blocks(p for b in run for p in sorted(b.entries.items()))
            if len(run) == 1 == len(packed) and run[0].orig and self.fs.read(run[0].orig) == packed[0]:
                out.append(run[0].orig)
            else:
                out.extend(alloc(data) for data in packed)
            run.clear()

        for s in self.slots:
            if isinstance(s, DirBlock):
                run.append(s)
            else:
                flush()
                out.append(s)
        flush()
        return out
