"""A ledger behind its volumes: what recovery makes of it before the usual ``Recover``.

Two ways a ledger can name PCPIs that are gone (docs/operations.md, "Backing up the ledger"):

* it is **older** than the volumes: they hold PCPIs of the group numbered past the ledger's
  last number (``GroupState.seq``): the ledger was restored from a backup taken cycles ago.
  Nothing it says about a replica's images can be trusted;
* it is current, but PCPIs it records were **removed** outside coalesce.

:func:`reconcile` turns such a ledger into one that matches the volumes, deciding only from
evidence the executor gathered (coalesce_core/restorer.py): for each replica, the PCPI the
destination exports for it now, the source PCPI that image equals, and the source PCPI its
active FS equals (:class:`Proof`, by fingerprints).  Never exports an image that is not
proven equal to a source PCPI:

* a replica whose image is proven keeps exporting it, with that source point; it stays
  ``stable`` (or outside the cycle, where it was) when its active FS is proven too, else it
  leaves the cycle to be re-seeded, still exporting the proven image (pinned);
* a replica with no proven image is re-seeded and exports nothing until its re-seed joins;
* the PCPIs and source PCPIs the ledger records become exactly those the replicas pin (the
  most exported proven image becomes the coalesced base; each source PCPI is recorded with the
  source that holds it), so the ``Recover`` that follows
  re-applies the export table and only then releases what nobody pins; the sequence number
  moves past every name the volumes hold, so no name is ever taken twice.

It changes the ledger only (no effects) and says what it did, a line per replica.  Every
replica state change is a transition of the spec (I8).
"""

# crosshair: on

from __future__ import annotations

import re
from typing import Iterable, Mapping

import attrs

from coalesce_core.cycle.machines import default_model
from coalesce_core.cycle.planner import (
    Decision,
    _Plan,
    is_group_pcpi,
    is_group_source_pcpi,
    needed_pcpis,
    needed_source_pcpis,
)
from coalesce_core.cycle.state import (
    ACTIVE,
    GENERATION,
    KEPT,
    GroupState,
    Pcpi,
    Replica,
    SourcePcpi,
    by_source,
)


@attrs.frozen
class Proof:
    """What the volumes hold for one replica, compared by fingerprints.

    image   the group PCPI the destination exports for it now (None: none it holds)
    point   a source PCPI whose qtree equals ``image`` (None: none found)
    active  a source PCPI whose qtree equals the replica's active FS (None: none found)
    """

    replica: str
    image: str | None = None
    point: str | None = None
    active: str | None = None

    @property
    def proven(self) -> bool:
        return self.image is not None and self.point is not None


@attrs.frozen
class Facts:
    """The evidence :func:`reconcile` decides from (the executor gathers it)."""

    destination_pcpis: frozenset[str]
    #: the group's PCPIs each source holds, by source name (a set: see
    #: :func:`~coalesce_core.cycle.state.by_source`)
    source_pcpis: Mapping[str, frozenset[str]] = attrs.field(converter=by_source, hash=False)
    #: the export table the destination serves now, as (replica, value) pairs
    exported: tuple[tuple[str, str | None], ...] = ()
    proofs: tuple[Proof, ...] = ()


@attrs.frozen
class Examination:
    """How far the ledger is behind its volumes."""

    #: the highest PCPI number among the group's PCPIs on both volumes
    newest: int
    #: the volumes hold a PCPI numbered past the ledger's last: the ledger is older than they are
    stale: bool
    #: destination PCPIs the ledger records as taken that the destination does not hold
    lost: frozenset[str]

    @property
    def needed(self) -> bool:
        return self.stale or bool(self.lost)


#: a kept PCPI's name (coalesce_core.cycle.planner.kept_name): the replica whose writes it holds
_KEPT = re.compile(r"co-.+-\d{6}-kept-([A-Za-z0-9_.-]+)")
_NUMBER = re.compile(r"-(\d{6})(?:-|$)")


