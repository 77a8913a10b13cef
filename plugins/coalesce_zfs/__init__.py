"""The ``zfs`` backend: a volume is a ZFS dataset (OpenZFS or zfs-fuse).

URL ``zfs://POOL/DATASET`` (``zfs://POOL`` for the pool's root dataset).

* qtrees are the top-level directories of the dataset's mountpoint
  (``zfs get mountpoint``); the purgatory is ``<mountpoint>/.coalesce-purgatory/<qtree>``;
* a PCPI is the snapshot ``DATASET@<pcpi>`` (``zfs snapshot``, ``zfs destroy``,
  listed with ``zfs list -t snapshot``: only direct snapshots of the dataset);
* per-volume state lives OUTSIDE the dataset, in
  ``$COALESCE_ZFS_STATE_DIR/<pool>/<dataset path with '/' as '%'>/`` (default
  ``/var/lib/coalesce/zfs``): ``meta/`` is the metadata dir, ``exports/`` the
  export table (coalesce_posix.exports), ``views/<pcpi>`` and ``tmp/`` the
  mountpoints of read-only clones;
* reading a PCPI: OpenZFS serves ``<mountpoint>/.zfs/snapshot/<pcpi>``
  directly; zfs-fuse has no browsable ``.zfs``, so the PCPI is cloned
  (``zfs clone -o readonly=off -o atime=off -o mountpoint=...``: never written;
  not read-only, because zfs-fuse loses the xattr listings of a read-only
  clone, see ``_clone``) under the name ``<pool>/czclone-<flat dataset>-<tag>``
  and the clone is destroyed after use (always, also on error); an exported
  PCPI keeps one such clone (``x-`` tag, mounted under ``views/.rw/``) while it
  is exported, shown to its readers through a read-only bind mount at
  ``views/<pcpi>`` (coalesce's own reads never use it);
* diff: the tree compare of coalesce_posix.walk between the two images
  (inode numbers, sizes, mtimes and ctimes equal means unchanged, as both are
  images of one dataset); on OpenZFS the walk is pruned to the directories
  that ``zfs diff -H`` names, so its cost follows the change; coalesce_zfs.identity
  keeps objects apart where the walk goes by path (pruning, hard links, times).  On zfs-fuse
  the data of the changed files come from ``zfs send -i`` (coalesce_zfs.senddata:
  every read of a clone is a FUSE round trip to the daemon, and the stream
  names the changed blocks, so no base copy is read; one stream's block map
  serves the diffs of the dataset's other qtrees between the same PCPIs);
  ``COALESCE_ZFS_DIFF=walk`` reads them from the images instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import itertools
import logging
import os
import queue
import re
import threading
import time
from typing import Any, Iterator

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.errors import BackendError
from coalesce_core.stream.records import framed
from coalesce_posix import PosixVolume, check_qtree, walk
from coalesce_posix.run import command_error, run, which

from . import identity
from .senddata import BlockMaps, SendData

SCHEME = "zfs"
_log = logging.getLogger("coalesce.zfs")
ZFS_HINT = "is ZFS running (zfs-fuse daemon or the OpenZFS module) and are you root?"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,120}$")
_DS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")
STATE_ROOT = "/var/lib/coalesce/zfs"


def _zfs() -> str:
    return which("zfs", package="zfs-fuse (or zfsutils-linux for OpenZFS)")


_CMD_LOCK = threading.RLock()
_DEPTH = threading.local()


@contextlib.contextmanager
def _serialized() -> Iterator[None]:
    """One zfs command at a time: zfs-fuse wedges (create/clone hang forever) when
    clones are created, mounted and destroyed concurrently.  A re-entrant thread
    lock within the process plus an flock across processes sharing the state
    directory (taken once per thread: a nested command, e.g. a clone destroyed
    by a generator finalized during another command, must not flock again)."""
    with _CMD_LOCK:
        depth = getattr(_DEPTH, "n", 0)
        _DEPTH.n = depth + 1
        fd = None
        try:
            if depth == 0:
                root = os.environ.get("COALESCE_ZFS_STATE_DIR", STATE_ROOT)
                os.makedirs(root, 0o755, exist_ok=True)
                fd = os.open(os.path.join(root, ".zfs-commands.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            _DEPTH.n = depth
            if fd is not None:
                os.close(fd)


# A diff generator abandoned by a failed or crashed reader is finalized by the cycle collector, at
# any allocation, in any thread, possibly in the middle of a zfs command. Its read clone must not be
# destroyed there: the collector has not yet closed the other files of that garbage (the clone is
# "busy"), and the destroy's retries held the collector, and every zfs command, for seconds; zfs-fuse
# then wedged. Such clones are queued (SimpleQueue.put is re-entrant) and destroyed by the next
# reader of a PCPI, PCPI delete or volume open, outside the collector.
_COLLECTING = [False]
_DEFERRED: "queue.SimpleQueue[tuple[str, str]]" = queue.SimpleQueue()


def _gc_phase(phase: str, info: dict) -> None:
    _COLLECTING[0] = phase == "start"


gc.callbacks.append(_gc_phase)


def _umount() -> str:
    return which("umount", package="mount")


def _bind_read_only(source: str, target: str) -> None:
    """Show directory ``source`` at ``target`` through a read-only bind mount."""
    mount = which("mount", package="mount")
    run([mount, "--bind", source, target], hint="bind-mounting an export's image")
    p = run([mount, "-o", "remount,bind,ro", target], check=False)
    if p.returncode != 0:
        run([_umount(), target], check=False)
        raise command_error(
            [mount, "-o", "remount,bind,ro", target], p.returncode, p.stderr, hint="the export's image stays unexported"
        )


def zfs(*args: str, hint: str = ZFS_HINT, check: bool = True):
    with _serialized():
        return run([_zfs(), *args], hint=hint, check=check, timeout=300)


def zfs_out(*args: str) -> str:
    return zfs(*args).stdout.decode("utf-8", "surrogateescape")


def check_pcpi(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise BackendError(
            f"{name!r} is not a valid PCPI name for ZFS", hint="use letters, digits and ._:- (no '/' or '@')"
        )
    return name


_HAS_DIFF: bool | None = None


def has_zfs_diff() -> bool:
    global _HAS_DIFF
    if _HAS_DIFF is None:
        p = zfs("diff", check=False)
        text = (p.stdout + p.stderr).decode("utf-8", "replace")
        _HAS_DIFF = "unrecognized command" not in text
    return _HAS_DIFF


def parse_zfs_diff(text: str, mountpoint: str) -> set[str] | None:
    """Paths (relative to the dataset) that ``zfs diff -H`` output names, or None if unparsable.

    Lines are ``<change>\\t<path>`` or ``R\\t<old>\\t<new>``; special characters
    in paths are escaped as ``\\NNN`` (octal).
    """
    out: set[str] = set()
    pre = mountpoint.rstrip("/") + "/"

    def unescape(p: str) -> str:
        return os.fsdecode(re.sub(rb"\\([0-7]{3,4})", lambda m: bytes([int(m.group(1), 8) & 0xFF]), os.fsencode(p)))

    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("\t")
        if parts[0] not in ("-", "+", "M", "R") or len(parts) < 2:
            return None
        for p in parts[1:]:
            p = unescape(p)
            if p.rstrip("/") == mountpoint.rstrip("/"):
                continue
            if not p.startswith(pre):
                return None
            out.add(p[len(pre) :])
    return out


class ZfsVolume(PosixVolume):
    scheme = SCHEME
    _seq = itertools.count()
    _lock = threading.RLock()  # re-entrant: see _image
    _views: dict = {}  # (dataset, pcpi) -> shared temporary clone (zfs-fuse)
    _block_maps = BlockMaps()  # what each `zfs send -i` read to its end wrote, for the other qtrees' diffs
    metadir: str  # set by __init__

    def __init__(self, url: Any, dataset: str, mountpoint: str) -> None:
        self.dataset = dataset
        self.pool = dataset.split("/", 1)[0]
        flat = dataset.replace("/", "%")
        root = os.environ.get("COALESCE_ZFS_STATE_DIR", STATE_ROOT)
        self.state = os.path.join(root, self.pool, flat)
        self.metadir = os.path.join(self.state, "meta")
        self.viewdir = os.path.join(self.state, "views")
        self.tmpdir = os.path.join(self.state, "tmp")
        self.clone_prefix = f"{self.pool}/czclone-{flat.replace('%', '-')}-"
        self.last_send_data: SendData | None = None  # the last diff's, for tests and benchmarks
        super().__init__(url, mountpoint, os.path.join(self.state, "exports"))

    # -- opening --------------------------------------------------------------
    @classmethod
    def open(cls, url: Any, create: bool) -> "ZfsVolume":
        ds = url.location.strip("/")
        if not ds or not _DS.match(ds) or "//" in ds or "@" in ds:
            raise BackendError(f"{url} does not name a ZFS dataset", hint="write zfs://pool/dataset")
        p = zfs("list", "-H", "-o", "name", ds, check=False)
        if p.returncode != 0:
            err = p.stderr.decode("utf-8", "replace").strip()
            if "does not exist" not in err:
                raise BackendError(f"`zfs list {ds}` failed: {err}", hint=ZFS_HINT)
            if not create:
                raise BackendError(
                    f"ZFS dataset {ds} does not exist", hint=f"create it: zfs create {ds} (or open with create=True)"
                )
            zfs("create", "-p", ds, hint="does the pool exist and have space? " + ZFS_HINT)
        mp = zfs_out("get", "-H", "-o", "value", "mountpoint", ds).strip()
        if not mp.startswith("/"):
            raise BackendError(
                f"ZFS dataset {ds} has mountpoint {mp!r}", hint=f"give it a path: zfs set mountpoint=/srv/{ds} {ds}"
            )
        if zfs_out("get", "-H", "-o", "value", "mounted", ds).strip() != "yes":
            zfs("mount", ds, hint=f"mount the dataset: zfs mount {ds}")
        vol = cls(url, ds, mp)
        for d in (vol.metadir, vol.viewdir, vol.tmpdir):
            os.makedirs(d, 0o755, exist_ok=True)
        vol._reap_stale_clones()
        return vol

    def private_dirs(self) -> list[str]:
        # the state directory holds the export table and the clones' mount points (views)
        return [*super().private_dirs(), self.state]

    def browsable(self) -> bool:
        return os.path.isdir(os.path.join(self.root, ".zfs", "snapshot"))

    # -- PCPIs ----------------------------------------------------------------
    def snapshot_list(self) -> list[str]:
        out = zfs_out("list", "-H", "-t", "snapshot", "-o", "name", "-r", self.dataset)
        pre = self.dataset + "@"
        return sorted(line[len(pre) :] for line in out.splitlines() if line.startswith(pre))

    def snapshot_create(self, name: str) -> str:
        check_pcpi(name)
        # create first, list only when that failed: one zfs command instead of two (each is a
        # process and a round trip to the daemon); an existing snapshot of that name is success
        p = zfs("snapshot", f"{self.dataset}@{name}", check=False)
        if p.returncode != 0 and name not in self.snapshot_list():
            raise command_error(
                [_zfs(), "snapshot", f"{self.dataset}@{name}"],
                p.returncode,
                p.stderr,
                hint="is the pool full? " + ZFS_HINT,
            )
        return name

    def snapshot_delete(self, name: str) -> bool:
        check_pcpi(name)
        self._reap_deferred()
        if name not in self.snapshot_list():
            return False
        for clone in self._clones_of(name):
            if clone == f"{self.clone_prefix}x-{name}":
                self._unview(name, force=True)
            self._destroy(clone, force=True)
        self._destroy(f"{self.dataset}@{name}", force=False)
        return True

    def _require(self, *pcpis: str) -> None:
        """Every PCPI of ``pcpis`` exists (one `zfs list`), else BackendError naming the first missing."""
        for pcpi in pcpis:
            check_pcpi(pcpi)
        held = self.snapshot_list()
        for pcpi in pcpis:
            if pcpi not in held:
                raise BackendError(
                    f"PCPI {pcpi!r} does not exist on {self.url}",
                    hint=f"existing PCPIs: {', '.join(held) or 'none'}",
                )

    # -- clones ---------------------------------------------------------------
    def _clones_of(self, pcpi: str) -> list[str]:
        out = zfs_out("list", "-H", "-o", "name,origin", "-t", "filesystem", "-r", self.pool)
        origin = f"{self.dataset}@{pcpi}"
        return [
            line.split("\t")[0]
            for line in out.splitlines()
            if line.split("\t")[-1] == origin and line.startswith(self.clone_prefix)
        ]

    def _all_clones(self) -> list[str]:
        out = zfs_out("list", "-H", "-o", "name", "-t", "filesystem", "-r", self.pool)
        return [n for n in out.split("\n") if n.startswith(self.clone_prefix)]

    def _reap_deferred(self) -> None:
        """Destroy the read clones whose last reader was finalized by the cycle collector."""
        if _COLLECTING[0]:
            return
        while True:
            try:
                name, mp = _DEFERRED.get_nowait()
            except queue.Empty:
                return
            try:
                self._destroy(name, force=True)
            except BackendError as exc:
                _log.warning("leaving read clone %s for later: %s", name, exc)
            with contextlib.suppress(OSError):
                os.rmdir(mp)

    def _reap_stale_clones(self) -> None:
        """Destroy temporary clones left by a process that died (tag t<pid>x<n>)."""
        self._reap_deferred()
        for name in self._all_clones():
            m = re.match(r"t(\d+)x\d+-", name[len(self.clone_prefix) :])
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                self._destroy(name, force=True)

    def _destroy(self, name: str, *, force: bool, tries: int = 8) -> bool:
        last = None
        if "@" not in name:
            # zfs-fuse reports a clone whose files were just read "busy" to a destroy that unmounts it
            # itself, but not to a destroy after an explicit unmount (docs/real-backends.md, zfs-fuse quirks)
            zfs("unmount", name, check=False)
        for i in range(tries):
            p = zfs("destroy", name, check=False)
            if p.returncode == 0:
                return True
            err = p.stderr.decode("utf-8", "replace")
            if "does not exist" in err or "could not find" in err:
                return False
            last = err
            time.sleep(0.1 * (i + 1))
        if force:
            # a reader that died (an exception or a simulated crash) may still hold files of the clone
            # open from a diff generator that only the cycle collector will close: collect first
            gc.collect()
            # zfs-fuse can hold a clone "busy" for seconds after its last file closed: unmount it
            # by force, then destroy it by force, with a growing pause (about 5 s in all)
            for i in range(4):
                zfs("unmount", "-f", name, check=False)
                p = zfs("destroy", "-f", name, check=False)
                if p.returncode == 0:
                    return True
                last = p.stderr.decode("utf-8", "replace")
                if "does not exist" in last or "could not find" in last:
                    return False
                time.sleep(0.5 * (i + 1))
        raise BackendError(
            f"`zfs destroy {name}` failed: {last.strip() if last else '?'}",
            hint="a process may hold files open in it (fuser -m); " + ZFS_HINT,
        )

    def _clone(self, pcpi: str, name: str, mountpoint: str, *, readonly: bool) -> str:
        """Clone PCPI ``pcpi`` as ``name`` mounted at ``mountpoint``.  ``readonly=False`` is for
        coalesce's own reads (never written, atime off): on a read-only clone zfs-fuse fails to
        list the xattrs of an inode that has none (it cannot make its xattr directory), and from
        then on every listing on that mount fails, so the xattrs of the files read after it would
        be lost from the change stream (docs/real-backends.md).  Exports are shown through
        read-only bind mounts of such clones (:meth:`prepare_export`)."""
        os.makedirs(mountpoint, 0o755, exist_ok=True)
        zfs(
            "clone",
            "-o",
            "readonly=on" if readonly else "readonly=off",
            "-o",
            "atime=off",
            "-o",
            f"mountpoint={mountpoint}",
            f"{self.dataset}@{pcpi}",
            name,
            hint="cloning a PCPI to read it (zfs-fuse has no .zfs/snapshot); " + ZFS_HINT,
        )
        if zfs_out("get", "-H", "-o", "value", "mounted", name).strip() != "yes":
            zfs("mount", name)
        return mountpoint

    def _reading(self, snapshot: str) -> bool:
        """A read clone of ``snapshot`` is live, so the PCPI exists: zfs destroys no snapshot that has
        clones.  Spares a `zfs list` per describe during a transfer (every zfs command is serialized)."""
        with self._lock:
            entry = self._views.get((self.dataset, snapshot))
            return entry is not None and entry["ready"].is_set() and entry["error"] is None

    def image(self, snapshot: str | None) -> contextlib.AbstractContextManager[str]:
        return self._image(snapshot, checked=False)

    @contextlib.contextmanager
    def _image(self, snapshot: str | None, checked: bool) -> Iterator[str]:
        """``checked``: the caller has just run :meth:`_require` (a `zfs list`) for ``snapshot``."""
        if snapshot is None:
            yield self.root
            return
        if not checked and not self._reading(snapshot):
            self._require(snapshot)
        self._reap_deferred()
        if self.browsable():
            yield os.path.join(self.root, ".zfs", "snapshot", snapshot)
            return
        # never through an export clone (read-only: see _clone): coalesce's reads get their own
        key = (self.dataset, snapshot)
        # Every object is made before the lock is taken: an allocation can start the cycle
        # collector, which may finalize a diff generator someone abandoned, whose cleanup (this
        # method's `finally`) takes the lock too; under a plain Lock that deadlocked the thread.
        tag = f"t{os.getpid()}x{next(self._seq)}"
        fresh = {
            "name": f"{self.clone_prefix}{tag}-{snapshot}",
            "mp": os.path.join(self.tmpdir, tag),
            "refs": 0,
            "ready": threading.Event(),
            "error": None,
        }
        with self._lock:
            entry = self._views.setdefault(key, fresh)
            creator = entry is fresh
            entry["refs"] += 1
        try:
            if creator:
                try:
                    self._clone(snapshot, entry["name"], entry["mp"], readonly=False)
                except BaseException as exc:
                    entry["error"] = exc
                    raise
                finally:
                    entry["ready"].set()
            else:
                entry["ready"].wait()
                if entry["error"] is not None:
                    raise BackendError(f"cloning PCPI {snapshot!r} to read it failed: {entry['error']}")
            yield entry["mp"]
        finally:
            with self._lock:
                entry["refs"] -= 1
                last = entry["refs"] == 0
                if last:
                    del self._views[key]
            if last and _COLLECTING[0]:
                _DEFERRED.put((entry["name"], entry["mp"]))
            elif last:
                # one read clone serves every concurrent reader of a PCPI; the last one destroys it.
                # zfs-fuse can report "busy" for a while after the last file was closed: a read clone
                # that will not go now must not fail the read; snapshot_delete destroys the clones of
                # a PCPI before the PCPI itself, so a leftover one is removed with its PCPI.
                self._reap_deferred()
                try:
                    self._destroy(entry["name"], force=True)
                except BackendError as exc:
                    _log.warning("leaving read clone %s for later: %s", entry["name"], exc)
                try:
                    os.rmdir(entry["mp"])
                except OSError:
                    pass

    # -- exports ----------------------------------------------------------------
    def export_image_prefix(self) -> str:
        return os.path.join(self.root, ".zfs", "snapshot") if self.browsable() else self.viewdir

    def export_image_path(self, replica: str, pcpi: str) -> str:
        return os.path.join(self.export_image_prefix(), check_pcpi(pcpi), replica)

    def pcpi_path(self, pcpi: str, qtree: str) -> str | None:
        """OpenZFS serves a snapshot at ``.zfs/snapshot/<pcpi>``; zfs-fuse has none without a clone
        (None: docs/operations.md says how to read one)."""
        if not self.browsable():
            return None
        path = os.path.join(self.root, ".zfs", "snapshot", check_pcpi(pcpi))
        return os.path.join(path, qtree) if os.path.isdir(path) else None

    def prepare_export(self, pcpis: set[str]) -> None:
        """Make each exported PCPI's image a read-only path under ``views/`` (zfs-fuse).

        The image is a clone that is *not* read-only (readonly=off, atime off, never written),
        mounted under ``views/.rw/`` and shown at ``views/<pcpi>`` through a read-only bind
        mount: on a read-only clone zfs-fuse stops listing xattrs once a reader asked about an
        inode without any (see :meth:`_clone`), so readers of an export would lose them; the bind
        mount refuses every write in the kernel (EROFS) before zfs-fuse sees it."""
        if self.browsable():
            return
        for pcpi in sorted(pcpis):
            self._require(pcpi)
            view = os.path.join(self.viewdir, pcpi)
            if os.path.ismount(view):
                continue
            under = os.path.join(self.viewdir, ".rw", pcpi)
            if not os.path.ismount(under):
                self._clone(pcpi, f"{self.clone_prefix}x-{pcpi}", under, readonly=False)
            os.makedirs(view, 0o755, exist_ok=True)
            _bind_read_only(under, view)

    def _unview(self, pcpi: str, *, force: bool) -> bool:
        """Unmount the read-only view of ``pcpi``'s export clone; False while a reader keeps it busy
        (``force``: detach it lazily instead, for a PCPI being deleted)."""
        view = os.path.join(self.viewdir, pcpi)
        if not os.path.ismount(view):
            return True
        if run([_umount(), view], check=False).returncode == 0:
            return True
        if force:
            run([_umount(), "-l", view], check=False)
            return not os.path.ismount(view)
        return False

    def after_export(self, pcpis: set[str]) -> None:
        """Release export clones of PCPIs no longer exported (busy ones are kept for their readers)."""
        if self.browsable():
            return
        for name in self._all_clones():
            tail = name[len(self.clone_prefix) :]
            if tail.startswith("x-") and tail[2:] not in pcpis:
                if not self._unview(tail[2:], force=False):
                    continue  # a reader holds it: retried at the next switch
                try:
                    self._destroy(name, force=False, tries=2)
                except BackendError:
                    pass
                for d in (os.path.join(self.viewdir, tail[2:]), os.path.join(self.viewdir, ".rw", tail[2:])):
                    try:
                        os.rmdir(d)
                    except OSError:
                        pass

    # -- diff -----------------------------------------------------------------
    def diff(self, qtree: str, base: str | None, target: str) -> Iterator[object]:
        check_qtree(qtree)
        self._require(target, *([base] if base is not None else []))
        return self._diff_gen(qtree, base, target)

    def _props(self, pcpis: tuple[str, ...], *names: str) -> dict[str, dict[str, int]]:
        """Numeric properties of PCPIs, in one ``zfs get``: {pcpi: {property: value}}."""
        out: dict[str, dict[str, int]] = {p: {} for p in pcpis}
        text = zfs_out(
            "get", "-Hp", "-o", "name,property,value", ",".join(names), *(f"{self.dataset}@{p}" for p in pcpis)
        )
        for line in text.splitlines():
            name, prop, value = line.split("\t")
            out[name.split("@", 1)[1]][prop] = int(value)
        return out

    def _diff_gen(self, qtree: str, base: str | None, target: str) -> Iterator[object]:
        with contextlib.ExitStack() as stack:
            troot = stack.enter_context(self._image(target, checked=True))
            tq = os.path.join(troot, qtree)
            if not os.path.isdir(tq) or os.path.islink(tq):
                raise BackendError(
                    f"qtree {qtree!r} does not exist in PCPI {target!r} of {self.url}",
                    hint="diff only qtrees that qtree_list(target) shows",
                )
            if base is None:
                yield from framed(qtree, None, target, walk.baseline_records(tq))
                return
            broot = stack.enter_context(self._image(base, checked=True))
            changed = self._zfs_diff(base, target)
            prune = None if changed is None else identity.prune_for(changed, qtree, broot, troot)
            props = self._props((base, target), "creation", "createtxg", "guid")
            created = props[base]["creation"]
            bq = os.path.join(broot, qtree)
            data = walk.READ
            # `zfs send -i` goes forward only: a rollback diffs a later PCPI back to an earlier one
            if (
                not self.browsable()
                and props[base]["createtxg"] < props[target]["createtxg"]
                and os.environ.get("COALESCE_ZFS_DIFF", "send") != "walk"
            ):
                data = self.last_send_data = SendData(
                    [_zfs(), "send", "-i", f"{self.dataset}@{base}", f"{self.dataset}@{target}"],
                    f"{self.dataset}@{target}",
                    bq,
                    tq,
                    maps=self._block_maps,
                    key=(self.dataset, props[base]["guid"], props[target]["guid"]),
                    base_txg=props[base]["createtxg"],
                )
            records = walk.tree_diff(
                bq,
                tq,
                prune=prune,
                quick_before_ns=created * 1_000_000_000,
                # zfs-fuse leaves the ctime as it was when an xattr is set or removed
                xattrs_move_ctime=self.browsable(),
                data=data,
            )
            yield from framed(qtree, base, target, records)

    def _zfs_diff(self, base: str, target: str) -> set[str] | None:
        """The dataset-relative paths ``zfs diff -H`` names between two PCPIs; None where there is no
        ``zfs diff`` (zfs-fuse) or it failed or printed what :func:`parse_zfs_diff` cannot read."""
        if not (self.browsable() and has_zfs_diff()):
            return None
        p = zfs("diff", "-H", f"{self.dataset}@{base}", f"{self.dataset}@{target}", check=False)
        if p.returncode != 0:
            return None
        return parse_zfs_diff(p.stdout.decode("utf-8", "surrogateescape"), self.root)


# ---------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------
@hookimpl
def coalesce_backend_info():
    return {"scheme": SCHEME, "description": "ZFS (OpenZFS or zfs-fuse): a dataset; PCPIs are dataset snapshots"}


@hookimpl
def coalesce_open_volume(url, create):
    if getattr(url, "scheme", None) != SCHEME:
        return None
    return ZfsVolume.open(url, create)
