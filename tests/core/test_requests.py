"""Requests handed to a running agent (coalesce_core/requests.py, the queue in coalesce_core/ledger.py,
Agent.take_requests): taken at safe points, answered in the transaction of their decision, refused with
their error, never taken once withdrawn."""

from __future__ import annotations

import os

import pytest

from coalesce_core import requests
from coalesce_core.backend.faults import source_outage
from coalesce_core.backend.hookspecs import ACTIVE, hookimpl
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill


class Stop(Exception):
    pass


@pytest.fixture
def harness(group_config):
    """A three-replica group on mem through one cycle: every replica stable."""
    h = Harness(group_config())
    fill(h.writer, [r.source for r in h.config.replicas])
    h.cycle()
    assert set(h.states().values()) == {"stable"}
    return h


def ask(h: Harness, verb: str, **given: str) -> requests.Request:
    return h.agent.ledger.ask(verb, requests.make_args(verb, **given), h.clock(), os.getpid())


def test_a_request_is_decided_and_answered_I8(harness):
    h = harness
    req = ask(h, "break", replica="A")
    assert h.agent.ledger.request(req.id).status == requests.PENDING
    (answer,) = h.agent.take_requests()
    assert (answer.status, answer.message) == (requests.DONE, "replica A is broken")
    assert h.agent.ledger.request(req.id) == answer
    assert h.states()["A"] == "broken" and h.agent.dest.exported()["A"] == ACTIVE
    assert h.agent.take_requests() == []  # answered once
    h.assert_invariants()


def test_a_refused_request_is_answered_with_its_error_and_changes_nothing(harness):
    h = harness
    before = h.agent.state
    bad = ask(h, "resync", replica="A")  # A is not broken
    unknown = ask(h, "remove", replica="nosuch")
    answers = h.agent.take_requests()
    assert [a.status for a in answers] == [requests.REFUSED, requests.REFUSED]
    assert answers[0].exit_code == 6 and "resync" in answers[0].message and answers[0].hint
    assert answers[1].message == "group 'g' has no replica 'nosuch'"
    assert [h.agent.ledger.request(r.id).status for r in (bad, unknown)] == [requests.REFUSED] * 2
    assert h.agent.state == before


def test_a_withdrawn_request_is_never_taken(harness):
    h = harness
    req = ask(h, "break", replica="A")
    assert h.agent.ledger.withdraw(req.id, h.clock())
    assert h.agent.take_requests() == []
    assert h.states()["A"] == "stable"
    assert h.agent.ledger.request(req.id).status == requests.WITHDRAWN
    taken = ask(h, "break", replica="B")
    h.agent.take_requests()
    assert not h.agent.ledger.withdraw(taken.id, h.clock())  # answered first: it stands
    assert h.agent.ledger.request(taken.id).status == requests.DONE


def test_a_crash_after_the_decision_keeps_the_answer_and_recovers_its_effects_I6(harness):
    """The answer is committed with the decision, before its effects run: after a crash right there the
    request is answered once, and recovery re-applies the export table the decision named."""
    h = harness
    req = ask(h, "break", replica="A")
    assert h.crash("after_commit", h.agent.take_requests)
    assert h.agent.ledger.request(req.id).status == requests.DONE
    assert h.agent.take_requests() == []
    assert h.states()["A"] == "broken" and h.agent.dest.exported()["A"] == ACTIVE
    h.assert_invariants()


def test_run_once_takes_the_requests_asked_during_its_cycle(harness):
    """A request asked while a cycle runs waits for its end (no mid-cycle requests), and `run --once`
    takes it before it returns."""
    h = harness
    asked: list[requests.Request] = []

    class AskMidCycle:
        @hookimpl
        def coalesce_pcpi_taken(self, group, volume, name, role):
            if role == "source" and not asked:
                asked.append(ask(h, "remove", replica="C"))

    h.pm.register(AskMidCycle())
    h.writer.write("A", "new", b"n" * 10)
    report = h.cycle()
    assert report["states"] == {"stable": 3}  # C went through the cycle
    assert h.agent.ledger.request(asked[0].id).status == requests.DONE
    assert set(h.states()) == {"A", "B"} and "C" not in h.agent.dest.exported()
    assert "C" in h.agent.dest.qtree_list()  # its data stay
    h.assert_invariants()