def number(name: str) -> int:
    """The sequence number in a PCPI name the planner made (``co-g-000012-base``: 12; -1: none)."""
    m = _NUMBER.search(name)
    return int(m.group(1)) if m else -1


def examine(
    state: GroupState,
    destination_pcpis: frozenset[str],
    source_pcpis: Mapping[str, Iterable[str]] | Iterable[str],
) -> Examination:
    """Compare the ledger with the group's PCPIs that the volumes hold (reads nothing else);
    ``source_pcpis``: those of each source (:func:`~coalesce_core.cycle.state.by_source`)."""
    group = state.name
    ours = [n for n in destination_pcpis if is_group_pcpi(group, n)]
    ours += [n for names in by_source(source_pcpis).values() for n in names if is_group_source_pcpi(group, n)]
    newest = max((number(n) for n in ours), default=-1)
    lost = frozenset(n for n, p in state.pcpis.items() if p.taken and not p.releasing and n not in destination_pcpis)
    return Examination(newest=newest, stale=newest > state.seq, lost=lost)


#: legal ways (spec/coalescing.toml) from each state out of the cycle, to reseed_pending (a
#: broken replica whose destination no longer exports its active FS was resynced by a later agent)
_TO_RESEED: Mapping[str, tuple[str, ...]] = {
    "stable": ("request_reseed",),
    "done": ("request_reseed",),
    "stable_uncoalesced": ("request_reseed",),
    "unstable_uncoalesced": ("request_reseed",),
    "update": ("update_failed", "rollback_failed", "request_reseed"),
    "rollback": ("rollback_failed", "request_reseed"),
    "reseeding": ("reseed_failed",),
    # a straggler's update was running: its active FS is partial
    "update_uncoalesced": ("straggler_failed", "request_reseed"),
    # its active FS is of no known point: the only way out of reseeded is the jump-ahead edge, and the
    # replica goes on at once to be re-seeded, so it never exports that active FS
    "reseeded": ("jump_ahead", "request_reseed"),
    # its complete update waits for a jump-ahead (the destination refused one): the same only way out
    "done_uncoalesced": ("jump_ahead", "request_reseed"),
    "broken": ("resync", "request_reseed"),
    "reseed_pending": (),
}


def replica_action(state: str, proven: bool, active_proven: bool, on_base: bool, still_broken: bool) -> str:
    """What restoring an older ledger does with a replica the ledger has in ``state``.

    ``proven``: the destination exports an image for it that equals a source PCPI; ``active_proven``:
    its active FS equals a source PCPI (for ``stable`` and ``stable_uncoalesced``: the same one, the
    image's); ``on_base``: that image is the chosen coalesced base; ``still_broken``: the destination
    still exports its active FS.  "keep" its state (with the proven image), "reseed" it (with the
    proven image, or none), "baseline_again" (a baseline: start over), or "untouched".

    post: implies(state in ("uninitialized", "removed"), __return__ == "untouched")
    post: implies(state == "baseline", __return__ == "baseline_again")
    post: implies(__return__ == "keep", proven or state == "reseed_pending" or state == "broken")
    post: implies(state == "stable" and __return__ == "keep", proven and active_proven and on_base)
    post: implies(state in ("update", "rollback", "done", "done_uncoalesced", "reseeding", "update_uncoalesced"), __return__ == "reseed")
    """
    if state in ("uninitialized", "removed"):
        # removed: never held by a ledger (the record leaves it in the transaction of the transition)
        return "untouched"
    if state == "baseline":
        return "baseline_again"
    if state == "broken":
        return "keep" if still_broken else "reseed"
    if state == "stable":
        return "keep" if proven and active_proven and on_base else "reseed"
    if state in ("stable_uncoalesced", "reseeded"):
        return "keep" if proven and active_proven else "reseed"
    if state == "unstable_uncoalesced":
        return "keep" if proven else "reseed"
    if state == "reseed_pending":
        return "keep"
    return "reseed"


