"""Rows a sim diff keeps until it ends, in key order: in memory up to a bound, then on disk.

An incremental diff (:mod:`.diff`) collects the names added to and removed from kept
directories and the kept directories whose attributes changed, and sends them in an order
(path order, deepest first) that is known only once all are seen.  A :class:`SortedRows` holds
its rows in Python up to :data:`SPILL_ROWS`, then moves them to a private temporary SQLite
database (``sqlite3.connect("")``: SQLite creates it in ``SQLITE_TMPDIR``, ``TMPDIR`` or
``/var/tmp`` and unlinks it as it opens it, so no exit path leaves it behind; as
coalesce_core/touched_store.py does) with a page cache of :data:`CACHE_KIB`; it is read back
:data:`PAGE` rows at a time.  Both give the same rows in the same order: keys are bytes, and
Python's order of bytes is SQLite's order of BLOBs (memcmp).
"""

from __future__ import annotations

import sqlite3
from typing import Iterator

from coalesce_core.errors import BackendError

#: rows held in Python before they move to the database
SPILL_ROWS = 65536
#: rows read back from the database at a time (and inserted at a time)
PAGE = 4096
#: SQLite's page cache of the database, in KiB
CACHE_KIB = 4096


def path_key(path: str) -> bytes:
    """Bytes whose order is Python's order of ``path.replace("/", "\\x00")``: components by code
    point, a directory's path before everything below it (UTF-32-BE keeps code-point order,
    surrogate-escaped bytes included)."""
    return path.replace("/", "\x00").encode("utf-32-be", "surrogatepass")


def _blob(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _str(blob: bytes) -> str:
    return blob.decode("utf-8", "surrogateescape")


def _failed(exc: sqlite3.Error) -> BackendError:
    return BackendError(
        f"sim's diff could not keep the changed entries of a large update on disk: {exc}",
        hint="SQLite keeps them in SQLITE_TMPDIR, TMPDIR or /var/tmp: free space there or point "
        "SQLITE_TMPDIR at a file system with room (docs/sim.md)",
    )


class SortedRows:
    """Rows ``(key, path, ino, dino)``: :meth:`add`, :meth:`ino_at` (the ``ino`` of a row whose
    path is ``path``, when the rows are keyed by :func:`path_key`), and iteration in key order
    (rows of equal keys in the order they came).  One thread; :meth:`close` ends it."""

    def __init__(self) -> None:
        self.rows: list[tuple[bytes, str, int, int]] = []
        self.by_path: dict[str, int] = {}
        self.db: sqlite3.Connection | None = None
        self.pending: list[tuple[bytes, int, bytes, int, int]] = []
        self.seq = 0

    def __len__(self) -> int:
        if self.db is None:
            return len(self.rows)
        self._flush()
        return int(self.db.execute("SELECT count(*) FROM t").fetchone()[0])

    def add(self, key: bytes, path: str, ino: int, dino: int = 0) -> None:
        if self.db is None:
            self.rows.append((key, path, ino, dino))
            self.by_path[path] = ino
            if len(self.rows) > SPILL_ROWS:
                self._spill()
            return
        self.seq += 1
        self.pending.append((key, self.seq, _blob(path), ino, dino))
        if len(self.pending) >= PAGE:
            self._flush()

    def ino_at(self, path: str) -> int | None:
        if self.db is None:
            return self.by_path.get(path)
        self._flush()
        try:
            r = self.db.execute("SELECT ino FROM t WHERE key = ? ORDER BY seq DESC", (path_key(path),)).fetchone()
        except sqlite3.Error as exc:
            raise _failed(exc) from exc
        return None if r is None else int(r[0])

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        """``(path, ino, dino)`` in key order."""
        if self.db is None:
            self.rows.sort(key=lambda r: r[0])
            for _k, path, ino, dino in self.rows:
                yield path, ino, dino
            return
        self._flush()
        after: tuple[bytes, int] = (b"", -1)
        while True:
            try:
                page = self.db.execute(
                    "SELECT key, seq, path, ino, dino FROM t WHERE (key, seq) > (?, ?) ORDER BY key, seq LIMIT ?",
                    (*after, PAGE),
                ).fetchall()
            except sqlite3.Error as exc:
                raise _failed(exc) from exc
            for _key, _seq, path, ino, dino in page:
                yield _str(path), ino, dino
            if len(page) < PAGE:
                return
            after = (page[-1][0], page[-1][1])

    def _spill(self) -> None:
        try:
            db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
            for pragma in (f"cache_size = -{CACHE_KIB}", "journal_mode = OFF", "synchronous = OFF"):
                db.execute(f"PRAGMA {pragma}")
            db.execute(
                "CREATE TABLE t (key BLOB, seq INTEGER, path BLOB, ino INTEGER, dino INTEGER, PRIMARY KEY (key, seq))"
                " WITHOUT ROWID"
            )
        except sqlite3.Error as exc:
            raise _failed(exc) from exc
        self.db = db
        self.pending = [(k, s, _blob(p), i, d) for s, (k, p, i, d) in enumerate(self.rows)]
        self.seq = len(self.rows)
        self.rows, self.by_path = [], {}
        self._flush()

    def _flush(self) -> None:
        if not self.pending or self.db is None:
            return
        rows, self.pending = self.pending, []
        try:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _failed(exc) from exc

    def close(self) -> None:
        self.rows, self.by_path, self.pending = [], {}, []
        if self.db is not None:
            self.db.close()
            self.db = None
