"""Stragglers leave the cycle (docs/decisions.md, "Stragglers leave the cycle"), on mem and sim volumes.

With ``[group] straggler_after`` the agent hands an update still running that long after the cycle
started to the planner (``StragglerDue``); the others' new images are exported in that cycle while the
slow one's transfer goes on, and the slow one rejoins at the next jump-ahead. Without it the cycle waits
for the slowest update (Fig. 7). The destination never holds more than 4 cycle PCPIs (I1).
"""

from __future__ import annotations

import threading
import time

import attrs
import pytest
from backends import backend_fixtures

from coalesce_core import crashpoints
from coalesce_core.backend.faults import Rule
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill

backend, group_config = backend_fixtures("mem", "sim")


class SlowApply:
    """Holds the apply of one qtree on the destination until ``release`` is set (a slow transfer)."""

    def __init__(self, qtree: str) -> None:
        self.qtree = qtree
        self.armed = False
        self.reached = threading.Event()
        self.release = threading.Event()
        self.applying = threading.Event()  # set while the held apply has not returned

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume, qtree, records):
        if not (self.armed and qtree == self.qtree and "dst" in str(volume)):
            return (yield)
        self.applying.set()
        self.reached.set()
        try:
            assert self.release.wait(30), "the slow apply was never released"
            return (yield)
        finally:
            self.applying.clear()


class CycleWatch:
    """At every destination PCPI take, how many cycle-role PCPIs the volume holds (I1); at the end of
    the cycle (``finish_cycle``), what readers see and whether the slow apply still runs, then it lets
    the slow apply go on."""

    def __init__(self, slow: SlowApply) -> None:
        self.slow = slow
        self.h: Harness | None = None
        self.max_cycle_pcpis = 0
        self.at_finish: list[dict] = []
        self.crash_at_finish = False

    @hookimpl
    def coalesce_pcpi_taken(self, group, volume, name, role):
        if self.h is not None and role != "source":
            self.max_cycle_pcpis = max(self.max_cycle_pcpis, self.h.cycle_pcpis_on_volume())

    @hookimpl
    def coalesce_phase_changed(self, group, trigger, source, dest):
        if trigger != "finish_cycle" or self.h is None:
            return
        h = self.h
        self.at_finish.append(
            {
                "states": h.states(),
                "fingerprints": h.exported_fingerprints(),
                "exported": dict(h.agent.dest.exported()),
                "slow_still_applying": self.slow.applying.is_set(),
            }
        )
        self.slow.release.set()
        if self.crash_at_finish:
            raise crashpoints.SimulatedCrash("the end of the cycle a straggler left")


def _harness(
    group_config, straggler_after: float | None, retention: str | None = None
) -> tuple[Harness, SlowApply, CycleWatch]:
    slow = SlowApply("C")
    watch = CycleWatch(slow)
    config = attrs.evolve(group_config(retention=retention), straggler_after=straggler_after)
    h = Harness(config, plugins=[slow, watch], clock=time.time)  # a real clock: the deadline must pass
    watch.h = h
    fill(h.writer, ["A", "B", "C"])
    h.cycle()  # the baselines, nothing held
    assert h.states() == {"A": "stable", "B": "stable", "C": "stable"}
    for q in "ABC":
        h.writer.write(q, "news.txt", f"the new content of {q}".encode())
    slow.armed = True
    slow.release.clear()
    watch.at_finish.clear()
    return h, slow, watch


