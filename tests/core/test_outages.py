"""Refused PCPIs and source outages, on the whole agent (docs/decisions.md, "Refused PCPIs and
source outages"; docs/operations.md, "Recovery from each failure").

Nothing wedges: a source that cannot be reached or refuses the cycle's PCPI ends the cycle before
any transfer, every replica still exporting its image and recording the error; a refused rollback
PCPI sends the replicas in rollback out of the cycle (1022), a refused jump-ahead or new base PCPI
the replicas in done (``jump_ahead_refused``), and the cycle finishes for the rest; a refused retry
or resync PCPI waits for the next retry; no cycle starts without room for its PCPIs.  Each test
checks the invariants (I1-I5, I8, I9) after every step and the recovery to stable (I7).
"""

from __future__ import annotations

import pytest
from backends import backend_fixtures, on_backend

from coalesce_core.agent import Agent
from coalesce_core.backend.faults import Rule, source_outage
from coalesce_core.backend.hookspecs import ACTIVE, hookimpl
from coalesce_core.cycle.planner import is_group_source_pcpi
from coalesce_core.testing.harness import FakeClock, Harness
from coalesce_core.testing.workload import fill

backend, group_config = backend_fixtures("mem", "sim", "btrfs")


@pytest.fixture
def harness(group_config):
    def make(plugins=(), **kw):
        h = Harness(group_config(**kw), plugins=plugins)
        fill(h.writer, [r.source for r in h.config.replicas])
        return h

    return make


def source_down(h: Harness) -> list[Rule]:
    """The source's host goes down: opening it and every call to it fail."""
    return [h.faults.add(rule) for rule in source_outage(h.config.source)]


def newest_image(h: Harness, qtree: str) -> str:
    return h.writer.snapshots[max(h.writer.snapshots)][qtree]


def settle(h: Harness, cycles: int = 3) -> None:
    """I7: with the faults gone, every replica is stable at the newest source point."""
    h.faults.clear()
    clock = h.clock
    assert isinstance(clock, FakeClock)
    for _ in range(cycles):
        clock.advance(1000)
        h.cycle()
        h.assert_invariants()
    assert set(h.states().values()) == {"stable"}, h.states()
    for name, r in h.agent.state.replicas.items():
        assert h.exported_fingerprints()[name] == newest_image(h, r.source_qtree)
        assert r.last_error == "" and r.consecutive_failures == 0 and r.outages == 0


def test_a_source_that_refuses_its_pcpi_ends_the_cycle_every_replica_unchanged_I3_I4(harness):
    """More outages in a row than reseed_after: every replica goes on exporting its image, shows the
    error and the count, and is not re-seeded (a re-seed cannot bring a source back)."""
    h = harness(reseed_after=2)
    h.cycle()
    images, table, cycle = h.exported_fingerprints(), h.agent.dest.exported(), h.agent.state.cycle
    h.writer.write("A", "new", b"n" * 100)
    h.faults.add(Rule(hook="coalesce_snapshot_create", volume=h.config.source, message="source refused"))
    for n in (1, 2, 3):
        report = h.cycle()
        s = h.agent.state
        assert s.phase == "idle" and report["cycle"] == cycle + n
        assert report["failures"] == 3 and sorted(report["failed"]) == ["A", "B", "C"]
        assert h.agent.dest.exported() == table and h.exported_fingerprints() == images
        for r in s.replicas.values():
            assert r.state == "stable" and "source refused" in r.last_error
            assert r.consecutive_failures == r.outages == n
        assert [f["trigger"] for f in h.agent.failures] == ["missed_cycle"] * 3
        (refusal,) = h.agent.refusals
        assert "source refused" in refusal.message and refusal.hint and refusal.exit_code == 4
        assert not s.source_pcpis.keys() - {r.source_point for r in s.replicas.values()}
        h.assert_invariants()
    settle(h)


def test_recovery_and_break_need_only_the_destination_I6(harness):
    """A crash between the decision to start a cycle and the source PCPI's take, then the source's
    host goes down: the restart recovers (it asks the source again, which ends the cycle), break and
    resync work, and so does a second restart; when the source is back the group settles."""
    h = harness()
    h.cycle()
    images = h.exported_fingerprints()
    h.writer.write("B", "new", b"b" * 100)
    source_down(h)
    assert h.crash("after_commit:2", h.cycle)  # the StartCycle commit: the take never ran
    s = h.agent.state
    assert s.phase == "idle" and h.exported_fingerprints() == images
    assert all("source unreachable" in r.last_error for r in s.replicas.values())
    h.assert_invariants()
    h.agent.break_mirror("A")
    assert h.agent.state.replicas["A"].exported == ACTIVE
    h.agent.resync("A")  # a PCPI of A's active FS, rolled back to its last good image: the destination alone
    assert h.states()["A"] == "stable_uncoalesced"
    h.restart()  # the source still down
    assert h.agent.state.phase == "idle" and h.agent.source_if_open() is None
    h.assert_invariants()
    settle(h)


