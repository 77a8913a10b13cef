"""The planner's PEP 316 contracts.

1. ``crosshair check --analysis_kind=PEP316`` over the contract-carrying modules
   must report no counterexample (bounded: a few seconds per condition).
2. Hypothesis property tests of the same pure functions, which also run under
   the hypothesis-crosshair backend (``HYPOTHESIS_PROFILE=crosshair`` or the
   ``crosshair``-marked variant below), tie them to the real planner: the
   budget a decision may reach, which PCPIs a release may drop, what recovery
   decides for each persisted state.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coalesce_core.cycle import planner
from coalesce_core.cycle.guards import flight_free
from coalesce_core.cycle.spec import load_spec
from coalesce_core.cycle.state import CYCLE_ROLES

from ._tools import ROOT

SPEC = load_spec()
RSTATES = list(SPEC.replica.state_names)
PHASES = list(SPEC.agent.state_names)
ROLES = ["base", "rollback", "jump_ahead", "new_base", "individual"]
TARGETS = [
    "coalesce_core/cycle/planner.py",
    "coalesce_core/cycle/guards.py",
    "coalesce_core/cycle/restore.py",
    "tests/formal/contracts_records.py",
]
CROSSHAIR_CMD = ["crosshair", "check", "--analysis_kind=PEP316", "--per_condition_timeout=4", "--per_path_timeout=2"]

try:
    import hypothesis_crosshair_provider  # noqa: F401

    HAVE_BACKEND = True
except ImportError:  # pragma: no cover
    HAVE_BACKEND = False


@pytest.mark.skipif(shutil.which("crosshair") is None, reason="crosshair-tool is not installed")
def test_crosshair_finds_no_counterexample():
    t0 = time.perf_counter()
    p = subprocess.run([*CROSSHAIR_CMD, *TARGETS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and not p.stdout.strip(), p.stdout + p.stderr
    assert time.perf_counter() - t0 < 180


# -- properties (run by the normal backend and, below, by CrossHair's) ---------------
def _release_action_props(role, is_base, releasing, pinned, taken):
    a = planner.release_action(role, is_base, releasing, pinned, taken)
    if pinned:
        assert a in ("keep", "individual"), "a PCPI a replica pins is never released"
    if a == "release":
        assert taken and not pinned and not is_base
    if not (is_base or releasing or pinned) and taken:
        assert a == "release", f"an unneeded {role} PCPI must be released (I1/I2 would leak)"


def _recover_props(phase, has_pcpi, rollbacks_left):
    a = planner.recover_phase(phase, has_pcpi, rollbacks_left)
    if phase.startswith("jump_ahead"):
        assert a in ("purge", "take_jump_ahead", "roll_forward", "take_new_base"), (
            "an unfinished jump-ahead is rolled forward, never dropped"
        )
    if phase == "idle":
        assert a == "nothing"


def _reseed_props(failures, reseed_after):
    due = planner.reseed_due(failures, reseed_after)
    if reseed_after <= 0:
        assert not due, "reseed_after 0 never re-seeds"
    elif failures >= reseed_after:
        assert due, "a replica that failed reseed_after updates in a row is re-seeded, not updated for ever"
    else:
        assert not due


def _flight_props(states):
    if flight_free(tuple(states)):
        assert not set(states) & {"update", "rollback", "baseline"}, "I8: jump-ahead while in flight"


release_args = (st.sampled_from(ROLES), st.booleans(), st.booleans(), st.booleans(), st.booleans())
recover_args = (st.sampled_from(PHASES), st.booleans(), st.booleans())
flight_args = st.lists(st.sampled_from(RSTATES), max_size=5)
reseed_args = (st.integers(0, 1000), st.integers(-1, 1000))


@given(*release_args)
def test_release_never_drops_a_pinned_pcpi(role, is_base, releasing, pinned, taken):
    _release_action_props(role, is_base, releasing, pinned, taken)


@given(*recover_args)
def test_recovery_rolls_jump_ahead_forward(phase, has_pcpi, rollbacks_left):
    _recover_props(phase, has_pcpi, rollbacks_left)


@given(flight_args)
def test_jump_ahead_guard(states):
    _flight_props(states)


@given(*reseed_args)
def test_reseed_after_failed_updates_in_a_row(failures, reseed_after):
    _reseed_props(failures, reseed_after)


@given(st.none() | st.integers(-3, 300), st.none() | st.integers(-3, 300))
def test_no_cycle_starts_without_room_for_its_pcpis_I1(destination_room, source_room):
    """A cycle holds at most 4 destination PCPIs, 3 of them new, and takes 1 source PCPI."""
    short = planner.pcpi_shortfall(destination_room, source_room)
    needs = (destination_room is not None and destination_room < planner.CYCLE_TAKES) or (
        source_room is not None and source_room < 1
    )
    assert bool(short) == needs, (destination_room, source_room, short)
    assert planner.CYCLE_TAKES == len(CYCLE_ROLES) - 1  # every cycle role but the base it holds


@given(st.sampled_from(RSTATES), st.booleans())
def test_recovery_of_each_replica_state_is_a_legal_transition(state, has_scratch):
    a = planner.recover_replica(state, has_scratch)
    if a == "rollback":
        assert SPEC.replica.next_state(state, "update_failed") == "rollback"
    if a == "remove":
        assert SPEC.replica.next_state(state, "baseline_failed") == "uninitialized"
    if a == "abandon_retry":
        assert state == "unstable_uncoalesced"
    if a == "reseed_again":
        assert SPEC.replica.next_state(state, "reseed_failed") == "reseed_pending"
    if a == "abandon_straggler":
        assert SPEC.replica.next_state(state, "straggler_failed") == "unstable_uncoalesced"
    if state in (SPEC.in_flight_states - {"rollback"}) | {"reseeding", "update_uncoalesced"}:
        assert a != "keep", (
            "recovery must finish or undo every transfer in flight, a re-seed and a straggler's included (I6)"
        )


@given(st.integers(0, 10**6), st.none() | st.integers(1, 10**5), st.integers(0, 2 * 10**6))
def test_a_straggler_leaves_only_once_due(cycle_started, straggler_after, now):
    """``straggler_after`` None: the cycle waits for every update; else an update leaves the cycle once
    ``now`` is that far past the cycle's start, never before."""
    due = planner.straggler_due(float(cycle_started), None if straggler_after is None else float(straggler_after), now)
    assert due == (straggler_after is not None and now - cycle_started >= straggler_after)