def test_a_straggler_leaves_the_cycle_and_rejoins_at_the_next_jump_ahead_I1_I3(group_config, backend):
    h, slow, watch = _harness(group_config, straggler_after=0.3)
    old_base = h.agent.state.base()
    assert old_base is not None
    h.cycle()
    # at the end of that cycle C's transfer still ran, and A and B already showed their new images
    (end,) = watch.at_finish
    assert end["slow_still_applying"], "the cycle waited for the slow update"
    assert end["states"] == {"A": "stable", "B": "stable", "C": "update_uncoalesced"}
    new_base = end["exported"]["A"]
    assert new_base != old_base.name and end["exported"] == {"A": new_base, "B": new_base, "C": old_base.name}
    for q in "AB":
        assert end["fingerprints"][q] == h.writer.expected_fingerprint(q)
    assert end["fingerprints"]["C"] != h.writer.expected_fingerprint("C")  # its last good image
    # `run --once` returned only once the straggler's transfer ended: it waits for the next jump-ahead
    assert not slow.applying.is_set()
    c = h.agent.state.replicas["C"]
    assert (c.state, c.exported, c.last_good) == ("done_uncoalesced", old_base.name, old_base.name)
    assert h.agent.state.pcpis[old_base.name].role == "individual"
    h.assert_invariants()
    # the next cycle's jump-ahead takes it in, with the image its transfer brought
    slow.armed = False
    h.cycle()
    assert h.states() == {"A": "stable", "B": "stable", "C": "stable"}
    assert h.exported_fingerprints()["C"] == h.writer.expected_fingerprint("C")
    assert old_base.name not in h.agent.dest.snapshot_list()
    assert h.cycle_pcpis_on_volume() == 1 and watch.max_cycle_pcpis <= 4
    h.assert_invariants()
    triggers = [(r, t) for r, t, _s, _d in h.recorder.transitions if r == "C"]
    assert triggers[-4:] == [
        ("C", "start_update"),
        ("C", "straggle"),
        ("C", "straggler_succeeded"),
        ("C", "jump_ahead"),
    ]


def test_without_straggler_after_the_cycle_waits_for_the_slowest_update(group_config, backend):
    h, slow, watch = _harness(group_config, straggler_after=None)
    timer = threading.Timer(0.5, slow.release.set)  # the slow update ends after a while
    timer.start()
    try:
        h.cycle()
    finally:
        timer.cancel()
    (end,) = watch.at_finish
    assert not end["slow_still_applying"]
    assert end["states"] == {"A": "stable", "B": "stable", "C": "stable"}
    assert len(set(end["exported"].values())) == 1
    assert all(end["fingerprints"][q] == h.writer.expected_fingerprint(q) for q in "ABC")
    order = [(r, t) for r, t, _s, _d in h.recorder.transitions]
    assert order.index(("C", "update_succeeded")) < order.index(("A", "jump_ahead"), order.index(("C", "start_update")))
    assert ("C", "straggle") not in order and watch.max_cycle_pcpis <= 4
    h.assert_invariants()


def test_a_straggler_whose_transfer_fails_is_rolled_back_outside_the_cycle_I2(group_config, backend):
    """C straggles, then its transfer fails (its first change record): it exports its last good image
    throughout, the retries of loop 1026 roll its active FS back, and it rejoins the cycle."""
    h, slow, watch = _harness(group_config, straggler_after=0.3)
    old_base = h.agent.state.base()
    assert old_base is not None
    before = h.exported_fingerprints()["C"]
    h.faults.add(Rule(hook="coalesce_diff", qtree="C", record=1, times=1, volume="src"))
    report = h.cycle()
    assert report["states"] == {"stable": 2, "update_uncoalesced": 1}
    c = h.agent.state.replicas["C"]
    assert (c.state, c.exported, c.last_good) == ("unstable_uncoalesced", old_base.name, old_base.name)
    assert h.agent.failures[-1]["replica"] == "C" and h.agent.failures[-1]["trigger"] == "straggler_failed"
    assert [p.name for p in h.agent.state.pcpis.values() if p.role == "individual"] == [old_base.name]
    assert h.exported_fingerprints()["C"] == before  # its readers never saw the failed update
    h.agent.tick()  # loop 1026: a scratch PCPI (its second, I2), a rollback to its last good image
    assert h.agent.state.replicas["C"].state == "stable_uncoalesced"
    h.assert_invariants()
    slow.armed = False
    h.cycle()  # it rejoins with its last good image (stale, as a retried replica does) ...
    assert h.states() == {"A": "stable", "B": "stable", "C": "stable"}
    assert h.exported_fingerprints()["C"] == before
    h.cycle()  # ... and the next cycle updates it
    assert h.exported_fingerprints()["C"] == h.writer.expected_fingerprint("C")
    assert watch.max_cycle_pcpis <= 4
    h.assert_invariants()


