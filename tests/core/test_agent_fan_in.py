"""The agent of a fan-in group: several sources, each with its own volume (docs/config.md, "Sources").

Two sources, ``a`` (replicas A1, A2) and ``b`` (replica B1), into one destination: every effect runs
against the volume its source names, one coalesced image serves all three replicas."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest
from backends import on_backend

from coalesce_core import crashpoints
from coalesce_core.backend.faults import Rule, source_outage
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.config import parse_config
from coalesce_core.cycle.planner import is_group_source_pcpi
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill

_ids = itertools.count()
#: replica -> its source
ORIGIN = {"A1": "a", "A2": "a", "B1": "b"}


@pytest.fixture(params=[on_backend("mem"), on_backend("sim")])
def fan_in(request, tmp_path: Path, monkeypatch):
    """Make a Harness of group ``g`` of two sources on fresh volumes of the backend (``parallel`` 2 and
    no spool by default; ``own``: more lines of each source's table), each source's qtrees filled;
    returns (harness, {source: URL})."""
    monkeypatch.setenv("COALESCE_SIM_FSYNC", "0")

    def make(
        plugins: tuple[object, ...] = (),
        parallel: int = 2,
        spool: bool = False,
        own: dict[str, list[str]] | None = None,
    ) -> tuple[Harness, dict[str, str]]:
        n = next(_ids)
        if request.param == "mem":
            urls = {s: f"mem://fan-{s}-{os.getpid()}-{n}-{tmp_path.name}" for s in ("a", "b", "dst")}
        else:
            urls = {s: f"sim://{tmp_path}/fan-{s}{n}" for s in ("a", "b", "dst")}
        lines = [
            "[group]",
            'name = "g"',
            f'destination = "{urls["dst"]}"',
            f"parallel = {parallel}",
            f"spool = {str(spool).lower()}",
            f'metadata = "{tmp_path}/meta{n}"',
            "[group.retry]",
            "initial = 0",
        ]
        for s in ("a", "b"):
            lines += ["[[source]]", f'name = "{s}"', f'url = "{urls[s]}"', *(own or {}).get(s, [])]
        for replica, origin in ORIGIN.items():
            lines += ["[[replica]]", f'name = "{replica}"', f'from = "{origin}"']
        h = Harness(parse_config("\n".join(lines) + "\n", str(tmp_path / f"g{n}.toml")), plugins=plugins)
        for s in ("a", "b"):
            fill(h.writers[s], [r for r, o in ORIGIN.items() if o == s], seed=ord(s))
        return h, {s: urls[s] for s in ("a", "b")}

    return make


class PeakCyclePcpis:
    """The most destination PCPIs in cycle roles seen at any take (I1: at most 4)."""

    def __init__(self) -> None:
        self.h: Harness | None = None
        self.peak = 0

    @hookimpl
    def coalesce_pcpi_taken(self, group: str, volume: str, name: str, role: str) -> None:
        if self.h is not None and role != "source":
            self.peak = max(self.peak, self.h.cycle_pcpis_on_volume())


def held(h: Harness, source: str) -> list[str]:
    """The group's source PCPIs the volume of ``source`` holds (read through the test's own handle)."""
    return sorted(n for n in h.writers[source].volume.snapshot_list() if is_group_source_pcpi("g", n))


def image(h: Harness, replica: str) -> Any:
    return h.exported_fingerprints()[replica]


def newest(h: Harness, replica: str) -> str:
    """What the writer of the replica's source recorded for its qtree at its newest source PCPI."""
    w = h.writers[ORIGIN[replica]]
    return w.snapshots[max(w.snapshots)][replica]


def test_one_cycle_brings_every_replica_to_its_own_sources_pcpi_in_one_coalesced_image(fan_in):
    """One source PCPI of each source, each replica's transfer reads from its own source; one new base
    for all three; at most 4 cycle PCPIs on the destination at any instant and 1 at rest (I1); each
    source keeps only the PCPI its replicas show."""
    peak = PeakCyclePcpis()
    h, _urls = fan_in(plugins=(peak,))
    peak.h = h
    for n in range(2):
        if n:
            h.writers["a"].write("A2", "new", b"a" * 300)
            h.writers["b"].write("B1", "new", b"b" * 300)
        report = h.cycle()
        s = h.agent.state
        assert set(h.states().values()) == {"stable"} and report["failures"] == 0
        assert len({r.exported for r in s.replicas.values()}) == 1  # one coalesced image
        assert h.cycle_pcpis_on_volume() == 1
        (pa,), (pb,) = held(h, "a"), held(h, "b")
        assert (
            pa != pb
            and {s.replicas[r].source_point for r in ("A1", "A2")} == {pa}
            and s.replicas["B1"].source_point == pb
        )
        assert {s.source_pcpis[pa].source, s.source_pcpis[pb].source} == {"a", "b"}
        assert all(image(h, r) == newest(h, r) for r in ORIGIN)
        h.assert_invariants()
        # its manifest names each replica's source beside its source PCPI (two sources, two PCPIs)
        m = s.manifests[next(iter(s.replicas.values())).exported or ""]
        assert {e.replica: (e.origin, e.source_point) for e in m.entries} == {
            "A1": ("a", pa),
            "A2": ("a", pa),
            "B1": ("b", pb),
        }
    assert 1 <= peak.peak <= 4


