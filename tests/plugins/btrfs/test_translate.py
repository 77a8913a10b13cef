"""The send-stream translation (coalesce_btrfs.translate) on real btrfs snapshots: identity, not paths.

Each test builds a source subvolume, takes two PCPIs around a change, and
applies the translated records of every qtree to a replica made from the
first PCPI; the replica must then equal the source qtree in the second PCPI
(tests/trees.py, hard-link groups and the qtree root included).  Streams the
tests tamper with show that a replay which loses track of an object falls
back to the tree compare instead of exporting a wrong image.
"""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
from differential import PunchHole
from trees import assert_same

from coalesce_btrfs import inopaths, sendstream, translate
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.stream.records import HardLink, Rename, Truncate, Write

pytestmark = pytest.mark.btrfs


@pytest.fixture(scope="module")
def pm():
    return plugin_manager()


class Pair:
    """A source subvolume with qtrees and a destination that holds their replicas at PCPI ``s1``."""

    def __init__(self, pm, urls, qtrees, setup) -> None:
        self.src = Volume.open(pm, urls("src"), create=True)
        self.dst = Volume.open(pm, urls("dst"), create=True)
        self.root = self.src.handle.root
        self.qtrees = qtrees
        for q in qtrees:
            os.makedirs(f"{self.root}/{q}")
        setup(self.root)
        self.src.snapshot_create("s1")
        for q in qtrees:
            self.dst.apply(q, self.src.diff(q, None, "s1"))

    def change(self, change) -> None:
        change(self.root)
        self.src.snapshot_create("s2")

    def commands(self) -> list:
        h = self.src.handle
        p = subprocess.run(
            ["btrfs", "-q", "send", "--no-data", "-p", h.snap_path("s1"), h.snap_path("s2")],
            capture_output=True,
            check=True,
        )
        import io

        return list(sendstream.commands(io.BytesIO(p.stdout)))

    def state(self, commands) -> translate.StreamState:
        h = self.src.handle
        return translate.StreamState(iter(commands), h.snap_path("s1"), h.snap_path("s2"))

    def apply(self, q, records) -> list:
        records = list(records)
        self.dst.apply(q, iter(records))
        return records

    def assert_replicas(self) -> None:
        for q in self.qtrees:
            assert_same(
                os.path.join(self.src.handle.snap_path("s2"), q),
                os.path.join(self.dst.handle.root, q),
                what=f"replica {q}",
            )


