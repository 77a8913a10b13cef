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

All walks are iterative (a path may have ~2000 components).
"""

from __future__ import annotations

from typing import Iterator

from coalesce_core import fingerprint


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


class File(Node):
    __slots__ = ("data",)
    kind = "f"

    def __init__(self, mode: int = 0o644, data: bytes = b"", **kw) -> None:
        super().__init__(mode, **kw)
        self.data = bytearray(data)


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
        new_root = copy(root)
        stack = [(root, new_root)]
        while stack:
            old, new = stack.pop()
            for name, child in old.children.items():
                c = copy(child)
                new.children[name] = c
                if isinstance(child, Dir):
                    stack.append((child, c))
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
        return fingerprint.file_entry(path, node.mode, bytes(node.data))
    return fingerprint.Entry(path=path, kind="l", target=node.target)  # type: ignore[attr-defined]


def entries_of(root: Dir) -> list[fingerprint.Entry]:
    return [entry_of(path, node) for path, node in walk(root)]
