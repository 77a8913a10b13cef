"""The privilege policy (coalesce_core.stream.privileges): what "strip" removes from a stream, and
a source's descriptions and fingerprints as the policy transforms them, on mem and sim."""

from __future__ import annotations

import os
import time

import attrs
import pytest

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.stream import privileges as P
from coalesce_core.stream import records as R
from coalesce_core.verify import (
    Description,
    Holds,
    compare,
    description_from_json,
    description_to_json,
    tree_compare,
    xattr_digest,
    xattr_fields,
)

#: a file capability: cap_net_raw+ep (VFS_CAP_REVISION_2)
CAP = bytes.fromhex("0100000200200000000000000000000000000000")

CHANGES = [
    R.MkDir(path="d", mode=0o2775),
    R.MkFile(path="d/su", mode=0o4755),
    R.Write(path="d/su", offset=0, data=b"\x7fELF root shell"),
    R.MkFile(path="ping", mode=0o755),
    R.Write(path="ping", offset=0, data=b"\x7fELF ping"),
    R.SetXattr(path="ping", name="security.capability", value=CAP),
    R.SetXattr(path="ping", name="security.selinux", value=b"system_u:object_r:ping_exec_t:s0"),
    R.SetXattr(path="ping", name="trusted.overlay.redirect", value=b"/etc/shadow"),
    R.SetXattr(path="ping", name="user.note", value=b"kept"),
    R.SetXattr(path="ping", name="system.posix_acl_access", value=b"\x02\x00\x00\x00"),
    R.Symlink(path="l", target="d/su"),
    R.SetAttr(path="d/su", mode=0o6755, uid=0, gid=0),
    R.SetAttr(path="l", uid=0, gid=0),
    R.SetAttr(path="d", mode=0o2775),
    R.SetAttr(path=R.ROOT, mode=0o1777),
]


def _stream(changes=CHANGES):
    return list(R.framed("q", None, "t", changes))


def test_strip_clears_setid_bits_and_drops_privileged_xattrs_and_end_counts_what_remains():
    out = list(P.as_policy(_stream(), "strip"))
    changes = list(R.changes_only(out))  # raises on a wrong End count
    modes = {(type(r).__name__, r.path): r.mode for r in changes if getattr(r, "mode", None) is not None}
    assert modes == {
        ("MkDir", "d"): 0o775,
        ("MkFile", "d/su"): 0o755,
        ("MkFile", "ping"): 0o755,
        ("SetAttr", "d/su"): 0o755,
        ("SetAttr", "d"): 0o775,
        ("SetAttr", ""): 0o1777,  # the sticky bit is no privilege
    }
    assert sorted(r.name for r in changes if isinstance(r, R.SetXattr)) == ["system.posix_acl_access", "user.note"]
    assert len(changes) == len(CHANGES) - 3 and out[-1] == R.End(records=len(CHANGES) - 3)
    owners = [(r.uid, r.gid) for r in changes if isinstance(r, R.SetAttr) and r.path == "d/su"]
    assert owners == [(0, 0)]  # owners are carried; only the bits that lend them are not


def test_keep_passes_every_record_as_it_came():
    assert list(P.as_policy(_stream(), "keep")) == _stream()


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="privileges is one of"):
        P.as_policy([], "lenient")


def test_close_closes_the_wrapped_stream():
    closed = []

    def source():
        try:
            yield from _stream()
        finally:
            closed.append(True)

    it = P.as_policy(source(), "strip")
    next(it)
    it.close()
    assert closed == [True]


def test_privileged_xattrs_are_digested_apart():
    plain = {"user.note": b"kept", "system.posix_acl_access": b"\x02"}
    both = {**plain, "security.capability": CAP, "trusted.x": b"1"}
    assert xattr_fields(plain) == {"xattrs": xattr_digest(plain), "privileged_xattrs": None}
    assert xattr_fields(both) == {
        "xattrs": xattr_digest(plain),
        "privileged_xattrs": xattr_digest({"security.capability": CAP, "trusted.x": b"1"}),
    }
    assert xattr_fields(None) == {"xattrs": None, "privileged_xattrs": None}


def test_a_privileged_xattr_is_a_difference_and_survives_the_wire():
    a = Description(path="f", kind="f", mode=0o755, size=1, **xattr_fields({"security.capability": CAP}))
    b = attrs.evolve(a, privileged_xattrs=None)
    (d,) = compare([a], [b])
    assert d.field == "privileged_xattrs" and "none in the replica" in d.explain("co-g-src-000001")
    assert compare([a], [b], Holds(xattrs=False)) == []  # a destination without xattrs holds none
    assert description_from_json(description_to_json(a)) == a


def test_a_description_as_stripped_and_as_kept():
    d = Description(path="f", kind="f", mode=0o6755, size=1, **xattr_fields({"security.capability": CAP}))
    assert P.description(d, "keep") is d
    s = P.description(d, "strip")
    assert s.mode == 0o755 and s.privileged_xattrs is None and s.xattrs == d.xattrs
    plain = Description(path="g", kind="f", mode=0o644, size=1, **xattr_fields({}))
    assert P.description(plain, "strip") is plain


@pytest.fixture(params=["mem", "sim"])
def volumes(request, tmp_path):
    """Two fresh volumes of one backend."""
    pm = plugin_manager()
    if request.param == "mem":
        urls = [f"mem://privileges-{os.getpid()}-{time.monotonic_ns()}-{i}" for i in range(2)]
    else:
        urls = [f"sim://{tmp_path}/vol{i}" for i in range(2)]
    vols = [Volume.open(pm, u, create=True) for u in urls]
    yield vols
    for v in vols:
        v.close()


def test_the_view_of_a_source_equals_a_replica_that_received_its_stripped_stream(volumes):
    source, replica = volumes
    changes = [*CHANGES, R.MkFile(path="sparse", mode=0o640), R.Write(path="sparse", offset=5 << 20, data=b"x")]
    source.apply("q", R.framed("q", None, "t", changes), use_purgatory=False)
    replica.apply("q", P.as_policy(R.framed("q", None, "t", changes), "strip"), use_purgatory=False)
    view = P.view(source, "strip")
    assert P.view(source, "keep") is source
    # the backend's own fingerprint sees the setid bits; the view's is the stripped image's
    assert source.fingerprint("q") != replica.fingerprint("q")
    assert view.fingerprint("q") == replica.fingerprint("q")
    # and a source without setid bits has the view's fingerprint equal to its own
    assert P.PolicyView(replica, "strip").fingerprint("q") == replica.fingerprint("q")
    assert P.PolicyView(replica, "strip").fingerprint("none") == replica.fingerprint("none")
    holds = attrs.evolve(replica.describe_holds(), mtime_ns=0)  # the records set no times

    def tree(vol):
        return vol.describe_tree("q", None, content=True)

    assert tree_compare(tree(view), tree(replica), holds).ok
    assert {d.path for d in tree_compare(tree(source), tree(replica), holds).differences} == {"d", "d/su", "ping"}
    paths = [("d/su", True), ("ping", True)]
    got = view.describe("q", None, paths)
    assert [(d.mode, d.privileged_xattrs) for d in got] == [(0o755, None), (0o755, None)]
    assert compare(got, replica.describe("q", None, paths), holds) == []
