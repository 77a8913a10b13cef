"""The transfer pipeline: the data path of one baseline, update or re-seed.

source diff -> codec check -> the request check (coalesce_core.stream.requested) -> the
destination's size limit (coalesce_core.stream.limits) -> (an update: the spool) -> the privilege
policy (coalesce_core.stream.privileges) -> destination apply (with purgatory) -> the check before
``done`` (coalesce_core.verifier.TransferCheck).  The agent decides
and records; :func:`run_transfer` only moves the records.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, cast

import attrs

from coalesce_core import crashpoints, deadlines, verifier
from coalesce_core.backend.volume import Volume
from coalesce_core.crashpoints import SimulatedCrash
from coalesce_core.cycle import effects as fx
from coalesce_core.stream import codec
from coalesce_core.stream import privileges as privilege_policy
from coalesce_core.stream.limits import within_limits
from coalesce_core.stream.records import Begin
from coalesce_core.stream.requested import as_requested
from coalesce_core.stream.spool import Spool, skip_changes

#: records between two calls of ``progress``
PROGRESS_EVERY = 256


@attrs.frozen
class Transferred:
    """What one transfer moved: the applier's counts, and whether the check before ``done`` ran (and passed)."""

    records: int
    nbytes: int
    verified: bool


def _never() -> bool:
    return False


def _quiet(records: int, nbytes: int) -> None:
    pass


def crash_point(eff: fx.Transfer) -> str:
    """The record-level crash point of a transfer: ``mid_reseed``, ``mid_baseline`` or ``mid_apply``."""
    return "mid_reseed" if eff.reseed else "mid_baseline" if eff.base is None else "mid_apply"


def _records(
    records: Iterable[object],
    point: str,
    check: verifier.TransferCheck | None,
    progress: Callable[[int, int], None],
    aborted: Callable[[], bool],
    deadline: deadlines.Deadline,
) -> Iterator[object]:
    n = nbytes = 0
    it = iter(records)
    while True:
        deadline.asking()  # the stall counts the source's time from here, not the apply's
        try:
            rec = next(it)
        except StopIteration:
            return
        if aborted() or crashpoints.fired():
            raise SimulatedCrash("abort")
        deadline.check()  # a local source's only check; a remote one's reads are bounded by it too
        deadline.arrived()
        if check is not None:
            check.add(rec)  # the paths the check before `done` describes (coalesce_core.verify)
        yield rec
        n += 1
        data = getattr(rec, "data", None)
        if data is not None:
            nbytes += len(data)
        crashpoints.hit(point)
        if n % PROGRESS_EVERY == 0:
            progress(n, nbytes)


def run_transfer(
    eff: fx.Transfer,
    source: Volume,
    dest: Volume,
    *,
    spool: Spool | None = None,
    verify: bool = True,
    progress: Callable[[int, int], None] = _quiet,
    aborted: Callable[[], bool] = _never,
    privileges: str = privilege_policy.DEFAULT,
    limits: deadlines.TransferLimits = deadlines.TransferLimits(),
) -> Transferred:
    """Move ``eff``'s records from ``source`` into replica ``eff.replica`` of ``dest``.

    A baseline (``eff.base`` None) first removes the replica's qtree.  An update goes
    through ``spool`` when given (baselines never do): with ``eff.resume`` and a spool that
    holds this stream, the spooled records are replayed and the source is asked only for
    the rest.  With ``verify`` the check before ``done`` runs after the apply.
    ``progress(records, nbytes)`` is called every PROGRESS_EVERY records.  The records reach
    the applier as the ``privileges`` policy lets them (``[group] privileges``), after the spool,
    and the check compares the replica with the source as that policy transforms it.

    Returns what moved.  Raises what the source, the codec, the spool, the apply or the
    check raised, after the spool was removed and the diffs closed: the partial qtree is
    left to the rollback.  Crash points: :func:`crash_point` after every record; a fired
    crash point or ``aborted()`` raises SimulatedCrash, which keeps the spool (the update
    resumes after the restart).  ``limits``: the transfer's deadlines (coalesce_core.deadlines),
    from its start to the end of the check; past one, DeadlineExceeded (and the source's
    connection is closed, not resumed)."""
    point = crash_point(eff)
    deadline = deadlines.Deadline(limits)
    # every call of the source, and every record of its streams, waits at most until the deadline
    source = cast(Volume, deadlines.Bounded(source, deadline))
    sources: list[object] = []

    def diff(skip: int = 0) -> Iterator[object]:
        """The source's stream after its first ``skip`` change records, refused at its first
        record unless it is the stream asked for (coalesce_core.stream.requested)."""
        # a remote source's records were decoded and checked by the codec on arrival, and
        # its server skips; a local stream is checked whole by the codec, then skipped
        remote = source.records_decoded
        opened = source.diff(eff.source_qtree, eff.base, eff.target, skip=skip if remote else 0)
        sources.append(opened)
        records: Iterator[object] = opened
        if not remote:
            records = codec.roundtrip(opened)
            records = skip_changes(records, skip) if skip else records
        records = as_requested(records, eff.source_qtree, eff.base, eff.target)
        return within_limits(records, dest.max_file_size, f"the destination {dest.url}")

    spool = spool if eff.base is not None else None
    stream: Iterator[object] | None = None
    check: verifier.TransferCheck | None = None
    try:
        if eff.base is None:
            dest.remove_qtree(eff.replica)  # a baseline starts from nothing
        if spool is None:
            stream = diff()
        else:
            begin = Begin(qtree=eff.source_qtree, base=eff.base, target=eff.target)
            if eff.resume and spool.holds(eff.replica, begin):
                stream = spool.resume(eff.replica, begin, diff)
            else:
                stream = spool.record(eff.replica, diff())
        check = (
            verifier.TransferCheck(
                privilege_policy.view(source, privileges),
                dest,
                replica=eff.replica,
                source_qtree=eff.source_qtree,
                target=eff.target,
                incremental=eff.base is not None,
            )
            if verify
            else None
        )
        try:
            received = privilege_policy.as_policy(stream, privileges)
            with deadlines.bound(deadline):
                records = _records(received, point, check, progress, aborted, deadline)
                stats = dest.apply(eff.replica, records, use_purgatory=True)
                deadline.start_check()
                if check is not None:  # `done` only once the replica equals the source PCPI where it changed
                    check.run()
                deadline.check(stall=False)  # the check of a local source is bounded by the total only
        finally:
            if check is not None:
                check.close()
    except Exception:
        if spool is not None:
            _close(stream)
            spool.discard(eff.replica)  # a failed update is not resumed: it is rolled back
        raise
    finally:
        for opened in sources:
            _close(opened)  # a diff cut short must release what it holds (clones, pipes) now
    if spool is not None:
        _close(stream)  # the spool's writer thread ends with its stream, not when it is collected
        spool.discard(eff.replica)  # applied and about to be committed: nothing left to resume
    return Transferred(
        records=int(stats.get("records", 0)), nbytes=int(stats.get("bytes", 0)), verified=check is not None
    )


def _close(iterator: object) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass
