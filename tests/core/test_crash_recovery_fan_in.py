"""A crash at every crash point of fan-in and stragglers, then a restart from the ledger (I6), on mem and sim.

A group of three sources, ``a`` (replica A1), ``b`` (B1) and ``c`` (C1), into one destination, with
``straggler_after``: B1's update is held on the destination until the cycle it left has ended, so it
straggles, waits outside the cycle (done_uncoalesced) and rejoins at the next jump-ahead. The crash
points (coalesce_core/crashpoints.py, ``FAN_IN_POINTS`` and ``STRAGGLER_POINTS``) cut that between
two sources' PCPI takes, after the straggle, after its image was pinned as its individual PCPI, after
its update arrived and at its rejoin. After the restart: I1-I5, I8, I9 against the volumes and the
writers' own record, every export a complete image, and each source volume holds exactly the source
PCPIs the ledger records for it (none leaked, none lost); after the group settled every replica is
stable at its source's newest PCPI, each source holds one PCPI and the destination one (I7).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import pytest
from backends import on_backend

from coalesce_core import crashpoints
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.config import parse_config
from coalesce_core.crashpoints import FAN_IN_POINTS, STRAGGLER_POINTS
from coalesce_core.cycle.planner import is_group_source_pcpi
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill

_ids = itertools.count()
#: replica -> its source
ORIGIN = {"A1": "a", "B1": "b", "C1": "c"}
#: the replica whose update straggles
SLOW = "B1"


class HeldApply:
    """Holds B1's apply on the destination while armed, until the cycle it left ended (``finish_cycle``)
    or a crash point fired (the crashing agent's pool must end: the held worker then meets the crash)."""

    def __init__(self) -> None:
        self.armed = False
        self.release = threading.Event()

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume, qtree, records):
        if self.armed and qtree == SLOW and "dst" in str(volume):
            assert self.release.wait(30), "the held apply was never released"
        return (yield)

    @hookimpl
    def coalesce_phase_changed(self, group, trigger, source, dest):
        if trigger == "finish_cycle":
            self.release.set()


@pytest.fixture(params=[on_backend("mem"), on_backend("sim")])
def group(request, tmp_path: Path, monkeypatch):
    """A Harness of group ``g`` (three sources, ``straggler_after`` 0.3 s, a real clock) after its first
    cycle (the baselines), and the HeldApply armed for B1's next update."""
    monkeypatch.setenv("COALESCE_SIM_FSYNC", "0")
    n = next(_ids)
    if request.param == "mem":
        urls = {s: f"mem://crash-{s}-{os.getpid()}-{n}-{tmp_path.name}" for s in ("a", "b", "c", "dst")}
    else:
        urls = {s: f"sim://{tmp_path}/crash-{s}{n}" for s in ("a", "b", "c", "dst")}
    lines = [
        "[group]",
        'name = "g"',
        f'destination = "{urls["dst"]}"',
        "parallel = 3",
        "straggler_after = 0.3",
        f'metadata = "{tmp_path}/meta{n}"',
        "[group.retry]",
        "initial = 0",
    ]
    for s in ("a", "b", "c"):
        lines += ["[[source]]", f'name = "{s}"', f'url = "{urls[s]}"']
    for replica, origin in ORIGIN.items():
        lines += ["[[replica]]", f'name = "{replica}"', f'from = "{origin}"']
    held = HeldApply()
    remove = crashpoints.at_crash(lambda _point: held.release.set())
    h = Harness(parse_config("\n".join(lines) + "\n", str(tmp_path / f"g{n}.toml")), plugins=[held], clock=time.time)
    for replica, origin in ORIGIN.items():
        fill(h.writers[origin], [replica], seed=ord(origin))
    h.cycle()
    assert set(h.states().values()) == {"stable"}
    for replica, origin in ORIGIN.items():
        h.writers[origin].write(replica, "news.txt", f"the new content of {replica}".encode() * 40)
    held.armed = True
    held.release.clear()
    yield h, held
    remove()


def held_source_pcpis(h: Harness, source: str) -> set[str]:
    """The group's source PCPIs the volume of ``source`` holds (read through the test's own handle)."""
    return {n for n in h.writers[source].volume.snapshot_list() if is_group_source_pcpi("g", n)}


def assert_no_source_pcpi_leaks(h: Harness) -> None:
    """Each source volume holds exactly the source PCPIs the ledger records for that source."""
    s = h.agent.state
    for source in h.writers:
        recorded = {n for n, sp in s.source_pcpis.items() if sp.source == source}
        assert held_source_pcpis(h, source) == recorded, f"source {source}: its volume and the ledger disagree"


def newest(h: Harness, replica: str) -> str | None:
    w = h.writers[ORIGIN[replica]]
    return w.snapshots[max(w.snapshots)][replica]


def settle(h: Harness, held: HeldApply) -> None:
    """Faults stop: within 4 cycles every replica is stable at its source's newest PCPI (I7), and each volume
    holds one PCPI of the group: the coalesced base on the destination, the replica's point on each source."""
    held.armed = False
    held.release.set()
    for _ in range(4):
        h.agent.tick()  # a straggler whose update a restart cut short: loop 1026 rolls it back
        h.cycle()
        if set(h.states().values()) == {"stable"} and all(h.exported_fingerprints()[r] == newest(h, r) for r in ORIGIN):
            break
    assert set(h.states().values()) == {"stable"}, h.states()
    for replica in ORIGIN:
        assert h.exported_fingerprints()[replica] == newest(h, replica), f"I7/I3: {replica}"
    assert h.cycle_pcpis_on_volume() == 1 and len(h.agent.dest.snapshot_list()) == 1
    assert all(len(held_source_pcpis(h, s)) == 1 for s in h.writers)
    assert_no_source_pcpi_leaks(h)
    h.assert_invariants()


def assert_recovered(h: Harness, before: dict[str, str | None]) -> None:
    """After the restart: at rest, nothing in flight, the invariants, every export a complete image of
    its replica (the old or a newer one, never partial: I3 against the writers' record), no leak."""
    s = h.agent.state
    assert s.phase == "idle", s.phase
    assert not [r.name for r in s.replicas.values() if r.state in ("update", "baseline", "rollback")]
    h.assert_invariants()
    after = h.exported_fingerprints()
    assert set(after) == set(before) and all(f is not None for f in after.values()), after
    assert_no_source_pcpi_leaks(h)


def two_cycles(h: Harness) -> None:
    """The cycle B1 leaves (its update arrives after that cycle ended), then the cycle it rejoins."""
    h.cycle()
    h.cycle()


@pytest.mark.parametrize(
    "point",
    [
        "between_source_pcpis:1",  # a's take recorded, b's and c's not taken
        "between_source_pcpis:2",  # a's and b's recorded, c's not taken
        "after_source_pcpi:2",  # a's recorded, b's taken but not recorded, c's not taken
    ],
)
def test_a_crash_between_the_sources_pcpi_takes_settles_the_partial_set(group, point):
    """The restart finds some sources' PCPIs of the cycle taken (recorded or not) and the others not:
    the cycle is finished or undone, and no source keeps a PCPI the ledger does not account for."""
    h, held = group
    held.armed = False  # no straggler: the crash cuts the cycle's start
    before = h.exported_fingerprints()
    assert h.crash(point, h.cycle), f"the cycle never reached {point}"
    assert_recovered(h, before)
    settle(h, held)


@pytest.mark.parametrize("point", STRAGGLER_POINTS)
def test_a_crash_on_a_stragglers_way_out_and_back(group, point):
    """The straggler B1 leaves the cycle, is pinned, its update arrives, it rejoins: a crash at each
    of those steps; the restart exports a complete image for every replica, B1 its last good one or
    its new one, and the group settles."""
    h, held = group
    old_b1 = h.exported_fingerprints()[SLOW]
    before = h.exported_fingerprints()
    assert h.crash(point, lambda: two_cycles(h)), f"the cycles never reached {point}"
    assert_recovered(h, before)
    assert h.exported_fingerprints()[SLOW] in (old_b1, newest(h, SLOW))
    b1 = h.agent.state.replicas[SLOW]
    if b1.state != "stable":  # outside the cycle: at most 2 PCPIs of its own (I2), its last good one pinned
        assert b1.last_good is not None and b1.last_good in h.agent.dest.snapshot_list()
    settle(h, held)


def test_the_two_cycles_pass_every_point_once_in_the_order_of_the_stragglers_way(group):
    """Without a crash: the first cycle takes a's, b's and c's PCPIs (two takes after a recorded one),
    B1 straggles, is pinned, its update arrives; the second takes a's and c's (B1 waits outside the
    cycle: no transfer from b) and B1 rejoins at its jump-ahead."""
    h, held = group
    seen: list[str] = []
    original = crashpoints.hit

    def spy(name: str) -> None:
        if name in FAN_IN_POINTS + STRAGGLER_POINTS:
            seen.append(name)
        original(name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(crashpoints, "hit", spy)
        h.cycle()
        assert h.states()[SLOW] == "done_uncoalesced"
        h.cycle()
    between = "between_source_pcpis"
    assert seen == [between, between, *STRAGGLER_POINTS[:3], between, STRAGGLER_POINTS[3]], seen
    assert h.states()[SLOW] == "stable" and h.exported_fingerprints()[SLOW] == newest(h, SLOW)
    settle(h, held)