def takes_proof(r: Replica) -> bool:
    """Whether restoring an older ledger uses the evidence of what the volumes hold for ``r``:
    not for a replica with no image yet (uninitialized, or in its baseline)."""
    return r.state not in ("uninitialized", "baseline")


def choose_base(proofs: Mapping[str, Proof]) -> str | None:
    """The proven image most replicas export (ties: the newest); it becomes the coalesced base."""
    counts: dict[str, int] = {}
    for pr in proofs.values():
        if pr.proven:
            assert pr.image is not None
            counts[pr.image] = counts.get(pr.image, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda n: (counts[n], number(n), n))


def reconcile(state: GroupState, facts: Facts) -> tuple[Decision, list[str]]:
    """The ledger made to match the volumes (see the module docstring), and what was done, in words."""
    p = _Plan(state, default_model())
    ex = examine(state, facts.destination_pcpis, facts.source_pcpis)
    notes: list[str] = []
    if not ex.needed:
        return p.decision(), notes
    if ex.newest > state.seq:
        p.set(seq=ex.newest)
    if ex.stale:
        _older(p, facts, ex, notes)
    else:
        _removed(p, ex, notes)
    return p.decision(), notes


def _older(p: _Plan, facts: Facts, ex: Examination, notes: list[str]) -> None:
    state = p.base_state
    notes.append(
        f"the ledger is older than its volumes: they hold PCPIs of group {state.name!r} up to number "
        f"{ex.newest}, the ledger's last is {state.seq} (a ledger restored from a backup?); each replica "
        "was compared with what the volumes hold"
    )
    proofs = {pr.replica: pr for pr in facts.proofs}
    base = choose_base({n: pr for n, pr in proofs.items() if n in state.replicas and takes_proof(state.replicas[n])})
    exported_now = dict(facts.exported)
    reason = "the ledger was older than the volumes"
    for r in sorted(state.replicas.values(), key=lambda r: r.name):
        pr = proofs.get(r.name, Proof(r.name))
        same_point = pr.active is not None and pr.active == pr.point
        action = replica_action(
            r.state,
            pr.proven,
            same_point if r.state in ("stable", "stable_uncoalesced") else pr.active is not None,
            pr.image == base,
            exported_now.get(r.name) == ACTIVE,
        )
        image = pr.image if pr.proven else None
        point = pr.point if pr.proven else None
        if action == "untouched":
            if exported_now.get(r.name) is not None:
                notes.append(
                    f"replica {r.name!r}: has no image in the ledger; the destination's export of it "
                    f"({exported_now[r.name]}) is withdrawn, and its baseline runs at the next cycle"
                )
            continue
        if action == "baseline_again":
            p.fire(r, "baseline_failed", target=None, active_point=None, source_point=None, exported=None)
            notes.append(f"replica {r.name!r}: its baseline starts over at the next cycle")
        elif action == "reseed":
            _leave(p, r, image, point, reason)
            notes.append(f"replica {r.name!r}: " + _showing(image, point) + ", and is re-seeded at the next cycle")
        elif r.state == "broken":
            lg = r.last_good if r.last_good in facts.destination_pcpis else None
            p.update(r, last_good=lg)
            notes.append(f"replica {r.name!r}: stays broken (the destination still exports its active FS)")
        else:
            _keep(p, r, image, point, pr.active)
            notes.append(f"replica {r.name!r}: " + _showing(image, point) + f", and stays {r.state}")
    if p.get("phase") in ("updating", "rolling_back"):
        p.phase("start_release")  # the ledger's cycle ended long ago: nothing of it is in flight now
        notes.append(f"the ledger's cycle {state.cycle} is closed (the volumes are past it)")
    _rebuild(p, facts, base)


