"""The JSON documents of ``status``, ``check`` and ``graph`` (``--json``): plain data, no rich.

State in, JSON-able dicts and lists out; no I/O.  The schemas are in
docs/schemas/, the fields are described in docs/cli.md.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.cycle import generations as gen
from coalesce_core.cycle.invariants import Finding, seq_of
from coalesce_core.cycle.spec import Spec, load_spec
from coalesce_core.cycle.state import KEPT, GroupState, Pcpi
from coalesce_core.sources import Seen, source_health
from coalesce_core.ui.peertext import clean


def status_data(
    state: GroupState,
    export_paths: Mapping[str, str | None],
    now: float | None = None,
    agent: Mapping[str, Any] | None = None,
    requests: Sequence[Any] = (),
    kept_paths: Mapping[str, str | None] | None = None,
    generation_paths: Mapping[str, Mapping[str, str | None]] | None = None,
    intervals: Mapping[str, float | None] | None = None,
    seen: Mapping[str, Seen] | None = None,
) -> dict[str, Any]:
    """The `status --json` document (docs/schemas/status.schema.json); ``now`` gives the lag, ``agent``
    the process that holds the group now (coalesce_core.grouplock.probe), None when none does;
    ``requests`` the newest requests handed to a running agent (coalesce_core.requests.Request);
    ``kept_paths`` where each kept PCPI is readable, by PCPI name (Agent.kept_paths);
    ``generation_paths`` where each replica's image in each generation is (Agent.generation_paths);
    ``intervals`` each source's own ``interval`` by name, in the config's order (None: due every
    cycle; without it, the sources the replicas come from); ``seen`` the last cycle's record of each
    source (the ledger's note ``sources``, coalesce_core/sources.py)."""
    paths = kept_paths or {}
    gpaths = generation_paths or {}
    retained = state.generations()
    owners: dict[str, list[str]] = {}
    for r in state.replicas.values():
        for p in r.pinned():
            owners.setdefault(p, []).append(r.name)
    return {
        "group": state.name,
        "phase": state.phase,
        "cycle": state.cycle,
        "agent": None if agent is None else {k: agent.get(k) for k in ("pid", "host", "verb", "since")},
        "replicas": [
            {
                "name": r.name,
                "source": r.source_qtree,
                "from": r.origin,
                "state": r.state,
                "exported_pcpi": r.exported if r.exported != ACTIVE else None,
                "exports_active_fs": r.exported == ACTIVE,
                "source_point": r.source_point,
                "export_path": export_paths.get(r.name),
                "error": clean(r.last_error) if r.last_error else None,  # peer text (ui/peertext.py)
                "last_error": clean(r.last_error) if r.last_error else None,
                "consecutive_failures": r.consecutive_failures,
                "last_success": r.last_success or None,
                "source_point_time": state.source_point_time(r),
                "lag_seconds": None if now is None or (lag := state.lag(r, now)) is None else round(lag, 3),
                "reseed_reason": clean(r.reseed_reason) if r.reseed_reason else None,
                "retries": r.retries,
                "kept": _kept(state.kept_pcpi(r.name), r.name, paths),
                "generations": [
                    {
                        "pcpi": p.name,
                        "time": gen.image_time(state.manifests, p),
                        "export_path": gpaths.get(p.name, {}).get(r.name),
                    }
                    for p in retained
                ],
            }
            for r in sorted(state.replicas.values(), key=lambda r: r.name)
        ],
        "pcpis": [
            {
                "name": p.name,
                "role": p.role,
                "owner": sorted(p.owners)[0] if len(p.owners) == 1 else (sorted(p.owners) or None),
                "taken": p.taken,
                "releasing": p.releasing,
                "exported_by": sorted(owners.get(p.name, [])),
            }
            for p in sorted(state.pcpis.values(), key=lambda p: p.name)
        ],
        "source_pcpis": sorted(state.source_pcpis),
        "sources": sources_data(state, intervals, seen, now),
        "kept": [
            _kept(p, sorted(p.owners)[0] if p.owners else "", paths)
            for p in sorted(state.pcpis.values(), key=lambda p: p.name)
            if p.role == KEPT and not p.releasing
        ],
        "requests": [
            {**d, "replica": clean(d["replica"]), "message": clean(d["message"])} for d in (r.data() for r in requests)
        ],
    }


def _kept(pcpi: Pcpi | None, replica: str, paths: Mapping[str, str | None]) -> dict[str, Any] | None:
    """A kept PCPI in `status --json`; ``path`` is where the replica's qtree in it is readable, null
    where the backend has none (mem, sim, zfs-fuse: docs/operations.md, "Writes kept at a resync")."""
    if pcpi is None:
        return None
    return {"replica": replica, "pcpi": pcpi.name, "taken_at": pcpi.taken_at or None, "path": paths.get(pcpi.name)}


def generations_data(
    state: GroupState,
    now: float,
    plan: bool = False,
    paths: Mapping[str, Mapping[str, str | None]] | None = None,
) -> dict[str, Any]:
    """The `generations --json` document (docs/schemas/generations.schema.json): the group's retention
    policy and its generations, oldest first, each with its manifest; with ``plan``, what the policy
    keeps or prunes at ``now`` and why (coalesce_core.retention.plan's reasons); ``paths`` where each
    replica's image in each generation is readable (Agent.generation_paths), else null."""
    where = paths or {}
    policy = state.retention
    decisions = gen.prune(state, now) if plan else None
    pins: dict[str, list[str]] = {}
    for r in sorted(state.replicas.values(), key=lambda r: r.name):
        for name in r.pinned():
            pins.setdefault(name, []).append(r.name)
    rows = []
    for p in state.generations():
        m = state.manifests.get(p.name)
        row: dict[str, Any] = {
            "id": seq_of(p.name),
            "pcpi": p.name,
            "time": gen.image_time(state.manifests, p),
            "cycle": m.cycle if m is not None else p.cycle,
            "pinned_by": pins.get(p.name, []),
            "pinned": p.pinned,
            "counts": m.counts() if m is not None else None,
            "replicas": [{**attrs_entry(e), "export_path": where.get(p.name, {}).get(e.replica)} for e in m.entries]
            if m is not None
            else [],
        }
        if decisions is not None:
            d = decisions.decision(p.name)
            row["plan"] = {"keep": d.keep, "reasons": list(d.reasons)}
        rows.append(row)
    return {
        "group": state.name,
        "now": now,
        "policy": {
            "keep_min": policy.keep_min,
            "keep": " ".join(str(k) for k in policy.keep),
            "max": policy.max,
            "prefer_complete": policy.prefer_complete,
            "timezone": policy.zone,
            "retains": policy.retains,
        },
        "generations": rows,
    }


def attrs_entry(e: gen.Entry) -> dict[str, Any]:
    return {
        "replica": e.replica,
        "status": e.status,
        "origin": e.origin,
        "source_point": e.source_point,
        "source_time": e.source_time or None,
    }


def check_data(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    """The `check --json` document (docs/schemas/check.schema.json)."""
    return [{"invariant": f.invariant, "ok": f.ok, "detail": f.detail} for f in findings]


def graph_data(spec: Spec | None = None, counts: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The `graph --json` document (docs/schemas/graph.schema.json).

    ``states``/``transitions``/``counts`` keep their original shape; ``fields``
    and ``edges`` add the per-state attributes and one row per edge."""
    spec = spec or load_spec()
    return {
        "states": [s.name for s in spec.replica.states],
        "transitions": [
            {"trigger": t.trigger, "source": list(t.source), "dest": t.dest, "ref": t.ref}
            for t in spec.replica.transitions
        ],
        "counts": dict(counts) if counts is not None else None,
        "fields": {
            s.name: {"field": s.field, "ref": s.ref, "stable": s.stable, "in_flight": s.in_flight, "exports": s.exports}
            for s in spec.replica.states
        },
        "edges": [
            {
                "trigger": t.trigger,
                "source": src,
                "dest": t.dest,
                "ref": t.ref or None,
                "crosses_line_1004": spec.replica.state(src).field != spec.replica.state(t.dest).field,
            }
            for t in spec.replica.transitions
            for src in t.source
        ],
    }


def sources_data(
    state: GroupState,
    intervals: Mapping[str, float | None] | None,
    seen: Mapping[str, Seen] | None = None,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """`status --json` ``sources`` (docs/config.md, "Sources"; coalesce_core/sources.py): per source its
    replicas, its newest source PCPI the group holds and when it was taken, its ``interval``, when it
    is next due and whether it is due at ``now``, whether the last cycle that asked it took its PCPI
    (``reachable``), the error that stopped it, the lag of its oldest exported image, every source
    PCPI the ledger records on it, and whether its table was removed (docs/config.md, "Removing a source")."""
    out = []
    for h in source_health(state, intervals, seen, now):
        d = h.data()
        d["last_error"] = clean(d["last_error"]) if d["last_error"] else None  # peer text (ui/peertext.py)
        out.append(d)
    return out
