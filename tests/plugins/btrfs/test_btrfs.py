"""The btrfs backend on a real btrfs loop file system (tools/realfs.py)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess

import pytest

import coalesce_btrfs
from coalesce_btrfs import sendstream
from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import BackendError, StreamError, TruncatedStream
from coalesce_core.stream.records import HardLink, MkFile, Rename, Truncate, Unlink, Write

pytestmark = pytest.mark.btrfs


@pytest.fixture(scope="module")
def pm():
    return plugin_manager()


def open_vol(pm, url):
    return Volume.open(pm, url, create=True)


def snapshots_on_disk(vol) -> list[str]:
    """PCPIs counted by `btrfs subvolume list`, not by our own listing."""
    h = vol.handle
    out = subprocess.run(
        ["btrfs", "subvolume", "list", "-s", h.parent], capture_output=True, text=True, check=True
    ).stdout
    rel = os.path.relpath(h.snapdir, _mount_of(h.parent)) + "/"
    return sorted(
        line.split(" path ", 1)[1][len(rel) :]
        for line in out.splitlines()
        if line.split(" path ", 1)[1].startswith(rel)
    )


def _mount_of(path):
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def copy_to(src_vol, dst_vol, qtree, base, target):
    return dst_vol.apply(qtree, src_vol.diff(qtree, base, target))


# ---------------------------------------------------------------------------
# opening
# ---------------------------------------------------------------------------
def test_open_errors(pm, btrfs_url, tmp_path):
    with pytest.raises(BackendError) as ei:
        Volume.open(pm, btrfs_url, create=False)
    assert "btrfs subvolume create" in ei.value.hint
    with pytest.raises(BackendError) as ei:
        Volume.open(pm, f"btrfs://{tmp_path}/vol", create=True)  # tmp_path is not on btrfs
    assert "not btrfs" in str(ei.value)
    path = btrfs_url.split("://", 1)[1]
    os.makedirs(path)
    try:
        with pytest.raises(BackendError) as ei:
            Volume.open(pm, btrfs_url, create=True)
        assert "not a btrfs subvolume" in str(ei.value)
    finally:
        os.rmdir(path)
    with pytest.raises(BackendError):
        Volume.open(pm, "btrfs://relative/path", create=True)


def test_snapshots_are_real_readonly_subvolumes_counted_by_btrfs(pm, btrfs_url):
    vol = open_vol(pm, btrfs_url)
    vol.apply("q", [MkFile(path="f")])
    for name in ("p1", "p2", "p3", "p1"):
        assert vol.snapshot_create(name) == name
    assert snapshots_on_disk(vol) == ["p1", "p2", "p3"] == vol.snapshot_list()
    ro = subprocess.run(
        ["btrfs", "property", "get", "-ts", vol.handle.snap_path("p1"), "ro"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert ro == "ro=true"
    assert vol.snapshot_delete("p2") is True and vol.snapshot_delete("p2") is False
    assert snapshots_on_disk(vol) == ["p1", "p3"]
    # snapshots live outside the subvolume: a new snapshot does not contain the old ones
    assert not any(n.startswith(".coalesce-snap") for n in os.listdir(vol.handle.snap_path("p3")))
    assert vol.metadata_dir() and not vol.metadata_dir().startswith(vol.handle.root + "/")


# ---------------------------------------------------------------------------
# send-stream parser
# ---------------------------------------------------------------------------
def _dump_names(stream_file):
    out = subprocess.run(
        ["btrfs", "receive", "--dump", "-f", stream_file], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "flags",
    [[], ["--no-data"], ["--proto", "2"], ["--proto", "2", "--no-data"]],
    ids=["v1", "v1-nodata", "v2", "v2-nodata"],
)
def test_parser_agrees_with_btrfs_receive_dump(pm, btrfs_url, tmp_path, flags):
    vol = open_vol(pm, btrfs_url)
    root = vol.handle.root
    os.makedirs(f"{root}/A/d")
    with open(f"{root}/A/big", "wb") as f:
        f.write(os.urandom(300_000))
    os.symlink("big", f"{root}/A/ln")
    vol.snapshot_create("s1")
    os.rename(f"{root}/A/d", f"{root}/A/e")
    with open(f"{root}/A/big", "r+b") as f:
        f.seek(100_000)
        f.write(b"x" * 200_000)
        f.truncate(250_000)
    os.setxattr(f"{root}/A/big", "user.k", b"v")
    subprocess.run(["cp", "--reflink=always", f"{root}/A/big", f"{root}/A/clone"], check=True)
    vol.snapshot_create("s2")
    stream = tmp_path / "stream"
    subprocess.run(
        [
            "btrfs",
            "-q",
            "send",
            *flags,
            "-p",
            vol.handle.snap_path("s1"),
            "-f",
            str(stream),
            vol.handle.snap_path("s2"),
        ],
        check=True,
    )
    ours = [c.name.lower() for c in sendstream.commands(open(stream, "rb"))]
    theirs = _dump_names(str(stream))
    assert ours[: len(theirs)] == theirs and ours[len(theirs) :] in ([], ["end"])
    data = stream.read_bytes()
    for cut in (5, 20, len(data) // 2, len(data) - 3):
        with pytest.raises(StreamError):
            list(sendstream.commands(io.BytesIO(data[:cut])))


# ---------------------------------------------------------------------------
# send-stream translation: every kind of change, checked by fingerprints
# ---------------------------------------------------------------------------
def _write(path, data, mode="wb"):
    with open(path, mode) as f:
        f.write(data)


def _scenario_base(root):
    for d in ("A/d1/d2", "A/keep", "B/sub", "C", "D/deep/er", "top-dir"):
        os.makedirs(f"{root}/{d}")
    _write(f"{root}/A/f", b"file f\n" * 1000)
    _write(f"{root}/A/x", b"x")
    _write(f"{root}/A/y", b"y")
    _write(f"{root}/A/d1/d2/inner", os.urandom(200_000))
    _write(f"{root}/A/keep/k", b"kept")
    os.link(f"{root}/A/keep/k", f"{root}/A/keep/k-link")
    os.symlink("../f", f"{root}/A/d1/ln")
    _write(f"{root}/B/sub/b", b"b" * 5000)
    with open(f"{root}/B/sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"island")
    os.setxattr(f"{root}/B/sub/b", "user.tag", b"one")
    _write(f"{root}/C/c", b"c" * 100)
    _write(f"{root}/D/deep/er/file", b"deep")
    _write(f"{root}/top-file", b"not in a qtree")


def _scenario_changes(root):
    os.rename(f"{root}/A/f", f"{root}/B/f-from-A")  # file crosses qtrees
    os.rename(f"{root}/A/d1", f"{root}/C/d1-from-A")  # directory crosses qtrees
    os.rename(f"{root}/A/x", f"{root}/A/tmp")  # swap two names
    os.rename(f"{root}/A/y", f"{root}/A/x")
    os.rename(f"{root}/A/tmp", f"{root}/A/y")
    os.link(f"{root}/A/keep/k", f"{root}/A/k-third")  # new hard link
    os.unlink(f"{root}/A/keep/k-link")
    os.symlink("keep/k", f"{root}/A/new-ln")
    os.makedirs(f"{root}/A/newdir/nd")
    _write(f"{root}/A/newdir/nd/n", b"new" * 10)
    os.rename(f"{root}/A/keep", f"{root}/A/newdir/keep-moved")  # dir moves into a new dir
    with open(f"{root}/B/sparse", "r+b") as f:  # truncate, extend: holes
        f.truncate(1 << 20)
        f.truncate(16 << 20)
        f.seek(12 << 20)
        f.write(b"far")
    with open(f"{root}/B/sub/b", "r+b") as f:
        f.seek(100)
        f.write(b"CHANGED")
    os.setxattr(f"{root}/B/sub/b", "user.tag", b"two")
    os.setxattr(f"{root}/B/sub/b", "user.new", b"n")
    os.chmod(f"{root}/B/sub", 0o700)
    os.chown(f"{root}/B/sub/b", 1000, 1000)
    shutil.rmtree(f"{root}/D/deep")  # deletes
    os.rename(f"{root}/C/c", f"{root}/top-c")  # leaves every qtree
    os.rename(f"{root}/top-file", f"{root}/C/from-top")  # enters from outside every qtree
    subprocess.run(["cp", "--reflink=always", f"{root}/B/sub/b", f"{root}/B/reflinked"], check=True)
    os.rename(f"{root}/top-dir", f"{root}/E")  # a new qtree (renamed top-level dir)


@pytest.mark.parametrize("send_data", ["0", "1"], ids=["no-data", "with-data"])
def test_translation_of_real_streams(pm, btrfs_urls, monkeypatch, send_data):
    monkeypatch.setenv("COALESCE_BTRFS_SEND_DATA", send_data)
    src = open_vol(pm, btrfs_urls())
    dst = open_vol(pm, btrfs_urls())
    root = src.handle.root
    _scenario_base(root)
    src.snapshot_create("s1")
    for q in src.qtree_list("s1"):
        copy_to(src, dst, q, None, "s1")
        assert dst.fingerprint(q) == src.fingerprint(q, "s1")
    _scenario_changes(root)
    src.snapshot_create("s2")
    qtrees = sorted(set(src.qtree_list("s1")) | set(src.qtree_list("s2")))
    records = {}
    for q in qtrees:
        if q in src.qtree_list("s2"):
            records[q] = list(src.diff(q, "s1", "s2"))
            dst.apply(q, iter(records[q]))
        else:
            dst.remove_qtree(q)
        assert dst.fingerprint(q) == src.fingerprint(q, "s2"), f"qtree {q} differs after the incremental"
    assert src.handle.streams.sends == 1, "one send stream must serve every qtree"
    # the cross-qtree rename: a delete on one side, a full create with data on the other
    assert Unlink(path="f") in records["A"]
    assert any(isinstance(r, MkFile) and r.path == "f-from-A" for r in records["B"])
    assert sum(len(r.data) for r in records["B"] if isinstance(r, Write) and r.path == "f-from-A") == 7000
    assert not any(isinstance(r, Rename) and ("f-from-A" in (r.old, r.new)) for r in records["B"])
    # within a qtree, renames stay renames (no data copied for the swap)
    assert not any(isinstance(r, Write) and r.path in ("x", "y") for r in records["A"])
    # hard links, holes, xattrs and owners reached the replica
    d = dst.handle.root
    assert os.stat(f"{d}/A/k-third").st_ino == os.stat(f"{d}/A/newdir/keep-moved/k").st_ino
    assert os.stat(f"{d}/B/sparse").st_blocks * 512 < 1 << 20
    assert os.getxattr(f"{d}/B/sub/b", "user.tag") == b"two" and os.getxattr(f"{d}/B/sub/b", "user.new") == b"n"
    assert os.stat(f"{d}/B/sub/b").st_uid == 1000
    # and going back (s2 -> s1) works too
    for q in qtrees:
        if q in src.qtree_list("s1"):
            dst.apply(q, src.diff(q, "s2", "s1"))
        else:
            dst.remove_qtree(q)
        assert dst.fingerprint(q) == src.fingerprint(q, "s1")


def test_rewritten_files_records_and_holes(pm, btrfs_urls):
    """A small file rewritten whole is overwritten in place (no Truncate); a large one is truncated
    first (overwriting a large file in place splits extents its snapshots share); a rewrite that
    leaves a hole keeps it; no Truncate to the size the file already has."""
    src = open_vol(pm, btrfs_urls())
    dst = open_vol(pm, btrfs_urls())
    q = f"{src.handle.root}/Q"
    os.makedirs(q)
    _write(f"{q}/small", os.urandom(4096))
    _write(f"{q}/big", os.urandom(3 << 20))
    _write(f"{q}/holey", os.urandom(64 << 10))
    _write(f"{q}/grows", os.urandom(1000))
    src.snapshot_create("r1")
    copy_to(src, dst, "Q", None, "r1")
    _write(f"{q}/small", os.urandom(4096))
    _write(f"{q}/big", os.urandom(3 << 20))
    with open(f"{q}/holey", "r+b") as f:  # the same size, but a hole where data was
        f.truncate(0)
        f.truncate(64 << 10)
        f.seek(60 << 10)
        f.write(os.urandom(4 << 10))
    _write(f"{q}/grows", os.urandom(5000))
    src.snapshot_create("r2")
    recs = list(src.diff("Q", "r1", "r2"))
    by = {
        p: [r for r in recs if getattr(r, "path", None) == p and not type(r).__name__ == "SetAttr"]
        for p in ("small", "big", "holey", "grows")
    }
    assert [type(r).__name__ for r in by["small"]] == ["Write"]
    assert [type(r).__name__ for r in by["big"]] == ["Truncate", "Write", "Write", "Write"]
    assert by["big"][0].size == 0
    assert {type(r).__name__ for r in by["grows"]} == {"Write"} and sum(len(r.data) for r in by["grows"]) == 5000
    assert any(isinstance(r, Truncate) for r in by["holey"])
    dst.apply("Q", iter(recs))
    assert dst.fingerprint("Q") == src.fingerprint("Q", "r2")
    assert os.stat(f"{dst.handle.root}/Q/holey").st_blocks * 512 <= 8 << 10, "the hole was filled"


def test_hardlink_records_stay_inside_the_qtree(pm, btrfs_urls):
    """A file hard-linked from another qtree arrives as a full copy, never as a HardLink out of the qtree."""
    src = open_vol(pm, btrfs_urls())
    root = src.handle.root
    os.makedirs(f"{root}/A")
    os.makedirs(f"{root}/B")
    _write(f"{root}/A/f", b"shared")
    src.snapshot_create("s1")
    os.link(f"{root}/A/f", f"{root}/B/g")
    src.snapshot_create("s2")
    recs = list(src.diff("B", "s1", "s2"))
    assert not any(isinstance(r, HardLink) for r in recs)
    assert any(isinstance(r, Write) and r.data == b"shared" for r in recs)


def test_killed_send_fails_the_diff(pm, btrfs_url, monkeypatch):
    vol = open_vol(pm, btrfs_url)
    root = vol.handle.root
    os.makedirs(f"{root}/q")
    vol.snapshot_create("s1")
    for i in range(300):
        _write(f"{root}/q/f{i}", os.urandom(20_000))
    vol.snapshot_create("s2")
    monkeypatch.setenv("COALESCE_BTRFS_SEND_DATA", "1")
    real = sendstream.commands

    def killing(f):
        for i, c in enumerate(real(f)):
            if i == 5:
                os.kill(vol.handle.last_send_pid, signal.SIGKILL)
            yield c

    monkeypatch.setattr(coalesce_btrfs.sendstream, "commands", killing)
    with pytest.raises((StreamError, BackendError)) as ei:
        list(vol.diff("q", "s1", "s2"))
    assert isinstance(ei.value, TruncatedStream) or "exit status" in str(ei.value)
    monkeypatch.setattr(coalesce_btrfs.sendstream, "commands", real)
    assert len(list(vol.diff("q", "s1", "s2"))) > 300  # a failed send is not cached


# ---------------------------------------------------------------------------
# rollback, exports
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_rollback_restores_the_exported_base(pm, btrfs_url, monkeypatch, mode):
    monkeypatch.setenv("COALESCE_BTRFS_ROLLBACK", mode)
    vol = open_vol(pm, btrfs_url)
    root = vol.handle.root
    os.makedirs(f"{root}/q/d")
    _write(f"{root}/q/d/f", os.urandom(100_000))
    os.setxattr(f"{root}/q/d/f", "user.a", b"1")
    vol.snapshot_create("base")
    base_fp = vol.fingerprint("q", "base")
    _write(f"{root}/q/d/f", b"partial update")
    os.rename(f"{root}/q/d", f"{root}/q/e")
    vol.snapshot_create("rb")
    assert vol.rollback("q", "rb", "base")
    assert vol.fingerprint("q") == base_fp
    assert os.getxattr(f"{root}/q/d/f", "user.a") == b"1"


def test_export_switch_and_open_file_in_old_image(pm, btrfs_url):
    vol = open_vol(pm, btrfs_url)
    root = vol.handle.root
    for r in ("r1", "r2"):
        os.makedirs(f"{root}/{r}")
        _write(f"{root}/{r}/data", b"old image of " + r.encode())
    vol.snapshot_create("base")
    vol.export({"r1": "base", "r2": "base"})
    held = open(os.path.join(vol.export_path("r1"), "data"), "rb")
    for r in ("r1", "r2"):
        _write(f"{root}/{r}/data", b"new image of " + r.encode())
    vol.snapshot_create("newbase")
    vol.export({"r1": "newbase", "r2": ACTIVE})
    assert vol.exported() == {"r1": "newbase", "r2": ACTIVE}
    assert open(os.path.join(vol.export_path("r1"), "data"), "rb").read() == b"new image of r1"
    assert held.read() == b"old image of r1"
    held.seek(0)
    vol.snapshot_delete("base")  # releasing the old PCPI while a reader holds a file
    assert held.read() == b"old image of r1"
    held.close()
    with pytest.raises(BackendError):
        vol.export({"r1": "base"})
    assert vol.exported() == {"r1": "newbase", "r2": ACTIVE}


def test_purgatory_is_outside_the_qtree_and_invisible(pm, btrfs_url):
    vol = open_vol(pm, btrfs_url)
    vol.apply("q", [MkFile(path="a"), MkFile(path="b")])
    fp_before = vol.fingerprint("q")
    vol.apply("q", [Unlink(path="a")])
    purg = vol.handle.purgatory_dir("q")
    assert os.listdir(purg) and not purg.startswith(os.path.join(vol.handle.root, "q") + "/")
    assert vol.qtree_list() == ["q"] and vol.fingerprint("q") != fp_before
    vol.snapshot_create("s")
    assert vol.qtree_list("s") == ["q"]
    vol.purge_purgatory(["q"])
    assert not os.path.exists(purg)
