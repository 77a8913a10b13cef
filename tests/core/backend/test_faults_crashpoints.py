"""Fault injection (a pluggy wrapper plugin) and named crash points.

FaultInjector rules run against the real ``mem`` backend through the plugin
manager and the Volume facade; crash points are checked in-process
(arm/hit/through/during) and for real: COALESCE_CRASH_AT makes a subprocess
SIGKILL itself at exactly the n-th pass (I6 tests depend on it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

import coalesce_core
from coalesce_core import crashpoints
from coalesce_core.backend.faults import FaultInjector, InjectedFault, Rule
from coalesce_core.backend.hookspecs import PRIMITIVE_HOOKS
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.crashpoints import CRASH_POINTS, SimulatedCrash, UnknownCrashPoint
from coalesce_core.errors import BackendError
from coalesce_core.testing.workload import SourceWriter, fill


class Env:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.inj = FaultInjector()
        self.pm = plugin_manager([self.inj])
        self.src = Volume.open(self.pm, f"mem://fsrc-{tag}", create=True)
        self.dst = Volume.open(self.pm, f"mem://fdst-{tag}", create=True)
        self.writer = SourceWriter(self.src)
        fill(self.writer, ["A", "B"], files=3)
        self.src.snapshot_create("s1")
        self.n_records = len(list(self.src.diff("A", None, "s1")))


@pytest.fixture
def env() -> Env:
    return Env()


# ---------------------------------------------------------------------------
# Rule and FaultInjector
# ---------------------------------------------------------------------------
def test_rule_validates_the_hook_name():
    with pytest.raises(ValueError):
        Rule(hook="coalesce_nope")
    for hook in PRIMITIVE_HOOKS:
        Rule(hook=hook)


@pytest.mark.parametrize(
    "hook",
    [
        h
        for h in ("coalesce_apply", "coalesce_rollback", "coalesce_snapshot_create", "coalesce_export")
        if h in PRIMITIVE_HOOKS
    ],
)
def test_rule_record_is_only_for_diff(hook):
    with pytest.raises(ValueError, match="coalesce_diff only"):
        Rule(hook=hook, record=1)
    assert Rule(hook="coalesce_diff", record=1).record == 1


def test_no_rule_no_fault(env):
    env.dst.snapshot_create("x")
    assert len(list(env.src.diff("A", None, "s1"))) == env.n_records


def test_nth_call_fails_only(env):
    rule = env.inj.add(Rule(hook="coalesce_snapshot_create", nth=2, volume="fdst"))
    env.dst.snapshot_create("p1")
    with pytest.raises(InjectedFault):
        env.dst.snapshot_create("p2")
    env.dst.snapshot_create("p3")
    env.dst.snapshot_create("p4")
    assert (rule.calls, rule.fired) == (4, 1)
    assert set(env.dst.snapshot_list()) == {"p1", "p3", "p4"}  # the failed call never reached the backend


def test_every_call_fails_without_nth_or_times(env):
    env.inj.add(Rule(hook="coalesce_snapshot_delete"))
    env.src.snapshot_create("s2")
    for _ in range(3):
        with pytest.raises(InjectedFault):
            env.src.snapshot_delete("s2")
    assert "s2" in env.src.snapshot_list()


def test_times_limits_how_often_a_rule_fires(env):
    rule = env.inj.add(Rule(hook="coalesce_snapshot_create", times=2, volume="fdst"))
    for name in ("a", "b"):
        with pytest.raises(InjectedFault):
            env.dst.snapshot_create(name)
    env.dst.snapshot_create("c")
    assert env.dst.snapshot_list() == ["c"]
    assert (rule.calls, rule.fired) == (3, 2)


def test_qtree_filter(env):
    rule = env.inj.add(Rule(hook="coalesce_diff", qtree="B"))
    assert len(list(env.src.diff("A", None, "s1"))) == env.n_records
    with pytest.raises(InjectedFault, match="coalesce_diff of B"):
        env.src.diff("B", None, "s1")
    assert rule.calls == 1  # calls for other qtrees are not counted


def test_volume_filter(env):
    rule = env.inj.add(Rule(hook="coalesce_snapshot_create", volume="fdst"))
    env.src.snapshot_create("fine")
    with pytest.raises(InjectedFault):
        env.dst.snapshot_create("nope")
    assert rule.calls == 1
    assert "fine" in env.src.snapshot_list() and env.dst.snapshot_list() == []


def test_injected_fault_is_a_backend_error_with_the_rule_message(env):
    env.inj.add(Rule(hook="coalesce_diff", qtree="A", message="cable cut"))
    with pytest.raises(BackendError, match="cable cut"):
        env.src.diff("A", None, "s1")


@pytest.mark.parametrize("record", [0, 1, 3])
def test_record_level_cut_of_a_diff_stream(env, record):
    """The diff call itself succeeds; exactly ``record`` records come through, then the
    stream fails while it is being consumed (a transfer cut mid-way)."""
    env.inj.add(Rule(hook="coalesce_diff", qtree="A", record=record))
    stream = env.src.diff("A", None, "s1")
    got = []
    with pytest.raises(InjectedFault, match=f"at record {record + 1}"):
        for rec in stream:
            got.append(rec)
    assert len(got) == record < env.n_records
    assert len(list(env.src.diff("B", None, "s1"))) > 0  # other qtrees unaffected


def test_record_cut_matches_the_uncut_prefix(env):
    full = list(env.src.diff("A", None, "s1"))
    env.inj.add(Rule(hook="coalesce_diff", qtree="A", record=4, times=1))
    got = []
    with pytest.raises(InjectedFault):
        for rec in env.src.diff("A", None, "s1"):
            got.append(rec)
    assert got == full[:4]
    assert list(env.src.diff("A", None, "s1")) == full  # times=1: the next diff is whole


def test_nth_diff_cut_at_a_record(env):
    """ "the 2nd coalesce_diff of qtree B fails at its 5th record"."""
    env.inj.add(Rule(hook="coalesce_diff", qtree="B", nth=2, record=4))
    first = list(env.src.diff("B", None, "s1"))
    got = []
    with pytest.raises(InjectedFault, match="at record 5"):
        for rec in env.src.diff("B", None, "s1"):
            got.append(rec)
    assert got == first[:4]
    assert list(env.src.diff("B", None, "s1")) == first


def test_a_failed_apply_changes_nothing_on_the_destination(env):
    env.dst.apply("A", env.src.diff("A", None, "s1"), use_purgatory=True)
    before = env.dst.fingerprint("A", None)
    env.writer.write("A", "new", b"x" * 100)
    env.src.snapshot_create("s2")
    env.inj.add(Rule(hook="coalesce_apply", qtree="A", volume="fdst"))
    with pytest.raises(InjectedFault):
        env.dst.apply("A", env.src.diff("A", "s1", "s2"), use_purgatory=True)
    assert env.dst.fingerprint("A", None) == before


def test_clear_disarms_every_rule(env):
    env.inj.add(Rule(hook="coalesce_snapshot_create"))
    env.inj.clear()
    env.dst.snapshot_create("ok")
    assert env.dst.snapshot_list() == ["ok"]


def test_several_rules_count_every_matching_call(env):
    """A rule's nth counts every matching call, whatever other rules did with it."""
    a = env.inj.add(Rule(hook="coalesce_snapshot_create", volume="fdst", nth=2, message="first"))
    b = env.inj.add(Rule(hook="coalesce_snapshot_create", volume="fdst", nth=3, message="second"))
    env.dst.snapshot_create("1")
    with pytest.raises(InjectedFault, match="first"):
        env.dst.snapshot_create("2")
    with pytest.raises(InjectedFault, match="second"):
        env.dst.snapshot_create("3")
    assert (a.fired, b.fired) == (1, 1)


