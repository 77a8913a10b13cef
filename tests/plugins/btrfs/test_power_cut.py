"""Power cuts on a real btrfs destination: what was not flushed is lost, what `done` claims is not.

The destination lives on a btrfs file system of its own (realfs.PowerCutBtrfs): at a named crash
point the agent dies and the file system restarts from a reflink copy of its loop image taken at
that instant, which holds what a disk would hold after a power cut there.  The ledger (SQLite,
``synchronous=FULL``, on another file system) keeps its committed transactions.  A new agent
recovers: every export shows a complete image (I3, I6), and the group then settles on the newest
source image (I7).  The sim counterpart, with torn writes, is tests/plugins/sim/test_sim_power_cut.py;
without the durability barrier before `done` (hookspecs: coalesce_apply) an update recorded `done`
loses its data here and the jump-ahead exports a partial image.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from coalesce_core import crashpoints
from coalesce_core.testing.harness import Harness

from ..sim.test_sim_power_cut import _scenario, _settle

pytestmark = pytest.mark.btrfs


@pytest.fixture
def power_config(group_config, btrfs_urls, btrfs_power) -> Callable[..., Any]:
    """Groups with their source on the session's btrfs and their destination on ``btrfs_power``."""
    return lambda **kw: group_config(
        scheme="btrfs", source_url=btrfs_urls("src"), dest_url=btrfs_power.url("dst"), **{**kw, "parallel": 1}
    )


def power_cut_at(h: Harness, fs: Any, point: str, step: Callable[[], object]) -> bool:
    """Run ``step`` and cut the destination's power at crash point ``point`` (``name:n``), or when
    the step ends if it never reaches it; a new agent recovers on the restarted file system."""
    images: list[str] = []
    remove = crashpoints.at_crash(lambda _point: images.append(fs.cut()))
    try:
        crashed = crashpoints.run_armed(point, step)
    finally:
        remove()
    if not crashed:
        images.append(fs.cut())
    fs.restart(images[0])
    h.restart()
    return crashed


#: where unflushed data matter: inside and right after an update (its `done` committed, no
#: destination PCPI yet), and around the jump-ahead and the export switch
POINTS = ["mid_apply:3", "after_commit:3", "after_commit:4", "after_new_base_pcpi:1", "before_export_switch:1"]


@pytest.mark.parametrize("point", POINTS)
def test_power_cut_of_a_btrfs_destination_then_recovery_I3_I6_I7(power_config, btrfs_power, point):
    h, step = _scenario(power_config, point.split(":")[0])
    before = h.exported_fingerprints()
    assert power_cut_at(h, btrfs_power, point, step), f"the scenario never reached {point}"
    assert h.agent.state.phase == "idle"
    h.assert_invariants()
    after = h.exported_fingerprints()
    lost = [n for n, f in before.items() if f is not None and after.get(n) is None]
    assert not lost, f"I6: exported images lost by the power cut: {lost}"
    _settle(h)
