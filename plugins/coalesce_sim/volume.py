"""``SimVolume``: the sim backend's volume handle, and the registry of open volumes.

:class:`SimVolume` is the :class:`~.fs.SimFS` engine (RAID-4 device, block map, CPs, PCPIs)
with one method per primitive hook, which the core's default hooks call
(coalesce_core.backend.handles); the methods forward to :mod:`.ops`, :mod:`.diff` and
:mod:`.describe` and check first that the volume is still usable (:meth:`SimFS.check`).
:func:`open_sim` opens (or creates) the volume of a ``sim:///ABS/DIR`` location, one shared
handle per directory and process, and counts its openers; :func:`close_sim` (the handle's
``close``) unmounts it when the last one closes.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import parse_qs

from coalesce_core.backend.handles import VolumeHandle
from coalesce_core.errors import BackendError

from . import diff as _diff
from . import ops as _ops
from .fs import MAX_PCPIS, SimFS

_T = TypeVar("_T")


class SimVolume(SimFS, VolumeHandle):
    """One open sim volume (the backend's volume handle): the engine plus the primitives.

    No capability: ``diff`` yields records that the agent runs through the codec, and is never
    asked to skip (``records_decoded`` and ``resumable_diff`` stay False).  Every primitive but
    ``close`` and ``export_path`` begins with :meth:`SimFS.check`, so a closed or crashed
    handle refuses work with a hint to reopen it.  The native rollback is
    :meth:`native_rollback`, which the backend's ``coalesce_rollback`` hook calls.  A volume
    holds at most ``max_pcpis`` PCPIs (255, as WAFL).  ``describe`` reads only the byte
    ranges asked (``describes_ranges``)."""

    max_pcpis = MAX_PCPIS
    describes_ranges = True

    def __repr__(self) -> str:
        return f"SimVolume(sim://{self.path})"

    def close(self) -> None:
        """One opener fewer; the last one unmounts the volume (:func:`close_sim`).  Idempotent."""
        close_sim(self)

    def metadata_dir(self) -> str:
        self.check()
        d = os.path.join(self.path, ".coalesce")
        os.makedirs(d, exist_ok=True)
        return d

    # ---------------------------------------------------------------- PCPIs
    def snapshot_create(self, name: str) -> str:
        self.check()
        return super().snapshot_create(name)

    def snapshot_delete(self, name: str) -> bool:
        self.check()
        return super().snapshot_delete(name)

    def snapshot_list(self) -> list[str]:
        self.check()
        return self.pcpi_names()

    def qtree_list(self, snapshot: str | None) -> list[str]:
        self.check()
        with self.lock:
            return self.view(snapshot).qtrees()

    # ---------------------------------------------------------------- changes
    def diff(self, qtree: str, base: str | None, target: str) -> Iterator[object]:
        self.check()
        with self.lock:
            return _diff.diff_stream(self, qtree, base, target)

    def _mutate(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run one primitive on the overlay, then return only once its changes are on disk (also
        when it fails part-way: the partial state stays, as the hookspec asks).

        Group commit: the CP is shared with the primitives that other threads run meanwhile
        (:meth:`SimFS.wait_durable`), so N concurrent applies cost fewer than N CPs; each still
        returns only after a CP covering its changes is complete."""
        with self.lock:
            self.check()
            failures = self.cp_failures
            try:
                result = fn(self, *args)
            except BaseException as exc:
                err: BaseException | None = exc
            else:
                err = None
            need = self.durable_target()
        if err is not None and self.broken is not None:
            raise err  # the volume died under the primitive (a crash, a power cut): nothing to wait for
        try:
            self.wait_durable(need, failures)  # also when the volume died: success only if the CP is on disk
        except BaseException as exc:
            if err is not None:
                raise exc from err
            raise
        if err is not None:
            raise err
        return result

    def apply(self, qtree: str, records: Iterable[Any], use_purgatory: bool) -> dict[str, int]:
        self.check()
        return self._mutate(_ops.apply_stream, qtree, records, use_purgatory)

    def native_rollback(self, qtree: str, rollback_pcpi: str, to_pcpi: str | None) -> bool | None:
        """Native rollback: point the qtree's inodes at ``to_pcpi``'s blocks (one CP).  None (the
        core's generic rollback runs) when ``COALESCE_SIM_NATIVE_ROLLBACK=0``.  Served by the
        backend's own ``coalesce_rollback`` hook, not by the core's default one (see there)."""
        self.check()
        if os.environ.get("COALESCE_SIM_NATIVE_ROLLBACK", "1") in ("0", "no", "false"):
            return None

        def rollback(fs: SimFS, q: str, to: str | None) -> None:
            fs.view(rollback_pcpi)  # must exist (contract); the native path does not need its contents
            _ops.native_rollback(fs, q, to)

        self._mutate(rollback, qtree, to_pcpi)  # returns once the rollback's CP is on disk (hookspec)
        return True

    def purge_purgatory(self, qtrees: list[str]) -> bool:
        self.check()
        self._mutate(lambda f, qs: [_ops.purge_purgatory(f, q) for q in qs], list(qtrees))
        return True

    def remove_qtree(self, qtree: str) -> bool:
        self.check()
        self._mutate(_ops.remove_qtree, qtree)
        return True

    # ---------------------------------------------------------------- exports and checks
    def export(self, mapping: Mapping[str, str | None]) -> bool:
        self.check()
        self.set_exports(dict(mapping))
        return True

    def exported(self) -> dict[str, str | None]:
        self.check()
        return self.exports()

    def export_path(self, replica: str) -> None:
        """The sim volume is not mounted anywhere: exported images have no file-system path."""
        return None

    def fingerprint(self, qtree: str, snapshot: str | None) -> str:
        self.check()
        with self.lock:
            return _diff.fingerprint(self, qtree, snapshot)

    def describe(
        self,
        qtree: str,
        snapshot: str | None,
        paths: Sequence[tuple[str, bool]],
        ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    ) -> list[Any]:
        self.check()
        from .describe import describe

        with self.lock:
            return describe(self, qtree, snapshot, paths, ranges)

    def describe_tree(self, qtree: str, snapshot: str | None, content: bool) -> Iterator[Any]:
        """The generic walk, a directory at a time, each batch under the volume's lock."""
        self.check()
        from coalesce_core.verify import generic_tree

        return generic_tree(lambda batch: self.describe(qtree, snapshot, batch), content)

    def describe_holds(self) -> Any:
        self.check()
        from .describe import HOLDS

        return HOLDS


_OPEN: dict[str, SimVolume] = {}
_OPEN_LOCK = threading.Lock()

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in _SIZE_UNITS else ""
    num = t[:-1] if unit else t
    if not num.isdigit():
        raise BackendError(f"bad size {text!r}", hint="write e.g. size=64M or size=1G")
    return int(num) * _SIZE_UNITS[unit]


def parse_location(location: str) -> tuple[str, dict[str, Any]]:
    """``/abs/dir?disks=3&size=64M&fsync=0`` -> (path, options)."""
    path, _, query = location.partition("?")
    if not path.startswith("/"):
        raise BackendError(f"sim volume path {path!r} is not absolute", hint="write sim:///absolute/dir")
    opts: dict[str, Any] = {}
    for k, vs in parse_qs(query).items():
        v = vs[-1]
        if k == "disks":
            if not v.isdigit() or not 1 <= int(v) <= 32:
                raise BackendError(
                    f"bad sim option disks={v!r}: the number of data disks is a whole number from 1 to 32",
                    hint="write e.g. sim:///path?disks=3 (a parity disk is added)",
                )
            opts["ndata"] = int(v)
        elif k == "size":
            opts["max_bytes"] = _parse_size(v)
        elif k == "fsync":
            opts["fsync"] = v not in ("0", "false", "no")
        else:
            raise BackendError(f"unknown sim volume option {k!r}", hint="options: disks, size, fsync")
    if "fsync" not in opts and os.environ.get("COALESCE_SIM_FSYNC", "1") in ("0", "false", "no"):
        opts["fsync"] = False
    return os.path.normpath(path), opts


def open_sim(location: str, *, create: bool = False) -> SimVolume:
    """Open (or create) the sim volume at ``location``; one shared handle per directory and process."""
    path, opts = parse_location(location)
    _power_cut_on_crash()
    with _OPEN_LOCK:
        fs = _OPEN.get(path)
        if fs is not None and fs.broken is None:
            fs.opens += 1
            return fs
        if fs is not None:  # a crashed handle (its process "died"; its threads have stopped): the volume restarts
            fs.raid.close()
            del _OPEN[path]
        fsync = opts.get("fsync", True)
        if os.path.exists(os.path.join(path, "raid.json")):
            fs = SimVolume(path, fsync=fsync)
        elif create:
            if os.path.isdir(path) and os.listdir(path):
                raise BackendError(
                    f"{path} is not empty and holds no sim volume: a sim volume is formatted only in a new "
                    "or empty directory, never over someone's files",
                    hint="choose a new directory for the volume, or move the files away first",
                )
            fs = SimVolume.format(path, ndata=opts.get("ndata", 3), max_bytes=opts.get("max_bytes", 0), fsync=fsync)
        else:
            raise BackendError(
                f"no sim volume at {path}",
                hint=f"create it (open with create=True, or `coalesce init` with sim://{path})",
            )
        os.makedirs(os.path.join(path, ".coalesce"), exist_ok=True)
        fs.opens = 1
        _OPEN[path] = fs
        return fs


def close_sim(fs: SimFS) -> None:
    """One opener of ``fs`` fewer; the last one unmounts it (the engine's :meth:`SimFS.close`)."""
    with _OPEN_LOCK:
        fs.opens = getattr(fs, "opens", 1) - 1
        if fs.opens > 0:
            return
        if _OPEN.get(fs.path) is fs:
            del _OPEN[fs.path]
    if fs.broken is None:
        SimFS.close(fs)  # not the handle's close (this function)
    else:
        fs.raid.close()


def power_cut(location: str, rng: random.Random | None = None) -> dict[str, int] | None:
    """Cut the power of the sim volume at ``location`` (``sim:///dir``, ``/dir``; options ignored)
    if this process has it open (:meth:`SimFS.power_cut`): the writes not yet flushed are lost and
    the handle dies; the next :func:`open_sim` mounts the last CP on the media.  Returns the fates
    of the unflushed blocks, or None when the volume is not open here (then nothing is unflushed:
    the last close ended with a CP)."""
    path, _opts = parse_location(location.removeprefix("sim://"))
    with _OPEN_LOCK:
        fs = _OPEN.get(path)
    return None if fs is None else fs.power_cut(rng)


def power_cut_all(rng: random.Random | None = None) -> dict[str, dict[str, int]]:
    """Cut the power of every sim volume this process has open; the fates of their unflushed
    blocks by volume directory."""
    with _OPEN_LOCK:
        volumes = list(_OPEN.values())
    return {fs.path: fs.power_cut(rng) for fs in volumes}


_POWER_CUT_HOOKED = False


def power_cut_mode(text: str) -> random.Random | None:
    """``COALESCE_SIM_POWER_CUT``'s value -> the generator of :meth:`Raid.power_cut` (None: every
    unflushed write lost).  ``1`` or ``lost``: all lost; ``torn`` or ``torn:SEED``: a random subset
    lost, kept or torn."""
    kind, _, seed = text.strip().lower().partition(":")
    if kind in ("1", "lost", "yes", "true") and not seed:
        return None
    if kind == "torn" and (not seed or seed.isdigit()):
        return random.Random(int(seed or 0))
    raise BackendError(
        f"bad COALESCE_SIM_POWER_CUT={text!r}",
        hint="write 1 (a crash loses every write not yet flushed) or torn:SEED (a random subset, some torn)",
    )


def _power_cut_on_crash() -> None:
    """With ``COALESCE_SIM_POWER_CUT`` set, a crash at a named crash point (``COALESCE_CRASH_AT``,
    coalesce_core/crashpoints.py) cuts the power of every sim volume the process has open at that
    instant, before the process dies (docs/sim.md, "Power cuts")."""
    global _POWER_CUT_HOOKED
    text = os.environ.get("COALESCE_SIM_POWER_CUT", "")
    if _POWER_CUT_HOOKED or text in ("", "0"):
        return
    rng = power_cut_mode(text)
    from coalesce_core import crashpoints

    def cut(point: str) -> None:
        for path, fates in power_cut_all(rng).items():
            said = ", ".join(f"{n} {fate}" for fate, n in fates.items() if n) or "nothing was unflushed"
            print(
                f"power cut at crash point {point}: sim volume {path}: blocks not yet flushed: {said}", file=sys.stderr
            )
        sys.stderr.flush()

    crashpoints.at_crash(cut)
    _POWER_CUT_HOOKED = True
