"""The agent's run loop (Agent.run_forever: what `coalesce run` does between cycles)."""

from __future__ import annotations

import threading

import pytest

from coalesce_core.agent import Agent
from coalesce_core.backend.faults import Rule
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.config import parse_config
from coalesce_core.errors import ConfigError
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill


class Stop(Exception):
    pass


def test_run_forever_recovers_after_a_failed_cycle_and_goes_on(group_config):
    """A BackendError outside a transfer (here the destination's export switch fails once) does not
    end the run: it is reported with the wait, the next attempt recovers first, and the group ends
    stable with every export equal to the newest source PCPI (I3); cycles come ``interval`` apart."""
    h = Harness(group_config())
    fill(h.writer, [r.source for r in h.config.replicas])
    h.cycle()
    h.faults.add(Rule(hook="coalesce_export", volume="dst", times=1, message="export table busy"))
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
    assert [(("export table busy" in m), w) for m, w in errors] == [(True, 5.0)]
    assert len(reports) == 2 and all(r["cycle"] for r in reports) and sleeps == [5.0, 5.0, 5.0]
    assert set(h.states().values()) == {"stable"}
    h.assert_invariants()
    assert h.exported_fingerprints()["A"] == h.writer.snapshots[max(h.writer.snapshots)]["A"]


def test_run_forever_goes_on_through_a_source_outage(group_config):
    """The source cannot be reached for two cycles: each one ends at once (no error escapes, no
    recovery needed), every replica keeps exporting its image and shows the outage; then it comes
    back and the group catches up (I3, I7)."""
    h = Harness(group_config())
    fill(h.writer, [r.source for r in h.config.replicas])
    h.cycle()
    images = h.exported_fingerprints()
    down = [
        h.faults.add(Rule(hook=hook, volume="src", message="no route to host"))
        for hook in ("coalesce_open_volume", "coalesce_snapshot_list", "coalesce_snapshot_create")
    ]
    h.writer.write("A", "new", b"n" * 100)
    reports, errors, sleeps = [], [], []

    def sleep(seconds):
        sleeps.append(seconds)
        assert h.exported_fingerprints() == images or len(sleeps) > 2
        if len(sleeps) == 2:
            h.faults.rules[:] = [r for r in h.faults.rules if r not in down]
        if len(sleeps) == 3:
            raise Stop

    with pytest.raises(Stop):
        h.agent.run_forever(5.0, on_cycle=reports.append, on_error=lambda exc, wait: errors.append(exc), sleep=sleep)
    assert errors == [] and [r["failures"] for r in reports] == [3, 3, 0]
    assert all("no route to host" in e for e in reports[0]["failed"].values())
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


def _config_without(h: Harness, text_change) -> object:
    path = h.config.path
    assert path is not None
    text = text_change(open(path).read())
    return parse_config(text, path)


def test_open_refuses_a_config_that_lost_or_changed_a_replica(group_config):
    """The config is the truth: a replica of the ledger the config lacks, or gives another source, is a
    ConfigError naming `coalesce remove` / `coalesce add`, before anything changes; without
    ``reconcile`` (the remove and add verbs) the group opens."""
    h = Harness(group_config())
    fill(h.writer, [r.source for r in h.config.replicas])
    h.cycle()
    h.agent.close()
    lost = _config_without(h, lambda t: t.replace('[[replica]]\nname = "B"\n', ""))
    with pytest.raises(ConfigError) as ei:
        Agent.open(lost, pm=h.pm, clock=h.clock)
    assert "replica 'B' is in the ledger but not in" in ei.value.message
    assert "`coalesce remove B`" in ei.value.hint
    moved = _config_without(h, lambda t: t.replace('name = "C"\n', 'name = "C"\nsource = "A"\n'))
    with pytest.raises(ConfigError) as ei:
        Agent.open(moved, pm=h.pm, clock=h.clock)
    assert "replica 'C' has source qtree 'C' in the ledger, 'A' in" in ei.value.message
    assert "`coalesce remove C` then `coalesce add C --source A`" in ei.value.hint
    agent = Agent.open(lost, pm=h.pm, clock=h.clock, reconcile=False)
    try:
        assert set(agent.state.replicas) == {"A", "B", "C"}
        agent.remove_replica("B")
        assert set(agent.state.replicas) == {"A", "C"}
    finally:
        agent.close()
    Agent.open(lost, pm=h.pm, clock=h.clock).close()  # reconciled


