"""Verification of a replica against its source PCPI (docs/verification.md): pure, no I/O.

* :class:`Description` -- what a volume says about one qtree-relative path
  (the ``coalesce_describe`` hook); :class:`Holds` -- what a destination
  keeps of an entry (``coalesce_describe_holds``), so that a field is
  compared only where the destination can hold it.
* :class:`Touched` -- the paths an update may have changed, collected from
  its change records on their way to the applier.
* :class:`Comparer` -- compares descriptions of the same paths on both sides
  (every field, hard-link groups) and keeps the first differences in path
  order; :func:`compare_paths` checks a list of paths in batches,
  :func:`tree_compare` two whole images (merged streams in path order).
* :func:`due_for_verification` -- which replica the background verification
  (``[group] verify_every``) checks next.

Paths are ordered component by component, by the bytes of each name, so a
directory comes before everything below it (:func:`path_key`).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypedDict

import attrs

from coalesce_core.stream import records as R
from coalesce_core.stream.fingerprint import BLOCK
from coalesce_core.stream.privileges import split_xattrs

ABSENT = "absent"
KINDS = (ABSENT, "d", "f", "l")
KIND_WORDS = {ABSENT: "absent", "d": "a directory", "f": "a regular file", "l": "a symlink"}

#: The fields compared, in the order a difference is looked for (the first one that differs is reported).
FIELDS = ("kind", "target", "size", "content", "mode", "uid", "gid", "mtime_ns", "xattrs", "privileged_xattrs", "link")

_XATTR_TAG = b"coalesce-xattrs-v1\n"


def path_key(path: str) -> tuple[bytes, ...]:
    """Sort key: a directory before its contents, names compared by their bytes."""
    return tuple(c.encode("utf-8", "surrogateescape") for c in path.split("/")) if path else ()


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def xattr_digest(xattrs: Mapping[str, bytes]) -> str:
    """The digest of an entry's extended attributes (every backend computes it the same way)."""
    h = hashlib.sha256(_XATTR_TAG)
    for name in sorted(xattrs, key=lambda n: n.encode("utf-8", "surrogateescape")):
        nb, value = name.encode("utf-8", "surrogateescape"), bytes(xattrs[name])
        h.update(len(nb).to_bytes(4, "big") + nb + len(value).to_bytes(4, "big"))
        h.update(value)
    return h.hexdigest()


_NO_XATTRS = xattr_digest({})


class XattrFields(TypedDict):
    xattrs: str | None
    privileged_xattrs: str | None


def xattr_fields(xattrs: Mapping[str, bytes] | None) -> XattrFields:
    """The ``xattrs`` and ``privileged_xattrs`` fields of the Description of an entry holding
    ``xattrs`` (None: the file system will not list them; neither is compared then)."""
    if xattrs is None:
        return {"xattrs": None, "privileged_xattrs": None}
    if not xattrs:  # most entries: the digest of none, computed once
        return {"xattrs": _NO_XATTRS, "privileged_xattrs": None}
    plain, privileged = split_xattrs(xattrs)
    return {"xattrs": xattr_digest(plain), "privileged_xattrs": xattr_digest(privileged) if privileged else None}


def _kind(_inst: object, _a: attrs.Attribute, value: str) -> None:
    if value not in KINDS:
        raise ValueError(f"a description's kind is one of {KINDS}, not {value!r}")


@attrs.frozen
class Description:
    """One qtree-relative path ("" is the qtree root) as a volume holds it.

    kind      ``absent``, ``d``, ``f`` or ``l`` (special files describe as absent:
              no change record carries them)
    mode      permission bits (``mode & 0o7777``) of a directory or regular file
    uid, gid  owner of any entry
    size      of a regular file
    mtime_ns  modification time of any entry
    target    of a symlink
    xattrs    :func:`xattr_digest` of a directory's or regular file's extended
              attributes outside the privileged namespaces (None for a symlink: Linux
              keeps no user xattrs there; None where they cannot be listed)
    privileged_xattrs
              :func:`xattr_digest` of its ``security.*`` and ``trusted.*`` xattrs
              (coalesce_core.stream.privileges), None when it has none: kept apart so
              that a comparison can see a source as ``[group] privileges = "strip"``
              transforms it (:func:`xattr_fields` computes both)
    content   a regular file's content digest (coalesce_core.stream.fingerprint
              ``ContentDigest``: holes read as zeros), only when asked for
    entries   a directory's entries: sorted (name, kind) pairs
    ident     a regular file's identity (an inode number), compared only as
              "which described paths share it" (hard-link groups)
    nlink     a regular file's link count (0: the backend does not count
              links): bounds the hard-link bookkeeping of a whole-image walk;
              never compared (a replica's purgatory holds links of its own
              until the next jump-ahead)
    part      a regular file's part digest (coalesce_core.stream.fingerprint
              ``part_digest``) over the byte ranges asked for it, only when
              ranges were asked (the check of an update, for a file the update
              only patched in place); compared like ``content``
    """

    path: str
    kind: str = attrs.field(validator=_kind)
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    mtime_ns: int | None = None
    target: str | None = None
    xattrs: str | None = None
    privileged_xattrs: str | None = None
    content: str | None = None
    entries: tuple[tuple[str, str], ...] | None = None
    ident: int | None = None
    nlink: int = 1
    part: str | None = None

    @classmethod
    def absent(cls, path: str) -> "Description":
        return cls(path=path, kind=ABSENT)


