"""Differential tests: every replica against its source qtree, with the kernel's own send/receive as control.

A group with a real source volume of 3-6 qtrees and a real destination
volume runs its baseline; then random file-system operations (plain os calls
on the live source) alternate with single coalesce cycles.  After every cycle:

* every replica is ``stable``, at the cycle's source PCPI, and the cycle had
  no failures (unless the step injected a transfer fault: then the faulted
  replica may stay at its older source PCPI);
* every replica's exported image equals its source qtree in the source PCPI
  the ledger says it shows (tests/trees.py: kind, mode, owner, size, content
  with holes as zeros, symlink target, xattrs, mtime, the qtree root and
  hard-link groups within the qtree), as the group's ``privileges`` policy transforms it
  (the default "strip": no setuid/setgid bits, tests/trees.py ``stripped``): I3 from the outside;
* large files allocate no more than their source (plus a slack): holes stay holes;
* the **native control** equals the source too: the same two source PCPIs
  replayed by the kernel's tool (``btrfs send --proto 2 -p PREV CUR | btrfs receive``,
  ``zfs send -i @PREV @CUR | zfs receive``) into a control volume.  The
  control proves the scenario and the comparator sound: when the control
  differs, the test is wrong, not coalesce.

The control runs when the cycle takes its source PCPI (an observer of
``coalesce_pcpi_taken``): that is the one moment both PCPIs of the
incremental exist, as the cycle releases the older one.

What a backend can do is declared in a :class:`Backend` record (as the
backend conformance kit takes declared capabilities); rules a backend cannot
serve are never drawn.  Operations are plain records (:class:`Write`,
:class:`Rename`, ...) and every example logs them, so a failing sequence is
printed as a list that :func:`replay` runs again as a regression test.

Profiles: the default is bounded and derandomized (CI);
``COALESCE_DIFFERENTIAL=long`` runs 1,000 random operation sequences per
backend (docs/verification.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import random
import shutil
import stat
import struct
import subprocess
import time
from typing import Any, Callable, Iterator, Sequence

import attrs
import pytest
import trees
from hypothesis import HealthCheck, Phase, event, note
from hypothesis import settings as Settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from coalesce_core.backend.faults import Rule
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.testing.harness import Harness

MiB, TiB = 1 << 20, 1 << 40
OUTSIDE = "_outside"  # a top-level directory of the source that no replica copies
#: names drawn for new entries: collisions make overwrites and swaps likely; odd but legal names
#: include one that looks like a btrfs orphan name and one like the btrfs translation's parking name
NAMES = ("a", "b", "c", "d", "p", "s", "f", "ü名", "sp ace", "o257-7-0", ".coalesce-mv.0")
#: symlink targets: none of them leads outside the source volume if followed
TARGETS = ("a", "b/c", "../a", "..", ".", "/nonexistent-coalesce-target/x", "ü名", "d" * 200)
XATTR_NAMES = ("user.a", "user.b", "user.long-name-of-an-xattr")
OWNERS = ((0, 0), (1000, 1000), (1000, 0), (65534, 65534), (123456, 7))
MAX_DEPTH = 5  # directories below a qtree root that new entries may go into
SIZES = (0, 1, 100, 4095, 4096, 5000, 65536, 70000, 300_000)
#: sparse files must stay sparse: a file of this size or more may not allocate more than its
#: source plus the slack (holes are compared as zeros by tests/trees.py, so only this sees them)
HOLES_CHECKED_FROM = 4 * MiB
HOLES_SLACK = 1 * MiB


# ---------------------------------------------------------------------------
# what a backend can do
# ---------------------------------------------------------------------------
@attrs.frozen
class Backend:
    """The capabilities of one backend's file system, declared by its test module.

    name          "btrfs" or "zfs" (selects the native control)
    reflink       FICLONE / FICLONERANGE (btrfs; zfs-fuse has no reflinks)
    exchange      renameat2(RENAME_EXCHANGE) (zfs-fuse refuses it: EINVAL)
    punch_hole    fallocate(PUNCH_HOLE) (zfs-fuse: EOPNOTSUPP)
    sparse_size   the apparent size of the "large sparse file" operation; zfs-fuse
                  has no SEEK_DATA/SEEK_HOLE, so every reader of a hole reads zeros
                  through FUSE and the size must stay small there
    xattr_max     the largest xattr value the file system keeps as written (zfs-fuse
                  keeps a value over 128 bytes as 8 other bytes)
    mtime_max_s   the latest modification time (seconds since the epoch) the file
                  system stores (zfs-fuse: 2**31 - 1, EOVERFLOW after it)
    known_gaps    differences the comparison of coalesce's exports masks because a
                  strict-xfail test of the backend's module shows them, so that random
                  runs look for other bugs; never masked for the control:
                  "holes"  holes of a changed large file written as zeros (the sparse
                           operation is kept at 16 MiB meanwhile: at 1 TiB the zeros
                           fill the file system)
                  "qtree-root-swap"  swapped qtree roots export a wrong root mtime
                           (the rule that swaps them is not drawn meanwhile)
    """

    name: str
    reflink: bool = False
    exchange: bool = False
    punch_hole: bool = False
    sparse_size: int = 16 * MiB
    xattr_max: int = 3000
    mtime_max_s: int = 1 << 62
    known_gaps: frozenset[str] = frozenset()


# ---------------------------------------------------------------------------
# operations (plain records: the log of an example is a replayable list)
# ---------------------------------------------------------------------------
class Refused(Exception):
    """The operation cannot be done in the current tree (a rename into its own child...)."""


_libc = ctypes.CDLL(None, use_errno=True)
_FICLONE = 0x40049409
_FICLONERANGE = 0x4020940D
_RENAME_EXCHANGE = 2
_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_REFUSED = {
    errno.EINVAL,
    errno.ENOTEMPTY,
    errno.EEXIST,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENOENT,
    errno.ELOOP,
    errno.EPERM,
    errno.EXDEV,
    errno.EBUSY,
}


def _data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _path(root: str, rel: str) -> str:
    """``root/rel`` after checking that no component before the last is a symlink (never leave the volume)."""
    parts = rel.split("/")
    cur = root
    for p in parts[:-1]:
        cur = os.path.join(cur, p)
        try:
            st_ = os.lstat(cur)
        except FileNotFoundError:
            raise Refused(f"{rel}: {cur} is missing") from None
        if not stat.S_ISDIR(st_.st_mode):
            raise Refused(f"{rel}: {cur} is not a directory")
    return os.path.join(root, rel)


def _open_file(root: str, rel: str, flags: int) -> int:
    return os.open(_path(root, rel), flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


@attrs.frozen
class Write:
    """pwrite ``size`` bytes (from ``seed``) at ``offset``; creates the file; a gap before it is a hole."""

    path: str
    offset: int
    size: int
    seed: int

    def __call__(self, root: str) -> None:
        fd = _open_file(root, self.path, os.O_WRONLY | os.O_CREAT)
        try:
            os.pwrite(fd, _data(self.seed, self.size), self.offset)
        finally:
            os.close(fd)


@attrs.frozen
class Append:
    path: str
    size: int
    seed: int

    def __call__(self, root: str) -> None:
        fd = _open_file(root, self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, _data(self.seed, self.size))
        finally:
            os.close(fd)


@attrs.frozen
class Truncate:
    path: str
    size: int

    def __call__(self, root: str) -> None:
        fd = _open_file(root, self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)


@attrs.frozen
class Sparse:
    """Make ``path`` a sparse file of ``size`` bytes holding ``islands`` of data ((offset, length, seed), ...)."""

    path: str
    size: int
    islands: tuple[tuple[int, int, int], ...]

    def __call__(self, root: str) -> None:
        fd = _open_file(root, self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.ftruncate(fd, self.size)
            for off, length, seed in self.islands:
                os.pwrite(fd, _data(seed, length), off)
        finally:
            os.close(fd)


@attrs.frozen
class Fallocate:
    """posix_fallocate: preallocated (unwritten) blocks, extending the file when past its end."""

    path: str
    offset: int
    length: int

    def __call__(self, root: str) -> None:
        fd = _open_file(root, self.path, os.O_RDWR)  # glibc's emulation (zfs-fuse) reads and writes
        try:
            os.posix_fallocate(fd, self.offset, self.length)
        finally:
            os.close(fd)


@attrs.frozen
class PunchHole:
    path: str
    offset: int
    length: int

    def __call__(self, root: str) -> None:
        fd = _open_file(root, self.path, os.O_WRONLY)
        try:
            if _libc.fallocate(fd, _PUNCH, ctypes.c_long(self.offset), ctypes.c_long(self.length)) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
        finally:
            os.close(fd)


@attrs.frozen
class Clone:
    """Reflink: the whole of ``src`` into ``dst`` (FICLONE), or ``length`` bytes (FICLONERANGE, 4 KiB aligned)."""

    src: str
    dst: str
    src_offset: int = 0
    length: int = 0  # 0: the whole file
    dst_offset: int = 0

    def __call__(self, root: str) -> None:
        s = _open_file(root, self.src, os.O_RDONLY)
        try:
            d = _open_file(root, self.dst, os.O_WRONLY | os.O_CREAT)
            try:
                if self.length == 0 and self.src_offset == 0 and self.dst_offset == 0:
                    fcntl.ioctl(d, _FICLONE, s)
                else:
                    fcntl.ioctl(d, _FICLONERANGE, struct.pack("qQQQ", s, self.src_offset, self.length, self.dst_offset))
            finally:
                os.close(d)
        finally:
            os.close(s)


@attrs.frozen
class Mkdir:
    path: str

    def __call__(self, root: str) -> None:
        os.mkdir(_path(root, self.path), 0o755)


@attrs.frozen
class Symlink:
    path: str
    target: str

    def __call__(self, root: str) -> None:
        os.symlink(self.target, _path(root, self.path))


@attrs.frozen
class Link:
    """A hard link ``new`` to the file ``old``."""

    old: str
    new: str

    def __call__(self, root: str) -> None:
        old = _path(root, self.old)
        if not stat.S_ISREG(os.lstat(old).st_mode):
            raise Refused(f"{self.old} is not a regular file")
        os.link(old, _path(root, self.new), follow_symlinks=False)


@attrs.frozen
class Rename:
    old: str
    new: str

    def __call__(self, root: str) -> None:
        os.rename(_path(root, self.old), _path(root, self.new))


@attrs.frozen
class Exchange:
    """renameat2(RENAME_EXCHANGE): swap two entries atomically."""

    a: str
    b: str

    def __call__(self, root: str) -> None:
        a, b = os.fsencode(_path(root, self.a)), os.fsencode(_path(root, self.b))
        if _libc.renameat2(-100, a, -100, b, _RENAME_EXCHANGE) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))


@attrs.frozen
class Remove:
    """unlink a file or symlink, or remove a whole directory tree."""

    path: str

    def __call__(self, root: str) -> None:
        full = _path(root, self.path)
        if stat.S_ISDIR(os.lstat(full).st_mode):
            shutil.rmtree(full)
        else:
            os.unlink(full)


@attrs.frozen
class Rmdir:
    path: str

    def __call__(self, root: str) -> None:
        os.rmdir(_path(root, self.path))


@attrs.frozen
class SetXattr:
    path: str
    name: str
    value: bytes

    def __call__(self, root: str) -> None:
        os.setxattr(_path(root, self.path), self.name, self.value, follow_symlinks=False)


@attrs.frozen
class RemoveXattr:
    path: str
    name: str

    def __call__(self, root: str) -> None:
        try:
            os.removexattr(_path(root, self.path), self.name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise Refused(f"{self.path} has no {self.name}") from None
            raise


@attrs.frozen
class Chmod:
    path: str
    mode: int

    def __call__(self, root: str) -> None:
        full = _path(root, self.path)
        if stat.S_ISLNK(os.lstat(full).st_mode):
            raise Refused("symlinks have no mode of their own")
        os.chmod(full, self.mode)


@attrs.frozen
class Chown:
    path: str
    uid: int
    gid: int

    def __call__(self, root: str) -> None:
        os.lchown(_path(root, self.path), self.uid, self.gid)


@attrs.frozen
class Utime:
    path: str
    mtime_ns: int

    def __call__(self, root: str) -> None:
        os.utime(_path(root, self.path), ns=(self.mtime_ns, self.mtime_ns), follow_symlinks=False)


@attrs.frozen
class Cycle:
    """One coalesce cycle, then the checks; ``fault=(replica, n)`` cuts that replica's stream after n records."""

    fault: tuple[str, int] | None = None


