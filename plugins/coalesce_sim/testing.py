"""Helpers for tests and tools that drive a sim volume directly (below the Volume facade)."""

from __future__ import annotations

from coalesce_core.stream import records as R
from coalesce_sim import SimVolume, open_sim


def sim_apply(fs: SimVolume, qtree: str, changes, use_purgatory: bool = False):
    """Apply bare change records through the handle's ``apply`` primitive (one CP at the end)."""
    return fs.apply(qtree, R.framed(qtree, None, "x", list(changes)), use_purgatory)


def reopen(fs: SimVolume, query: str = "fsync=0") -> SimVolume:
    """Drop a handle (as a dying process would) and open the directory again."""
    import coalesce_sim

    with coalesce_sim.volume._OPEN_LOCK:
        if coalesce_sim.volume._OPEN.get(fs.path) is fs:
            del coalesce_sim.volume._OPEN[fs.path]
    fs.raid.close()
    return open_sim(f"{fs.path}?{query}")