def _write(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_same_path_new_parent_moves_with_its_object(pm, btrfs_urls):
    """`mv p q; mkdir p; mv q/f p/f`: f keeps its path, but its parent is another directory (identity)."""
    pair = Pair(pm, btrfs_urls, ["Q"], lambda r: _write(f"{r}/Q/p/f", b"f-bytes"))
    pair.change(
        lambda r: (os.rename(f"{r}/Q/p", f"{r}/Q/q"), os.mkdir(f"{r}/Q/p"), os.rename(f"{r}/Q/q/f", f"{r}/Q/p/f"))
    )
    recs = pair.apply("Q", pair.src.diff("Q", "s1", "s2"))
    pair.assert_replicas()
    assert any(isinstance(r, Rename) and r.new == "p/f" for r in recs), "f must be moved, not copied"


def test_swapped_parents_with_children_swapped_back(pm, btrfs_urls):
    """Two directories swapped and their same-named children swapped back: names equal, bytes must follow."""

    def setup(r):
        _write(f"{r}/Q/n/p1/p2/f", b"A" * 10)
        _write(f"{r}/Q/p1/p2/f", b"B" * 20)

    def change(r):
        os.rename(f"{r}/Q/n/p1", f"{r}/Q/t")
        os.rename(f"{r}/Q/p1", f"{r}/Q/n/p1")
        os.rename(f"{r}/Q/t", f"{r}/Q/p1")
        os.rename(f"{r}/Q/p1/p2", f"{r}/Q/t2")
        os.rename(f"{r}/Q/n/p1/p2", f"{r}/Q/p1/p2")
        os.rename(f"{r}/Q/t2", f"{r}/Q/n/p1/p2")

    pair = Pair(pm, btrfs_urls, ["Q"], setup)
    pair.change(change)
    pair.apply("Q", pair.src.diff("Q", "s1", "s2"))
    pair.assert_replicas()


def _linked_across_qtrees(r):
    """a/x and b/y: one inode in two qtrees."""
    _write(f"{r}/a/x", b"1")
    os.link(f"{r}/a/x", f"{r}/b/y")


def _append_through_a(r):
    with open(f"{r}/a/x", "ab") as f:
        f.write(b"more")


def test_hard_link_written_through_a_name_in_another_qtree(pm, btrfs_urls):
    """a/x and b/y are one inode; an append through a/x must reach b's replica, whose name the stream never uses."""
    pair = Pair(pm, btrfs_urls, ["a", "b"], _linked_across_qtrees)
    pair.change(_append_through_a)
    for q in ("a", "b"):
        pair.apply(q, pair.src.diff(q, "s1", "s2"))
    pair.assert_replicas()


def test_hard_links_are_found_by_a_walk_where_the_ioctl_is_refused(pm, btrfs_urls, monkeypatch, caplog):
    """The case above where the kernel refuses the inode-to-paths ioctl: the translator walks the target PCPI."""
    pair = Pair(pm, btrfs_urls, ["a", "b"], _linked_across_qtrees)
    pair.change(_append_through_a)

    def refused(root, ino):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(inopaths, "ino_paths", refused)
    caplog.set_level(logging.WARNING, logger="coalesce.btrfs")
    state = pair.state(pair.commands())
    for q in ("a", "b"):
        pair.apply(q, state.records(q))
    pair.assert_replicas()
    assert "walking the target PCPI" in caplog.text


def test_an_arriving_directory_keeps_a_hard_link_to_a_name_already_in_the_qtree(pm, btrfs_urls):
    """c/d moves to a/d; c/d/k is a hard link of a/k (untouched): in a's replica they stay one inode."""

    def setup(r):
        _write(f"{r}/a/k", b"shared")
        os.makedirs(f"{r}/c/d")
        os.link(f"{r}/a/k", f"{r}/c/d/k")

    pair = Pair(pm, btrfs_urls, ["a", "c"], setup)
    pair.change(lambda r: os.rename(f"{r}/c/d", f"{r}/a/d"))
    recs = pair.apply("a", pair.src.diff("a", "s1", "s2"))
    pair.apply("c", pair.src.diff("c", "s1", "s2"))
    pair.assert_replicas()
    assert HardLink(path="d/k", existing="k") in recs


def _swap_setup(r):
    _write(f"{r}/Q/x/f", b"x")
    _write(f"{r}/Q/y/f", b"yy")


def _swap(r):
    os.rename(f"{r}/Q/x", f"{r}/Q/t")
    os.rename(f"{r}/Q/y", f"{r}/Q/x")
    os.rename(f"{r}/Q/t", f"{r}/Q/y")


def test_park_names_never_replace_an_entry_of_the_qtree(pm, btrfs_urls):
    """A qtree whose root holds `.coalesce-mv.*` entries of its own: parking picks names neither PCPI holds."""

    def setup(r):
        for i in range(12):
            _write(f"{r}/Q/.coalesce-mv.{i}", f"user file {i}".encode())
        _swap_setup(r)

    pair = Pair(pm, btrfs_urls, ["Q"], setup)
    pair.change(_swap)
    recs = pair.apply("Q", pair.src.diff("Q", "s1", "s2"))
    pair.assert_replicas()
    parked = {r.new for r in recs if isinstance(r, Rename) and r.new.startswith(translate.PARK_PREFIX)}
    assert parked and not parked & {f".coalesce-mv.{i}" for i in range(12)}


def test_a_replay_that_loses_track_falls_back_to_the_tree_compare(pm, btrfs_urls, caplog):
    """An orphan name that carries another inode number than the replay's object: the whole stream
    is distrusted, every qtree is diffed by comparing the two PCPIs, and the image is still right."""
    pair = Pair(pm, btrfs_urls, ["Q"], _swap_setup)
    pair.change(_swap)
    cmds = pair.commands()
    renames = [
        i for i, c in enumerate(cmds) if c.name == "RENAME" and translate._ORPHAN.match(os.fsdecode(c.attrs["PATH_TO"]))
    ]
    assert renames, "a swap parks one directory under an orphan name"
    i = renames[0]
    to = os.fsdecode(cmds[i].attrs["PATH_TO"])
    m = translate._ORPHAN.match(to)
    bad = f"o{int(m.group(1)) + 1000}-{m.group(2)}-{m.group(3)}".encode()
    attrs = dict(cmds[i].attrs, PATH_TO=bad)
    cmds[i] = sendstream.Command(name="RENAME", attrs=attrs)
    for j in range(i + 1, len(cmds)):  # keep the rest of the stream consistent with the new name
        a = dict(cmds[j].attrs)
        for key in ("PATH", "PATH_TO", "PATH_LINK"):
            if key in a and bytes(a[key]).startswith(to.encode()):
                a[key] = bad + bytes(a[key])[len(to) :]
        cmds[j] = sendstream.Command(name=cmds[j].name, attrs=a)
    state = pair.state(cmds)
    assert state.lost and "parks inode" in state.lost
    caplog.set_level(logging.WARNING, logger="coalesce.btrfs")
    recs = pair.apply("Q", state.records("Q"))
    pair.assert_replicas()
    assert "comparing the two PCPIs" in caplog.text
    assert not any(isinstance(r, Rename) for r in recs), "the tree compare sends no renames"


def test_final_names_that_disagree_with_the_target_fall_back(pm, btrfs_urls, caplog):
    """A stream whose last renames are dropped leaves the replay's final names holding the wrong
    inodes; the check against the target PCPI catches it and the qtree is compared instead."""
    pair = Pair(pm, btrfs_urls, ["Q"], _swap_setup)
    pair.change(_swap)
    cmds = pair.commands()
    last = max(i for i, c in enumerate(cmds) if c.name == "RENAME")
    del cmds[last]
    state = pair.state(cmds)
    state.prepare()
    assert state.lost is None and "Q" in state.lost_qtrees
    caplog.set_level(logging.WARNING, logger="coalesce.btrfs")
    pair.apply("Q", state.records("Q"))
    pair.assert_replicas()


def test_the_qtree_root_attributes_arrive(pm, btrfs_urls):
    """The qtree root's mode, owner, xattrs and mtime reach the replica, in a baseline and an update."""

    def setup(r):
        _write(f"{r}/Q/f", b"f")
        os.chmod(f"{r}/Q", 0o750)
        os.setxattr(f"{r}/Q", "user.root", b"one")
        os.utime(f"{r}/Q", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))

    pair = Pair(pm, btrfs_urls, ["Q"], setup)
    assert_same(os.path.join(pair.src.handle.snap_path("s1"), "Q"), os.path.join(pair.dst.handle.root, "Q"))

    def change(r):
        os.chown(f"{r}/Q", 1234, 5678)
        os.setxattr(f"{r}/Q", "user.root", b"two")
        os.rename(f"{r}/Q/f", f"{r}/Q/g")

    pair.change(change)
    pair.apply("Q", pair.src.diff("Q", "s1", "s2"))
    pair.assert_replicas()


