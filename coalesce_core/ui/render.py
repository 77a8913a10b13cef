"""Rich renderables of the terminal views: state in, tables and text out.

Pure: nothing here prints; the CLI and the demo print what these return (and
own ``Live``).  Colours mean one thing everywhere (:func:`state_style`, from
the spec's per-state attributes; docs/terminal.md).  The live views read a
:class:`~coalesce_core.ui.tracker.Tracker`'s snapshot.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Mapping, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.filesize import decimal as _fmt_bytes
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from coalesce_core import grouplock
from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.cycle.invariants import Finding
from coalesce_core.cycle.spec import Spec, load_spec
from coalesce_core.cycle.state import CYCLE_ROLES, DEFAULT_SOURCE, GENERATION, INDIVIDUAL, KEPT, GroupState
from coalesce_core.ui.formatting import clock, duration, short_pcpi, shorten
from coalesce_core.ui.peertext import clean
from coalesce_core.ui.tracker import Tracker, TransferProgress

#: PCPIs a cycle may hold at once (I1), whatever the number of replicas.
CYCLE_BUDGET = len(CYCLE_ROLES)


# -- styles -------------------------------------------------------------------------------
def state_style(spec: Spec, state: str) -> str:
    try:
        s = spec.replica.state(state)
    except KeyError:
        return "magenta"
    if s.stable:
        return "green"
    if s.in_flight:
        return "yellow"
    return "red" if s.field == "outside" else "cyan"


def state_text(state: str, spec: Spec | None = None) -> Text:
    """A state name coloured by stable (green) / in flight (yellow) / other unstable."""
    return Text(state, style=state_style(spec or load_spec(), state))


def legend() -> Text:
    return Text.assemble(
        ("■ stable", "green"),
        "  ",
        ("■ in flight", "yellow"),
        "  ",
        ("■ waiting for jump-ahead", "cyan"),
        "  ",
        ("■ unstable outside the cycle", "red"),
    )


def _exports(r: Any) -> str:
    if r.exported == ACTIVE:
        return "active FS (writable)"
    return r.exported or "—"


# -- status ------------------------------------------------------------------------------
def status_title(state: GroupState) -> str:
    return f"group {state.name} — cycle {state.cycle}, phase {state.phase}"


def status_table(
    state: GroupState,
    export_paths: Mapping[str, str | None],
    now: float | None = None,
    kept_paths: Mapping[str, str | None] | None = None,
    only: Sequence[str] | None = None,
    title: bool = True,
) -> Table:
    """One row per replica (of ``only``, by name: default every one): state, field, export, source
    point and its age (lag), failed transfers in a row, last success, and a note (last error, next
    retry, re-seed reason, kept writes and the path they are readable at, from ``kept_paths`` by PCPI
    name); ``title``: the group, cycle and phase above it."""
    spec = load_spec()
    t = Table(title=status_title(state) if title else None, title_justify="left")
    for col in ("replica", "state", "field", "exports", "source point", "lag", "fails", "last success", "note"):
        t.add_column(col, justify="right" if col in ("lag", "fails") else "left")
    for r in sorted(state.replicas.values(), key=lambda r: r.name):
        if only is not None and r.name not in only:
            continue
        st = spec.replica.state(r.state)
        notes = []
        if r.reseed_reason:
            notes.append(f"re-seed: {clean(r.reseed_reason)}")
        if r.last_error:
            notes.append(clean(r.last_error[:80]))  # a peer's text (ui/peertext.py), never markup
        kept = state.kept_pcpi(r.name)
        if kept is not None:
            where = (kept_paths or {}).get(kept.name)
            at = f", readable at {where}" if where else ""
            notes.append(clean(f"writes kept in {kept.name}{at} (`coalesce release {r.name}`)"))
        if r.state in ("unstable_uncoalesced", "reseed_pending") and r.next_retry:
            what = "retry" if r.state == "unstable_uncoalesced" else "re-seed"
            notes.append(f"{what} #{r.retries + 1} at {clock(r.next_retry)}")
        lag = state.lag(r, now) if now is not None else None
        fails = Text(str(r.consecutive_failures), style="bold red" if r.consecutive_failures else "dim")
        t.add_row(
            Text(clean(r.name)),
            state_text(r.state, spec),
            "cycle" if st.field == "cycle" else "outside",
            Text(clean(_exports(r))),
            Text(clean(r.source_point or "—")),
            duration(lag) if lag is not None else "—",
            fails,
            clock(r.last_success),
            Text(" · ".join(notes), style="red" if r.last_error else ""),
        )
    return t


def source_line(src: Mapping[str, Any], named: bool = True) -> Text:
    """One source's state in a line (a `status --json` ``sources`` entry): ``source lab: reachable ·
    due now · last PCPI co-g-src-000003 at 12:00:01 · lag 3.0 s`` then its last error, if any;
    ``named`` False leaves the name out (a group of one source)."""
    reachable = src.get("reachable")
    out = Text.assemble(("source" + (f" {clean(src['name'])}" if named else ""), "bold"), ": ")
    if reachable is None:
        out.append("reachable: not known yet", style="dim")
    else:
        out.append("reachable" if reachable else "unreachable", style="green" if reachable else "bold red")
    interval = src.get("interval")
    if src.get("due"):
        due = "due now" if interval is not None else "due every cycle"
    elif src.get("next_due") is not None:
        due = f"due at {clock(src['next_due'])}"
    else:
        due = "due every cycle"
    if interval is not None:
        due += f" (interval {duration(interval)})"
    out.append(f" · {due} · ")
    if src.get("last_pcpi"):
        out.append(f"last PCPI {clean(src['last_pcpi'])} at {clock(src.get('last_pcpi_time'))}")
    else:
        out.append("last PCPI —")
    lag = src.get("lag_seconds")
    out.append(f" · lag {duration(lag) if lag is not None else '—'}")
    if src.get("last_error"):
        out.append(f" · last error: {clean(src['last_error'])}", style="red")
    return out


def status_view(
    state: GroupState,
    export_paths: Mapping[str, str | None],
    sources: Sequence[Mapping[str, Any]],
    now: float | None = None,
    kept_paths: Mapping[str, str | None] | None = None,
) -> RenderableType:
    """`coalesce status` as text: the replicas grouped by source, each group under its source's line
    (:func:`source_line`), then the PCPI budget. A group of one source reads as one table with its
    source line under it."""
    if len(sources) <= 1:
        parts: list[RenderableType] = [status_table(state, export_paths, now=now, kept_paths=kept_paths)]
        parts += [source_line(src, named=src.get("name") != DEFAULT_SOURCE) for src in sources]
        return Group(*parts, budget_table(state))
    parts = [Text(status_title(state), style="italic")]
    for src in sources:
        parts.append(source_line(src))
        if src.get("replicas"):
            parts.append(
                status_table(state, export_paths, now=now, kept_paths=kept_paths, only=src["replicas"], title=False)
            )
    return Group(*parts, budget_table(state))


def pcpi_table(state: GroupState) -> Table:
    t = Table(title="PCPIs (cycle roles: at most 4)", title_justify="left")
    for col in ("PCPI", "role", "owners", "state"):
        t.add_column(col)
    for p in sorted(state.pcpis.values(), key=lambda p: p.name):
        t.add_row(
            p.name,
            p.role,
            ",".join(sorted(p.owners)) or "—",
            "releasing" if p.releasing else ("taken" if p.taken else "pending"),
        )
    return t


def agent_text(holder: Mapping[str, Any] | None, phase: str) -> Text:
    """Who runs the group now (coalesce_core.grouplock.probe): a held lock names its process; with none,
    a phase other than idle means a run stopped mid-cycle and the next one recovers."""
    if holder is not None:
        return Text(f"agent: {grouplock.describe(holder)}")
    if phase != "idle":
        return Text(f"agent: none running; phase {phase}: the next `coalesce run` recovers", style="yellow")
    return Text("agent: none running", style="dim")


def requests_lines(queue: Sequence[Any]) -> list[str]:
    """The requests handed to a running agent (coalesce_core.requests.Request), pending ones and
    the answer of each other one: ``request 7 (break A): done 12:00:03: replica A is broken``."""
    out = []
    for r in queue:
        if r.status == "pending":
            out.append(f"{r.describe()}: pending since {time.strftime('%H:%M:%S', time.localtime(r.asked))}")
        else:
            when = time.strftime("%H:%M:%S", time.localtime(r.answered))
            out.append(f"{r.describe()}: {r.status} {when}" + (f": {r.message}" if r.message else ""))
    return [clean(line) for line in out]  # names and errors are peer text (ui/peertext.py)


def budget_text(state: GroupState) -> Text:
    """The PCPI budget in one line: ``■■□□ 2 of 4 cycle PCPIs · individual 1``."""
    held = [p for p in state.pcpis.values() if not p.releasing]
    cyc = sorted((p for p in held if p.role in CYCLE_ROLES), key=lambda p: CYCLE_ROLES.index(p.role))
    ind = [p for p in held if p.role == INDIVIDUAL]
    n = len(cyc)
    style = "green" if n <= CYCLE_BUDGET else "bold red"
    out = Text.assemble(
        ("PCPI budget ", "bold"),
        ("■" * min(n, CYCLE_BUDGET), style),
        ("□" * max(0, CYCLE_BUDGET - n), "dim"),
        (f" {n} of {CYCLE_BUDGET} cycle PCPIs", style),
    )
    if cyc:
        out.append("  (" + ", ".join(p.role for p in cyc) + ")", style="dim")
    out.append(f" · individual {len(ind)}", style="red" if ind else "dim")
    if ind:
        out.append(
            " (" + ", ".join(f"{'/'.join(sorted(p.owners)) or '?'}: {shorten(p.name, 24)}" for p in ind) + ")",
            style="dim",
        )
    kept = [p for p in held if p.role == KEPT]
    if kept:  # a removed replica's kept writes too: they stay until `coalesce release`
        out.append(f" · kept {len(kept)}", style="yellow")
        out.append(" (" + ", ".join(f"{'/'.join(sorted(p.owners))}: {p.name}" for p in kept) + ")", style="dim")
    return out


def budget_table(state: GroupState) -> RenderableType:
    """The budget line, then every PCPI the group holds, by role."""
    t = Table(box=box.SIMPLE, show_header=True, pad_edge=False)
    t.add_column("role")
    t.add_column("PCPI")
    t.add_column("pinned by")
    for p in sorted(state.pcpis.values(), key=lambda p: (ROLE_ORDER.get(p.role, 9), p.name)):
        t.add_row(
            Text(p.role, style="red" if p.role == INDIVIDUAL else ""),
            Text(clean(p.name) + (" (releasing)" if p.releasing else "")),
            Text(clean(",".join(sorted(p.owners)) or "—")),
        )
    return Group(budget_text(state), t) if state.pcpis else budget_text(state)


ROLE_ORDER = {r: i for i, r in enumerate((*CYCLE_ROLES, INDIVIDUAL, KEPT, GENERATION))}


def generations_table(doc: dict[str, Any]) -> Table:
    """`coalesce generations`: one row per generation (reports.generations_data), oldest first; with
    a plan, whether the policy keeps it and why."""
    planned = any("plan" in g for g in doc["generations"])
    t = Table(title=f"generations of group {clean(doc['group'])}", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("id", "time (UTC)", "PCPI", "replicas", *(("plan", "why") if planned else ())):
        t.add_column(col, justify="right" if col == "id" else "left")
    for g in doc["generations"]:
        when = datetime.fromtimestamp(g["time"], UTC).strftime("%Y-%m-%d %H:%M:%S") if g["time"] else "unknown"
        counts = g["counts"]
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) if counts else "unknown"
        if g["pinned_by"]:
            summary += f"; exported by {', '.join(clean(r) for r in g['pinned_by'])}"
        if g.get("pinned"):
            summary += "; pinned"
        row: list[str | Text] = [str(g["id"]), when, clean(g["pcpi"]), summary]
        if planned:
            keep = g["plan"]["keep"]
            row += [Text("keep" if keep else "prune", style="" if keep else "yellow"), "; ".join(g["plan"]["reasons"])]
        t.add_row(*row)
    return t


def check_table(findings: list[Finding]) -> Table:
    t = Table(title="invariants", title_justify="left")
    t.add_column("invariant")
    t.add_column("result")
    t.add_column("detail")
    for f in findings:
        t.add_row(
            f.invariant,
            Text("ok" if f.ok else "VIOLATED", style="green" if f.ok else "bold red"),
            Text(clean(f.detail)),
        )
    return t


# -- history -----------------------------------------------------------------------------
def history_table(cycles: list[dict[str, Any]], bars: bool = True) -> Table:
    """The timeline of cycles: start, end, duration (with a bar against the longest), slowest
    replica, PCPIs taken/released, failures, data moved, states after the cycle and the
    replicas whose transfer failed in it (✗)."""
    t = Table(
        title="cycles",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
        caption="PCPIs: +taken −released; slowest: the replica the cycle waited for",
        caption_justify="left",
    )
    right = {"cycle", "took", "PCPIs", "fail"}
    cols = [
        "cycle",
        "start",
        "end",
        "took",
        *([""] if bars else []),
        "slowest",
        "PCPIs",
        "fail",
        "data",
        "states after",
    ]
    for col in cols:
        t.add_column(
            col,
            justify="right" if col in right else "left",
            no_wrap=col not in ("slowest", "data", "states after"),
            min_width=6 if col == "slowest" else None,
            overflow="fold" if col == "states after" else "ellipsis",
        )
    longest = max((float(c.get("seconds") or 0) for c in cycles), default=0.0) or 1.0
    day = None
    for c in cycles:
        started = c.get("started")
        d = datetime.fromtimestamp(started).strftime("%Y-%m-%d") if started else None
        if d and d != day and day is not None:
            t.add_section()
        day = d or day
        secs = float(c.get("seconds") or 0)
        fails = int(c.get("failures") or 0)
        slow = c.get("slowest")
        row: list[RenderableType] = [str(c["cycle"]), clock(started), clock(c.get("ended")), duration(secs)]
        if bars:
            row.append(
                ProgressBar(
                    total=longest,
                    completed=secs,
                    width=12,
                    complete_style="red" if fails else "green",
                    finished_style="red" if fails else "green",
                )
            )
        row += [
            Text(f"{clean(slow)} ({duration(c.get('slowest_seconds'))})" if slow else "—"),
            f"+{len(c.get('pcpis_taken') or [])} −{len(c.get('pcpis_released') or [])}",
            Text(str(fails), style="bold red" if fails else "green"),
            f"{c.get('records', 0)} rec, {_fmt_bytes(int(c.get('bytes') or 0))}",
            _states_text(c.get("states") or {}, failed=c.get("failed") or {}),
        ]
        t.add_row(*row)
    if not cycles:
        t.caption = "no finished cycle yet: `coalesce run --once` runs one"
    return t


def _states_text(states: Mapping[str, int], failed: Mapping[str, str] | None = None) -> Text:
    """``stable=2, unstable_uncoalesced=1``, then the replicas whose transfer failed (``✗ B``)."""
    spec = load_spec()
    out = Text()
    for i, (k, v) in enumerate(sorted(states.items())):
        if i:
            out.append(", ")
        out.append(f"{k}={v}", style=state_style(spec, k))
    if failed:
        out.append(" ✗ " + ", ".join(sorted(failed)), style="bold red")
    return out


# -- transfers and the live dashboard ------------------------------------------------------
def _bar_cell(
    t: TransferProgress | None, state: str, now: float, width: int = 22, compact: bool = False
) -> RenderableType:
    if t is None:
        return Text("")
    f = t.fraction(now)
    if t.ended is not None:
        style = "green" if t.ok else "red"
        label = "✓" if t.ok else "✗ failed"
        return Text.assemble(("━" * width, style), f" {label} {t.kind}", style=style)
    bar = ProgressBar(
        total=1.0 if f is not None else None, completed=f or 0.0, width=width, pulse=f is None, animation_time=now
    )
    left = t.remaining(now)
    extra = f" {t.kind} {f * 100:3.0f}%" if f is not None else f" {t.kind}"
    if left is not None and not compact:
        extra += f" {duration(left)} left"
    return _row(bar, Text(extra, style="yellow"))


def _row(*cells: RenderableType) -> Table:
    g = Table.grid(padding=0)
    for _ in cells:
        g.add_column(no_wrap=True)
    g.add_row(*cells)
    return g


def replica_table(
    state: GroupState,
    transfers: Mapping[str, TransferProgress] | None = None,
    now: float | None = None,
    title: str | None = None,
    max_rows: int | None = None,
    compact: bool = False,
) -> Table:
    """One row per replica: state (coloured), exported PCPI, source point, transfer bar.

    With ``max_rows`` and more replicas than that, replicas that are busy or
    unstable come first and the rest are summed up in one last row.
    ``compact`` (narrow terminals) drops the field column and shortens PCPI names."""
    spec = load_spec()
    transfers = transfers or {}
    now = time.monotonic() if now is None else now
    t = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, expand=False, collapse_padding=compact
    )
    longest_state = max(len(s.name) for s in spec.replica.states)
    t.add_column("replica", no_wrap=True, min_width=max((len(n) for n in state.replicas), default=1))
    t.add_column("state", no_wrap=True, min_width=longest_state)
    if not compact:
        t.add_column("field", no_wrap=True)
    t.add_column("exports", no_wrap=True)
    t.add_column("source" if compact else "source point", no_wrap=True)
    t.add_column("transfer", no_wrap=True)
    reps = sorted(state.replicas.values(), key=lambda r: r.name)
    hidden: list[Any] = []
    if max_rows is not None and len(reps) > max_rows:

        def busy(r: Any) -> bool:
            tr = transfers.get(r.name)
            return r.state != "stable" or (tr is not None and tr.ended is None)

        first = [r for r in reps if busy(r)] + [r for r in reps if not busy(r)]
        keep = {r.name for r in first[: max(1, max_rows - 1)]}
        hidden = [r for r in reps if r.name not in keep]
        reps = [r for r in reps if r.name in keep]
    for r in reps:
        st = spec.replica.state(r.state)
        tr = transfers.get(r.name)
        field = [] if compact else ["cycle" if st.field == "cycle" else "outside"]
        if compact:
            exp = "active FS" if r.exported == ACTIVE else short_pcpi(r.exported, state.name)
            src = short_pcpi(r.source_point, state.name)
        else:
            exp, src = shorten(_exports(r)), shorten(r.source_point, 22)
        t.add_row(
            r.name,
            state_text(r.state, spec),
            *field,
            exp,
            src,
            _bar_cell(tr, r.state, now, width=8 if compact else 22, compact=compact),
        )
    if hidden:
        counts: dict[str, int] = {}
        for r in hidden:
            counts[r.state] = counts.get(r.state, 0) + 1
        t.add_row(
            Text(f"+{len(hidden)}", style="dim"),
            _states_text(counts),
            *([] if compact else [""]),
            Text("more replicas", style="dim"),
            "",
            "",
        )
    return t


def event_panel(events: Sequence[tuple[float, str, str]], lines: int = 12, title: str = "events") -> Panel:
    body = Text(no_wrap=True, overflow="ellipsis")
    for i, (ts, text, style) in enumerate(list(events)[-lines:]):
        if i:
            body.append("\n")
        body.append(f"{ts:7.2f}s ", style="dim")
        body.append(text, style=style)
    if not events:
        body.append("(nothing yet)", style="dim")
    return Panel(body, title=title, title_align="left", border_style="dim", height=lines + 2)


def dashboard(
    state: GroupState,
    tracker: Tracker,
    *,
    title: str = "coalesce",
    chapter: str = "",
    log_lines: int = 12,
    now: float | None = None,
    max_rows: int | None = None,
    width: int | None = None,
    height: int | None = None,
) -> RenderableType:
    """The live view: header (phase, cycle), replicas, PCPI budget, event log.

    ``width``/``height`` (the terminal's) make it compact: narrower than 110
    columns shortens the replica table, lower than 40 rows leaves out the
    per-PCPI table (the budget line still names every PCPI role)."""
    now = tracker.clock() if now is None else now
    events, transfers = tracker.snapshot()
    phase_style = "green" if state.phase == "idle" else "yellow"
    narrow = width is not None and width < 110
    head = Text.assemble(
        (title, "bold"),
        "   agent phase ",
        (state.phase, f"bold {phase_style}"),
        f"   cycle {state.cycle}",
        "" if narrow else f"   {len(state.replicas)} replicas",
        "" if narrow else f"   {now - tracker.t0:6.1f}s",
        style="",
    )
    parts: list[RenderableType] = [head]
    if chapter:
        parts.append(Text(chapter, style="bold cyan"))
    parts.append(replica_table(state, transfers, now, max_rows=max_rows, compact=width is not None and width < 110))
    parts.append(budget_table(state) if height is None or height >= 40 else budget_text(state))
    parts.append(event_panel(events, log_lines))
    return Group(*parts)


def transfers_table(transfers: Mapping[str, TransferProgress], now: float) -> Table:
    """`coalesce run` progress: one row per transfer: bar, records, bytes, rate, time left."""
    t = Table(box=box.SIMPLE, pad_edge=False, title="transfers", title_justify="left")
    for col in ("replica", "kind", "progress", "records", "bytes", "rate", "elapsed", "left"):
        t.add_column(
            col, justify="right" if col in ("records", "bytes", "rate", "elapsed", "left") else "left", no_wrap=True
        )
    for name in sorted(transfers):
        tr = transfers[name]
        f = tr.fraction(now)
        if tr.ended is not None:
            bar: RenderableType = Text("done" if tr.ok else "failed", style="green" if tr.ok else "red")
        else:
            bar = ProgressBar(
                total=1.0 if f is not None else None, completed=f or 0.0, width=24, pulse=f is None, animation_time=now
            )
        left = tr.remaining(now)
        recs = f"{tr.records}" + (f"/{tr.total_records}" if tr.total_records else "")
        t.add_row(
            name,
            tr.kind,
            bar,
            recs,
            _fmt_bytes(tr.nbytes),
            f"{_fmt_bytes(int(tr.rate(now)))}/s",
            duration((tr.ended or now) - tr.started),
            "" if tr.ended is not None else (duration(left) if left is not None else "?"),
        )
    return t


_KINDS = {"d": "dir", "f": "file", "l": "link"}


def entry_line(d: Any) -> str:
    """One entry of `coalesce ls`: kind, permission bits, size, mtime (UTC), path (a link's target)."""
    mode = f"{d.mode:04o}" if d.mode is not None else "-"
    size = str(d.size) if d.kind == "f" and d.size is not None else "-"
    when = datetime.fromtimestamp(d.mtime_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S") if d.mtime_ns else "-"
    path = d.path or "."
    if d.kind == "l":
        path += f" -> {d.target}"
    return f"{_KINDS.get(d.kind, d.kind):4} {mode} {size:>12} {when} {path}"
