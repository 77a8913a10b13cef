"""Running verifications on volumes (the executor side of coalesce_core.verify).

* :class:`TransferCheck` -- the check before ``done``: after an update's
  records were applied, the paths they touched (an incremental update) or the
  whole qtree (a baseline or re-seed: every path was created) are described
  in the source PCPI and in the replica's active FS and compared; the first
  difference raises :class:`~coalesce_core.errors.VerificationFailed`.
* :func:`verify_export` -- a whole exported image against the source PCPI the
  ledger says it shows (``coalesce verify``, ``[group] verify_every``).
* :func:`load_times` / :func:`save_times` -- the time of each replica's last
  full verification, kept in the ledger's ``meta`` table.

Both sides are described at the same time: the source side in a helper
thread (its reads and digests release the GIL), the replica side in the
caller's; except in the check of an update that wrote little (less than
PREFETCH_FROM) and touched few paths (at most INLINE_PATHS), whose few small
descriptions are Python work that a thread would only make dearer: both sides
in the caller's thread, one after the other.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from typing import Any, Callable, Iterable, Mapping, Sequence

from coalesce_core import verify as V
from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.errors import TransferFailed, VerificationFailed
from coalesce_core.readahead import read_ahead
from coalesce_core.stream.records import Write
from coalesce_core.touched_store import TouchedStore

#: paths described per call in the check of an update (bounds the descriptions held at once)
BATCH = 16384
#: the ledger's meta key holding the last full verification of each replica
META_KEY = "verified"
#: byte ranges of a file, sorted and disjoint (coalesce_core.verify.Touched.parts)
Ranges = tuple[tuple[int, int], ...]


class _Side:
    """Runs a function in a helper thread; :meth:`result` waits for it and re-raises its error."""

    def __init__(self) -> None:
        self.t: threading.Thread | None = None
        self.box: dict[str, Any] = {}

    def start(self, fn: Any, *args: Any) -> None:
        box = self.box

        def run() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller of result()
                box["error"] = exc

        self.t = threading.Thread(target=run, name="coalesce-verify", daemon=True)
        self.t.start()

    def result(self) -> Any:
        assert self.t is not None
        self.t.join()
        if "error" in self.box:
            raise self.box["error"]
        return self.box["value"]


def _both(
    source: Any,
    src_qtree: str,
    src_snap: str | None,
    dest: Any,
    dst_qtree: str,
    dst_snap: str | None,
    cache: Mapping[str, tuple[V.Description, Ranges | None]] | None = None,
    parts: Mapping[str, Ranges] | None = None,
    inline_up_to: int = 0,
):
    """``describe_both`` for compare_paths: the source side in a helper thread, the replica side
    in the caller's (a chunk of at most ``inline_up_to`` paths: both in the caller's, the source
    side first); source descriptions already in ``cache`` (with the ranges they were taken
    for) are reused where they answer what is asked, and when the cache holds most of the
    source side, the helper also takes half of the replica side.  The paths in ``parts``
    asked with content are described by their part digests over those ranges on both sides
    (``coalesce_describe``'s ``ranges``); a regular file whose two descriptions do not both
    carry one (a backend that does not read ranges) is described again, without the cache,
    with its whole content on both sides, so that its bytes are always compared."""
    cache = cache or {}
    parts = parts or {}

    def usable(p: str, content: bool) -> bool:
        hit = cache.get(p)
        if hit is None:
            return False
        d, taken = hit
        if not content or d.kind != "f":
            return True
        want = parts.get(p)
        return d.content is not None if want is None else d.part is not None and taken == want

    def both(chunk: list[tuple[str, bool]], ranges: Mapping[str, Ranges], cached: bool = True) -> tuple[list, list]:
        need = [(p, c) for p, c in chunk if not (cached and usable(p, c))]
        half = len(chunk) // 2 if len(need) * 4 <= len(chunk) else len(chunk)

        def helper() -> tuple[list, list]:
            got = source.describe(src_qtree, src_snap, need, ranges) if need else []
            return got, dest.describe(dst_qtree, dst_snap, chunk[half:], ranges) if half < len(chunk) else []

        if len(chunk) <= inline_up_to:
            got = source.describe(src_qtree, src_snap, need, ranges) if need else []
            mine = dest.describe(dst_qtree, dst_snap, chunk, ranges)
        else:
            side = _Side()
            side.start(helper)
            try:
                first = dest.describe(dst_qtree, dst_snap, chunk[:half], ranges)
            finally:
                got, rest = side.result()
            mine = first + rest
        found = {d.path: d for d in got}
        theirs = [cache[p][0] if cached and usable(p, c) else found[p] for p, c in chunk]
        return theirs, mine

    def describe_both(chunk: Sequence[tuple[str, bool]]):
        chunk = list(chunk)
        ranges = {p: parts[p] for p, c in chunk if c and p in parts} if parts else {}
        theirs, mine = both(chunk, ranges)
        if ranges:
            redo = [
                (i, (a.path, True))
                for i, (a, b) in enumerate(zip(theirs, mine))
                if a.path in ranges and a.kind == b.kind == "f" and (a.part is None or b.part is None)
            ]
            if redo:
                again = both([item for _i, item in redo], {}, cached=False)
                for (i, _item), a, b in zip(redo, *again):
                    theirs[i], mine[i] = a, b
        return theirs, mine

    return describe_both


def compare_trees(
    source: Any,
    src_qtree: str,
    src_snap: str | None,
    dest: Any,
    dst_qtree: str,
    dst_snap: str | None,
    *,
    content: bool,
    holds: V.Holds,
    limit: int,
) -> V.Outcome:
    """Two whole qtrees, each walked once (``describe_tree``), the source's in a helper thread."""
    src = read_ahead(
        iter(source.describe_tree(src_qtree, src_snap, content=content)), 4096, name="coalesce-verify-walk"
    )
    dst = iter(dest.describe_tree(dst_qtree, dst_snap, content=content))
    try:
        return V.tree_compare(src, dst, holds, limit=limit)
    finally:
        for it in (src, dst):
            close = getattr(it, "close", None)
            if close is not None:
                close()


class _Prefetch:
    """Describes, in a helper thread and while the update is still being applied, the source
    side of the files large Write records wrote (PREFETCH_FROM; the source PCPI does not
    change, so its descriptions can be taken at any time): the check after the apply then
    reads and hashes only the replica's copy of them.  A file compared whole is handed over
    at once; a file patched in place (``part_of``: its ranges so far, None for a file compared
    whole) once the stream has gone on to another path, with the ranges written by then, and
    the check uses its description only if those are still its ranges at the end.

    Memory: at most PREFETCH_MAX files are prefetched (their descriptions wait for the check),
    and the bytes written so far are counted for at most PREFETCH_PATHS files at a time.

    Paths are handed over in batches of PREFETCH_PATHS paths or PREFETCH_BYTES of written data,
    so a backend whose describe call costs something by itself (a read clone of zfs-fuse) pays it
    per batch; what is left when the stream ends is described with the rest.  Best effort: a
    failed batch is simply described again by the check."""

    def __init__(self, source: Any, qtree: str, target: str, part_of: Callable[[str], Ranges | None]) -> None:
        self.source, self.qtree, self.target, self.part_of = source, qtree, target, part_of
        self.cache: dict[str, tuple[V.Description, Ranges | None]] = {}
        self.seen: set[str] = set()
        self.written: dict[str, int] = {}  # bytes written so far to paths not yet offered
        self.open: tuple[str, int] | None = None  # a patched file being written, and its bytes
        self.pending: list[tuple[str, bool]] = []
        self.ranges: dict[str, Ranges] = {}
        self.pending_bytes = 0
        self.q: "queue.Queue[tuple[list[tuple[str, bool]], dict[str, Ranges]] | None]" = queue.Queue()
        #: the helper thread, started with the first batch: an update without a large Write (most of
        #: them: a few small files changed, or none) starts none
        self.t: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            batch, ranges = item
            try:
                for d in self.source.describe(self.qtree, self.target, batch, ranges):
                    self.cache[d.path] = (d, ranges.get(d.path))
            except Exception:
                pass  # described again by the check

    def step(self, path: str | None) -> None:
        """A record naming ``path`` goes to the applier: a patched file it does not name is handed over."""
        if self.open is not None and path != self.open[0]:
            (done, nbytes), self.open = self.open, None
            self._hand(done, nbytes, self.part_of(done))

    def offer(self, path: str, nbytes: int) -> None:
        """``nbytes`` were written to ``path``: it is prefetched once PREFETCH_FROM were."""
        if path in self.seen:
            if self.open is not None and self.open[0] == path:
                self.open = (path, self.open[1] + nbytes)
            return
        written = self.written.get(path, 0) + nbytes
        if written < PREFETCH_FROM:
            if len(self.written) >= PREFETCH_PATHS:  # bounded: a file written a piece at a time among
                self.written.clear()  # thousands of others is simply not prefetched
            self.written[path] = written
            return
        self.written.pop(path, None)
        if len(self.seen) >= PREFETCH_MAX:
            return  # described by the check, with the rest
        self.seen.add(path)
        if self.part_of(path) is None:
            self._hand(path, written, None)
        else:
            self.open = (path, written)

    def _hand(self, path: str, nbytes: int, ranges: Ranges | None) -> None:
        self.pending.append((path, True))
        if ranges is not None:
            self.ranges[path] = ranges
        self.pending_bytes += nbytes
        if len(self.pending) >= PREFETCH_PATHS or self.pending_bytes >= PREFETCH_BYTES:
            if self.t is None:
                self.t = threading.Thread(target=self._run, name="coalesce-verify-prefetch", daemon=True)
                self.t.start()
            self.q.put((self.pending, self.ranges))
            self.pending, self.ranges, self.pending_bytes = [], {}, 0

    def finish(self) -> dict[str, tuple[V.Description, Ranges | None]]:
        """Wait for the batches handed over; the descriptions taken, with the ranges they were
        taken for (the pending rest is not)."""
        self.close()
        return self.cache

    def close(self) -> None:
        if self.t is not None and self.t.is_alive():
            self.q.put(None)
            self.t.join()


#: a prefetch batch: this many paths, or paths whose records wrote this many bytes
PREFETCH_PATHS = 4096
PREFETCH_BYTES = 256 << 20
#: files prefetched in one update at most (their descriptions are held until the check)
PREFETCH_MAX = 16384
#: only the paths of Write records of this many bytes or more are prefetched: describing a
#: large file is reading and hashing, which release the GIL, while describing a small one is
#: Python work that would take turns with the transfer's own (docs/benchmarks-journal.md,
#: "Per-update verification cost")
PREFETCH_FROM = 256 << 10
#: the check of an update that wrote less than PREFETCH_FROM describes a chunk of at most this many
#: paths without a helper thread (starting one costs more than describing a few small paths)
INLINE_PATHS = 64


class TransferCheck:
    """The check before ``done`` of one transfer (:meth:`run` raises VerificationFailed naming
    the first difference between the replica's active FS and ``source_qtree`` in source PCPI
    ``target``).

    Incremental (an update): :meth:`add` sees every record on its way to the applier
    (coalesce_core.verify.Touched collects the paths, on disk past SPILL_PATHS:
    coalesce_core.touched_store; the source side of the large files they
    write is described meanwhile, :class:`_Prefetch`, for a local source), and :meth:`run`
    compares the touched paths, then every path below the entries the records renamed, without
    content (coalesce_core.verify.compare_touched).  Otherwise (a baseline or re-seed: every path was created) :meth:`run`
    compares the whole qtree, bytes included.  :meth:`close` in every case."""

    def __init__(
        self, source: Any, dest: Any, *, replica: str, source_qtree: str, target: str, incremental: bool
    ) -> None:
        self.source, self.dest = source, dest
        self.replica, self.source_qtree, self.target = replica, source_qtree, target
        self.touched = V.Touched(spill=TouchedStore) if incremental else None
        local = not source.records_decoded
        ranged = self.touched is not None and source.describes_ranges and dest.describes_ranges
        part_of = self.touched.part_of if self.touched is not None and ranged else (lambda _p: None)
        self.prefetch = _Prefetch(source, source_qtree, target, part_of) if incremental and local else None
        #: bytes the Write records wrote (a check of an update that wrote less than PREFETCH_FROM and
        #: touched at most INLINE_PATHS paths describes both sides in the caller's thread)
        self.written = 0

    def add(self, rec: Any) -> None:
        if self.touched is None:
            return
        try:
            self.touched.add(rec)
        except sqlite3.Error as exc:
            raise _spill_failed(exc) from None
        if type(rec) is Write:
            self.written += len(rec.data)
        if self.prefetch is not None:
            self.prefetch.step(getattr(rec, "path", None))
            if type(rec) is Write:
                self.prefetch.offer(rec.path, len(rec.data))

    def run(self) -> V.Outcome:
        holds = self.dest.describe_holds()
        if self.touched is None:
            outcome = compare_trees(
                self.source,
                self.source_qtree,
                self.target,
                self.dest,
                self.replica,
                None,
                content=True,
                holds=holds,
                limit=1,
            )
        else:
            cache = self.prefetch.finish() if self.prefetch is not None else {}
            # asked now: a remote source knows what its server reads once the stream has come
            parts = self.touched.parts() if self.source.describes_ranges and self.dest.describes_ranges else None
            inline = INLINE_PATHS if self.written < PREFETCH_FROM else 0
            both = _both(
                self.source, self.source_qtree, self.target, self.dest, self.replica, None, cache, parts, inline
            )
            try:
                outcome = V.compare_touched(self.touched, both, holds, batch=BATCH)
            except sqlite3.Error as exc:
                raise _spill_failed(exc) from None
            if outcome.ok and outcome.short_links:
                outcome = self._link_groups(outcome, both, holds)
        if not outcome.ok:
            raise VerificationFailed("verification failed: " + outcome.differences[0].explain(self.target))
        return outcome

    def _link_groups(self, outcome: V.Outcome, both: Any, holds: V.Holds) -> V.Outcome:
        """A touched file has fewer links in the replica than in the source: its other names in
        the source qtree (found by a walk of it, without content) are compared on both sides, so a
        name the update did not touch cannot be a separate file, or absent, unseen.  The walk runs
        only then: rarely (a hard link made or moved across qtrees, or a lost one)."""
        idents = outcome.short_links
        names = (
            (d.path, False)
            for d in self.source.describe_tree(self.source_qtree, self.target, content=False)
            if d.kind == "f" and d.ident in idents
        )
        groups = V.compare_paths(names, both, holds, batch=BATCH)
        return V.Outcome(groups.differences, outcome.checked + groups.checked, outcome.not_compared)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
        if self.touched is not None:
            self.touched.close()


def _spill_failed(exc: Exception) -> TransferFailed:
    """The touched paths of a large update could not be kept on disk (coalesce_core.touched_store)."""
    return TransferFailed(
        f"the check before `done` could not keep the update's touched paths on disk: {exc}",
        hint="SQLite keeps them in SQLITE_TMPDIR, TMPDIR or /var/tmp: free space there or point "
        "SQLITE_TMPDIR at a file system with room; the update is rolled back and retried (docs/network.md)",
    )


def verifiable(replica: Any) -> bool:
    """Whether ``replica`` exports an image of a known source PCPI (what `coalesce verify` checks)."""
    return (replica.exported not in (None, ACTIVE)) and replica.source_point is not None


def verify_export(source: Any, dest: Any, replica: Any, *, content: bool, limit: int = 10) -> V.Outcome:
    """The whole image ``replica`` exports against its source qtree in the source PCPI
    the ledger says it shows (``Replica.source_point``)."""
    if not verifiable(replica):
        raise ValueError(f"replica {replica.name!r} exports no image of a source PCPI")
    return compare_trees(
        source,
        replica.source_qtree,
        replica.source_point,
        dest,
        replica.name,
        replica.exported,
        content=content,
        holds=dest.describe_holds(),
        limit=limit,
    )


# ---------------------------------------------------------------------------
# the ledger's record of full verifications
# ---------------------------------------------------------------------------
def load_times(ledger: Any) -> dict[str, dict[str, Any]]:
    """{replica: {"at": time, "ok": bool, "error": str}} of the last full verifications."""
    return _valid_times(ledger.note(META_KEY))


def _valid_times(data: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("at"), (int, float))}


