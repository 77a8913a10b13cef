"""Pure view builders: state in, rich renderables / JSON-able data out.

No I/O here; the CLI prints what these return (and owns ``Live``).  The
graph builders read the spec only, so the state graph in the terminal, in
docs/ and in the Promela model all come from spec/coalescing.toml.

:class:`Tracker` is the one stateful piece: an observer plugin that collects
what the agent reports (events, transfers in flight, their progress) into
plain data that :func:`dashboard` and :func:`transfers_table` render.  It
does no I/O either; it only remembers.
"""

from __future__ import annotations

import collections
import re
import threading
import time
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import attrs
from rich import box
from rich.console import Group, RenderableType
from rich.filesize import decimal as _fmt_bytes
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from coalesce_core.backend.hookspecs import ACTIVE, hookimpl
from coalesce_core.cycle.invariants import Finding
from coalesce_core.cycle.spec import Spec, load_spec
from coalesce_core.cycle.state import CYCLE_ROLES, INDIVIDUAL, GroupState

#: PCPIs a cycle may hold at once (I1), whatever the number of replicas.
CYCLE_BUDGET = len(CYCLE_ROLES)


# -- JSON documents (schemas in docs/schemas/, described in docs/cli.md) ---------------
def status_data(state: GroupState, export_paths: Mapping[str, str | None], now: float | None = None) -> dict[str, Any]:
    """The `status --json` document (docs/schemas/status.schema.json); ``now`` gives the lag."""
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
                "error": r.last_error or None,
                "last_error": r.last_error or None,
                "consecutive_failures": r.consecutive_failures,
                "last_success": r.last_success or None,
                "source_point_time": state.source_point_time(r),
                "lag_seconds": None if now is None or (lag := state.lag(r, now)) is None else round(lag, 3),
                "reseed_reason": r.reseed_reason or None,
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


