"""``MemVolume``: one in-memory volume, the process-wide registry, and the
plain Python API that tests and the demo use to write *source* data.

A volume is:

* ``active``: qtree name -> :class:`QtreeState` (the active file system),
* ``snapshots``: PCPI name -> {qtree name -> QtreeState} (insertion order =
  creation order; the states are frozen and shared with the active FS until
  the active FS writes to that qtree: copy-on-write),
* ``exports``: the export table, replica -> PCPI name | ACTIVE | None,
  replaced as one dict (atomic for readers),
* ``lock``: an RLock held for every primitive step.  ``apply`` takes it per
  record, never while it pulls the next record from the caller's iterator,
  so a slow transfer to one qtree does not stall the others.

``mem://NAME`` volumes live in the registry only (they survive an abandoned
agent in the same process, as disks survive a crash).  ``mem:///ABS/PATH``
volumes are also written to PATH after every mutating primitive (see
persist.py), so other processes and a restarted process see them.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Iterable, Iterator, Mapping, Sequence

from coalesce_core.backend.handles import VolumeHandle
from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.errors import BackendError, CorruptStream, HostilePath, TruncatedStream
from coalesce_core.stream import records as R

from . import describing, persist
from .applying import apply_record, check_record
from .diffing import diff_stream
from .tree import Dir, File, Node, QtreeState, entries_of, walk
from .tree import Symlink as SymNode

#: Like WAFL: a volume holds at most 255 PCPIs (settable per volume: ``vol.max_pcpis``).
MAX_PCPIS = 255

_REGISTRY: dict[tuple[str, str], "MemVolume"] = {}
_REGISTRY_LOCK = threading.Lock()


def _check_qtree(qtree: str) -> str:
    R.check_path(qtree, what="qtree name")
    if "/" in qtree:
        raise HostilePath(f"qtree name {qtree!r} has a '/'", hint="a qtree is one top-level directory of the volume")
    return qtree


class MemVolume(VolumeHandle):
    """One in-memory volume (the backend's volume handle)."""

    #: the capability (VolumeHandle.max_pcpis), set per volume
    max_pcpis: int
    #: the capability (VolumeHandle.max_file_size): 2^63 - 1 (only data are kept, tree.Blocks),
    #: settable per volume like ``max_pcpis`` (a smaller destination in tests)
    max_file_size: int
    describes_ranges = True

    def __init__(self, scheme: str, location: str) -> None:
        self.scheme = scheme
        self.location = location
        self.path: str | None = location if location.startswith("/") else None
        self.lock = threading.RLock()
        self.active: dict[str, QtreeState] = {}
        self.snapshots: dict[str, dict[str, QtreeState]] = {}
        self.exports: dict[str, str | None] = {}
        self.max_pcpis = MAX_PCPIS
        self.max_file_size = R.MAX_FILE_SIZE
        self._stat: tuple[int, int, int] | None = None
        self.owner_records: dict[str, str] = {}  # mem://NAME only: mem:///PATH keeps them in PATH.coalesce/

    def __repr__(self) -> str:
        return f"MemVolume({self.url})"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.location}"

    # ------------------------------------------------------------------ files
    def _load(self) -> None:
        """(Re)read the file of a persisted volume into this object."""
        assert self.path is not None
        with open(self.path, "rb") as fh:
            data = fh.read()
            st = os.fstat(fh.fileno())
        obj = persist.decode_volume(self.path, data)
        if obj["scheme"] != self.scheme:
            raise BackendError(
                f"{self.path} is a {obj['scheme']!r} volume, not {self.scheme!r}",
                hint=f"open it as {obj['scheme']}://{self.path}",
            )
        self.active, self.snapshots, self.exports = obj["active"], obj["snapshots"], obj["exports"]
        self.max_pcpis = obj["max_pcpis"]
        self.max_file_size = obj["max_file_size"]
        self._stat = (st.st_ino, st.st_size, st.st_mtime_ns)

    def persist(self) -> None:
        """Write a persisted volume's file (no-op for ``mem://NAME``).  Under the lock."""
        if self.path is None:
            return
        with self.lock:
            st = persist.write_file(self.path, persist.encode_volume(self))
            self._stat = (st.st_ino, st.st_size, st.st_mtime_ns)

    def _changed_on_disk(self) -> bool:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_ino, st.st_size, st.st_mtime_ns) != self._stat

    def _sync(self) -> None:
        """Re-read the file if another process replaced it since we last read or
        wrote it, so a long-lived handle never works on (or writes back) a stale
        volume.  Called under the lock at the start of every primitive."""
        if self.path is not None and self._stat is not None and self._changed_on_disk() and os.path.exists(self.path):
            self._load()

    def metadata_dir(self) -> str | None:
        if self.path is None:
            return None
        d = self.path + ".coalesce"
        os.makedirs(d, exist_ok=True)
        return d

    def claim(self, key: str, value: str | None) -> str | None:
        """Owner records: in the registry for ``mem://NAME`` (as long as the process lives, like
        the volume), in ``PATH.coalesce/owners/`` for ``mem:///PATH``."""
        if self.path is not None:
            return super().claim(key, value)
        with self.lock:
            if value is not None:
                self.owner_records.setdefault(key, value)
            return self.owner_records.get(key, "")

    # ------------------------------------------------------------ qtree states
    def _writable(self, qtree: str) -> QtreeState:
        """The active state of ``qtree``, created if missing, thawed if frozen (COW)."""
        st = self.active.get(qtree)
        if st is None:
            st = self.active[qtree] = QtreeState()
        elif st.frozen:
            st = self.active[qtree] = st.thaw()
        return st

    def _snapshot(self, name: str) -> dict[str, QtreeState]:
        qs = self.snapshots.get(name)
        if qs is None:
            raise BackendError(
                f"{self.url} has no PCPI {name!r}", hint=f"PCPIs on this volume: {', '.join(self.snapshots) or 'none'}"
            )
        return qs

    def _state(self, qtree: str, snapshot: str | None) -> QtreeState | None:
        if snapshot is None:
            return self.active.get(qtree)
        return self._snapshot(snapshot).get(qtree)

    # ------------------------------------------------------------- primitives
    def snapshot_create(self, name: str) -> str:
        if not isinstance(name, str) or not name or "\x00" in name or "/" in name or name == ACTIVE:
            raise BackendError(
                f"{name!r} is not a valid PCPI name",
                hint="use a non-empty name without '/' or NUL, other than " + ACTIVE,
            )
        with self.lock:
            self._sync()
            if name in self.snapshots:
                return name
            if len(self.snapshots) >= self.max_pcpis:
                raise BackendError(
                    f"{self.url} already holds {len(self.snapshots)} PCPIs (the limit)",
                    hint="release PCPIs that nobody exports (`coalesce check` lists them)",
                )
            for st in self.active.values():
                st.frozen = True
            self.snapshots[name] = dict(self.active)
            self.persist()
            return name

    def snapshot_delete(self, name: str) -> bool:
        with self.lock:
            self._sync()
            if name not in self.snapshots:
                return False
            users = sorted(r for r, p in self.exports.items() if p == name)
            if users:
                raise BackendError(
                    f"PCPI {name!r} of {self.url} is exported by {', '.join(users)}",
                    hint="switch the export table away from it first (an exported image must "
                    "never disappear under its readers)",
                )
            del self.snapshots[name]
            self.persist()
            return True

    def snapshot_list(self) -> list[str]:
        with self.lock:
            self._sync()
            return list(self.snapshots)

    def qtree_list(self, snapshot: str | None) -> list[str]:
        with self.lock:
            self._sync()
            qs = self.active if snapshot is None else self._snapshot(snapshot)
            return sorted(qs)

    def diff(self, qtree: str, base: str | None, target: str) -> Iterator[object]:
        """Validate now, then return the lazy record generator (PCPIs are immutable)."""
        _check_qtree(qtree)
        with self.lock:
            self._sync()
            t = self._snapshot(target).get(qtree)
            if t is None:
                raise BackendError(f"qtree {qtree!r} does not exist in PCPI {target!r} of {self.url}")
            b = None
            if base is not None:
                b = self._snapshot(base).get(qtree)
                if b is None:
                    raise BackendError(
                        f"qtree {qtree!r} does not exist in PCPI {base!r} of {self.url}",
                        hint="use base=None (a baseline) for a qtree that is new since the base",
                    )
        return diff_stream(qtree, base, target, b, t)

    def apply(self, qtree: str, records: Iterable[Any], use_purgatory: bool) -> dict[str, int]:
        _check_qtree(qtree)
        n = nbytes = 0
        began = ended = dirty = False
        with self.lock:
            self._sync()  # a damaged file raises here, before anything could overwrite it
            if qtree not in self.active:
                self._writable(qtree)
                self.persist()
        try:
            for rec in records:  # pulled without the lock: it may be a slow transfer
                if isinstance(rec, R.Begin):
                    if began or n:
                        raise CorruptStream("a Begin record in the middle of the stream")
                    began = True
                    continue
                if isinstance(rec, R.End):
                    if began and rec.records != n:
                        raise CorruptStream(f"End says {rec.records} records, the stream carried {n}")
                    ended = True
                    continue
                if ended:
                    raise CorruptStream("a record after End")
                check_record(rec, self.max_file_size, f"mem volume {self.url}")
                with self.lock:
                    dirty = True
                    apply_record(self._writable(qtree), rec, use_purgatory)
                n += 1
                if isinstance(rec, R.Write):
                    nbytes += len(rec.data)
            if began and not ended:
                raise TruncatedStream(
                    f"the change stream ended after {n} records without its End record",
                    hint="the source or the link failed mid-transfer; the update is rolled back",
                )
        finally:
            if dirty:
                self.persist()  # also after a failure: the partial state is real, as on a disk
        return {"records": n, "bytes": nbytes}

    def purge_purgatory(self, qtrees: list[str]) -> bool:
        with self.lock:
            self._sync()
            changed = False
            for q in qtrees:
                _check_qtree(q)
                st = self.active.get(q)
                if st is None or not st.purgatory.children:
                    continue
                if st.frozen:  # share the frozen root, drop only the purgatory
                    new = QtreeState(st.root, None, st.purgatory_seq)
                    new.frozen = True
                    self.active[q] = new
                else:
                    st.purgatory.children.clear()
                changed = True
            if changed:
                self.persist()
            return True

    def purgatory_size(self, qtree: str) -> int:
        """How many entries the purgatory of ``qtree`` holds (tests, demo)."""
        with self.lock:
            self._sync()
            st = self.active.get(qtree)
            return 0 if st is None else len(st.purgatory.children)

    def remove_qtree(self, qtree: str) -> bool:
        _check_qtree(qtree)
        with self.lock:
            self._sync()
            if self.active.pop(qtree, None) is None:
                return False
            self.persist()
            return True

    def export(self, mapping: dict[str, str | None]) -> bool:
        with self.lock:
            self._sync()
            new = {}
            for replica, value in mapping.items():
                if value is not None and value != ACTIVE and value not in self.snapshots:
                    raise BackendError(
                        f"cannot export PCPI {value!r} for {replica!r}: {self.url} has no such PCPI",
                        hint="the export table was left unchanged",
                    )
                new[str(replica)] = value
            if new != self.exports:
                self.exports = new  # one reference swap: readers see the old or the new table
                self.persist()
            return True

    def exported(self) -> dict[str, str | None]:
        return dict(self.exports)

    def fingerprint(self, qtree: str, snapshot: str | None) -> str:
        _check_qtree(qtree)
        with self.lock:
            self._sync()
            st = self._state(qtree, snapshot)
            root = st.root if st is not None else Dir()
            entries = entries_of(root)
        from coalesce_core.stream.fingerprint import digest

        return digest(entries)

    def describe(
        self,
        qtree: str,
        snapshot: str | None,
        paths: Sequence[tuple[str, bool]],
        ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    ) -> list:
        _check_qtree(qtree)
        with self.lock:
            self._sync()
            return describing.describe(self._state(qtree, snapshot), paths, ranges)

    def describe_tree(self, qtree: str, snapshot: str | None, content: bool) -> Iterator[Any]:
        from coalesce_core.verify import generic_tree

        return generic_tree(lambda batch: self.describe(qtree, snapshot, batch), content)

    def describe_holds(self) -> Any:
        return describing.HOLDS

    def export_path(self, replica: str) -> None:
        """mem images have no file-system path."""
        return None

    # ------------------------------------------------- source-writing API
    # Paths are "QTREE/rel/path"; every call is one apply() of generated
    # records (use_purgatory=False), so it is checked exactly like a stream.
    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        R.check_path(path)
        qtree, _, rel = path.partition("/")
        if not rel:
            raise ValueError(f"{path!r} names a qtree, not an entry inside one (write 'QTREE/name')")
        return qtree, rel

    @classmethod
    def _split_pair(cls, a: str, b: str, what: str) -> tuple[str, str, str]:
        """The qtree and the two relative paths of ``a`` and ``b``, which must be in one qtree (``what``
        cannot cross qtrees)."""
        q1, rel_a = cls._split(a)
        q2, rel_b = cls._split(b)
        if q1 != q2:
            raise ValueError(f"{what} cannot cross qtrees")
        return q1, rel_a, rel_b

    def _parents(self, qtree: str, rel: str) -> list[object]:
        recs: list[object] = []
        parts = rel.split("/")[:-1]
        with self.lock:
            self._sync()
            st = self.active.get(qtree)
            node: Node | None = st.root if st else None
            for i in range(len(parts)):
                nxt = node.children.get(parts[i]) if isinstance(node, Dir) else None
                if nxt is None:
                    recs.append(R.MkDir(path="/".join(parts[: i + 1])))
                node = nxt
        return recs

    def _run(self, qtree: str, recs: list[object]) -> None:
        self.apply(qtree, recs, use_purgatory=False)

    def write_file(self, path: str, data: bytes = b"", mode: int = 0o644, *, mtime_ns: int | None = None) -> None:
        """Create or overwrite the regular file ``QTREE/rel`` with ``data`` (missing
        parent directories are created).  An existing hard-linked file is
        rewritten in place, so all its names see the new bytes."""
        qtree, rel = self._split(path)
        recs = self._parents(qtree, rel)
        with self.lock:
            self._sync()
            exists = isinstance(self._lookup(path), File)
        recs += [R.Truncate(path=rel, size=0)] if exists else [R.MkFile(path=rel, mode=mode)]
        recs += [
            R.Write(path=rel, offset=o, data=bytes(data[o : o + R.MAX_DATA])) for o in range(0, len(data), R.MAX_DATA)
        ]
        recs.append(R.SetAttr(path=rel, mode=mode, mtime_ns=mtime_ns))
        self._run(qtree, recs)

    def mkdir(self, path: str, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False) -> None:
        """Create directory ``QTREE/rel`` (``path`` may also be just ``QTREE``)."""
        qtree, _, rel = path.partition("/")
        _check_qtree(qtree)
        if not rel:
            with self.lock:
                self._sync()
                if qtree in self.active and not exist_ok:
                    raise FileExistsError(path)
            self._run(qtree, [])
            return
        R.check_path(rel)
        with self.lock:
            self._sync()
            node = self._lookup(path)
        if node is not None:
            if exist_ok and isinstance(node, Dir):
                return
            raise FileExistsError(path)
        recs = self._parents(qtree, rel)
        if recs and not parents:
            raise FileNotFoundError(f"parent of {path!r} does not exist (use parents=True)")
        self._run(qtree, recs + [R.MkDir(path=rel, mode=mode), R.SetAttr(path=rel, mode=mode)])

    def symlink(self, path: str, target: str) -> None:
        """Create symlink ``QTREE/rel`` -> ``target`` (stored, never followed)."""
        qtree, rel = self._split(path)
        self._run(qtree, self._parents(qtree, rel) + [R.Symlink(path=rel, target=target)])

    def link(self, existing: str, path: str) -> None:
        """Make ``path`` another name (hard link) of the regular file ``existing``, same qtree."""
        qtree, rel_old, rel_new = self._split_pair(existing, path, "a hard link")
        self._run(qtree, self._parents(qtree, rel_new) + [R.HardLink(path=rel_new, existing=rel_old)])

    def rename(self, old: str, new: str) -> None:
        """Move ``old`` to ``new`` inside one qtree (replaces a non-directory at ``new``)."""
        qtree, rel_old, rel_new = self._split_pair(old, new, "rename")
        self._run(qtree, [R.Rename(old=rel_old, new=rel_new)])

    def unlink(self, path: str) -> None:
        """Remove a non-directory."""
        self._remove(path, R.Unlink)

    def rmdir(self, path: str) -> None:
        """Remove an empty directory."""
        self._remove(path, R.RmDir)

    def _remove(self, path: str, record: type[R.Unlink] | type[R.RmDir]) -> None:
        """Apply ``record`` for ``path``, which must exist (else FileNotFoundError)."""
        qtree, rel = self._split(path)
        with self.lock:
            self._sync()
            if self._lookup(path) is None:
                raise FileNotFoundError(path)
        self._run(qtree, [record(path=rel)])

    def set_attr(
        self,
        path: str,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        qtree, rel = self._split(path)
        self._run(qtree, [R.SetAttr(path=rel, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns)])

    def set_xattr(self, path: str, name: str, value: bytes | None) -> None:
        qtree, rel = self._split(path)
        self._run(qtree, [R.SetXattr(path=rel, name=name, value=value)])

    def _lookup(self, path: str, snapshot: str | None = None) -> Any:
        qtree, _, rel = path.partition("/")
        st = self._state(qtree, snapshot)
        node: Any = st.root if st is not None else None
        for part in rel.split("/") if rel else []:
            node = node.children.get(part) if isinstance(node, Dir) else None
        return node

    def read_file(self, path: str, snapshot: str | None = None) -> bytes:
        """The bytes of ``QTREE/rel`` in the active FS or in a PCPI (no symlink is followed)."""
        with self.lock:
            self._sync()
            node = self._lookup(path, snapshot)
            if not isinstance(node, File):
                raise FileNotFoundError(f"{path!r} is not a regular file" + (f" in {snapshot}" if snapshot else ""))
            return bytes(node.data)

    def readlink(self, path: str, snapshot: str | None = None) -> str:
        with self.lock:
            self._sync()
            node = self._lookup(path, snapshot)
            if not isinstance(node, SymNode):
                raise FileNotFoundError(f"{path!r} is not a symlink")
            return node.target

    def exists(self, path: str, snapshot: str | None = None) -> bool:
        with self.lock:
            self._sync()
            return self._lookup(path, snapshot) is not None

    def stat(self, path: str, snapshot: str | None = None) -> dict[str, Any]:
        """kind ("d"/"f"/"l"), mode, uid, gid, mtime_ns, size, nlink-ish ``inode`` id, xattrs."""
        with self.lock:
            self._sync()
            node = self._lookup(path, snapshot)
            if node is None:
                raise FileNotFoundError(path)
            return {
                "kind": node.kind,
                "mode": node.mode,
                "uid": node.uid,
                "gid": node.gid,
                "mtime_ns": node.mtime_ns,
                "size": len(node.data) if isinstance(node, File) else 0,
                "inode": id(node),
                "xattrs": dict(node.xattrs),
            }

    def listing(self, qtree: str, snapshot: str | None = None) -> dict[str, tuple]:
        """{path: ("d", mode) | ("f", mode, bytes) | ("l", target)} of a qtree (active FS or PCPI)."""
        with self.lock:
            self._sync()
            st = self._state(qtree, snapshot)
            if st is None:
                return {}
            out: dict[str, tuple] = {}
            for p, node in walk(st.root):
                if isinstance(node, Dir):
                    out[p] = ("d", node.mode)
                elif isinstance(node, File):
                    out[p] = ("f", node.mode, bytes(node.data))
                else:
                    assert isinstance(node, SymNode)  # a Node is a Dir, a File or a Symlink
                    out[p] = ("l", node.target)
            return out


# ---------------------------------------------------------------- registry
def _key(scheme: str, location: str) -> tuple[str, str]:
    if location.startswith("/"):
        return (scheme, os.path.abspath(location))
    return (scheme, location)


def open_volume(scheme: str, location: str, create: bool) -> MemVolume:
    """Open (or create) the volume of ``scheme://location`` from the registry / its file."""
    key = _key(scheme, location)
    with _REGISTRY_LOCK:
        vol = _REGISTRY.get(key)
        if vol is None:
            vol = MemVolume(scheme, key[1])
        with vol.lock:
            if vol.path is not None:
                if os.path.exists(vol.path):
                    if vol._changed_on_disk():
                        vol._load()
                elif create:
                    if not os.path.isdir(os.path.dirname(vol.path)):
                        raise BackendError(
                            f"cannot create {vol.url}: directory {os.path.dirname(vol.path)} is missing",
                            hint="create the directory first",
                        )
                    vol.active, vol.snapshots, vol.exports = {}, {}, {}
                    vol.persist()
                else:
                    raise BackendError(
                        f"the volume {vol.url} does not exist (no file {vol.path})",
                        hint="create it (open with create=True, e.g. `coalesce init`) or fix the URL",
                    )
            elif key not in _REGISTRY and not create:
                raise BackendError(
                    f"the volume {vol.url} does not exist in this process",
                    hint=f"{scheme}://NAME volumes live in memory only; create it first, or use "
                    f"{scheme}:///ABS/PATH for a volume kept in a file",
                )
        _REGISTRY[key] = vol
        return vol


def forget(scheme: str, location: str | None = None) -> None:
    """Drop volumes from the registry (tests): one, or every volume of ``scheme``.
    A persisted volume's file is kept; the next open reads it again."""
    with _REGISTRY_LOCK:
        for key in list(_REGISTRY):
            if key[0] == scheme and (location is None or key == _key(scheme, location)):
                del _REGISTRY[key]
