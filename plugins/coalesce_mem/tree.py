"""The in-memory file system model of the ``mem`` backend.

A qtree is a tree of :class:`Dir`, :class:`File` and :class:`Symlink` nodes.
A hard link is simply the same :class:`File` object reachable under two
names.  A :class:`QtreeState` bundles a qtree's root with its purgatory (a
directory outside the qtree where ``apply(use_purgatory=True)`` parks deleted
and replaced entries).

Structural sharing (copy-on-write): a PCPI stores references to the
``QtreeState`` objects of the active file system and marks them ``frozen``.
A frozen state is never mutated again; the first write to that qtree in the
active file system replaces it by a deep clone (:meth:`QtreeState.thaw`).
Taking a PCPI therefore costs O(number of qtrees), not O(data), and a
qtree that is not written between two PCPIs is shared by both.

All walks are iterative (a path may have ~2000 components).  A file's bytes
are a :class:`Blocks` map (holes are not stored), so a sparse file of any
size costs its data.
"""

from __future__ import annotations

from typing import Iterator, cast

from coalesce_core.stream import fingerprint


def sort_key(name: str) -> bytes:
    """The byte order of names (surrogateescape), used by every walk."""
    return name.encode("utf-8", "surrogateescape")


class Node:
    __slots__ = ("mode", "uid", "gid", "mtime_ns", "xattrs")
    kind = "?"

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime_ns: int = 0, xattrs: dict | None = None) -> None:
        self.mode = mode & 0o7777
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.xattrs: dict[str, bytes] = dict(xattrs or {})

    def attrs(self) -> tuple[int, int, int, int]:
        return (self.mode, self.uid, self.gid, self.mtime_ns)

    def _copy_meta(self, other: "Node") -> None:
        other.uid, other.gid, other.mtime_ns = self.uid, self.gid, self.mtime_ns
        other.xattrs = dict(self.xattrs)


class Dir(Node):
    __slots__ = ("children",)
    kind = "d"

    def __init__(self, mode: int = 0o755, **kw) -> None:
        super().__init__(mode, **kw)
        self.children: dict[str, Node] = {}