def check_data(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    """The `check --json` document (docs/schemas/check.schema.json)."""
    return [{"invariant": f.invariant, "ok": f.ok, "detail": f.detail} for f in findings]


def count_states(state: GroupState) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in state.replicas.values():
        out[r.state] = out.get(r.state, 0) + 1
    return out


def graph_data(spec: Spec | None = None, counts: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The `graph --json` document (docs/schemas/graph.schema.json).

    ``states``/``transitions``/``counts`` keep their original shape; ``fields``
    and ``edges`` add the per-state attributes and one row per edge."""
    spec = spec or load_spec()
    return {
        "states": [s.name for s in spec.replica.states],
        "transitions": [{"trigger": t.trigger, "source": list(t.source), "dest": t.dest, "ref": t.ref}
                        for t in spec.replica.transitions],
        "counts": dict(counts) if counts is not None else None,
        "fields": {
            s.name: {"field": s.field, "ref": s.ref, "stable": s.stable, "in_flight": s.in_flight,
                     "exports": s.exports}
            for s in spec.replica.states
        },
        "edges": [{"trigger": t.trigger, "source": src, "dest": t.dest, "ref": t.ref or None,
                   "crosses_line_1004": spec.replica.state(src).field != spec.replica.state(t.dest).field}
                  for t in spec.replica.transitions for src in t.source],
    }


# -- styles -------------------------------------------------------------------------------
def _state_style(spec: Spec, state: str) -> str:
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
    return Text(state, style=_state_style(spec or load_spec(), state))


def _legend() -> Text:
    return Text.assemble(("■ stable", "green"), "  ", ("■ in flight", "yellow"), "  ",
                         ("■ waiting for jump-ahead", "cyan"), "  ", ("■ unstable outside the cycle", "red"))


def _short(name: str | None, width: int = 28) -> str:
    if not name:
        return "—"
    return name if len(name) <= width else "…" + name[-(width - 1):]


def short_pcpi(name: str | None, group: str) -> str:
    """``co-home-000014-new_base`` -> ``14-new_base``; ``co-home-src-000011`` -> ``src-11`` (narrow views)."""
    if not name:
        return "—"
    prefix = f"co-{group}-"
    if name.startswith(prefix):
        name = name[len(prefix):]
    return re.sub(r"(^|-)0+(?=\d)", r"\1", name)


def _exports(r: Any) -> str:
    if r.exported == ACTIVE:
        return "active FS (writable)"
    return r.exported or "—"


# -- status ------------------------------------------------------------------------------
def status_table(state: GroupState, export_paths: Mapping[str, str | None], now: float | None = None) -> Table:
    """One row per replica: state, field, export, source point and its age (lag), failed
    transfers in a row, last success, and a note (last error, next retry, re-seed reason)."""
    spec = load_spec()
    t = Table(title=f"group {state.name} — cycle {state.cycle}, phase {state.phase}", title_justify="left")
    for col in ("replica", "state", "field", "exports", "source point", "lag", "fails", "last success", "note"):
        t.add_column(col, justify="right" if col in ("lag", "fails") else "left")
    for r in sorted(state.replicas.values(), key=lambda r: r.name):
        st = spec.replica.state(r.state)
        notes = []
        if r.reseed_reason:
            notes.append(f"re-seed: {r.reseed_reason}")
        if r.last_error:
            notes.append(r.last_error[:80])
        if r.state in ("unstable_uncoalesced", "reseed_pending") and r.next_retry:
            what = "retry" if r.state == "unstable_uncoalesced" else "re-seed"
            notes.append(f"{what} #{r.retries + 1} at {_clock(r.next_retry)}")
        lag = state.lag(r, now) if now is not None else None
        fails = Text(str(r.consecutive_failures), style="bold red" if r.consecutive_failures else "dim")
        t.add_row(r.name, state_text(r.state, spec), "cycle" if st.field == "cycle" else "outside",
                  _exports(r), r.source_point or "—", _dur(lag) if lag is not None else "—", fails,
                  _clock(r.last_success), Text(" · ".join(notes), style="red" if r.last_error else ""))
    return t


def pcpi_table(state: GroupState) -> Table:
    t = Table(title="PCPIs (cycle roles: at most 4)", title_justify="left")
    for col in ("PCPI", "role", "owners", "state"):
        t.add_column(col)
    for p in sorted(state.pcpis.values(), key=lambda p: p.name):
        t.add_row(p.name, p.role, ",".join(sorted(p.owners)) or "—",
                  "releasing" if p.releasing else ("taken" if p.taken else "pending"))
    return t


def budget_text(state: GroupState) -> Text:
    """The PCPI budget in one line: ``■■□□ 2 of 4 cycle PCPIs · individual 1``."""
    held = [p for p in state.pcpis.values() if not p.releasing]
    cyc = sorted((p for p in held if p.role in CYCLE_ROLES), key=lambda p: CYCLE_ROLES.index(p.role))
    ind = [p for p in held if p.role == INDIVIDUAL]
    n = len(cyc)
    style = "green" if n <= CYCLE_BUDGET else "bold red"
    out = Text.assemble(("PCPI budget ", "bold"), ("■" * min(n, CYCLE_BUDGET), style),
                        ("□" * max(0, CYCLE_BUDGET - n), "dim"), (f" {n} of {CYCLE_BUDGET} cycle PCPIs", style))
    if cyc:
        out.append("  (" + ", ".join(p.role for p in cyc) + ")", style="dim")
    out.append(f" · individual {len(ind)}", style="red" if ind else "dim")
    if ind:
        out.append(" (" + ", ".join(f"{'/'.join(sorted(p.owners)) or '?'}: {_short(p.name, 24)}" for p in ind) + ")",
                   style="dim")
    return out


def budget_table(state: GroupState) -> RenderableType:
    """The budget line, then every PCPI the group holds, by role."""
    t = Table(box=box.SIMPLE, show_header=True, pad_edge=False)
    t.add_column("role")
    t.add_column("PCPI")
    t.add_column("pinned by")
    for p in sorted(state.pcpis.values(), key=lambda p: (ROLE_ORDER.get(p.role, 9), p.name)):
        t.add_row(Text(p.role, style="red" if p.role == INDIVIDUAL else ""), p.name + (" (releasing)" if p.releasing else ""),
                  ",".join(sorted(p.owners)) or "—")
    return Group(budget_text(state), t) if state.pcpis else budget_text(state)


ROLE_ORDER = {r: i for i, r in enumerate((*CYCLE_ROLES, INDIVIDUAL))}


def check_table(findings: list[Finding]) -> Table:
    t = Table(title="invariants", title_justify="left")
    t.add_column("invariant")
    t.add_column("result")
    t.add_column("detail")
    for f in findings:
        t.add_row(f.invariant, Text("ok" if f.ok else "VIOLATED", style="green" if f.ok else "bold red"), f.detail)
    return t


# -- history -----------------------------------------------------------------------------
def _clock(ts: float | None) -> str:
    if not ts:
        return "—"
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def _dur(seconds: float | None) -> str:
    s = float(seconds or 0.0)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def history_table(cycles: list[dict[str, Any]], bars: bool = True) -> Table:
    """The timeline of cycles: start, end, duration (with a bar against the longest), slowest
    replica, PCPIs taken/released, failures, data moved, states after the cycle and the
    replicas whose transfer failed in it (✗)."""
    t = Table(title="cycles", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
              collapse_padding=True,
              caption="PCPIs: +taken −released; slowest: the replica the cycle waited for", caption_justify="left")
    right = {"cycle", "took", "PCPIs", "fail"}
    cols = ["cycle", "start", "end", "took", *([""] if bars else []), "slowest", "PCPIs", "fail", "data",
            "states after"]
    for col in cols:
        t.add_column(col, justify="right" if col in right else "left",
                     no_wrap=col not in ("slowest", "data", "states after"), min_width=6 if col == "slowest" else None,
                     overflow="fold" if col == "states after" else "ellipsis")
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
        row: list[RenderableType] = [str(c["cycle"]), _clock(started), _clock(c.get("ended")), _dur(secs)]
        if bars:
            row.append(ProgressBar(total=longest, completed=secs, width=12,
                                   complete_style="red" if fails else "green",
                                   finished_style="red" if fails else "green"))
        row += [f"{slow} ({_dur(c.get('slowest_seconds'))})" if slow else "—",
                f"+{len(c.get('pcpis_taken') or [])} −{len(c.get('pcpis_released') or [])}",
                Text(str(fails), style="bold red" if fails else "green"),
                f"{c.get('records', 0)} rec, {_fmt_bytes(int(c.get('bytes') or 0))}",
                _states_text(c.get("states") or {}, failed=c.get("failed") or {})]
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
        out.append(f"{k}={v}", style=_state_style(spec, k))
    if failed:
        out.append(" ✗ " + ", ".join(sorted(failed)), style="bold red")
    return out


# -- transfers and the live dashboard ------------------------------------------------------
@attrs.define
class Transfer:
    """One transfer or rollback in flight (or just finished), as the tracker saw it."""

    replica: str
    kind: str                       # baseline | update | rollback | retry | reseed
    started: float
    expected: float | None = None   # seconds, when somebody knows (the demo does)
    total_records: int | None = None  # when the backend's diff offers a length hint
    records: int = 0
    nbytes: int = 0
    ended: float | None = None
    ok: bool | None = None

    def fraction(self, now: float) -> float | None:
        if self.ended is not None:
            return 1.0
        if self.total_records:
            return min(1.0, self.records / self.total_records)
        if self.expected:
            return min(0.99, (now - self.started) / self.expected)
        return None

    def remaining(self, now: float) -> float | None:
        if self.ended is not None:
            return 0.0
        f = self.fraction(now)
        if self.expected and not self.total_records:
            return max(0.0, self.expected - (now - self.started))
        if f and f > 0:
            el = now - self.started
            return max(0.0, el / f - el)
        return None

    def rate(self, now: float) -> float:
        el = (self.ended or now) - self.started
        return self.nbytes / el if el > 0 else 0.0


_KIND_OF = {"baseline": "baseline", "update": "update", "rollback": "rollback", "reseeding": "reseed"}


class Tracker:
    """Observer plugin feeding the live views: an event log and the transfers in flight.

    Thread-safe (progress arrives from the agent's worker threads).  It also
    wraps ``coalesce_diff`` to count the records and bytes each transfer
    carries, so the progress display works with every backend.
    ``replica_of`` maps (volume handle, qtree) to a replica name or None.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, log_size: int = 200) -> None:
        self.clock = clock
        self.t0 = clock()
        self.events: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=log_size)
        self.transfers: dict[str, Transfer] = {}
        self.expected: dict[str, float] = {}
        self.replica_of: Callable[[Any, str], str | None] = lambda volume, qtree: None
        self.chapter = ""
        self.cycles: collections.deque[Mapping[str, Any]] = collections.deque(maxlen=100)
        self.bytes_total = 0
        self.records_total = 0
        self._lock = threading.Lock()

    # -- feeding ---------------------------------------------------------------
    def log(self, text: str, style: str = "") -> None:
        with self._lock:
            self.events.append((self.clock() - self.t0, text, style))

    def expect(self, replica: str, seconds: float) -> None:
        """Say how long ``replica``'s next transfers take (the demo's throttle knows)."""
        with self._lock:
            self.expected[replica] = seconds
            t = self.transfers.get(replica)
            if t is not None and t.ended is None:
                t.expected = seconds

    def _count(self, replica: str, records: Iterable[Any]) -> Iterator[Any]:
        for rec in records:
            data = getattr(rec, "data", None)
            with self._lock:
                t = self.transfers.get(replica)
                if t is not None and t.ended is None:
                    t.records += 1
                    if isinstance(data, (bytes, bytearray)):
                        t.nbytes += len(data)
            yield rec

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume: Any, qtree: str, base: Any, target: Any):
        result = yield
        replica = self.replica_of(volume, qtree)
        if result is None or replica is None:
            return result
        try:
            import operator

            hint = operator.length_hint(result, 0)
        except Exception:
            hint = 0
        if hint:
            with self._lock:
                t = self.transfers.get(replica)
                if t is not None:
                    t.total_records = hint
        return self._count(replica, result)

    @hookimpl
    def coalesce_state_changed(self, group: str, replica: str, trigger: str, source: str, dest: str) -> None:
        now = self.clock()
        with self._lock:
            if dest in _KIND_OF:
                self.transfers[replica] = Transfer(replica, _KIND_OF[dest], now, expected=self.expected.get(replica))
            elif source in _KIND_OF and replica in self.transfers:
                t = self.transfers[replica]
                t.ended, t.ok = now, trigger.endswith("succeeded")
            elif trigger in ("retry_succeeded", "retry_failed"):
                self.transfers[replica] = Transfer(replica, "retry", now, ended=now, ok=trigger == "retry_succeeded")
        style = "green" if dest == "stable" else ("red" if "failed" in trigger or dest in ("broken", "unstable_uncoalesced",
                                                                                            "reseed_pending") else "")
        self.log(f"{replica}: {source} → {dest} ({trigger})", style)

    @hookimpl
    def coalesce_phase_changed(self, group: str, trigger: str, source: str, dest: str) -> None:
        self.log(f"agent: {source} → {dest}", "bold")

    @hookimpl
    def coalesce_pcpi_taken(self, group: str, volume: str, name: str, role: str) -> None:
        self.log(f"PCPI taken    {name} ({role})", "blue")

    @hookimpl
    def coalesce_pcpi_released(self, group: str, volume: str, name: str) -> None:
        self.log(f"PCPI released {name}", "dim")

    @hookimpl
    def coalesce_transfer_progress(self, group: str, replica: str, records: int, nbytes: int) -> None:
        with self._lock:
            t = self.transfers.get(replica)
            if t is not None and t.ended is None:
                t.records = max(t.records, records)
                t.nbytes = max(t.nbytes, nbytes)

    @hookimpl
    def coalesce_cycle_finished(self, group: str, report: Mapping[str, Any]) -> None:
        with self._lock:
            self.cycles.append(dict(report))
            self.bytes_total += int(report.get("bytes") or 0)
            self.records_total += int(report.get("records") or 0)
        self.log(f"cycle {report.get('cycle')} finished in {_dur(report.get('seconds'))}: slowest "
                 f"{report.get('slowest') or '—'}, {len(report.get('pcpis_taken') or [])} PCPIs taken, "
                 f"{len(report.get('pcpis_released') or [])} released, {report.get('failures', 0)} failures",
                 "bold green" if not report.get("failures") else "bold yellow")

    def reset_transfers(self) -> None:
        """Forget the transfers of earlier cycles (`coalesce run` calls it before each)."""
        with self._lock:
            self.transfers.clear()

    # -- reading -------------------------------------------------------------------
    def snapshot(self) -> tuple[list[tuple[float, str, str]], dict[str, Transfer]]:
        with self._lock:
            return list(self.events), {k: attrs.evolve(v) for k, v in self.transfers.items()}


