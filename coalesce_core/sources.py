"""How each source of a group looks (pure): the last cycle's record of it, and its health as `status`
and the metrics show it (docs/config.md, "Sources"; docs/cli.md, "status --json").

A source's record (:class:`Seen`) says whether the last cycle that asked it for its PCPI got one
(``reachable``) or the error that stopped it. The agent keeps the records in the ledger's advisory
note ``sources`` (coalesce_core/ledger.py, NOTES), written with the cycle's history row, not
write-ahead: a record lost in a crash, or one that cannot be read, is no record (reachable unknown)
and never holds a cycle back.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import attrs

from coalesce_core.cycle.state import GroupState


@attrs.frozen
class Seen:
    """The last cycle's record of one source: when (the agent's clock), whether its PCPI was taken,
    and the error that stopped it (None when none)."""

    at: float
    reachable: bool
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "reachable": self.reachable, "error": self.error}


def seen_from_note(raw: object) -> dict[str, Seen]:
    """The records of the note ``sources`` as the ledger holds it; whatever of it cannot be read is
    dropped (an absent or damaged note is no record, never an error)."""
    out: dict[str, Seen] = {}
    if not isinstance(raw, Mapping):
        return out
    for name, rec in raw.items():
        if not isinstance(name, str) or not isinstance(rec, Mapping):
            continue
        at, reachable, error = rec.get("at"), rec.get("reachable"), rec.get("error")
        if (
            isinstance(at, (int, float))
            and not isinstance(at, bool)
            and isinstance(reachable, bool)
            and (error is None or isinstance(error, str))
        ):
            out[name] = Seen(at=float(at), reachable=reachable, error=error)
    return out


def seen_to_note(old: object, new: Mapping[str, Seen]) -> dict[str, Any]:
    """The note ``sources`` after a cycle: the readable records of ``old`` with those of ``new`` over
    them (a source the cycle did not ask keeps its earlier record)."""
    merged = {**seen_from_note(old), **new}
    return {name: rec.to_json() for name, rec in sorted(merged.items())}


@attrs.frozen
class SourceHealth:
    """One source as `status` and the metrics show it (the fields of `status --json` ``sources``)."""

    name: str
    #: its replicas, by name
    replicas: tuple[str, ...]
    #: its newest source PCPI the group holds, and when the agent took it
    last_pcpi: str | None
    last_pcpi_time: float | None
    #: its own ``interval`` in seconds (None: due every cycle), and when it is next due (None: now)
    interval: float | None
    next_due: float | None
    #: whether a cycle at ``now`` takes its PCPI (None: ``now`` not given)
    due: bool | None
    #: whether the last cycle that asked it took its PCPI (None: no record)
    reachable: bool | None
    #: the error that stopped it in that cycle (None: none)
    last_error: str | None
    #: when that record was made (None: no record)
    seen_at: float | None
    #: the age of the oldest source point its replicas export (None: none exports one of known time)
    lag_seconds: float | None
    #: every source PCPI the ledger records on it
    pcpis: tuple[str, ...] = ()
    #: its [[source]] table was removed while the ledger still records PCPIs on it: they wait until
    #: the table is back (docs/config.md, "Removing a source")
    removed: bool = False

    def data(self) -> dict[str, Any]:
        """The JSON object (docs/schemas/status.schema.json, ``sources``)."""
        return {**attrs.asdict(self), "replicas": list(self.replicas), "pcpis": list(self.pcpis)}


def source_health(
    state: GroupState,
    intervals: Mapping[str, float | None] | None,
    seen: Mapping[str, Seen] | None = None,
    now: float | None = None,
) -> list[SourceHealth]:
    """Each source of ``intervals`` (name -> its ``interval``, in the config's order; None: the sources
    the replicas come from, due every cycle), then each source a replica comes from that the config
    no longer names, then, marked ``removed``, each source the config no longer names on which the
    ledger still records PCPIs (docs/config.md, "Removing a source"); ``seen`` the last cycle's
    records; ``now`` gives ``due`` and the lag."""
    order: dict[str, float | None] = dict(intervals) if intervals is not None else {}
    for origin in sorted({r.origin for r in state.replicas.values()}):
        order.setdefault(origin, None)
    if intervals is not None:
        for name in sorted({sp.source for sp in state.source_pcpis.values()}):
            order.setdefault(name, None)
    records = seen or {}
    return [
        attrs.evolve(
            _one(state, name, interval, records.get(name), now),
            removed=intervals is not None and name not in intervals,
        )
        for name, interval in order.items()
    ]


def _one(state: GroupState, name: str, interval: float | None, rec: Seen | None, now: float | None) -> SourceHealth:
    held = sorted(n for n, sp in state.source_pcpis.items() if sp.source == name and sp.taken)
    last = state.source_pcpis[held[-1]] if held else None
    started = state.source_taken.get(name)
    next_due = started + interval if interval is not None and started is not None else None
    mine = sorted((r for r in state.replicas.values() if r.origin == name), key=lambda r: r.name)
    return SourceHealth(
        name=name,
        replicas=tuple(r.name for r in mine),
        last_pcpi=last.name if last is not None else None,
        last_pcpi_time=last.taken_at if last is not None and last.taken_at else None,
        interval=interval,
        next_due=next_due,
        due=None if now is None else (next_due is None or now >= next_due),
        reachable=rec.reachable if rec is not None else None,
        last_error=rec.error if rec is not None else None,
        seen_at=rec.at if rec is not None else None,
        lag_seconds=_oldest(state, mine, now),
        pcpis=tuple(sorted(n for n, sp in state.source_pcpis.items() if sp.source == name)),
    )


def _oldest(state: GroupState, replicas: Iterable[Any], now: float | None) -> float | None:
    if now is None:
        return None
    lags = [lag for r in replicas if (lag := state.lag(r, now)) is not None]
    return round(max(lags), 3) if lags else None
