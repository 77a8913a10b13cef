"""Every view rendered to text through rich's recording console, asserted on content."""

from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console, Group

from coalesce_core.backend.faults import Rule
from coalesce_core.cycle.invariants import Finding
from coalesce_core.cycle.spec import load_spec
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill
from coalesce_core.ui import graphs, render, reports
from coalesce_core.ui.formatting import short_pcpi
from coalesce_core.ui.tracker import Tracker, TransferProgress


def text_of(renderable, width: int = 160) -> str:
    c = Console(record=True, width=width, color_system="truecolor", force_terminal=True, file=io.StringIO())
    c.print(renderable)
    return c.export_text()


def styles_of(renderable, word: str, width: int = 160) -> set[str]:
    """The colours a word is drawn in (from the recorded segments)."""
    c = Console(record=True, width=width, color_system="truecolor", force_terminal=True, file=io.StringIO())
    c.print(renderable)
    return {
        str(seg.style.color.name)
        for seg in c._record_buffer
        if seg.style and seg.style.color and seg.text.strip() == word
    }


@pytest.fixture
def harness(group_config):
    tracker = Tracker()
    h = Harness(group_config(replicas=("A", "B", "C")), plugins=[tracker])
    tracker.replica_of = lambda volume, qtree: qtree if qtree in ("A", "B", "C") else None
    fill(h.writer, ["A", "B", "C"], files=3, size=1000)
    yield h, tracker
    h.agent.close()


def test_graph_view_two_fields_every_transition_and_live_counts():
    spec = load_spec()
    counts = {"stable": 2, "unstable_uncoalesced": 1}
    text = text_of(graphs.graph_view(counts=counts, group="home"), width=140)
    cyc = text.index("coalescing cycle — field 1002, below line 1004")
    fault = text.index("fault-tolerant field 1006 — above line 1004")
    line = text.index("line 1004")
    assert fault < line < cyc  # laid out like Fig. 8: the fault field above the line, the cycle below
    for t in spec.replica.transitions:
        for src in t.source:
            edge = f"{src} ──{t.trigger}" + (f" [{t.ref}]" if t.ref else "") + f"──▶ {t.dest}"
            assert edge in text, edge
    # every state in the panel of its field, with its reference number
    for s in spec.replica.states:
        at = text.index(f"│ {s.name} ")
        assert (at > cyc) == (s.field == "cycle"), s.name
        assert s.ref in text[at : at + 120]
    assert "●● 2" in text and "● 1" in text and "group home" in text
    # colours: stable green, unstable (outside) red, in flight yellow
    view = graphs.graph_view(counts=counts)
    assert "green" in styles_of(view, "stable")
    assert "red" in styles_of(view, "unstable_uncoalesced")
    assert "yellow" in styles_of(view, "update")


def test_graph_view_without_group_has_no_counts_column():
    text = text_of(graphs.graph_view(), width=120)
    assert "replicas" not in text.split("exports")[0].split("state")[-1]
    assert "per state now" not in text


def test_dashboard_during_a_rollback_cycle(harness):
    h, tracker = harness
    h.cycle()
    h.writer.write("B", "dir0/file0", b"x" * 5000)
    h.faults.add(Rule(hook="coalesce_diff", qtree="B", record=2, times=1, volume="src", message="link dropped"))
    frames: list[str] = []

    class Snap:
        from coalesce_core.backend.hookspecs import hookimpl

        @hookimpl
        def coalesce_phase_changed(self, group, trigger, source, dest):
            if dest == "rolling_back":
                frames.append(text_of(render.dashboard(h.agent.state, tracker, title="t")))

    h.pm.register(Snap())
    h.cycle()
    assert frames, "never saw the rolling_back phase"
    mid = frames[0]
    assert "agent phase rolling_back" in mid
    assert "rollback" in mid and "PCPI budget" in mid
    final = text_of(render.dashboard(h.agent.state, tracker, title="demo", chapter="the end"))
    for name in ("A", "B", "C"):
        assert any(line.split()[:2] == [name, "stable"] for line in final.splitlines()), final
    assert "1 of 4 cycle PCPIs" in final and "individual 0" in final
    assert "B: update → rollback (update_failed)" in final or "update_failed" in "".join(e[1] for e in tracker.events)
    assert "the end" in final and "events" in final
    assert "✓" in final  # finished transfers show a full bar and a tick
    assert tracker.cycles and tracker.cycles[-1]["failures"] == 1


def test_transfer_progress_counts_records_and_bytes(harness):
    h, tracker = harness
    h.cycle()
    t = tracker.transfers["A"]
    assert t.kind == "baseline" and t.ok and t.records > 0 and t.nbytes >= 3 * 1000
    text = text_of(render.transfers_table(tracker.transfers, time.monotonic()))
    for col in ("replica", "records", "bytes", "rate", "left"):
        assert col in text
    assert "done" in text and "kB" in text


