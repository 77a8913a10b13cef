"""The group's persisted state: frozen records, changed only with ``attrs.evolve``.

This is exactly what the ledger stores and what recovery reads back (the
patent's "metadata file" that retains "the current state of each qtree").
Nothing here does I/O.  ``GroupState.replicas`` and ``.pcpis`` are dicts
treated as immutable: every change builds a new dict (see ``with_replica``).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import attrs

from coalesce_core.cycle.generations import Manifest
from coalesce_core.retention import Policy

#: Characters allowed in group and replica names: they become parts of PCPI
#: names (btrfs, ZFS) and of directory names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

CYCLE_ROLES = ("base", "rollback", "jump_ahead", "new_base")
INDIVIDUAL = "individual"
#: a resync's first scratch PCPI, kept with the broken replica's writes until `coalesce release`
#: (docs/decisions.md, "Resync fences first"; I11 of spec/invariants.md)
KEPT = "kept"
#: Export-mapping value meaning "export the live active file system" (broken replicas).
ACTIVE = "@active"
#: an old coalesced base kept at a jump-ahead by the group's retention policy (docs/config.md,
#: "Retention"); pruned by that policy, never by the release step
GENERATION = "generation"
#: the name of a group's source when the config names none (``[group] source = URL``; docs/config.md,
#: "Sources"), and of the source of every replica and source PCPI a ledger written before sources had names holds
DEFAULT_SOURCE = "default"
ROLES = CYCLE_ROLES + (INDIVIDUAL, KEPT, GENERATION)


def by_source(held: Mapping[str, Iterable[str]] | Iterable[str] | None) -> dict[str, frozenset[str]]:
    """PCPI names by the name of the source that holds them: a mapping as it is; a plain set of names
    as those of the source DEFAULT_SOURCE (a group of the one source ``[group] source``); None as no
    source (none could be reached)."""
    if held is None:
        return {}
    if isinstance(held, Mapping):
        return {source: frozenset(names) for source, names in held.items()}
    return {DEFAULT_SOURCE: frozenset(held)}


def _name(_inst: object, attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(
            f"{attribute.name} {value!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
            f"and start with a letter or digit"
        )


@attrs.frozen
class Pcpi:
    """A destination PCPI the group accounts for.

    ``taken`` is False between the write-ahead record and the backend's
    confirmation; ``releasing`` is True from the decision to release it until
    the backend confirms.  ``owners`` are the replicas that pin it as their
    individual PCPI (outside the cycle).  ``pinned``: a person exempted this generation from
    pruning (`coalesce pin`; docs/config.md, "Retention").
    """

    name: str
    role: str = attrs.field(validator=attrs.validators.in_(ROLES))
    cycle: int = 0
    taken: bool = False
    releasing: bool = False
    owners: frozenset[str] = frozenset()
    taken_at: float = 0.0
    pinned: bool = False


@attrs.frozen
class SourcePcpi:
    """A source PCPI taken by the agent (released when no replica needs it).

    ``source`` is the name of the source volume that holds it (a ``[[source]]`` table).
    ``taken_at`` is when the agent took it (its clock): the age of the image a
    replica exports is measured from the ``taken_at`` of its source point (lag).
    """

    name: str
    cycle: int = 0
    taken: bool = False
    releasing: bool = False
    taken_at: float = 0.0
    source: str = attrs.field(default=DEFAULT_SOURCE, validator=_name)


@attrs.frozen
class Replica:
    """One replica (destination qtree ``name``) of source qtree ``source_qtree`` of the source
    volume named ``origin`` (its ``[[replica]] from``).

    exported      what readers see: a PCPI name, ACTIVE (broken) or None
    source_point  the source PCPI whose image is exported (I3, I5)
    active_point  the source PCPI whose image the active FS holds when it is
                  complete (stable, done, stable_uncoalesced, done_uncoalesced)
    target        the source PCPI of the running transfer (a straggler's too)
    last_good     outside the cycle: the PCPI pinned as its last good image
    scratch       outside the cycle: a PCPI of the damaged active FS that a
                  retry (or resync) rolls back from
    resume        a restart interrupted its update and the spool holds what
                  had arrived: after its rollback the update restarts in the
                  same cycle (resume_update) from the spool
    retries, next_retry
                  outside the cycle: failed rollback retries (loop 1026) or
                  failed re-seeds so far, and when the next one is due
    last_error    the last failure (update, baseline, re-seed, rollback,
                  retry), kept until a later transfer of the replica succeeds
    consecutive_failures
                  transfers (updates, baselines, re-seeds) failed in a row since
                  the last one that succeeded, cycles it missed included; at
                  [group] reseed_after failed updates the replica is re-seeded
    outages       of those, the cycles it missed because the source could not be
                  reached or refused the cycle's PCPI, or a cycle did not start
                  for want of PCPIs: they do not count towards reseed_after (a
                  re-seed cannot bring a source back)
    last_success  when the last transfer of the replica succeeded (0: never)
    reseed_reason why the replica is being re-seeded (reseed_pending, reseeding,
                  reseeded); empty otherwise
    keep          a resync that keeps the broken replica's writes has not taken
                  its kept PCPI yet: the next attempt's scratch is that PCPI
    """

    name: str = attrs.field(validator=_name)
    source_qtree: str = attrs.field(validator=_name)
    origin: str = attrs.field(default=DEFAULT_SOURCE, validator=_name)
    state: str = "uninitialized"
    exported: str | None = None
    source_point: str | None = None
    active_point: str | None = None
    target: str | None = None
    last_good: str | None = None
    scratch: str | None = None
    retries: int = 0
    next_retry: float = 0.0
    last_error: str = ""
    records: int = 0
    nbytes: int = 0
    resume: bool = False
    consecutive_failures: int = 0
    outages: int = 0
    last_success: float = 0.0
    reseed_reason: str = ""
    keep: bool = False

    def pinned(self) -> tuple[str, ...]:
        """Destination PCPIs this replica needs kept."""
        return tuple(p for p in (self.exported, self.last_good, self.scratch) if p and p != ACTIVE)


@attrs.frozen
class RetryPolicy:
    """Exponential backoff of the periodic rollback retry (loop 1026)."""

    initial: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    factor: float = attrs.field(default=2.0, validator=attrs.validators.ge(1))
    maximum: float = attrs.field(default=3600.0, validator=attrs.validators.ge(0))

    def delay(self, retries: int) -> float:
        """Seconds to wait before retry number ``retries + 1``."""
        return min(self.maximum, self.initial * self.factor ** max(0, retries))


@attrs.frozen(hash=False)
class GroupState:
    """Everything the management agent knows, persisted write-ahead."""

    name: str = attrs.field(validator=_name)
    phase: str = "idle"
    cycle: int = 0
    seq: int = 0
    replicas: Mapping[str, Replica] = attrs.field(factory=dict)
    pcpis: Mapping[str, Pcpi] = attrs.field(factory=dict)
    source_pcpis: Mapping[str, SourcePcpi] = attrs.field(factory=dict)
    #: the source PCPI of the running cycle, per source name (empty between cycles)
    cycle_targets: Mapping[str, str] = attrs.field(factory=dict)
    #: per source name, when the cycle that took the source's last PCPI started: a source with an
    #: ``interval`` is due again that long after it (docs/config.md, "Sources"; none: due now)
    source_taken: Mapping[str, float] = attrs.field(factory=dict)
    transfers_started: bool = False
    purged: bool = False
    retry: RetryPolicy = RetryPolicy()
    cycle_started: float = 0.0
    cycle_failures: int = 0
    #: re-seed a replica after this many failed updates in a row (0: never); [group] reseed_after
    reseed_after: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    #: seconds after the cycle's start past which an update still in flight leaves the cycle
    #: (update_uncoalesced; None: the cycle waits for every update); [group] straggler_after
    straggler_after: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    #: which old coalesced bases to keep as generations ([retention]; the default keeps none)
    retention: Policy = Policy()
    #: destination PCPI name -> what the coalesced image holds per replica (the base's and each
    #: generation's), written with the jump-ahead that exports it (coalesce_core/cycle/generations.py)
    manifests: Mapping[str, Manifest] = attrs.field(factory=dict)

    # -- queries ----------------------------------------------------------
    def base(self) -> Pcpi | None:
        """The coalesced base PCPI (at most one)."""
        for p in self.pcpis.values():
            if p.role == "base" and not p.releasing:
                return p
        return None

    def pcpi_of_role(self, role: str) -> Pcpi | None:
        for p in self.pcpis.values():
            if p.role == role and not p.releasing:
                return p
        return None

    def in_state(self, *states: str) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state in states]

    def generations(self) -> list[Pcpi]:
        """The retained generations not being released, oldest first."""
        return sorted(
            (p for p in self.pcpis.values() if p.role == GENERATION and not p.releasing), key=lambda p: p.name
        )

    def kept_pcpi(self, replica: str) -> Pcpi | None:
        """The kept PCPI holding the writes ``replica`` had when it was resynced (at most one, I11)."""
        for p in sorted(self.pcpis.values(), key=lambda p: p.name):
            if p.role == KEPT and replica in p.owners and not p.releasing:
                return p
        return None

    # -- builders (pure) ----------------------------------------------------
    def with_replica(self, replica: Replica) -> "GroupState":
        replicas = dict(self.replicas)
        replicas[replica.name] = replica
        return attrs.evolve(self, replicas=replicas)

    def with_replicas(self, changed: Iterable[Replica]) -> "GroupState":
        replicas = dict(self.replicas)
        for r in changed:
            replicas[r.name] = r
        return attrs.evolve(self, replicas=replicas)

    def with_pcpi(self, pcpi: Pcpi) -> "GroupState":
        pcpis = dict(self.pcpis)
        pcpis[pcpi.name] = pcpi
        return attrs.evolve(self, pcpis=pcpis)

    def without_pcpi(self, name: str) -> "GroupState":
        pcpis = dict(self.pcpis)
        pcpis.pop(name, None)
        return attrs.evolve(self, pcpis=pcpis)

    def with_source_pcpi(self, sp: SourcePcpi) -> "GroupState":
        sps = dict(self.source_pcpis)
        sps[sp.name] = sp
        return attrs.evolve(self, source_pcpis=sps)

    def without_source_pcpi(self, name: str) -> "GroupState":
        sps = dict(self.source_pcpis)
        sps.pop(name, None)
        return attrs.evolve(self, source_pcpis=sps)

    def source_point_time(self, replica: Replica) -> float | None:
        """When the source PCPI whose image ``replica`` exports was taken (None: unknown)."""
        sp = self.source_pcpis.get(replica.source_point or "")
        return sp.taken_at if sp is not None and sp.taken_at else None

    def lag(self, replica: Replica, now: float) -> float | None:
        """Age at ``now`` of the image ``replica`` exports (None: no image, or its time is unknown)."""
        taken = self.source_point_time(replica)
        return max(0.0, now - taken) if taken is not None else None

    def state_counts(self) -> dict[str, int]:
        """How many replicas sit in each state (a cycle's history row, the live counts of `coalesce graph`)."""
        out: dict[str, int] = {}
        for r in self.replicas.values():
            out[r.state] = out.get(r.state, 0) + 1
        return out

    def export_table(self) -> dict[str, str | None]:
        """The whole export mapping (replica -> PCPI | ACTIVE | None)."""
        return {r.name: r.exported for r in self.replicas.values()}
