"""pytest plugin: real btrfs and zfs-fuse volumes for the backend tests.

Loaded as ``-p realfs`` with ``tests`` on the Python path (pyproject:
``pythonpath = ["tests"]`` and ``pytest_plugins = ["realfs"]`` in
tests/conftest.py).  Fixtures:

* ``realfs`` (session): brings up the btrfs loop file systems and the
  zfs-fuse pool with tools/realfs.py, and tears them down at the end of the
  session, also when tests failed (unless they were up before the tests
  brought them up, another session still uses them, or
  ``COALESCE_REALFS_KEEP=1``).  A failing set-up FAILS the tests that need
  it, with the reason; nothing is skipped (CI runs as root).
* ``btrfs_url`` / ``zfs_url`` (function): the URL of a fresh, not yet
  created volume (a subvolume / a dataset); removed with its snapshots,
  clones and state after the test.
* ``btrfs_urls`` / ``zfs_urls`` (function): factories of fresh URLs (for the
  conformance suite), all removed after the test; ``.cleanup(url)`` removes
  one early.  ``zfs_urls_module`` / ``btrfs_urls_module`` (module): the same,
  removed after the module's last test (volumes that many tests share).
* ``btrfs_small_url`` (function): a fresh subvolume on the 256 MiB file system (ENOSPC tests).
* ``btrfs_power`` (module): a btrfs file system of its own whose power can be cut
  (:class:`PowerCutBtrfs`): ``btrfs_power.url()`` is a fresh volume on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import shutil
import subprocess
import time

import pytest

_COUNTER = itertools.count()


def _tool():
    """tools/realfs.py (the test command runs from the repository root, which is on sys.path)."""
    from tools import realfs

    return realfs


#: set once a zfs command got no answer: zfs-fuse is wedged, and every later zfs test fails at once
#: (with this reason) instead of waiting for its own commands to time out
_ZFS_WEDGED: list[str] = []
ZFS_ANSWER_TIMEOUT = 120


def _quiet(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=ZFS_ANSWER_TIMEOUT if argv[0] in ("zfs", "zpool") else None
        )
    except subprocess.TimeoutExpired:
        _ZFS_WEDGED.append(f"`{' '.join(argv)}` got no answer in {ZFS_ANSWER_TIMEOUT} s")
        pytest.fail(f"zfs-fuse is wedged: {_ZFS_WEDGED[0]}")


def _zfs_answers() -> None:
    if _ZFS_WEDGED:
        pytest.fail(f"zfs-fuse is wedged since an earlier test ({_ZFS_WEDGED[0]})")
    _quiet(["zpool", "list", "-H", "-o", "name"])


def _sessions(tool) -> int:
    """A descriptor of the file every test session using the real file systems holds a shared
    lock on while it runs (so that two sessions on one machine, a developer's and a helper's,
    never tear down what the other one uses)."""
    os.makedirs(tool.STATE, exist_ok=True)
    return os.open(os.path.join(tool.STATE, "sessions.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@pytest.fixture(scope="session")
def realfs():
    """Up for the session; down at its end when the tests brought them up (the marker file
    ``started-by-tests``) and no other session still holds ``sessions.lock``."""
    tool = _tool()
    lock = _sessions(tool)
    fcntl.flock(lock, fcntl.LOCK_SH)  # waits while another session tears them down
    marker = os.path.join(tool.STATE, "started-by-tests")
    before = tool.status()
    if not (before["btrfs"] and before["btrfs_small"] and before["pool"] is not None):
        open(marker, "w").close()
    try:
        info = tool.up()
    except Exception as exc:  # set-up failure: fail (not skip) every test that needs it
        try:
            tool.down()
        finally:
            os.close(lock)
            pytest.fail(f"tools/realfs.py up failed: {exc}", pytrace=False)
    state_dir = os.path.join(info["state"], "zfs-state")
    old = os.environ.get("COALESCE_ZFS_STATE_DIR")
    os.environ["COALESCE_ZFS_STATE_DIR"] = state_dir
    try:
        yield info
    finally:
        if old is None:
            os.environ.pop("COALESCE_ZFS_STATE_DIR", None)
        else:
            os.environ["COALESCE_ZFS_STATE_DIR"] = old
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last session using them
        except BlockingIOError:
            pass
        else:
            if os.path.exists(marker) and os.environ.get("COALESCE_REALFS_KEEP") != "1":
                tool.down()
                for leftover in (marker, os.path.join(tool.STATE, "sessions.lock")):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
                with contextlib.suppress(OSError):
                    os.rmdir(tool.STATE)
        finally:
            os.close(lock)


# ---------------------------------------------------------------------------
# btrfs
# ---------------------------------------------------------------------------
def cleanup_btrfs(url: str) -> None:
    """Remove a test subvolume, its snapshots, metadata and exports (idempotent)."""
    path = url.split("://", 1)[1]
    parent, name = os.path.split(path)
    snapdir = os.path.join(parent, ".coalesce-snapshots", name)
    if os.path.isdir(snapdir):
        for s in os.listdir(snapdir):
            _quiet(["btrfs", "subvolume", "delete", os.path.join(snapdir, s)])
        shutil.rmtree(snapdir, ignore_errors=True)
    for d in (os.path.join(parent, ".coalesce", name), os.path.join(parent, ".coalesce-exports", name)):
        shutil.rmtree(d, ignore_errors=True)
    if os.path.isdir(path):
        p = _quiet(["btrfs", "subvolume", "delete", path])
        if p.returncode != 0:
            shutil.rmtree(path, ignore_errors=True)


class UrlFactory:
    def __init__(self, make, cleanup) -> None:
        self._make = make
        self._cleanup = cleanup
        self.made: list[str] = []

    def __call__(self, tag: str = "") -> str:
        url = self._make() + (f"-{tag}" if tag else "")
        self.made.append(url)
        return url

    def cleanup(self, url: str) -> None:
        self._cleanup(url)

    def cleanup_all(self) -> None:
        for url in self.made:
            self._cleanup(url)


def _btrfs_factory(mount: str) -> UrlFactory:
    return UrlFactory(lambda: f"btrfs://{mount}/t{os.getpid()}-{next(_COUNTER)}", cleanup_btrfs)


@pytest.fixture
def btrfs_urls(realfs):
    f = _btrfs_factory(realfs["btrfs"])
    yield f
    f.cleanup_all()


@pytest.fixture(scope="module")
def btrfs_urls_module(realfs):
    """As ``btrfs_urls``, for volumes shared by the tests of one module (removed after its last test)."""
    f = _btrfs_factory(realfs["btrfs"])
    yield f
    f.cleanup_all()


@pytest.fixture
def btrfs_url(btrfs_urls):
    return btrfs_urls()


@pytest.fixture
def btrfs_small_url(realfs):
    mount = realfs["btrfs_small"]
    _quiet(["btrfs", "subvolume", "sync", mount])  # space of deleted subvolumes is freed lazily
    f = _btrfs_factory(mount)
    yield f()
    f.cleanup_all()
    _quiet(["btrfs", "subvolume", "sync", mount])


class PowerCutBtrfs:
    """A btrfs file system on a loop device whose image file lies on the session's btrfs.

    :meth:`cut` is a power cut: a reflink copy of the image, made atomically by the clone ioctl,
    holds exactly what the loop device had been given, i.e. what a disk would hold if the power
    went out at that instant; whatever the file system still held in memory (written but not
    flushed by ``syncfs``, ``fsync`` or a transaction commit) is not in it.  :meth:`restart`
    unmounts the live file system and mounts the copy in its place, as a reboot would (btrfs
    replays its fsync log).  Mounted with ``commit=300`` so that no periodic transaction commit
    makes unflushed writes durable behind the test's back."""

    def __init__(self, where: str, mount: str) -> None:
        self.where, self.mount = where, mount
        self.cuts = itertools.count()
        self.image = os.path.join(where, "power-0.img")
        with open(self.image, "wb") as f:
            f.truncate(512 << 20)
        self.loop = ""
        self._attach()
        subprocess.run(["mkfs.btrfs", "-q", "-f", self.loop], check=True, capture_output=True)
        self._mount()
        self.factory = _btrfs_factory(mount)

    def _attach(self) -> None:
        self.loop = subprocess.run(
            ["losetup", "-f", "--show", self.image], check=True, capture_output=True, text=True
        ).stdout.strip()

    def _mount(self) -> None:
        subprocess.run(["mount", "-o", "commit=300", self.loop, self.mount], check=True, capture_output=True)

    def url(self, tag: str = "") -> str:
        return self.factory(tag)

    def cut(self) -> str:
        """The image as the power cut leaves it (a new file); the live file system goes on."""
        copy = os.path.join(self.where, f"power-{next(self.cuts) + 1}.img")
        subprocess.run(["cp", "--reflink=always", self.image, copy], check=True, capture_output=True)
        return copy

    def restart(self, image: str) -> None:
        """Mount ``image`` (from :meth:`cut`) in place of the live file system, which is dropped."""
        self._unmount()
        os.unlink(self.image)
        self.image = image
        self._attach()
        self._mount()

    def _unmount(self) -> None:
        for attempt in range(50):  # an abandoned agent's transfer thread may still hold a file
            if subprocess.run(["umount", self.mount], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"cannot unmount {self.mount}: busy")
        subprocess.run(["losetup", "-d", self.loop], check=True, capture_output=True)

    def close(self) -> None:
        self.factory.cleanup_all()
        self._unmount()
        shutil.rmtree(self.where, ignore_errors=True)


