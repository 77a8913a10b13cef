"""The replica state graph, drawn from the spec only (spec/coalescing.toml).

Mermaid and Graphviz text for documents (docs/state-graph.md embeds the
Mermaid one, generated), and rich renderables for the terminal laid out like
the patent's Fig. 8.  Pure: spec (and optional live counts) in, text out.
"""

from __future__ import annotations

from typing import Mapping

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from coalesce_core.cycle.spec import Spec, load_spec
from coalesce_core.ui.render import legend, state_style

FIELD_TITLES = {
    "cycle": "coalescing cycle — field 1002, below line 1004",
    "outside": "fault-tolerant field 1006 — above line 1004",
}


def graph_mermaid(spec: Spec | None = None) -> str:
    """The replica machine as a Mermaid state diagram, cycle and outside fields apart."""
    spec = spec or load_spec()
    lines = ["stateDiagram-v2"]
    for field, title in (
        ("cycle", "coalescing cycle (field 1002, below line 1004)"),
        ("outside", "fault-tolerant field (1006, above line 1004)"),
    ):
        lines.append(f'    state "{title}" as {field} {{')
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
    """The replica machine as a Graphviz digraph, one cluster per field, stable states doubly circled."""
    spec = spec or load_spec()
    lines = ["digraph coalescing {", "  rankdir=LR;"]
    for field, title in (("cycle", "coalescing cycle 1002"), ("outside", "fault-tolerant field 1006")):
        lines.append(f'  subgraph cluster_{field} {{ label="{title}";')
        for s in spec.replica.states:
            if s.field == field:
                shape = "doublecircle" if s.stable else "ellipse"
                lines.append(f'    {s.name} [label="{s.name}\\n{s.ref}", shape={shape}];')
        lines.append("  }")
    for t in spec.replica.transitions:
        for src in t.source:
            ref = f" {t.ref}" if t.ref else ""
            lines.append(f'  {src} -> {t.dest} [label="{t.trigger}{ref}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _edge_text(spec: Spec, src: str, trigger: str, ref: str, dest: str, counts: Mapping[str, int] | None) -> Text:
    out = Text("  ")
    out.append(src, style=state_style(spec, src))
    out.append(" ──", style="dim")
    out.append(trigger, style="bold")
    if ref:
        out.append(f" [{ref}]", style="magenta")
    out.append("──▶ ", style="dim")
    out.append(dest, style=state_style(spec, dest))
    return out


def _field_panel(spec: Spec, field: str, counts: Mapping[str, int] | None) -> Panel:
    states = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    states.add_column("state", no_wrap=True)
    states.add_column("ref", no_wrap=True)
    if counts is not None:
        states.add_column("replicas", justify="right", no_wrap=True)
    states.add_column("exports")
    for s in spec.replica.states:
        if s.field != field:
            continue
        row: list[RenderableType] = [Text(s.name, style=state_style(spec, s.name)), s.ref]
        if counts is not None:
            n = counts.get(s.name, 0)
            row.append(
                Text(
                    f"{'●' * min(n, 8)}{'+' if n > 8 else ''} {n}" if n else "0",
                    style=f"bold {state_style(spec, s.name)}" if n else "dim",
                )
            )
        row.append(Text(s.exports, style="dim"))
        states.add_row(*row)
    edges = Text()
    first = True
    for t in spec.replica.transitions:
        for src in t.source:
            if spec.replica.state(src).field == field and spec.replica.state(t.dest).field == field:
                if not first:
                    edges.append("\n")
                first = False
                edges.append_text(_edge_text(spec, src, t.trigger, t.ref, t.dest, counts))
    body = Group(states, Text("transitions inside this field:", style="italic"), edges)
    style = "green" if field == "cycle" else "red"
    return Panel(body, title=FIELD_TITLES[field], title_align="left", border_style=style, box=box.ROUNDED)


def graph_view(
    spec: Spec | None = None, counts: Mapping[str, int] | None = None, group: str | None = None
) -> RenderableType:
    """The replica state graph for the terminal, laid out like the patent's Fig. 8.

    The fault-tolerant field (1006) is drawn above line 1004, the coalescing
    cycle (1002) below it; the transitions that cross the line are listed on
    it.  Every transition shows its trigger and reference number; with
    ``counts`` every state shows how many replicas sit in it right now."""
    spec = spec or load_spec()
    crossing = Text()
    first = True
    for t in spec.replica.transitions:
        for src in t.source:
            a, b = spec.replica.state(src).field, spec.replica.state(t.dest).field
            if a != b:
                if not first:
                    crossing.append("\n")
                first = False
                crossing.append_text(_edge_text(spec, src, t.trigger, t.ref, t.dest, counts))
                crossing.append("   ↓ joins the cycle" if b == "cycle" else "   ↑ leaves the cycle", style="dim italic")
    title = "replica state graph (spec/coalescing.toml)"
    if group:
        title += f" — group {group}, replicas per state now"
    return Group(
        Text(title, style="bold"),
        _field_panel(spec, "outside", counts),
        Rule("line 1004 — transitions crossing it", style="bold", characters="═"),
        crossing,
        Rule(style="bold", characters="═"),
        _field_panel(spec, "cycle", counts),
        legend(),
    )


def graph_text(spec: Spec | None = None, counts: Mapping[str, int] | None = None) -> Table:
    """The replica machine as a rich table grouped by field, with live counts (compact form)."""
    spec = spec or load_spec()
    t = Table(title="replica state graph (spec/coalescing.toml)")
    for col in ("field", "state", "ref", "replicas", "transitions out"):
        t.add_column(col)
    for field in ("cycle", "outside"):
        for s in spec.replica.states:
            if s.field != field:
                continue
            outs = [
                f"{tr.trigger} ({tr.ref}) → {tr.dest}" if tr.ref else f"{tr.trigger} → {tr.dest}"
                for tr in spec.replica.transitions
                if s.name in tr.source
            ]
            n = (counts or {}).get(s.name, 0)
            t.add_row(
                "below 1004" if field == "cycle" else "above 1004",
                Text(s.name, style=state_style(spec, s.name)),
                s.ref,
                str(n) if counts is not None else "",
                "\n".join(outs),
            )
        t.add_section()
    return t
