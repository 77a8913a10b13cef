"""Diff of two qtree states by path, producing records in the order contract.

The algorithm is deliberately simple (compare the two trees path by path), so
that it is easy to check and to copy into another backend:

1. An entry of the base is *kept* when the target has an entry of the same
   kind at the same path and, for symlinks, the same target, and for regular
   files the same hard-link group (the set of names of its inode).  Everything
   else in the base is deleted, children before parents (``Unlink``/``RmDir``),
   before anything is created: so a replaced entry is always removed first and
   a type change (file -> directory, ...) needs nothing special.
2. The target is walked in pre-order (parents before children, names sorted
   by bytes).  New directories get ``MkDir``, new files ``MkFile`` + ``Write``
   (chunks of at most 1 MiB; all-zero chunks are skipped and a final
   ``Truncate`` sets the size, so holes stay holes), the second and later
   names of a new hard-link group get ``HardLink`` to the first name, new
   symlinks ``Symlink``.  Kept files whose bytes differ get ``Truncate`` (if
   the size changed) and ``Write`` of the differing 64 KiB blocks.
3. Attributes come after contents: ``SetXattr`` then ``SetAttr`` for a file
   right after its data, for a directory when the walk leaves it, for the
   qtree root (path ``ROOT``) last.

No ``Rename`` is ever produced (a rename shows up as delete + create).  When
base and target share the same frozen state (nothing was written to the
qtree between the two PCPIs) the diff is empty without looking at the tree.
"""

from __future__ import annotations

from typing import Iterator

from coalesce_core.stream import records as R

from .tree import Blocks, Dir, File, Node, QtreeState, walk, walk_events
from .tree import Symlink as SymNode

BLOCK = Blocks.BLOCK


def _groups(pairs: list[tuple[str, Node]]) -> dict[int, tuple[str, ...]]:
    """id(File) -> all its names in walk order (hard-link groups)."""
    names: dict[int, list[str]] = {}
    for path, node in pairs:
        if isinstance(node, File):
            names.setdefault(id(node), []).append(path)
    return {k: tuple(v) for k, v in names.items()}


def _runs(path: str, new: Blocks, indexes: Iterator[int]) -> Iterator[R.Write]:
    """Writes of ``new``'s blocks at ``indexes`` (increasing), consecutive ones joined up to
    MAX_DATA bytes; a hole is written as zeros, bytes past the size are left out."""
    run: list[int] = []

    def flush() -> Iterator[R.Write]:
        if run:
            start = run[0] * BLOCK
            data = b"".join(new.block(i) or bytes(BLOCK) for i in run)[: new.size - start]
            yield R.Write(path=path, offset=start, data=data)
            run.clear()

    for i in indexes:
        if run and (i != run[-1] + 1 or (len(run) + 1) * BLOCK > R.MAX_DATA):
            yield from flush()
        run.append(i)
    yield from flush()


def _data_records(path: str, data: Blocks) -> Iterator[object]:
    """Writes for a new file: its data blocks (holes are not written), then Truncate when the
    data end before the size."""
    indexes = sorted(data.blocks)
    yield from _runs(path, data, iter(indexes))
    end = min((indexes[-1] + 1) * BLOCK, data.size) if indexes else 0
    if end < data.size:
        yield R.Truncate(path=path, size=data.size)


def _delta_records(path: str, old: Blocks, new: Blocks) -> Iterator[object]:
    """Truncate/Write turning ``old`` into ``new`` (differing 64 KiB blocks only; blocks that are
    holes on both sides are never looked at)."""
    if old == new:
        return
    if old.size != new.size:
        yield R.Truncate(path=path, size=new.size)
    cut, inner = divmod(new.size, BLOCK)  # after the Truncate, bytes from new.size on are zeros

    def cur(i: int) -> bytes | None:
        blk = old.block(i)
        if blk is not None and i == cut and inner:
            blk = blk[:inner] + bytes(BLOCK - inner)
            return None if blk.count(0) == BLOCK else blk
        return blk if i * BLOCK < new.size else None

    differ = (i for i in sorted(set(old.blocks) | set(new.blocks)) if i * BLOCK < new.size and cur(i) != new.block(i))
    yield from _runs(path, new, differ)


