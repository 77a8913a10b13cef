"""Descriptions of qtree paths for verification (the ``coalesce_describe`` hook; coalesce_core.verify).

A path is looked up from the qtree root one component at a time; a missing
component, or one that is not a directory (a symlink is never followed), makes
the path absent.  The identity of a regular file is the identity of its
:class:`~coalesce_mem.tree.File` object (a hard link is the same object under
two names); mem counts no links (``nlink`` 0: unknown).  A mem volume keeps everything a record carries: permission bits,
owners, nanosecond mtimes and xattrs of every node (:data:`HOLDS`).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence, TypedDict

from coalesce_core.stream.fingerprint import part_digest_of_pieces
from coalesce_core.stream.records import check_path_or_root
from coalesce_core.verify import Description, Holds, xattr_fields

from .tree import Blocks, Dir, File, Node, QtreeState, sort_key

HOLDS = Holds(owners=True, xattrs=True, mtime_ns=1)


class _Common(TypedDict):
    """The Description fields every kind of node has."""

    uid: int
    gid: int
    mtime_ns: int


def _lookup(root: Dir, path: str) -> Node | None:
    node: Node | None = root
    if path:
        for part in path.split("/"):
            node = node.children.get(part) if isinstance(node, Dir) else None
            if node is None:
                return None
    return node


def _part(data: Blocks, ranges: Sequence[tuple[int, int]]) -> str:
    """The part digest of ``data`` over ``ranges``, from the blocks inside them only."""
    size, b = data.size, Blocks.BLOCK

    def pieces() -> Iterator[tuple[int, memoryview]]:
        for start, end in ranges:
            end = min(end, size)
            for i in range(start // b, -(-end // b)):
                blk = data.block(i)
                if blk is not None:
                    lo, hi = max(start, i * b), min(end, (i + 1) * b)
                    yield lo, memoryview(blk)[lo - i * b : hi - i * b]

    return part_digest_of_pieces(size, ranges, pieces())


def describe_node(
    path: str, node: Node | None, content: bool, ranges: Sequence[tuple[int, int]] | None = None
) -> Description:
    """The Description of ``node`` found at ``path`` (None: absent); ``ranges``: the part digest
    of a regular file over them instead of its content."""
    if node is None:
        return Description.absent(path)
    common = _Common(uid=node.uid, gid=node.gid, mtime_ns=node.mtime_ns)
    if isinstance(node, Dir):
        entries = tuple((n, node.children[n].kind) for n in sorted(node.children, key=sort_key))
        return Description(path=path, kind="d", mode=node.mode, **xattr_fields(node.xattrs), entries=entries, **common)
    if isinstance(node, File):
        from .tree import entry_of

        part = _part(node.data, ranges) if content and ranges is not None else None
        digest = entry_of(path or ".", node).content_sha256 if content and part is None else None
        return Description(
            path=path,
            kind="f",
            mode=node.mode,
            size=len(node.data),
            **xattr_fields(node.xattrs),
            content=digest,
            ident=id(node),
            nlink=0,
            part=part,
            **common,
        )
    return Description(path=path, kind="l", target=node.target, **common)  # type: ignore[attr-defined]


def describe(
    state: QtreeState | None,
    paths: Sequence[tuple[str, bool]],
    ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None,
) -> list[Description]:
    """One Description per ``(path, content)`` of a qtree state (None: a missing qtree); the
    paths in ``ranges`` with their part digests over those ranges (the hookspec)."""
    for p, _c in paths:
        check_path_or_root(p)
    if state is None:
        return [Description.absent(p) for p, _c in paths]
    got = ranges or {}
    return [describe_node(p, _lookup(state.root, p), c, got.get(p)) for p, c in paths]
