"""A hostile or misconfigured source that answers a diff with another stream than the one asked
for (coalesce_core.stream.requested): the update fails before any record is applied, names what
was asked and what came, takes the rollback path and exports nothing wrong.  On every backend's
volumes here (real btrfs and zfs-fuse included); the same source behind TLS and a fake server in
tests/net."""

from __future__ import annotations

import re

import pytest
from backends import backend_fixtures, on_backend
from forger import ForgeBegin

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.stream import records as R
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


class AppendRecords:
    """A hostile source: while armed, the stream of the source volume ends with ``records`` before
    its End (whose count it keeps right, so the codec finds nothing wrong)."""

    def __init__(self, *records: object) -> None:
        self.records = records
        self.armed = False

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree, base, target):
        result = yield
        if result is None or not self.armed or "/src" not in str(getattr(volume, "url", volume)):
            return result
        return self._append(result)

    def _append(self, stream):
        for rec in stream:
            if type(rec) is R.End:
                yield from self.records
                rec = R.End(records=rec.records + len(self.records))
            yield rec


HUGE = 1 << 62


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", [on_backend("mem"), on_backend("sim")])
@pytest.mark.parametrize(
    "forged",
    [R.Write(path="a/f", offset=HUGE, data=b"x"), R.Truncate(path="a/f", size=HUGE)],
    ids=["write", "truncate"],
)
@pytest.mark.parametrize("limit", [None, 1 << 40], ids=["2^63-1", "1TiB"])
def test_a_2_62_byte_file_the_source_does_not_hold_fails_the_update(group_config, forged, limit):
    """A source that makes a file 2^62 bytes long (a Write of one byte there, or a Truncate): past a
    destination that stores 1 TiB it is FileTooLarge before the record is applied; on one that
    stores it, the check before `done` (docs/verification.md) finds the file differs from the source
    PCPI, at the cost of the file's data (its hole is never read; the timeout bounds it).  Either
    way the update takes the rollback path and the export stays the last good image."""
    inject = AppendRecords(forged)
    h = Harness(group_config(replicas=("A",)), plugins=[inject])
    if limit is not None:
        h.agent.dest.handle.max_file_size = limit
    h.writer.write("A", "a/f", b"old")
    h.cycle()
    before = h.agent.state.replicas["A"]
    h.writer.write("A", "a/f", b"new")
    inject.armed = True
    assert h.cycle()["failures"] == 1
    (failure,) = h.agent.failures
    assert failure["replica"] == "A" and failure["trigger"] == "update_failed"
    if limit is None:
        assert "VerificationFailed" in failure["error"] and "'a/f'" in failure["error"]
    else:
        size = HUGE + len(forged.data) if isinstance(forged, R.Write) else HUGE
        assert f"FileTooLarge: file 'a/f' would be {size} bytes (4 EiB;" in failure["error"]
        assert "stores files of at most 1099511627776 bytes (1 TiB)" in failure["error"]
    after = h.agent.state.replicas["A"]
    assert after.state == "stable" and after.source_point == before.source_point
    assert h.agent.dest.fingerprint("A", after.exported) == h.agent.source.fingerprint("A", before.source_point)
    h.assert_invariants()
    inject.armed = False
    assert h.cycle()["failures"] == 0


@pytest.mark.parametrize("backend", [on_backend("mem"), on_backend("sim")])
def test_a_local_source_with_change_records_without_end_fails_at_the_total_deadline(group_config):
    """A local source is checked between records (coalesce_core/deadlines.py): one that never ends its
    stream fails its update at `transfer_timeout`; the replica keeps its image, the other one completes."""
    import attrs
    from stallpeer import Stall

    from coalesce_core.deadlines import TransferLimits

    stall = Stall("endless", qtree="A", hold=60.0, volume="src", pace=0.02)
    stall.armed = False
    cfg = attrs.evolve(group_config(replicas=("A", "B"), parallel=1), deadlines=TransferLimits(stall=5.0, total=4.0))
    h = Harness(cfg, plugins=[stall])
    h.writer.write("A", "a/f", b"old")
    h.writer.write("B", "b/f", b"old")
    h.cycle()
    before = h.agent.state.replicas["A"]
    h.writer.write("A", "a/f", b"new")
    h.writer.write("B", "b/f", b"new")
    stall.armed = True
    report = h.cycle()  # one transfer at a time: the total counts the wait for the destination too
    assert stall.sent > 10
    assert list(report["failed"]) == ["A"]
    (failure,) = h.agent.failures
    assert failure["replica"] == "A" and "DeadlineExceeded: the transfer took longer than 4s" in failure["error"]
    a, b = h.agent.state.replicas["A"], h.agent.state.replicas["B"]
    assert a.state == "stable" and a.source_point == before.source_point
    assert h.agent.dest.fingerprint("A", a.exported) == h.agent.source.fingerprint("A", before.source_point)
    assert b.source_point != before.source_point
    assert h.agent.dest.fingerprint("B", b.exported) == h.agent.source.fingerprint("B", b.source_point)
    h.assert_invariants()