def save_times(ledger: Any, updates: Mapping[str, Mapping[str, Any]], keep: Iterable[str]) -> None:
    """Merge ``updates`` into the record, dropping replicas not in ``keep`` (one durable commit)."""
    kept = set(keep)

    def change(old: Any) -> dict[str, dict[str, Any]]:
        times = _valid_times(old)
        times.update({k: dict(v) for k, v in updates.items()})
        return {k: v for k, v in sorted(times.items()) if k in kept}

    ledger.update_note(META_KEY, change)


# ---------------------------------------------------------------------------
# `coalesce verify`
# ---------------------------------------------------------------------------
def read_state(config: Any, dest: Any) -> Any:
    """The group's state from its ledger, opened read-only (nothing is recovered or written)."""
    import sqlite3

    from coalesce_core.errors import MetadataError
    from coalesce_core.ledger import Ledger

    path = config.ledger_path(dest.metadata_dir())
    if not path.exists():
        raise MetadataError(f"no metadata file at {path}", hint="run `coalesce init` and a cycle first")
    Ledger._validate(path, config.name)
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
    except sqlite3.Error as exc:
        raise MetadataError(f"metadata file {path} cannot be opened read-only: {exc}") from None
    try:
        return Ledger(path, conn).load()
    finally:
        conn.close()