MiB = 1 << 20


def _sparse(path, size, islands):
    """``path`` made anew as a sparse file of ``size`` bytes holding ``islands`` ((offset, bytes), ...)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off, data in islands:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def _allocated(path):
    return os.lstat(path).st_blocks * 512


def test_holes_of_a_rewritten_sparse_file_stay_holes(pm, btrfs_urls):
    """A 16 MiB sparse file rewritten with its only data moved to the end: the no-data stream names the
    whole hole as changed; the replica gets the same bytes and allocates no more than the source + 1 MiB."""
    size = 16 * MiB
    pair = Pair(pm, btrfs_urls, ["Q"], lambda r: _sparse(f"{r}/Q/c", size, [(0, b"a" * 4096)]))
    pair.change(lambda r: _sparse(f"{r}/Q/c", size, [(size - 70_000, b"z")]))
    recs = pair.apply("Q", pair.src.diff("Q", "s1", "s2"))
    pair.assert_replicas()
    src = os.path.join(pair.src.handle.snap_path("s2"), "Q/c")
    assert _allocated(os.path.join(pair.dst.handle.root, "Q/c")) <= _allocated(src) + MiB
    assert sum(len(r.data) for r in recs if isinstance(r, Write)) <= MiB


def test_a_punched_hole_is_kept_and_the_unchanged_data_after_it_rewritten(pm, btrfs_urls):
    """A hole punched at the start of a file whose later data is unchanged: truncating below the hole
    drops that data too, so it must come back with the tail."""
    size = 16 * MiB
    pair = Pair(
        pm,
        btrfs_urls,
        ["Q"],
        lambda r: _sparse(
            f"{r}/Q/c", size, [(0, b"a" * (4 * MiB)), (8 * MiB, b"k" * 65536), (size - 4096, b"e" * 4096)]
        ),
    )
    pair.change(PunchHole("Q/c", 0, 4 * MiB))
    recs = pair.apply("Q", pair.src.diff("Q", "s1", "s2"))
    pair.assert_replicas()
    assert Truncate(path="c", size=0) in recs
    assert _allocated(os.path.join(pair.dst.handle.root, "Q/c")) <= 2 * MiB


def test_a_small_hole_before_much_unchanged_data_is_overwritten(pm, btrfs_urls):
    """A 4 KiB hole punched before 4 MiB of unchanged data: writing its zeros is cheaper than
    rewriting the tail, so no Truncate comes."""
    pair = Pair(pm, btrfs_urls, ["Q"], lambda r: _sparse(f"{r}/Q/c", 8 * MiB, [(0, b"a" * (8 * MiB))]))
    pair.change(PunchHole("Q/c", 4096, 4096))
    recs = pair.apply("Q", pair.src.diff("Q", "s1", "s2"))
    pair.assert_replicas()
    assert not any(isinstance(r, Truncate) for r in recs)
    assert sum(len(r.data) for r in recs if isinstance(r, Write)) <= 2 * 65536


def test_a_path_through_a_symlink_of_the_image_is_not_an_entry_of_it(tmp_path):
    """`_lstat_kept` (the replay's lstat of base and target paths) never follows a symlink on the way:
    `a/s` where `a` is a symlink to a directory holding `s`, or a self-loop `a -> a`, is no entry of
    that image (a plain lstat found `b/s`, another object, or raised ELOOP: the zfs long run's finding
    in docs/verification.md); a path below a file is none either; a deep real path is found, iteratively."""
    root = tmp_path / "img"
    (root / "b").mkdir(parents=True)
    (root / "b" / "s").write_bytes(b"another object")
    (root / "a").symlink_to("b")
    (root / "loop").symlink_to("loop")
    (root / "f").write_bytes(b"")
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(1500):  # mkdir one level at a time: the whole path is longer than PATH_MAX
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    kept: dict = {}
    assert translate._lstat_kept(kept, str(root), "a/s") is None
    assert translate._lstat_kept(kept, str(root), "loop/s") is None
    assert translate._lstat_kept(kept, str(root), "f/x") is None
    assert translate._lstat_kept(kept, str(root), "a") is not None  # the symlink itself is an entry
    assert translate._lstat_kept(kept, str(root), "b/s").st_size == len(b"another object")
    got = translate._lstat_kept({}, str(root), "/".join(["d"] * 1500 + ["leaf"]))
    assert got is not None and got.st_size == 0
    fd = os.open(root, os.O_RDONLY)  # remove the 1,500 levels bottom-up: pytest's rmtree would recurse that deep
    for _ in range(1500):
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.unlink("leaf", dir_fd=fd)
    for _ in range(1500):
        parent = os.open("..", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        os.rmdir("d", dir_fd=parent)
        fd = parent
    os.close(fd)