def test_the_read_only_agent_never_opens_the_source(harness):
    h = harness()
    h.cycle()
    source_down(h)
    reader = Agent.open(h.config, pm=h.pm, readonly=True)
    try:
        assert reader.state == h.agent.state and reader.source_if_open() is None
    finally:
        reader.close()


def test_a_refused_rollback_pcpi_sends_the_failed_replicas_out_of_the_cycle_I1_I2(harness):
    """The patent's own failed rollback (1022, "a lack of space on disk"): B's update fails and the
    destination refuses the rollback PCPI; B leaves the cycle exporting its last good image, A and C
    jump ahead, the group is idle and every verb works; B retries and rejoins."""
    h = harness()
    h.cycle()
    old = h.exported_fingerprints()
    h.writer.write("A", "a-new", b"a" * 100)
    h.writer.write("B", "b-new", b"b" * 3000)
    h.faults.add(Rule(hook="coalesce_diff", qtree="B", record=1, times=1, volume=h.config.source))
    # the first destination PCPI of a failing cycle is its rollback PCPI
    h.faults.add(Rule(hook="coalesce_snapshot_create", volume=h.config.destination, times=1, message="no space left"))
    h.cycle()
    s = h.agent.state
    b = s.replicas["B"]
    assert s.phase == "idle" and b.state == "unstable_uncoalesced"
    assert "rollback PCPI" in b.last_error and "no space left" in b.last_error
    assert b.exported == b.last_good and h.exported_fingerprints()["B"] == old["B"]
    assert h.states()["A"] == h.states()["C"] == "stable"
    assert h.exported_fingerprints()["A"] == newest_image(h, "A")
    assert any("rollback PCPI" in x.message for x in h.agent.refusals)
    h.assert_invariants()
    h.agent.break_mirror("C")  # nothing wedged: the administrative verbs work
    h.agent.resync("C")
    h.assert_invariants()
    settle(h)


@pytest.mark.parametrize("nth, role", [(1, "jump-ahead"), (2, "new-base")])
def test_a_refused_jump_ahead_pcpi_sends_the_replicas_in_done_out_of_the_cycle_I4(harness, nth, role):
    """The intermediate (1st destination PCPI of a cycle without failures) or the new base (2nd) is
    refused: the replicas in done leave the cycle (done_uncoalesced), exporting their last good image,
    a new replica whose baseline arrived exports nothing yet; all rejoin at the next jump-ahead."""
    h = harness()
    h.cycle()
    fill(h.writer, ["D"])
    h.agent.add_replica("D")
    old = h.exported_fingerprints()
    h.writer.write("A", "a-new", b"a" * 100)
    h.faults.add(
        Rule(hook="coalesce_snapshot_create", volume=h.config.destination, nth=nth, times=1, message="PCPI limit")
    )
    h.cycle()
    s = h.agent.state
    assert s.phase == "idle" and set(h.states().values()) == {"done_uncoalesced"}
    for r in s.replicas.values():
        assert f"the destination refused the {role} PCPI" in r.last_error and r.consecutive_failures == 0
        assert r.exported == r.last_good
    assert s.replicas["D"].exported is None and h.exported_fingerprints() == old
    assert h.cycle_pcpis_on_volume() == 1  # the coalesced base: no intermediate PCPI left behind (I1)
    h.assert_invariants()
    h.cycle()  # rejoin at this jump-ahead, with the image each already holds
    assert set(h.states().values()) == {"stable"}
    assert h.exported_fingerprints()["A"] == newest_image(h, "A") != old["A"]
    h.assert_invariants()
    settle(h)


def test_a_refused_retry_or_resync_pcpi_waits_for_the_next_retry_I2(harness):
    h = harness(retry_initial=10.0)
    h.cycle()
    old = h.exported_fingerprints()
    h.writer.write("C", "c.txt", b"c" * 3000)
    h.faults.add(Rule(hook="coalesce_diff", qtree="C", record=1, times=1, volume=h.config.source))
    h.faults.add(Rule(hook="coalesce_rollback", qtree="C", times=1))
    h.cycle()
    assert h.states()["C"] == "unstable_uncoalesced"
    h.clock.advance(11)
    h.faults.add(Rule(hook="coalesce_snapshot_create", volume=h.config.destination, times=1, message="PCPI limit"))
    h.agent.tick()  # due: its scratch PCPI is refused
    c = h.agent.state.replicas["C"]
    assert c.state == "unstable_uncoalesced" and c.retries == 1 and c.scratch is None
    assert c.next_retry == pytest.approx(h.clock.now + 20) and "PCPI limit" in c.last_error
    assert h.exported_fingerprints()["C"] == old["C"]
    h.assert_invariants()
    h.agent.break_mirror("A")
    h.faults.add(Rule(hook="coalesce_snapshot_create", volume=h.config.destination, times=1, message="PCPI limit"))
    h.agent.resync("A")  # the PCPI of its active FS is refused: it exports its last good image again
    a = h.agent.state.replicas["A"]
    assert a.state == "unstable_uncoalesced" and a.exported == a.last_good and a.scratch is None
    assert h.exported_fingerprints()["A"] == old["A"]
    h.assert_invariants()
    settle(h)