def test_fault_injector_wraps_every_primitive_hook():
    for hook in (
        "coalesce_snapshot_create",
        "coalesce_snapshot_delete",
        "coalesce_diff",
        "coalesce_apply",
        "coalesce_rollback",
        "coalesce_export",
        "coalesce_purge_purgatory",
        "coalesce_remove_qtree",
    ):
        assert hook in PRIMITIVE_HOOKS
        assert callable(getattr(FaultInjector, hook))


# ---------------------------------------------------------------------------
# crash points, in-process
# ---------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_env_crash(monkeypatch):
    monkeypatch.delenv("COALESCE_CRASH_AT", raising=False)


def test_the_required_crash_points_exist():
    """Issue 2 point 4: after each PCPI, mid-apply, mid-rollback, between the two
    jump-ahead PCPIs, before/after the export switch, mid-release."""
    for name in (
        "after_source_pcpi",
        "after_pcpi_taken",
        "after_rollback_pcpi",
        "after_jump_ahead_pcpi",
        "after_new_base_pcpi",
        "mid_apply",
        "mid_rollback",
        "between_jump_ahead_pcpis",
        "before_export_switch",
        "after_export_switch",
        "mid_release",
    ):
        assert name in CRASH_POINTS and CRASH_POINTS[name]


def test_every_crash_point_is_passed_somewhere_in_the_code():
    src = "\n".join(
        p.read_text() for p in Path(coalesce_core.__file__).parent.glob("*.py") if p.name != "crashpoints.py"
    )
    for name in CRASH_POINTS:
        by_role = re.match(r"after_(rollback|jump_ahead|new_base|kept)_pcpi$", name) and "after_{" in src
        assert f'"{name}"' in src or by_role, f"crash point {name} is never passed"


