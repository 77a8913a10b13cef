"""The ledger: the group's persisted state in SQLite (the patent's metadata file).

WAL journal, ``synchronous=FULL``: a commit is durable when ``commit``
returns.  One transaction per batch of decisions (group commit), written
BEFORE the decisions' effects run (write-ahead).  Only what changed is
written: replicas and PCPIs by identity against the previous state.

A damaged or foreign file is a MetadataError that says what to do; the
ledger never deletes or rewrites a file it cannot read.  A ledger an earlier
version wrote loads as it is: a field its rows or its meta table lack takes
its default (a replica's, a source PCPI's and a manifest entry's source: DEFAULT_SOURCE), and a
renamed one is read under its old name (see ``_replica``, ``load``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import attrs

from coalesce_core.cycle.generations import Manifest
from coalesce_core.cycle.state import DEFAULT_SOURCE, GroupState, Pcpi, Replica, RetryPolicy, SourcePcpi
from coalesce_core.errors import MetadataError
from coalesce_core.requests import PENDING, WITHDRAWN, Request
from coalesce_core.retention import Policy

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS replicas (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pcpis (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS source_pcpis (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, cycle INTEGER NOT NULL,
    replica TEXT, trigger TEXT NOT NULL, source TEXT NOT NULL, dest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cycles (
    cycle INTEGER PRIMARY KEY, started REAL, ended REAL, report TEXT NOT NULL);
"""

# The queue of requests handed to a running agent (coalesce_core.requests).  Ledgers written before it
# existed lack the table: a writer creates it, a reader sees an empty queue.
_REQUESTS = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, verb TEXT NOT NULL, args TEXT NOT NULL, status TEXT NOT NULL,
    asked REAL NOT NULL, pid INTEGER NOT NULL, answered REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '', hint TEXT NOT NULL DEFAULT '', exit_code INTEGER NOT NULL DEFAULT 0);
