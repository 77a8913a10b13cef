"""`coalesce run` SIGKILLed at crash points and at a random moment, on a zfs-fuse pool.

The scenario code is tests/plugins/btrfs/test_sigkill.py's; zfs-fuse is slow,
so a representative subset of the crash points runs here (all of them run on
btrfs, and all of them in-process on zfs in test_scenarios.py).
"""

from __future__ import annotations

import signal
import subprocess

import pytest
from reuse import load

pytestmark = pytest.mark.zfs

_k = load("plugins/btrfs/test_sigkill.py", "zfs")

POINTS = ["between_jump_ahead_pcpis", "mid_apply", "mid_rollback"]


def zfs_pcpis(url):
    ds = url.split("://", 1)[1]
    out = subprocess.run(["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", ds], capture_output=True,
                         text=True, check=True).stdout.split()
    return sum(1 for n in out if n.startswith(ds + "@"))


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_crash_points(tmp_path, zfs_urls, point):
    g = _k.Group(tmp_path, zfs_urls("src"), zfs_urls("dst"))
    old, new = g.prepared()
    p = g.run("run", "--once", env={"COALESCE_CRASH_AT": point, "COALESCE_FAULTS": _k.FAULTS}, check=None)
    assert p.returncode == -signal.SIGKILL, f"{point} was not reached: rc={p.returncode}\n{p.stderr}"
    g.recovered(old, new, zfs_pcpis)


def test_sigkill_at_a_random_moment(tmp_path, zfs_urls):
    _k.random_kills(tmp_path, zfs_urls, zfs_pcpis, seeds=[7])