def test_a_source_that_refuses_its_pcpi_holds_back_only_its_own_replicas(fan_in):
    """Source b refuses its PCPI of the cycle: a's replicas jump ahead with their new images, B1 keeps
    its image and source point and is reported with b's error (`run --once`: failures, refusals); the
    next cycle catches B1 up."""
    h, urls = fan_in()
    h.cycle()
    before = h.agent.state.replicas["B1"]
    b_image = image(h, "B1")
    h.writers["a"].write("A1", "new", b"a" * 300)
    h.writers["b"].write("B1", "new", b"b" * 300)
    h.faults.add(Rule(hook="coalesce_snapshot_create", volume=urls["b"], times=1, message="b refused"))
    report = h.cycle()
    s = h.agent.state
    assert s.phase == "idle" and set(h.states().values()) == {"stable"}
    assert sorted(report["failed"]) == ["B1"] and "b refused" in report["failed"]["B1"]
    assert image(h, "A1") == newest(h, "A1") and image(h, "A1") != image(h, "A2")
    b = s.replicas["B1"]
    assert image(h, "B1") == b_image and b.source_point == before.source_point
    assert "b refused" in b.last_error and b.outages == 1
    assert [f["replica"] for f in h.agent.failures] == ["B1"]
    assert len(h.agent.refusals) == 1 and urls["b"] in h.agent.refusals[0].message
    done = h.agent.source_outcome()  # `run --once` exits 10: partial
    assert (done.completed, done.failed, done.partial) == (("a",), ("b",), True)
    assert held(h, "b") == [before.source_point]
    h.assert_invariants()
    h.cycle()
    b = h.agent.state.replicas["B1"]
    assert b.state == "stable" and b.last_error == "" and b.outages == 0
    assert image(h, "B1") == newest(h, "B1") != b_image
    assert held(h, "b") == [b.source_point] and h.cycle_pcpis_on_volume() == 1
    h.assert_invariants()


@pytest.mark.parametrize("point", ["after_source_pcpi:1", "mid_apply:70"])
def test_a_source_out_of_reach_at_recovery_is_settled_later(fan_in, point):
    """A crash in a cycle, then source b cannot be reached when the agent restarts: recovery settles
    what a holds and the cycle goes on for a's replicas (an update of a cut short resumes from its
    spool in the same cycle), which end at a's newest PCPI; B1 keeps its
    image (rolled back, or missing the cycle) and b's PCPIs wait; once b is back a cycle brings B1 up
    to date and releases on b what nobody needs (I1, I3)."""
    h, urls = fan_in(parallel=1, spool=True)
    h.cycle()
    b_image = image(h, "B1")
    for replica in ORIGIN:  # A1's update is long enough for its spool to hold records at the crash
        for i in range(40 if replica == "A1" else 2):
            h.writers[ORIGIN[replica]].write(replica, f"new/{i}", os.urandom(100_000))
    assert crashpoints.run_armed(point, h.cycle)
    down = [h.faults.add(rule) for rule in source_outage(urls["b"])]
    seen = len(h.recorder.transitions)
    h.restart()  # recovery finishes the cycle: a's updates, or the rollbacks of what the crash cut short
    assert h.agent.state.phase == "idle"
    resumed = [t[0] for t in h.recorder.transitions[seen:] if t[1] == "resume_update"]
    # the transfer cut short resumes: A1's, and A2's too when the pool's one worker had begun it before
    # A1's end was decided (a pool takes its next transfer at once); never one of b's
    assert ("A1" in resumed and set(resumed) <= {"A1", "A2"}) if point.startswith("mid_apply") else resumed == []
    h.assert_invariants()
    h.cycle()  # b still down: only a's replicas move
    assert set(h.states().values()) == {"stable"}
    assert image(h, "A1") == newest(h, "A1") and image(h, "A2") == newest(h, "A2")
    assert image(h, "B1") == b_image and "source" in h.agent.state.replicas["B1"].last_error
    assert h.agent.source_if_open("b") is None
    h.assert_invariants()
    h.faults.rules[:] = [r for r in h.faults.rules if r not in down]
    h.cycle()
    b = h.agent.state.replicas["B1"]
    assert b.state == "stable" and image(h, "B1") == newest(h, "B1")
    assert held(h, "b") == [b.source_point] and len(held(h, "a")) == 1 and h.cycle_pcpis_on_volume() == 1
    h.assert_invariants()