def test_run_forever_takes_requests_while_it_waits_between_cycles(harness):
    h = harness
    sleeps: list[float] = []
    asked: list[requests.Request] = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 1:
            asked.append(ask(h, "break", replica="B"))
        else:
            raise Stop

    with pytest.raises(Stop):
        h.agent.run_forever(3600.0, sleep=sleep, poll=0.5)
    assert sleeps == [0.5, 0.5]  # the wait is cut into slices; the request was taken after the first
    assert h.agent.ledger.request(asked[0].id).status == requests.DONE
    assert h.states()["B"] == "broken"


def test_break_is_taken_while_the_source_is_down(harness):
    """The source's host is down: each cycle ends before any transfer (source_unavailable), the agent
    idle, so a failover is taken between those cycles, by the wait's poll or by the next cycle's
    start, without the source; the cycle that follows once the source is back leaves it out."""
    h = harness
    for rule in source_outage(h.config.source):
        h.faults.add(rule)
    report = h.cycle()
    assert h.agent.state.phase == "idle" and report["failures"] == 3 and h.agent.refusals
    ask(h, "break", replica="A")
    (answer,) = h.agent.take_requests()
    assert answer.status == requests.DONE and h.states()["A"] == "broken"
    assert h.agent.dest.exported()["A"] == ACTIVE
    ask(h, "resync", replica="A")
    h.cycle()  # taken at the start of run_once; the cycle ends again before any transfer
    assert h.agent.ledger.requests()[-1].status == requests.DONE and h.states()["A"] == "stable_uncoalesced"
    ask(h, "break", replica="A")
    h.cycle()
    h.faults.clear()
    h.cycle()
    assert h.states() == {"A": "broken", "B": "stable", "C": "stable"}
    h.assert_invariants()


def test_a_ledger_without_the_queue_reads_as_an_empty_one(harness):
    """Ledgers written before the queue existed: readers see no request, the first one asked makes it."""
    led = harness.agent.ledger
    led.conn.execute("DROP TABLE requests")
    assert led.requests() == [] and led.request(1) is None
    assert harness.agent.take_requests() == []
    assert ask(harness, "break", replica="A").id == 1
    assert [r.verb for r in led.requests(pending=True)] == ["break"]


def test_a_reseed_request_carries_its_reason(harness):
    h = harness
    ask(h, "reseed", replica="B", reason="the operator's reason")
    (answer,) = h.agent.take_requests()
    assert (answer.status, answer.message) == (requests.DONE, "replica B is reseed_pending")
    b = h.agent.state.replicas["B"]
    assert (b.state, b.reseed_reason) == ("reseed_pending", "the operator's reason")
    h.cycle()
    assert h.states()["B"] in ("reseeded", "stable")
    h.assert_invariants()


def test_resync_and_release_requests_with_the_source_down_I11(harness):
    """A resync handed to the running agent keeps the broken replica's writes, a release request deletes
    them; neither asks the source, which is down."""
    h = harness
    h.agent.break_mirror("A")
    for rule in source_outage(h.config.source):
        h.faults.add(rule)
    ask(h, "resync", replica="A")
    (answer,) = h.agent.take_requests()
    kept = h.agent.state.kept_pcpi("A")
    assert answer.status == requests.DONE and kept is not None and kept.name in h.agent.dest.snapshot_list()
    ask(h, "resync", replica="A", discard="yes")  # not broken any more: refused, as the verb would be
    (answer,) = h.agent.take_requests()
    assert answer.status == requests.REFUSED and answer.exit_code == 6
    ask(h, "release", replica="A")
    (answer,) = h.agent.take_requests()
    assert (answer.status, answer.message) == (requests.DONE, "the kept writes of replica A released")
    assert h.agent.state.kept_pcpi("A") is None and kept.name not in h.agent.dest.snapshot_list()
    ask(h, "release", replica="A")
    (answer,) = h.agent.take_requests()
    assert answer.status == requests.REFUSED and "keeps no writes" in answer.message and answer.hint
    h.faults.clear()
    h.assert_invariants()


def test_a_pin_request_names_its_generation_and_decides_a_pin_generation():
    from coalesce_core.cycle import events as ev

    for verb, pinned in (("pin", True), ("unpin", False)):
        req = requests.Request(id=8, verb=verb, args=requests.make_args(verb, generation="12", replica="x"))
        assert req.args == {"generation": "12"}
        assert req.describe() == f"request 8 ({verb} 12)"
        assert requests.event_for(req) == ev.PinGeneration(generation="12", pinned=pinned)
        assert requests.outcome(req, {}) == f"generation 12 {verb}ned"