CYCLE = Cycle()
Op = Any  # one of the records above


# ---------------------------------------------------------------------------
# native controls: the kernel's own send/receive of the same two source PCPIs
# ---------------------------------------------------------------------------
def _pipe(send: list[str], receive: list[str]) -> None:
    s = subprocess.Popen(send, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert s.stdout is not None and s.stderr is not None  # both PIPE
    try:
        r = subprocess.run(receive, stdin=s.stdout, capture_output=True, timeout=600)
    finally:
        s.stdout.close()
        err = s.stderr.read()
        s.stderr.close()
        rc = s.wait()
    if rc != 0 or r.returncode != 0:
        raise AssertionError(
            f"native control failed: {' '.join(send)} ({rc}: {err.decode(errors='replace')}) | "
            f"{' '.join(receive)} ({r.returncode}: {r.stderr.decode(errors='replace')})"
        )


def _note(text: str) -> None:
    if currently_in_test_context():
        note(text)


def _event(text: str) -> None:
    if currently_in_test_context():
        event(text)


def btrfs_send_proto() -> int:
    """2 when the kernel and btrfs-progs speak send stream v2 (holes are sent as punched holes, not zeros)."""
    try:
        with open("/sys/fs/btrfs/features/send_stream_version") as f:
            if int(f.read().strip() or 1) < 2:
                return 1
    except (OSError, ValueError):
        return 1
    p = subprocess.run(["btrfs", "send", "--help"], capture_output=True)
    return 2 if b"--proto" in p.stdout + p.stderr else 1


class BtrfsControl:
    """``btrfs send [-p PREV] CUR | btrfs receive DIR``; DIR keeps the last received subvolume only.

    Stream v2 where available: v1 sends the holes of a changed file as zeros,
    so a 1 TiB sparse file would be written out in full."""

    def __init__(self, source: Any, url: str, count: Callable[[str], None] = lambda what: None) -> None:
        self.source = source  # the source BtrfsVolume
        self.dir = url.split("://", 1)[1]
        os.mkdir(self.dir)
        self.received: list[str] = []

    def receive(self, prev: str | None, cur: str) -> None:
        parent = ["-p", self.source.snap_path(prev)] if prev in self.received else []
        proto = ["--proto", "2"] if btrfs_send_proto() >= 2 else []
        _pipe(
            ["btrfs", "-q", "send", *proto, *parent, self.source.snap_path(cur)], ["btrfs", "-q", "receive", self.dir]
        )
        for old in self.received:
            self._delete(old)
        self.received = [cur]

    @contextlib.contextmanager
    def image(self, pcpi: str) -> Iterator[str]:
        yield os.path.join(self.dir, pcpi)

    def _delete(self, name: str) -> None:
        subprocess.run(["btrfs", "subvolume", "delete", os.path.join(self.dir, name)], capture_output=True)

    def close(self) -> None:
        for name in self.received:
            self._delete(name)
        self.received = []
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


class ZfsControl:
    """``zfs send [-i @PREV] @CUR | zfs receive -F CONTROL``, then a fresh mount.

    The mount is renewed after every receive: a FUSE mount keeps the
    attributes it looked up before (zfs-fuse), so a file's size read through
    the old mount can be the size before the receive.  (Unmounting *before*
    the receive instead, with ``receive -u``, makes zfs-fuse fail about one
    incremental receive in ten with "I/O error" and leave the control behind.)
    Should an incremental receive fail all the same, the control is made
    again from a full send of CUR, and the fallback is counted."""

    def __init__(self, source: Any, url: str, count: Callable[[str], None] = lambda what: None) -> None:
        import coalesce_zfs

        self.zfs = coalesce_zfs
        self.source = source  # the source ZfsVolume
        self.dataset = url.split("://", 1)[1].strip("/")
        self.received: str | None = None
        self.count = count

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        with self.zfs._serialized():  # zfs-fuse wedges on concurrent clone/mount commands
            p = subprocess.run(["zfs", *args], capture_output=True, text=True, timeout=300)
        if check and p.returncode != 0:
            raise AssertionError(f"zfs {' '.join(args)}: {p.stderr.strip()}")
        return p

    def receive(self, prev: str | None, cur: str) -> None:
        ds = self.source.dataset
        full = ["zfs", "send", f"{ds}@{cur}"]
        with self.zfs._serialized():
            if prev is not None and prev == self.received:
                try:
                    _pipe(["zfs", "send", "-i", f"{ds}@{prev}", f"{ds}@{cur}"], ["zfs", "receive", "-F", self.dataset])
                except AssertionError as exc:
                    self.count("zfs control: full receive after a failed incremental")
                    _event("zfs control: full receive after a failed incremental")
                    _note(f"zfs control: {exc}")
                    self._cmd("destroy", "-r", "-f", self.dataset, check=False)
                    _pipe(full, ["zfs", "receive", "-F", self.dataset])
                else:
                    self._cmd("destroy", f"{self.dataset}@{prev}", check=False)
            else:
                self._cmd("destroy", "-r", "-f", self.dataset, check=False)
                _pipe(full, ["zfs", "receive", "-F", self.dataset])
            self.received = cur
            self._remount()

    def _remount(self) -> None:
        """Unmount and mount the control again; zfs-fuse says "busy" for a moment after the last
        reader of a mount closed its files (as the backend's destroys, which retry too)."""
        for i in range(30):  # about 50 s: two zfs-fuse users at once on a loaded machine hold a mount busy longer
            self._cmd("umount", *(["-f"] if i >= 3 else []), self.dataset, check=False)
            p = self._cmd("mount", self.dataset, check=False)
            if p.returncode == 0 or "already mounted" in p.stderr:
                return
            if "busy" not in p.stderr:
                break
            time.sleep(min(0.25 * (i + 1), 2.0))
        raise AssertionError(f"zfs mount {self.dataset}: {p.stderr.strip()}")

    @contextlib.contextmanager
    def image(self, pcpi: str) -> Iterator[str]:
        assert pcpi == self.received, f"the control holds {self.received}, not {pcpi}"
        yield self._cmd("get", "-H", "-o", "value", "mountpoint", self.dataset).stdout.strip()

    def close(self) -> None:
        self._cmd("umount", self.dataset, check=False)


CONTROLS: dict[str, Callable[[Any, str, Callable[[str], None]], Any]] = {"btrfs": BtrfsControl, "zfs": ZfsControl}


class _ControlObserver:
    """Runs the native control when the cycle takes its source PCPI (both PCPIs of the incremental exist then)."""

    def __init__(self, diff: "Differential") -> None:
        self.diff = diff

    @hookimpl
    def coalesce_pcpi_taken(self, group: str, volume: str, name: str, role: str) -> None:
        if role == "source":
            self.diff._source_pcpi_taken(name)


class _Warnings(logging.Handler):
    """Counts the backends' warnings (e.g. a btrfs stream that falls back to the tree compare)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# ---------------------------------------------------------------------------
# one group under test
# ---------------------------------------------------------------------------
class Differential:
    """A group on real volumes, its native control, the operations applied and the checks."""

    def __init__(self, backend: Backend, urls: Any, group_config: Callable[..., Any], qtrees: int) -> None:
        self.backend = backend
        self.qtrees = [f"q{i}" for i in range(qtrees)]
        self.urls = urls
        self.made: list[str] = []
        self.log: list[Op] = []
        self.taken: list[str] = []
        self.lagging: set[str] = set()  # replicas the last cycle left at an older source PCPI
        self.images: dict[str, tuple[dict[str, trees.Tree], dict[str, dict[str, int]]]] = {}
        self.control_error: BaseException | None = None
        self.control: Any = None
        self.stats: dict[str, Any] = {}
        self.started = time.monotonic()
        self.warnings = _Warnings()
        for name in ("coalesce.btrfs", "coalesce.zfs"):
            logging.getLogger(name).addHandler(self.warnings)
        src, dst, ctl = self._url("src"), self._url("dst"), self._url("ctl")
        self.h = Harness(
            group_config(replicas=self.qtrees, source_url=src, dest_url=dst), plugins=[_ControlObserver(self)]
        )
        self.root = self.h.agent.source.handle.root
        self.control = CONTROLS[backend.name](self.h.agent.source.handle, ctl, self.count)
        for q in [*self.qtrees, OUTSIDE]:
            os.mkdir(os.path.join(self.root, q), 0o755)

    def _url(self, tag: str) -> str:
        url = self.urls(tag)
        self.made.append(url)
        return url

    def count(self, what: str, n: float = 1) -> None:
        self.stats[what] = round(self.stats.get(what, 0) + n, 3)

    def close(self) -> None:
        if os.environ.get("COALESCE_DIFFERENTIAL_STATS"):
            with open(os.environ["COALESCE_DIFFERENTIAL_STATS"], "a") as f:
                f.write(
                    json.dumps(
                        {
                            "backend": self.backend.name,
                            "qtrees": len(self.qtrees),
                            **self.stats,
                            "seconds": round(time.monotonic() - self.started, 2),
                        }
                    )
                    + "\n"
                )
        for name in ("coalesce.btrfs", "coalesce.zfs"):
            logging.getLogger(name).removeHandler(self.warnings)
        with contextlib.suppress(Exception):
            self.h.agent.close()
        if self.control is not None:
            with contextlib.suppress(Exception):
                self.control.close()
        for url in self.made:
            self.urls.cleanup(url)

    # -- operations -------------------------------------------------------------
    def do(self, op: Op) -> bool:
        """Apply ``op`` to the live source (or run a cycle); False when the tree refuses it (not logged)."""
        if isinstance(op, Cycle):
            self.log.append(op)
            _note(f"{op!r},")
            self.cycle(op.fault)
            return True
        try:
            op(self.root)
        except Refused:
            self.count("refused")
            return False
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            _event(f"refused: {type(op).__name__} {errno.errorcode.get(exc.errno, exc.errno)}")
            self.count("refused")
            return False
        self.count(type(op).__name__)
        self.log.append(op)
        _note(f"{op!r},")
        return True

    def listing(self) -> dict[str, str]:
        """Every entry of the source by relative path: 'd', 'f' or 'l' (qtree roots and OUTSIDE included)."""
        out: dict[str, str] = {}
        stack = [""]
        while stack:
            rel = stack.pop()
            with os.scandir(os.path.join(self.root, rel) if rel else self.root) as it:
                for e in it:
                    r = f"{rel}/{e.name}" if rel else e.name
                    if e.is_symlink():
                        out[r] = "l"
                    elif e.is_dir(follow_symlinks=False):
                        out[r] = "d"
                        stack.append(r)
                    elif e.is_file(follow_symlinks=False):
                        out[r] = "f"
        return out

    # -- the cycle and its checks -----------------------------------------------------
    def _source_pcpi_taken(self, name: str) -> None:
        """Replay PREV -> NAME natively and read NAME's qtrees now: a cycle whose every update
        failed releases NAME before it ends."""
        prev = self.taken[-1] if self.taken else None
        self.taken.append(name)
        if self.control_error is None:
            t = time.monotonic()
            try:
                self.control.receive(prev, name)
                t2 = time.monotonic()
                self.count("seconds in the native control", t2 - t)
                self.images[name] = self._capture_source(name)
                self.count("seconds reading sources", time.monotonic() - t2)
            except BaseException as exc:  # raised by the check, not inside the agent
                self.control_error = exc

    def _capture_source(self, pcpi: str) -> tuple[dict[str, trees.Tree], dict[str, dict[str, int]]]:
        """The tree of every qtree in a source PCPI, and the allocated bytes of its large files."""
        with self.h.agent.source.handle.image(pcpi) as img:
            out = {q: trees.capture(os.path.join(img, q)) for q in self.qtrees}
            return out, {q: _allocated(os.path.join(img, q), out[q]) for q in self.qtrees}

    def cycle(self, fault: tuple[str, int] | None = None) -> None:
        before = self.taken[-1] if self.taken else None
        n_warn = len(self.warnings.messages)
        rule = None
        if fault is not None:
            rule = self.h.faults.add(Rule(hook="coalesce_diff", qtree=fault[0], record=fault[1], times=1))
        t0 = time.monotonic()
        try:
            report = self.h.cycle()
        finally:
            if rule is not None:
                self.h.faults.rules.remove(rule)
        t1 = time.monotonic()
        self.count("seconds in cycles", t1 - t0)
        for m in self.warnings.messages[n_warn:]:
            self.count("backend warnings")
            _event(f"backend warning: {m.split(':')[0][:60]}")
            _note(f"backend warning: {m}")
        if self.control_error is not None:
            raise AssertionError("the native control could not replay the source PCPIs") from self.control_error
        assert self.taken and self.taken[-1] != before, f"the cycle took no source PCPI: {report}"
        newest = self.taken[-1]
        replicas = self.h.agent.state.replicas
        points = {newest} | {sp for q in self.qtrees if (sp := replicas[q].source_point)}
        self.images = {p: self.images[p] for p in points}
        want = {p: self.images[p][0] for p in points}
        alloc = {p: self.images[p][1] for p in points}
        t2 = time.monotonic()

        with self.control.image(newest) as ctl:
            bad = {
                q: d
                for q in self.qtrees
                if (
                    d := trees.differences(want[newest][q], trees.capture(os.path.join(ctl, q)))
                    + _holes_filled(alloc[newest][q], os.path.join(ctl, q))
                )
            }
        assert not bad, (
            f"the NATIVE CONTROL differs from the source: the scenario or the comparator is wrong, not coalesce: {bad}"
        )
        t3 = time.monotonic()
        self.count("seconds reading the control", t3 - t2)

        problems = []
        failed = set()
        for q in self.qtrees:
            r = replicas[q]
            if r.state != "stable":
                problems.append(f"{q}: state {r.state} (last error {getattr(r, 'last_error', '')!r})")
                continue
            assert r.source_point is not None, f"{q}: stable without a source PCPI"  # I3: a stable replica has one
            if r.source_point != newest:
                failed.add(q)
                if fault is None or q != fault[0]:
                    problems.append(
                        f"{q}: exports source PCPI {r.source_point}, not the cycle's {newest} "
                        f"(last error {getattr(r, 'last_error', '')!r})"
                    )
            path = self.h.agent.export_path(q)
            got = trees.capture(os.path.realpath(path)) if path else trees.Tree({}, ())
            source = want[r.source_point][q]
            if self.h.agent.config.privileges == "strip":  # the replica holds the source as stripped
                source = trees.stripped(source)
            diff = trees.differences(source, got)
            if not diff and path and "holes" not in self.backend.known_gaps:
                diff = _holes_filled(alloc[r.source_point][q], os.path.realpath(path))
            if diff:
                problems.append(
                    f"{q}: the export differs from source PCPI {r.source_point}:\n    " + "\n    ".join(diff)
                )
        if report.get("failures", 0) != len(failed):
            problems.append(
                f"the cycle reports {report.get('failures')} failures, {len(failed)} replicas lag: {report}"
            )
        self.count("seconds reading exports", time.monotonic() - t3)
        self.count("cycles")
        self.lagging = failed
        if fault is not None:
            self.count("faults fired" if failed else "faults not reached")
            _event(f"fault injected: {'fired' if failed else 'stream was shorter'}")
        assert not problems, "coalesce's replicas differ (the native control is equal):\n  " + "\n  ".join(problems)


def _allocated(root: str, tree: trees.Tree) -> dict[str, int]:
    """Allocated bytes of the files of at least :data:`HOLES_CHECKED_FROM` bytes."""
    return {
        p: os.lstat(os.path.join(root, p)).st_blocks * 512
        for p, e in tree.entries.items()
        if e[0] == "f" and e[4] >= HOLES_CHECKED_FROM
    }


def _holes_filled(want: dict[str, int], root: str) -> list[str]:
    """Large files that allocate more than their source (plus :data:`HOLES_SLACK`): holes written as zeros."""
    out = []
    for p, n in sorted(want.items()):
        got = os.lstat(os.path.join(root, p)).st_blocks * 512
        if got > n + HOLES_SLACK:
            out.append(f"{p}: holes filled: {got:,} bytes allocated, the source {n:,}")
    return out


# ---------------------------------------------------------------------------
# the hypothesis state machine
# ---------------------------------------------------------------------------
def _depth(p: str) -> int:
    return p.count("/")


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}"


class DifferentialMachine(RuleBasedStateMachine):
    """Random operations on the source, one cycle now and then; every cycle is checked (:class:`Differential`).

    Bound by :func:`differential_machine` to a backend, a URL factory and the
    ``group_config`` fixture."""

    backend: Backend
    urls: Any
    group_config: Callable[..., Any]

    def __init__(self) -> None:
        super().__init__()
        self.d: Differential | None = None
        self.running = False

    # -- set-up and teardown ---------------------------------------------------
    @initialize(n=st.integers(3, 6), data=st.data())
    def setup(self, n: int, data: st.DataObject) -> None:
        self.running = True
        note(f"qtrees={n}")
        self.d = Differential(self.backend, self.urls, self.group_config, n)
        for q in self.d.qtrees:  # a small starting tree in every qtree
            for _ in range(data.draw(st.integers(0, 4), label=f"entries of {q}")):
                self._create(
                    data, parents=[q, *[p for p, k in self.d.listing().items() if k == "d" and p.startswith(q + "/")]]
                )
        self.d.do(CYCLE)
        self.running = False

    def teardown(self) -> None:
        if self.d is None:
            return
        try:
            if not self.running:  # no rule failed: the operations since the last cycle are checked too
                self.d.do(CYCLE)
        finally:
            self.d.close()

    def _run(self, fn: Callable[[], None]) -> None:
        self.running = True
        fn()
        self.running = False

    def _idle_cycles(self) -> int:
        """How many cycles ended the log since the last operation done."""
        assert self.d is not None  # set by setup(), the initialize rule, before any other rule
        n = 0
        for op in reversed(self.d.log):
            if not isinstance(op, Cycle):
                break
            n += 1
        return n

    # -- drawing paths ---------------------------------------------------------------
    def _entries(self) -> dict[str, str]:
        assert self.d is not None  # set by setup(), the initialize rule, before any other rule
        return self.d.listing()

    def _draw(self, data: st.DataObject, items: Sequence[str], label: str) -> str | None:
        return data.draw(st.sampled_from(sorted(items)), label=label) if items else None

    def _dirs(self, entries: dict[str, str]) -> list[str]:
        return [p for p, k in entries.items() if k == "d" and _depth(p) <= MAX_DEPTH]

    def _new_path(self, data: st.DataObject, entries: dict[str, str], label: str = "new") -> str:
        parent = self._draw(data, self._dirs(entries), f"{label} parent")
        assert parent is not None  # the qtree roots (depth 0, never moved: _movable) are directories
        return _join(parent, data.draw(st.sampled_from(NAMES), label=f"{label} name"))

    def _movable(self, entries: dict[str, str], kinds: str = "dfl") -> list[str]:
        return [p for p, k in entries.items() if k in kinds and _depth(p) >= 1]

    def _create(self, data: st.DataObject, parents: list[str]) -> None:
        assert self.d is not None  # set by setup(), the initialize rule, before any other rule
        path = _join(data.draw(st.sampled_from(sorted(parents))), data.draw(st.sampled_from(NAMES)))
        kind = data.draw(st.sampled_from("ffdl"))
        if kind == "f":
            self.d.do(Write(path, 0, data.draw(st.sampled_from(SIZES)), data.draw(st.integers(0, 999))))
        elif kind == "d":
            self.d.do(Mkdir(path))
        else:
            self.d.do(Symlink(path, data.draw(st.sampled_from(TARGETS))))

    # -- data ---------------------------------------------------------------------------
    @rule(data=st.data())
    def write(self, data):
        def go():
            e = self._entries()
            files = self._movable(e, "f")
            path = (
                self._draw(data, files, "file")
                if files and data.draw(st.booleans(), label="existing")
                else self._new_path(data, e)
            )
            full = os.path.join(self.d.root, path)
            size = os.lstat(full).st_size if os.path.lexists(full) and e.get(path) == "f" else 0
            offset = data.draw(
                st.sampled_from(sorted({0, size, size // 2, 4096, 65536, 1 << 20, size + 100_000})), label="offset"
            )
            self.d.do(
                Write(
                    path,
                    offset,
                    data.draw(st.sampled_from(SIZES), label="size"),
                    data.draw(st.integers(0, 999), label="seed"),
                )
            )

        self._run(go)

    @rule(data=st.data())
    def append(self, data):
        def go():
            path = self._draw(data, self._movable(self._entries(), "f"), "file")
            if path:
                self.d.do(Append(path, data.draw(st.sampled_from(SIZES[1:])), data.draw(st.integers(0, 999))))

        self._run(go)

    @rule(data=st.data())
    def truncate(self, data):
        def go():
            path = self._draw(data, self._movable(self._entries(), "f"), "file")
            if path:
                size = os.lstat(os.path.join(self.d.root, path)).st_size
                new = data.draw(st.sampled_from(sorted({0, 1, size // 3, size + 1, size + 4096, size + (1 << 20)})))
                self.d.do(Truncate(path, new))

        self._run(go)

    @rule(data=st.data())
    def sparse(self, data):
        """A large sparse file with a few data islands (1 TiB where the file system can seek holes)."""

        def go():
            e = self._entries()
            files = self._movable(e, "f")
            path = self._draw(data, files, "file") if files and data.draw(st.booleans()) else self._new_path(data, e)
            size = self.d.backend.sparse_size
            if "holes" in self.d.backend.known_gaps:
                size = min(size, 16 * MiB)
            islands = tuple(
                (
                    data.draw(st.sampled_from([0, size // 3, size // 2, size - 70_000, size - 1])),
                    data.draw(st.sampled_from([1, 4096, 70_000])),
                    data.draw(st.integers(0, 999)),
                )
                for _ in range(data.draw(st.integers(0, 3), label="islands"))
            )
            self.d.do(Sparse(path, size, islands))

        self._run(go)

    @rule(data=st.data())
    def fallocate(self, data):
        def go():
            path = self._draw(data, self._movable(self._entries(), "f"), "file")
            if path:
                size = os.lstat(os.path.join(self.d.root, path)).st_size
                off = data.draw(st.sampled_from(sorted({0, size // 2, size, size + 8192})))
                self.d.do(Fallocate(path, off, data.draw(st.sampled_from([1, 4096, 100_000, 1 << 20]))))

        self._run(go)

    @precondition(lambda self: self.d is not None and self.d.backend.punch_hole)
    @rule(data=st.data())
    def punch_hole(self, data):
        def go():
            path = self._draw(data, self._movable(self._entries(), "f"), "file")
            if path:
                size = os.lstat(os.path.join(self.d.root, path)).st_size
                off = data.draw(st.sampled_from(sorted({0, 100, 4096, size // 2})))
                self.d.do(PunchHole(path, off, data.draw(st.sampled_from([1, 4096, 65536, 1 << 20]))))

        self._run(go)

    @precondition(lambda self: self.d is not None and self.d.backend.reflink)
    @rule(data=st.data())
    def clone(self, data):
        def go():
            e = self._entries()
            src = self._draw(data, self._movable(e, "f"), "source file")
            if not src:
                return
            files = self._movable(e, "f")
            dst = self._draw(data, files, "dest file") if data.draw(st.booleans()) else self._new_path(data, e)
            if data.draw(st.booleans(), label="whole"):
                self.d.do(Clone(src, dst))
            else:
                size = os.lstat(os.path.join(self.d.root, src)).st_size
                blocks = size // 4096
                if blocks == 0:
                    return
                s = data.draw(st.integers(0, blocks - 1)) * 4096
                n = data.draw(st.integers(1, blocks - s // 4096)) * 4096
                self.d.do(Clone(src, dst, s, n, data.draw(st.sampled_from([0, 4096, 1 << 20]))))

        self._run(go)

    # -- names -------------------------------------------------------------------------
    @rule(data=st.data())
    def create(self, data):
        def go():
            e = self._entries()
            self._create(data, self._dirs(e))

        self._run(go)

    @rule(data=st.data())
    def hardlink(self, data):
        """Within and across qtrees (and from or to the part no replica copies)."""

        def go():
            e = self._entries()
            old = self._draw(data, self._movable(e, "f"), "file")
            if old:
                self.d.do(Link(old, self._new_path(data, e)))

        self._run(go)

    @rule(data=st.data())
    def rename(self, data):
        """Any entry to a new name or over an existing one, within or across qtrees."""

        def go():
            e = self._entries()
            old = self._draw(data, self._movable(e), "old")
            if not old:
                return
            if data.draw(st.booleans(), label="over an existing entry"):
                new = self._draw(data, self._movable(e), "existing")
            else:
                new = self._new_path(data, e)
            self.d.do(Rename(old, new))

        self._run(go)

    @rule(data=st.data())
    def swap(self, data):
        """Two entries (directories mostly) swap names: by RENAME_EXCHANGE or three renames."""

        def go():
            e = self._entries()
            movable = self._movable(e)
            dirs = self._movable(e, "d")
            a = self._draw(data, dirs if dirs and data.draw(st.booleans()) else movable, "a")
            b = self._draw(data, movable, "b")
            if not a or not b or a == b:
                return
            if self.d.backend.exchange and data.draw(st.booleans(), label="exchange"):
                self.d.do(Exchange(a, b))
            else:
                tmp = _join(os.path.dirname(a), "swap-tmp")
                if self.d.do(Rename(a, tmp)):
                    self.d.do(Rename(b, a))
                    self.d.do(Rename(tmp, b))

        self._run(go)

    @rule(data=st.data())
    def rename_then_move(self, data):
        """A directory is renamed, then entries move into it, out of it, or into a new one made at its old name."""

        def go():
            e = self._entries()
            d = self._draw(data, self._movable(e, "d"), "dir")
            if not d:
                return
            new = self._new_path(data, e, "renamed")
            if not self.d.do(Rename(d, new)):
                return
            if data.draw(st.booleans(), label="re-create the old name"):
                self.d.do(Mkdir(d))
            e = self._entries()
            inside = [p for p in self._movable(e) if p.startswith(new + "/")]
            for _ in range(data.draw(st.integers(1, 3), label="moves")):
                how = data.draw(st.sampled_from(["out", "in", "to-old"]), label="how")
                if how == "in":
                    src = self._draw(
                        data, [p for p in self._movable(e) if not p.startswith(new + "/") and p != new], "into"
                    )
                    if src:
                        self.d.do(Rename(src, _join(new, data.draw(st.sampled_from(NAMES)))))
                elif inside:
                    src = data.draw(st.sampled_from(sorted(inside)), label="out of")
                    dest = (
                        _join(d, os.path.basename(src))
                        if how == "to-old"
                        else self._new_path(data, self._entries(), "out")
                    )
                    self.d.do(Rename(src, dest))
                e = self._entries()
                inside = [p for p in self._movable(e) if p.startswith(new + "/")]

        self._run(go)

    @rule(data=st.data())
    def under_old_child(self, data):
        """A parent moved under its old child: ``mv p/c c'; mv p c'/p``."""

        def go():
            e = self._entries()
            pairs = [
                p
                for p in self._movable(e, "d")
                if _depth(p) >= 2 and e.get(os.path.dirname(p)) == "d" and _depth(os.path.dirname(p)) >= 1
            ]
            c = self._draw(data, pairs, "child")
            if not c:
                return
            p = os.path.dirname(c)
            lifted = _join(os.path.dirname(p), data.draw(st.sampled_from(NAMES), label="lifted name"))
            if self.d.do(Rename(c, lifted)):
                self.d.do(Rename(p, _join(lifted, data.draw(st.sampled_from(NAMES), label="parent's name"))))

        self._run(go)

    @rule(data=st.data())
    def rmdir_recreate(self, data):
        """A directory's children move out, it is removed, made again with the same name, and children move back."""

        def go():
            e = self._entries()
            d = self._draw(data, self._movable(e, "d"), "dir")
            if not d:
                return
            parent = os.path.dirname(d)
            children = sorted(n for n in os.listdir(os.path.join(self.d.root, d)))
            parked = []
            for i, n in enumerate(children):
                tmp = _join(parent, f"parked-{i}")
                if self.d.do(Rename(_join(d, n), tmp)):
                    parked.append((tmp, n))
            if not self.d.do(Rmdir(d)) or not self.d.do(Mkdir(d)):
                return
            for tmp, n in parked:
                if data.draw(st.booleans(), label=f"move {n} back"):
                    self.d.do(Rename(tmp, _join(d, n)))

        self._run(go)

    @rule(data=st.data())
    def replace_kind(self, data):
        """A file replaced by a directory (with a child) and back, or a symlink by a file."""

        def go():
            e = self._entries()
            path = self._draw(data, self._movable(e), "entry")
            if not path:
                return
            if not self.d.do(Remove(path)):
                return
            if e[path] in "fl":
                if self.d.do(Mkdir(path)) and data.draw(st.booleans(), label="with a child"):
                    self.d.do(Write(_join(path, "child"), 0, data.draw(st.sampled_from(SIZES)), 7))
            else:
                self.d.do(Write(path, 0, data.draw(st.sampled_from(SIZES)), data.draw(st.integers(0, 999))))

        self._run(go)

    @rule(data=st.data())
    def remove(self, data):
        def go():
            path = self._draw(data, self._movable(self._entries()), "entry")
            if path:
                self.d.do(Remove(path))

        self._run(go)

    @precondition(lambda self: self.d is not None and "qtree-root-swap" not in self.d.backend.known_gaps)
    @rule(data=st.data())
    def swap_qtree_roots(self, data):
        """Two qtree roots swap (each replica's source qtree is now the other's tree)."""

        def go():
            a, b = data.draw(st.lists(st.sampled_from(self.d.qtrees), min_size=2, max_size=2, unique=True))
            tmp = _join(OUTSIDE, "qtree-tmp")
            if self.d.do(Rename(a, tmp)):
                self.d.do(Rename(b, a))
                self.d.do(Rename(tmp, b))

        self._run(go)

    # -- attributes --------------------------------------------------------------------
    def _any(self, data, kinds="dfl") -> str | None:
        e = self._entries()
        return self._draw(data, [p for p, k in e.items() if k in kinds and p != OUTSIDE], "entry")

    @rule(data=st.data())
    def xattr(self, data):
        def go():
            path = self._any(data, "df")
            name = data.draw(st.sampled_from(XATTR_NAMES))
            if data.draw(st.integers(0, 3)) == 0:
                self.d.do(RemoveXattr(path, name))
            else:
                values = [v for v in (b"", b"v", b"\x00\xff" * 50, b"x" * 3000) if len(v) <= self.d.backend.xattr_max]
                self.d.do(SetXattr(path, name, data.draw(st.sampled_from(values))))

        self._run(go)

    @rule(data=st.data())
    def chmod(self, data):
        def go():
            self.d.do(
                Chmod(
                    self._any(data, "df"),
                    data.draw(st.sampled_from([0o755, 0o700, 0o644, 0o600, 0o000, 0o4755, 0o2711, 0o1777, 0o7777])),
                )
            )

        self._run(go)

    @rule(data=st.data())
    def chown(self, data):
        def go():
            uid, gid = data.draw(st.sampled_from(OWNERS))
            self.d.do(Chown(self._any(data), uid, gid))

        self._run(go)

    @rule(data=st.data())
    def utime(self, data):
        def go():
            self.d.do(
                Utime(
                    self._any(data),
                    data.draw(
                        st.sampled_from(
                            [
                                t
                                for t in (
                                    0,
                                    1,
                                    1_000_000_000_123_456_789,
                                    1_700_000_000_000_000_001,
                                    4_102_444_800_999_999_999,
                                )
                                if t // 10**9 <= self.backend.mtime_max_s
                            ]
                        )
                    ),
                )
            )

        self._run(go)

    # -- cycles -----------------------------------------------------------------------------
    # One cycle with nothing new to send is drawn (the second of two in a row), a third is not:
    # hypothesis otherwise draws whole sequences of cycles and operations that find nothing to
    # act on (no operation done), each cycle a second on zfs-fuse.
    @precondition(lambda self: self.d is not None and self._idle_cycles() < 2)
    @rule()
    def cycle(self):
        self._run(lambda: self.d.do(CYCLE))

    @precondition(lambda self: self.d is not None and self._idle_cycles() < 2)
    @rule(data=st.data())
    def cycle_with_a_cut_transfer(self, data):
        """One replica's change stream is cut after a few records: it rolls back, stays at its older
        source PCPI for this cycle and catches up in the next."""

        def go():
            # never two failed updates of a replica in a row: [group] reseed_after would re-seed it
            q = data.draw(
                st.sampled_from([q for q in self.d.qtrees if q not in self.d.lagging]), label="faulted replica"
            )
            self.d.do(Cycle(fault=(q, data.draw(st.integers(0, 6), label="records let through"))))

        self._run(go)


def differential_machine(backend: Backend, urls: Any, group_config: Callable[..., Any]) -> type[DifferentialMachine]:
    """The state machine bound to one backend and the test's fixtures."""
    return type(
        f"Differential{backend.name.capitalize()}",
        (DifferentialMachine,),
        {"backend": backend, "urls": urls, "group_config": staticmethod(group_config)},
    )


# ---------------------------------------------------------------------------
# profiles, running and replaying
# ---------------------------------------------------------------------------
#: (max_examples, stateful_step_count) of the profiles, per backend; "ci" is derandomized
PROFILES = {
    "ci": {"btrfs": (12, 40), "zfs": (3, 30)},
    "long": {"btrfs": (1000, 50), "zfs": (1000, 50)},
}


def run_timeout() -> float:
    """pytest-timeout's limit for one run of the machine: the suite's 600 s for the CI profile, none
    for the long one (its hundreds of sequences are one test and take hours)."""
    return 0 if os.environ.get("COALESCE_DIFFERENTIAL", "ci") == "long" else 600


def differential_settings(backend: Backend) -> Settings:
    """The CI profile (bounded, derandomized) or, with COALESCE_DIFFERENTIAL=long, the nightly one."""
    profile = os.environ.get("COALESCE_DIFFERENTIAL", "ci")
    if profile not in PROFILES:
        raise ValueError(f"COALESCE_DIFFERENTIAL={profile!r}: use one of {sorted(PROFILES)}")
    examples, steps = PROFILES[profile][backend.name]
    if os.environ.get("COALESCE_DIFFERENTIAL_EXAMPLES"):
        examples = int(os.environ["COALESCE_DIFFERENTIAL_EXAMPLES"])
    # CI does not shrink: an example on a real file system costs seconds, shrinking one costs
    # hundreds of them, and the failing sequence is printed whole (note()) for replay()
    phases = [Phase.explicit, Phase.reuse, Phase.generate] if profile == "ci" else list(Phase)
    default = Settings.default
    assert default is not None  # hypothesis loads its "default" profile when imported
    return Settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        phases=phases,
        derandomize=profile == "ci",
        database=None if profile == "ci" else default.database,
        suppress_health_check=list(HealthCheck),
        print_blob=profile != "ci",
    )


