"""A replica whose every update fails, on real btrfs volumes, driven as an operator would (the CLI).

A fault plugin (``COALESCE_FAULTS``, ``updates_only``) makes every incremental update of
replica B fail, as a change stream the destination can never apply would, while its
baselines still work. The failure must show (`run --once` exits 8, `status` keeps B's
``last_error`` until a transfer of B succeeds), B must leave the cycle after
``reseed_after`` failed updates, be re-seeded by a baseline, and end exporting the newest
source point; replica A is brought up to date every cycle throughout. What readers see is
read from the files under the export paths, not taken from the ledger.
"""

from __future__ import annotations

import json
import os

import pytest
from groups import PosixCliGroup

pytestmark = pytest.mark.btrfs

# every update of qtree "qb" (replica B) fails; its baselines (base None) do not
BROKEN_STREAM = "coalesce_diff:qtree=qb:volume=-src:updates_only=1"


class Group(PosixCliGroup):
    def __init__(self, tmp_path, src_url, dst_url):
        # parallel = 1: A's update runs before B's re-seed, so the jump-ahead never waits for the
        # re-seed (it does not anyway) and B joins at the next cycle's jump-ahead, deterministically
        super().__init__(tmp_path, src_url, dst_url, "rs", "parallel = 1\nreseed_after = 2\n", file_size=40_000)

    def run(self, *args, faults=True, check=0):
        """With ``faults``, every update of replica B fails (BROKEN_STREAM)."""
        return super().run(*args, env={"COALESCE_FAULTS": BROKEN_STREAM if faults else None}, check=check)

    def replicas(self):
        return {r["name"]: r for r in json.loads(self.run("status", "--json", faults=False).stdout)["replicas"]}

    def change(self, round_):
        self.write("A", f"round-{round_}", os.urandom(5000))
        self.write("qb", f"round-{round_}", os.urandom(5000))
        return self.source_fps()


def test_every_update_of_one_replica_fails_it_is_reseeded(tmp_path, btrfs_urls):
    g = Group(tmp_path, btrfs_urls("src"), btrfs_urls("dst"))
    g.run("init", faults=False)
    g.run("run", "--once")  # the baselines work with the broken stream
    good = g.source_fps()
    assert g.exported_fps() == good

    # 1st failed update: rolled back, B stays in the cycle, stable, but the failure shows
    now = g.change(1)
    p = g.run("--debug", "run", "--once", check=8)
    assert "update_failed B: update failed: InjectedFault" in p.stderr
    b = g.replicas()["B"]
    assert (b["state"], b["consecutive_failures"]) == ("stable", 1)
    assert b["last_error"].startswith("update failed: InjectedFault")
    assert g.exported_fps() == {"A": now["A"], "B": good["B"]}  # A unaffected; B keeps its image

    # 2nd failed update in a row (reseed_after = 2): B leaves the cycle to be re-seeded
    now = g.change(2)
    g.run("run", "--once", check=8)
    b = g.replicas()["B"]
    assert (b["state"], b["consecutive_failures"]) == ("reseed_pending", 2)
    assert "2 updates failed in a row" in b["reseed_reason"] and b["last_error"]
    assert g.exported_fps() == {"A": now["A"], "B": good["B"]}  # still its last good image
    assert g.run("check", faults=False).returncode == 0

    # the re-seed: a baseline of B from this cycle's source PCPI, outside the cycle (exit 3:
    # B is not stable yet, nothing failed); B's error is gone with the successful transfer
    reseeded = g.change(3)
    g.run("run", "--once", check=3)
    b = g.replicas()["B"]
    assert (b["state"], b["last_error"], b["consecutive_failures"]) == ("reseeded", None, 0)
    assert g.exported_fps() == {"A": reseeded["A"], "B": good["B"]}

    # B rejoins the cycle at the next jump-ahead, exporting the source point of its re-seed
    g.run("run", "--once", check=0)
    b = g.replicas()["B"]
    assert b["state"] == "stable" and b["last_error"] is None
    assert g.exported_fps() == reseeded
    assert g.run("check", faults=False).returncode == 0

    # with the stream fixed, B's next update moves it to the newest source point
    now = g.change(4)
    g.run("run", "--once", faults=False, check=0)
    assert g.exported_fps() == now
    st = json.loads(g.run("status", "--json", faults=False).stdout)
    assert [p["role"] for p in st["pcpis"]] == ["base"]  # B's pinned image was released