def test_disarmed_hit_is_a_no_op():
    for _ in range(5):
        for name in CRASH_POINTS:
            crashpoints.hit(name)
    assert not crashpoints.fired()


def test_arm_fires_at_the_nth_pass_only():
    crashpoints.arm("after_commit:3")
    crashpoints.hit("after_commit")
    crashpoints.hit("mid_release")  # other points do not count
    crashpoints.hit("after_commit")
    assert not crashpoints.fired()
    with pytest.raises(SimulatedCrash) as ei:
        crashpoints.hit("after_commit")
    assert ei.value.point == "after_commit" and crashpoints.fired()


def test_default_n_is_one():
    crashpoints.arm("mid_release")
    with pytest.raises(SimulatedCrash):
        crashpoints.hit("mid_release")


def test_after_firing_every_later_pass_raises():
    crashpoints.arm("after_commit")
    with pytest.raises(SimulatedCrash):
        crashpoints.hit("after_commit")
    for name in ("after_commit", "mid_apply", "after_export_switch"):
        with pytest.raises(SimulatedCrash):
            crashpoints.hit(name)


def test_simulated_crash_is_not_an_exception():
    """So that no ``except Exception`` in the agent swallows it."""
    assert issubclass(SimulatedCrash, BaseException) and not issubclass(SimulatedCrash, Exception)


def test_arm_none_disarms_and_resets():
    crashpoints.arm("after_commit")
    with pytest.raises(SimulatedCrash):
        crashpoints.hit("after_commit")
    crashpoints.arm(None)
    assert not crashpoints.fired()
    crashpoints.hit("after_commit")


def test_arm_resets_the_counters():
    crashpoints.arm("after_commit:2")
    crashpoints.hit("after_commit")
    crashpoints.arm("after_commit:2")
    crashpoints.hit("after_commit")  # the count started again
    with pytest.raises(SimulatedCrash):
        crashpoints.hit("after_commit")


def test_run_armed_says_whether_the_point_fired_and_disarms_after():
    passes = []

    def step(n):
        def run():
            for _ in range(n):
                passes.append("after_commit")
                crashpoints.hit("after_commit")

        return run

    assert crashpoints.run_armed("after_commit:2", step(3)) is True
    assert passes == ["after_commit"] * 2  # the 2nd pass ended the step
    assert not crashpoints.fired()
    crashpoints.hit("after_commit")  # disarmed
    assert crashpoints.run_armed("after_commit:2", step(1)) is False
    with pytest.raises(ValueError):  # anything else the step raises goes through, disarmed all the same
        crashpoints.run_armed("after_commit", lambda: int("x"))
    crashpoints.hit("after_commit")