def test_a_sources_own_deadline_fails_only_its_transfers(fan_in):
    """Source b's [[source]] table sets `transfer_timeout = "2s"` (the group's is none): b's stream without
    end fails B1's update at b's deadline and B1 keeps its image, while a's replicas, under the group's
    limits, take their new images in the same cycle (docs/config.md, "Deadlines")."""
    from stallpeer import Stall

    stall = Stall("endless", qtree="B1", hold=60.0, volume="fan-b", pace=0.02)
    stall.armed = False
    h, _urls = fan_in(plugins=(stall,), own={"b": ['transfer_timeout = "2s"']})
    h.writers["b"].write("B1", "a/f", b"old")  # the file the endless stream writes
    assert h.cycle()["failures"] == 0
    before = h.agent.state.replicas["B1"]
    h.writers["a"].write("A1", "new", b"a" * 300)
    h.writers["b"].write("B1", "a/f", b"new")
    stall.armed = True
    report = h.cycle()
    assert stall.sent > 10
    assert list(report["failed"]) == ["B1"]
    (failure,) = h.agent.failures
    assert "DeadlineExceeded: the transfer took longer than 2s" in failure["error"]
    b1, a1 = h.agent.state.replicas["B1"], h.agent.state.replicas["A1"]
    assert b1.state == "stable" and b1.source_point == before.source_point
    assert image(h, "A1") == newest(h, "A1") and a1.state == "stable"
    h.assert_invariants()
    stall.armed = False
    assert h.cycle()["failures"] == 0 and image(h, "B1") == newest(h, "B1")


class SourcePcpisTaken:
    """Every source PCPI taken, as (volume URL, PCPI name), in order."""

    def __init__(self) -> None:
        self.taken: list[tuple[str, str]] = []

    @hookimpl
    def coalesce_pcpi_taken(self, group: str, volume: str, name: str, role: str) -> None:
        if role == "source":
            self.taken.append((volume, name))


def test_a_source_with_an_interval_takes_its_pcpi_only_when_due(fan_in):
    """docs/config.md, "Sources": a every cycle, b `interval = 3` (seconds) in cycles one second apart:
    b's PCPI is taken in cycles 1, 4 and 7 only, and B1's image moves only then; in the other cycles
    B1 stays stable without an error and its image is in the new coalesced base with a's; I1 always."""
    taken, peak = SourcePcpisTaken(), PeakCyclePcpis()
    h, urls = fan_in(plugins=(taken, peak), own={"b": ["interval = 3"]})
    peak.h = h
    b_cycles = []
    for n in range(1, 8):
        before = image(h, "B1") if n > 1 else None
        h.writers["a"].write("A1", f"new/{n}", b"a" * 300)
        h.writers["b"].write("B1", f"new/{n}", b"b" * 300)
        count = len(taken.taken)
        report = h.cycle()
        s = h.agent.state
        assert report["cycle"] == n and report["failures"] == 0 and set(h.states().values()) == {"stable"}
        sources = [next(k for k, u in urls.items() if str(u) in volume) for volume, _ in taken.taken[count:]]
        assert sources.count("a") == 1 and len(sources) <= 2
        if "b" in sources:
            b_cycles.append(n)
            assert image(h, "B1") == newest(h, "B1") and image(h, "B1") != before
        else:
            assert image(h, "B1") == before and s.replicas["B1"].last_error == ""
        assert image(h, "A1") == newest(h, "A1")
        assert len({r.exported for r in s.replicas.values()}) == 1 and h.cycle_pcpis_on_volume() == 1
        assert held(h, "b") == [s.replicas["B1"].source_point]
        h.assert_invariants()
        h.clock.advance(1.0)
    assert b_cycles == [1, 4, 7]
    assert 1 <= peak.peak <= 4


