"""Events: what happened, fed to the planner.

Requests come from people or the clock (StartCycle, Tick, BreakMirror,
Resync, Reseed, AddReplica, Recover); results come from the executor after it ran an
effect (SourcePcpiTaken, PcpiTaken, TransferDone, ...).  ``now`` is always
passed in: the planner never reads a clock.
"""

from __future__ import annotations

from typing import Union

import attrs


@attrs.frozen
class StartCycle:
    now: float


@attrs.frozen
class Tick:
    """The retry timer: start the retries that are due at ``now``."""

    now: float


@attrs.frozen
class AddReplica:
    name: str
    source_qtree: str


@attrs.frozen
class BreakMirror:
    replica: str


@attrs.frozen
class Resync:
    replica: str


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
    source_pcpis: frozenset[str]
    #: replicas in update whose spool holds change records of their running update
    spooled: frozenset[str] = frozenset()


@attrs.frozen
class SourcePcpiTaken:
    name: str
    now: float = 0.0


@attrs.frozen
class SourcePcpiReleased:
    name: str


@attrs.frozen
class PcpiTaken:
    name: str
    now: float = 0.0


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


Request = Union[StartCycle, Tick, AddReplica, BreakMirror, Resync, Reseed, Recover]
Result = Union[
    SourcePcpiTaken,
    SourcePcpiReleased,
    PcpiTaken,
    PcpiReleased,
    TransferDone,
    RollbackDone,
    QtreeRemoved,
    PurgatoryPurged,
    Exported,
]
Event = Union[Request, Result]
