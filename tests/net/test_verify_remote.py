"""DESCRIBE over the wire (docs/protocol.md): what a remote source says about its paths equals
what the local volume says, in bounded messages, under the authorization of a diff; and the
check before `done` fails an update that lost a record with the source behind TLS and SSH."""

from __future__ import annotations

import os
import time

import pytest
from dropper import DropRecord, of_type
from net.netkit import RemoteHarness, client_env, remote_plugins

import coalesce_mem
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.stream import records as R
from coalesce_remote import protocol as P

SNAP = "co-g-src-000001"
SEC = 10**9

TREE = [
    R.MkDir(path="d", mode=0o750),
    R.MkFile(path="d/f", mode=0o640),
    R.Write(path="d/f", offset=0, data=b"remote bytes " * 5000),
    R.Truncate(path="d/f", size=3 << 20),
    R.HardLink(path="h", existing="d/f"),
    R.Symlink(path="l", target="d/\udcfff"),
    R.MkFile(path="na\u00efve"),
    R.SetXattr(path="d/f", name="user.k", value=b"v"),
    R.SetAttr(path="d/f", mode=0o640, uid=3, gid=4, mtime_ns=7 * SEC),
    R.SetAttr(path="d", mtime_ns=8 * SEC),
]


def _local(name: str) -> str:
    url = f"mem://{name}-{os.getpid()}-{time.monotonic_ns()}"
    vol = coalesce_mem.volume_for(url)
    vol.apply("A", R.framed("A", None, "t", TREE), False)
    vol.apply("B", R.framed("B", None, "t", [R.MkFile(path="secret")]), False)
    vol.snapshot_create(SNAP)
    return url


def _open(url: str) -> Volume:
    return Volume.open(plugin_manager(remote_plugins()), url)


def test_remote_descriptions_equal_the_local_ones(tls_service):
    local = _local("describe")
    remote = _open(tls_service.expose(local))
    here = Volume.open(plugin_manager(), local)
    # more paths than one DATA message holds (256 KiB of path lines): most of them absent
    paths = [("", True), ("d", True), ("d/f", True), ("h", False), ("l", True), ("na\u00efve", True)]
    paths += [(f"nope/{i:06d}/" + "x" * 40, i % 2 == 0) for i in range(8000)]
    got = remote.describe("A", SNAP, paths)
    assert got == here.describe("A", SNAP, paths)
    assert got[2].content and got[2].size == 3 << 20 and got[5].path == "na\u00efve"
    assert list(remote.describe_tree("A", SNAP, content=True)) == list(here.describe_tree("A", SNAP, content=True))
    assert remote.describe("A", SNAP, []) == []
    remote.close()


def test_describe_needs_the_authorization_of_a_diff(tls_service, certs, monkeypatch):
    local = _local("authz")
    url = tls_service.expose(local)
    client_env(monkeypatch, certs, which="reader")  # may read qtree A only
    remote = _open(url)
    assert [d.kind for d in remote.describe("A", SNAP, [("d/f", False)])] == ["f"]
    with pytest.raises(P.Refused, match="may not read qtree 'B'"):
        remote.describe("B", SNAP, [("secret", True)])
    with pytest.raises(P.Refused, match="may not read qtree 'B'"):
        list(remote.describe_tree("B", SNAP, content=True))
    with pytest.raises(P.Refused, match="may not use PCPI"):
        remote.describe("A", "not-a-group-pcpi", [("", False)])
    with pytest.raises(P.ProtocolError):
        remote.describe("A", None, [("", False)])  # never the source's active file system
    remote.close()


def test_a_path_outside_the_qtree_is_refused_and_the_connection_stays_usable(tls_service):
    local = _local("hostile")
    remote = _open(tls_service.expose(local))
    for bad in ("../B/secret", "/etc/passwd", "a//b"):
        with pytest.raises(P.RemoteError) as info:
            remote.describe("A", SNAP, [("d", False), (bad, True)])
        assert info.value.code == "bad-request"
    assert remote.describe("A", SNAP, [("d", False)])[0].kind == "d"
    remote.close()