def _attr_records(path: str, old: Node | None, new: Node, moved: bool = False) -> Iterator[object]:
    """xattrs then attributes of ``new`` (``old``: the kept base entry); ``moved``: the records before
    changed what moves the entry's mtime on a destination (its data, or a directory's entries), so
    the mtime is set even where the two states agree on it."""
    old_x = old.xattrs if old is not None else {}
    for name in sorted(set(old_x) | set(new.xattrs)):
        if old_x.get(name) != new.xattrs.get(name):
            yield R.SetXattr(path=path, name=name, value=new.xattrs.get(name))
    is_link = isinstance(new, SymNode)
    if old is None:
        yield R.SetAttr(path=path, mode=None if is_link else new.mode, uid=new.uid, gid=new.gid, mtime_ns=new.mtime_ns)
        return
    fields = {}
    if not is_link and old.mode != new.mode:
        fields["mode"] = new.mode
    if old.uid != new.uid:
        fields["uid"] = new.uid
    if old.gid != new.gid:
        fields["gid"] = new.gid
    if old.mtime_ns != new.mtime_ns or moved:
        fields["mtime_ns"] = new.mtime_ns
    if fields:
        yield R.SetAttr(path=path, **fields)


def diff_changes(base: QtreeState | None, target: QtreeState) -> Iterator[object]:
    """The change records (without Begin/End) from ``base`` to ``target``."""
    if base is target:
        return
    b_pairs = list(walk(base.root)) if base is not None else []
    t_pairs = list(walk(target.root))
    b_map = dict(b_pairs)
    t_map = dict(t_pairs)
    b_groups = _groups(b_pairs)
    t_groups = _groups(t_pairs)

    def kept(path: str) -> bool:
        b = b_map.get(path)
        t = t_map.get(path)
        if b is None or t is None or b.kind != t.kind:
            return False
        if isinstance(t, SymNode):
            return b.target == t.target  # type: ignore[attr-defined]
        if isinstance(t, File):
            return b_groups[id(b)] == t_groups[id(t)]
        return True

    keep = {p for p in b_map if kept(p)}

    # a directory whose entries change has its mtime moved by the destination's file system
    changed_dirs: set[str] = set()

    def parent(path: str) -> str:
        return path.rsplit("/", 1)[0] if "/" in path else R.ROOT

    # 1. deletes, children before parents
    for path, node in reversed(b_pairs):
        if path not in keep:
            changed_dirs.add(parent(path))
            yield R.RmDir(path=path) if isinstance(node, Dir) else R.Unlink(path=path)

    # 2./3. creates, contents, attributes
    first_name: dict[int, str] = {}
    for event, path, node in walk_events(target.root):
        old = b_map.get(path) if path in keep else None
        if event == "exit":  # directories only
            yield from _attr_records(path, old, node, moved=path in changed_dirs)
            continue
        if old is None:
            changed_dirs.add(parent(path))
        if isinstance(node, Dir):
            if old is None:
                yield R.MkDir(path=path, mode=node.mode | 0o700)
        elif isinstance(node, SymNode):
            if old is None:
                yield R.Symlink(path=path, target=node.target)
            yield from _attr_records(path, old, node)
        else:
            assert isinstance(node, File)
            if id(node) in first_name:
                if old is None:
                    yield R.HardLink(path=path, existing=first_name[id(node)])
                continue  # one inode: contents and attributes once
            first_name[id(node)] = path
            if old is None:
                yield R.MkFile(path=path, mode=node.mode | 0o600)
                yield from _data_records(path, node.data)
                yield from _attr_records(path, old, node)
            else:
                wrote = False
                for rec in _delta_records(path, old.data, node.data):  # type: ignore[attr-defined]
                    wrote = True
                    yield rec
                yield from _attr_records(path, old, node, moved=wrote)
    root_old = base.root if base is not None else None
    yield from _attr_records(R.ROOT, root_old, target.root, moved=R.ROOT in changed_dirs)


def diff_stream(
    qtree: str, base_name: str | None, target_name: str, base: QtreeState | None, target: QtreeState
) -> Iterator[object]:
    """The framed stream: Begin, changes, End."""
    yield R.Begin(qtree=qtree, base=base_name, target=target_name)
    n = 0
    for rec in diff_changes(base, target):
        n += 1
        yield rec
    yield R.End(records=n)
