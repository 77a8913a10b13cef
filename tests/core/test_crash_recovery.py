"""A crash at every named crash point, then a restart from the ledger (I6), on mem, btrfs and zfs volumes.

In-process: the armed point raises SimulatedCrash, the agent is abandoned and
a new one is opened on the same volumes.  After the restart, and again
after the group is driven to rest, I1-I5, I8 and I9 hold (checked against the
volumes and the writer's own record of the source), no exported image was
lost, and no PCPI leaked.
"""

from __future__ import annotations

import pytest
from backends import backend_fixtures, on_backend

from coalesce_core.backend.faults import Rule
from coalesce_core.crashpoints import CRASH_POINTS, FAN_IN_POINTS, STRAGGLER_POINTS
from coalesce_core.cycle import generations
from coalesce_core.stream import records as R
from coalesce_core.testing.harness import FakeClock, Harness
from coalesce_core.testing.workload import fill

#: the points a cycle passes (the others: a baseline, a retry or resync, a re-seed, kept writes, a cycle of
#: several sources or with a straggler: tests/core/test_crash_recovery_fan_in.py)
OTHER_POINTS = (
    "mid_baseline",
    "mid_retry",
    "mid_reseed",
    "after_kept_pcpi",
    "after_kept_release",
    *FAN_IN_POINTS,
    *STRAGGLER_POINTS,
)
CYCLE_POINTS = [p for p in CRASH_POINTS if p not in OTHER_POINTS]


backend, group_config = backend_fixtures("mem", "btrfs", "zfs")


def _settle(h: Harness) -> None:
    assert isinstance(h.clock, FakeClock)  # the harness's default clock (the tests pass none)
    for _ in range(4):
        h.clock.advance(1000)
        h.cycle()
        points = {r.source_point for r in h.agent.state.replicas.values()}
        if set(h.states().values()) == {"stable"} and len(points) == 1:
            break  # every replica at the newest source point (I7)
    assert set(h.states().values()) == {"stable"}, h.states()
    assert h.cycle_pcpis_on_volume() == 1
    assert len(h.agent.dest.snapshot_list()) == 1  # nothing leaked
    assert len(h.agent.source.snapshot_list()) == 1
    h.assert_invariants()


def _prepared(group_config, **kw) -> Harness:
    h = Harness(group_config(**kw))
    fill(h.writer, "ABC")
    h.cycle()
    for q in "ABC":
        h.writer.write(q, "dir0/file0", f"second version of {q}".encode() * 50)
        h.writer.write(q, f"new-{q}", b"n" * 2000)
    h.writer.delete("A", "dir1")
    h.faults.add(Rule(hook="coalesce_diff", qtree="B", record=3, times=1, volume="src"))
    return h


@pytest.mark.parametrize(
    ("backend", "nth"),
    [on_backend("mem", 1), on_backend("mem", 2), on_backend("btrfs", 1), on_backend("btrfs", 2), on_backend("zfs", 1)],
    indirect=["backend"],
)
@pytest.mark.parametrize("point", CYCLE_POINTS)
def test_crash_in_a_cycle_then_restart(group_config, point, nth):
    """Each crash point at its first pass, and at its second on mem and btrfs (zfs-fuse is slow)."""
    h = _prepared(group_config)
    before = h.exported_fingerprints()
    crashed = h.crash(f"{point}:{nth}", h.cycle)
    if nth == 1:
        assert crashed, f"the scenario never reached {point}"
    h.assert_invariants()
    after = h.exported_fingerprints()
    for name, f in after.items():  # every export is a complete image: the old or the new one
        assert f is not None
    assert set(after) == set(before)
    _settle(h)


@pytest.mark.parametrize("point", CYCLE_POINTS)
def test_crash_in_a_cycle_with_spools_then_restart(group_config, point):
    """The same with spooled updates: an interrupted update resumes in the same cycle."""
    h = _prepared(group_config, spool=True)
    before = h.exported_fingerprints()
    assert h.crash(point, h.cycle), f"the scenario never reached {point}"
    h.assert_invariants()
    assert set(h.exported_fingerprints()) == set(before)
    assert h.agent.spool.replicas() == [] or h.agent.state.phase != "idle"
    _settle(h)
    assert h.agent.spool.replicas() == []


