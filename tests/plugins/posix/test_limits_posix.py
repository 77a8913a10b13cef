"""coalesce_posix at the file system's limits, on a local directory: the pieces the agent-level
limits tests (tests/core/test_limits.py) rely on, each checked alone."""

from __future__ import annotations

import errno
import os
import resource

import pytest

from coalesce_core.stream import fingerprint as fp
from coalesce_core.stream.records import MkDir, MkFile, Rename, RmDir, Unlink, Write, framed
from coalesce_posix import Applier, apply, rmtree, walk

NAME_3 = "名" * 85  # 255 bytes of 3-byte UTF-8


def _chain(root: str, names: list[str]) -> int:
    """Make root/n1/n2/... one level at a time (by descriptors: the path may be too long)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for n in names:
        os.mkdir(n, dir_fd=fd)
        nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path):
    """pytest removes its temporary directories recursively, which fails on these trees."""
    yield
    for name in os.listdir(tmp_path):
        rmtree(str(tmp_path / name))


@pytest.fixture
def few_fds():
    """At most 100 descriptors more than are open now, while the test runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))  # the limit bounds descriptor numbers
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 100, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_purgatory_names_stay_within_255_bytes_and_unique():
    """A name of 255 bytes of 2-, 3- or 4-byte UTF-8 (or of bytes that are not UTF-8) parks
    under a name of at most 255 bytes, cut on a character boundary."""
    for name in ("ü" * 127 + "x", NAME_3, "😀" * 63 + "abc", os.fsdecode(b"\xff" * 255), "short"):
        p = apply.purgatory_name(123456, name)
        raw = os.fsencode(p)
        assert len(raw) <= 255
        tail = raw.split(b".", 2)[2]
        assert os.fsencode(name).startswith(tail)
        if name.isprintable():
            tail.decode("utf-8")  # no character cut in two
    assert apply.purgatory_name(1, NAME_3) != apply.purgatory_name(2, NAME_3)


def test_the_applier_parks_entries_named_with_255_bytes(tmp_path):
    """Unlink and replace entries of 255-byte multi-byte names: they go to the purgatory."""
    purg = tmp_path / "purg"
    recs = [
        MkDir(path=NAME_3),
        MkFile(path=f"{NAME_3}/{NAME_3}"),
        Write(path=f"{NAME_3}/{NAME_3}", offset=0, data=b"x"),
        MkDir(path="other"),
        Unlink(path=f"{NAME_3}/{NAME_3}"),
        Rename(old="other", new=NAME_3),
    ]
    Applier(str(tmp_path), "q", str(purg)).apply(framed("q", None, "t", recs))
    assert os.listdir(tmp_path / "q") == [NAME_3]
    assert len(os.listdir(purg)) == 2  # the file, and the empty directory it replaced


def test_rmtree_removes_any_depth_with_few_descriptors(tmp_path, few_fds):
    """3,000 levels (names of one byte: the paths pass PATH_MAX) with 100 more descriptors allowed:
    no recursion, and at most a few dozen descriptors open at once."""
    top = tmp_path / "top"
    top.mkdir()
    fd = _chain(str(top), ["d"] * 3000)
    with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"bottom")
    os.close(fd)
    assert rmtree(str(top)) is True
    assert not top.exists()
    assert rmtree(str(top)) is False