def _bar_cell(t: Transfer | None, state: str, now: float, width: int = 22, compact: bool = False) -> RenderableType:
    if t is None:
        return Text("")
    f = t.fraction(now)
    if t.ended is not None:
        style = "green" if t.ok else "red"
        label = "✓" if t.ok else "✗ failed"
        return Text.assemble(("━" * width, style), f" {label} {t.kind}", style=style)
    bar = ProgressBar(total=1.0 if f is not None else None, completed=f or 0.0, width=width,
                      pulse=f is None, animation_time=now)
    left = t.remaining(now)
    extra = f" {t.kind} {f * 100:3.0f}%" if f is not None else f" {t.kind}"
    if left is not None and not compact:
        extra += f" {_dur(left)} left"
    return _row(bar, Text(extra, style="yellow"))


def _row(*cells: RenderableType) -> Table:
    g = Table.grid(padding=0)
    for _ in cells:
        g.add_column(no_wrap=True)
    g.add_row(*cells)
    return g


def replica_table(state: GroupState, transfers: Mapping[str, Transfer] | None = None,
                  now: float | None = None, title: str | None = None, max_rows: int | None = None,
                  compact: bool = False) -> Table:
    """One row per replica: state (coloured), exported PCPI, source point, transfer bar.

    With ``max_rows`` and more replicas than that, replicas that are busy or
    unstable come first and the rest are summed up in one last row.
    ``compact`` (narrow terminals) drops the field column and shortens PCPI names."""
    spec = load_spec()
    transfers = transfers or {}
    now = time.monotonic() if now is None else now
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, expand=False,
              collapse_padding=compact)
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
        keep = {r.name for r in first[:max(1, max_rows - 1)]}
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
            exp, src = _short(_exports(r)), _short(r.source_point, 22)
        t.add_row(r.name, state_text(r.state, spec), *field, exp, src,
                  _bar_cell(tr, r.state, now, width=8 if compact else 22, compact=compact))
    if hidden:
        counts: dict[str, int] = {}
        for r in hidden:
            counts[r.state] = counts.get(r.state, 0) + 1
        t.add_row(Text(f"+{len(hidden)}", style="dim"), _states_text(counts), *([] if compact else [""]),
                  Text("more replicas", style="dim"), "", "")
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