def test_a_cycle_in_which_no_source_is_due_takes_no_pcpi(fan_in):
    """Both sources every hour: the second `run_once` an hour less a second later starts no cycle and
    takes nothing, anywhere; an hour after the first it runs."""
    taken = SourcePcpisTaken()
    h, _urls = fan_in(plugins=(taken,), own={"a": ['interval = "1h"'], "b": ['interval = "1h"']})
    h.cycle()
    pcpis = h.agent.dest.snapshot_list()
    cycles, first = h.agent.state.cycle, len(taken.taken)
    h.clock.advance(3599.0)
    assert h.agent.run_once() == {} and h.agent.state.cycle == cycles and h.agent.state.phase == "idle"
    assert len(taken.taken) == first and h.agent.dest.snapshot_list() == pcpis
    assert not h.agent.failures and not h.agent.refusals
    h.clock.advance(1.0)
    assert h.agent.run_once()["cycle"] == cycles + 1 and len(taken.taken) == first + 2
    h.assert_invariants()


class InFlight:
    """Counts the applies on the destination in flight per source (a replica's qtree names it) and
    keeps the peaks.  Each apply waits, before it goes on, until ``together`` applies are in flight
    or ``patience`` seconds passed: an agent that ran more at once than it should reaches the count
    at once, and the peak shows it (the wait bounds the test; no time is asserted)."""

    def __init__(self, together: int, patience: float = 0.5) -> None:
        self.together, self.patience = together, patience
        self.now: dict[str, int] = {"a": 0, "b": 0}
        self.peak: dict[str, int] = {"a": 0, "b": 0}
        self.peak_total = 0
        self.cond = threading.Condition()

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume, qtree, records, use_purgatory):
        source = ORIGIN.get(qtree)
        if source is None or "dst" not in str(getattr(volume, "url", volume)):
            return (yield)
        with self.cond:
            self.now[source] += 1
            self.peak[source] = max(self.peak[source], self.now[source])
            self.peak_total = max(self.peak_total, sum(self.now.values()))
            self.cond.notify_all()
            self.cond.wait_for(lambda: sum(self.now.values()) >= self.together, timeout=self.patience)
        try:
            return (yield)
        finally:
            with self.cond:
                self.now[source] -= 1


@pytest.mark.parametrize("cap", [1, 2])
def test_a_sources_parallel_caps_its_transfers_inside_the_groups_pool(fan_in, cap):
    """Group `parallel` 3, source a `parallel` = cap: at most cap of a's transfers (A1, A2) run at
    once, while b's (B1) runs beside them in the group's pool; every transfer ends and the cycle is
    whole."""
    flight = InFlight(together=3)
    h, _urls = fan_in(plugins=(flight,), parallel=3, own={"a": [f"parallel = {cap}"]})
    report = h.cycle()
    assert report["failures"] == 0 and set(h.states().values()) == {"stable"}
    assert flight.peak == {"a": cap, "b": 1} and flight.peak_total == cap + 1
    h.assert_invariants()


def test_the_group_parallel_alone_runs_every_transfer_of_a_source_at_once(fan_in):
    """The control of the test above: without a source's own cap, a's two transfers do run together
    (so InFlight can see a cap being broken)."""
    flight = InFlight(together=3)
    h, _urls = fan_in(plugins=(flight,), parallel=3)
    h.cycle()
    assert flight.peak == {"a": 2, "b": 1} and flight.peak_total == 3


def test_transfers_that_fail_only_for_one_source_make_the_cycle_partial(fan_in):
    """B1's update fails (its source's diff): a's replicas complete, B1 is rolled back; the outcome
    names b failed and a completed (`run --once` exits 10); a clean cycle next is not partial."""
    h, urls = fan_in()
    h.cycle()
    h.writers["b"].write("B1", "new", b"b" * 300)
    h.faults.add(Rule(hook="coalesce_diff", volume=urls["b"], times=1, message="b broke"))
    report = h.cycle()
    assert sorted(report["failed"]) == ["B1"] and not h.agent.refusals
    done = h.agent.source_outcome()
    assert (done.completed, done.failed, done.partial) == (("a",), ("b",), True)
    h.cycle()
    assert h.agent.source_outcome() == type(done)(completed=("a", "b"))