def test_transfer_bar_with_expected_time_shows_time_left():
    t = TransferProgress("C", "update", started=100.0, expected=10.0, records=5, nbytes=2048)
    assert t.fraction(104.0) == pytest.approx(0.4)
    assert t.remaining(104.0) == pytest.approx(6.0)
    text = text_of(render.transfers_table({"C": t}, now=104.0))
    assert "C" in text and "update" in text and "6.0 s" in text and "2.0 kB" in text
    unknown = TransferProgress("D", "baseline", started=100.0)
    assert unknown.fraction(101.0) is None and unknown.remaining(101.0) is None
    assert "?" in text_of(render.transfers_table({"D": unknown}, now=101.0))
    hinted = TransferProgress("E", "update", started=0.0, total_records=200, records=50)
    assert hinted.fraction(1.0) == 0.25 and hinted.remaining(1.0) == pytest.approx(3.0)


def test_status_and_budget_with_a_replica_outside_the_cycle(harness):
    h, _ = harness
    h.cycle()
    h.writer.write("C", "dir0/file0", b"y" * 100)
    h.faults.add(Rule(hook="coalesce_diff", qtree="C", record=2, times=1, volume="src"))
    h.faults.add(Rule(hook="coalesce_rollback", qtree="C", times=1, message="disk full"))
    h.cycle()
    st = h.agent.state
    assert st.replicas["C"].state == "unstable_uncoalesced"
    text = text_of(Group(render.status_table(st, {}), render.budget_table(st)))
    assert "unstable_uncoalesced" in text and "outside" in text and "retry #1" in text
    assert "individual 1" in text and "(C: " in text
    assert "red" in styles_of(render.status_table(st, {}), "unstable_uncoalesced")
    data = reports.status_data(st, {})
    assert {r["name"]: r["state"] for r in data["replicas"]}["C"] == "unstable_uncoalesced"


def test_status_shows_the_kept_pcpi_and_the_path_it_is_readable_at_I11(harness):
    """mem has no path for a PCPI (null, no "readable at"); a path the backend names is shown in
    the text note and in `status --json`, by the kept PCPI's name."""
    h, _ = harness
    h.cycle()
    h.agent.break_mirror("A")
    h.agent.resync("A")
    st = h.agent.state
    kept = st.kept_pcpi("A")
    assert kept is not None
    assert h.agent.kept_paths() == {kept.name: None}  # mem: no file-system path
    data = reports.status_data(st, {}, kept_paths=h.agent.kept_paths())
    assert data["kept"] == [{"replica": "A", "pcpi": kept.name, "taken_at": kept.taken_at, "path": None}]
    assert "readable at" not in text_of(render.status_table(st, {}, kept_paths=h.agent.kept_paths()), width=400)
    where = {kept.name: "/srv/snap/" + kept.name + "/A"}
    data = reports.status_data(st, {}, kept_paths=where)
    a = next(r for r in data["replicas"] if r["name"] == "A")
    assert a["kept"]["path"] == data["kept"][0]["path"] == where[kept.name]
    text = text_of(render.status_table(st, {}, kept_paths=where), width=400)
    assert f"writes kept in {kept.name}, readable at {where[kept.name]}" in text


def test_history_timeline(harness):
    h, _ = harness
    h.cycle()
    h.writer.write("A", "dir0/file0", b"z" * 100)
    h.faults.add(Rule(hook="coalesce_diff", qtree="A", record=2, times=1, volume="src"))
    h.cycle()
    cycles = h.agent.ledger.cycles()
    text = text_of(render.history_table(cycles), width=200)
    for col in ("cycle", "start", "end", "took", "slowest", "PCPIs", "fail", "states after", "+taken −released"):
        assert col in text
    rows = [line for line in text.splitlines() if re.match(r"^\s+[12]\s+\d\d:\d\d:\d\d\s+\d\d:\d\d:\d\d\s", line)]
    assert len(rows) == 2, text
    assert "stable=3" in text and re.search(r" [ABC] \(\d+ ms\)", text)
    assert re.search(r"\s\+2 −1\s+0\s", rows[0]) and re.search(r"\s1\s+0 rec", rows[1]), rows
    narrow = text_of(render.history_table(cycles, bars=False), width=80)
    assert all(len(line) <= 80 for line in narrow.splitlines()) and "━" not in narrow
    assert "stable=3" in narrow and " rec" in narrow  # nothing dropped at 80 columns
    empty = text_of(render.history_table([]))
    assert "no finished cycle yet" in empty


def test_check_table():
    text = text_of(render.check_table([Finding("I1", True, "fine"), Finding("I4", False, "two bases")]))
    assert "I1" in text and "ok" in text and "VIOLATED" in text and "two bases" in text


def test_event_panel_keeps_the_last_lines():
    events = [(float(i), f"event {i}", "") for i in range(30)]
    text = text_of(render.event_panel(events, lines=5))
    assert "event 29" in text and "event 25" in text and "event 24" not in text


def test_dashboard_fits_an_80x24_terminal(harness):
    h, tracker = harness
    h.cycle()
    text = text_of(
        render.dashboard(h.agent.state, tracker, title="demo · sim", width=80, height=24, log_lines=4), width=80
    )
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert len(lines) <= 24, text
    for name in ("A", "B", "C"):  # no column of the replica table was dropped
        assert re.search(rf"^ {name}\s+stable\s+\d+-new_base\s+src-\d+\s", text, re.M), text
    assert "1 of 4 cycle PCPIs" in text
    assert short_pcpi("co-g-000014-new_base", "g") == "14-new_base"
    assert short_pcpi("co-g-src-000011", "g") == "src-11"
