"""Power cuts on sim volumes: what was not flushed is lost, what a primitive returned is not.

The volume level: every primitive returns with nothing left in the write cache, so a power cut
right after it loses none of its work; a power cut in the middle of a CP (after any number of its
block writes) reopens at the previous CP, and with torn writes at the previous CP or the new one,
never anything else.  The agent level (I3, I6): at every named crash point the agent dies and the
destination, the source or both lose their unflushed writes; a new agent recovers and every
export shows a complete image, the old one or the new one, and the group then settles on the
newest source image (I7).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from typing import Callable

import pytest
from core import test_crash_recovery as C

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.crashpoints import CRASH_POINTS, FAN_IN_POINTS, STRAGGLER_POINTS
from coalesce_core.errors import BackendError
from coalesce_core.stream import records as R
from coalesce_core.testing.harness import FakeClock, Harness
from coalesce_core.testing.workload import SourceWriter, fill
from coalesce_sim import PowerCut, SimCrash, open_sim
from coalesce_sim import diff as D
from coalesce_sim.testing import power_cut_at, reopen, sim_apply
from coalesce_sim.volume import power_cut, power_cut_mode

from . import test_sim_cp
from .test_sim_cp import MUTATIONS, _copy, _state  # the CP crash tests' primitives

#: every primitive that changes a volume, from the state the ``template`` fixture builds
PRIMITIVES = {
    **MUTATIONS,
    "native_rollback": lambda fs: fs.native_rollback("q", "s1", "s1"),
    "purge_purgatory": lambda fs: (
        sim_apply(fs, "q", [R.Unlink(path="b")], use_purgatory=True),
        fs.purge_purgatory(["q"]),
    ),
    "remove_qtree": lambda fs: fs.remove_qtree("q"),
}


#: the CP crash tests' volume fixture: qtree q, PCPI s1 of it and a change since
template = test_sim_cp.template


@pytest.mark.parametrize("primitive", sorted(PRIMITIVES))
def test_a_primitive_returns_only_once_its_cp_is_flushed(template, tmp_path, primitive):
    """The durability contract of coalesce_apply and coalesce_rollback (hookspecs), for every
    primitive: nothing is left in the write cache when it returns, so a power cut right after
    it loses none of it."""
    fs = open_sim(_copy(template, tmp_path, "vol"))
    before = _state(fs)
    PRIMITIVES[primitive](fs)
    after = _state(fs)
    assert after != before
    assert fs.raid.unflushed == {}, f"{primitive} returned with {len(fs.raid.unflushed)} blocks not flushed"
    fates = fs.power_cut()
    assert fates == {"lost": 0, "kept": 0, "torn": 0}
    with pytest.raises(BackendError, match="reopen"):
        fs.snapshot_create("x")  # a dead handle refuses work
    fs2 = reopen(fs)
    assert _state(fs2) == after and fs2.fsck() == []


def _cp_writes(template, tmp_path, mutation) -> tuple[int, tuple]:
    """How many block writes ``mutation`` makes from the template, and the state it leads to."""
    probe = open_sim(_copy(template, tmp_path, "probe"))
    w0 = probe.raid.stats["writes"]
    MUTATIONS[mutation](probe)
    return probe.raid.stats["writes"] - w0, _state(probe)


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_power_cut_in_the_middle_of_a_cp_reopens_at_the_previous_cp(template, tmp_path, mutation):
    """The writer dies after any number of the CP's block writes and the power goes with it: the
    CP's blocks and its superblock copies were not flushed, so the volume is back at the previous
    CP: never the new one (a process crash alone may keep it: test_sim_cp), never a mixture."""
    before = _state(template)
    total, _after = _cp_writes(template, tmp_path, mutation)
    for n in range(total):
        fs = open_sim(_copy(template, tmp_path, f"cut{n}"))
        cp = fs.cp
        fs.raid.crash_after_writes = n
        with pytest.raises(SimCrash):
            MUTATIONS[mutation](fs)
        unflushed = len(fs.raid.unflushed)
        assert fs.power_cut() == {"lost": unflushed, "kept": 0, "torn": 0}
        fs2 = reopen(fs)
        assert (fs2.cp, _state(fs2)) == (cp, before), f"power cut after {n} of {total} writes"
        assert fs2.fsck() == []
        sim_apply(fs2, "q", [R.MkFile(path="later")])  # the volume carries on from there
        assert "later" in D.tree_dict(fs2, "q") and fs2.fsck() == []


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_torn_writes_of_the_cp_in_flight_leave_the_previous_or_the_new_cp(template, tmp_path, mutation):
    """Unflushed block writes reach the media or not, some torn mid-block, at random: the
    superblock's checksum rejects a torn copy and the switch stays atomic."""
    before = template.cp, _state(template)
    total, _after = _cp_writes(template, tmp_path, mutation)
    outcomes = set()
    for n in range(total):
        for seed in range(3):
            fs = open_sim(_copy(template, tmp_path, f"torn{n}-{seed}"))
            fs.raid.crash_after_writes = n
            with pytest.raises(SimCrash):
                MUTATIONS[mutation](fs)
            unflushed = len(fs.raid.unflushed)
            assert sum(fs.power_cut(random.Random(seed)).values()) == unflushed
            fs2 = reopen(fs)
            got = fs2.cp, _state(fs2)
            assert got == before or got[0] == before[0] + 1, f"power cut after {n} of {total} writes, seed {seed}"
            assert fs2.fsck() == []
            outcomes.add(got == before)
            shutil.rmtree(fs2.path)
    assert True in outcomes