@attrs.frozen
class Holds:
    """What a destination volume keeps of an entry, declared by its backend.

    owners       uid and gid are kept (and compared)
    xattrs       extended attributes are kept (and compared)
    mtime_ns     the resolution of the modification times it keeps, in ns (1:
                 exact; 10**9: whole seconds, as zfs-fuse); 0: none kept
    """

    owners: bool = True
    xattrs: bool = True
    mtime_ns: int = attrs.field(default=1, validator=attrs.validators.ge(0))

    def not_compared(self) -> tuple[str, ...]:
        """The fields this destination cannot hold (reported, never silently dropped)."""
        out = []
        if not self.owners:
            out += ["uid", "gid"]
        if not self.xattrs:
            out.append("xattrs")
        if not self.mtime_ns:
            out.append("mtime_ns")
        return tuple(out)


@attrs.frozen
class Difference:
    """The first field of ``path`` that differs, its value in the source PCPI and in the replica.
    ``field`` "link": the path is a hard link of ``source`` in the source and of ``replica`` in the replica."""

    path: str
    field: str
    source: object
    replica: object

    def explain(self, source_pcpi: str, side: str = "source PCPI") -> str:
        """``'d1/p/c' is absent in the replica but a directory in source PCPI co-g-src-000004``
        (``side``: what the compared image is, e.g. the PCPI a rollback restored)."""
        where = _show(self.path)
        src = f"{side} {source_pcpi}"
        if self.field == "kind":
            return (
                f"{where} is {KIND_WORDS[str(self.replica)]} in the replica but {KIND_WORDS[str(self.source)]} in {src}"
            )
        if self.field == "link":
            return (
                f"{where} is a hard link of {_show(str(self.replica))} in the replica but of "
                f"{_show(str(self.source))} in {src}"
            )
        return (
            f"{where}: {self.field} is {_value(self.field, self.replica)} in the replica but "
            f"{_value(self.field, self.source)} in {src}"
        )

    def as_dict(self) -> dict[str, object]:
        return {"path": self.path, "field": self.field, "source": self.source, "replica": self.replica}


def _show(path: str) -> str:
    return repr(path) if path else "the qtree root"


def _value(field: str, value: object) -> str:
    if value is None:
        return "none" if field == "privileged_xattrs" else "unknown"
    if field == "mode":
        return oct(int(value))  # type: ignore[call-overload]
    if field in ("content", "xattrs", "privileged_xattrs"):
        return f"digest {str(value)[:12]}"
    return repr(value)


def _differ(a: Description, b: Description, holds: Holds) -> Difference | None:
    """The first field in which ``b`` (replica) differs from ``a`` (source), or None."""
    p = a.path
    if a.kind != b.kind:
        return Difference(p, "kind", a.kind, b.kind)
    if a.kind == ABSENT:
        return None
    if a.target != b.target:
        return Difference(p, "target", a.target, b.target)
    if a.size != b.size:
        return Difference(p, "size", a.size, b.size)
    if a.content is not None and b.content is not None and a.content != b.content:
        return Difference(p, "content", a.content, b.content)
    if a.part is not None and b.part is not None and a.part != b.part:
        return Difference(p, "content", a.part, b.part)
    if a.mode != b.mode:
        return Difference(p, "mode", a.mode, b.mode)
    if holds.owners:
        if a.uid != b.uid:
            return Difference(p, "uid", a.uid, b.uid)
        if a.gid != b.gid:
            return Difference(p, "gid", a.gid, b.gid)
    r = holds.mtime_ns
    if r and a.mtime_ns is not None and b.mtime_ns is not None and a.mtime_ns // r != b.mtime_ns // r:
        return Difference(p, "mtime_ns", a.mtime_ns, b.mtime_ns)
    if holds.xattrs and a.xattrs is not None and b.xattrs is not None and a.xattrs != b.xattrs:
        return Difference(p, "xattrs", a.xattrs, b.xattrs)
    if holds.xattrs and a.xattrs is not None and b.xattrs is not None and a.privileged_xattrs != b.privileged_xattrs:
        return Difference(p, "privileged_xattrs", a.privileged_xattrs, b.privileged_xattrs)
    return None


