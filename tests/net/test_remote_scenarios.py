"""The core's scenario and crash tests with the source behind TLS and behind SSH.

The test functions of tests/core/test_scenarios.py and test_crash_recovery.py
run unchanged; only their Harness is swapped for one whose agent reaches the
source through a source service (a thread of this process for TLS, a real
sshd running `coalesce serve --stdio` as a forced command for SSH), and
their group configs point the source at the remote URL.
"""

from __future__ import annotations

import pytest
from core import test_crash_recovery as C
from core import test_scenarios as S
from net.netkit import RemoteHarness

from coalesce_core.crashpoints import CRASH_POINTS
from coalesce_core.testing.workload import fill


@pytest.fixture
def remote_harness(remote_config, monkeypatch):
    monkeypatch.setattr(S, "Harness", RemoteHarness)
    monkeypatch.setattr(C, "Harness", RemoteHarness)

    def make(**kw):
        h = RemoteHarness(remote_config(**kw))
        fill(h.writer, [r.source for r in h.config.replicas])
        return h

    return make


HARNESS_SCENARIOS = [
    "test_first_cycle_baselines_every_replica_and_exports_one_base",
    "test_failed_update_rolls_back_with_one_rollback_pcpi",
    "test_all_failed_updates_share_one_rollback_pcpi",
    "test_failed_rollback_leaves_the_cycle_retries_and_rejoins",
    "test_new_replica_baseline_joins_at_the_next_jump_ahead",
    "test_failed_baseline_removes_partial_data_and_retries_next_cycle",
    "test_break_and_resync",
    "test_illegal_requests_are_clear_errors",
    "test_a_replica_that_cannot_apply_its_stream_is_reseeded",
]


@pytest.mark.parametrize("name", HARNESS_SCENARIOS)
def test_scenario(name, remote_harness):
    getattr(S, name)(remote_harness)


def test_fig7(remote_config, remote_harness):
    S.test_fig7_readers_see_old_images_until_the_slowest_completes(remote_config)


def test_many_replicas(remote_config, remote_harness):
    S.test_many_replicas_never_more_than_four_cycle_pcpis(remote_config, 24)


CYCLE_POINTS = C.CYCLE_POINTS


# The second hit of a point differs from the first only in which replica's work is cut, not in
# what the transport sees (a source service the restarted agent reconnects to): it runs on TLS
# (in-process server), the first hit on TLS at every point. A real sshd costs about 16 s a test, and
# what it adds to TLS is the transport the restarted agent reconnects through, not the recovery
# (the same core code at every point): over ssh the cycle is cut once in each of its phases.
SSH_POINTS = ("after_source_pcpi", "mid_apply", "mid_rollback", "between_jump_ahead_pcpis", "mid_release")


@pytest.mark.parametrize(("transport", "nth"), [("tls", 1), ("tls", 2)], indirect=["transport"])
@pytest.mark.parametrize("point", CYCLE_POINTS)
def test_crash_in_a_cycle_then_restart(point, nth, remote_config, remote_harness):
    C.test_crash_in_a_cycle_then_restart(remote_config, point, nth)


@pytest.mark.parametrize("transport", ["ssh"], indirect=True)
@pytest.mark.parametrize("point", SSH_POINTS)
def test_crash_in_each_phase_then_restart_over_ssh(point, remote_config, remote_harness):
    C.test_crash_in_a_cycle_then_restart(remote_config, point, 1)


@pytest.mark.parametrize(
    "name",
    [
        "test_crash_mid_baseline",
        "test_crash_mid_retry",
        "test_crash_during_resync",
        "test_crash_after_kept_pcpi",
        "test_crash_after_kept_release",
        "test_unknown_pcpis_are_reconciled_on_restart",
    ],
)
def test_crash_other(name, remote_config, remote_harness):
    getattr(C, name)(remote_config)


def test_crash_mid_reseed(remote_config, remote_harness):
    C.test_crash_mid_reseed(remote_config, 1)


def test_every_crash_point_is_covered():
    assert set(CYCLE_POINTS) | set(C.OTHER_POINTS) == set(CRASH_POINTS)
    assert set(SSH_POINTS) <= set(CYCLE_POINTS)
