"""Named crash points: where tests kill the agent to prove recovery (I6).

``COALESCE_CRASH_AT=<name>[:<n>]`` makes the process SIGKILL itself at the
n-th pass (default 1) through point ``<name>``.  In-process tests call
:func:`arm` (or :func:`run_armed`) instead: the point raises :class:`SimulatedCrash` (a
BaseException, so no ``except Exception`` in the agent swallows it), the
executor stops its workers and the test starts a new agent from the ledger
while the backend's volumes survive, as disks would.  :func:`at_crash` runs
code at the instant a point fires, before the raise or the SIGKILL: a
backend's power cut (docs/sim.md, "Power cuts"), so the volume loses its
unflushed writes at the same moment the agent dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterable, Iterator

#: name -> where it is.  `coalesce debug crash-points` prints this table.
CRASH_POINTS: dict[str, str] = {
    "after_commit": "after any write-ahead commit of the ledger, before the effects run",
    "after_source_pcpi": "after the cycle's source PCPI was taken (of each source: the n-th pass is the n-th source's)",
    "between_source_pcpis": "in a cycle of several sources, after a source's PCPI take was recorded (its replicas' "
    "transfers decided), before the next source's PCPI is taken",
    "after_pcpi_taken": "after any destination PCPI was taken (all roles)",
    "after_rollback_pcpi": "after the one rollback PCPI of Fig. 9 was taken",
    "after_jump_ahead_pcpi": "after the intermediate jump-ahead PCPI was taken",
    "between_jump_ahead_pcpis": "after purgatory was purged, before the new base PCPI is taken",
    "after_new_base_pcpi": "after the new coalesced base PCPI was taken",
    "before_export_switch": "after the new exports were persisted, before the atomic switch",
    "after_export_switch": "after the atomic export switch, before it was recorded",
    "mid_apply": "inside an incremental update, after the n-th record was applied",
    "mid_baseline": "inside a baseline transfer, after the n-th record was applied",
    "mid_rollback": "inside a rollback, after the n-th record was applied",
    "mid_retry": "inside a retry/resync rollback outside the cycle, after the n-th record",
    "mid_reseed": "inside a re-seed (a baseline transfer outside the cycle), after the n-th record was applied",
    "mid_release": "after the first PCPI of a release batch was released",
    "after_kept_pcpi": "after a resync's kept PCPI (the broken replica's writes) was taken, before it was recorded",
    "after_kept_release": "after a kept PCPI was released (`coalesce release`), before it was recorded",
    "after_straggle": "after the write-ahead commit of `straggle` (an update left the cycle: update_uncoalesced), "
    "its transfer still running, before the others jump ahead",
    "after_straggler_individual_pcpi": "after the release step's commit that pinned a straggler's last good image "
    "(the old coalesced base) as its individual PCPI",
    "after_straggler_succeeded": "after the commit of `straggler_succeeded` (its update arrived outside the cycle: "
    "done_uncoalesced), before the next jump-ahead",
    "after_straggler_rejoins": "after the commit of the jump-ahead that brings a replica back from done_uncoalesced "
    "(a straggler's rejoin), before the export switch",
}

#: the points only a cycle of several sources passes (docs/config.md, "Sources")
FAN_IN_POINTS = ("between_source_pcpis",)
#: the points only a straggler passes (docs/config.md, "Stragglers")
STRAGGLER_POINTS = (
    "after_straggle",
    "after_straggler_individual_pcpi",
    "after_straggler_succeeded",
    "after_straggler_rejoins",
)


class SimulatedCrash(BaseException):
    """Raised at an armed crash point in in-process tests."""

    def __init__(self, point: str) -> None:
        super().__init__(f"simulated crash at {point}")
        self.point = point


class UnknownCrashPoint(ValueError):
    pass


_lock = threading.Lock()
_counts: dict[str, int] = {}
_armed: tuple[str, int] | None = None
_fired = threading.Event()


_at_crash: list[Callable[[str], None]] = []


def at_crash(fn: Callable[[str], None]) -> Callable[[], None]:
    """Run ``fn(point)`` whenever an armed point fires (in-process or ``COALESCE_CRASH_AT``), in
    the firing thread, before it raises or kills the process.  Returns the function that removes it."""
    with _lock:
        _at_crash.append(fn)

    def remove() -> None:
        with _lock:
            if fn in _at_crash:
                _at_crash.remove(fn)

    return remove


def _dying(name: str) -> None:
    with _lock:
        hooks = list(_at_crash)
    for fn in hooks:
        fn(name)


def _parse(spec: str) -> tuple[str, int]:
    name, _, n = spec.partition(":")
    if name not in CRASH_POINTS:
        raise UnknownCrashPoint(f"unknown crash point {name!r}; known: {', '.join(CRASH_POINTS)}")
    if n and (not n.isdigit() or int(n) < 1):
        raise UnknownCrashPoint(f"crash point pass count {n!r} must be a positive integer ({spec!r})")
    return name, int(n or 1)


def arm(spec: str | None) -> None:
    """Arm one in-process crash point (``name[:n]``); None disarms.  Resets counters."""
    global _armed
    with _lock:
        _counts.clear()
        _fired.clear()
        _armed = _parse(spec) if spec else None


def run_armed(spec: str | None, step: Callable[[], object]) -> bool:
    """Run ``step`` with point ``spec`` (``name[:n]``) armed, and disarm it whatever happens.
    Returns True if the point fired (its :class:`SimulatedCrash` ended the step)."""
    arm(spec)
    try:
        step()
    except SimulatedCrash:
        return True
    finally:
        arm(None)
    return False


def fired() -> bool:
    """True once an armed point fired (workers check it to stop at once)."""
    return _fired.is_set()


def hit(name: str) -> None:
    """Pass crash point ``name``: crash here if it is the armed pass."""
    if name not in CRASH_POINTS:
        raise UnknownCrashPoint(name)
    env = os.environ.get("COALESCE_CRASH_AT")
    if _armed is None and not env:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        count = _counts[name]
    if env:
        target, n = _parse(env)
        if target == name and count == n:
            try:
                _dying(name)
            finally:
                os.kill(os.getpid(), signal.SIGKILL)
    if _armed is not None and _armed[0] == name and count == _armed[1]:
        _fired.set()
        try:
            _dying(name)
        finally:
            raise SimulatedCrash(name)
    if _fired.is_set():
        raise SimulatedCrash(name)


def through(records: Iterable[object], name: str) -> Iterator[object]:
    """Yield ``records``, passing crash point ``name`` after each one is consumed."""
    for rec in records:
        yield rec
        hit(name)


_local = threading.local()


@contextlib.contextmanager
def during(name: str) -> Iterator[None]:
    """Mark this thread as inside step ``name`` (e.g. mid_rollback) for :func:`current`."""
    if name not in CRASH_POINTS:
        raise UnknownCrashPoint(name)
    _local.point = name
    try:
        yield
    finally:
        _local.point = None


def current() -> str | None:
    """The record-level crash point of the step this thread is in, if any."""
    return getattr(_local, "point", None)