def test_the_check_fails_an_update_that_lost_a_record_over_tls_and_ssh(remote_config):
    drop = DropRecord(of_type(R.Write, "a/f"))
    h = RemoteHarness(remote_config(replicas=("A",)), plugins=[drop])
    src = h.local_source

    def write(recs):
        src.apply("A", R.framed("A", None, "t", recs), use_purgatory=False)

    write(
        [
            R.MkDir(path="a"),
            R.MkFile(path="a/f"),
            R.Write(path="a/f", offset=0, data=b"old" * 100),
            R.SetAttr(path="a/f", mtime_ns=1 * SEC),
        ]
    )
    h.cycle()
    before = h.agent.state.replicas["A"].source_point
    write([R.Write(path="a/f", offset=0, data=b"new" * 100), R.SetAttr(path="a/f", mtime_ns=2 * SEC)])
    drop.armed = True
    h.cycle()
    assert len(drop.dropped) == 1
    (failure,) = h.agent.failures
    assert "VerificationFailed: verification failed: 'a/f': content is digest" in failure["error"]
    r = h.agent.state.replicas["A"]
    assert r.state == "stable" and r.source_point == before
    assert h.agent.dest.fingerprint("A", r.exported) == src.fingerprint("A", before)
    drop.armed = False
    h.cycle()
    r = h.agent.state.replicas["A"]
    assert r.source_point != before and h.agent.dest.fingerprint("A", r.exported) == src.fingerprint(
        "A", r.source_point
    )


RANGES = {"d/f": ((0, 1 << 16), (2 << 16, 3 << 16))}


def test_part_digests_over_tls_equal_the_local_ones(tls_service):
    """The capability ``ranges``: a path line with byte ranges is answered with the part digest."""
    local = _local("ranges")
    here = Volume.open(plugin_manager(), local)
    asked = [("d/f", True), ("h", True), ("d", True)]
    remote = _open(tls_service.expose(local))
    got = remote.describe("A", SNAP, asked, RANGES)
    assert remote.describes_ranges
    assert got == here.describe("A", SNAP, asked, RANGES)
    assert got[0].part and got[0].content is None and got[1].content and got[1].part is None
    remote.close()


def test_a_server_without_the_capability_is_asked_for_whole_contents(tls_service, monkeypatch):
    """A source service from before part digests does not take ``ranges``: the client sends
    plain path lines and gets whole contents, which the check compares whole on both sides."""
    local = _local("older")
    here = Volume.open(plugin_manager(), local)
    monkeypatch.setattr(P, "CAPABILITIES", tuple(c for c in P.CAPABILITIES if c != "ranges"))
    remote = _open(tls_service.expose(local))
    (got,) = remote.describe("A", SNAP, [("d/f", True)], RANGES)
    assert not remote.describes_ranges
    assert got.part is None and got.content == here.describe("A", SNAP, [("d/f", True)])[0].content
    remote.close()


def test_a_patched_file_is_checked_by_its_written_blocks_through_a_remote_source(tls_service):
    """The check before `done` with a source behind TLS: a wrong byte in the written block fails
    it; the same bytes there pass (coalesce_core.verifier.TransferCheck, records as received)."""
    from coalesce_core.errors import VerificationFailed
    from coalesce_core.verifier import TransferCheck

    local = _local("patched")
    patch = R.Write(path="d/f", offset=(2 << 16) + 5, data=b"patched")
    src = Volume.open(plugin_manager(), local)
    src.apply("A", R.framed("A", None, "t", [patch]), use_purgatory=False)
    src.snapshot_create("co-g-src-000002")
    remote = _open(tls_service.expose(local))
    remote.snapshot_list()  # connected: the server's capabilities are known

    def check(data: bytes) -> None:
        dst = Volume.open(plugin_manager(), f"mem://patched-dst-{os.getpid()}-{time.monotonic_ns()}", create=True)
        dst.apply(
            "A",
            R.framed("A", None, "t", TREE + [R.Write(path="d/f", offset=patch.offset, data=data)]),
            use_purgatory=False,
        )
        c = TransferCheck(remote, dst, replica="A", source_qtree="A", target="co-g-src-000002", incremental=True)
        try:
            c.add(patch)
            c.run()
        finally:
            c.close()

    check(patch.data)
    with pytest.raises(VerificationFailed, match="'d/f': content is digest"):
        check(b"patchee")
    remote.close()


def test_describe_ranges_on_the_wire_are_sorted_disjoint_pairs():
    assert P.ranges_of([[0, 10], [10, 20], [30, 31]]) == ((0, 10), (10, 20), (30, 31))
    assert P.ranges_of([]) == ()
    for bad in ([[5, 5]], [[10, 20], [0, 5]], [[0, 10], [5, 20]], [[-1, 3]], [[0, True]], [[0, 1 << 64]], [0, 1], "x"):
        with pytest.raises(P.ProtocolError):
            P.ranges_of(bad)
    with pytest.raises(P.ProtocolError):
        P.ranges_of([[2 * i, 2 * i + 1] for i in range(P.MAX_DESCRIBE_RANGES + 1)])
