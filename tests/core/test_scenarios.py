"""Scenario tests of the whole agent, on mem, sim, btrfs and zfs volumes (the ``backend`` fixture).

Each test names the invariants it checks (spec/invariants.md).  tests/net
runs the same functions with a remote source (ssh, tls).
"""

from __future__ import annotations

import threading

import pytest
from backends import backend_fixtures, on_backend

from coalesce_core.backend.faults import Rule
from coalesce_core.backend.hookspecs import ACTIVE, hookimpl
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill

backend, group_config = backend_fixtures("mem", "sim", "btrfs", "zfs")


@pytest.fixture
def harness(group_config):
    def make(**kw):
        h = Harness(group_config(**kw))
        fill(h.writer, [r.source for r in h.config.replicas])
        return h

    return make


class Gate:
    """Holds the apply of one qtree until the test opens the gate (Fig. 7's slow C)."""

    def __init__(self, qtree: str) -> None:
        self.qtree = qtree
        self.reached = threading.Event()
        self.open = threading.Event()

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume, qtree, records):
        if qtree == self.qtree and "dst" in str(volume):
            self.reached.set()
            assert self.open.wait(30), "gate never opened"
        return (yield)


def test_first_cycle_baselines_every_replica_and_exports_one_base(harness):
    """I1 (exactly one PCPI at rest), I3, I4, I9."""
    h = harness()
    h.cycle()
    assert h.states() == {"A": "stable", "B": "stable", "C": "stable"}
    exported = {r.exported for r in h.agent.state.replicas.values()}
    assert len(exported) == 1 and None not in exported
    assert h.cycle_pcpis_on_volume() == 1
    h.assert_invariants()


def test_fig7_readers_see_old_images_until_the_slowest_completes(group_config):
    """Fig. 7: A and B finish first but keep exporting the old base until C completes;
    then all three switch in ONE export call (I3, I4)."""
    gate = Gate("C")
    h = Harness(group_config(), plugins=[gate])
    fill(h.writer, ["A", "B", "C"])
    gate.open.set()
    h.cycle()
    gate.open.clear()
    gate.reached.clear()
    before = h.exported_fingerprints()
    old_base = h.agent.state.base().name
    for q in "ABC":
        h.writer.write(q, "fig7.txt", f"new content of {q}".encode())
    exports_before = len(h.recorder.exports)
    t = threading.Thread(target=h.cycle)
    t.start()
    assert gate.reached.wait(30)
    # A and B are done (or about to be); C is held mid-update
    for _ in range(3000):  # up to 30 s: a loaded machine (or a remote source) may take a while
        if h.agent.state.replicas["A"].state == "done" and h.agent.state.replicas["B"].state == "done":
            break
        threading.Event().wait(0.01)
    assert h.agent.state.replicas["A"].state == "done"
    assert h.agent.state.replicas["B"].state == "done"
    assert h.agent.state.replicas["C"].state == "update"
    assert h.agent.dest.exported() == {"A": old_base, "B": old_base, "C": old_base}
    assert h.exported_fingerprints() == before  # readers still see the old images
    gate.open.set()
    t.join(30)
    assert not t.is_alive()
    after = h.exported_fingerprints()
    assert all(after[q] != before[q] for q in "ABC")
    switches = h.recorder.exports[exports_before:]
    assert len(switches) == 1 and len(set(switches[0].values())) == 1  # one atomic switch, one PCPI
    h.assert_invariants()


def test_failed_update_rolls_back_with_one_rollback_pcpi(harness):
    """Fig. 9: B's transfer dies at its 2nd record; B rolls back to the coalesced base and
    still joins the jump-ahead; exactly one rollback PCPI is taken (I1, I3, I9)."""
    h = harness()
    h.cycle()
    old = h.exported_fingerprints()
    h.writer.write("B", "big", b"x" * 5000)
    h.writer.write("C", "c.txt", b"c")
    h.faults.add(Rule(hook="coalesce_diff", qtree="B", record=2, times=1, volume="src"))
    h.faults.add(Rule(hook="coalesce_rollback", qtree="C", times=0))  # never fires: C does not roll back
    report = h.cycle()
    trans = [t for t in h.recorder.transitions if t[0] == "B"]
    assert ("B", "update_failed", "update", "rollback") in trans
    assert ("B", "rollback_succeeded", "rollback", "done") in trans
    assert h.states()["B"] == "stable"
    rollback_pcpis = [n for n in report["pcpis_taken"] if n.endswith("-rollback")]
    assert len(rollback_pcpis) == 1
    assert report["failures"] == 1
    new = h.exported_fingerprints()
    assert new["B"] == old["B"]  # B still shows its previous image
    assert new["C"] != old["C"]
    h.assert_invariants()
    h.cycle()  # the next cycle brings B up to date
    assert h.exported_fingerprints()["B"] != old["B"]
    h.assert_invariants()


