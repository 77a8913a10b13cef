"""Events: what happened, fed to the planner.

Requests come from people or the clock (StartCycle, Tick, BreakMirror,
Resync, ReleaseKept, Reseed, AddReplica, RemoveReplica, Recover); results come from the executor after it ran an
effect (SourcePcpiTaken, PcpiTaken, TransferDone, ...) or while it waits for one (StragglerDue).
``now`` is always
passed in: the planner never reads a clock.
"""

from __future__ import annotations

from typing import Mapping, Union

import attrs

from coalesce_core.cycle.state import DEFAULT_SOURCE, by_source


@attrs.frozen
class StartCycle:
    """Start a cycle; ``destination_room``/``source_room``: how many more PCPIs each volume can
    take (its declared limit minus the PCPIs it holds; None: it declares no limit), ``source_room``
    the least room of the sources the cycle takes a PCPI of, and ``least_room_source`` the name of
    the source that has it (None: not known); ``due``: the names of the sources whose ``interval``
    has passed since their last PCPI (None: every source is due, as when no source sets an interval;
    docs/config.md, "Sources")."""

    now: float
    destination_room: int | None = None
    source_room: int | None = None
    due: frozenset[str] | None = None
    least_room_source: str | None = None


@attrs.frozen
class Tick:
    """The retry timer: start the retries that are due at ``now``."""

    now: float


@attrs.frozen
class AddReplica:
    """A replica joins the group: destination qtree ``name`` of qtree ``source_qtree`` of the
    source named ``origin``."""

    name: str
    source_qtree: str
    origin: str = DEFAULT_SOURCE


@attrs.frozen
class RemoveReplica:
    """``coalesce remove``: the replica leaves the group; its data stay on the destination."""

    replica: str


@attrs.frozen
class BreakMirror:
    replica: str


@attrs.frozen
class Resync:
    """``coalesce resync``: the broken replica returns to its last good image.  Unless ``discard``,
    the first attempt's scratch PCPI (its writes) is kept until :class:`ReleaseKept`;
    ``destination_room``: how many more PCPIs the destination can take (None: no limit)."""

    replica: str
    discard: bool = False
    destination_room: int | None = None


@attrs.frozen
class ReleaseKept:
    """``coalesce release``: delete the kept PCPI of ``replica`` (removed replicas included)."""

    replica: str


@attrs.frozen
class PinGeneration:
    """``coalesce pin GEN`` (``pinned``) / ``coalesce unpin GEN``: exempt the retained generation
    ``generation`` (as coalesce_core.cycle.refs.resolve reads it) from pruning, or no longer."""

    generation: str
    pinned: bool = True


@attrs.frozen
class Reseed:
    """Re-seed ``replica`` (``coalesce reseed``, the background verification):
    it leaves the cycle and its active FS is rebuilt by a baseline transfer."""

    replica: str
    reason: str


@attrs.frozen
class Recover:
    """Restart after a crash: what the volumes really hold now."""

    now: float
    destination_pcpis: frozenset[str]
    #: the PCPIs each source holds, by source name; a source that is absent could not be reached (or
    #: was not asked), so what it holds is not known (a set: see :func:`~coalesce_core.cycle.state.by_source`)
    source_pcpis: Mapping[str, frozenset[str]] = attrs.field(converter=by_source, hash=False)
    #: replicas in update whose spool holds change records of their running update
    spooled: frozenset[str] = frozenset()


@attrs.frozen
class StragglerDue:
    """The executor's clock says ``replica``'s update may be a straggler: it is still in flight at
    ``now`` (docs/decisions.md, "Stragglers leave the cycle").  The planner decides: it leaves the
    cycle only when ``now`` is at least ``GroupState.straggler_after`` past the cycle's start."""

    replica: str
    now: float


@attrs.frozen
class SourcePcpiTaken:
    """The source named ``source`` took PCPI ``name``."""

    name: str
    now: float = 0.0
    source: str = DEFAULT_SOURCE


@attrs.frozen
class SourcePcpiRefused:
    """The source named ``source`` could not be reached or refused to take PCPI ``name``."""

    name: str
    now: float = 0.0
    error: str = ""
    source: str = DEFAULT_SOURCE


@attrs.frozen
class SourcePcpiReleased:
    name: str
    source: str = DEFAULT_SOURCE


@attrs.frozen
class SourcePcpiNotReleased:
    """The source named ``source`` could not be reached to release PCPI ``name`` (a later cycle
    tries again)."""

    name: str
    error: str = ""
    source: str = DEFAULT_SOURCE


@attrs.frozen
class PcpiTaken:
    name: str
    now: float = 0.0


@attrs.frozen
class PcpiRefused:
    """The destination refused to take PCPI ``name`` (its PCPI limit, no space, an I/O error)."""

    name: str
    now: float = 0.0
    error: str = ""


@attrs.frozen
class PcpiReleased:
    name: str


@attrs.frozen
class TransferDone:
    """A baseline or update ended; ``ok`` False carries the error text."""

    replica: str
    ok: bool
    now: float = 0.0
    error: str = ""
    records: int = 0
    nbytes: int = 0


@attrs.frozen
class RollbackDone:
    """A rollback (in the cycle) or a retry/resync rollback (outside it) ended."""

    replica: str
    ok: bool
    now: float = 0.0
    error: str = ""


@attrs.frozen
class QtreeRemoved:
    replica: str


@attrs.frozen
class PurgatoryPurged:
    pass


@attrs.frozen
class Exported:
    """The export table was switched; ``jump`` echoes Export.jump."""

    jump: bool = False


Request = Union[
    StartCycle, Tick, AddReplica, RemoveReplica, BreakMirror, Resync, ReleaseKept, PinGeneration, Reseed, Recover
]
Result = Union[
    SourcePcpiTaken,
    SourcePcpiRefused,
    SourcePcpiReleased,
    SourcePcpiNotReleased,
    PcpiTaken,
    PcpiRefused,
    PcpiReleased,
    TransferDone,
    RollbackDone,
    QtreeRemoved,
    PurgatoryPurged,
    Exported,
    StragglerDue,
]
Event = Union[Request, Result]