_crosshair = (
    settings(backend="crosshair", max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    if HAVE_BACKEND
    else None
)


@pytest.mark.skipif(not HAVE_BACKEND, reason="hypothesis-crosshair is not installed")
def test_properties_under_the_crosshair_backend():
    """The same properties with hypothesis-crosshair: CrossHair drives the inputs symbolically."""
    for test, args in (
        (_release_action_props, release_args),
        (_recover_props, recover_args),
        (_reseed_props, reseed_args),
    ):
        _crosshair(given(*args)(test))()
    _crosshair(given(flight_args)(_flight_props))()


# -- the real planner: PCPI budget of every decision (I1) -------------------------------
def test_budget_of_every_phase_of_a_real_cycle(group_config):
    """Drive a real cycle with a failing transfer; after every decision the cycle-role PCPIs
    stay within 4 and are exactly 1 at rest."""
    from coalesce_core.backend.faults import Rule
    from coalesce_core.cycle.invariants import cycle_pcpis
    from coalesce_core.testing.harness import Harness
    from coalesce_core.testing.workload import fill

    seen: list[tuple[str, int]] = []
    real = planner.decide

    def spy(state, event, model=None):
        d = real(state, event, model)
        seen.append((d.state.phase, len(cycle_pcpis(d.state))))
        return d

    import coalesce_core.agent as agent_mod

    h = Harness(group_config())
    fill(h.writer, "ABC")
    h.cycle()
    h.writer.write("B", "x", b"x" * 100)
    h.faults.add(Rule(hook="coalesce_diff", qtree="B", record=1, times=1, volume="src"))
    agent_mod.decide = spy
    try:
        h.cycle()
    finally:
        agent_mod.decide = real
    assert {p for p, _ in seen} >= {"updating", "rolling_back", "jump_ahead_1", "jump_ahead_2", "idle"}
    assert max(n for _, n in seen) <= 4
    assert all(n == 1 for p, n in seen if p == "idle")