def test_a_cycle_that_a_source_short_of_pcpi_room_holds_back_names_that_source(fan_in):
    """docs/config.md, "Sources": the cycle does not start while a source with replicas to update can
    take no more PCPIs; the refusal, every replica's error and the source's record (`status`) name the
    source that is short, and by how many; with room again the cycle runs."""
    h, _urls = fan_in()
    h.cycle()
    b = h.agent.source_volume("b")
    assert b.max_pcpis is not None
    foreign = [b.snapshot_create(f"foreign-{i}") for i in range(b.max_pcpis - len(b.snapshot_list()))]
    h.writers["a"].write("A1", "new", b"a" * 300)
    assert h.cycle() == {}
    (refusal,) = h.agent.refusals
    why = "the source 'b' can take no more PCPIs, a cycle needs 1 of it (1 short)"
    assert "not starting cycle 2" in refusal.message and why in refusal.message and refusal.hint
    s = h.agent.state
    assert s.cycle == 1 and all(why in r.last_error for r in s.replicas.values())
    health = {one.name: one for one in h.agent.source_health()}
    assert health["b"].reachable is True and why in (health["b"].last_error or "")
    assert why in (health["a"].last_error or "")  # a's replicas missed the cycle for b's sake: it says so
    b.snapshot_delete(foreign[0])
    report = h.cycle()
    assert report["cycle"] == 2 and report["failures"] == 0 and image(h, "A1") == newest(h, "A1")
    health = {one.name: one for one in h.agent.source_health()}
    assert (health["a"].last_error, health["b"].last_error) == (None, None)
    h.assert_invariants()


def test_an_add_handed_to_the_running_agent_takes_its_source_from_the_request(fan_in):
    """`add --from` beside a running agent (docs/operations.md): the request carries the source; an
    unknown one is refused with the defined sources in its hint, and nothing is added."""
    h, _urls = fan_in()
    h.cycle()
    led = h.agent.ledger
    led.ask("add", {"replica": "B2", "source": "B1", "from": "b"}, 1.0, os.getpid())
    led.ask("add", {"replica": "C1", "source": "B1", "from": "c"}, 2.0, os.getpid())
    ok, bad = h.agent.take_requests()
    assert ok.status == "done" and h.agent.state.replicas["B2"].origin == "b"
    assert bad.status == "refused" and "no source named 'c'" in bad.message and "'a', 'b'" in bad.hint
    assert "C1" not in h.agent.state.replicas


def _without(h: Harness, *, replicas: tuple[str, ...] = (), sources: tuple[str, ...] = ()) -> None:
    """The operator edits the config: those ``replicas`` and ``sources`` tables are gone; a new agent opens it."""
    cfg = h.config
    h.config = attrs.evolve(
        cfg,
        replicas=tuple(r for r in cfg.replicas if r.name not in replicas),
        sources=tuple(s for s in cfg.sources if s.name not in sources),
    )
    h.restart()


def test_a_removed_sources_pcpis_are_reported_not_leaked_and_released_once_its_table_is_back(fan_in):
    """B1 is removed and b's [[source]] table with it, before any cycle released b's PCPI: the agent keeps
    it in the ledger and reports it (removed_source_pcpis, status), the cycles of a go on without a
    refusal; with b's table back (no replica names b) the next cycle's release step releases it on b,
    and then the table can go for good (docs/config.md, "Removing a source")."""
    from coalesce_core.ui import reports

    h, _urls = fan_in()
    h.cycle()
    (b_pcpi,) = held(h, "b")
    h.agent.remove_replica("B1")
    full = h.config
    _without(h, replicas=("B1",), sources=("b",))
    assert h.agent.removed_source_pcpis() == {"b": (b_pcpi,)}
    h.writers["a"].write("A1", "new", b"a" * 300)
    h.cycle()
    assert h.agent.refusals == [] and not h.agent.source_outcome().partial
    assert held(h, "b") == [b_pcpi] and h.agent.removed_source_pcpis() == {"b": (b_pcpi,)}  # kept, not forgotten
    assert image(h, "A1") == newest(h, "A1")
    doc = reports.status_data(h.agent.state, {}, intervals={one.name: one.interval for one in h.config.sources})
    assert [(s["name"], s["removed"], s["pcpis"]) for s in doc["sources"]] == [
        ("a", False, held(h, "a")),
        ("b", True, [b_pcpi]),
    ]
    h.assert_invariants()
    h.config = attrs.evolve(full, replicas=tuple(r for r in full.replicas if r.name != "B1"))
    h.restart()  # b's table is back, without a replica
    assert h.agent.removed_source_pcpis() == {}
    h.cycle()
    assert held(h, "b") == [] and not any(sp.source == "b" for sp in h.agent.state.source_pcpis.values())
    _without(h, sources=("b",))
    assert h.agent.removed_source_pcpis() == {}
    h.cycle()
    assert h.agent.refusals == [] and set(h.states().values()) == {"stable"}
    h.assert_invariants()
