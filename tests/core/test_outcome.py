"""What a cycle came to per source (coalesce_core/outcome.py): the `run --once` exit code 10."""

from __future__ import annotations

from coalesce_core import agent
from coalesce_core.outcome import SOURCE_FAILURES, SourceOutcome, source_outcome

ORIGINS = {"A1": "a", "A2": "a", "B1": "b", "C1": "c"}


def failure(replica: str, trigger: str) -> dict[str, str]:
    return {"replica": replica, "trigger": trigger, "error": "boom"}


def test_a_source_that_refused_its_pcpi_beside_one_that_completed_is_partial():
    out = source_outcome({"a": True, "b": False}, ORIGINS, [failure("B1", "missed_cycle")], ["b"], 0)
    assert out == SourceOutcome(completed=("a",), failed=("b",), other=False) and out.partial


def test_failed_transfers_only_of_one_source_are_partial():
    out = source_outcome({"a": True, "b": True, "c": True}, ORIGINS, [failure("A2", "update_failed")], [], 0)
    assert (out.completed, out.failed, out.partial) == (("b", "c"), ("a",), True)


def test_a_release_a_source_refused_fails_that_source():
    out = source_outcome({"a": True, "b": True}, ORIGINS, [], ["b"], 0)
    assert (out.completed, out.failed, out.partial) == (("a",), ("b",), True)


def test_every_source_failing_is_not_partial():
    out = source_outcome({"a": False, "b": False}, ORIGINS, [], ["a", "b"], 0)
    assert out.failed == ("a", "b") and not out.completed and not out.partial


def test_a_clean_cycle_is_not_partial():
    out = source_outcome({"a": True, "b": True}, ORIGINS, [], [], 0)
    assert out.completed == ("a", "b") and not out.failed and not out.partial


def test_a_failure_that_is_no_sources_is_not_partial():
    """The destination refused a PCPI, a rollback failed, or a source serves another group (exit 2)."""
    refused_b = ({"a": True, "b": False}, ORIGINS)
    assert source_outcome(*refused_b, [], ["b"], 1).other  # e.g. the jump-ahead PCPI refused too
    assert not source_outcome(*refused_b, [failure("A1", "rollback_failed")], ["b"], 0).partial
    assert not source_outcome(*refused_b, [failure("gone", "update_failed")], ["b"], 0).partial
    in_use = source_outcome({"a": True, "b": False}, ORIGINS, [], [], 1)  # VolumeInUse: no source's refusal
    assert in_use.failed == ("b",) and in_use.other and not in_use.partial


def test_the_source_failures_are_the_agents_transfer_failures_and_missed_cycles():
    assert SOURCE_FAILURES == {*agent.TRANSFER_FAILURES, agent.MISSED}
