"""Pure view builders: state in, text / rich renderables / JSON-able data out.

No I/O here; the CLI prints what these return.  The graph builders read the
spec only, so the state graph in the terminal, in docs/ and in the Promela
model all come from spec/coalescing.toml.
"""

from __future__ import annotations

from typing import Any, Mapping

from rich.table import Table
from rich.text import Text

from .hookspecs import ACTIVE
from .invariants import Finding
from .spec import Spec, load_spec
from .state import GroupState


def status_data(state: GroupState, export_paths: Mapping[str, str | None]) -> dict[str, Any]:
    """The `status --json` document (schema in docs/cli.md)."""
    owners: dict[str, list[str]] = {}
    for r in state.replicas.values():
        for p in r.pinned():
            owners.setdefault(p, []).append(r.name)
    return {
        "group": state.name,
        "phase": state.phase,
        "cycle": state.cycle,
        "replicas": [
            {
                "name": r.name,
                "source": r.source_qtree,
                "state": r.state,
                "exported_pcpi": r.exported if r.exported != ACTIVE else None,
                "exports_active_fs": r.exported == ACTIVE,
                "source_point": r.source_point,
                "export_path": export_paths.get(r.name),
                "error": r.error or None,
                "retries": r.retries,
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
    }


def _state_style(spec: Spec, state: str) -> str:
    s = spec.replica.state(state)
    if s.stable:
        return "green"
    if s.in_flight:
        return "yellow"
    return "red" if s.field == "outside" else "cyan"


def status_table(state: GroupState, export_paths: Mapping[str, str | None]) -> Table:
    spec = load_spec()
    t = Table(title=f"group {state.name} — cycle {state.cycle}, phase {state.phase}")
    for col in ("replica", "state", "field", "exports", "source point", "note"):
        t.add_column(col)
    for r in sorted(state.replicas.values(), key=lambda r: r.name):
        st = spec.replica.state(r.state)
        exp = "active FS" if r.exported == ACTIVE else (r.exported or "—")
        t.add_row(r.name, Text(r.state, style=_state_style(spec, r.state)), st.field, exp,
                  r.source_point or "—", r.error[:60])
    return t


def pcpi_table(state: GroupState) -> Table:
    t = Table(title="PCPIs (cycle roles: at most 4)")
    for col in ("PCPI", "role", "owners", "state"):
        t.add_column(col)
    for p in sorted(state.pcpis.values(), key=lambda p: p.name):
        t.add_row(p.name, p.role, ",".join(sorted(p.owners)) or "—",
                  "releasing" if p.releasing else ("taken" if p.taken else "pending"))
    return t


def check_table(findings: list[Finding]) -> Table:
    t = Table(title="invariants")
    t.add_column("invariant")
    t.add_column("result")
    t.add_column("detail")
    for f in findings:
        t.add_row(f.invariant, Text("ok" if f.ok else "VIOLATED", style="green" if f.ok else "bold red"), f.detail)
    return t


def history_table(cycles: list[dict[str, Any]]) -> Table:
    t = Table(title="cycles")
    for col in ("cycle", "seconds", "slowest", "taken", "released", "failures", "states"):
        t.add_column(col)
    for c in cycles:
        t.add_row(str(c["cycle"]), f"{c['seconds']:.3f}", f"{c.get('slowest') or '—'} ({c.get('slowest_seconds', 0):.3f}s)",
                  str(len(c["pcpis_taken"])), str(len(c["pcpis_released"])), str(c["failures"]),
                  ", ".join(f"{k}={v}" for k, v in sorted(c["states"].items())))
    return t


# -- the state graph --------------------------------------------------------------
def graph_mermaid(spec: Spec | None = None) -> str:
    """The replica machine as a Mermaid state diagram, cycle and outside fields apart."""
    spec = spec or load_spec()
    lines = ["stateDiagram-v2"]
    for field, title in (("cycle", "coalescing cycle (field 1002, below line 1004)"),
                         ("outside", "fault-tolerant field (1006, above line 1004)")):
        lines.append(f"    state \"{title}\" as {field} {{")
        for s in spec.replica.states:
            if s.field == field:
                lines.append(f"        {s.name}: {s.name} [{s.ref}]")
        lines.append("    }")
    lines.append(f"    [*] --> {spec.replica.initial}")
    for t in spec.replica.transitions:
        for src in t.source:
            ref = f" ({t.ref})" if t.ref else ""
            lines.append(f"    {src} --> {t.dest}: {t.trigger}{ref}")
    return "\n".join(lines) + "\n"


def graph_dot(spec: Spec | None = None) -> str:
    spec = spec or load_spec()
    lines = ["digraph coalescing {", "  rankdir=LR;"]
    for field, title in (("cycle", "coalescing cycle 1002"), ("outside", "fault-tolerant field 1006")):
        lines.append(f"  subgraph cluster_{field} {{ label=\"{title}\";")
        for s in spec.replica.states:
            if s.field == field:
                shape = "doublecircle" if s.stable else "ellipse"
                lines.append(f"    {s.name} [label=\"{s.name}\\n{s.ref}\", shape={shape}];")
        lines.append("  }")
    for t in spec.replica.transitions:
        for src in t.source:
            ref = f" {t.ref}" if t.ref else ""
            lines.append(f"  {src} -> {t.dest} [label=\"{t.trigger}{ref}\"];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def graph_text(spec: Spec | None = None, counts: Mapping[str, int] | None = None) -> Table:
    """The replica machine as a rich table grouped by field, with live counts."""
    spec = spec or load_spec()
    t = Table(title="replica state graph (spec/coalescing.toml)")
    for col in ("field", "state", "ref", "replicas", "transitions out"):
        t.add_column(col)
    for field in ("cycle", "outside"):
        for s in spec.replica.states:
            if s.field != field:
                continue
            outs = [f"{tr.trigger} ({tr.ref}) → {tr.dest}" if tr.ref else f"{tr.trigger} → {tr.dest}"
                    for tr in spec.replica.transitions if s.name in tr.source]
            n = (counts or {}).get(s.name, 0)
            t.add_row("below 1004" if field == "cycle" else "above 1004", Text(s.name, style=_state_style(spec, s.name)),
                      s.ref, str(n) if counts is not None else "", "\n".join(outs))
        t.add_section()
    return t
