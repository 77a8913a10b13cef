"""The touched paths of a large update, on disk (coalesce_core.verify.Touched past SPILL_PATHS).

Past a threshold, :class:`~coalesce_core.verify.Touched` moves its nodes here: one row per
path it keeps something about (want, moved, the written ranges, wrote), in a private temporary
SQLite database (``sqlite3.connect("")``: SQLite creates it in ``SQLITE_TMPDIR``, ``TMPDIR`` or
``/var/tmp`` and unlinks it as it opens it, so no exit path, a crash included, leaves it
behind), with a page cache of :data:`CACHE_KIB` and at most :data:`CACHE_NODES` nodes held in
Python.  The rows are keyed by the path with its separators as NUL bytes, so the key order is
the path order of coalesce_core.verify.path_key (a directory before everything below it, names
by their bytes), and a subtree is one key range.

Every answer has the same meaning as the in-memory tree's (tests/core/test_touched_store.py
feeds both the same records); the queries come in pages of a given size, so the memory of the
check that reads them is one page, whatever the number of paths.
"""

from __future__ import annotations

import sqlite3
from array import array
from typing import Iterator, Mapping

from coalesce_core import verify as V

#: nodes held in Python before they are written to the database
CACHE_NODES = 4096
#: SQLite's page cache of the database, in KiB
CACHE_KIB = 4096

_SCHEMA = """
CREATE TABLE t (key BLOB PRIMARY KEY, parent BLOB, want INTEGER, moved INTEGER, part BLOB, wrote INTEGER)
    WITHOUT ROWID;
CREATE INDEX t_parent ON t (parent, want);
CREATE INDEX t_moved ON t (moved, key);
CREATE TABLE mv (key BLOB PRIMARY KEY, want INTEGER, moved INTEGER, part BLOB, wrote INTEGER) WITHOUT ROWID;
CREATE TABLE skipped (key BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE tops (key BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE topdirs (key BLOB PRIMARY KEY) WITHOUT ROWID;
"""

_INNER = "EXISTS (SELECT 1 FROM t c WHERE c.parent = t.key AND c.want >= 0)"


