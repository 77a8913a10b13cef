"""Differential tests on real zfs-fuse: random operations, one cycle, every replica equals its source
and ``zfs send -i | zfs receive`` of the same PCPIs is the control (tests/differential.py)."""

from __future__ import annotations

import differential as dt
import pytest

pytestmark = pytest.mark.zfs

# zfs-fuse: no reflinks, no RENAME_EXCHANGE (EINVAL), no hole punching (EOPNOTSUPP), no SEEK_DATA/SEEK_HOLE
# (a reader of a hole reads zeros through FUSE, so the sparse file stays at 16 MiB), xattr values over 128
# bytes are kept as 8 other bytes, and no mtime after 2**31 - 1 s (EOVERFLOW)
ZFS = dt.Backend(
    "zfs",
    reflink=False,
    exchange=False,
    punch_hole=False,
    sparse_size=16 * dt.MiB,
    xattr_max=128,
    mtime_max_s=(1 << 31) - 1,
)


@pytest.mark.timeout(dt.run_timeout())
def test_differential(zfs_urls, group_config):
    dt.run(ZFS, zfs_urls, group_config)


@pytest.mark.parametrize("name", dt.regressions(ZFS))
def test_regression(name, zfs_urls, group_config):
    dt.replay_regression(ZFS, name, zfs_urls, group_config)


def test_zfs_fuse_cannot_do_what_is_not_declared(zfs_url):
    """The capabilities ZFS leaves out are really missing (this fails when zfs-fuse learns one: then declare it)."""
    import errno
    import fcntl
    import os

    from coalesce_core.backend.manager import plugin_manager
    from coalesce_core.backend.volume import Volume

    vol = Volume.open(plugin_manager(), zfs_url, create=True)
    root = vol.handle.root
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    dt.Write("a", 0, 70_000, 1)(root)
    dt.Write("b", 1 << 20, 10, 2)(root)
    try:
        fd = os.open(b, os.O_RDWR)
        try:
            # no SEEK_DATA/SEEK_HOLE: the hole before the data at 1 MiB is reported as data
            assert os.lseek(fd, 0, os.SEEK_DATA) == 0 and os.lseek(fd, 0, os.SEEK_HOLE) == os.fstat(fd).st_size
            with pytest.raises(OSError) as exc:
                src = os.open(a, os.O_RDONLY)
                try:
                    fcntl.ioctl(fd, 0x40049409, src)  # FICLONE
                finally:
                    os.close(src)
            assert exc.value.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV)
        finally:
            os.close(fd)
        for op in (dt.Exchange("a", "b"), dt.PunchHole("a", 0, 4096)):
            with pytest.raises(OSError) as exc:
                op(root)
            assert exc.value.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS), op
        long = b"\x00\xff" * 100
        os.setxattr(a, "user.long", long)
        assert os.getxattr(a, "user.long") != long, "zfs-fuse keeps long xattr values now: raise xattr_max"
        last = ZFS.mtime_max_s * 10**9
        dt.Utime("a", last)(root)
        assert os.lstat(a).st_mtime_ns == last
        with pytest.raises(OSError) as exc:
            dt.Utime("a", last + 10**9)(root)
        assert exc.value.errno == errno.EOVERFLOW, "zfs-fuse keeps later mtimes now: raise mtime_max_s"
    finally:
        vol.close()
