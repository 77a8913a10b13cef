"""Every named scenario of tests/send_scenarios.py through coalesce on real btrfs (I3, I9).

One group per scenario (a source and a destination subvolume, one replica per
qtree): setup, baseline cycle, change, one incremental cycle.  Then the cycle
had no failures, every replica is stable at the new source PCPI, and each
exported image equals its source qtree in that PCPI (tests/trees.py).  The
native control, ``btrfs send -p OLD NEW | btrfs receive`` of the same two
source PCPIs, must reproduce the source too: it shows the scenario is one the
kernel's own replication gets right.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from send_scenarios import SCENARIOS, KeepSourcePcpis, drive
from trees import assert_same

from coalesce_core.testing.harness import Harness

pytestmark = pytest.mark.btrfs


def native_control(src, old: str, new: str, into: str) -> str:
    """``btrfs send OLD | receive``, then ``btrfs send -p OLD NEW | receive`` into ``into``; the received NEW."""
    os.makedirs(into)
    for argv in (
        ["btrfs", "-q", "send", src.snap_path(old)],
        ["btrfs", "-q", "send", "-p", src.snap_path(old), src.snap_path(new)],
    ):
        send = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert send.stdout is not None and send.stderr is not None  # both PIPE
        recv = subprocess.run(["btrfs", "-q", "receive", into], stdin=send.stdout, capture_output=True)
        send.stdout.close()
        err = send.stderr.read()
        assert send.wait() == 0, f"{argv}: {err.decode(errors='replace')}"
        assert recv.returncode == 0, f"btrfs receive: {recv.stderr.decode(errors='replace')}"
    return os.path.join(into, new)


def remove_received(into: str) -> None:
    for name in sorted(os.listdir(into)) if os.path.isdir(into) else ():
        subprocess.run(["btrfs", "subvolume", "delete", os.path.join(into, name)], capture_output=True)
    if os.path.isdir(into):
        os.rmdir(into)


@pytest.mark.parametrize("sc", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_scenario(sc, group_config, btrfs_urls):
    keep = KeepSourcePcpis()
    cfg = group_config(replicas=sc.qtrees, source_url=btrfs_urls("src"), dest_url=btrfs_urls("dst"))
    h = Harness(cfg, plugins=[keep])
    keep.source = h.agent.source.handle
    src = h.agent.source.handle
    out = drive(h, {"": sc})
    assert out.baseline["failures"] == 0, out.baseline
    assert out.incremental["failures"] == 0, {r.name: r.last_error for r in h.agent.state.replicas.values()}
    for r in h.agent.state.replicas.values():
        assert (r.state, r.source_point) == ("stable", out.new), r
    into = btrfs_urls("ctl").split("://", 1)[1]
    try:
        received = native_control(src, out.old, out.new, into)
        for q in sc.qtrees:
            want = os.path.join(src.snap_path(out.new), q)
            assert_same(want, os.path.join(received, q), what=f"native control, qtree {q}")
            assert_same(want, h.agent.export_path(q), what=f"replica {q}")
    finally:
        remove_received(into)
