"""The `sim` backend: a simulated RAID-4 write-anywhere volume kept in files.

Volume URL: ``sim:///ABS/DIR`` (optionally ``?disks=N&size=64M&fsync=0`` when
the volume is created; ``fsync`` may be given at every open).  The directory
holds the disk images, ``raid.json`` and the ``.coalesce/`` metadata
directory.  See docs/sim.md.

This module is the entry point (``coalesce.backends: sim``): it holds the
hook implementations; the engine lives in :mod:`.raid`, :mod:`.fs`,
:mod:`.ops` and :mod:`.diff`.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from coalesce_core.backend.hookspecs import ACTIVE, hookimpl

from . import diff as _diff
from . import ops as _ops
from .fs import SimFS
from .raid import SimCrash
from .volume import close_sim, open_sim, parse_location

__all__ = ["SimFS", "SimCrash", "open_sim", "close_sim", "parse_location"]


def _mine(volume: Any) -> SimFS | None:
    if isinstance(volume, SimFS):
        volume.check()
        return volume
    return None


@hookimpl
def coalesce_backend_info():
    return {
        "scheme": "sim",
        "description": "simulated RAID-4 write-anywhere volume in files (WAFL-like PCPIs, 255 max)",
    }


@hookimpl
def coalesce_open_volume(url: Any, create: bool):
    if getattr(url, "scheme", None) != "sim":
        return None
    return open_sim(url.location, create=create)


@hookimpl
def coalesce_close_volume(volume: Any):
    if not isinstance(volume, SimFS):
        return None
    close_sim(volume)
    return True


@hookimpl
def coalesce_metadata_dir(volume: Any):
    fs = _mine(volume)
    if fs is None:
        return None
    d = os.path.join(fs.path, ".coalesce")
    os.makedirs(d, exist_ok=True)
    return d


@hookimpl
def coalesce_snapshot_create(volume: Any, name: str):
    fs = _mine(volume)
    return None if fs is None else fs.snapshot_create(name)


@hookimpl
def coalesce_snapshot_delete(volume: Any, name: str):
    fs = _mine(volume)
    return None if fs is None else fs.snapshot_delete(name)


@hookimpl
def coalesce_snapshot_list(volume: Any):
    fs = _mine(volume)
    return None if fs is None else fs.pcpi_names()


@hookimpl
def coalesce_qtree_list(volume: Any, snapshot: str | None):
    fs = _mine(volume)
    if fs is None:
        return None
    with fs.lock:
        return fs.view(snapshot).qtrees()


@hookimpl
def coalesce_diff(volume: Any, qtree: str, base: str | None, target: str):
    fs = _mine(volume)
    if fs is None:
        return None
    with fs.lock:
        return _diff.diff_stream(fs, qtree, base, target)


def _mutate(fs: SimFS, fn, *args):
    """Run one primitive on the overlay, then return only once its changes are on disk (also
    when it fails part-way: the partial state stays, as the hookspec asks).

    Group commit: the CP is shared with the primitives that other threads run meanwhile
    (:meth:`SimFS.wait_durable`), so N concurrent applies cost fewer than N CPs; each still
    returns only after a CP covering its changes is complete."""
    with fs.lock:
        fs.check()
        failures = fs.cp_failures
        try:
            result = fn(fs, *args)
        except BaseException as exc:
            err: BaseException | None = exc
        else:
            err = None
        need = fs.durable_target()
    try:
        if fs.broken is None:
            fs.wait_durable(need, failures)
    except BaseException as exc:
        if err is not None:
            raise exc from err
        raise
    if err is not None:
        raise err
    return result


@hookimpl
def coalesce_apply(volume: Any, qtree: str, records: Iterable[Any], use_purgatory: bool):
    fs = _mine(volume)
    if fs is None:
        return None
    return _mutate(fs, _ops.apply_stream, qtree, records, use_purgatory)


@hookimpl
def coalesce_rollback(volume: Any, qtree: str, rollback_pcpi: str, to_pcpi: str | None):
    """Native rollback: point the qtree's inodes at ``to_pcpi``'s blocks (one CP)."""
    fs = _mine(volume)
    if fs is None or os.environ.get("COALESCE_SIM_NATIVE_ROLLBACK", "1") in ("0", "no", "false"):
        return None
    with fs.lock:
        fs.view(rollback_pcpi)  # must exist (contract); the native path does not need its contents
        _mutate(fs, _ops.native_rollback, qtree, to_pcpi)
    return True


@hookimpl
def coalesce_purge_purgatory(volume: Any, qtrees: list[str]):
    fs = _mine(volume)
    if fs is None:
        return None
    _mutate(fs, lambda f, qs: [_ops.purge_purgatory(f, q) for q in qs], list(qtrees))
    return True


@hookimpl
def coalesce_remove_qtree(volume: Any, qtree: str):
    fs = _mine(volume)
    if fs is None:
        return None
    _mutate(fs, _ops.remove_qtree, qtree)
    return True


@hookimpl
def coalesce_export(volume: Any, mapping: Mapping[str, str | None]):
    fs = _mine(volume)
    if fs is None:
        return None
    fs.set_exports(dict(mapping))
    return True


@hookimpl
def coalesce_exported(volume: Any):
    fs = _mine(volume)
    return None if fs is None else fs.exports()


@hookimpl
def coalesce_export_path(volume: Any, replica: str):
    """The sim volume is not mounted anywhere: exported images have no file-system path."""
    return None


@hookimpl
def coalesce_fingerprint(volume: Any, qtree: str, snapshot: str | None):
    fs = _mine(volume)
    if fs is None:
        return None
    with fs.lock:
        return _diff.fingerprint(fs, qtree, snapshot)


@hookimpl
def coalesce_describe(volume: Any, qtree: str, snapshot: str | None, paths: Any):
    fs = _mine(volume)
    if fs is None:
        return None
    from .describe import describe

    with fs.lock:
        return describe(fs, qtree, snapshot, paths)


@hookimpl
def coalesce_describe_tree(volume: Any, qtree: str, snapshot: str | None, content: bool):
    """The generic walk, a directory at a time, each batch under the volume's lock."""
    fs = _mine(volume)
    if fs is None:
        return None
    from coalesce_core.verify import generic_tree

    return generic_tree(
        lambda batch: coalesce_describe(volume=fs, qtree=qtree, snapshot=snapshot, paths=batch), content
    )


@hookimpl
def coalesce_describe_holds(volume: Any):
    from .describe import HOLDS

    return HOLDS if _mine(volume) is not None else None


@hookimpl
def coalesce_cli_commands(subparsers: Any) -> None:
    from .cli import add_commands

    add_commands(subparsers)


assert ACTIVE == "@active"