class Blocks:
    """The bytes of a regular file as a map of :data:`BLOCK`-byte blocks (index -> bytes).

    A block that is not in the map is a hole and reads as zeros; a block of
    zeros is never kept, and the bytes of the last block past ``size`` are
    zeros, so two files with the same bytes have equal maps.  A file of any
    size up to 2^63 - 1 bytes costs its data, not its size.  ``len()`` is the
    size; ``bytes()`` the whole content (small files only)."""

    __slots__ = ("size", "blocks")
    BLOCK = fingerprint.BLOCK

    def __init__(self, data: bytes = b"") -> None:
        self.size = 0
        self.blocks: dict[int, bytes] = {}
        if data:
            self.write(0, data)

    def __len__(self) -> int:
        return self.size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blocks) and self.size == other.size and self.blocks == other.blocks

    def __bytes__(self) -> bytes:
        out = bytearray(self.size)
        for i, blk in self.blocks.items():
            out[i * self.BLOCK : (i + 1) * self.BLOCK] = blk
        del out[self.size :]
        return bytes(out)

    def __getitem__(self, offset: int) -> int:
        """The byte at ``offset`` (as a bytearray gives it)."""
        if not 0 <= offset < self.size:
            raise IndexError(offset)
        blk = self.blocks.get(offset // self.BLOCK)
        return blk[offset % self.BLOCK] if blk is not None else 0

    def __setitem__(self, offset: int, value: int) -> None:
        """Set the byte at ``offset`` (inside the file)."""
        if not 0 <= offset < self.size:
            raise IndexError(offset)
        self.write(offset, bytes((value,)))

    def copy(self) -> "Blocks":
        new = Blocks()
        new.size = self.size
        new.blocks = dict(self.blocks)  # the blocks themselves are immutable bytes
        return new

    def block(self, i: int) -> bytes | None:
        """Block ``i`` (:data:`BLOCK` bytes), or None for a hole."""
        return self.blocks.get(i)

    def pieces(self) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) of the data blocks in offset order (the last one may reach past the size)."""
        for i in sorted(self.blocks):
            yield i * self.BLOCK, self.blocks[i]

    def _put(self, i: int, blk: bytes | bytearray) -> None:
        if blk.count(0) == len(blk):
            self.blocks.pop(i, None)
        else:
            self.blocks[i] = bytes(blk)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        B = self.BLOCK
        view = memoryview(data).cast("B")
        pos, end = offset, offset + len(view)
        while pos < end:
            i, inner = divmod(pos, B)
            take = min(B - inner, end - pos)
            piece = view[pos - offset : pos - offset + take]
            if take == B:
                self._put(i, piece.tobytes())
            else:
                blk = bytearray(self.blocks.get(i) or bytes(B))
                blk[inner : inner + take] = piece
                self._put(i, blk)
            pos += take
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        if size < self.size:
            B = self.BLOCK
            keep, inner = divmod(size, B)
            for i in [i for i in self.blocks if i >= keep]:
                if i > keep or inner == 0:
                    del self.blocks[i]
            if inner and keep in self.blocks:
                blk = bytearray(self.blocks[keep])
                blk[inner:] = bytes(B - inner)
                self._put(keep, blk)
        self.size = size


class File(Node):
    __slots__ = ("data",)
    kind = "f"

    def __init__(self, mode: int = 0o644, data: "bytes | Blocks" = b"", **kw) -> None:
        super().__init__(mode, **kw)
        self.data = data.copy() if isinstance(data, Blocks) else Blocks(data)


class Symlink(Node):
    __slots__ = ("target",)
    kind = "l"

    def __init__(self, target: str, mode: int = 0o777, **kw) -> None:
        super().__init__(mode, **kw)
        self.target = target


def walk(root: Dir) -> Iterator[tuple[str, Node]]:
    """(path, node) below ``root`` in pre-order, children sorted by bytes."""
    stack: list[tuple[str, Node]] = [
        (name, root.children[name]) for name in sorted(root.children, key=sort_key, reverse=True)
    ]
    while stack:
        path, node = stack.pop()
        yield path, node
        if isinstance(node, Dir):
            for name in sorted(node.children, key=sort_key, reverse=True):
                stack.append((f"{path}/{name}", node.children[name]))


def walk_events(root: Dir) -> Iterator[tuple[str, str, Node]]:
    """("enter"|"exit", path, node): pre-order enters; directories also get an
    "exit" after everything below them (for SetAttr-after-contents)."""
    stack: list[tuple[bool, str, Node]] = [
        (False, name, root.children[name]) for name in sorted(root.children, key=sort_key, reverse=True)
    ]
    while stack:
        leaving, path, node = stack.pop()
        if leaving:
            yield "exit", path, node
            continue
        yield "enter", path, node
        if isinstance(node, Dir):
            stack.append((True, path, node))
            for name in sorted(node.children, key=sort_key, reverse=True):
                stack.append((False, f"{path}/{name}", node.children[name]))


def clone_nodes(roots: list[Dir]) -> list[Dir]:
    """Deep copies of ``roots`` sharing one memo, so hard links (one File under
    several names, also across root and purgatory) stay hard links."""
    memo: dict[int, Node] = {}

    def copy(node: Node) -> Node:
        got = memo.get(id(node))
        if got is not None:
            return got
        if isinstance(node, Dir):
            new: Node = Dir(node.mode)
        elif isinstance(node, File):
            new = File(node.mode, node.data)
        else:
            new = Symlink(node.target, node.mode)  # type: ignore[attr-defined]
        node._copy_meta(new)
        memo[id(node)] = new
        return new

    out = []
    for root in roots:
        new_root = cast(Dir, copy(root))  # copy() of a Dir is a Dir
        stack = [(root, new_root)]
        while stack:
            old, new = stack.pop()
            for name, child in old.children.items():
                c = copy(child)
                new.children[name] = c
                if isinstance(child, Dir):
                    stack.append((child, cast(Dir, c)))  # copy() of a Dir is a Dir
        out.append(new_root)
    return out


class QtreeState:
    """One qtree of the active FS or of a PCPI: its root and its purgatory."""

    __slots__ = ("root", "purgatory", "purgatory_seq", "frozen", "cache")

    def __init__(self, root: Dir | None = None, purgatory: Dir | None = None, purgatory_seq: int = 0) -> None:
        self.root = root if root is not None else Dir(0o755)
        self.purgatory = purgatory if purgatory is not None else Dir(0o700)
        self.purgatory_seq = purgatory_seq
        self.frozen = False
        self.cache: object = None  # persist.py caches the encoding of frozen states here

    def thaw(self) -> "QtreeState":
        """A private, writable deep copy (copy-on-write of a frozen state)."""
        root, purg = clone_nodes([self.root, self.purgatory])
        return QtreeState(root, purg, self.purgatory_seq)

    def entries(self) -> list[fingerprint.Entry]:
        return entries_of(self.root)

    def fingerprint(self) -> str:
        return fingerprint.digest(self.entries())


def entry_of(path: str, node: Node) -> fingerprint.Entry:
    """The canonical fingerprint entry of one node (docs/writing-a-backend.md):
    directories carry their permission bits, files their bits and bytes,
    symlinks only their target (mode 0, size 0: symlink permissions mean
    nothing and differ between systems)."""
    if isinstance(node, Dir):
        return fingerprint.Entry(path=path, kind="d", mode=node.mode)
    if isinstance(node, File):
        return fingerprint.sparse_file_entry(path, node.mode, node.data.size, node.data.pieces())
    return fingerprint.Entry(path=path, kind="l", target=node.target)  # type: ignore[attr-defined]


def entries_of(root: Dir) -> list[fingerprint.Entry]:
    return [entry_of(path, node) for path, node in walk(root)]