def _entry_differences(parent: str, a: Description, b: Description) -> Iterator[Difference]:
    """Entries of a directory present on one side only, or of another kind: as kind differences
    of the child paths (the child is the first path that differs)."""
    sa, sb = dict(a.entries or ()), dict(b.entries or ())
    if sa == sb:
        return
    for name in sorted(set(sa) | set(sb), key=lambda n: n.encode("utf-8", "surrogateescape")):
        ka, kb = sa.get(name, ABSENT), sb.get(name, ABSENT)
        if ka != kb:
            yield Difference(join(parent, name), "kind", ka, kb)


class Comparer:
    """Compares the descriptions of the same paths on both sides, batch after batch.

    Batches may come in any order; :attr:`differences` keeps the ``limit``
    first differences in path order (one per path: its first differing
    field, :data:`FIELDS`).  Hard-link groups: two described regular files
    that share an identity on one side must share it on the other; the
    bookkeeping keeps only files with more than one link (or an unknown
    count) on either side, so it grows with the hard-linked files, not the
    image."""

    def __init__(self, holds: Holds = Holds(), limit: int = 10) -> None:
        self.holds = holds
        self.limit = limit
        self.differences: list[Difference] = []
        self._keys: list[tuple[bytes, ...]] = []
        self._seen: set[str] = set()
        self.checked = 0
        self._lead_src: dict[int, str] = {}
        self._lead_dst: dict[int, str] = {}
        self._linked: list[tuple[str, int, int]] = []  # (path, src ident, dst ident), resolved at the end
        #: source identities of files with fewer links in the replica than in the source (both
        #: counted): a name of the group may be missing, or separate, outside the described paths
        self.short_links: set[int] = set()

    def add(self, diff: Difference) -> None:
        if diff.path in self._seen:
            return
        key = path_key(diff.path)
        if len(self.differences) >= self.limit and key >= self._keys[-1]:
            return
        self._seen.add(diff.path)
        i = bisect.bisect(self._keys, key)
        self._keys.insert(i, key)
        self.differences.insert(i, diff)
        if len(self.differences) > self.limit:
            self._keys.pop()
            self.differences.pop()

    def feed(self, src: Sequence[Description], dst: Sequence[Description], *, entries: bool = True) -> None:
        """Compare one batch: the same paths, in the same order, on both sides (``entries``:
        also the entries of directories, as differences of the child paths)."""
        if len(src) != len(dst):
            raise ValueError(f"{len(src)} source descriptions for {len(dst)} replica descriptions")
        for a, b in zip(src, dst):
            if a.path != b.path:
                raise ValueError(f"description of {a.path!r} paired with one of {b.path!r}")
            self.checked += 1
            d = _differ(a, b, self.holds)
            if d is not None:
                self.add(d)
                continue
            if a.kind == "d" and entries:
                for e in _entry_differences(a.path, a, b):
                    self.add(e)
            elif a.kind == "f" and a.ident is not None and b.ident is not None and (a.nlink != 1 or b.nlink != 1):
                self._linked.append((a.path, a.ident, b.ident))
                if 0 < b.nlink < a.nlink:
                    self.short_links.add(a.ident)

    def finish(self) -> list[Difference]:
        """Resolve the hard-link groups (in path order) and return the differences."""
        for path, si, di in sorted(self._linked, key=lambda t: path_key(t[0])):
            ls = self._lead_src.setdefault(si, path)
            ld = self._lead_dst.setdefault(di, path)
            if ls != ld:
                self.add(Difference(path, "link", ls, ld))
        self._linked.clear()
        return list(self.differences)


def compare(
    src: Sequence[Description], dst: Sequence[Description], holds: Holds = Holds(), limit: int = 10
) -> list[Difference]:
    """The first ``limit`` differences, in path order, between two descriptions of the same paths."""
    c = Comparer(holds, limit)
    c.feed(src, dst)
    return c.finish()


# ---------------------------------------------------------------------------
# the wire form (the DESCRIBE request of docs/protocol.md)
# ---------------------------------------------------------------------------
_WIRE = (
    ("m", "mode"),
    ("u", "uid"),
    ("g", "gid"),
    ("s", "size"),
    ("t", "mtime_ns"),
    ("l", "target"),
    ("x", "xattrs"),
    ("X", "privileged_xattrs"),
    ("c", "content"),
    ("i", "ident"),
    ("r", "part"),
)
_MAX_INT = 1 << 64
_MAX_ENTRIES = 10_000_000


def description_to_json(d: Description) -> dict[str, object]:
    """A compact JSON object of a Description (fields that are None are left out)."""
    out: dict[str, object] = {"p": d.path, "k": d.kind}
    for key, field in _WIRE:
        value = getattr(d, field)
        if value is not None:
            out[key] = value
    if d.entries is not None:
        out["e"] = [list(e) for e in d.entries]
    if d.nlink != 1:
        out["n"] = d.nlink
    return out