def verify_replicas(
    source: Any, dest: Any, state: Any, names: Sequence[str], *, full: bool, limit: int = 10
) -> list[dict[str, Any]]:
    """`coalesce verify`: one result per replica (docs/schemas/verify.schema.json)."""
    from coalesce_core.errors import CoalesceError

    out = []
    for name in names:
        r = state.replicas[name]
        row: dict[str, Any] = {
            "replica": name,
            "state": r.state,
            "exported_pcpi": r.exported,
            "source_point": r.source_point,
            "full": full,
            "checked": 0,
            "differences": [],
            "not_compared": [],
            "detail": None,
        }
        if not verifiable(r):
            row.update(
                result="skipped",
                detail="exports nothing"
                if r.exported is None
                else "exports its active file system (broken)"
                if r.exported == ACTIVE
                else "no source point",
            )
            out.append(row)
            continue
        try:
            outcome = verify_export(source, dest, r, content=full, limit=limit)
        except CoalesceError as exc:
            row.update(result="error", detail=f"{exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
            out.append(row)
            continue
        row.update(
            result="ok" if outcome.ok else "differs",
            checked=outcome.checked,
            not_compared=list(outcome.not_compared),
            differences=[{**d.as_dict(), "message": d.explain(r.source_point)} for d in outcome.differences],
        )
        out.append(row)
    return out
