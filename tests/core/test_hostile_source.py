"""A hostile or misconfigured source that answers a diff with another stream than the one asked
for (coalesce_core.stream.requested): the update fails before any record is applied, names what
was asked and what came, takes the rollback path and exports nothing wrong.  On every backend's
volumes here (real btrfs and zfs-fuse included); the same source behind TLS and a fake server in
tests/net."""

from __future__ import annotations

import re

import pytest
from backends import backend_fixtures
from forger import ForgeBegin

from coalesce_core.testing.harness import Harness

backend, group_config = backend_fixtures("mem", "sim", "btrfs", "zfs")


@pytest.mark.parametrize(
    "forged, came",
    [
        ({"qtree": "B"}, "qtree 'B' from '{base}' to '{target}'"),
        ({"target": "co-g-src-999999"}, "qtree 'A' from '{base}' to 'co-g-src-999999'"),
    ],
    ids=["qtree", "target"],
)
def test_a_stream_of_another_qtree_or_target_fails_the_update_before_anything_is_applied(group_config, forged, came):
    config = group_config(replicas=("A",))
    forge = ForgeBegin(volume=config.source, **forged)  # the source volume's streams only
    h = Harness(config, plugins=[forge])
    h.writer.write("A", "a/f", b"old")
    h.writer.write("B", "other", b"B's data")
    h.cycle()
    before = h.agent.state.replicas["A"]
    h.writer.write("A", "a/f", b"new")
    forge.armed = True
    report = h.cycle()
    assert report["failures"] == 1 and forge.pulled == [1]  # the Begin, nothing after it
    (failure,) = h.agent.failures
    assert failure["replica"] == "A" and failure["trigger"] == "update_failed"
    asked = re.search(r"the transfer asked for qtree 'A' from '([^']+)' to '([^']+)'", failure["error"])
    assert asked is not None and asked[1] == before.source_point and asked[2] != before.source_point
    came = came.format(base=asked[1], target=asked[2])
    assert f"UnrequestedStream: the source sent the stream of {came};" in failure["error"]
    assert "nothing of this stream was applied" in failure["error"]  # the hint
    after = h.agent.state.replicas["A"]
    assert after.state == "stable" and after.source_point == before.source_point  # rolled back, not moved
    assert h.agent.dest.fingerprint("A", after.exported) == h.agent.source.fingerprint("A", before.source_point)
    h.assert_invariants()
    forge.armed = False
    assert h.cycle()["failures"] == 0
    r = h.agent.state.replicas["A"]
    assert r.source_point != before.source_point
    assert h.agent.dest.fingerprint("A", r.exported) == h.agent.source.fingerprint("A", r.source_point)
    h.assert_invariants()
