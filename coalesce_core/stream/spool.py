"""The spool: a local copy of the change records an update has received.

While an update is applied, every change record is handed to the spool
before the applier gets it, and appended to
``<metadata>/<group>.spool/<replica>.stream`` by a writer thread, in the
codec's framed, checksummed format (coalesce_core.stream.codec, without the
trailer), with ``O_DIRECT`` in 1 MiB blocks where the file system takes it
(the spool is read only after a crash: it should not fill the page cache).
Its length in whole frames is the update's persisted position.
After a restart, recovery rolls the replica back (Fig. 9) and the update
restarts in the same cycle (spec: ``resume_updates``): the spooled
records are replayed from local disk and the source is asked only for the
records after them (it regenerates the same deterministic stream and skips).

Correctness never rests on the spool: the replica is always rolled back to
the coalesced base before the replay, so any valid prefix of the stream is
as good as another.  That is why the spool may lag the apply (a killed agent
loses what was still queued and the last unwritten block, at most a few MiB, which the source sends again)
and is not fsynced (a power loss may tear its tail); a torn or damaged tail is
cut at the last whole, checksummed frame, and a spool of another
stream (other base, target or qtree) is ignored.  A spool that cannot be
written (full disk) is dropped and the update goes on without it.  The spool
is removed when its update ends, either way.

The spools have a size bound (:class:`Budget`: ``[group] spool_max`` per replica,
``spool_group_max`` for the group's spools together, shared by concurrent updates).  At the
bound a spool stops growing and keeps its prefix: the update goes on, and a restart replays
the prefix and asks the source for the rest, so a larger update still succeeds; only less of
it is saved from a second transfer.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator

from coalesce_core.errors import CorruptStream, StreamError
from coalesce_core.stream import codec
from coalesce_core.stream.closing import ClosingFilter
from coalesce_core.stream.records import Begin, End

log = logging.getLogger("coalesce.spool")

SUFFIX = ".stream"


class Budget:
    """The bytes the spools of one group may hold: ``replica`` each, ``group`` in all (None: no
    bound).  Thread-safe: the writers of concurrent updates take from it."""

    def __init__(self, replica: int | None = None, group: int | None = None) -> None:
        self.replica, self.group = replica, group
        self.held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, replica: str, n: int) -> bool:
        """Count ``n`` more bytes for ``replica``'s spool; False (nothing counted) past a bound."""
        with self._lock:
            mine = self.held.get(replica, 0) + n
            if self.replica is not None and mine > self.replica:
                return False
            if self.group is not None and sum(self.held.values()) + n > self.group:
                return False
            self.held[replica] = mine
            return True

    def release(self, replica: str) -> None:
        """``replica``'s spool file is gone or starts over."""
        with self._lock:
            self.held.pop(replica, None)