def test_all_failed_updates_share_one_rollback_pcpi(harness):
    h = harness()
    h.cycle()
    for q in "ABC":
        h.writer.write(q, "x", b"12345")
        h.faults.add(Rule(hook="coalesce_diff", qtree=q, record=1, times=1, volume="src"))
    report = h.cycle()
    assert len([n for n in report["pcpis_taken"] if n.endswith("-rollback")]) == 1
    assert set(h.states().values()) == {"stable"}
    h.assert_invariants()


def test_failed_rollback_leaves_the_cycle_retries_and_rejoins(harness):
    """1022 -> 1024 (exports its pinned individual PCPI) -> 1026 retry fails -> 1028 -> 1030 -> 1032 (I2)."""
    h = harness(retry_initial=10.0)
    h.cycle()
    old = h.exported_fingerprints()
    h.writer.write("C", "c.txt", b"c" * 3000)
    h.faults.add(Rule(hook="coalesce_diff", qtree="C", record=1, times=1, volume="src"))
    h.faults.add(Rule(hook="coalesce_rollback", qtree="C", times=2))
    h.cycle()
    c = h.agent.state.replicas["C"]
    assert c.state == "unstable_uncoalesced"
    assert c.exported == c.last_good and c.exported in h.agent.dest.snapshot_list()
    assert h.agent.state.pcpis[c.exported].role == "individual"
    assert h.exported_fingerprints()["C"] == old["C"]  # its last good image is still exported
    h.assert_invariants()
    h.agent.tick()  # not due yet: backoff
    assert h.agent.state.replicas["C"].retries == 0
    h.clock.advance(11)
    h.agent.tick()  # due: the retry fails (2nd rollback fault)
    c = h.agent.state.replicas["C"]
    assert c.state == "unstable_uncoalesced" and c.retries == 1
    assert c.next_retry == pytest.approx(h.clock.now + 20)  # exponential backoff: 10 * 2
    h.assert_invariants()
    h.clock.advance(21)
    h.agent.tick()
    assert h.agent.state.replicas["C"].state == "stable_uncoalesced"
    h.assert_invariants()
    h.cycle()  # rejoins at the jump-ahead, then is brought up to date next cycle
    assert h.states()["C"] == "stable"
    h.cycle()
    assert h.exported_fingerprints()["C"] != old["C"]
    assert not [p for p in h.agent.state.pcpis.values() if p.role == "individual"]
    h.assert_invariants()


def test_new_replica_baseline_joins_at_the_next_jump_ahead(harness):
    h = harness()
    h.cycle()
    h.writer.ensure_qtree("D")
    h.writer.write("D", "d/1", b"dddd")
    h.agent.add_replica("D")
    assert h.states()["D"] == "uninitialized"
    assert h.agent.dest.exported().get("D") is None
    h.cycle()
    assert h.states()["D"] == "stable"
    assert ("D", "baseline_succeeded", "baseline", "done") in h.recorder.transitions
    assert len({r.exported for r in h.agent.state.replicas.values()}) == 1
    h.assert_invariants()


def test_failed_baseline_removes_partial_data_and_retries_next_cycle(harness):
    h = harness()
    h.faults.add(Rule(hook="coalesce_diff", qtree="B", record=3, times=1, volume="src"))
    h.cycle()
    assert h.states()["B"] == "uninitialized"
    assert "B" not in h.agent.dest.qtree_list(None)
    assert h.agent.dest.exported().get("B") is None
    h.assert_invariants()
    h.cycle()
    assert h.states()["B"] == "stable"
    h.assert_invariants()


def test_break_and_resync(harness):
    """break_mirror: writable, exports the active FS; resync: a PCPI of it is taken and
    exported, then the rollback procedure returns it to the last common image (I2, I5)."""
    h = harness()
    h.cycle()
    good = h.exported_fingerprints()["A"]
    h.agent.break_mirror("A")
    assert h.agent.dest.exported()["A"] == ACTIVE
    a = h.agent.state.replicas["A"]
    assert a.state == "broken" and a.last_good
    # the administrator writes into the broken replica
    from coalesce_core.testing.workload import SourceWriter

    SourceWriter(h.agent.dest).write("A", "local-change", b"written on the destination")
    h.writer.write("B", "b2", b"bb")
    h.cycle()  # A does not take part; its last good image stays pinned
    assert h.states()["A"] == "broken"
    h.assert_invariants()
    h.agent.resync("A")
    a = h.agent.state.replicas["A"]
    assert a.state == "stable_uncoalesced"
    assert h.agent.dest.fingerprint("A", None) == good  # the local change was rolled back
    h.assert_invariants()
    h.cycle()
    h.cycle()
    assert h.states()["A"] == "stable"
    h.assert_invariants()


