"""Differential tests on real btrfs: random operations, one cycle, every replica equals its source
and ``btrfs send -p | btrfs receive`` of the same PCPIs is the control (tests/differential.py)."""

from __future__ import annotations

import differential as dt
import pytest
from differential import CYCLE, Rename, Sparse, Write

pytestmark = pytest.mark.btrfs

# send stream v1 sends a changed sparse file's holes as zeros: the control could not keep up with 1 TiB
BTRFS = dt.Backend(
    "btrfs",
    reflink=True,
    exchange=True,
    punch_hole=True,
    sparse_size=dt.TiB if dt.btrfs_send_proto() >= 2 else 16 * dt.MiB,
)


@pytest.mark.timeout(dt.run_timeout())
def test_differential(btrfs_urls, group_config):
    dt.run(BTRFS, btrfs_urls, group_config)


@pytest.mark.parametrize("name", dt.regressions(BTRFS))
def test_regression(name, btrfs_urls, group_config):
    dt.replay_regression(BTRFS, name, btrfs_urls, group_config)


def test_holes_of_a_rewritten_sparse_file_stay_holes(btrfs_urls, group_config):
    """A sparse file rewritten at the same size with its data elsewhere: the no-data stream names the
    whole hole as changed; the export keeps it a hole (replay checks the allocation, translate._cut)."""
    size = 16 * dt.MiB
    dt.replay(
        BTRFS,
        btrfs_urls,
        group_config,
        1,
        [Sparse("q0/c", size, ((0, 4096, 710),)), CYCLE, Sparse("q0/c", size, ((size - 70_000, 1, 377),)), CYCLE],
    )


def test_swapped_qtree_roots_keep_their_root_mtime(btrfs_urls, group_config):
    """Two non-empty qtrees renamed into each other's place: the translation falls back to the tree
    compare, whose root SetAttr must come although both roots' attributes are equal (walk.tree_diff)."""
    dt.replay(BTRFS, btrfs_urls, group_config, 2, QTREE_ROOTS_SWAPPED)


QTREE_ROOTS_SWAPPED = [
    Write("q0/a", 0, 10, 1),
    Write("q1/b", 0, 10, 1),
    CYCLE,
    Rename("q0", "_outside/t"),
    Rename("q1", "q0"),
    Rename("_outside/t", "q1"),
    CYCLE,
]