def run(backend: Backend, urls: Any, group_config: Callable[..., Any]) -> None:
    started = time.monotonic()
    run_state_machine_as_test(
        differential_machine(backend, urls, group_config), settings=differential_settings(backend)
    )
    if os.environ.get("COALESCE_DIFFERENTIAL_TIMES"):
        with open(os.environ["COALESCE_DIFFERENTIAL_TIMES"], "a") as f:
            f.write(
                f"{backend.name} {os.environ.get('COALESCE_DIFFERENTIAL', 'ci')} {time.monotonic() - started:.1f}s\n"
            )


def replay(
    backend: Backend, urls: Any, group_config: Callable[..., Any], qtrees: int, steps: Sequence[Op]
) -> dict[str, Any]:
    """Run a logged sequence again with the same checks (a cycle is added when the log ends with
    operations); returns the counts of what happened."""
    d = Differential(backend, urls, group_config, qtrees)
    try:
        for op in steps:
            if not d.do(op):
                raise AssertionError(f"{op!r} was refused: the sequence no longer replays")
        if not steps or not isinstance(steps[-1], Cycle):
            d.do(CYCLE)
    finally:
        d.close()
    return d.stats


# ---------------------------------------------------------------------------
# regressions: sequences that once exported a wrong image (kept as tests)
# ---------------------------------------------------------------------------
def _tree(*ops: Op) -> tuple[Op, ...]:
    return (*ops, CYCLE)


