"""Applying one change record to a writable qtree state (I10 enforced here).

Every path is checked with :func:`coalesce_core.stream.records.check_path` (the
records' own validators may have been bypassed by a hostile producer) and is
resolved component by component from the qtree root without following any
symlink: a symlink in a non-final component is a :class:`HostilePath`, as is
a ``Write``/``Truncate`` whose final component is a symlink.  Hard-link
sources are resolved the same way, so they cannot leave the qtree.  All
checks run before the record changes anything.

Records that do not fit the tree (a parent that is missing, a ``Write`` to a
directory, ``RmDir`` of a non-empty directory) raise :class:`CorruptStream`.
Replays are tolerated where the record's meaning is unambiguous (``MkDir`` of
an existing directory, ``Unlink``/``RmDir`` of a missing entry, ``Rename``
whose source is gone and whose target exists, ``HardLink`` that exists).
"""

from __future__ import annotations

from coalesce_core.errors import CorruptStream, HostilePath
from coalesce_core.stream import limits
from coalesce_core.stream import records as R

from .tree import Dir, File, Node, QtreeState
from .tree import Symlink as SymNode


def check_record(rec: object, max_file_size: int = R.MAX_FILE_SIZE, volume: str = "the mem volume") -> None:
    """Type, path and size checks that need no tree (raise before anything is written); a file past
    ``max_file_size`` is FileTooLarge (coalesce_core.stream.limits)."""
    if not isinstance(rec, R.CHANGE_TYPES):
        raise CorruptStream(
            f"not a change record: {type(rec).__name__}", hint="the stream is corrupt; the update is rolled back"
        )
    check = R.check_path_or_root if isinstance(rec, (R.SetAttr, R.SetXattr)) else R.check_path
    for i, p in enumerate(R.paths_of(rec)):
        check(p, what="path" if i == 0 else "second path")
    if isinstance(rec, R.Symlink):
        t = rec.target
        if not isinstance(t, str) or not t or "\x00" in t:
            raise HostilePath(f"symlink target {t!r} is empty or has NUL")
    for field in ("mode", "uid", "gid", "mtime_ns"):
        value = getattr(rec, field, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise CorruptStream(f"{type(rec).__name__} {rec.path!r}: bad {field} {value!r}")  # type: ignore[attr-defined]
    if isinstance(rec, R.SetXattr):
        if not isinstance(rec.name, str) or not rec.name or "\x00" in rec.name:
            raise HostilePath(f"xattr name {rec.name!r} is empty or has NUL")
        if rec.value is not None and not isinstance(rec.value, bytes):
            raise CorruptStream(f"SetXattr {rec.path!r}: the value is not bytes")
    if isinstance(rec, R.Write):
        if not isinstance(rec.data, bytes) or not isinstance(rec.offset, int) or rec.offset < 0:
            raise CorruptStream(f"bad Write record for {rec.path!r}")
    if isinstance(rec, R.Truncate):
        if not isinstance(rec.size, int) or rec.size < 0:
            raise CorruptStream(f"bad Truncate record for {rec.path!r}")
    limits.check_record(rec, max_file_size, volume)


def _parent(state: QtreeState, path: str) -> tuple[Dir, str]:
    """The directory holding ``path``'s last component, never following symlinks."""
    parts = path.split("/")
    cur: Node = state.root
    for i, part in enumerate(parts[:-1]):
        nxt = cur.children.get(part)  # type: ignore[attr-defined]
        if isinstance(nxt, Dir):
            cur = nxt
            continue
        sofar = "/".join(parts[: i + 1])
        if nxt is None:
            raise CorruptStream(
                f"{path!r}: directory {sofar!r} does not exist",
                hint="the stream does not fit the replica (wrong base?); it is rolled back",
            )
        if isinstance(nxt, SymNode):
            raise HostilePath(
                f"{path!r} goes through the symlink {sofar!r}",
                hint="appliers never follow symlinks (I10); the stream is hostile or corrupt",
            )
        raise CorruptStream(f"{path!r}: {sofar!r} is not a directory")
    return cur, parts[-1]  # type: ignore[return-value]


def _lookup(state: QtreeState, path: str) -> Node | None:
    d, name = _parent(state, path)
    return d.children.get(name)


def _discard(state: QtreeState, node: Node, use_purgatory: bool) -> None:
    """Park a removed or replaced entry in the purgatory (or drop it)."""
    if use_purgatory:
        state.purgatory_seq += 1
        state.purgatory.children[f"{state.purgatory_seq:08d}"] = node


def _file(state: QtreeState, path: str) -> File:
    node = _lookup(state, path)
    if isinstance(node, SymNode):
        raise HostilePath(
            f"{path!r} is a symlink; writing would follow it",
            hint="appliers never follow symlinks (I10); the stream is hostile or corrupt",
        )
    if not isinstance(node, File):
        raise CorruptStream(
            f"{path!r} is {'missing' if node is None else 'not a regular file'}",
            hint="the stream does not fit the replica (wrong base?); it is rolled back",
        )
    return node


def _make(state: QtreeState, path: str, new: Node, use_purgatory: bool) -> None:
    d, name = _parent(state, path)
    old = d.children.get(name)
    if isinstance(old, Dir):
        raise CorruptStream(f"cannot create {path!r}: a directory is in the way")
    if old is not None:
        _discard(state, old, use_purgatory)
    d.children[name] = new


def apply_record(state: QtreeState, rec: object, use_purgatory: bool) -> None:
    """Apply one (already :func:`check_record`-ed) change record to ``state``."""
    if isinstance(rec, R.MkDir):
        d, name = _parent(state, rec.path)
        old = d.children.get(name)
        if isinstance(old, Dir):
            return  # replay
        if old is not None:
            raise CorruptStream(f"MkDir {rec.path!r}: a non-directory is in the way")
        d.children[name] = Dir(rec.mode)
    elif isinstance(rec, R.MkFile):
        _make(state, rec.path, File(rec.mode), use_purgatory)
    elif isinstance(rec, R.Symlink):
        _make(state, rec.path, SymNode(rec.target), use_purgatory)
    elif isinstance(rec, R.HardLink):
        node = _lookup(state, rec.existing)
        if not isinstance(node, File):
            raise CorruptStream(
                f"HardLink {rec.path!r} -> {rec.existing!r}: {'missing' if node is None else 'not a regular file'}"
            )
        d, name = _parent(state, rec.path)
        if d.children.get(name) is node:
            return  # replay
        _make(state, rec.path, node, use_purgatory)
    elif isinstance(rec, R.Rename):
        od, oname = _parent(state, rec.old)
        nd, nname = _parent(state, rec.new)
        node = od.children.get(oname)
        target = nd.children.get(nname)
        if node is None:
            if target is not None:
                return  # replay: already moved
            raise CorruptStream(f"Rename {rec.old!r}: no such entry")
        if target is node:
            return
        if isinstance(node, Dir) and (rec.new + "/").startswith(rec.old + "/"):
            raise CorruptStream(f"Rename {rec.old!r} into itself ({rec.new!r})")
        if target is not None:
            if isinstance(target, Dir) != isinstance(node, Dir) or (isinstance(target, Dir) and target.children):
                raise CorruptStream(f"Rename {rec.old!r} -> {rec.new!r}: the target is in the way")
            _discard(state, target, use_purgatory)
        del od.children[oname]
        nd.children[nname] = node
    elif isinstance(rec, R.Unlink):
        d, name = _parent(state, rec.path)
        node = d.children.get(name)
        if node is None:
            return  # replay
        if isinstance(node, Dir):
            raise CorruptStream(f"Unlink {rec.path!r}: is a directory")
        del d.children[name]
        _discard(state, node, use_purgatory)
    elif isinstance(rec, R.RmDir):
        d, name = _parent(state, rec.path)
        node = d.children.get(name)
        if node is None:
            return  # replay
        if not isinstance(node, Dir):
            raise CorruptStream(f"RmDir {rec.path!r}: not a directory")
        if node.children:
            raise CorruptStream(f"RmDir {rec.path!r}: directory not empty")
        del d.children[name]
        _discard(state, node, use_purgatory)
    elif isinstance(rec, R.Write):
        _file(state, rec.path).data.write(rec.offset, rec.data)
    elif isinstance(rec, R.Truncate):
        _file(state, rec.path).data.truncate(rec.size)
    elif isinstance(rec, R.SetAttr):
        node = state.root if rec.path == R.ROOT else _lookup(state, rec.path)
        if node is None:
            raise CorruptStream(f"SetAttr {rec.path!r}: no such entry")
        if rec.mode is not None and not isinstance(node, SymNode):
            node.mode = rec.mode & 0o7777
        if rec.uid is not None:
            node.uid = rec.uid
        if rec.gid is not None:
            node.gid = rec.gid
        if rec.mtime_ns is not None:
            node.mtime_ns = rec.mtime_ns
    elif isinstance(rec, R.SetXattr):
        node = state.root if rec.path == R.ROOT else _lookup(state, rec.path)
        if node is None:
            raise CorruptStream(f"SetXattr {rec.path!r}: no such entry")
        if rec.value is None:
            node.xattrs.pop(rec.name, None)
        else:
            node.xattrs[rec.name] = bytes(rec.value)
    else:  # pragma: no cover - check_record rejects it
        raise CorruptStream(f"not a change record: {type(rec).__name__}")