def _with_generations(group_config) -> Harness:
    """A group keeping hourly generations (keep = "3h"), two of them made, and a cycle ready whose
    release step demotes the base and prunes the oldest generation (B's update fails)."""
    h = _prepared(group_config, retention='keep = "3h"')
    h.faults.clear()
    assert isinstance(h.clock, FakeClock)
    for i in range(2):
        h.clock.advance(3600)
        h.writer.write("C", f"hour-{i}", b"c" * 300)
        h.cycle()
    assert len(h.agent.state.generations()) == 2
    h.clock.advance(3600)
    for q in "AB":
        h.writer.write(q, "dir0/file0", f"third version of {q}".encode() * 50)
        h.writer.write(q, f"newer-{q}", b"n" * 2000)
    h.faults.add(Rule(hook="coalesce_diff", qtree="B", record=3, times=1, volume="src"))
    return h


def _consistent_generations(h: Harness) -> None:
    """I1 with generations: the volume holds the base and exactly the generations the ledger records,
    each with its manifest, and those are what retention.plan keeps."""
    s = h.agent.state
    base = s.base()
    assert base is not None
    held = {n for n in h.agent.dest.snapshot_list()}
    gens = {p.name for p in s.generations()}
    assert held == gens | {base.name}, (held, gens)
    assert set(s.manifests) == held
    assert {g.id for g in generations.prune(s, s.manifests[base.name].time).kept} == gens


@pytest.mark.parametrize("backend", [on_backend("mem"), on_backend("sim")], indirect=True)
@pytest.mark.parametrize("point", CYCLE_POINTS)
def test_crash_in_a_cycle_that_retains_and_prunes_generations(group_config, point):
    """At every crash point of a cycle whose release step turns the old base into a generation and
    prunes one: after the restart the ledger and the volume agree on every generation, and after the
    group settled the generations are exactly what the policy keeps, none leaked, none lost."""
    h = _with_generations(group_config)
    before = {p.name for p in h.agent.state.generations()}
    old_base = h.agent.state.base()
    crashed = h.crash(point, h.cycle)
    # sim rolls back natively (docs/sim.md): its rollback applies no records to crash between
    assert crashed or (point == "mid_rollback" and h.config.destination.startswith("sim:")), point
    h.assert_invariants()
    s = h.agent.state
    held = set(h.agent.dest.snapshot_list())
    for p in s.pcpis.values():  # every generation recorded and not on its way out is on the volume
        if p.role == "generation" and not p.releasing:
            assert p.name in held and p.name in s.manifests
    for _ in range(3):
        h.clock.advance(3600)
        h.cycle()
        if set(h.states().values()) == {"stable"}:
            break
    h.assert_invariants()
    _consistent_generations(h)
    assert old_base is not None and old_base.name in {p.name for p in h.agent.state.generations()}
    assert before - {p.name for p in h.agent.state.generations()}  # the oldest was pruned


def test_crash_mid_baseline(group_config):
    h = Harness(group_config())
    fill(h.writer, "ABC", files=6)
    assert h.crash("mid_baseline:4", h.cycle)
    assert h.agent.dest.exported().get("A") in (None,)  # nothing partial is exported
    h.assert_invariants()
    _settle(h)


def _retry_due(group_config) -> Harness:
    """C's transfer and its rollback failed (unstable_uncoalesced) and its retry is due: the next
    ``h.agent.tick`` runs it."""
    h = Harness(group_config(retry_initial=5))
    fill(h.writer, "ABC")
    h.cycle()
    h.writer.write("C", "x", b"x" * 100)
    h.faults.add(Rule(hook="coalesce_diff", qtree="C", record=2, times=1, volume="src"))
    h.faults.add(Rule(hook="coalesce_rollback", qtree="C", times=1))
    h.cycle()
    assert h.states()["C"] == "unstable_uncoalesced"
    assert isinstance(h.clock, FakeClock)
    h.clock.advance(10)
    return h


def test_crash_mid_retry(group_config):
    h = _retry_due(group_config)
    assert h.crash("mid_retry", h.agent.tick)
    c = h.agent.state.replicas["C"]
    assert c.state == "unstable_uncoalesced" and c.scratch is None  # the scratch PCPI was released
    h.assert_invariants()
    h.clock.advance(100)
    h.agent.tick()
    assert h.states()["C"] == "stable_uncoalesced"
    _settle(h)


