"""The invariants I1..I11 of spec/invariants.md, as checks (and the lag of each export).

``coalesce check``, tools/check and the test suites share this code.  The
live checks read the volumes themselves (the PCPIs they hold, the export
table they serve, fingerprints of what readers see) and compare them with
the ledger, so they do not merely trust the agent's beliefs.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import attrs

from coalesce_core.cycle.generations import as_retained
from coalesce_core.cycle.planner import is_group_pcpi
from coalesce_core.cycle.spec import Spec, load_spec
from coalesce_core.cycle.state import ACTIVE, CYCLE_ROLES, INDIVIDUAL, KEPT, GroupState
from coalesce_core.errors import CoalesceError
from coalesce_core.retention import limit


@attrs.frozen
class Finding:
    invariant: str
    ok: bool
    detail: str


# -- pure checks on the state (usable in contracts and property tests) --------
def cycle_pcpis(state: GroupState) -> list[str]:
    return sorted(p.name for p in state.pcpis.values() if p.role in CYCLE_ROLES)


def individual_pcpis(state: GroupState) -> list[str]:
    return sorted(p.name for p in state.pcpis.values() if p.role == INDIVIDUAL)


def outside(state: GroupState, spec: Spec | None = None) -> list[str]:
    spec = spec or load_spec()
    out = set(spec.states_in_field("outside")) - {"uninitialized", "baseline"}
    return sorted(r.name for r in state.replicas.values() if r.state in out)


def i1_fixed_consumption(state: GroupState) -> Finding:
    """At most 4 PCPIs in cycle roles, exactly 1 at rest; besides them the retained generations,
    at rest at most what the retention policy keeps (:func:`coalesce_core.retention.limit`; those a
    replica pins are never pruned and do not count)."""
    n = len(cycle_pcpis(state))
    initialized = any(r.source_point for r in state.replicas.values())
    if n > 4:
        return Finding("I1", False, f"{n} PCPIs in cycle roles (> 4): {cycle_pcpis(state)}")
    if state.phase == "idle" and initialized and n != 1:
        return Finding("I1", False, f"at rest with {n} PCPIs in cycle roles, expected exactly 1")
    gens = [g for g in as_retained(state) if not g.protected]
    bound = limit(state.retention)
    if state.phase == "idle" and bound is not None and len(gens) > bound:
        return Finding(
            "I1", False, f"at rest with {len(gens)} unpinned generations, the retention policy keeps {bound}"
        )
    return Finding(
        "I1", True, f"{n} PCPIs in cycle roles" + (f", {len(state.generations())} generations" if gens else "")
    )


def i2_bounded_extras(state: GroupState) -> Finding:
    """Individual PCPIs pinned by replicas outside the cycle <= 2 per such replica.

    A replica that rejoined at a jump-ahead stops pinning its individual PCPI
    at once, but the PCPI is released only in the releasing phase: unpinned
    individual PCPIs are allowed mid-cycle and are a leak at rest."""
    out = set(outside(state))
    pinned = [p.name for p in state.pcpis.values() if p.role == INDIVIDUAL and p.owners & out]
    unpinned = [p.name for p in state.pcpis.values() if p.role == INDIVIDUAL and not p.owners & out and not p.releasing]
    k = len(out)
    if state.phase == "idle" and unpinned:
        return Finding("I2", False, f"at rest, individual PCPIs nobody outside the cycle pins: {sorted(unpinned)}")
    ok = len(pinned) <= 2 * k
    return Finding("I2", ok, f"{len(pinned)} individual PCPIs for {k} replicas outside the cycle (bound {2 * k})")


def kept_pcpis(state: GroupState) -> list[str]:
    return sorted(p.name for p in state.pcpis.values() if p.role == KEPT)


def i11_kept_writes(state: GroupState, held: Iterable[str] | None = None) -> Finding:
    """Kept PCPIs (a resync's writes of a broken replica): at most one per replica name, owned by
    exactly one replica, exported by none; with ``held`` (the volume's PCPIs), each one taken is held
    (a kept PCPI the volume lost is writes lost)."""
    bad = []
    per: dict[str, list[str]] = {}
    for p in sorted(state.pcpis.values(), key=lambda p: p.name):
        if p.role != KEPT:
            continue
        if len(p.owners) != 1:
            bad.append(f"{p.name} is kept for {sorted(p.owners)}, not one replica")
        for o in p.owners:
            per.setdefault(o, []).append(p.name)
        if held is not None and p.taken and not p.releasing and p.name not in held:
            bad.append(f"{p.name} (the kept writes of {sorted(p.owners)}) is not on the volume")
    bad += [f"replica {o} keeps {len(n)} PCPIs: {n}" for o, n in sorted(per.items()) if len(n) > 1]
    kept = set(kept_pcpis(state))
    bad += [f"{r.name} exports the kept PCPI {r.exported}" for r in state.replicas.values() if r.exported in kept]
    n = len(kept)
    return Finding("I11", not bad, "; ".join(bad) if bad else f"{n} kept PCPIs, at most one per replica")


def i4_one_coalesced_point(state: GroupState) -> Finding:
    spec = load_spec()
    in_cycle = set(spec.states_in_field("cycle"))
    # a replica whose baseline just finished (done) exports nothing yet: it does not count
    exported = {r.exported for r in state.replicas.values() if r.state in in_cycle and r.exported is not None}
    ok = len(exported) <= 1
    return Finding("I4", ok, f"cycle replicas export {sorted(str(e) for e in exported) or ['(none)']}")


def i8_legal_edges(state: GroupState, edges: Iterable[tuple[str | None, str, str, str]]) -> Finding:
    spec = load_spec()
    legal_r = spec.replica.edges()
    legal_a = spec.agent.edges()
    bad = [e for e in edges if (e[1], e[2], e[3]) not in (legal_a if e[0] is None else legal_r)]
    return Finding("I8", not bad, f"{len(bad)} logged transitions not in the spec" + (f": {bad[:3]}" if bad else ""))


def seq_of(name: str | None) -> int:
    """The sequence number inside a PCPI name the planner made (-1 if none)."""
    if not name:
        return -1
    for part in name.split("-"):
        if part.isdigit() and len(part) == 6:
            return int(part)
    return -1


def i5_monotone(state: GroupState, previous: Mapping[str, str | None]) -> Finding:
    """Each replica's exported source point is not older than its mark in ``previous``
    (the points of a previous check, or the high-water marks of :func:`i5_marks`)."""
    back = []
    for r in state.replicas.values():
        before = previous.get(r.name)
        if before and r.state != "broken" and seq_of(r.source_point) < seq_of(before):
            back.append(f"{r.name}: {before} -> {r.source_point}")
    return Finding("I5", not back, "exports never moved back" if not back else "; ".join(back))


def i5_marks(previous: Mapping[str, str | None], state: GroupState) -> dict[str, str | None]:
    """The high-water marks of I5: per replica the newest source point it exported in
    ``previous`` or now.  A broken replica keeps its mark (the one exception of I5), so a
    source point that ever moved back stays below its mark, and I5 keeps failing, until it
    is newer again.  The agent records them at the end of every cycle (the ledger note
    ``i5_marks``); `coalesce check` only reads them."""
    out = dict(previous)
    for r in state.replicas.values():
        before = previous.get(r.name)
        if r.state != "broken" and seq_of(r.source_point) > seq_of(before):
            out[r.name] = r.source_point
    return out


def lag_finding(state: GroupState, now: float, max_lag: float | None = None) -> Finding:
    """How old each replica's exported image is (``now`` minus when its source point was taken).

    Informative (ok) unless ``max_lag`` (seconds, ``[group] max_lag``) is given and some
    replica that replicates (not broken, not uninitialized) exports an older image, or
    none at all."""
    from coalesce_core.durations import format_duration

    def age(s: float) -> str:
        return format_duration(round(s)) if s >= 1 else f"{s:.1f}s"

    late, parts = [], []
    for r in sorted(state.replicas.values(), key=lambda r: r.name):
        lag = state.lag(r, now)
        if r.state in ("uninitialized", "baseline") or r.exported is None:
            parts.append(f"{r.name}: no image yet")
            continue
        text = f"{r.name}: {age(lag)}" if lag is not None else f"{r.name}: age unknown"
        if r.state == "broken":
            text += " (broken: not replicating)"
        elif max_lag is not None and (lag is None or lag > max_lag):
            late.append(text)
        parts.append(text)
    if late:
        assert max_lag is not None  # a replica is late only against a configured max_lag
        return Finding("lag", False, f"older than max_lag {age(max_lag)}: " + "; ".join(late))
    head = f"within max_lag {age(max_lag)}" if max_lag is not None else "age of each exported image"
    return Finding("lag", True, head + (": " + "; ".join(parts) if parts else ""))


# -- live checks against the volumes ------------------------------------------
def live_check(
    state: GroupState,
    source: Any | Mapping[str, Any] | None,
    dest: Any,
    previous_points: Mapping[str, str | None] | None = None,
    edges: Iterable[tuple[str | None, str, str, str]] = (),
    now: float | None = None,
    max_lag: float | None = None,
) -> list[Finding]:
    """I1-I5, I8, I9 and I11 on a live group; ``source``/``dest`` are backend.volume.Volume
    (``source`` may also be each source's volume by source name: a group of several sources).

    I3 compares each exported image with the source qtree at the source PCPI the
    ledger says it shows (``Replica.source_point``), never with some other one; how
    far behind that point is comes as a separate "lag" finding (with ``now``),
    a violation only past ``max_lag``.  ``source`` None (`coalesce check`, which never
    opens the source): I3 checks everything the destination and the ledger tell, and
    leaves the comparison of contents to `coalesce verify`."""
    out: list[Finding] = []
    held = set(n for n in dest.snapshot_list() if is_group_pcpi(state.name, n))
    roles = {p.name: p.role for p in state.pcpis.values()}
    cycle_held = sorted(n for n in held if roles.get(n) in CYCLE_ROLES)
    unknown = sorted(n for n in held if n not in roles)
    f1 = i1_fixed_consumption(state)
    if len(cycle_held) > 4:
        f1 = Finding("I1", False, f"the destination holds {len(cycle_held)} PCPIs in cycle roles")
    if unknown:
        f1 = Finding("I1", False, f"the destination holds PCPIs the ledger does not account for: {unknown}")
    out.append(attrs.evolve(f1, detail=f1.detail + f"; the volume holds {len(held)} PCPIs of the group"))
    out.append(i2_bounded_extras(state))
    out.append(i11_kept_writes(state, held))

    exported = dest.exported()
    bad3 = []
    for r in sorted(state.replicas.values(), key=lambda r: r.name):
        want = r.exported
        have = exported.get(r.name)
        if want != have:
            bad3.append(f"{r.name}: the volume exports {have!r}, the ledger says {want!r}")
            continue
        if want in (None, ACTIVE):
            continue
        if want not in held:
            bad3.append(f"{r.name}: exports {want}, which the volume does not hold")
            continue
        if not r.source_point:
            bad3.append(f"{r.name}: exports {want}, but the ledger names no source point for it")
            continue
        if r.source_point not in state.source_pcpis:
            bad3.append(f"{r.name}: its source point {r.source_point} is not a source PCPI the group holds")
            continue
        volume = source.get(r.origin) if isinstance(source, Mapping) else source
        if volume is None:
            continue
        try:
            expect = volume.fingerprint(r.source_qtree, r.source_point)
        except CoalesceError as exc:
            bad3.append(f"{r.name}: cannot read source {r.source_qtree}@{r.source_point}: {exc}")
            continue
        if dest.fingerprint(r.name, want) != expect:
            bad3.append(f"{r.name}: exported image differs from source {r.source_qtree}@{r.source_point}")
    if bad3:
        i3 = "; ".join(bad3)
    elif source is None:
        i3 = (
            "every export is a PCPI the destination holds, of a source PCPI the group holds "
            "(contents not compared with the source: `coalesce verify` does)"
        )
    else:
        i3 = "every exported image equals its source qtree at the source PCPI the ledger names"
    out.append(Finding("I3", not bad3, i3))
    out.append(i4_one_coalesced_point(state))
    out.append(i5_monotone(state, previous_points or {}))
    if edges:
        out.append(i8_legal_edges(state, edges))
    bad9 = []
    for r in state.replicas.values():
        if r.state in ("stable", "stable_uncoalesced") and r.exported not in (None, ACTIVE):
            if dest.fingerprint(r.name, None) != dest.fingerprint(r.name, r.exported):
                bad9.append(r.name)
    out.append(
        Finding(
            "I9",
            not bad9,
            "stable replicas' active FS equals their export" if not bad9 else f"active FS differs from export: {bad9}",
        )
    )
    if now is not None:
        out.append(lag_finding(state, now, max_lag))
    return out
