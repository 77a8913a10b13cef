"""The agent's run loop (Agent.run_forever: what `coalesce run` does between cycles)."""

from __future__ import annotations

import pytest

from coalesce_core.backend.faults import Rule
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill


class Stop(Exception):
    pass


def test_run_forever_recovers_after_a_failed_cycle_and_goes_on(group_config):
    """A BackendError outside a transfer (here the source refuses its PCPI once) does not end the
    run: it is reported with the wait, the next attempt recovers first, and the group ends stable
    with every export equal to the newest source PCPI (I3); cycles come ``interval`` apart."""
    h = Harness(group_config())
    fill(h.writer, [r.source for r in h.config.replicas])
    h.cycle()
    h.faults.add(Rule(hook="coalesce_snapshot_create", volume="src", times=1, message="source gone"))
    h.writer.write("A", "new", b"n" * 100)
    reports, errors, sleeps = [], [], []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise Stop

    with pytest.raises(Stop):
        h.agent.run_forever(
            5.0, on_cycle=reports.append, on_error=lambda exc, wait: errors.append((exc.message, wait)), sleep=sleep
        )
    assert [(("source gone" in m), w) for m, w in errors] == [(True, 5.0)]
    assert len(reports) == 2 and all(r["cycle"] for r in reports) and sleeps == [5.0, 5.0, 5.0]
    assert set(h.states().values()) == {"stable"}
    h.assert_invariants()
    assert h.exported_fingerprints()["A"] == h.writer.snapshots[max(h.writer.snapshots)]["A"]


def test_run_forever_lets_other_errors_end_the_run(group_config):
    """Only BackendError is retried: anything else (a bug, an interrupt) ends the run at once."""
    h = Harness(group_config())

    def cycle():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        h.agent.run_forever(1.0, cycle=cycle, sleep=lambda s: pytest.fail("slept after an interrupt"))


def test_run_forever_stops_between_cycles_when_asked(group_config):
    """The stop event (a SIGTERM in `coalesce run`) never cuts a cycle short: the cycle under way ends
    normally, then the loop returns without waiting for the interval."""
    import threading

    h = Harness(group_config())
    fill(h.writer, [r.source for r in h.config.replicas])
    stop = threading.Event()
    reports = []

    def cycle():
        stop.set()  # the signal arrives while the cycle runs
        return h.agent.run_once()

    h.agent.run_forever(3600.0, cycle=cycle, on_cycle=reports.append, stop=stop)
    assert len(reports) == 1 and reports[0]["cycle"]
    assert set(h.states().values()) == {"stable"}
    h.assert_invariants()
