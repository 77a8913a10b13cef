"""The ``btrfs`` backend: a destination (or source) volume is a btrfs subvolume.

URL ``btrfs:///ABS/PATH/TO/SUBVOL``.  For a subvolume ``<P>/<name>``:

* qtrees are its top-level directories (names starting with ``.coalesce`` are
  reserved; the purgatory is ``<P>/<name>/.coalesce-purgatory/<qtree>/``);
* a PCPI is a read-only snapshot of the whole subvolume at
  ``<P>/.coalesce-snapshots/<name>/<pcpi>`` (outside the subvolume, so a
  snapshot never contains the others);
* the group's metadata lives in ``<P>/.coalesce/<name>/``;
* exports are ``<P>/.coalesce-exports/<name>/exports/<replica>`` (see
  coalesce_posix.exports), pointing into the snapshots;
* diff = ``btrfs send -p`` parsed and translated (coalesce_btrfs.translate),
  one stream per (base, target) shared by all qtrees (:class:`StreamCache`);
* rollback = native reflink copy of the qtree from the PCPI (``cp -a
  --reflink=always`` into a staging directory, then an atomic
  RENAME_EXCHANGE); ``COALESCE_BTRFS_ROLLBACK=generic`` selects the core's
  diff+apply rollback instead.

Environment knobs: ``COALESCE_BTRFS_SEND_DATA=1`` sends file data in the
stream (default: ``--no-data``, data are read from the target snapshot);
``COALESCE_BTRFS_SEND_PROTO`` (default: 2 when the kernel and btrfs-progs
support it, else 1).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Iterator

from coalesce_core import crashpoints
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.errors import BackendError, StreamError
from coalesce_core.stream.records import framed
from coalesce_posix import PosixVolume, check_qtree, durable, rmtree, walk
from coalesce_posix.libc import libc
from coalesce_posix.run import StreamingCommand, run, which

from . import sendstream
from .translate import StreamState

SCHEME = "btrfs"
BTRFS_HINT = "is btrfs-progs installed (apt-get install btrfs-progs) and are you root?"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,200}$")
SUBVOL_INO = 256  # the root directory of every btrfs subvolume has inode 256


def _btrfs() -> str:
    return which("btrfs", package="btrfs-progs")


def fs_type(path: str) -> str | None:
    """File-system type of the mount holding ``path`` (from /proc/self/mounts)."""
    path = os.path.realpath(path)
    best, typ = "", None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            mp = parts[1].replace("\\040", " ")
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, typ = mp, parts[2]
    return typ


def check_pcpi(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise BackendError(
            f"{name!r} is not a valid PCPI name for btrfs",
            hint="use letters, digits and ._@:+- (no '/', not starting with '.')",
        )
    return name


class StreamCache:
    """Parsed send streams keyed by (base, target): one ``btrfs send`` serves every qtree.

    Memory bound: a parsed stream keeps one small object per changed inode
    and per touched name (no file data: data are read from the target
    snapshot when records are emitted).  At most ``size`` streams are kept
    (LRU); a cycle needs one (base -> target) and a rollback another.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str, str, str], StreamState | _TreeCompare] = OrderedDict()
        self._key_locks: dict[tuple[str, str, str, str], threading.Lock] = {}
        self.sends = 0  # how many `btrfs send` ran (tests check the sharing)

    def get(self, key: tuple[str, str, str, str], produce) -> StreamState | _TreeCompare:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            klock = self._key_locks.setdefault(key, threading.Lock())
        with klock:
            with self._lock:
                if key in self._entries:
                    return self._entries[key]
            state = produce()
            with self._lock:
                self.sends += 1
                self._entries[key] = state
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            return state

    def forget(self, pcpi: str) -> None:
        with self._lock:
            for k in [k for k in self._entries if pcpi in k[:2]]:
                del self._entries[k]


def _send_proto() -> int:
    env = os.environ.get("COALESCE_BTRFS_SEND_PROTO")
    if env:
        return int(env)
    try:
        with open("/sys/fs/btrfs/features/send_stream_version") as f:
            kernel = int(f.read().strip() or 1)
    except (OSError, ValueError):
        kernel = 1
    if kernel < 2:
        return 1
    p = run([_btrfs(), "send", "--help"], check=False)
    return 2 if b"--proto" in p.stdout + p.stderr else 1


_PROTO: int | None = None


