"""A ledger behind its volumes (coalesce_core/cycle/restore.py, docs/operations.md "Backing up the ledger"):
a ledger restored from a backup cycles old, or one whose PCPIs were removed outside coalesce, is made to
match the volumes at recovery, says what it did, never exports an image not proven equal to a source
PCPI, and the group comes back to rest with I1-I5, I8 and I9 holding; on mem and sim volumes."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from backends import config_on, on_backend

from coalesce_core.agent import Agent
from coalesce_core.backend.faults import Rule
from coalesce_core.crashpoints import SimulatedCrash, arm
from coalesce_core.cycle.restore import number
from coalesce_core.ledger import Ledger
from coalesce_core.testing.harness import FakeClock, Harness
from coalesce_core.testing.workload import fill


@pytest.fixture(params=[on_backend(b) for b in ("mem", "sim")])
def backend(request):
    return request.param


@pytest.fixture
def group_config(group_config, backend, request, monkeypatch):
    return config_on(backend, group_config, request, monkeypatch)


def backup(h: Harness, to: Path) -> Path:
    """SQLite's online backup of the live ledger (docs/operations.md)."""
    src = sqlite3.connect(f"file:{h.config.ledger_path(None)}?mode=ro", uri=True)
    dst = sqlite3.connect(to)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return to


