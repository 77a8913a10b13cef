"""The `sim` backend: a simulated RAID-4 write-anywhere volume kept in files.

Volume URL: ``sim:///ABS/DIR`` (optionally ``?disks=N&size=64M&fsync=0`` when
the volume is created; ``fsync`` may be given at every open).  The directory
holds the disk images, ``raid.json`` and the ``.coalesce/`` metadata
directory.  See docs/sim.md.

This module is the entry point (``coalesce.backends: sim``): it holds the
hooks a backend writes, ``coalesce_backend_info`` and ``coalesce_open_volume``,
``coalesce_cli_commands`` (the ``coalesce sim`` verbs of :mod:`.cli`) and
``coalesce_rollback`` (the native rollback, which must come before the core's
generic one).  Every other primitive is a method of the handle
:class:`~.volume.SimVolume`, which the core's default hooks call
(coalesce_core.backend.handles).  The engine lives in :mod:`.raid`, :mod:`.fs`,
:mod:`.ops`, :mod:`.diff` and :mod:`.describe`.
"""

from __future__ import annotations

from typing import Any

from coalesce_core.backend.hookspecs import ACTIVE, hookimpl

from .fs import SimFS
from .raid import PowerCut, SimCrash
from .volume import SimVolume, close_sim, open_sim, parse_location, power_cut

__all__ = ["SimFS", "SimVolume", "SimCrash", "PowerCut", "open_sim", "close_sim", "parse_location", "power_cut"]


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
def coalesce_rollback(volume: Any, qtree: str, rollback_pcpi: str, to_pcpi: str | None) -> bool | None:
    """The native rollback (:meth:`SimVolume.native_rollback`), tried before the generic one.

    A hook of its own, not a handle method ``rollback``: the core's default hook that would call
    such a method (coalesce.handles) and the generic Fig. 9 rollback (coalesce.generic) are both
    ``trylast``, and pluggy calls the one registered first, the generic rollback, first; it
    answers for every volume whose diff answers, so a method would never run.  A plain hookimpl
    runs before both (and after any later-registered plain one), as sim's rollback always has;
    it returns None (then the generic one runs) when ``COALESCE_SIM_NATIVE_ROLLBACK=0``."""
    if not isinstance(volume, SimVolume):
        return None
    return volume.native_rollback(qtree, rollback_pcpi, to_pcpi)


@hookimpl
def coalesce_cli_commands(subparsers: Any) -> None:
    from .cli import add_commands

    add_commands(subparsers)


assert ACTIVE == "@active"
