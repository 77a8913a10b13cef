"""The spool: a local copy of the change records an update has received.

While an update is applied, every change record is appended to
``<metadata>/<group>.spool/<replica>.stream`` before the applier gets it
(write-ahead), in the codec's framed, checksummed format (coalesce_core.codec,
without the trailer).  Its length in whole frames is the update's persisted
position.  After a restart, recovery rolls the replica back (Fig. 9) and the
update restarts in the same cycle (spec: ``resume_updates``): the spooled
records are replayed from local disk and the source is asked only for the
records after them (it regenerates the same deterministic stream and skips).

Correctness never rests on the spool: the replica is always rolled back to
the coalesced base before the replay, so any valid prefix of the stream is
as good as another.  That is why the spool is written through to the page
cache (a killed agent loses none of it) but not fsynced (a power loss may
tear its tail); a torn or damaged tail is cut at the last whole, checksummed
frame, and a spool of another
stream (other base, target or qtree) is ignored.  A spool that cannot be
written (full disk) is dropped and the update goes on without it.  The spool
is removed when its update ends, either way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from . import codec
from .errors import CorruptStream, StreamError
from .records import Begin, End

log = logging.getLogger("coalesce.spool")

SUFFIX = ".stream"


class Spool:
    """The spool files of one group, one per replica, in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

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
        for p in (self.path(replica), _old(self.path(replica))):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def record(self, replica: str, records: Iterable[Any]) -> Iterator[Any]:
        """Pass ``records`` (Begin, changes, End) through, spooling each change before it is yielded."""
        w = _Writer.create(self.path(replica))
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
        w = _Writer.create(path)
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
                        raise CorruptStream(f"the source resumed the stream {rec.base}..{rec.target} of "
                                            f"{rec.qtree}, not {begin.base}..{begin.target} of {begin.qtree}")
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


class skip_changes:
    """Begin, then the change records after the first ``k``, then End (a local source's resume).

    ``close()`` closes the wrapped stream too, even before the first record (a diff
    holds clones or pipes until it is closed)."""

    def __init__(self, records: Iterable[Any], k: int) -> None:
        self._inner = iter(records)
        self._gen = self._run(self._inner, k)

    @staticmethod
    def _run(it: Iterator[Any], k: int) -> Iterator[Any]:
        skipped = 0
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

    def __iter__(self) -> "skip_changes":
        return self

    def __next__(self) -> Any:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class _Writer:
    """Appends frames to a spool file; on a write error it drops the spool and goes quiet."""

    def __init__(self, path: Path, f: BinaryIO | None) -> None:
        self.path = path
        self.f = f
        self.enc = codec.StreamEncoder(digest=False)

    @classmethod
    def create(cls, path: Path) -> "_Writer":
        w = cls(path, None)
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            # unbuffered: each frame is in the file (the page cache) before the applier gets its
            # record, so a SIGKILL loses nothing that was applied; one write per small frame
            w.f = open(path, "wb", buffering=0)
            w.f.write(w.enc.header())
        except OSError as exc:
            w._drop(exc)
        return w

    def write(self, rec: Any) -> None:
        if self.f is None:
            return
        try:
            self.f.writelines(self.enc.frame(rec))
        except OSError as exc:
            self._drop(exc)

    def close(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            except OSError as exc:
                self._drop(exc)
            self.f = None

    def _drop(self, exc: OSError) -> None:
        log.warning("cannot write the spool %s (%s): this update goes on without it and cannot resume "
                    "after a restart", self.path, exc)
        if self.f is not None:
            try:
                self.f.close()
            except OSError:
                pass
            self.f = None
        try:
            self.path.unlink()
        except OSError:
            pass
