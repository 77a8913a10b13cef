"""A source of one backend into a destination of another.  A POSIX destination's file system moves
a file's mtime when its data are written and a directory's when its entries change, so every
source's stream must set those mtimes after such changes even where its two PCPIs agree on them
(mem's and sim's writers keep times the tests choose): the check before ``done`` compares mtimes
(docs/verification.md), and an update that left the kernel's time failed it at every cycle."""

from __future__ import annotations

import pytest

from coalesce_core.testing.harness import Harness
from coalesce_core.verifier import verify_replicas


@pytest.mark.btrfs
@pytest.mark.parametrize("source", ["mem", "sim", "btrfs"])
def test_a_rewritten_file_and_a_new_entry_keep_their_source_s_mtimes_on_a_real_destination(
    group_config, btrfs_urls, source
):
    extra = {"source_url": btrfs_urls()} if source == "btrfs" else {"scheme": source}
    h = Harness(group_config(replicas=("B",), dest_url=btrfs_urls(), **extra))
    h.writer.write("B", "b/f", b"old B")
    assert h.cycle()["failures"] == 0
    h.writer.write("B", "b/f", b"new B")  # the same size: only data change
    h.writer.write("B", "c/new", b"x")  # the qtree root's entries change
    report = h.cycle()
    assert report["failures"] == 0, h.agent.failures
    r = h.agent.state.replicas["B"]
    assert r.state == "stable" and h.agent.dest.fingerprint("B", r.exported) == h.agent.source.fingerprint(
        "B", r.source_point
    )
    (row,) = verify_replicas(h.agent.source, h.agent.dest, h.agent.state, ["B"], full=True)
    assert row["result"] == "ok", row  # mtimes included
    h.assert_invariants()