def put_back(h: Harness, copy: Path, recover: bool = True) -> None:
    """Stop the agent, put the copy in the ledger's place (its -wal and -shm go), start again."""
    h.agent.ledger.close()
    if h.agent.lock is not None:
        h.agent.lock.release()
    live = h.config.ledger_path(None)
    for suffix in ("-wal", "-shm"):
        Path(f"{live}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(copy, live)
    h.agent = Agent.open(h.config, pm=h.pm, clock=h.clock, recover=recover)


def change(h: Harness, n: int) -> None:
    for q in "AB":
        h.writer.write(q, f"round-{n}", f"{q} round {n}".encode() * 40)


def settle(h: Harness, cycles: int = 3) -> None:
    assert isinstance(h.clock, FakeClock)  # the harness's default clock
    for i in range(cycles):
        change(h, 100 + i)
        h.clock.advance(1000)
        h.cycle()
        if (
            set(h.states().values()) == {"stable"}
            and len({r.source_point for r in h.agent.state.replicas.values()}) == 1
        ):
            break
    assert set(h.states().values()) == {"stable"}, h.states()
    assert h.cycle_pcpis_on_volume() == 1
    assert len(h.agent.dest.snapshot_list()) == 1  # nothing leaked
    h.assert_invariants()


def started(group_config) -> Harness:
    h = Harness(group_config(replicas=("A", "B")))
    fill(h.writer, "AB")
    h.cycle()
    return h


def test_a_ledger_two_cycles_old_keeps_the_exports_and_the_replicas_stay_stable(group_config, tmp_path):
    """It used to stop with `cannot export PCPI ...`, for ever."""
    h = started(group_config)
    old = backup(h, tmp_path / "old.sqlite")
    for n in range(2):
        change(h, n)
        h.cycle()
    exported, points = h.agent.dest.exported(), {r.name: r.source_point for r in h.agent.state.replicas.values()}
    newest = max(number(n) for n in h.agent.dest.snapshot_list() + h.agent.source.snapshot_list())
    h.assert_invariants()  # the marks of I5 are those of the newest cycle
    put_back(h, old)
    assert h.agent.dest.exported() == exported  # readers see what they saw (I5: nothing moved back)
    assert {r.name: r.source_point for r in h.agent.state.replicas.values()} == points
    assert set(h.states().values()) == {"stable"}
    assert h.agent.restored[0].startswith("the ledger is older than its volumes")
    assert all("stays stable" in line for line in h.agent.restored[1:]) and len(h.agent.restored) == 3
    assert h.agent.state.seq >= newest  # no PCPI name is taken a second time
    h.assert_invariants()
    change(h, 9)
    h.cycle()
    assert all(number(n) > newest for n in h.agent.dest.snapshot_list())
    settle(h)


def test_a_ledger_from_the_middle_of_an_old_cycle_re_seeds_what_was_in_flight(group_config, tmp_path):
    h = started(group_config)
    change(h, 1)
    h.faults.add(Rule(hook="coalesce_diff", qtree="B", record=2, times=1, volume="src"))
    arm("mid_apply:2")
    with pytest.raises(SimulatedCrash):
        h.cycle()
    arm(None)
    mid = backup(h, tmp_path / "mid.sqlite")
    copy = Ledger.open(mid, group="g")
    assert copy.load().phase == "updating"  # a copy from the middle of a cycle
    copy.close()
    h.faults.clear()
    h.restart()
    for n in range(2, 4):
        change(h, n)
        h.cycle()
    h.assert_invariants()
    exported = h.agent.dest.exported()
    put_back(h, mid)
    s = h.agent.state
    assert s.phase == "idle"  # the old cycle was closed
    assert h.agent.dest.exported() == exported  # each in-flight replica goes on exporting its proven image
    assert {r.state for r in s.replicas.values()} <= {"stable", "reseed_pending"}
    assert any("the ledger's cycle" in line and "is closed" in line for line in h.agent.restored)
    h.assert_invariants()
    settle(h)


def test_a_replica_whose_active_fs_is_not_its_export_is_re_seeded_exporting_it(group_config, tmp_path):
    h = started(group_config)
    old = backup(h, tmp_path / "old.sqlite")
    change(h, 1)
    h.cycle()
    exported = h.agent.dest.exported()
    SourceWriter = type(h.writer)
    SourceWriter(h.agent.dest).write("B", "stray", b"written into the replica's active FS")
    put_back(h, old)
    states = h.states()
    assert states == {"A": "stable", "B": "reseed_pending"}
    b = h.agent.state.replicas["B"]
    assert b.exported == exported["B"] == b.last_good and b.source_point is not None
    assert h.agent.dest.exported() == exported
    assert any(line.startswith("replica 'B'") and "re-seeded" in line for line in h.agent.restored)
    h.assert_invariants()
    settle(h)
    point = h.agent.state.replicas["B"].source_point or ""
    assert h.exported_fingerprints()["B"] == h.writer.snapshots[point]["B"]  # the stray file is gone


def test_an_image_that_equals_no_source_pcpi_is_never_exported(group_config, tmp_path):
    """When the source PCPIs of the exported images are gone, nothing proves what they hold."""
    h = started(group_config)
    old = backup(h, tmp_path / "old.sqlite")
    change(h, 1)
    h.cycle()
    for name in h.agent.source.snapshot_list():
        h.agent.source.snapshot_delete(name)
    put_back(h, old)
    assert h.states() == {"A": "reseed_pending", "B": "reseed_pending"}
    assert all(h.agent.dest.exported().get(r) is None for r in "AB")
    assert all(r.source_point is None for r in h.agent.state.replicas.values())
    assert sum("exports nothing" in line for line in h.agent.restored) == 2
    h.assert_invariants()
    settle(h)


def test_a_base_removed_outside_coalesce_re_seeds_the_replicas_that_exported_it(group_config):
    h = started(group_config)
    base = h.agent.state.base()
    assert base is not None
    h.agent.dest.export({})  # a person un-exports and deletes the group's PCPI by hand
    h.agent.dest.snapshot_delete(base.name)
    h.restart()
    assert h.states() == {"A": "reseed_pending", "B": "reseed_pending"}
    assert h.agent.restored[0].startswith("the destination no longer holds PCPIs the ledger records")
    assert base.name not in h.agent.state.pcpis
    h.assert_invariants()
    settle(h)


def test_an_older_ledgers_pending_request_is_withdrawn_never_taken(group_config, tmp_path):
    """A request queued for a running agent (coalesce_core/requests.py) and still pending in the
    backup: its verb stopped waiting long ago, so the restore withdraws it instead of breaking A now."""
    h = started(group_config)
    asked = h.agent.ledger.ask("break", {"replica": "A"}, h.clock(), 4242)
    old = backup(h, tmp_path / "old.sqlite")
    assert h.agent.ledger.withdraw(asked.id, h.clock())  # the verb's --timeout, in the live ledger
    for n in range(2):
        change(h, n)
        h.cycle()
    put_back(h, old)
    assert h.agent.ledger.request(asked.id).status == "withdrawn"
    assert any(line.startswith(f"request {asked.id} (break A): pending in the older") for line in h.agent.restored)
    assert h.agent.take_requests() == [] and h.states()["A"] == "stable"
    h.assert_invariants()


def test_a_current_ledger_is_left_alone(group_config):
    h = started(group_config)
    h.restart()
    assert h.agent.restored == []


def test_a_crash_right_after_the_restore_is_recovered_like_any_other(group_config, tmp_path):
    """The restore is one commit of the ledger and has no effects: a crash after it (crash point
    after_commit, the first commit of the open) leaves a ledger that matches the volumes."""
    h = started(group_config)
    old = backup(h, tmp_path / "old.sqlite")
    for n in range(2):
        change(h, n)
        h.cycle()
    exported = h.agent.dest.exported()
    put_back(h, old, recover=False)
    arm("after_commit:1")
    with pytest.raises(SimulatedCrash):
        h.agent.recover()
    arm(None)
    assert h.agent.restored  # the restore was committed, then the process died
    h.restart()
    assert h.agent.restored == []  # done before the crash
    assert h.agent.dest.exported() == exported and set(h.states().values()) == {"stable"}
    h.assert_invariants()
    settle(h)
