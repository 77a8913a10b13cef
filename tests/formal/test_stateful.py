"""Hypothesis stateful test of the real agent: I1-I11 after every step.

Budget (examples x steps) follows HYPOTHESIS_PROFILE: ci/dev keep it well
under a minute; ``long`` (``tools/check --long``) runs thousands of steps.
COALESCE_STATEFUL_EXAMPLES / COALESCE_STATEFUL_STEPS override both
(tools/mutants.py uses them with a fixed seed); COALESCE_STATEFUL_SEED=N runs
hypothesis with seed N instead of the profile's (derandomized in CI).  The ``sim`` backend runs
through the same machine when it serves volumes (or when
COALESCE_STATEFUL_SIM=1 forces it).
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hseed
from hypothesis.stateful import RuleBasedStateMachine

from .stateful_machine import STATS, CoalescingMachine, SimCoalescingMachine, backend_works

#: profile -> (examples, steps per example); sim is ~5x slower than mem and runs a third of the examples
_BUDGET = {"long": (300, 40), "ci": (40, 30), "dev": (40, 30), "crosshair": (5, 10)}
_profile = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
EXAMPLES, STEPS = _BUDGET.get(_profile, (25, 25))
EXAMPLES = int(os.environ.get("COALESCE_STATEFUL_EXAMPLES", EXAMPLES))
STEPS = int(os.environ.get("COALESCE_STATEFUL_STEPS", STEPS))
SEED = os.environ.get("COALESCE_STATEFUL_SEED")

#: tools/mutants.py only needs to know THAT a mutant fails: no shrinking (it can take minutes)
_phases = (
    [Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("COALESCE_STATEFUL_NOSHRINK") == "1"
    else list(Phase)
)
_settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    phases=_phases,
    derandomize=SEED is None and _profile != "long",
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


def _sim_enabled() -> bool:
    force = os.environ.get("COALESCE_STATEFUL_SIM")
    if force is not None:
        return force == "1"
    return backend_works("sim")


def _run(machine: type[RuleBasedStateMachine], share: float = 1.0) -> None:
    if SEED is not None:  # run_state_machine_as_test takes @seed from the machine class
        machine = hseed(int(SEED))(type(machine.__name__, (machine,), {}))
    test = machine.TestCase
    test.settings = settings(_settings, max_examples=max(1, int(EXAMPLES * share)))
    test("runTest").runTest()


@pytest.mark.parametrize("backend", ["mem", "sim"])
def test_coalescing_state_machine(backend: str) -> None:
    if backend == "sim" and not _sim_enabled():
        pytest.skip("the sim backend does not serve a whole cycle yet; COALESCE_STATEFUL_SIM=1 forces it")
    before = dict(STATS)
    if backend == "mem":
        _run(CoalescingMachine)
    else:
        _run(SimCoalescingMachine, share=1 / 3)
    out = os.environ.get("COALESCE_STATEFUL_STATS")
    if out:  # tools/check reports how much was explored
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"backend": backend, **{k: STATS[k] - before.get(k, 0) for k in STATS}}) + "\n")