#: name -> (qtrees, steps); the first cycle of each is the baseline.  The named scenarios of
#: tests/send_scenarios.py (fstests, M1-M6, hard links) are not repeated here.
REGRESSIONS: dict[str, tuple[int, tuple[Op, ...]]] = {
    "a hard link kept after qtree roots rotate and a cut transfer (long run 2026-12-07)": (
        4,
        (
            Symlink(path="q0/a", target="a"),
            Write(path="q0/b", offset=0, size=0, seed=502),
            Write(path="q1/p", offset=0, size=0, seed=0),
            Write(path="q1/s", offset=0, size=0, seed=186),
            Mkdir(path="q1/f"),
            Write(path="q2/.coalesce-mv.0", offset=0, size=0, seed=940),
            Mkdir(path="q2/a"),
            Write(path="q3/a", offset=0, size=0, seed=0),
            Cycle(fault=None),
            Cycle(fault=None),
            Rename(old="q3", new="_outside/qtree-tmp"),
            Rename(old="q2", new="q3"),
            Rename(old="_outside/qtree-tmp", new="q2"),
            Remove(path="q1/f"),
            Remove(path="q2/a"),
            Cycle(fault=None),
            Link(old="q1/p", new="q3/d"),
            Write(path="q0/b", offset=4096, size=100, seed=251),
            Cycle(fault=None),
            Link(old="q3/d", new="q2/a"),
            Write(path="q3/a/a", offset=0, size=1, seed=158),
            Cycle(fault=None),
            Cycle(fault=None),
            Rename(old="q0", new="_outside/qtree-tmp"),
            Rename(old="q2", new="q0"),
            Rename(old="_outside/qtree-tmp", new="q2"),
            Cycle(fault=None),
            Cycle(fault=("q3", 0)),
            Link(old="q1/p", new="q3/p"),
            Link(old="q3/a/a", new="_outside/sp ace"),
            Link(old="q2/b", new="q0/p"),
            Remove(path="q3/a/a"),
            Rename(old="q3", new="_outside/qtree-tmp"),
            Rename(old="q0", new="q3"),
            Rename(old="_outside/qtree-tmp", new="q0"),
            Remove(path="q2/b"),
            Link(old="q1/s", new="q2/d"),
            Cycle(fault=None),
            Rename(old="q2", new="_outside/qtree-tmp"),
            Rename(old="q0", new="q2"),
            Rename(old="_outside/qtree-tmp", new="q0"),
            Remove(path="_outside/sp ace"),
            Link(old="q2/p", new="q0/o257-7-0"),
            Write(path="q2/sp ace", offset=4096, size=4095, seed=137),
            Rename(old="q1", new="_outside/qtree-tmp"),
            Rename(old="q0", new="q1"),
            Rename(old="_outside/qtree-tmp", new="q0"),
            Rename(old="q2", new="_outside/qtree-tmp"),
            Rename(old="q1", new="q2"),
            Rename(old="_outside/qtree-tmp", new="q1"),
            Cycle(fault=("q1", 6)),
            Cycle(fault=None),
        ),
    ),
    "a removed directory's path passes a self-loop symlink in the newer image (long run, zfs-fuse)": (
        3,
        (
            *_tree(Mkdir("q0/a"), Mkdir("q0/a/s"), Write("q0/a/s/f", 0, 100, 1)),
            Rename("q0/a", "q0/b"),
            Symlink("q0/a", "a"),
            CYCLE,
        ),
    ),
    "a removed directory's path passes a symlink to a directory in the newer image": (
        3,
        (
            *_tree(Mkdir("q0/a"), Mkdir("q0/a/s"), Write("q0/a/s/f", 0, 100, 1)),
            Rename("q0/a", "q0/b"),
            Symlink("q0/a", "b"),
            CYCLE,
        ),
    ),
    "an entry's mtime after qtree roots rotate (long run 2026-12-07)": (
        5,
        (
            Mkdir(path="q1/sp ace"),
            Write(path="q1/sp ace/a", offset=0, size=70000, seed=300),
            Write(path="q4/sp ace", offset=0, size=300000, seed=1),
            Rename(old="q3", new="_outside/qtree-tmp"),
            Rename(old="q4", new="q3"),
            Rename(old="_outside/qtree-tmp", new="q4"),
            Rename(old="q1", new="_outside/qtree-tmp"),
            Rename(old="q2", new="q1"),
            Rename(old="_outside/qtree-tmp", new="q2"),
            Remove(path="q2/sp ace/a"),
            Mkdir(path="q2/sp ace/a"),
            Remove(path="q3/sp ace"),
            Mkdir(path="q3/sp ace"),
            Rename(old="q0", new="_outside/qtree-tmp"),
            Rename(old="q3", new="q0"),
            Rename(old="_outside/qtree-tmp", new="q3"),
            Cycle(fault=None),
            Rename(old="q2", new="_outside/qtree-tmp"),
            Rename(old="q0", new="q2"),
            Rename(old="_outside/qtree-tmp", new="q0"),
        ),
    ),
    "an export lists a qtree root's xattr after its reader met inodes without any (zfs-fuse views)": (
        6,
        (
            *_tree(
                Write("q0/a", 0, 0, 91),
                Write("q2/a", 0, 0, 251),
                Write("q2/o257-7-0", 0, 0, 609),
                Write("q3/a", 0, 0, 144),
                Mkdir("q4/b"),
                Write("q4/b/a", 0, 4096, 540),
                Write("q4/s", 0, 1, 780),
                Mkdir("q4/b/o257-7-0"),
                Write("q5/ü名", 0, 65536, 636),
                Write("q5/ü名", 0, 1, 389),
            ),
            SetXattr("q0", "user.long-name-of-an-xattr", b""),
            Rename("q4/b/a", "q4/parked-0"),
            Rename("q4/b/o257-7-0", "q4/parked-1"),
            Rmdir("q4/b"),
            Mkdir("q4/b"),
            Rename("q0", "_outside/qtree-tmp"),
            Rename("q2", "q0"),
            Rename("_outside/qtree-tmp", "q2"),
            Chown("q3/a", 0, 0),
            Cycle(fault=("q0", 6)),
        ),
    ),
    "a sparse file keeps its holes when qtree roots swap (zfs-fuse reads holes as zeros)": (
        3,
        (
            *_tree(Mkdir("q0/a")),
            Sparse("q0/a/s", 16 * MiB, ((8 * MiB, 4096, 61), (16 * MiB - 1, 4096, 477))),
            CYCLE,
            Rename("q1", "_outside/qtree-tmp"),
            Rename("q0", "q1"),
            Rename("_outside/qtree-tmp", "q0"),
            CYCLE,
        ),
    ),
    "a file emptied to a larger hole keeps the hole (zfs-fuse reads holes as zeros)": (
        3,
        (
            *_tree(Write("q0/f", 0, 300_000, 21), Write("q0/g", 0, 2 * MiB, 22)),
            Sparse("q0/f", 16 * MiB, ()),
            Sparse("q0/g", 2 * MiB, ((MiB + 4096, 100, 23),)),
            CYCLE,
        ),
    ),
    "a file hard-linked into another qtree, emptied to a hole through its first name": (
        3,
        (
            *_tree(Write("q0/f", 0, 300_000, 24)),
            Link("q0/f", "q1/g"),
            CYCLE,
            Sparse("q0/f", 16 * MiB, ()),
            CYCLE,
        ),
    ),
    "a sparse file extended by one byte keeps its holes": (
        3,
        (
            *_tree(Sparse("q0/c", 16 * MiB, ((8 * MiB, 70_000, 27), (5_592_405, 70_000, 28)))),
            Truncate("q0/c", 16 * MiB + 1),
            CYCLE,
        ),
    ),
    "an xattr with an empty value": (
        3,
        (
            *_tree(Write("q0/c", 0, 0, 25), Write("q1/d", 0, 100, 26)),
            SetXattr("q0/c", "user.long-name-of-an-xattr", b""),
            SetXattr("q1/d", "user.e", b""),
            CYCLE,
        ),
    ),
    "a parent moved under its old child": (
        3,
        (
            *_tree(Mkdir("q0/p"), Mkdir("q0/p/c"), Write("q0/p/c/f", 0, 100, 15), Write("q0/p/g", 0, 10, 16)),
            Rename("q0/p/c", "q0/c"),
            Rename("q0/p", "q0/c/p"),
            CYCLE,
        ),
    ),
    "rmdir and re-create with the same name, children moved back": (
        3,
        (
            *_tree(Mkdir("q0/d"), Mkdir("q0/d/e"), Write("q0/d/e/f", 0, 100, 17), Write("q0/d/g", 0, 10, 18)),
            Rename("q0/d/e", "q0/parked-0"),
            Rename("q0/d/g", "q0/parked-1"),
            Rmdir("q0/d"),
            Mkdir("q0/d"),
            Rename("q0/parked-0", "q0/d/e"),
            CYCLE,
        ),
    ),
    "file replaced by a directory and back": (
        3,
        (
            *_tree(Write("q0/x", 0, 5000, 19)),
            Remove("q0/x"),
            Mkdir("q0/x"),
            Write("q0/x/child", 0, 100, 20),
            CYCLE,
            Remove("q0/x"),
            Write("q0/x", 0, 70000, 21),
            CYCLE,
        ),
    ),
    "qtree roots swapped": (
        3,
        (
            *_tree(Write("q0/a", 0, 100, 22), Mkdir("q1/b"), Chmod("q1", 0o700)),
            Rename("q0", "_outside/t"),
            Rename("q1", "q0"),
            Rename("_outside/t", "q1"),
            CYCLE,
        ),
    ),
    "a transfer cut mid-way rolls back; the next cycle catches up across two PCPIs": (
        3,
        (
            *_tree(Mkdir("q0/d"), Write("q0/d/f", 0, 70000, 23), Link("q0/d/f", "q0/g")),
            Rename("q0/d", "q0/e"),
            Append("q0/g", 5000, 24),
            Mkdir("q0/d"),
            Rename("q0/e/f", "q0/d/f"),
            Cycle(fault=("q0", 3)),
            Rename("q0/d", "q1/d"),
            Truncate("q0/g", 100),
            CYCLE,
        ),
    ),
    "entries leave every qtree and come back": (
        3,
        (
            *_tree(Mkdir("q0/d"), Write("q0/d/f", 0, 5000, 25), Link("q0/d/f", "q1/h")),
            Rename("q0/d", "_outside/d"),
            Append("_outside/d/f", 10, 26),
            CYCLE,
            Rename("_outside/d", "q2/d"),
            CYCLE,
        ),
    ),
}


