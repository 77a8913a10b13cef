"""Effects: what the planner wants done, as plain data.

The executor (coalesce_core.agent) runs each one through the backend hooks
and answers with the matching result event.  Every effect is safe to run
again after a crash because every backend primitive is idempotent.
"""

from __future__ import annotations

from typing import Mapping, Union

import attrs

from coalesce_core.cycle.state import DEFAULT_SOURCE


@attrs.frozen
class TakeSourcePcpi:
    """Take PCPI ``name`` of the source volume named ``source``."""

    name: str
    source: str = DEFAULT_SOURCE


@attrs.frozen
class ReleaseSourcePcpi:
    """Release PCPI ``name`` of the source volume named ``source``."""

    name: str
    source: str = DEFAULT_SOURCE


@attrs.frozen
class TakePcpi:
    """Take a destination PCPI of the whole volume in ``role``."""

    name: str
    role: str


@attrs.frozen
class ReleasePcpi:
    name: str


@attrs.frozen
class Transfer:
    """Baseline (``base`` None) or incremental update of replica from the source named ``origin``."""

    replica: str
    source_qtree: str
    base: str | None
    target: str
    #: replay the replica's spool first, then ask the source for the records after it
    resume: bool = False
    #: a re-seed: a baseline (``base`` None) into a replica outside the cycle
    reseed: bool = False
    origin: str = DEFAULT_SOURCE


@attrs.frozen
class Rollback:
    """Fig. 9 for one replica: make its qtree equal ``to_pcpi`` again, given the
    active FS equalled ``from_pcpi`` when that was taken.  ``retry`` marks the
    periodic retry / resync of a replica outside the cycle."""

    replica: str
    from_pcpi: str
    to_pcpi: str
    retry: bool = False


@attrs.frozen
class RemoveQtree:
    replica: str


@attrs.frozen
class PurgePurgatory:
    qtrees: tuple[str, ...]


@attrs.frozen(hash=False)
class Export:
    """Switch the whole export table at once (one atomic backend call).

    ``jump`` marks the switch of a jump-ahead (branch 1032), as opposed to a
    re-export after a break, a resync, a retry or a recovery."""

    mapping: Mapping[str, str | None]
    jump: bool = False


Effect = Union[
    TakeSourcePcpi,
    ReleaseSourcePcpi,
    TakePcpi,
    ReleasePcpi,
    Transfer,
    Rollback,
    RemoveQtree,
    PurgePurgatory,
    Export,
]

#: Effects the executor runs concurrently in its worker pool.
CONCURRENT = (Transfer, Rollback)