def test_replicas_and_source_pcpis_carry_the_name_of_their_source(group_config):
    """Each replica records the source it comes from (its ``from``; the group's one source for a
    replica `coalesce add` adds, asked directly or through the request queue), and each source PCPI
    the source that holds it."""
    import os

    from coalesce_core import requests

    base = group_config(replicas=("A", "B"))
    url = base.sole_source().url
    path = base.path
    assert path is not None
    text = open(path).read().replace(f'source = "{url}"\n', "")
    named = parse_config(text + f'\n[[source]]\nname = "lab"\nurl = "{url}"\n', path)
    h = Harness(named)
    fill(h.writer, ["A", "B", "C", "D"])
    h.cycle()
    h.agent.add_replica("C")
    h.agent.ledger.ask("add", requests.make_args("add", replica="D", source="D"), h.clock(), os.getpid())
    h.agent.take_requests()
    h.cycle()
    st = h.agent.state
    assert {r.name: r.origin for r in st.replicas.values()} == {"A": "lab", "B": "lab", "C": "lab", "D": "lab"}
    assert st.source_pcpis and {sp.source for sp in st.source_pcpis.values()} == {"lab"}
    assert set(h.states().values()) == {"stable"} and st.cycle_targets == {}
    h.assert_invariants()


def test_open_refuses_a_config_whose_replica_comes_from_a_source_of_another_name(group_config):
    """A source's name is part of the group: the short form ``[group] source`` is the source
    ``default``, so the same volume written as a [[source]] of another name is refused before anything
    changes, and named ``default`` it opens."""
    h = Harness(group_config(replicas=("A",)))
    fill(h.writer, ["A"])
    h.cycle()
    h.agent.close()
    url = h.config.sole_source().url

    def as_table(name: str) -> object:
        return _config_without(
            h, lambda t: t.replace(f'source = "{url}"\n', "") + f'\n[[source]]\nname = "{name}"\nurl = "{url}"\n'
        )

    with pytest.raises(ConfigError) as ei:
        Agent.open(as_table("lab"), pm=h.pm, clock=h.clock)
    assert "replica 'A' comes from source 'default' in the ledger, 'lab' in" in ei.value.message
    assert 'name = "default"' in ei.value.hint and "`coalesce remove A` then `coalesce add A`" in ei.value.hint
    agent = Agent.open(as_table("default"), pm=h.pm, clock=h.clock)
    try:
        assert agent.state.replicas["A"].origin == "default" and agent.state.replicas["A"].state == "stable"
    finally:
        agent.close()


class _ApplyThreads:
    """Observer plugin: the thread of every apply (a transfer's, in the agent's pool)."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume, qtree, records, use_purgatory):
        self.threads.append(threading.current_thread())
        return (yield)


def test_the_transfers_of_every_cycle_run_in_one_pool_that_closes_with_the_agent(group_config):
    """A cycle does not start threads of its own: the transfers of five cycles of three replicas run
    in the same ``parallel`` workers, and closing the agent ends them."""
    seen = _ApplyThreads()
    h = Harness(group_config(parallel=2), plugins=[seen])
    fill(h.writer, "ABC")
    for k in range(5):
        h.writer.write("A", "f", str(k).encode())
        h.cycle()
    assert len(seen.threads) == 15 and threading.current_thread() not in seen.threads
    workers = {id(t): t for t in seen.threads}.values()
    assert 1 <= len(workers) <= 2
    assert all(t.is_alive() for t in workers)
    h.agent.close()
    assert not any(t.is_alive() for t in workers)


def test_a_tick_with_no_retry_due_writes_nothing(group_config):
    """A decision that changes nothing (a Tick between cycles with no retry due) costs no ledger
    transaction; a cycle still commits what it decides."""
    h = Harness(group_config())
    fill(h.writer, "ABC")
    h.cycle()
    before, commits = h.agent.state, h.agent.ledger.commits
    h.agent.tick()
    assert h.agent.state == before and h.agent.ledger.commits == commits
    h.cycle()
    assert h.agent.ledger.commits > commits and h.agent.state.cycle == before.cycle + 1
