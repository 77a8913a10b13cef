"""Verification on real btrfs: an update whose stream lost a record (a Rename, a Write) fails its
check before `done`, rolls back and exports nothing wrong; `coalesce verify` passes a good export
and finds a deliberately damaged one (bytes, mode)."""

from __future__ import annotations

import os
import subprocess

import pytest
from dropper import DropRecord, of_type

from coalesce_core import verifier
from coalesce_core.stream import records as R
from coalesce_core.testing.harness import Harness

pytestmark = pytest.mark.btrfs


@pytest.fixture
def group(group_config, btrfs_urls):
    """A one-replica btrfs -> btrfs group (replica A) whose source qtree holds a/x, a/f and b/."""

    def make(plugins=()):
        h = Harness(
            group_config(replicas=("A",), source_url=btrfs_urls("src"), dest_url=btrfs_urls("dst")), plugins=plugins
        )
        q = os.path.join(h.agent.source.handle.root, "A")
        os.makedirs(os.path.join(q, "a"))
        os.makedirs(os.path.join(q, "b"))
        for name, data in (("a/x", b"x" * 100), ("a/f", b"old" * 1000)):
            with open(os.path.join(q, name), "wb") as fh:
                fh.write(data)
        h.cycle()
        assert h.agent.state.replicas["A"].state == "stable"
        return h, q

    return make


def _exported_equals_source(h: Harness) -> bool:
    r = h.agent.state.replicas["A"]
    return h.agent.dest.fingerprint("A", r.exported) == h.agent.source.fingerprint("A", r.source_point)


def _failed_then_passes(h: Harness, drop: DropRecord) -> str:
    """One cycle with ``drop`` armed: the update fails its check, rolls back and exports the old
    image; one cycle without: it passes.  Returns the failed update's error."""
    before = h.agent.state.replicas["A"].source_point
    drop.armed = True
    h.cycle()
    assert len(drop.dropped) == 1, drop.dropped
    (failure,) = h.agent.failures
    assert failure["trigger"] == "update_failed" and "VerificationFailed" in failure["error"]
    r = h.agent.state.replicas["A"]
    assert r.state == "stable" and r.source_point == before and _exported_equals_source(h)
    assert h.agent.dest.fingerprint("A", None) == h.agent.source.fingerprint("A", before)  # rolled back (I9)
    drop.armed = False
    assert h.cycle()["failures"] == 0
    assert h.agent.state.replicas["A"].source_point != before and _exported_equals_source(h)
    return failure["error"]


def test_a_lost_rename_fails_the_update_and_names_the_path(group):
    """The rename that puts b/x in place is lost (the translation may park the file under a
    transient name first): the file stays where that rename would have taken it from."""
    drop = DropRecord(lambda rec: isinstance(rec, R.Rename) and rec.new == "b/x")
    h, q = group([drop])
    os.rename(os.path.join(q, "a/x"), os.path.join(q, "b/x"))
    error = _failed_then_passes(h, drop)
    old = drop.dropped[0].old
    assert f"verification failed: {old!r} is a regular file in the replica but absent in source PCPI co-g-src-" in error


def test_a_lost_write_fails_the_update_and_names_the_path(group):
    drop = DropRecord(of_type(R.Write, "a/f"))
    h, q = group([drop])
    fd = os.open(os.path.join(q, "a/f"), os.O_WRONLY)
    os.pwrite(fd, b"NEW", 1500)
    os.close(fd)
    assert "verification failed: 'a/f': content is digest" in _failed_then_passes(h, drop)


def _writable(path: str, on: bool) -> None:
    subprocess.run(
        ["btrfs", "property", "set", "-ts", path, "ro", "false" if on else "true"], check=True, capture_output=True
    )


def test_coalesce_verify_passes_a_good_export_and_finds_a_damaged_one(group):
    h, _q = group()
    r = h.agent.state.replicas["A"]
    for content in (False, True):
        out = verifier.verify_export(h.agent.source, h.agent.dest, r, content=content)
        assert out.ok and out.checked == 5 and out.not_compared == ()
    image = h.agent.export_path("A")
    subvol = os.path.dirname(os.path.realpath(image))
    f = os.path.join(image, "a", "f")
    st = os.lstat(f)
    _writable(subvol, True)
    try:
        fd = os.open(f, os.O_WRONLY)
        os.pwrite(fd, b"?", 7)
        os.close(fd)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and times: only the bytes differ
    finally:
        _writable(subvol, False)
    assert verifier.verify_export(h.agent.source, h.agent.dest, r, content=False).ok
    out = verifier.verify_export(h.agent.source, h.agent.dest, r, content=True)
    assert [(d.path, d.field) for d in out.differences] == [("a/f", "content")]
    _writable(subvol, True)
    try:
        os.chmod(os.path.join(image, "b"), 0o700)
        os.utime(os.path.join(image, "b"), ns=(st.st_atime_ns, os.lstat(os.path.join(image, "b")).st_mtime_ns))
    finally:
        _writable(subvol, False)
    out = verifier.verify_export(h.agent.source, h.agent.dest, r, content=False)
    assert [(d.path, d.field, d.replica) for d in out.differences] == [("b", "mode", 0o700)]
    assert (
        out.differences[0].explain(r.source_point)
        == f"'b': mode is 0o700 in the replica but 0o755 in source PCPI {r.source_point}"
    )