#: backends whose rollback restores the qtree from the PCPI itself (a snapshot swap, sim's CP), so
#: nothing written after the scratch PCPI survives it; the others roll back by the scratch's diff
NATIVE_ROLLBACK = ("sim", "btrfs")


@pytest.mark.parametrize("asked", ["verb", "request"])
def test_a_write_after_the_resync_fence_is_caught_and_undone_by_the_retry_I9_I3(group_config, backend, asked):
    """docs/decisions.md, "Resync fences first": the broken replica exports its last good image
    before the scratch PCPI is taken; a writer that kept a file of the active FS open writes after
    that PCPI (here: when it is taken), so the rollback leaves its write; the check of the rolled-
    back active FS against the restored image fails the attempt with the path, the export never
    moves off the last good image, and the retry's new scratch holds the write and undoes it.  A
    resync handed to a running agent (coalesce_core/requests.py) takes the same fenced path."""
    from coalesce_core.backend.manager import plugin_manager
    from coalesce_core.backend.volume import Volume
    from coalesce_core.testing.workload import SourceWriter

    seen: list[object] = []

    class LateWriter:
        armed = False

        @hookimpl
        def coalesce_pcpi_taken(self, group, volume, name, role):
            if self.armed and role in ("individual", "kept"):
                self.armed = False
                seen.append(h.agent.dest.exported()["A"])  # the fence came first
                SourceWriter(Volume.open(plugin_manager(), h.config.destination)).write("A", "late", b"late")

    late = LateWriter()
    h = Harness(group_config(), plugins=[late])
    fill(h.writer, [r.source for r in h.config.replicas])
    h.cycle()
    good = h.exported_fingerprints()["A"]
    h.agent.break_mirror("A")
    last_good = h.agent.state.replicas["A"].last_good
    SourceWriter(h.agent.dest).write("A", "local-change", b"written on the destination")
    writes = h.agent.dest.fingerprint("A", None)
    late.armed = True
    if asked == "verb":
        h.agent.resync("A")
    else:
        h.agent.ledger.ask("resync", {"replica": "A"}, h.clock(), 4242)
        (answer,) = h.agent.take_requests()
        assert answer.status == "done", answer
    a = h.agent.state.replicas["A"]
    kept = h.agent.state.kept_pcpi("A")  # the local change is kept, the late write is not (I11)
    assert kept is not None and h.agent.dest.fingerprint("A", kept.name) == writes
    assert seen == [last_good]
    assert a.exported == last_good and a.scratch is None and h.exported_fingerprints()["A"] == good
    if backend not in NATIVE_ROLLBACK:
        assert a.state == "unstable_uncoalesced"
        assert "the rolled-back active FS differs" in a.last_error and "late" in a.last_error, a.last_error
        h.clock.advance(3600)
        h.agent.tick()  # the retry: its scratch holds the late write
        a = h.agent.state.replicas["A"]
    assert a.state == "stable_uncoalesced", a.last_error
    assert h.agent.dest.fingerprint("A", None) == good  # the local change and the late write are gone
    h.cycle()
    h.cycle()
    assert h.states()["A"] == "stable" and h.agent.state.kept_pcpi("A") == kept
    h.assert_invariants()


def test_illegal_requests_are_clear_errors(harness):
    from coalesce_core.errors import CoalesceError, IllegalTransition

    h = harness()
    h.cycle()
    with pytest.raises(IllegalTransition, match="replica 'A' is in state 'stable'.*'resync'"):
        h.agent.resync("A")
    with pytest.raises(CoalesceError, match="no replica 'Z'"):
        h.agent.break_mirror("Z")