def dashboard(state: GroupState, tracker: Tracker, *, title: str = "coalesce", chapter: str = "",
              log_lines: int = 12, now: float | None = None, max_rows: int | None = None,
              width: int | None = None, height: int | None = None) -> RenderableType:
    """The live view: header (phase, cycle), replicas, PCPI budget, event log.

    ``width``/``height`` (the terminal's) make it compact: narrower than 110
    columns shortens the replica table, lower than 40 rows leaves out the
    per-PCPI table (the budget line still names every PCPI role)."""
    now = tracker.clock() if now is None else now
    events, transfers = tracker.snapshot()
    phase_style = "green" if state.phase == "idle" else "yellow"
    narrow = width is not None and width < 110
    head = Text.assemble((title, "bold"), "   agent phase ", (state.phase, f"bold {phase_style}"),
                         f"   cycle {state.cycle}", "" if narrow else f"   {len(state.replicas)} replicas",
                         "" if narrow else f"   {now - tracker.t0:6.1f}s", style="")
    parts: list[RenderableType] = [head]
    if chapter:
        parts.append(Text(chapter, style="bold cyan"))
    parts.append(replica_table(state, transfers, now, max_rows=max_rows, compact=width is not None and width < 110))
    parts.append(budget_table(state) if height is None or height >= 40 else budget_text(state))
    parts.append(event_panel(events, log_lines))
    return Group(*parts)