@pytest.fixture(scope="module")
def btrfs_power(realfs, tmp_path_factory):
    where = os.path.join(realfs["btrfs"], f"power-{os.getpid()}-{next(_COUNTER)}")
    os.mkdir(where)
    mount = str(tmp_path_factory.mktemp("power-mnt"))
    fs = PowerCutBtrfs(where, mount)
    yield fs
    fs.close()


# ---------------------------------------------------------------------------
# zfs
# ---------------------------------------------------------------------------
def cleanup_zfs(url: str) -> None:
    """Destroy a test dataset with its snapshots and clones, and its state directory."""
    ds = url.split("://", 1)[1].strip("/")
    pool = ds.split("/", 1)[0]
    flat = ds.replace("/", "%")
    prefix = f"{pool}/czclone-{flat.replace('%', '-')}-"
    state = os.environ.get("COALESCE_ZFS_STATE_DIR", "/var/lib/coalesce/zfs")
    # the read-only bind mounts of exported images (views/<pcpi>) hold their clones: unmount them first
    with open("/proc/self/mounts") as f:
        under = os.path.join(state, pool, flat) + "/"
        binds = [line.split()[1] for line in f if line.split()[1].startswith(under)]
    for mp in sorted(binds, key=len, reverse=True):
        if ".rw" not in mp.split("/") and _quiet(["umount", mp]).returncode != 0:
            _quiet(["umount", "-l", mp])
    names = _quiet(["zfs", "list", "-H", "-o", "name", "-t", "filesystem", "-r", pool]).stdout.split("\n")
    # zfs-fuse keeps a clone "busy" after its files were read (a test compared an export) unless it is
    # unmounted first: unmount it by force, destroy it, and try again with a growing pause (about 6 s)
    for n in names:
        if n.startswith(prefix):
            for i in range(4):
                _quiet(["zfs", "unmount", "-f", n])
                if _quiet(["zfs", "destroy", "-f", n]).returncode == 0:
                    break
                time.sleep(0.5 * (i + 1))
    if ds in names:
        if _quiet(["zfs", "destroy", "-r", "-f", ds]).returncode != 0:
            _quiet(["zfs", "destroy", "-r", "-f", ds])
    shutil.rmtree(os.path.join(state, pool, flat), ignore_errors=True)


def _zfs_factory(pool: str) -> UrlFactory:
    return UrlFactory(lambda: f"zfs://{pool}/t{os.getpid()}-{next(_COUNTER)}", cleanup_zfs)


@pytest.fixture
def zfs_urls(realfs):
    _zfs_answers()
    f = _zfs_factory(realfs["zfs"]["pool"])
    yield f
    f.cleanup_all()


@pytest.fixture(scope="module")
def zfs_urls_module(realfs):
    """As ``zfs_urls``, for volumes shared by the tests of one module (removed after its last test)."""
    _zfs_answers()
    f = _zfs_factory(realfs["zfs"]["pool"])
    yield f
    f.cleanup_all()


@pytest.fixture
def zfs_url(zfs_urls):
    return zfs_urls()