def test_the_torn_new_cp_is_complete_when_its_superblock_survives(template, tmp_path):
    """Every block of a CP is flushed before its superblock is written: if any superblock copy of
    the new CP survives, the whole new CP is there."""
    total, after = _cp_writes(template, tmp_path, "apply")
    seen_new = 0
    for seed in range(12):
        fs = open_sim(_copy(template, tmp_path, f"sb{seed}"))
        fs.raid.crash_after_writes = total - 1  # all but the superblock stripe's parity
        with pytest.raises(SimCrash):
            MUTATIONS["apply"](fs)
        fs.power_cut(random.Random(seed))
        fs2 = reopen(fs)
        if fs2.cp == template.cp + 1:
            seen_new += 1
            assert _state(fs2) == after
        assert fs2.fsck() == []
        shutil.rmtree(fs2.path)
    assert seen_new, "no seed kept a superblock copy of the new CP"


def test_power_cut_names_the_open_volume_and_its_cut_is_final(make_sim):
    fs = make_sim()
    sim_apply(fs, "q", [R.MkFile(path="f")])
    assert power_cut(f"sim://{fs.path}") == {"lost": 0, "kept": 0, "torn": 0}
    with pytest.raises(PowerCut):
        fs.raid.sync()
    with pytest.raises(BackendError, match="power"):
        sim_apply(fs, "q", [R.MkFile(path="g")])
    assert power_cut(f"sim://{fs.path}/elsewhere") is None  # not open here: nothing unflushed
    fs2 = open_sim(f"{fs.path}?fsync=0")  # the crashed handle is replaced
    assert fs2 is not fs and "f" in D.tree_dict(fs2, "q")


def test_power_cut_mode_is_checked():
    assert power_cut_mode("1") is None and power_cut_mode("lost") is None
    assert power_cut_mode("torn:7").random() == random.Random(7).random()
    for bad in ("maybe", "torn:x", "lost:3"):
        with pytest.raises(BackendError) as exc:
            power_cut_mode(bad)
        assert exc.value.hint


# ------------------------------------------------------------------------------------------ the agent
SIDES = {"dst": ("destination",), "src": ("source",), "both": ("source", "destination")}


@pytest.fixture
def sim_config(group_config, monkeypatch):
    monkeypatch.setenv("COALESCE_SIM_FSYNC", "0")
    return lambda **kw: group_config(scheme="sim", **kw)


def _scenario(sim_config, point: str) -> tuple[Harness, Callable[[], object]]:
    """A group at rest and the step that passes ``point`` (tests/core/test_crash_recovery.py's scenarios)."""
    if point == "mid_baseline":
        h = Harness(sim_config())
        fill(h.writer, "ABC", files=6)
        return h, h.cycle
    if point == "mid_retry":
        h = C._retry_due(sim_config)  # C's retry is due after its transfer and rollback failed
        return h, h.agent.tick
    if point in ("after_kept_pcpi", "after_kept_release"):
        h, _writes, _good = C._broken_with_writes(sim_config)  # A broken, its active FS written
        if point == "after_kept_pcpi":
            return h, lambda: h.agent.resync("A")
        h.agent.resync("A")
        return h, lambda: h.agent.release_kept("A")
    if point != "mid_reseed":
        h = C._prepared(sim_config)  # changes in A, B, C after a first cycle; B's transfer fails at record 3
        return h, h.cycle
    h = Harness(sim_config())
    fill(h.writer, "ABC", files=6)
    h.cycle()
    h.agent.reseed("B", "test")
    h.writer.write("B", "x", b"x" * 100)
    return h, h.cycle


def _settle(h: Harness) -> None:
    """Faults stop: within 4 cycles every replica is stable and exports the newest source image (I7, I3)."""
    h.faults.clear()
    assert isinstance(h.clock, FakeClock)
    for name in list(h.agent.state.replicas):
        if h.agent.state.kept_pcpi(name) is not None:  # a resync's kept writes, until the operator releases them
            h.agent.release_kept(name)
    for _ in range(4):
        h.clock.advance(1000)
        h.cycle()
        points = {r.source_point for r in h.agent.state.replicas.values()}
        if set(h.states().values()) == {"stable"} and len(points) == 1:
            break
    assert set(h.states().values()) == {"stable"}, h.states()
    newest = max(h.writer.snapshots, key=lambda n: n.rsplit("-", 1)[-1])
    fps = h.exported_fingerprints()
    for r in h.agent.state.replicas.values():
        assert r.source_point == newest
        assert fps[r.name] == h.writer.snapshots[newest][r.source_qtree], f"I3: {r.name}"
    assert len(h.agent.dest.snapshot_list()) == 1 and len(h.agent.source.snapshot_list()) == 1  # nothing leaked
    h.assert_invariants()