def test_the_walk_reads_trees_deeper_and_paths_longer_than_path_max(tmp_path, few_fds):
    """iter_tree, the fingerprint and the baseline records of a tree whose paths are about
    9,000 bytes (3,000 levels) and 6,000 bytes (25 names of 240 bytes), with 100 more descriptors."""
    root = tmp_path / "q"
    root.mkdir()
    os.close(_chain(str(root), ["d"] * 3000))
    fd = _chain(str(root), ["ñ" * 120] * 25)
    with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"far")
    os.symlink("f", "l", dir_fd=fd)
    os.close(fd)
    rels = [rel for rel, _st in walk.iter_tree(str(root))]
    assert len(rels) == 3000 + 25 + 2
    assert max(len(r.encode()) for r in rels) > 6000
    long_file = "/".join(["ñ" * 120] * 25 + ["f"])
    want = fp.digest(
        [fp.Entry(path="/".join(["d"] * (i + 1)), kind="d", mode=0o755) for i in range(3000)]
        + [fp.Entry(path="/".join(["ñ" * 120] * (i + 1)), kind="d", mode=0o755) for i in range(25)]
        + [fp.file_entry(long_file, 0o644, b"far"), fp.Entry(path=long_file[:-1] + "l", kind="l", target="f")]
    )
    os.umask(0o022)
    assert walk.fingerprint(str(root)) == want
    recs = list(walk.baseline_records(str(root)))
    assert sum(1 for r in recs if type(r) is MkDir) == 3025
    assert walk.lstat_or_none(os.path.join(str(root), long_file)).st_size == 3
    assert walk.read_xattrs(os.path.join(str(root), long_file)) == {}
    back = tmp_path / "back"
    back.mkdir()
    Applier(str(back), "q", None).apply(framed("q", None, "t", recs))
    assert walk.fingerprint(str(back / "q")) == want
    removal = list(walk.tree_diff(str(back / "q"), str(tmp_path / "empty")))
    assert sum(1 for r in removal if type(r) is RmDir) == 3025


def test_a_sparse_file_is_digested_at_the_cost_of_its_data(tmp_path):
    """A 1 TiB sparse file with two islands digests like the same bytes given whole, reading
    only its islands (SEEK_DATA/SEEK_HOLE); written zeros digest like a hole."""
    p = tmp_path / "sparse"
    size = 1 << 40
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"island", 12345)
        os.pwrite(fd, b"\0" * 100_000, 1 << 30)  # zeros, written
        os.pwrite(fd, b"end", size - 3)
        read: list[int] = []
        real_pread = os.pread

        def counting_pread(f, n, off):
            data = real_pread(f, n, off)
            read.append(len(data))
            return data

        os.pread = counting_pread
        try:
            got = walk.content_digest_fd(fd)
        finally:
            os.pread = real_pread
    finally:
        os.close(fd)
    assert got == fp.content_digest_of_pieces(size, [(12345, b"island"), (size - 3, b"end")])
    assert sum(read) < 64 << 20


def test_the_file_size_limit_is_the_file_system_s():
    """fslimits reads the file system's type: ext2/3/4 store (2^32 - 1) blocks per file (16 TiB - 4 KiB
    with 4 KiB blocks), btrfs, XFS, ZFS, tmpfs and the rest what loff_t holds."""
    from coalesce_core.stream.records import MAX_FILE_SIZE
    from coalesce_posix import fslimits

    assert fslimits.limit_of(fslimits.EXT_MAGIC, 4096) == (1 << 44) - 4096
    assert fslimits.limit_of(fslimits.EXT_MAGIC, 1024) == (1 << 42) - 1024
    for magic in (0x9123683E, 0x58465342, 0x2FC12FC1, 0x01021994, 0x65735546):  # btrfs, xfs, zfs, tmpfs, fuse
        assert fslimits.limit_of(magic, 4096) == MAX_FILE_SIZE
    assert fslimits.max_file_size("/nonexistent/path") == MAX_FILE_SIZE


def test_the_declared_limit_is_what_the_local_file_system_takes(tmp_path):
    """On the test's own directory: a sparse file of exactly the declared size is made, one byte more
    is refused by the kernel (EFBIG), where the file system stores less than 2^63 - 1 bytes."""
    from coalesce_core.stream.records import MAX_FILE_SIZE
    from coalesce_posix import fslimits

    limit = fslimits.max_file_size(str(tmp_path))
    fd = os.open(tmp_path / "sparse", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, limit)
        assert os.fstat(fd).st_size == limit
        if limit < MAX_FILE_SIZE:
            with pytest.raises(OSError) as err:
                os.ftruncate(fd, limit + 1)
            assert err.value.errno == errno.EFBIG
    finally:
        os.close(fd)