class OtherTool:
    """Another user of the destination volume, which takes ``n`` snapshots of its own while the
    cycle runs (when the cycle's source PCPI is taken)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.dest = None
        self.taken: list[str] = []

    @hookimpl
    def coalesce_pcpi_taken(self, group, volume, name, role):
        if role == "source" and self.dest is not None:
            for _ in range(self.n):
                self.taken.append(self.dest.snapshot_create(f"other-tool-{len(self.taken)}"))
            self.n = 0


#: the backends that declare a PCPI limit (btrfs declares none: it has no practical one)
LIMITED = pytest.mark.parametrize("backend", [on_backend("mem"), on_backend("sim")])


def fill_to_room(h: Harness, room: int) -> list[str]:
    """Foreign PCPIs on the destination until it can take only ``room`` more (its real limit)."""
    dest = h.agent.dest
    assert dest.max_pcpis is not None
    n = dest.max_pcpis - len(dest.snapshot_list()) - room
    return [dest.snapshot_create(f"foreign-{i}") for i in range(n)]


@LIMITED
def test_no_cycle_starts_without_pcpi_headroom_I1(harness):
    """The destination holds all but two of the PCPIs its backend allows (255 on mem and sim):
    no cycle starts, nothing is taken, every replica shows why; with room for three it runs."""
    h = harness()
    h.cycle()
    foreign = fill_to_room(h, 2)
    held, source_held = h.agent.dest.snapshot_list(), h.agent.source.snapshot_list()
    h.writer.write("A", "new", b"n" * 100)
    assert h.cycle() == {}
    s = h.agent.state
    assert s.phase == "idle" and s.cycle == 1
    assert h.agent.dest.snapshot_list() == held and h.agent.source.snapshot_list() == source_held
    assert all("can take 2 more PCPIs, a cycle needs 3" in r.last_error for r in s.replicas.values())
    (refusal,) = h.agent.refusals
    assert "not starting cycle 2" in refusal.message and refusal.hint
    h.assert_invariants()
    h.agent.dest.snapshot_delete(foreign[0])
    h.cycle()
    assert h.exported_fingerprints()["A"] == newest_image(h, "A")
    h.assert_invariants()


@LIMITED
def test_a_pcpi_the_full_destination_really_refuses_mid_cycle_I1(harness):
    """No injected fault: the cycle starts with room for exactly three PCPIs, another tool takes two
    while it runs, and the backend's own limit refuses the new base PCPI."""
    tool = OtherTool(2)
    h = harness(plugins=[tool])
    h.cycle()
    fill_to_room(h, 3)
    tool.dest = h.agent.dest
    h.writer.write("A", "new", b"n" * 100)
    h.cycle()
    assert len(tool.taken) == 2 and h.agent.state.phase == "idle"
    assert set(h.states().values()) == {"done_uncoalesced"}
    assert all("new-base PCPI" in r.last_error for r in h.agent.state.replicas.values())
    h.assert_invariants()
    for name in tool.taken:
        h.agent.dest.snapshot_delete(name)
    settle(h)


def test_an_unreleased_source_pcpi_is_released_by_a_later_cycle(harness):
    """The source goes down after the cycle's transfers: releasing its old PCPI fails, the cycle
    still finishes, and the next one releases it."""
    h = harness()
    h.cycle()
    first = h.agent.state.replicas["A"].source_point
    h.writer.write("A", "new", b"n" * 100)
    h.faults.add(Rule(hook="coalesce_snapshot_delete", volume=h.config.source, times=1, message="link down"))
    h.cycle()
    s = h.agent.state
    assert s.phase == "idle" and set(h.states().values()) == {"stable"}
    assert first in s.source_pcpis and first in h.agent.source.snapshot_list()
    assert any("link down" in x.message for x in h.agent.refusals)
    h.assert_invariants()
    h.cycle()
    ours = [n for n in h.agent.source.snapshot_list() if is_group_source_pcpi("g", n)]
    assert first not in h.agent.state.source_pcpis and first not in ours
    settle(h)