@pytest.mark.parametrize("nth", [1, 3])
def test_crash_mid_reseed(group_config, nth):
    """A crash in the middle of a re-seed: the replica still exports its last good image; after
    the restart it waits (reseed_pending) and the next cycle re-seeds it from scratch (I6)."""
    h = Harness(group_config())
    fill(h.writer, "ABC", files=6)
    h.cycle()
    good = h.exported_fingerprints()["B"]
    h.agent.reseed("B", "test")
    h.writer.write("B", "x", b"x" * 100)
    assert h.crash(f"mid_reseed:{nth}", h.cycle)
    b = h.agent.state.replicas["B"]
    assert b.state == "reseed_pending" and b.target is None and b.last_error == "re-seed interrupted by a restart"
    assert h.exported_fingerprints()["B"] == good
    h.assert_invariants()
    _settle(h)
    assert h.agent.state.replicas["B"].last_error == ""


def _broken_with_writes(group_config) -> tuple[Harness, str, str | None]:
    """A broken and written to (a new file): returns the fingerprints of its active FS then and of
    its last good image."""
    h = Harness(group_config())
    fill(h.writer, "ABC")
    h.cycle()
    good = h.exported_fingerprints()["A"]
    h.agent.break_mirror("A")
    dest = h.agent.dest
    dest.apply(
        "A",
        R.framed(
            "A",
            None,
            "admin",
            [R.MkFile(path="kept-file", mode=0o644), R.Write(path="kept-file", offset=0, data=b"w" * 300)],
        ),
        use_purgatory=False,
    )
    return h, dest.fingerprint("A", None), good


def test_crash_during_resync(group_config):
    """A crash in the resync's rollback: the kept PCPI (taken before the rollback) stays with the
    writes; the retry rolls back from a scratch of its own (I6, I11)."""
    h, writes, _good = _broken_with_writes(group_config)
    assert h.crash("mid_retry", lambda: h.agent.resync("A"))
    h.assert_invariants()
    kept = h.agent.state.kept_pcpi("A")
    assert kept is not None and h.agent.dest.fingerprint("A", kept.name) == writes
    h.agent.tick()
    assert h.states()["A"] == "stable_uncoalesced"
    h.agent.release_kept("A")
    _settle(h)


def test_crash_after_kept_pcpi(group_config):
    """Between the take of the kept PCPI and its record: recovery finds it on the volume and keeps it
    (it was taken after the fence), the next retry returns A to its last good image (I6, I11)."""
    h, writes, good = _broken_with_writes(group_config)
    assert h.crash("after_kept_pcpi", lambda: h.agent.resync("A"))
    a = h.agent.state.replicas["A"]
    assert (a.state, a.scratch, a.keep) == ("unstable_uncoalesced", None, False)
    kept = h.agent.state.kept_pcpi("A")
    assert kept is not None and kept.taken and kept.name in h.agent.dest.snapshot_list()
    assert h.agent.dest.fingerprint("A", kept.name) == writes
    assert h.exported_fingerprints()["A"] == good  # the fence held: A exports its last good image
    h.assert_invariants()
    h.agent.tick()
    assert h.states()["A"] == "stable_uncoalesced"
    assert h.agent.state.kept_pcpi("A") == kept
    h.agent.release_kept("A")
    _settle(h)


def test_crash_after_kept_release(group_config):
    """Between the release of the kept PCPI and its record: recovery finishes the release (I6)."""
    h, _writes, _good = _broken_with_writes(group_config)
    h.agent.resync("A")
    kept = h.agent.state.kept_pcpi("A")
    assert kept is not None
    assert h.crash("after_kept_release", lambda: h.agent.release_kept("A"))
    assert kept.name not in h.agent.state.pcpis and kept.name not in h.agent.dest.snapshot_list()
    h.assert_invariants()
    _settle(h)


def test_unknown_pcpis_are_reconciled_on_restart(group_config):
    """A PCPI of the group that the ledger does not know is released.  (Numbered within the ledger's
    numbers: one numbered past them means a ledger older than its volumes, tests/core/test_restore.py.)"""
    h = Harness(group_config())
    fill(h.writer, "AB")
    h.cycle()
    h.agent.dest.snapshot_create("co-g-000000-jump_ahead")
    h.agent.source.snapshot_create("co-g-src-000000")
    h.restart()
    assert "co-g-000000-jump_ahead" not in h.agent.dest.snapshot_list()
    assert "co-g-src-000000" not in h.agent.source.snapshot_list()
    h.assert_invariants()