class Spool:
    """The spool files of one group, one per replica, in ``directory``, within ``budget``."""

    def __init__(self, directory: str | os.PathLike[str], budget: Budget | None = None) -> None:
        self.directory = Path(directory)
        self.budget = budget or Budget()

    def path(self, replica: str) -> Path:
        return self.directory / f"{replica}{SUFFIX}"

    def replicas(self) -> list[str]:
        """Replicas that have a spool file."""
        try:
            return sorted(p.name[: -len(SUFFIX)] for p in self.directory.iterdir() if p.name.endswith(SUFFIX))
        except FileNotFoundError:
            return []

    def holds(self, replica: str, begin: Begin) -> bool:
        """True if the spool of ``replica`` is the stream ``begin`` opens (its first frame is that Begin)."""
        try:
            with open(self.path(replica), "rb") as f:
                first = next(codec.decode(f), None)
        except (OSError, StreamError):
            return False
        return first == begin

    def count(self, replica: str) -> int:
        """Change records in the valid prefix of the spool (for status and tests)."""
        return sum(1 for _ in _changes(self.path(replica)))

    def discard(self, replica: str) -> None:
        self.budget.release(replica)
        for p in (self.path(replica), _old(self.path(replica))):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def record(self, replica: str, records: Iterable[Any]) -> Iterator[Any]:
        """Pass ``records`` (Begin, changes, End) through, spooling each change before it is yielded."""
        w = _Writer.create(self.path(replica), self.budget, replica)
        try:
            for rec in records:
                if type(rec) is not End:
                    w.write(rec)
                yield rec
        finally:
            w.close()

    def resume(self, replica: str, begin: Begin, rest: Callable[[int], Iterable[Any]]) -> Iterator[Any]:
        """The stream ``begin`` opens: the spooled change records, then ``rest(k)`` (Begin,
        the changes after the first k, End).  The spool is rewritten as it goes, so a
        restart during the replay keeps what was replayed."""
        path = self.path(replica)
        old = _old(path)
        os.replace(path, old)
        w = _Writer.create(path, self.budget, replica)
        try:
            w.write(begin)
            yield begin
            k = 0
            for rec in _changes(old):
                w.write(rec)
                yield rec
                k += 1
            log.info("replica %s: %d change records replayed from the spool", replica, k)
            for rec in rest(k):
                t = type(rec)
                if t is Begin:
                    if rec != begin:
                        raise CorruptStream(
                            f"the source resumed the stream {rec.base}..{rec.target} of "
                            f"{rec.qtree}, not {begin.base}..{begin.target} of {begin.qtree}"
                        )
                    continue
                if t is not End:
                    w.write(rec)
                yield rec
        finally:
            w.close()
            try:
                old.unlink()
            except FileNotFoundError:
                pass