def key_of(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape").replace(b"/", b"\x00")


def path_of(key: bytes) -> str:
    return key.replace(b"\x00", b"/").decode("utf-8", "surrogateescape")


def _parent(key: bytes) -> bytes | None:
    return key.rpartition(b"\x00")[0] if key else None


def _under(key: bytes) -> tuple[bytes, bytes]:
    """The key range (exclusive) of the paths strictly below ``key``."""
    return key + b"\x00", key + b"\x01"


def _after(key: bytes | None) -> str:
    """The condition of a page after ``key`` (None: the first page, from the root's key)."""
    return ">= ?" if key is None else "> ?"


def _pack(part: list[int] | None) -> bytes | None:
    return None if part is None else array("q", part).tobytes()


def _unpack(blob: bytes | None) -> list[int] | None:
    if blob is None:
        return None
    a = array("q")
    a.frombytes(blob)
    return a.tolist()


class TouchedStore:
    """The nodes of a Touched set, on disk.  Used by one thread at a time; :meth:`close` ends it."""

    def __init__(self) -> None:
        self.db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
        for pragma in (f"cache_size = -{CACHE_KIB}", "journal_mode = OFF", "synchronous = OFF"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(_SCHEMA)
        self.cache: dict[bytes, V._Node] = {}

    def close(self) -> None:
        self.cache.clear()
        self.db.close()

    # -- nodes
    def _row(self, key: bytes) -> V._Node | None:
        r = self.db.execute("SELECT want, moved, part, wrote FROM t WHERE key = ?", (key,)).fetchone()
        if r is None:
            return None
        n = V._Node()
        n.want, n.moved, n.part, n.wrote = r[0], bool(r[1]), _unpack(r[2]), bool(r[3])
        return n

    def node(self, path: str) -> V._Node:
        """The node of ``path`` (a new one if it has none), to be changed in place by the caller
        before its next call."""
        key = key_of(path)
        n = self.cache.get(key)
        if n is None:
            if len(self.cache) >= CACHE_NODES:
                self.flush()
            n = self._row(key) or V._Node()
            self.cache[key] = n
        return n

    def put(self, items: Iterator[tuple[str, V._Node]]) -> None:
        """Add nodes (the spill of the in-memory tree)."""
        for path, n in items:
            self.cache[key_of(path)] = n
            if len(self.cache) >= CACHE_NODES:
                self.flush()
        self.flush()

    def flush(self) -> None:
        if not self.cache:
            return
        rows = [(k, _parent(k), n.want, int(n.moved), _pack(n.part), int(n.wrote)) for k, n in self.cache.items()]
        self.cache.clear()
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO t VALUES (?, ?, ?, ?, ?, ?)", rows)
        self.db.execute("COMMIT")

    def rename(self, old: str, new: str) -> None:
        """Carry the nodes at and below ``old`` to ``new`` (merged into those already there as
        coalesce_core.verify's ``_merge`` does)."""
        self.flush()
        ko, kn = key_of(old), key_of(new)
        if not old or ko == kn:
            return
        lo, hi = _under(ko)
        db = self.db
        db.execute("BEGIN")
        db.execute("DELETE FROM mv")
        where = "key = ? OR (key > ? AND key < ?)"
        db.execute(f"INSERT INTO mv SELECT key, want, moved, part, wrote FROM t WHERE {where}", (ko, lo, hi))
        db.execute(f"DELETE FROM t WHERE {where}", (ko, lo, hi))
        db.execute("COMMIT")
        after = None
        while True:
            page = db.execute(
                f"SELECT key, want, moved, part, wrote FROM mv WHERE key {_after(after)} ORDER BY key LIMIT 1024",
                (after or b"",),
            ).fetchall()
            if not page:
                break
            after = page[-1][0]
            out = []
            for k, want, moved, part, wrote in page:
                nk = kn + k[len(ko) :]
                there = self._row(nk)
                if there is None:
                    out.append((nk, _parent(nk), want, moved, part, wrote))
                else:  # merged: below a renamed entry, compared whole
                    merged_moved = int(there.moved or bool(moved))
                    out.append((nk, _parent(nk), max(there.want, want), merged_moved, None, int(there.wrote)))
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO t VALUES (?, ?, ?, ?, ?, ?)", out)
            db.execute("COMMIT")
        db.execute("DELETE FROM mv")

    # -- answers
    def part_of(self, path: str) -> tuple[tuple[int, int], ...] | None:
        """As coalesce_core.verify.Touched.part_of."""
        self.flush()
        key = key_of(path)
        chain = [b""] + [key[:i] for i, c in enumerate(key) if c == 0] + ([key] if key else [])
        marks = ",".join("?" * len(chain))
        if self.db.execute(f"SELECT 1 FROM t WHERE moved = 1 AND key IN ({marks}) LIMIT 1", chain).fetchone():
            return None
        n = self._row(key)
        if n is None or n.part is None or not n.wrote or n.want != V._CONTENT:
            return None
        return V._merged(n.part)

    def _pages(self, where: str, size: int, args: tuple = ()) -> Iterator[list[tuple[bytes, int, int]]]:
        """(key, want, is a moved top) of the rows with a want matching ``where``, in key order, ``size`` a page."""
        self.flush()
        after: bytes | None = None
        while True:
            page = self.db.execute(
                "SELECT t.key, t.want, EXISTS (SELECT 1 FROM tops WHERE tops.key = t.key) FROM t "
                f"WHERE t.key {_after(after)} AND t.want >= 0 AND {where} ORDER BY t.key LIMIT ?",
                (after or b"", *args, size),
            ).fetchall()
            if not page:
                return
            after = page[-1][0]
            yield page

    def paths(self, size: int) -> Iterator[list[tuple[str, bool]]]:
        """Touched.paths, a page at a time."""
        for page in self._pages("1", size):
            yield [(path_of(k), w == V._CONTENT) for k, w, _t in page]

    def parents(self, size: int) -> Iterator[list[tuple[str, bool, bool]]]:
        """The parents of Touched.split (path, content, is a moved top), a page at a time."""
        for page in self._pages(_INNER, size):
            yield [(path_of(k), w == V._CONTENT, bool(t)) for k, w, t in page]

    def leaves(self, size: int) -> Iterator[list[tuple[str, bool, bool]]]:
        """The other paths of Touched.split, less those :meth:`skip_absent` left out."""
        where = f"NOT {_INNER} AND NOT EXISTS (SELECT 1 FROM skipped s WHERE s.key = t.key)"
        for page in self._pages(where, size):
            yield [(path_of(k), w == V._CONTENT, bool(t)) for k, w, t in page]

    def skip_absent(self, parent: str, names: frozenset[str] | None) -> None:
        """Leave out of :meth:`leaves` the touched children of ``parent`` whose name is not in
        ``names`` (its entries on the source side; None: it is not a directory there)."""
        pk = key_of(parent)
        after: bytes | None = None
        while True:
            page = [
                k
                for (k,) in self.db.execute(
                    f"SELECT key FROM t WHERE parent = ? AND want >= 0 AND key {_after(after)} ORDER BY key LIMIT 1024",
                    (pk, after or b""),
                )
            ]
            if not page:
                return
            after = page[-1]
            gone = [(k,) for k in page if names is None or path_of(k.rpartition(b"\x00")[2]) not in names]
            self.db.executemany("INSERT OR IGNORE INTO skipped VALUES (?)", gone)

    def find_tops(self) -> int:
        """Note the moved tops (Touched.moved: moved nodes not below another); their number."""
        self.flush()
        self.db.execute("DELETE FROM tops")
        last: bytes | None = None
        after: bytes | None = None
        count = 0
        while True:
            page = [
                k
                for (k,) in self.db.execute(
                    f"SELECT key FROM t WHERE moved = 1 AND key {_after(after)} ORDER BY key LIMIT 1024",
                    (after or b"",),
                )
            ]
            if not page:
                return count
            after = page[-1]
            tops = []
            for k in page:
                if last is not None and (k == last or k.startswith(last + b"\x00")):
                    continue
                last = k
                tops.append((k,))
            count += len(tops)
            self.db.executemany("INSERT OR IGNORE INTO tops VALUES (?)", tops)

    def moved(self, size: int) -> Iterator[list[str]]:
        """Touched.moved, a page at a time (after :meth:`find_tops`)."""
        yield from self._keys("tops", size)

    def note_top_dirs(self, paths: list[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO topdirs VALUES (?)", [(key_of(p),) for p in paths])

    def top_dirs(self, size: int) -> Iterator[list[str]]:
        """The paths :meth:`note_top_dirs` noted, in path order, a page at a time."""
        yield from self._keys("topdirs", size)

    def _keys(self, table: str, size: int) -> Iterator[list[str]]:
        after: bytes | None = None
        while True:
            page = [
                k
                for (k,) in self.db.execute(
                    f"SELECT key FROM {table} WHERE key {_after(after)} ORDER BY key LIMIT ?", (after or b"", size)
                )
            ]
            if not page:
                return
            after = page[-1]
            yield [path_of(k) for k in page]

    def count(self) -> int:
        self.flush()
        return int(self.db.execute("SELECT count(*) FROM t WHERE want >= 0").fetchone()[0])

    def parts(self) -> "Parts":
        return Parts(self)


class Parts(Mapping[str, tuple[tuple[int, int], ...]]):
    """Touched.parts of a spilled set: looked up path by path (TouchedStore.part_of)."""

    def __init__(self, store: TouchedStore) -> None:
        self.store = store

    def __getitem__(self, path: str) -> tuple[tuple[int, int], ...]:
        got = self.store.part_of(path)
        if got is None:
            raise KeyError(path)
        return got

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self.store.part_of(path) is not None

    def __iter__(self) -> Iterator[str]:
        for page in self.store._pages("part IS NOT NULL AND wrote = 1", 1024):
            for k, _w, _t in page:
                p = path_of(k)
                if self.store.part_of(p) is not None:
                    yield p

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        """Whether any file may be patched in place (cheap: a file below a moved entry counts)."""
        row = self.store.db.execute("SELECT 1 FROM t WHERE part IS NOT NULL AND wrote = 1 AND want = 1 LIMIT 1")
        return row.fetchone() is not None