def transfers_table(transfers: Mapping[str, Transfer], now: float) -> Table:
    """`coalesce run` progress: one row per transfer: bar, records, bytes, rate, time left."""
    t = Table(box=box.SIMPLE, pad_edge=False, title="transfers", title_justify="left")
    for col in ("replica", "kind", "progress", "records", "bytes", "rate", "elapsed", "left"):
        t.add_column(col, justify="right" if col in ("records", "bytes", "rate", "elapsed", "left") else "left",
                     no_wrap=True)
    for name in sorted(transfers):
        tr = transfers[name]
        f = tr.fraction(now)
        if tr.ended is not None:
            bar: RenderableType = Text("done" if tr.ok else "failed", style="green" if tr.ok else "red")
        else:
            bar = ProgressBar(total=1.0 if f is not None else None, completed=f or 0.0, width=24,
                              pulse=f is None, animation_time=now)
        left = tr.remaining(now)
        recs = f"{tr.records}" + (f"/{tr.total_records}" if tr.total_records else "")
        t.add_row(name, tr.kind, bar, recs, _fmt_bytes(tr.nbytes), f"{_fmt_bytes(int(tr.rate(now)))}/s",
                  _dur((tr.ended or now) - tr.started),
                  "" if tr.ended is not None else (_dur(left) if left is not None else "?"))
    return t


