"""The observer that feeds the live views: what the agent reports, remembered as plain data.

:class:`Tracker` is a plugin (hookimpls of coalesce_core.backend.hookspecs)
that keeps an event log, the finished cycles and one :class:`TransferProgress`
per replica whose transfer or rollback is in flight.  It does no I/O; the
renderers of coalesce_core.ui.render draw what :meth:`Tracker.snapshot` returns.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import attrs

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.ui.formatting import duration


@attrs.define
class TransferProgress:
    """One replica's transfer or rollback in flight (or just finished), as the tracker saw it.

    Not coalesce_core.cycle.effects.Transfer (what the planner asks for): this
    is what the views draw.  Mutable, because the tracker counts into it under
    its lock; :meth:`Tracker.snapshot` hands out copies."""

    replica: str
    kind: str  # baseline | update | rollback | retry | reseed
    started: float
    expected: float | None = None  # seconds, when somebody knows (the demo does)
    total_records: int | None = None  # when the backend's diff offers a length hint
    records: int = 0
    nbytes: int = 0
    ended: float | None = None
    ok: bool | None = None

    def fraction(self, now: float) -> float | None:
        """Share done: records against the diff's length hint, else time against ``expected``
        (never 1 before the end); None when neither is known."""
        if self.ended is not None:
            return 1.0
        if self.total_records:
            return min(1.0, self.records / self.total_records)
        if self.expected:
            return min(0.99, (now - self.started) / self.expected)
        return None

    def remaining(self, now: float) -> float | None:
        """Seconds left (estimated), 0 once ended, None when unknown."""
        if self.ended is not None:
            return 0.0
        f = self.fraction(now)
        if self.expected and not self.total_records:
            return max(0.0, self.expected - (now - self.started))
        if f and f > 0:
            el = now - self.started
            return max(0.0, el / f - el)
        return None

    def rate(self, now: float) -> float:
        """Bytes per second so far."""
        el = (self.ended or now) - self.started
        return self.nbytes / el if el > 0 else 0.0


_KIND_OF = {"baseline": "baseline", "update": "update", "rollback": "rollback", "reseeding": "reseed"}


class Tracker:
    """Observer plugin feeding the live views: an event log and the transfers in flight.

    Thread-safe (progress arrives from the agent's worker threads).  It also
    wraps ``coalesce_diff`` to count the records and bytes each transfer
    carries, so the progress display works with every backend.
    ``replica_of`` maps (volume handle, qtree) to a replica name or None.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, log_size: int = 200) -> None:
        self.clock = clock
        self.t0 = clock()
        self.events: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=log_size)
        self.transfers: dict[str, TransferProgress] = {}
        self.expected: dict[str, float] = {}
        self.replica_of: Callable[[Any, str], str | None] = lambda volume, qtree: None
        self.chapter = ""
        self.cycles: collections.deque[Mapping[str, Any]] = collections.deque(maxlen=100)
        self.bytes_total = 0
        self.records_total = 0
        self._lock = threading.Lock()

    # -- feeding ---------------------------------------------------------------
    def log(self, text: str, style: str = "") -> None:
        with self._lock:
            self.events.append((self.clock() - self.t0, text, style))

    def expect(self, replica: str, seconds: float) -> None:
        """Say how long ``replica``'s next transfers take (the demo's throttle knows)."""
        with self._lock:
            self.expected[replica] = seconds
            t = self.transfers.get(replica)
            if t is not None and t.ended is None:
                t.expected = seconds

    def _count(self, replica: str, records: Iterable[Any]) -> Iterator[Any]:
        for rec in records:
            data = getattr(rec, "data", None)
            with self._lock:
                t = self.transfers.get(replica)
                if t is not None and t.ended is None:
                    t.records += 1
                    if isinstance(data, (bytes, bytearray)):
                        t.nbytes += len(data)
            yield rec

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume: Any, qtree: str, base: Any, target: Any):
        result = yield
        replica = self.replica_of(volume, qtree)
        if result is None or replica is None:
            return result
        try:
            import operator

            hint = operator.length_hint(result, 0)
        except Exception:
            hint = 0
        if hint:
            with self._lock:
                t = self.transfers.get(replica)
                if t is not None:
                    t.total_records = hint
        return self._count(replica, result)

    @hookimpl
    def coalesce_state_changed(self, group: str, replica: str, trigger: str, source: str, dest: str) -> None:
        now = self.clock()
        with self._lock:
            if trigger == "straggle":
                pass  # a straggler's transfer goes on outside the cycle: it ends with straggler_*
            elif dest in _KIND_OF:
                self.transfers[replica] = TransferProgress(
                    replica, _KIND_OF[dest], now, expected=self.expected.get(replica)
                )
            elif (source in _KIND_OF or source == "update_uncoalesced") and replica in self.transfers:
                t = self.transfers[replica]
                t.ended, t.ok = now, trigger.endswith("succeeded")
            elif trigger in ("retry_succeeded", "retry_failed"):
                self.transfers[replica] = TransferProgress(
                    replica, "retry", now, ended=now, ok=trigger == "retry_succeeded"
                )
        style = (
            "green"
            if dest == "stable"
            else ("red" if "failed" in trigger or dest in ("broken", "unstable_uncoalesced", "reseed_pending") else "")
        )
        self.log(f"{replica}: {source} → {dest} ({trigger})", style)

    @hookimpl
    def coalesce_phase_changed(self, group: str, trigger: str, source: str, dest: str) -> None:
        self.log(f"agent: {source} → {dest}", "bold")

    @hookimpl
    def coalesce_pcpi_taken(self, group: str, volume: str, name: str, role: str) -> None:
        self.log(f"PCPI taken    {name} ({role})", "blue")

    @hookimpl
    def coalesce_pcpi_released(self, group: str, volume: str, name: str) -> None:
        self.log(f"PCPI released {name}", "dim")

    @hookimpl
    def coalesce_transfer_progress(self, group: str, replica: str, records: int, nbytes: int) -> None:
        with self._lock:
            t = self.transfers.get(replica)
            if t is not None and t.ended is None:
                t.records = max(t.records, records)
                t.nbytes = max(t.nbytes, nbytes)

    @hookimpl
    def coalesce_cycle_finished(self, group: str, report: Mapping[str, Any]) -> None:
        with self._lock:
            self.cycles.append(dict(report))
            self.bytes_total += int(report.get("bytes") or 0)
            self.records_total += int(report.get("records") or 0)
        self.log(
            f"cycle {report.get('cycle')} finished in {duration(report.get('seconds'))}: slowest "
            f"{report.get('slowest') or '—'}, {len(report.get('pcpis_taken') or [])} PCPIs taken, "
            f"{len(report.get('pcpis_released') or [])} released, {report.get('failures', 0)} failures",
            "bold green" if not report.get("failures") else "bold yellow",
        )

    def reset_transfers(self) -> None:
        """Forget the transfers of earlier cycles (`coalesce run` calls it before each)."""
        with self._lock:
            self.transfers.clear()

    # -- reading -------------------------------------------------------------------
    def snapshot(self) -> tuple[list[tuple[float, str, str]], dict[str, TransferProgress]]:
        """Copies of the event log ``(seconds since start, text, style)`` and of the transfers, taken at once."""
        with self._lock:
            return list(self.events), {k: attrs.evolve(v) for k, v in self.transfers.items()}
