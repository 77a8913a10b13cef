"""`coalesce run` SIGKILLed at every named crash point and at random moments, on real btrfs and zfs volumes.

After each kill, whatever readers see at the stable export paths is a complete
image of the source qtree at some source PCPI (compared by READING the files
under the export paths, not by trusting the ledger); after a restart the group
recovers, every replica is stable at the newest source point and the
destination holds exactly one PCPI (counted by the file system's own tools).
zfs-fuse is slow, so a representative subset of the crash points runs on it
(all of them run in-process on zfs in tests/core/test_crash_recovery.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
from backends import on_backend
from groups import EXE, PosixCliGroup

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.crashpoints import CRASH_POINTS

# the points of a cycle; a baseline, a retry, a re-seed and the kept writes of a resync have their own
# scenarios (tests/core/test_crash_recovery.py, tests/plugins/sim/test_sim_power_cut.py)
POINTS = [
    p
    for p in CRASH_POINTS
    if p not in ("mid_baseline", "mid_retry", "mid_reseed", "after_kept_pcpi", "after_kept_release")
]
# the diff of qtree "qb" fails once, so that the killed cycle also holds a rollback
FAULTS = "coalesce_diff:qtree=qb:record=3:times=1:volume=-src"


class Group(PosixCliGroup):
    def __init__(self, tmp_path, src_url, dst_url):
        super().__init__(tmp_path, src_url, dst_url, "rt", "parallel = 2\n", file_size=50_000)
        for q in ("A", "qb"):
            self.write(q, "small", q.encode() * 10)

    def popen_run(self):
        e = dict(os.environ)
        e.pop("COALESCE_CRASH_AT", None)
        return subprocess.Popen(
            [*EXE, "--config", str(self.cfg), "run", "--once"],
            env=e,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def prepared(self):
        self.run("init")
        self.run("run", "--once")
        old = self.source_fps()
        self.write("A", "dir/file", os.urandom(60_000))
        self.write("qb", "new", b"n" * 3000)
        os.unlink(os.path.join(self.root, "A", "small"))
        return old, self.source_fps()

    def recovered(self, old, new, count_pcpis):
        seen = self.exported_fps()
        for r in ("A", "B"):
            assert seen[r] in (old[r], new[r]), f"replica {r} exports a partial image after the kill (I3)"
        self.run("run", "--once")
        self.run("run", "--once")
        assert self.run("check").returncode == 0
        st = json.loads(self.run("status", "--json").stdout)
        assert {r["state"] for r in st["replicas"]} == {"stable"}
        assert self.exported_fps() == new
        assert count_pcpis(self.dst_url) == 1, "the destination must hold exactly one PCPI at rest (I1)"


def btrfs_pcpis(url):
    vol = Volume.open(plugin_manager(), url)
    out = subprocess.run(
        ["btrfs", "subvolume", "list", "-s", vol.handle.parent], capture_output=True, text=True, check=True
    ).stdout
    return sum(1 for line in out.splitlines() if f".coalesce-snapshots/{vol.handle.name}/" in line)


def zfs_pcpis(url):
    ds = url.split("://", 1)[1]
    out = subprocess.run(
        ["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", ds], capture_output=True, text=True, check=True
    ).stdout.split()
    return sum(1 for n in out if n.startswith(ds + "@"))


COUNT_PCPIS = {"btrfs": btrfs_pcpis, "zfs": zfs_pcpis}
ZFS_POINTS = ["between_jump_ahead_pcpis", "mid_apply", "mid_rollback"]


@pytest.mark.parametrize(
    ("backend", "point"), [on_backend("btrfs", p) for p in POINTS] + [on_backend("zfs", p) for p in ZFS_POINTS]
)
def test_sigkill_at_every_crash_point(tmp_path, request, backend, point):
    urls = request.getfixturevalue(f"{backend}_urls")
    g = Group(tmp_path, urls("src"), urls("dst"))
    old, new = g.prepared()
    p = g.run("run", "--once", env={"COALESCE_CRASH_AT": point, "COALESCE_FAULTS": FAULTS}, check=None)
    assert p.returncode == -signal.SIGKILL, f"{point} was not reached: rc={p.returncode}\n{p.stderr}"
    g.recovered(old, new, COUNT_PCPIS[backend])


def random_kills(tmp_path, urls, count_pcpis, seeds):
    """Kill `coalesce run --once` at random moments of a large update; at least one kill lands mid-run."""
    killed_mid_run = 0
    for seed in seeds:
        g = Group(tmp_path / f"seed{seed}", urls("src"), urls("dst"))
        old, new = g.prepared()
        os.makedirs(os.path.join(g.root, "A", "many"))
        for i in range(3000):
            g.write("A", f"many/f{i}", os.urandom(2000))
        new = g.source_fps()
        proc = g.popen_run()
        time.sleep(random.Random(seed).uniform(0.15, 0.75))
        if proc.poll() is None:
            killed_mid_run += 1
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        g.recovered(old, new, count_pcpis)
    assert killed_mid_run, "no kill landed while `coalesce run` was running; raise the update size"


@pytest.mark.parametrize(("backend", "seeds"), [on_backend("btrfs", (1, 2, 3)), on_backend("zfs", (7,))])
def test_sigkill_at_random_moments(tmp_path, request, backend, seeds):
    random_kills(tmp_path, request.getfixturevalue(f"{backend}_urls"), COUNT_PCPIS[backend], seeds=seeds)