"""
# The manifests of the coalesced base and the retained generations (coalesce_core/cycle/generations.py),
# one row per destination PCPI, written in the transaction that records the jump-ahead making the image.
# Ledgers written before generations existed lack the table: a writer creates it, a reader sees none.
_MANIFESTS = "CREATE TABLE IF NOT EXISTS manifests (name TEXT PRIMARY KEY, data TEXT NOT NULL);"

_REQUEST_COLUMNS = "id, verb, args, status, asked, pid, answered, message, hint, exit_code"

_GROUP_FIELDS = (
    "phase",
    "cycle",
    "seq",
    "cycle_targets",
    "source_taken",
    "transfers_started",
    "purged",
    "cycle_started",
    "cycle_failures",
    "reseed_after",
    "straggler_after",
)

#: the meta key of a ledger written before sources had names: the cycle's one source PCPI, which
#: :meth:`Ledger.load` reads as that of the source DEFAULT_SOURCE, and the first write of
#: ``cycle_targets`` deletes
_LEGACY_CYCLE_TARGET = "cycle_target"

#: the meta key of the group's identity (coalesce_core/ownership.py)
_IDENTITY = "group_id"

# Advisory records kept in the meta table beside the state: each replica's newest exported source
# point at the end of any cycle (I5's high-water marks, which `coalesce check` reads), the time
# of each replica's last full verification, and the last cycle's record of each source (whether its
# PCPI was taken, the error that stopped it: coalesce_core/sources.py).
NOTES = frozenset({"i5_marks", "verified", "sources"})


def _replica(raw: dict[str, Any]) -> Replica:
    """A replica row; rows written before ``last_error`` existed name it ``error``, rows written
    before sources had names have no ``origin`` (their source is DEFAULT_SOURCE, Replica's default)."""
    if "error" in raw:
        raw.setdefault("last_error", raw.pop("error"))
    return Replica(**raw)


def _dump(obj: Any) -> str:
    def conv(o: Any) -> Any:
        if isinstance(o, frozenset):
            return sorted(o)
        raise TypeError(o)

    return json.dumps(attrs.asdict(obj, recurse=False), default=conv, sort_keys=True)


#: SQLite's primary result codes that come from the file's surroundings, not from its content:
#: PERM, BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN
_ENVIRONMENTAL = frozenset({3, 5, 6, 7, 8, 10, 13, 14})


def _environmental(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _ENVIRONMENTAL


def _unreadable(path: Path, exc: sqlite3.Error) -> MetadataError:
    """The file could not be read (I/O, permissions, a lock): that is not damage, and no backup helps."""
    return MetadataError(
        f"metadata file {path} cannot be read: {exc}",
        hint="the file system or its permissions refused the read (see dmesg, df, ls -l): fix that and run "
        "again; the file was not changed and is not known to be damaged, so do not restore it from a backup",
    )


def _unwritable(path: Path, exc: sqlite3.Error) -> MetadataError:
    """A change could not be committed (read-only, full, I/O error): the last committed state stands."""
    return MetadataError(
        f"metadata file {path} could not be written: {exc}",
        hint="the file system refused the write (read-only, out of space, or an I/O error: see dmesg, df): "
        "fix that and run again; the last committed state is intact and the next run recovers from it",
    )


class Ledger:
    """Owner of one group's SQLite file."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self.commits = 0

    # -- opening --------------------------------------------------------------
    @classmethod
    def _connect(cls, path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @classmethod
    def create(cls, path: str | os.PathLike[str], state: GroupState, identity: str | None = None) -> "Ledger":
        """Create a new ledger holding ``state`` (and the group's ``identity``, see :meth:`identity`);
        refuses to overwrite an existing one."""
        path = Path(path)
        if path.exists():
            raise MetadataError(
                f"metadata file {path} already exists", hint="the group is already initialised; use `coalesce status`"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = cls._connect(path)
        conn.executescript(_SCHEMA + _REQUESTS + _MANIFESTS)
        led = cls(path, conn)
        with led._tx():
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("group", state.name),
                    *([(_IDENTITY, identity)] if identity else []),
                ],
            )
            led._write(None, state)
        return led

    @classmethod
    def open(cls, path: str | os.PathLike[str], group: str | None = None) -> "Ledger":
        path = Path(path)
        if not path.exists():
            raise MetadataError(
                f"no metadata file at {path}",
                hint="run `coalesce init` for a new group, or restore the .coalesce/ directory from a backup",
            )
        cls._validate(path, group)  # read-only: a file we cannot use is never written to
        return cls(path, cls._connect(path))

    @staticmethod
    def _validate(path: Path, group: str | None) -> None:
        damaged = (
            "nothing was changed; restore it from a backup (the volumes and their PCPIs are intact), "
            "or move it aside and contact support before re-initialising"
        )
        if path.stat().st_size == 0:
            raise MetadataError(f"metadata file {path} is empty", hint=damaged)
        try:
            ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise _unreadable(path, exc) from None
        try:
            ok = ro.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            meta = dict(ro.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            if _environmental(exc):  # I/O, permissions, locks: the file is not at fault
                raise _unreadable(path, exc) from None
            raise MetadataError(
                f"metadata file {path} is damaged or not a coalesce ledger: {exc}", hint=damaged
            ) from None
        finally:
            ro.close()
        version = meta.get("schema_version")
        if version is None or not version.isdigit() or int(version) != SCHEMA_VERSION:
            raise MetadataError(
                f"metadata file {path} has schema {version}, expected {SCHEMA_VERSION}",
                hint="use the coalesce version that wrote it",
            )
        stored = meta.get("group")
        if stored is None:
            raise MetadataError(f"metadata file {path} names no group", hint=damaged)
        if group is not None and stored != group:
            raise MetadataError(
                f"metadata file {path} belongs to group {stored!r}, not {group!r}",
                hint="check [group] name and metadata in the config",
            )

    def close(self) -> None:
        self.conn.close()

    # -- reading --------------------------------------------------------------
    def load(self) -> GroupState:
        c = self.conn
        try:
            meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
            fields = {k: json.loads(meta[k]) for k in _GROUP_FIELDS if k in meta}
            if "cycle_targets" not in fields and _LEGACY_CYCLE_TARGET in meta:
                legacy = json.loads(meta[_LEGACY_CYCLE_TARGET])
                fields["cycle_targets"] = {DEFAULT_SOURCE: legacy} if legacy is not None else {}
            replicas = {n: _replica(json.loads(d)) for n, d in c.execute("SELECT name, data FROM replicas")}
            pcpis = {}
            for n, d in c.execute("SELECT name, data FROM pcpis"):
                raw = json.loads(d)
                raw["owners"] = frozenset(raw.get("owners", ()))
                pcpis[n] = Pcpi(**raw)
            # rows written before sources had names have no ``source``: SourcePcpi's default, DEFAULT_SOURCE
            sps = {n: SourcePcpi(**json.loads(d)) for n, d in c.execute("SELECT name, data FROM source_pcpis")}
            manifests = {}
            if self._has_table("manifests"):
                manifests = {
                    n: Manifest.from_json(json.loads(d)) for n, d in c.execute("SELECT name, data FROM manifests")
                }
            return GroupState(
                name=meta["group"],
                replicas=replicas,
                pcpis=pcpis,
                source_pcpis=sps,
                retry=RetryPolicy(**json.loads(meta["retry"])),
                retention=_policy(json.loads(meta["retention"])) if "retention" in meta else Policy(),
                manifests=manifests,
                **fields,
            )
        except (KeyError, TypeError, ValueError, sqlite3.DatabaseError) as exc:
            if isinstance(exc, sqlite3.Error) and _environmental(exc):
                raise _unreadable(self.path, exc) from None
            raise MetadataError(
                f"metadata file {self.path} has unreadable content: {exc!r}",
                hint="restore it from a backup; nothing was changed",
            ) from None

    def load_consistent(self) -> GroupState:
        """:meth:`load` inside one read transaction: a consistent state while another process
        (a running agent) goes on committing (WAL)."""
        self.conn.execute("BEGIN")
        try:
            return self.load()
        finally:
            self.conn.execute("COMMIT")

    def identity(self) -> str | None:
        """The group's identity, made by ``coalesce init`` and recorded with its volumes
        (coalesce_core/ownership.py); None in a ledger written before identities existed."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (_IDENTITY,)).fetchone()
        return row[0] if row else None

    def set_identity(self, identity: str) -> None:
        """Record the group's identity in a ledger that has none (one durable transaction)."""
        with self._tx():
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (_IDENTITY, identity))

    def note(self, key: str) -> Any:
        """The JSON value kept beside the state under ``key`` (one of :data:`NOTES`); None when absent
        or unreadable (a note is advisory: losing one never loses state)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (_note_key(key),)).fetchone()
        try:
            return json.loads(row[0]) if row else None
        except ValueError:
            return None

    def update_note(self, key: str, change: Callable[[Any], Any]) -> None:
        """Replace the note ``key`` by ``change(current value)`` in one durable transaction."""
        with self._tx():
            value = change(self.note(key))
            self.conn.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (_note_key(key), json.dumps(value, sort_keys=True))
            )

    def transitions(self, limit: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT ts, cycle, replica, trigger, source, dest FROM transitions ORDER BY id"
        rows = self.conn.execute(q).fetchall()
        if limit is not None:
            rows = rows[-limit:]
        keys = ("ts", "cycle", "replica", "trigger", "source", "dest")
        return [dict(zip(keys, r)) for r in rows]

    def cycles(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self.conn.execute("SELECT report FROM cycles ORDER BY cycle")]

    def last_cycle(self) -> dict[str, Any] | None:
        """The history row of the newest cycle kept (:meth:`cycles`' last), None before the first: one
        row read, whatever the length of the history (the agent asks after every cycle)."""
        row = self.conn.execute("SELECT report FROM cycles ORDER BY cycle DESC LIMIT 1").fetchone()
        return json.loads(row[0]) if row else None

    # -- writing --------------------------------------------------------------
    class _Tx:
        def __init__(self, led: "Ledger") -> None:
            self.led = led

        def __enter__(self) -> None:
            try:
                self.led.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                if _environmental(exc):
                    raise _unwritable(self.led.path, exc) from None
                raise

        def __exit__(self, et: Any, e: Any, tb: Any) -> None:
            if et is None:
                try:
                    self.led.conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    with contextlib.suppress(sqlite3.Error):
                        self.led.conn.execute("ROLLBACK")
                    if _environmental(exc):
                        raise _unwritable(self.led.path, exc) from None
                    raise
                self.led.commits += 1
                return
            with contextlib.suppress(sqlite3.Error):
                self.led.conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error) and _environmental(e):
                raise _unwritable(self.led.path, e) from None

    def _tx(self) -> "Ledger._Tx":
        return Ledger._Tx(self)

    def _write(self, old: GroupState | None, new: GroupState) -> None:
        c = self.conn
        rows = []
        if old is None or old.retry != new.retry:
            rows.append(("retry", json.dumps(attrs.asdict(new.retry))))
        if old is None or old.retention != new.retention:
            rows.append(("retention", json.dumps(_policy_json(new.retention))))
        for k in _GROUP_FIELDS:
            v = getattr(new, k)
            if old is None or getattr(old, k) != v:
                rows.append((k, json.dumps(v)))
        if rows:
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)
            if any(k == "cycle_targets" for k, _ in rows):
                c.execute("DELETE FROM meta WHERE key = ?", (_LEGACY_CYCLE_TARGET,))
        for table, old_map, new_map in (
            ("replicas", old.replicas if old else {}, new.replicas),
            ("pcpis", old.pcpis if old else {}, new.pcpis),
            ("source_pcpis", old.source_pcpis if old else {}, new.source_pcpis),
        ):
            if old_map is new_map:
                continue
            changed = [(n, _dump(v)) for n, v in new_map.items() if old_map.get(n) is not v]
            gone = [(n,) for n in old_map if n not in new_map]
            if changed:
                c.executemany(f"INSERT OR REPLACE INTO {table} VALUES (?, ?)", changed)
            if gone:
                c.executemany(f"DELETE FROM {table} WHERE name = ?", gone)
        old_m = old.manifests if old else {}
        if old_m is not new.manifests:
            changed_m = [(n, json.dumps(m.to_json())) for n, m in new.manifests.items() if old_m.get(n) is not m]
            gone_m = [(n,) for n in old_m if n not in new.manifests]
            if changed_m or gone_m:
                c.execute(_MANIFESTS)
            if changed_m:
                c.executemany("INSERT OR REPLACE INTO manifests VALUES (?, ?)", changed_m)
            if gone_m:
                c.executemany("DELETE FROM manifests WHERE name = ?", gone_m)

    def commit(
        self,
        old: GroupState,
        new: GroupState,
        log: Sequence[Any] = (),
        now: float | None = None,
        answered: Request | None = None,
    ) -> None:
        """Persist ``new`` (and the transitions that led to it) in one durable transaction; with
        ``answered``, the answer to the request whose decision this is, in the same transaction."""
        ts = time.time() if now is None else now
        with self._tx():
            self._write(old, new)
            if log:
                self.conn.executemany(
                    "INSERT INTO transitions (ts, cycle, replica, trigger, source, dest) VALUES (?, ?, ?, ?, ?, ?)",
                    [(ts, new.cycle, t.replica, t.trigger, t.source, t.dest) for t in log],
                )
            if answered is not None:
                self._answer(answered)

    # -- requests (coalesce_core.requests) ------------------------------------------
    def _has_table(self, name: str) -> bool:
        q = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self.conn.execute(q, (name,)).fetchone() is not None

    def _has_requests(self) -> bool:
        return self._has_table("requests")

    def ask(self, verb: str, args: dict[str, str], now: float, pid: int) -> Request:
        """Append a pending request to the queue, durably; returns it with its id."""
        with self._tx():
            self.conn.execute(_REQUESTS)
            cur = self.conn.execute(
                "INSERT INTO requests (verb, args, status, asked, pid) VALUES (?, ?, ?, ?, ?)",
                (verb, json.dumps(args, sort_keys=True), PENDING, now, pid),
            )
            rid = cur.lastrowid
        assert rid is not None
        return Request(id=rid, verb=verb, args=args, asked=now, pid=pid)

    def requests(self, *, pending: bool = False, last: int | None = None) -> list[Request]:
        """The queue, oldest first: only the pending requests, or (``last``) the newest ``last``."""
        if not self._has_requests():
            return []
        q = f"SELECT {_REQUEST_COLUMNS} FROM requests"
        if pending:
            q += f" WHERE status = '{PENDING}'"
        q += " ORDER BY id"
        rows = self.conn.execute(q).fetchall()
        if last is not None:
            rows = rows[-last:] if last else []
        return [_request(r) for r in rows]

    def request(self, rid: int) -> Request | None:
        if not self._has_requests():
            return None
        row = self.conn.execute(f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE id = ?", (rid,)).fetchone()
        return _request(row) if row else None

    def answer(self, request: Request) -> None:
        """Record the answer to a request that changed no state (a refusal), durably."""
        with self._tx():
            self._answer(request)

    def _answer(self, r: Request) -> None:
        cur = self.conn.execute(
            "UPDATE requests SET status = ?, answered = ?, message = ?, hint = ?, exit_code = ? "
            "WHERE id = ? AND status = ?",
            (r.status, r.answered, r.message, r.hint, r.exit_code, r.id, PENDING),
        )
        if cur.rowcount != 1:  # withdrawn meanwhile: the decision must not be committed either
            raise RequestGone(r.id)

    def withdraw(self, rid: int, now: float) -> bool:
        """Withdraw a request the agent has not taken yet; False when it was answered first."""
        with self._tx():
            cur = self.conn.execute(
                "UPDATE requests SET status = ?, answered = ? WHERE id = ? AND status = ?",
                (WITHDRAWN, now, rid, PENDING),
            )
            return cur.rowcount == 1

    def record_cycle(self, report: dict[str, Any], notes: dict[str, Any] | None = None) -> None:
        """Keep a finished cycle's history row, and replace the ``notes`` given, in one transaction."""
        with self._tx():
            self.conn.execute(
                "INSERT OR REPLACE INTO cycles VALUES (?, ?, ?, ?)",
                (report["cycle"], report.get("started"), report.get("ended"), json.dumps(report)),
            )
            for key, value in (notes or {}).items():
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)", (_note_key(key), json.dumps(value, sort_keys=True))
                )


class RequestGone(Exception):
    """The request was withdrawn before the agent's answer was committed (nothing was committed)."""


def _request(row: Sequence[Any]) -> Request:
    rid, verb, args, status, asked, pid, answered, message, hint, exit_code = row
    return Request(
        id=rid,
        verb=verb,
        args=json.loads(args),
        status=status,
        asked=asked,
        pid=pid,
        answered=answered,
        message=message,
        hint=hint,
        exit_code=exit_code,
    )


def _policy_json(policy: Policy) -> dict[str, Any]:
    return {
        "keep_min": policy.keep_min,
        "keep": " ".join(str(k) for k in policy.keep),
        "max": policy.max,
        "prefer_complete": policy.prefer_complete,
        **({"zone": policy.zone} if policy.zone != "UTC" else {}),
    }


def _policy(raw: dict[str, Any]) -> Policy:
    return Policy(**raw)


def _note_key(key: str) -> str:
    if key not in NOTES:
        raise ValueError(f"{key!r} is not a ledger note (one of {sorted(NOTES)})")
    return key


def iter_log_edges(rows: Iterable[dict[str, Any]]) -> Iterable[tuple[str | None, str, str, str]]:
    """(replica, trigger, source, dest) of logged transitions (for I8 checks)."""
    for r in rows:
        yield r["replica"], r["trigger"], r["source"], r["dest"]