def test_unknown_names_are_rejected():
    with pytest.raises(UnknownCrashPoint, match="known:"):
        crashpoints.arm("after_lunch")
    with pytest.raises(UnknownCrashPoint):
        crashpoints.hit("after_lunch")
    with pytest.raises(UnknownCrashPoint):
        with crashpoints.during("after_lunch"):
            pass
    assert issubclass(UnknownCrashPoint, ValueError)


def test_through_passes_the_point_after_each_consumed_record():
    crashpoints.arm("mid_apply:3")
    got = []
    with pytest.raises(SimulatedCrash):
        for rec in crashpoints.through(range(10), "mid_apply"):
            got.append(rec)
    assert got == [0, 1, 2]  # the 3rd record was consumed, then the point fired


def test_through_disarmed_yields_everything():
    assert list(crashpoints.through(range(7), "mid_rollback")) == list(range(7))


def test_during_marks_the_thread():
    assert crashpoints.current() is None
    with crashpoints.during("mid_rollback"):
        assert crashpoints.current() == "mid_rollback"
        seen = []
        t = threading.Thread(target=lambda: seen.append(crashpoints.current()))
        t.start()
        t.join()
        assert seen == [None]  # thread-local
    assert crashpoints.current() is None
    with pytest.raises(RuntimeError):
        with crashpoints.during("mid_retry"):
            raise RuntimeError
    assert crashpoints.current() is None


# ---------------------------------------------------------------------------
# COALESCE_CRASH_AT: a real SIGKILL in a subprocess
# ---------------------------------------------------------------------------
LOOP = textwrap.dedent("""
    import sys
    from coalesce_core import crashpoints
    for i in range(int(sys.argv[1])):
        print(i, flush=True)
        crashpoints.hit("after_commit")
        crashpoints.hit("mid_release")
    print("end", flush=True)
""")


def _run(spec: str | None, passes: int = 5) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("COALESCE_CRASH_AT", None)
    if spec is not None:
        env["COALESCE_CRASH_AT"] = spec
    return subprocess.run(
        [sys.executable, "-c", LOOP, str(passes)], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("n", [1, 3, 5])
def test_env_crash_sigkills_at_the_nth_pass_and_not_before(n):
    proc = _run(f"after_commit:{n}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == [str(i) for i in range(n)]


def test_env_crash_default_is_the_first_pass():
    proc = _run("mid_release")
    assert proc.returncode == -9
    assert proc.stdout.split() == ["0"]


def test_env_crash_beyond_the_passes_does_not_fire():
    proc = _run("after_commit:6", passes=5)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "end"


def test_no_env_no_crash():
    proc = _run(None)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "end"


def test_env_crash_with_an_unknown_name_is_an_error_not_a_kill():
    proc = _run("after_lunch:1")
    assert proc.returncode == 1
    assert "UnknownCrashPoint" in proc.stderr


# ---------------------------------------------------------------------------
# in-process crash at every write-ahead commit of a cycle, then restart (I6)
# ---------------------------------------------------------------------------
def _after_commit_sweep(group_config):
    from coalesce_core.testing.harness import Harness

    failures = []
    for k in range(1, 60):
        h = Harness(group_config(replicas=("A", "B")))
        fill(h.writer, "AB")
        h.cycle()
        for q in "AB":
            h.writer.write(q, "changed", q.encode() * 100)
        if not h.crash(f"after_commit:{k}", h.cycle):
            assert k > 5, "the sweep never crashed"
            break
        st = h.agent.state
        bad = [f"{f.invariant}: {f.detail}" for f in h.findings() if not f.ok]
        states = set(h.states().values())
        if st.phase != "idle" or states != {"stable"} or bad:
            failures.append((k, st.phase, h.states(), bad))
    return failures


def test_crash_after_every_commit_of_a_cycle_then_restart_I6(group_config):
    """A kill after ANY write-ahead commit of a no-fault cycle: after the restart the group
    is at rest, every replica stable, and I1-I5, I8, I9 hold on the live volumes.
    (Regression: a kill at the commit of the take_new_base decision used to end idle with
    the replicas in done, exporting the old base relabelled as an individual PCPI.)"""
    assert _after_commit_sweep(group_config) == []