def _removed(p: _Plan, ex: Examination, notes: list[str]) -> None:
    notes.append(
        f"the destination no longer holds PCPIs the ledger records: {', '.join(sorted(ex.lost))} "
        "(removed outside coalesce?)"
    )
    reason = "its image was removed from the destination"
    for r in sorted(p.base_state.replicas.values(), key=lambda r: r.name):
        if not set(r.pinned()) & ex.lost:
            continue
        if r.state == "broken":
            p.update(r, last_good=None)
            notes.append(f"replica {r.name!r}: stays broken; its last good image is gone")
        else:
            _leave(p, r, None, None, reason)
            notes.append(f"replica {r.name!r}: its image is gone; it exports nothing and is re-seeded")
    for name in ex.lost:
        del p.pcpis[name]
    pins = needed_pcpis(p.state())
    for name, pcpi in list(p.pcpis.items()):
        if pcpi.role == "individual" and name not in pins and not pcpi.releasing:
            del p.pcpis[name]  # nobody pins it now: recovery releases it, after the export table


def _showing(image: str | None, point: str | None) -> str:
    if image is None:
        return "no image it exports could be proven equal to a source PCPI: it exports nothing"
    return f"exports {image}, equal to source PCPI {point}"


def _leave(p: _Plan, r: Replica, image: str | None, point: str | None, reason: str) -> None:
    for trigger in _TO_RESEED[r.state]:
        r = p.fire(r, trigger)
    p.update(
        r,
        exported=image,
        last_good=image,
        source_point=point,
        active_point=None,
        target=None,
        scratch=None,
        resume=False,
        retries=0,
        next_retry=0.0,
        reseed_reason=reason,
        last_error=f"restored: {reason}",
    )


def _keep(p: _Plan, r: Replica, image: str | None, point: str | None, active: str | None) -> None:
    outside = r.state != "stable"
    p.update(
        r,
        exported=image,
        last_good=image if outside else None,
        source_point=point,
        active_point=None if r.state in ("unstable_uncoalesced", "reseed_pending") else active,
        target=None,
        scratch=None,
        resume=False,
        next_retry=0.0,
    )


def _rebuild(p: _Plan, facts: Facts, base: str | None) -> None:
    """The ledger's PCPIs become exactly those the replicas pin (the base among them), its source
    PCPIs exactly those they name; what the volumes hold besides is released by ``Recover``."""
    cycle = p.get("cycle")
    pins = needed_pcpis(p.state())
    before = dict(p.pcpis)
    p.pcpis.clear()
    # kept writes (I11) stay: the ones the ledger knows, and those its name shows (taken after this copy)
    for name in sorted(facts.destination_pcpis):
        m = _KEPT.fullmatch(name)
        if m is None or not is_group_pcpi(p.base_state.name, name):
            continue
        old = before.get(name)
        owners = old.owners if old is not None and old.role == KEPT else frozenset({m.group(1)})
        p.pcpis[name] = Pcpi(
            name=name, role=KEPT, cycle=cycle, taken=True, owners=owners, taken_at=old.taken_at if old else 0.0
        )
        for owner in owners:
            if owner in p.replicas:
                p.update(p.replicas[owner], keep=False)
    if base is not None:
        p.pcpis[base] = Pcpi(name=base, role="base", cycle=cycle, taken=True)
    # retained generations (docs/config.md, "Retention") the ledger knows and the destination holds stay,
    # with their manifests; one taken after this copy of the ledger is not known to be one: it is released
    for name, old in sorted(before.items()):
        if old.role == GENERATION and old.taken and name != base and name in facts.destination_pcpis:
            p.pcpis[name] = attrs.evolve(old, owners=pins.get(name, frozenset()))
    for name, owners in pins.items():
        if name != base and name in facts.destination_pcpis and name not in p.pcpis:
            p.pcpis[name] = Pcpi(name=name, role="individual", cycle=cycle, taken=True, owners=owners)
    needed = needed_source_pcpis(p.state())
    known = dict(p.source_pcpis)
    p.source_pcpis.clear()
    for source, held in sorted(facts.source_pcpis.items()):
        for name in sorted(needed & held):
            was = known.get(name)
            p.source_pcpis[name] = SourcePcpi(
                name=name, cycle=cycle, taken=True, taken_at=was.taken_at if was else 0.0, source=source
            )