def description_from_json(obj: object) -> Description:
    """The Description of a JSON object from a peer; ValueError for anything malformed."""
    from coalesce_core.stream.records import MAX_NAME, MAX_PATH, check_path_or_root

    if not isinstance(obj, dict) or set(obj) - {"p", "k", "e", "n", *(k for k, _f in _WIRE)}:
        raise ValueError("a description is an object with the keys of docs/protocol.md")
    path, kind = obj.get("p"), obj.get("k")
    if not isinstance(path, str) or kind not in KINDS:
        raise ValueError("a description needs a path and a kind")
    check_path_or_root(path)
    kw: dict[str, object] = {}
    for key, field in _WIRE:
        value = obj.get(key)
        if value is None:
            continue
        if field in ("target", "xattrs", "privileged_xattrs", "content", "part"):
            limit = MAX_PATH if field == "target" else 128
            if not isinstance(value, str) or not value or "\x00" in value or len(value) > limit:
                raise ValueError(f"a description's {field} is not a short string")
        elif not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _MAX_INT:
            raise ValueError(f"a description's {field} is not an integer from 0 to 2**64")
        kw[field] = value
    nlink = obj.get("n", 1)
    if not isinstance(nlink, int) or isinstance(nlink, bool) or not 0 <= nlink < _MAX_INT:
        raise ValueError("a description's nlink is not an integer from 0 to 2**64")
    entries = obj.get("e")
    if entries is not None:
        if not isinstance(entries, list) or len(entries) > _MAX_ENTRIES:
            raise ValueError("a description's entries are not a list")
        out = []
        for e in entries:
            if (
                not isinstance(e, list)
                or len(e) != 2
                or not isinstance(e[0], str)
                or not e[0]
                or e[1] not in ("d", "f", "l")
                or "/" in e[0]
                or "\x00" in e[0]
                or e[0] in (".", "..")
                or len(e[0].encode("utf-8", "surrogateescape")) > MAX_NAME
            ):
                raise ValueError("a directory entry is not a [name, kind] pair")
            out.append((e[0], e[1]))
        kw["entries"] = tuple(out)
    return Description(path=path, kind=kind, nlink=nlink, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# the paths an update may have changed
# ---------------------------------------------------------------------------
_NONE, _ENTRIES, _CONTENT = -1, 0, 1


#: a file patched in more separate ranges than this is compared whole (bounds the bookkeeping)
MAX_PARTS = 1024
#: past this many nodes (paths the records named and their ancestors), a Touched set given a
#: ``spill`` moves them to it (coalesce_core.touched_store): the memory of the check of an
#: update then does not grow with its number of files
SPILL_PATHS = 65536


class _Node:
    __slots__ = ("children", "want", "moved", "part", "wrote")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.want = _NONE
        self.moved = False
        # with want _CONTENT: None, the whole content; else the flat [start, end, ...] of the
        # BLOCK-aligned ranges the records wrote (a file patched in place)
        self.part: list[int] | None = None
        self.wrote = False  # a Write named it: without one, a patched file is compared whole


class Touched:
    """The qtree-relative paths an update may have changed, from its records.

    Every path a record names is described after the update, with its
    content digest when it is a regular file; the parent of every path whose
    entry was created, removed or renamed is described for its entries; the
    qtree root always.  A ``Rename`` of a directory carries the touched paths
    below it to their new place (and both ends are described: the old one
    must hold what the source holds there now, often nothing); the new place
    is also one of the :meth:`moved` subtrees, whose every path is compared
    (:func:`compare_subtrees`): a directory moved whole to a wrong place
    names none of the paths below it.  Memory is one
    small node per path the records name and per ancestor of one: it follows
    the size of the change, not of the qtree.

    A file the records only patched in place (``Write``, ``Truncate``,
    ``SetAttr``, ``SetXattr``; never created, removed, linked or renamed,
    nor below an entry renamed), at least one ``Write`` among them, is
    compared by the ranges they wrote (:meth:`parts`), not by its whole
    content.

    ``spill``: makes the on-disk store (coalesce_core.touched_store.TouchedStore) the
    nodes move to once there are more than ``spill_at`` (default :data:`SPILL_PATHS`);
    every answer keeps its meaning (:func:`compare_touched` then reads them a batch at a
    time).  :meth:`close` ends the store."""

    def __init__(self, spill: Callable[[], Any] | None = None, spill_at: int | None = None) -> None:
        self._root = _Node()
        self._root.want = _ENTRIES
        self.records = 0
        self._spill = spill
        self._nodes = 1
        self._spill_at = SPILL_PATHS if spill_at is None else spill_at
        self.store: Any = None  # the TouchedStore once spilled

    @property
    def spilled(self) -> bool:
        return self.store is not None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def _node(self, path: str) -> _Node:
        if self.store is not None:
            return self.store.node(path)
        node = self._root
        if path:
            for part in path.split("/"):
                child = node.children.get(part)
                if child is None:
                    child = node.children[part] = _Node()
                    self._nodes += 1
                node = child
        return node

    def _move_to_store(self) -> None:
        """Every node that holds something, to a new store; the tree is dropped."""
        assert self._spill is not None
        store = self._spill()

        def nodes() -> Iterator[tuple[str, _Node]]:
            stack: list[tuple[str, _Node]] = [("", self._root)]
            while stack:
                path, node = stack.pop()
                for name, child in node.children.items():
                    stack.append((join(path, name), child))
                node.children = {}
                if node.want != _NONE or node.moved or node.part is not None or node.wrote:
                    yield path, node

        try:
            store.put(nodes())
        except BaseException:
            store.close()
            raise
        self.store, self._root = store, _Node()

    def _mark(self, path: str, want: int) -> None:
        node = self._node(path)
        if node.want < want:
            node.want = want
        if want == _CONTENT:
            node.part = None

    def _patch(self, path: str, start: int, end: int, wrote: bool = False) -> None:
        """``path`` changed in place from ``start`` to ``end`` (nothing when equal; ``wrote``:
        by a Write)."""
        node = self._node(path)
        if node.want < _CONTENT:
            node.want, node.part = _CONTENT, []
        node.wrote = node.wrote or wrote
        part = node.part
        if part is None or start >= end:
            return
        start -= start % BLOCK
        end += -end % BLOCK
        if part and part[-2] <= start <= part[-1]:  # the common case: the next piece of a run
            if end > part[-1]:
                part[-1] = end
        elif len(part) >= 2 * MAX_PARTS:
            node.part = None
        else:
            part += (start, end)

    def _changed_entry(self, path: str) -> None:
        self._mark(path, _CONTENT)
        self._mark(parent_of(path), _ENTRIES)

    def add(self, rec: object) -> None:
        """Account for one record (Begin and End are ignored)."""
        t = type(rec)
        if t is R.Write:
            offset = rec.offset  # type: ignore[attr-defined]
            self._patch(rec.path, offset, offset + len(rec.data), True)  # type: ignore[attr-defined]
        elif t is R.Truncate:  # the blocks on both sides of the new end: what it kept and what it cut
            size = rec.size  # type: ignore[attr-defined]
            self._patch(rec.path, max(size - 1, 0), size + 1)  # type: ignore[attr-defined]
        elif t is R.SetAttr or t is R.SetXattr:
            self._patch(rec.path, 0, 0)  # type: ignore[attr-defined]
        elif t is R.MkFile or t is R.MkDir or t is R.Symlink or t is R.Unlink or t is R.RmDir:
            self._changed_entry(rec.path)  # type: ignore[attr-defined]
        elif t is R.HardLink:
            self._changed_entry(rec.path)  # type: ignore[attr-defined]
            self._mark(rec.existing, _CONTENT)  # type: ignore[attr-defined]
        elif t is R.Rename:
            self._rename(rec.old, rec.new)  # type: ignore[attr-defined]
        elif t is R.Begin or t is R.End:
            return
        else:
            raise TypeError(f"not a change record: {rec!r}")
        self.records += 1
        if self._nodes > self._spill_at and self._spill is not None and self.store is None:
            self._move_to_store()

    def _rename(self, old: str, new: str) -> None:
        if self.store is not None:
            self.store.rename(old, new)
            self._changed_entry(old)
            self._changed_entry(new)
            self._node(new).moved = True
            return
        op, _, oname = old.rpartition("/")
        parent = self._root
        for part in op.split("/") if op else ():
            parent = parent.children.get(part)  # type: ignore[assignment]
            if parent is None:
                break
        moved = parent.children.pop(oname, None) if parent is not None else None
        if moved is not None:
            target = self._node(parent_of(new))
            name = new.rpartition("/")[2]
            there = target.children.get(name)
            if there is None:
                target.children[name] = moved
            else:
                _merge(there, moved)
        self._changed_entry(old)
        self._changed_entry(new)
        self._node(new).moved = True

    def iter_paths(self, batch: int = 1024) -> Iterator[tuple[str, bool]]:
        """:meth:`paths`, read a batch at a time from the store once spilled."""
        if self.store is None:
            yield from self.paths()
            return
        for page in self.store.paths(batch):
            yield from page

    def paths(self) -> list[tuple[str, bool]]:
        """(path, content wanted) of every path to describe, in path order."""
        if self.store is not None:
            return list(self.iter_paths())
        out: list[tuple[str, bool]] = []
        stack: list[tuple[str, _Node]] = [("", self._root)]
        while stack:
            path, node = stack.pop()
            if node.want != _NONE:
                out.append((path, node.want == _CONTENT))
            for name in sorted(node.children, key=lambda n: n.encode("utf-8", "surrogateescape"), reverse=True):
                stack.append((join(path, name), node.children[name]))
        return out

    def split(self) -> tuple[list[tuple[str, bool]], list[tuple[str, bool, str | None]]]:
        """The paths of :meth:`paths` in two parts, each in path order: the *parents* (marked
        paths with a marked child), and the others as ``(path, content wanted, parent)`` where
        ``parent`` is the path's parent when that is one of the parents, else None.  A path
        with a parent need not be described where that parent's entries lack its name on
        both sides (:func:`compare_touched`).  Whole lists, also once spilled: for small sets."""
        if self.store is not None:
            ups = [(p, c) for page in self.store.parents(1024) for p, c, _t in page]
            uppers = {p for p, _c in ups}
            rest = [
                (p, c, parent_of(p) if p and parent_of(p) in uppers else None)
                for page in self.store.leaves(1024)
                for p, c, _t in page
            ]
            return ups, rest
        parents: list[tuple[str, bool]] = []
        leaves: list[tuple[str, bool, str | None]] = []
        stack: list[tuple[str, _Node, str | None]] = [("", self._root, None)]
        while stack:
            path, node, up = stack.pop()
            inner = node.want != _NONE and any(c.want != _NONE for c in node.children.values())
            if inner:
                parents.append((path, node.want == _CONTENT))
            elif node.want != _NONE:
                leaves.append((path, node.want == _CONTENT, up))
            below = path if inner else None
            for name in sorted(node.children, key=lambda n: n.encode("utf-8", "surrogateescape"), reverse=True):
                stack.append((join(path, name), node.children[name], below))
        return parents, leaves

    def part_of(self, path: str) -> tuple[tuple[int, int], ...] | None:
        """The ranges of ``path`` in :meth:`parts` if the records so far ended now; None when it
        is compared whole (or not a file patched in place)."""
        if self.store is not None:
            return self.store.part_of(path)
        node: _Node | None = self._root
        for part in path.split("/") if path else ():
            if node is None or node.moved:
                return None
            node = node.children.get(part)
        if node is None or node.moved or node.part is None or not node.wrote or node.want != _CONTENT:
            return None
        return _merged(node.part)

    def parts(self) -> Mapping[str, tuple[tuple[int, int], ...]]:
        """The files patched in place: path -> the sorted, disjoint ranges (aligned to
        fingerprint.BLOCK) their records wrote; every other path with content wanted is
        compared whole (a renamed file, a file below a renamed entry, a created or linked one).
        Once spilled, a mapping that looks paths up in the store."""
        if self.store is not None:
            return self.store.parts()
        out: dict[str, tuple[tuple[int, int], ...]] = {}
        stack: list[tuple[str, _Node, bool]] = [("", self._root, False)]
        while stack:
            path, node, moved = stack.pop()
            moved = moved or node.moved
            if node.part is not None and node.wrote and node.want == _CONTENT and not moved:
                out[path] = _merged(node.part)
            for name, child in node.children.items():
                stack.append((join(path, name), child, moved))
        return out

    def moved(self) -> list[str]:
        """The places, in path order, of the entries the records renamed (after every later
        rename), leaving out those below another one: each is the top of a subtree whose
        every path the check before ``done`` compares."""
        if self.store is not None:
            self.store.find_tops()
            return [p for page in self.store.moved(1024) for p in page]
        out: list[str] = []
        stack: list[tuple[str, _Node]] = [("", self._root)]
        while stack:
            path, node = stack.pop()
            if node.moved:
                out.append(path)
                continue
            for name in sorted(node.children, key=lambda n: n.encode("utf-8", "surrogateescape"), reverse=True):
                stack.append((join(path, name), node.children[name]))
        return out

    def __len__(self) -> int:
        if self.store is not None:
            return self.store.count()
        n = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            n += node.want != _NONE
            stack.extend(node.children.values())
        return n


def _merged(flat: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint ranges of the flat ``[start, end, ...]`` of :meth:`Touched._patch`."""
    pairs = sorted(zip(flat[::2], flat[1::2]))
    out: list[tuple[int, int]] = []
    for start, end in pairs:
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return tuple(out)


def _merge(into: _Node, node: _Node) -> None:
    stack = [(into, node)]
    while stack:
        a, b = stack.pop()
        a.want = max(a.want, b.want)
        a.moved = a.moved or b.moved
        a.part = None  # below a renamed entry: compared whole
        for name, child in b.children.items():
            there = a.children.get(name)
            if there is None:
                a.children[name] = child
            else:
                stack.append((there, child))


# ---------------------------------------------------------------------------
# whole images
# ---------------------------------------------------------------------------
Describe = Callable[[Sequence[tuple[str, bool]]], Sequence[Description]]
DescribeBoth = Callable[[Sequence[tuple[str, bool]]], tuple[Sequence[Description], Sequence[Description]]]


@attrs.frozen
class Outcome:
    """What a verification found: the first differences in path order, how many paths were
    compared, and the fields the destination cannot hold (not compared)."""

    differences: tuple[Difference, ...]
    checked: int
    not_compared: tuple[str, ...] = ()
    #: source identities of compared files that have fewer links in the replica than in the
    #: source (:attr:`Comparer.short_links`): their other names may lie outside what was compared
    short_links: frozenset[int] = frozenset()

    @property
    def ok(self) -> bool:
        return not self.differences


def compare_paths(
    paths: Iterable[tuple[str, bool]],
    describe_both: DescribeBoth,
    holds: Holds = Holds(),
    *,
    batch: int = 1024,
    limit: int = 1,
    stop_early: bool = True,
) -> Outcome:
    """Describe ``paths`` (in path order) on both sides, ``batch`` at a time
    (``describe_both(chunk) -> (source descriptions, replica descriptions)``), and compare them.

    ``stop_early``: stop after the first batch with a difference; since the
    batches follow path order, the first difference found is the first of all."""
    c = Comparer(holds, limit)
    chunk: list[tuple[str, bool]] = []

    def run() -> bool:
        c.feed(*describe_both(chunk))
        chunk.clear()
        return stop_early and bool(c.finish())

    for item in paths:
        chunk.append(item)
        if len(chunk) >= batch and run():
            break
    else:
        if chunk:
            run()
    return Outcome(tuple(c.finish()), c.checked, holds.not_compared())


def compare_subtrees(
    tops: Iterable[str], describe_both: DescribeBoth, holds: Holds = Holds(), *, batch: int = 1024, limit: int = 1
) -> Outcome:
    """Every path at and below each of ``tops`` on both sides, without content digests: a
    directory a level at a time, its children being the union of its entries on both sides
    (a name on one side only is described as absent on the other).  Stops at the first
    batch with a difference.  Memory: one level of the widest subtree."""
    c = Comparer(holds, limit)
    level = list(tops)
    while level:
        below: list[str] = []
        for i in range(0, len(level), batch):
            theirs, mine = describe_both([(p, False) for p in level[i : i + batch]])
            c.feed(theirs, mine)
            if c.finish():
                return Outcome(tuple(c.differences), c.checked, holds.not_compared())
            for a, b in zip(theirs, mine):
                if a.kind == "d" and b.kind == "d":
                    names = {n for n, _k in a.entries or ()} | {n for n, _k in b.entries or ()}
                    below.extend(join(a.path, n) for n in sorted(names))
        level = below
    return Outcome(tuple(c.finish()), c.checked, holds.not_compared())


def compare_touched(
    touched: Touched, describe_both: DescribeBoth, holds: Holds = Holds(), *, batch: int = 1024
) -> Outcome:
    """The check of an update (docs/verification.md): every path ``touched`` names, then every
    path below the entries it renamed (:func:`compare_subtrees`, for those that are directories
    on either side); the first difference in path order, or none.

    The parents (paths with a touched child) are described first, with their entries; a
    touched path whose parent's entries lack its name on the source side is then not
    described: it is absent there, and the parent's compared entries show it absent in the
    replica too (a name the replica has and the source lacks is a difference of the parent).
    This spares the absent ends of renames and removals, half the paths of a rename.  When
    the parents differ, every path is described (:func:`compare_paths`), so the difference
    reported is still the first in path order.  A spilled ``touched`` is read a batch at a
    time, with the same result (:func:`_compare_spilled`)."""
    if touched.spilled:
        return _compare_spilled(touched, describe_both, holds, batch)
    parents, leaves = touched.split()
    tops = set(touched.moved())
    c = Comparer(holds, 1)
    names: dict[str, frozenset[str] | None] = {}
    tops_dirs: list[str] = []

    def feed(chunk: list[tuple[str, bool]]) -> list[Description]:
        """Describe and compare ``chunk``; note the renamed tops that are directories; the source side."""
        theirs, mine = describe_both(chunk)
        c.feed(theirs, mine)
        tops_dirs.extend(a.path for a, b in zip(theirs, mine) if a.path in tops and "d" in (a.kind, b.kind))
        return list(theirs)

    for i in range(0, len(parents), batch):
        theirs = feed(parents[i : i + batch])
        if c.finish():
            return compare_paths(touched.paths(), describe_both, holds, batch=batch, limit=1)
        for a in theirs:
            names[a.path] = frozenset(n for n, _k in a.entries or ()) if a.kind == "d" else None
    rest: list[tuple[str, bool]] = []
    for path, content, up in leaves:
        if up is not None:
            there = names.get(up)
            if there is None or path.rpartition("/")[2] not in there:
                continue
        rest.append((path, content))
        if len(rest) >= batch:
            feed(rest)
            rest = []
            if c.finish():
                break
    else:
        if rest:
            feed(rest)
    differences = c.finish()
    if differences:
        return Outcome(tuple(differences), c.checked, holds.not_compared())
    checked = c.checked
    below = compare_subtrees(sorted(tops_dirs, key=path_key), describe_both, holds, batch=batch, limit=1)
    return Outcome(below.differences, checked + below.checked, holds.not_compared(), frozenset(c.short_links))


def _compare_spilled(touched: Touched, describe_both: DescribeBoth, holds: Holds, batch: int) -> Outcome:
    """:func:`compare_touched` of a spilled set: the same order and the same paths, read from its
    store a batch at a time; the absent ends and the renamed directories are noted there too, so
    the memory is a batch of descriptions, whatever the number of paths."""
    store = touched.store
    store.find_tops()
    c = Comparer(holds, 1)

    def feed(chunk: list[tuple[str, bool, bool]]) -> list[Description]:
        theirs, mine = describe_both([(p, w) for p, w, _t in chunk])
        c.feed(theirs, mine)
        tops = {p for p, _w, t in chunk if t}
        if tops:
            store.note_top_dirs([a.path for a, b in zip(theirs, mine) if a.path in tops and "d" in (a.kind, b.kind)])
        return list(theirs)

    for chunk in store.parents(batch):
        theirs = feed(chunk)
        if c.finish():
            return compare_paths(touched.iter_paths(batch), describe_both, holds, batch=batch, limit=1)
        for a in theirs:
            store.skip_absent(a.path, frozenset(n for n, _k in a.entries or ()) if a.kind == "d" else None)
    for chunk in store.leaves(batch):
        feed(chunk)
        if c.finish():
            break
    differences = c.finish()
    checked = c.checked
    if differences:
        return Outcome(tuple(differences), checked, holds.not_compared())
    for tops in store.top_dirs(batch):  # in path order, each subtree whole: the first difference is the first
        below = compare_subtrees(tops, describe_both, holds, batch=batch, limit=1)
        checked += below.checked
        if below.differences:
            return Outcome(below.differences, checked, holds.not_compared())
    return Outcome((), checked, holds.not_compared(), frozenset(c.short_links))


def _under(key: tuple[bytes, ...], top: tuple[bytes, ...]) -> bool:
    return len(key) > len(top) and key[: len(top)] == top


def tree_compare(
    src: Iterable[Description], dst: Iterable[Description], holds: Holds = Holds(), *, limit: int = 10
) -> Outcome:
    """Compare two whole images given as descriptions in path order (``coalesce_describe_tree``):
    a merge of the two streams.  A path on one side only, or of another kind, is one
    difference; what lies below it is not reported again.  Memory: the hard-link
    bookkeeping of :class:`Comparer` (files with more than one link)."""
    c = Comparer(holds, limit)
    si, di = iter(src), iter(dst)
    a, b = next(si, None), next(di, None)
    skip: tuple[bytes, ...] | None = None
    while a is not None or b is not None:
        ka = path_key(a.path) if a is not None else None
        kb = path_key(b.path) if b is not None else None
        if skip is not None:
            if ka is not None and _under(ka, skip):
                a = next(si, None)
                continue
            if kb is not None and _under(kb, skip):
                b = next(di, None)
                continue
            skip = None
        if kb is None or (ka is not None and ka < kb):
            assert a is not None and ka is not None
            c.checked += 1
            c.add(Difference(a.path, "kind", a.kind, ABSENT))
            skip, a = ka, next(si, None)
            continue
        if ka is None or kb < ka:
            assert b is not None
            c.checked += 1
            c.add(Difference(b.path, "kind", ABSENT, b.kind))
            skip, b = kb, next(di, None)
            continue
        assert a is not None and b is not None
        c.feed([a], [b], entries=False)
        if a.kind != b.kind:
            skip = ka
        a, b = next(si, None), next(di, None)
    return Outcome(tuple(c.finish()), c.checked, holds.not_compared())


def generic_tree(describe: Describe, content: bool, batch: int = 1024) -> Iterator[Description]:
    """``coalesce_describe_tree`` for a backend without one: a walk in path order through
    ``describe``, the entries of one directory ``batch`` at a time."""

    def children(d: Description) -> Iterator[Description]:
        entries = d.entries or ()
        for i in range(0, len(entries), batch):
            yield from describe([(join(d.path, n), content) for n, _k in entries[i : i + batch]])

    root = describe([("", content)])[0]
    yield root
    stack = [children(root)] if root.kind == "d" else []
    while stack:
        d = next(stack[-1], None)
        if d is None:
            stack.pop()
            continue
        yield d
        if d.kind == "d" and d.entries:
            stack.append(children(d))


# ---------------------------------------------------------------------------
# the background verification
# ---------------------------------------------------------------------------
def due_for_verification(last: Mapping[str, float], candidates: Sequence[str], every: float, now: float) -> str | None:
    """The replica the background verification checks now, or None.

    ``last``: the time of each replica's last full verification (missing:
    never).  Verifications are spread over the replicas: one is due when the
    latest verification of any candidate is at least ``every / n`` old (n
    candidates), and then it is the candidate verified longest ago, if that
    one too is at least ``every / n`` old; ties by name.  In the steady
    state every replica is verified once per ``every``."""
    if not candidates or not every or every <= 0 or not math.isfinite(every):
        return None
    gap = every / len(candidates)
    times = [last[c] for c in candidates if c in last]
    if times and now - max(times) < gap:
        return None
    oldest = min(candidates, key=lambda c: (last.get(c, -math.inf), c))
    if now - last.get(oldest, -math.inf) < gap:
        return None
    return oldest