def _fsck(h: Harness) -> None:
    for vol in (h.agent.source, h.agent.dest):
        assert vol.handle.fsck() == [], vol


def _power_cut_then_recover(sim_config, point: str, side: str, nth: int = 1, rng=None) -> Harness:
    h, step = _scenario(sim_config, point)
    before = h.exported_fingerprints()
    assert power_cut_at(h, f"{point}:{nth}", step, SIDES[side], rng), f"the scenario never reached {point}"
    # the new agent recovered: at rest, nothing in flight, every export a complete image (I3, I6)
    assert h.agent.state.phase == "idle"
    h.assert_invariants()
    after = h.exported_fingerprints()
    lost = [n for n, f in before.items() if f is not None and after.get(n) is None]
    assert not lost, f"I6: exported images lost by the power cut: {lost}"
    _fsck(h)
    _settle(h)
    _fsck(h)
    return h


def _rollback_records(point: str, monkeypatch) -> None:
    """mid_rollback and mid_retry are passed per record of the generic rollback (diff, apply);
    sim's native rollback is one CP, which the volume-level tests above cut at every write."""
    if point in ("mid_rollback", "mid_retry"):
        monkeypatch.setenv("COALESCE_SIM_NATIVE_ROLLBACK", "0")


#: a cycle of several sources and a straggler are cut by crashes (tests/core/test_crash_recovery_fan_in.py)
@pytest.mark.parametrize("point", sorted(set(CRASH_POINTS) - set(FAN_IN_POINTS + STRAGGLER_POINTS)))
def test_power_cut_of_the_destination_at_every_crash_point(sim_config, point, monkeypatch):
    _rollback_records(point, monkeypatch)
    _power_cut_then_recover(sim_config, point, "dst")


@pytest.mark.parametrize("point", ["after_commit", "after_source_pcpi", "mid_apply", "mid_reseed"])
@pytest.mark.parametrize("side", ["src", "both"])
def test_power_cut_of_the_source_at_a_crash_point(sim_config, point, side):
    _power_cut_then_recover(sim_config, point, side)


@pytest.mark.parametrize(
    ("point", "nth"), [("after_commit", 2), ("after_commit", 4), ("mid_apply", 3), ("mid_rollback", 2)]
)
def test_power_cut_with_torn_writes_at_a_later_pass(sim_config, point, nth, monkeypatch):
    _rollback_records(point, monkeypatch)
    _power_cut_then_recover(sim_config, point, "both", nth, random.Random(nth))


def test_power_cut_at_rest_loses_nothing(sim_config):
    h, step = _scenario(sim_config, "after_commit")
    step()
    before = h.exported_fingerprints(), h.states()
    assert not power_cut_at(h, None, lambda: None, SIDES["both"])
    assert (h.exported_fingerprints(), h.states()) == before
    _settle(h)


# ------------------------------------------------------------------------------------------ a real process
EXE = [sys.executable, "-m", "coalesce_core.ui.cli"]


@pytest.mark.parametrize(("point", "mode"), [("after_commit:4", "1"), ("mid_apply:2", "torn:5")])
def test_coalesce_run_dies_in_a_power_cut_and_the_next_run_recovers(tmp_path, point, mode):
    """COALESCE_CRASH_AT with COALESCE_SIM_POWER_CUT: the process cuts the power of its sim
    volumes and SIGKILLs itself at the crash point; the next `coalesce run` recovers and
    `coalesce verify --full` finds every export equal to its source image."""
    src, dst = f"sim://{tmp_path}/src", f"sim://{tmp_path}/dst"
    cfg = tmp_path / "coalesce.toml"
    cfg.write_text(
        f'[group]\nname = "pc"\nsource = "{src}"\ndestination = "{dst}"\nmetadata = "{tmp_path}/meta"\n'
        "parallel = 2\n" + "".join(f'[[replica]]\nname = "{q}"\n' for q in "ABC")
    )
    env = {**os.environ, "COALESCE_SIM_FSYNC": "0"}
    env.pop("COALESCE_CRASH_AT", None)

    def coalesce(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*EXE, "--config", str(cfg), *args], capture_output=True, text=True, env={**env, **extra}, timeout=300
        )

    def write_source(version: int) -> None:
        vol = Volume.open(plugin_manager(), src, create=True)
        try:
            fill(SourceWriter(vol), "ABC", files=4, size=3000, seed=version)
        finally:
            vol.close()

    write_source(1)
    assert coalesce("init").returncode == 0
    assert coalesce("run", "--once", "--quiet").returncode == 0
    write_source(2)
    died = coalesce("run", "--once", "--quiet", COALESCE_CRASH_AT=point, COALESCE_SIM_POWER_CUT=mode)
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert f"power cut at crash point {point.split(':')[0]}: sim volume {tmp_path}/dst" in died.stderr
    again = coalesce("run", "--once", "--quiet")
    assert again.returncode == 0, again.stderr
    verify = coalesce("verify", "--full")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert coalesce("check").returncode == 0