#: (backend, regression) -> why it still exports a wrong image: a known, open bug, replayed in CI as a
#: strict xfail (it fails the run the day it passes, so that the entry goes with the fix)
KNOWN_WRONG: dict[tuple[str, str], str] = {}


def regressions(backend: Backend) -> list[Any]:
    """The regression sequences ``backend`` can replay (by its declared capabilities), as pytest
    parameters; a known wrong image (:data:`KNOWN_WRONG`) is a strict xfail."""
    needs = {Exchange: "exchange", Clone: "reflink", PunchHole: "punch_hole"}
    out: list[Any] = []
    for name, (_n, steps) in REGRESSIONS.items():
        if not all(getattr(backend, needs[type(op)]) for op in steps if type(op) in needs):
            continue
        why = KNOWN_WRONG.get((backend.name, name))
        out.append(name if why is None else pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=why)))
    return out


def replay_regression(backend: Backend, name: str, urls: Any, group_config: Callable[..., Any]) -> None:
    qtrees, steps = REGRESSIONS[name]
    stats = replay(backend, urls, group_config, qtrees, steps)
    faults = sum(1 for op in steps if isinstance(op, Cycle) and op.fault)
    assert stats.get("faults fired", 0) == faults, f"{faults} injected faults, {stats.get('faults fired', 0)} fired"