def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def _changes(path: Path) -> Iterator[Any]:
    """The change records of the valid prefix of a spool file (its Begin and a torn tail are left out)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        it = codec.decode(f)
        try:
            first = next(it)
            if type(first) is not Begin:
                return
            for rec in it:
                if type(rec) is End:
                    return
                yield rec
        except StreamError:
            return  # the tail a restart tore (or damage): the source sends the rest again


class skip_changes(ClosingFilter):
    """Begin, then the change records after the first ``k``, then End (a local source's resume).

    ``close()`` closes the wrapped stream too, even before the first record (a diff
    holds clones or pipes until it is closed)."""

    def __init__(self, records: Iterable[Any], k: int) -> None:
        self.k = k
        super().__init__(records)

    def _filter(self, it: Iterator[Any]) -> Generator[Any, None, None]:
        k, skipped = self.k, 0
        for rec in it:
            t = type(rec)
            if t is Begin:
                yield rec
            elif skipped < k:
                if t is End:
                    raise CorruptStream(f"cannot resume at change record {k}: the stream has only {skipped}")
                skipped += 1
            else:
                yield rec
                if t is End:
                    return


class _Writer:
    """Appends frames to a spool file from a thread of its own; on a write error it drops the
    spool and goes quiet.

    Records are handed over in batches (64 records or 1 MiB of data) through a queue of 8, so
    the spool's encoding and writing overlap the transfer and the apply instead of adding to
    them; a full queue slows the caller down to the disk's pace.

    The file is written with ``O_DIRECT`` in 1 MiB blocks from one reused buffer where the file
    system allows it (else through the page cache: its open or its first write fails with EINVAL):
    a spool is written once and read only after a crash, so it should neither evict the host's
    cached data nor cost a copy into new cache pages (docs/decisions.md).  The last partial block is written at close, padded to 4 KiB, and
    the file cut to its length; a crash before that loses at most that block, which the source
    sends again."""

    BATCH_RECORDS = 64
    BATCH_BYTES = 1 << 20
    BLOCK = 1 << 20
    ALIGN = 4096

    def __init__(self, path: Path, budget: Budget, replica: str) -> None:
        self.path = path
        self.budget, self.replica = budget, replica
        self.full = False  # at its bound: the file keeps its prefix and takes nothing more
        self.fd: int | None = None
        self.enc = codec.StreamEncoder(digest=False)
        self.failed = False
        self.direct: mmap.mmap | None = None  # the block buffer when the file is O_DIRECT
        self.fill = 0  # bytes of it not yet written
        self.size = 0  # the spool's length in bytes
        self._batch: list[Any] = []
        self._bytes = 0
        self._q: queue.Queue[list[Any] | None] = queue.Queue(maxsize=8)
        self._thread: threading.Thread | None = None

    @classmethod
    def create(cls, path: Path, budget: Budget | None = None, replica: str = "") -> "_Writer":
        budget = budget or Budget()
        w = cls(path, budget, replica)
        budget.release(replica)  # the file starts over
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            w._open()
            header = w.enc.header()
            if budget.take(replica, len(header)):
                w._put(header)
            else:
                w._stop()
        except OSError as exc:
            w._drop(exc)
            return w
        w._thread = threading.Thread(target=w._run, name=f"spool-{path.name}", daemon=True)
        w._thread.start()
        return w

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags | getattr(os, "O_DIRECT", 0), 0o600)
            self.direct = mmap.mmap(-1, self.BLOCK) if hasattr(os, "O_DIRECT") else None
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: the file system takes no O_DIRECT (tmpfs)
                raise
            self.fd = os.open(self.path, flags, 0o600)

    def _put(self, chunk: Any) -> None:
        view = memoryview(chunk).cast("B")
        self.size += len(view)
        if self.direct is None:
            self._write(view)
            return
        while view:
            n = min(len(view), self.BLOCK - self.fill)
            self.direct[self.fill : self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == self.BLOCK:
                self._write(memoryview(self.direct))
                self.fill = 0

    def _write(self, view: memoryview) -> None:
        assert self.fd is not None
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                o_direct = getattr(os, "O_DIRECT", 0)
                if exc.errno != errno.EINVAL or not flags & o_direct:
                    raise
                # the file system took O_DIRECT at open but refuses the writes (some FUSE ones):
                # the rest goes through the page cache
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~o_direct)
                continue
            view = view[n:]

    def write(self, rec: Any) -> None:
        if self.failed or self.full:
            return
        self._batch.append(rec)
        data = getattr(rec, "data", None)
        if data is not None:
            self._bytes += len(data)
        if len(self._batch) >= self.BATCH_RECORDS or self._bytes >= self.BATCH_BYTES:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._batch:
            self._q.put(self._batch)
            self._batch = []
            self._bytes = 0

    def _run(self) -> None:
        while True:
            batch = self._q.get()
            if batch is None:
                return
            if self.fd is None:
                continue  # dropped: drain the queue so the caller never blocks
            try:
                for rec in batch:
                    if self.full:
                        break
                    frame = list(self.enc.frame(rec))
                    if not self.budget.take(self.replica, sum(len(memoryview(c).cast("B")) for c in frame)):
                        self._stop()
                        break
                    for chunk in frame:
                        self._put(chunk)
            except OSError as exc:
                self._drop(exc)

    def _stop(self) -> None:
        """At the bound: whole frames only, so the file is a valid prefix of the stream; its last
        partial block is written now (nothing more comes), so a kill keeps the whole prefix."""
        self.full = True
        self._write_tail()
        log.info(
            "the spool %s reached its size bound at %d bytes (spool_max, spool_group_max): it keeps "
            "this prefix, and a restart of this update asks the source for the rest",
            self.path,
            self.size,
        )

    def close(self) -> None:
        if self._thread is not None:
            if not self.failed:
                self._hand_over()
            self._q.put(None)
            self._thread.join()
            self._thread = None
        if self.fd is not None:
            try:
                self._write_tail()
                os.close(self.fd)
            except OSError as exc:
                self._drop(exc)
            self.fd = None
        if self.direct is not None:
            self.direct.close()
            self.direct = None

    def _write_tail(self) -> None:
        """Write the last partial O_DIRECT block, padded to ALIGN, and cut the file to its length."""
        if self.fd is not None and self.direct is not None and self.fill:
            end = -(-self.fill // self.ALIGN) * self.ALIGN
            self.direct[self.fill : end] = bytes(end - self.fill)
            self._write(memoryview(self.direct)[:end])
            os.ftruncate(self.fd, self.size)
            self.fill = 0

    def _drop(self, exc: OSError) -> None:
        log.warning(
            "cannot write the spool %s (%s): this update goes on without it and cannot resume after a restart",
            self.path,
            exc,
        )
        self.failed = True
        self.budget.release(self.replica)
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        try:
            self.path.unlink()
        except OSError:
            pass