class BtrfsVolume(PosixVolume):
    scheme = SCHEME
    metadir: str  # set by __init__

    def __init__(self, url: Any, root: str) -> None:
        parent, name = os.path.split(root.rstrip("/"))
        self.parent, self.name = parent, name
        self.snapdir = os.path.join(parent, ".coalesce-snapshots", name)
        self.metadir = os.path.join(parent, ".coalesce", name)
        super().__init__(url, root, os.path.join(parent, ".coalesce-exports", name))
        self.streams = StreamCache()

    # -- opening --------------------------------------------------------------
    @classmethod
    def open(cls, url: Any, create: bool) -> "BtrfsVolume":
        loc = url.location
        if not loc.startswith("/"):
            raise BackendError(
                f"btrfs volume URL {url} must name an absolute path",
                hint="write btrfs:///mnt/pool/subvolume (three slashes)",
            )
        root = os.path.normpath(loc)
        parent = os.path.dirname(root)
        if not os.path.isdir(parent):
            raise BackendError(
                f"{parent} does not exist (parent of btrfs volume {url})",
                hint="mount the btrfs file system first, e.g. `python tools/realfs.py up`",
            )
        typ = fs_type(parent)
        if typ != "btrfs":
            raise BackendError(
                f"{parent} is on a {typ or 'unknown'} file system, not btrfs ({url})",
                hint="point the URL at a subvolume path on a mounted btrfs file system",
            )
        if not os.path.lexists(root):
            if not create:
                raise BackendError(
                    f"btrfs subvolume {root} does not exist",
                    hint=f"create it: btrfs subvolume create {root} (or open with create=True)",
                )
            run([_btrfs(), "subvolume", "create", root], hint=BTRFS_HINT)
        st = os.lstat(root)
        if not os.path.isdir(root) or os.path.islink(root) or st.st_ino != SUBVOL_INO:
            raise BackendError(
                f"{root} exists but is not a btrfs subvolume",
                hint=f"convert it: move its contents into a fresh `btrfs subvolume create {root}`",
            )
        vol = cls(url, root)
        os.makedirs(vol.snapdir, 0o700, exist_ok=True)
        os.makedirs(vol.metadir, 0o755, exist_ok=True)
        return vol

    def private_dirs(self) -> list[str]:
        return [*super().private_dirs(), self.snapdir]

    # -- PCPIs ------------------------------------------------------------------
    def snap_path(self, pcpi: str) -> str:
        return os.path.join(self.snapdir, check_pcpi(pcpi))

    def snapshot_create(self, name: str) -> str:
        path = self.snap_path(name)
        if self._is_snapshot(path):
            return name
        if os.path.lexists(path):
            raise BackendError(
                f"{path} exists but is not a snapshot subvolume",
                hint="remove the stray entry from the snapshot directory",
            )
        run(
            [_btrfs(), "subvolume", "snapshot", "-r", self.root, path],
            hint="is the file system full or read-only? " + BTRFS_HINT,
        )
        return name

    @staticmethod
    def _is_snapshot(path: str) -> bool:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        return os.path.isdir(path) and not os.path.islink(path) and st.st_ino == SUBVOL_INO

    def snapshot_delete(self, name: str) -> bool:
        path = self.snap_path(name)
        if not self._is_snapshot(path):
            return False
        self.streams.forget(name)
        run([_btrfs(), "subvolume", "delete", path], hint=BTRFS_HINT)
        return True

    def snapshot_list(self) -> list[str]:
        try:
            names = os.listdir(self.snapdir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _NAME.match(n) and self._is_snapshot(os.path.join(self.snapdir, n)))

    def _require(self, pcpi: str) -> str:
        path = self.snap_path(pcpi)
        if not self._is_snapshot(path):
            raise BackendError(
                f"PCPI {pcpi!r} does not exist on {self.url}",
                hint=f"existing PCPIs: {', '.join(self.snapshot_list()) or 'none'}",
            )
        return path

    @contextlib.contextmanager
    def image(self, snapshot: str | None) -> Iterator[str]:
        yield self.root if snapshot is None else self._require(snapshot)

    def export_image_path(self, replica: str, pcpi: str) -> str:
        return os.path.join(self.snap_path(pcpi), replica)

    def export_image_prefix(self) -> str:
        return self.snapdir

    def pcpi_path(self, pcpi: str, qtree: str) -> str | None:
        """A PCPI is a read-only snapshot subvolume: its qtree is a directory in it."""
        path = self.snap_path(pcpi)
        return os.path.join(path, qtree) if self._is_snapshot(path) else None

    # -- diff -----------------------------------------------------------------
    def _parse_send(self, base: str, target: str) -> StreamState | _TreeCompare:
        global _PROTO
        if _PROTO is None:
            _PROTO = _send_proto()
        argv = [_btrfs(), "-q", "send"]
        if os.environ.get("COALESCE_BTRFS_SEND_DATA", "") not in ("1", "yes", "true"):
            argv.append("--no-data")
        if _PROTO >= 2:
            argv += ["--proto", str(_PROTO)]
        argv += ["-p", self.snap_path(base), self.snap_path(target)]
        try:
            with StreamingCommand(argv, hint="the update fails and is retried; " + BTRFS_HINT) as send:
                self.last_send_pid = send.pid
                state = StreamState(sendstream.commands(send.stdout), self.snap_path(base), self.snap_path(target))
        except (StreamError, BackendError) as exc:
            if os.strerror(errno.ENAMETOOLONG) not in str(exc):
                raise
            # btrfs send builds every path whole and refuses one of PATH_MAX bytes or more, which
            # a deep tree has (docs/real-backends.md): compare the two PCPIs instead
            return _TreeCompare(self.snap_path(base), self.snap_path(target))
        return state

    def diff(self, qtree: str, base: str | None, target: str) -> Iterator[object]:
        check_qtree(qtree)
        tpath = self._require(target)
        if not os.path.isdir(os.path.join(tpath, qtree)) or os.path.islink(os.path.join(tpath, qtree)):
            raise BackendError(
                f"qtree {qtree!r} does not exist in PCPI {target!r} of {self.url}",
                hint=f"qtrees there: {', '.join(self.qtree_list(target)) or 'none'}",
            )
        if base is None:
            return framed(qtree, None, target, walk.baseline_records(os.path.join(tpath, qtree)))
        bpath = self._require(base)
        # keyed by the snapshots' UUIDs too: a PCPI deleted and re-taken under the same
        # name (by another handle or process) must not be served from a stale parse
        key = (base, target, self._uuid(bpath), self._uuid(tpath))
        # run the send now (errors surface at the call, not at the first next())
        state = self.streams.get(key, lambda: self._parse_send(base, target))
        return framed(qtree, base, target, state.records(qtree))

    @staticmethod
    def _uuid(path: str) -> str:
        out = run([_btrfs(), "subvolume", "show", path], hint=BTRFS_HINT).stdout.decode("utf-8", "replace")
        for line in out.splitlines():
            k, _, v = line.strip().partition(":")
            if k.strip() == "UUID":
                return v.strip()
        raise BackendError(f"`btrfs subvolume show {path}` printed no UUID", hint=BTRFS_HINT)

    # -- native rollback ------------------------------------------------------
    def rollback(self, qtree: str, rollback_pcpi: str, to_pcpi: str | None) -> bool | None:
        if os.environ.get("COALESCE_BTRFS_ROLLBACK", "native") == "generic":
            return None
        check_qtree(qtree)
        if to_pcpi is None:
            return self.remove_qtree(qtree)
        src = os.path.join(self._require(to_pcpi), qtree)
        if not os.path.isdir(src) or os.path.islink(src):
            return self.remove_qtree(qtree)
        purg = self.purgatory_dir(qtree)
        os.makedirs(purg, 0o700, exist_ok=True)
        stage = os.path.join(purg, f"rollback.{time.time_ns():x}")
        try:
            run(
                ["cp", "-a", "--reflink=always", "--no-target-directory", src, stage],
                hint="reflink copies need the staging directory on the same btrfs file system",
            )
        except BackendError as exc:
            if os.strerror(errno.ENAMETOOLONG) not in str(exc):
                raise
            rmtree(stage)  # cp names files by whole paths: a deep tree is left to
            return None  # the generic rollback (diff and apply), which walks by fds
        point = crashpoints.current()  # the agent's mid_rollback / mid_retry crash points
        if point is not None:
            crashpoints.hit(point)
        live = self.qtree_path(qtree)
        if os.path.lexists(live):
            _exchange(stage, live)  # atomic: readers of the live qtree see old or new
        else:
            os.rename(stage, live)
        durable.syncfs(self.root)  # before the agent records the rollback's success (hookspecs)
        if point is not None:
            crashpoints.hit(point)
        return True


