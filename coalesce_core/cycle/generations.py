"""Retained coalesced generations: what each coalesced image holds (its manifest), and which to prune.

A jump-ahead exports ONE new coalesced base for every participant; the facts about that image are
known at that instant only (each replica's source point and its source, and whether its update of this cycle
succeeded), so the planner records a :class:`Manifest` for the new base in the same decision as the
export switch (write-ahead: the ledger holds it before readers see the image). When a retention
policy keeps anything, the next jump-ahead turns that base into a *generation* instead of releasing
it, manifest and all (docs/config.md, "Retention"); :func:`prune` then says, through
:func:`coalesce_core.retention.plan`, which generations to release. A manifest lives as long as its
PCPI is recorded. Pure: no clock (``now`` is an argument), no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

import attrs

import coalesce_core.retention as retention

if TYPE_CHECKING:
    from coalesce_core.cycle.state import GroupState, Pcpi, Replica

#: the replica's update of the image's cycle succeeded: the image holds the cycle's source PCPI
UPDATED = "updated"
#: it succeeded and carried no change (the image equals the replica's previous one, at a newer point)
UNCHANGED = "unchanged"
#: in the cycle, but its update failed (rolled back) or it rejoined with an older image: an old point
STALE = "stale"
#: outside the cycle (uncoalesced, individual PCPI, broken, no image): the image holds no point of it
OUTSIDE = "outside"
STATUSES = (UPDATED, UNCHANGED, STALE, OUTSIDE)

#: the source of an entry recorded before manifests named sources: the name a group's only source has
#: when the config names none (coalesce_core.cycle.state.DEFAULT_SOURCE, which imports this module)
DEFAULT_ORIGIN = "default"


@attrs.frozen
class Entry:
    """One replica in a coalesced image: ``status`` (one of :data:`STATUSES`) and the source PCPI
    whose image of its qtree the coalesced image holds, with when it was taken (None, 0: none), and
    the name of the source the replica comes from (``Replica.origin``, its ``[[replica]] from``): with
    several sources a source PCPI's name alone does not say whose it is."""

    replica: str
    status: str = attrs.field(validator=attrs.validators.in_(STATUSES))
    source_point: str | None = None
    source_time: float = 0.0
    origin: str = DEFAULT_ORIGIN


@attrs.frozen
class Manifest:
    """What coalesced image ``pcpi`` (made in ``cycle`` at ``time``, epoch seconds) holds per replica."""

    pcpi: str
    cycle: int
    time: float
    entries: tuple[Entry, ...] = ()

    @property
    def fresh(self) -> int:
        """Replicas whose update of the image's cycle succeeded (updated or unchanged)."""
        return sum(1 for e in self.entries if e.status in (UPDATED, UNCHANGED))

    def counts(self) -> dict[str, int]:
        """How many replicas have each status (every status present, 0 included)."""
        return {s: sum(1 for e in self.entries if e.status == s) for s in STATUSES}

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=True)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Manifest":
        """The manifest :meth:`to_json` wrote; an entry written before manifests named sources has no
        ``origin`` and reads as :data:`DEFAULT_ORIGIN`."""
        entries = tuple(Entry(**e) for e in raw.get("entries", ()))
        return cls(pcpi=raw["pcpi"], cycle=raw["cycle"], time=raw["time"], entries=entries)


def status_at_jump(state: str, participant: bool, had_image: bool, moved: bool, records: int) -> str:
    """The manifest status of a replica in ``state`` at the jump-ahead that exports a new base
    (``moved``: its active FS holds another source point than the image it exported).

    A participant in ``done`` that moved updated in this cycle (``unchanged`` when its update
    carried no change: the destination applied no record); one that did not was rolled back after
    its update failed (Fig. 9); ``reseeded`` and ``done_uncoalesced`` bring a newer image; the other
    participants (``stable_uncoalesced``: rejoining with its last good image) hold an old point;
    the rest are outside the cycle.

    post: implies(not participant, __return__ == "outside")
    post: implies(participant and state == "done" and had_image and not moved, __return__ == "stale")
    post: __return__ in ("updated", "unchanged", "stale", "outside")
    """
    if not participant:
        return OUTSIDE
    if state == "done":
        if had_image and not moved:
            return STALE
        return UNCHANGED if had_image and records == 0 else UPDATED
    if state in ("reseeded", "done_uncoalesced"):
        return UPDATED
    return STALE


def manifest_at_jump(state: GroupState, pcpi: str, now: float, participants: Iterable[Replica]) -> Manifest:
    """The manifest of new base ``pcpi`` taken at ``now``, from ``state`` just before the switch
    (``participants``: the replicas that jump to it)."""
    jumping = {r.name for r in participants}
    entries = []
    for r in sorted(state.replicas.values(), key=lambda r: r.name):
        had = r.source_point is not None
        status = status_at_jump(r.state, r.name in jumping, had, r.active_point != r.source_point, r.records)
        point = None if status == OUTSIDE else (r.active_point if status in (UPDATED, UNCHANGED) else r.source_point)
        sp = state.source_pcpis.get(point or "")
        entries.append(Entry(r.name, status, point, sp.taken_at if sp is not None else 0.0, origin=r.origin))
    return Manifest(pcpi=pcpi, cycle=state.cycle, time=now, entries=tuple(entries))


def unknown_manifest(pcpi: str, cycle: int, now: float) -> Manifest:
    """The manifest of a base made before manifests were kept: its time is when it became a
    generation, and what it holds per replica is not known (no entries)."""
    return Manifest(pcpi=pcpi, cycle=cycle, time=now)


def image_time(manifests: Mapping[str, Manifest], pcpi: Pcpi) -> float:
    """When coalesced image ``pcpi`` was taken: its manifest's time, else when its PCPI was (a base
    made before manifests were recorded)."""
    m = manifests.get(pcpi.name)
    return m.time if m is not None else pcpi.taken_at


def as_retained(state: GroupState) -> list[retention.Generation]:
    """The group's generations as the retention policy sees them, ``fresh`` counted from each manifest
    (:attr:`Manifest.fresh`, 0 for a base made before manifests) whatever the policy: the count a plan's
    reasons show is the one `coalesce generations` shows (updated + unchanged), never a 0 that means
    "not counted" (docs/config.md, "Retention"); one that some replica pins (it
    exports it, or keeps it as its last good image) is ``exported``, one a person pinned
    (`coalesce pin`) ``pinned``: neither is ever pruned. ``seq`` is the order the images were made
    (``state.generations()`` is in the ledger's sequence), which a clock stepped back between two
    images does not change."""
    pinned = {name for r in state.replicas.values() for name in r.pinned()}
    out = []
    for seq, p in enumerate(state.generations()):
        m = state.manifests.get(p.name)
        fresh = m.fresh if m is not None else 0
        time = image_time(state.manifests, p)
        out.append(
            retention.Generation(id=p.name, time=time, fresh=fresh, pinned=p.pinned, exported=p.name in pinned, seq=seq)
        )
    return out


def prune(state: GroupState, now: float) -> retention.Plan:
    """Keep or prune each generation of ``state`` at ``now`` under its policy (``state.retention``)."""
    return retention.plan(as_retained(state), now, state.retention)