def test_a_replica_that_cannot_apply_its_stream_is_reseeded(harness):
    """Every update of B fails (a stream the destination can never apply): the failure shows
    (last_error, consecutive_failures) through the rollback and the jump-ahead; after
    reseed_after = 2 failed updates in a row B leaves the cycle still exporting its last good
    image (I3, pinned: I2), a later cycle re-seeds it by a baseline from its source PCPI, and it
    rejoins exporting that image; A and C are brought up to date every cycle (I7)."""
    h = harness(reseed_after=2)
    h.cycle()
    good = h.exported_fingerprints()["B"]
    h.faults.add(Rule(hook="coalesce_diff", qtree="B", volume="src", updates_only=True, message="cannot apply"))
    points = []

    def cycle(i: int) -> None:
        for q in "ABC":
            h.writer.write(q, f"round-{i}", f"{q}{i}".encode() * 500)
        h.cycle()
        h.assert_invariants()  # I3 compares every export with the source point the ledger names
        s = h.agent.state
        points.append(max(h.writer.snapshots))
        for q in "AC":  # the others are unaffected
            assert s.replicas[q].source_point == points[-1]
            assert h.exported_fingerprints()[q] == h.writer.snapshots[points[-1]][q]

    cycle(1)
    b = h.agent.state.replicas["B"]
    assert (b.state, b.consecutive_failures) == ("stable", 1) and "update failed" in b.last_error
    assert "cannot apply" in b.last_error and h.exported_fingerprints()["B"] == good
    cycle(2)
    b = h.agent.state.replicas["B"]
    assert (b.state, b.consecutive_failures) == ("reseed_pending", 2) and b.last_error
    assert h.exported_fingerprints()["B"] == good  # its last good image, pinned as its individual PCPI
    assert h.agent.state.pcpis[b.exported].role == "individual"
    assert ("B", "request_reseed", "done", "reseed_pending") in h.recorder.transitions
    cycle(3)  # the re-seed: a baseline of B from this cycle's source PCPI (updates still fail)
    b = h.agent.state.replicas["B"]
    assert b.state in ("reseeded", "stable")  # it rejoins at this jump-ahead if it arrived before it
    assert (b.last_error, b.consecutive_failures) == ("", 0) and b.last_success
    cycle(4)
    b = h.agent.state.replicas["B"]
    assert b.state == "stable"  # joined here, or joined in cycle 3 and its update failed again
    assert b.source_point == points[2]  # the image of the re-seed's source PCPI: newer than before
    assert h.exported_fingerprints()["B"] == h.writer.snapshots[points[2]]["B"] != good
    h.faults.clear()
    cycle(5)
    b = h.agent.state.replicas["B"]
    assert (b.state, b.source_point, b.last_error) == ("stable", points[-1], "")
    assert not [p for p in h.agent.state.pcpis.values() if p.role == "individual"]


def test_reseed_on_request_keeps_the_last_good_image_exported(harness):
    """`coalesce reseed` (Agent.reseed): out of the cycle at once, the image it exported stays
    exported (the base, pinned); a second request while it is pending changes nothing; the next
    cycle re-seeds it; refused with a clear error for a replica that has no image yet."""
    from coalesce_core.cycle.planner import NotNow

    h = harness()
    h.cycle()
    good = h.exported_fingerprints()
    h.agent.reseed("A", "operator")
    h.agent.reseed("A", "again")
    a = h.agent.state.replicas["A"]
    assert (a.state, a.reseed_reason, a.exported) == ("reseed_pending", "operator", h.agent.state.base().name)
    h.assert_invariants()
    h.writer.write("A", "more", b"m" * 100)
    h.cycle()
    assert h.exported_fingerprints()["A"] in (good["A"], h.writer.snapshots[max(h.writer.snapshots)]["A"])
    h.assert_invariants()
    h.cycle()
    assert set(h.states().values()) == {"stable"}
    assert h.exported_fingerprints()["A"] == h.writer.snapshots[max(h.writer.snapshots)]["A"]
    h.assert_invariants()
    h.writer.ensure_qtree("D")
    h.agent.add_replica("D")
    with pytest.raises(NotNow, match="has no image yet"):
        h.agent.reseed("D", "x")


@pytest.mark.parametrize(
    ("backend", "n"),
    [on_backend("mem", 300), on_backend("sim", 300), on_backend("btrfs", 300), on_backend("zfs", 100)],
    indirect=["backend"],
)
def test_many_replicas_never_more_than_four_cycle_pcpis(group_config, n):
    """I1 for 300 replicas (100 on zfs-fuse, which needs about 0.2 s per qtree and cycle): <= 4 PCPIs in
    cycle roles at every instant, exactly 1 at rest."""
    names = [f"q{i:03d}" for i in range(n)]
    peak = {"n": 0}

    class Count:
        def __init__(self):
            self.h = None

        @hookimpl
        def coalesce_pcpi_taken(self, group, volume, name, role):
            if self.h is not None and role != "source":
                peak["n"] = max(peak["n"], self.h.cycle_pcpis_on_volume() + 0)

    counter = Count()
    h = Harness(group_config(replicas=names, parallel=8), plugins=[counter])
    counter.h = h
    for q in names:
        h.writer.write(q, "f", q.encode())
    for i in range(2):
        for q in names[i::7]:
            h.writer.write(q, "f", f"{q}-{i}".encode())
        h.faults.add(Rule(hook="coalesce_diff", qtree=names[i], record=1, times=1, volume="src"))
        h.cycle()
        assert h.cycle_pcpis_on_volume() == 1
    assert 1 <= peak["n"] <= 4
    assert set(h.states().values()) == {"stable"}
    h.assert_invariants()
