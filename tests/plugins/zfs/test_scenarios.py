"""The core's scenario and crash-recovery tests (tests/core) re-run on real zfs volumes.

The test functions are imported from tests/core unchanged; only the
``group_config`` fixture is overridden so that the source and the destination
are fresh zfs subvolumes (tests/realfs.py).
"""

from __future__ import annotations

import pytest
from reuse import adopt

pytestmark = pytest.mark.zfs

_scenarios, _crash = adopt(globals(), "zfs", "core/test_scenarios.py", "core/test_crash_recovery.py")


@pytest.fixture
def group_config(group_config, zfs_urls):
    def make(**kw):
        kw.setdefault("source_url", zfs_urls("src"))
        kw.setdefault("dest_url", zfs_urls("dst"))
        return group_config(**kw)

    return make


_many_core = globals()["test_many_replicas_never_more_than_four_cycle_pcpis"]


@pytest.mark.parametrize("n", [100])
def test_many_replicas_never_more_than_four_cycle_pcpis(group_config, n):
    """I1 with 100 replicas on zfs-fuse (300 on mem/btrfs; zfs-fuse needs ~0.2 s per qtree and cycle)."""
    _many_core(group_config, n)


_crash_core = globals()["test_crash_in_a_cycle_then_restart"]


@pytest.mark.parametrize("point", _crash.CYCLE_POINTS)
def test_crash_in_a_cycle_then_restart(group_config, point):
    """Every crash point, first pass only (nth=2 runs on mem and btrfs; zfs-fuse is slow)."""
    _crash_core(group_config, point, 1)
