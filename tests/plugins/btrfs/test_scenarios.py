"""The core's scenario and crash-recovery tests (tests/core) re-run on real btrfs volumes.

The test functions are imported from tests/core unchanged; only the
``group_config`` fixture is overridden so that the source and the destination
are fresh btrfs subvolumes (tests/realfs.py).
"""

from __future__ import annotations

import pytest
from reuse import adopt

pytestmark = pytest.mark.btrfs

_scenarios, _crash = adopt(globals(), "btrfs", "core/test_scenarios.py", "core/test_crash_recovery.py")


@pytest.fixture
def group_config(group_config, btrfs_urls):
    def make(**kw):
        kw.setdefault("source_url", btrfs_urls("src"))
        kw.setdefault("dest_url", btrfs_urls("dst"))
        return group_config(**kw)

    return make