# -- the state graph --------------------------------------------------------------------------
FIELD_TITLES = {
    "cycle": "coalescing cycle — field 1002, below line 1004",
    "outside": "fault-tolerant field 1006 — above line 1004",
}


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


def _edge_text(spec: Spec, src: str, trigger: str, ref: str, dest: str, counts: Mapping[str, int] | None) -> Text:
    out = Text("  ")
    out.append(src, style=_state_style(spec, src))
    out.append(" ──", style="dim")
    out.append(trigger, style="bold")
    if ref:
        out.append(f" [{ref}]", style="magenta")
    out.append("──▶ ", style="dim")
    out.append(dest, style=_state_style(spec, dest))
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
        row: list[RenderableType] = [Text(s.name, style=_state_style(spec, s.name)), s.ref]
        if counts is not None:
            n = counts.get(s.name, 0)
            row.append(Text(f"{'●' * min(n, 8)}{'+' if n > 8 else ''} {n}" if n else "0",
                            style=f"bold {_state_style(spec, s.name)}" if n else "dim"))
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


def graph_view(spec: Spec | None = None, counts: Mapping[str, int] | None = None,
               group: str | None = None) -> RenderableType:
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
        _legend(),
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
            outs = [f"{tr.trigger} ({tr.ref}) → {tr.dest}" if tr.ref else f"{tr.trigger} → {tr.dest}"
                    for tr in spec.replica.transitions if s.name in tr.source]
            n = (counts or {}).get(s.name, 0)
            t.add_row("below 1004" if field == "cycle" else "above 1004", Text(s.name, style=_state_style(spec, s.name)),
                      s.ref, str(n) if counts is not None else "", "\n".join(outs))
        t.add_section()
    return t