def test_a_crash_while_a_straggler_transfers_is_recovered_from_the_ledger_I6(group_config, backend):
    """The agent dies at the end of the cycle a straggler left, its transfer still running: the restart
    knows only the ledger (update_uncoalesced), so the straggler's active FS counts as partial; it
    exports its last good image, loop 1026 rolls it back, and it rejoins the cycle."""
    h, slow, watch = _harness(group_config, straggler_after=0.3)
    old_base = h.agent.state.base()
    assert old_base is not None
    before = h.exported_fingerprints()["C"]
    watch.crash_at_finish = True
    with pytest.raises(crashpoints.SimulatedCrash):
        h.cycle()
    watch.crash_at_finish = False
    h.restart()
    c = h.agent.state.replicas["C"]
    assert (c.state, c.exported, c.last_good) == ("unstable_uncoalesced", old_base.name, old_base.name)
    assert "restart" in c.last_error and h.agent.state.phase == "idle"
    assert h.exported_fingerprints()["C"] == before
    h.assert_invariants()
    slow.armed = False
    h.cycle()  # its due retry first (run --once ticks), then the cycle it rejoins in
    h.cycle()
    assert h.states() == {"A": "stable", "B": "stable", "C": "stable"}
    assert h.exported_fingerprints()["C"] == h.writer.expected_fingerprint("C")
    assert watch.max_cycle_pcpis <= 4
    h.assert_invariants()


def test_the_generation_a_straggler_left_records_it_outside_and_the_next_one_updated(group_config, backend):
    """With [retention]: C straggles in cycle 2, so the coalesced image of that jump-ahead holds C's
    active FS with its update under way, no source point: its manifest records C ``outside`` (no source
    PCPI; C's readers saw its last good image, the image of cycle 1), A and B updated. C rejoins at the
    next jump-ahead with the image its transfer brought: that image's manifest records C ``updated`` at
    the source PCPI of cycle 2, older than the one A and B hold (unchanged, at cycle 3's)."""
    from coalesce_core.cycle import generations as gen

    h, slow, watch = _harness(group_config, straggler_after=1.0, retention='keep_min = "30d"\nmax = 10')
    first = {r.name: r.source_point for r in h.agent.state.replicas.values()}
    h.cycle()
    assert watch.at_finish[0]["states"]["C"] == "update_uncoalesced"
    left = h.agent.state.base()
    assert left is not None
    straggled = h.agent.state.replicas["A"].source_point
    assert straggled not in (None, first["C"])
    slow.armed = False
    h.cycle()  # C rejoins
    rejoined = h.agent.state.base()
    assert rejoined is not None
    now = h.agent.state.replicas["A"].source_point
    h.cycle()  # both images are generations now
    s = h.agent.state
    assert {left.name, rejoined.name} <= {p.name for p in s.generations()}
    entries = {e.replica: (e.status, e.source_point) for e in s.manifests[left.name].entries}
    assert entries == {"A": ("updated", straggled), "B": ("updated", straggled), "C": ("outside", None)}
    assert s.manifests[left.name].fresh == 2
    entries = {e.replica: (e.status, e.source_point) for e in s.manifests[rejoined.name].entries}
    assert entries == {"A": ("unchanged", now), "B": ("unchanged", now), "C": ("updated", straggled)}
    assert s.manifests[rejoined.name].fresh == 3
    assert {g.id: g.fresh for g in gen.as_retained(s)}[left.name] == 2
    assert h.exported_fingerprints()["C"] == h.writer.expected_fingerprint("C")
    h.assert_invariants()