class _TreeCompare:
    """Stands for the parsed stream of a PCPI pair that ``btrfs send`` refused (a path too long):
    every qtree's records come from the tree compare of the two PCPIs."""

    def __init__(self, base_root: str, target_root: str) -> None:
        self.base_root = base_root
        self.target_root = target_root

    def records(self, qtree: str) -> Iterator[object]:
        return walk.tree_diff(os.path.join(self.base_root, qtree), os.path.join(self.target_root, qtree))


def _exchange(a: str, b: str) -> None:
    """renameat2(RENAME_EXCHANGE): swap two paths atomically."""
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = libc().renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc != 0:
        e = ctypes.get_errno()
        if e in (errno.ENOSYS, errno.EINVAL):
            tmp = b + ".coalesce-old"
            os.rename(b, tmp)
            os.rename(a, b)
            os.rename(tmp, a)
            return
        raise OSError(e, os.strerror(e), a)


# ---------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------
@hookimpl
def coalesce_backend_info():
    return {
        "scheme": SCHEME,
        "description": "btrfs: a subvolume; PCPIs are read-only snapshots; diff parses `btrfs send -p`",
    }


@hookimpl
def coalesce_open_volume(url, create):
    if getattr(url, "scheme", None) != SCHEME:
        return None
    return BtrfsVolume.open(url, create)
