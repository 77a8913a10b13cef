"""``[group] privileges``: a source that plants a setuid-root binary and a file capability.  Under
"strip" (the default) the export has neither, and the check before ``done``, I3 and ``coalesce
verify`` pass (they compare the source as stripped); under "keep" both arrive.  A baseline and an
update, on every backend's volumes (real btrfs and zfs-fuse included)."""

from __future__ import annotations

import pytest
from backends import backend_fixtures

from coalesce_core import verifier
from coalesce_core.stream import privileges
from coalesce_core.stream import records as R
from coalesce_core.testing.harness import Harness
from coalesce_core.verify import xattr_digest

#: cap_net_raw+ep (VFS_CAP_REVISION_2)
CAP = bytes.fromhex("0100000200200000000000000000000000000000")

backend, group_config = backend_fixtures("mem", "sim", "btrfs", "zfs")


def _plant(h: Harness, path: str, *, capability: bool) -> None:
    """``A/path``: a root-owned setuid binary; with ``capability`` also a file capability and a user xattr."""
    h.writer.write("A", path, b"\x7fELF " + path.encode(), mode=0o4755)
    changes: list[object] = [R.SetAttr(path=path, mode=0o4755, uid=0, gid=0)]
    if capability:
        changes += [
            R.SetXattr(path=path, name="security.capability", value=CAP),
            R.SetXattr(path=path, name="user.origin", value=b"source"),
        ]
    h.writer.volume.apply("A", R.framed("A", None, "plant", changes), use_purgatory=False)


def _exported(h: Harness, paths: list[str]):
    r = h.agent.state.replicas["A"]
    return h.agent.dest.describe("A", r.exported, [(p, True) for p in paths])


@pytest.mark.parametrize("policy", [None, "strip", "keep"], ids=["default", "strip", "keep"])
def test_a_planted_setuid_binary_and_capability_reach_the_export_only_under_keep(group_config, policy):
    h = Harness(group_config(replicas=("A",), privileges=policy))
    assert h.agent.config.privileges == (policy or "strip")  # strip is the default (docs/decisions.md)
    h.writer.write("A", "README", b"hello")
    _plant(h, "bin/su", capability=True)
    assert h.cycle()["failures"] == 0  # a baseline: the whole-qtree check before done passed
    _plant(h, "bin/ping", capability=True)  # an update: the incremental check
    _plant(h, "bin/mount", capability=False)
    report = h.cycle()
    assert report["failures"] == 0, h.agent.failures
    r = h.agent.state.replicas["A"]
    assert r.state == "stable" and r.last_error in (None, "")
    keep = policy == "keep"
    for d in _exported(h, ["bin/su", "bin/ping", "bin/mount"]):
        assert (d.mode, d.uid) == ((0o4755 if keep else 0o755), 0), d.path
    for d in _exported(h, ["bin/su", "bin/ping"]):
        assert d.privileged_xattrs == (xattr_digest({"security.capability": CAP}) if keep else None), d.path
        assert d.xattrs == xattr_digest({"user.origin": b"source"})  # plain xattrs arrive either way
    h.assert_invariants()  # I3 compares the export with the source as the policy transforms it
    (row,) = verifier.verify_replicas(
        privileges.view(h.agent.source, h.agent.config.privileges), h.agent.dest, h.agent.state, ["A"], full=True
    )
    assert row["result"] == "ok" and row["checked"] > 3, row
    if not keep:  # compared with the source as it is, the stripped export differs: the view is needed
        (raw,) = verifier.verify_replicas(h.agent.source, h.agent.dest, h.agent.state, ["A"], full=True)
        assert raw["result"] == "differs" and raw["differences"][0]["path"] == "bin/mount"


def test_a_replica_that_holds_a_setuid_bit_fails_the_check_under_strip(group_config):
    """The check before done compares the replica's modes with the source as stripped: a replica
    that holds a setuid bit the policy removes (planted here in its active FS) fails the update
    that touches the file, which takes the rollback path."""
    h = Harness(group_config(replicas=("A",), privileges="strip"))
    _plant(h, "bin/su", capability=False)
    assert h.cycle()["failures"] == 0
    h.agent.dest.apply("A", R.framed("A", None, "x", [R.SetAttr(path="bin/su", mode=0o4755)]), use_purgatory=False)
    note = [R.SetXattr(path="bin/su", name="user.note", value=b"1")]
    h.writer.volume.apply("A", R.framed("A", None, "note", note), use_purgatory=False)
    assert h.cycle()["failures"] == 1
    (failure,) = h.agent.failures
    assert "'bin/su': mode is 0o4755 in the replica but 0o755 in source PCPI" in failure["error"]
