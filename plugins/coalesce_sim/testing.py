"""Helpers for tests and tools that drive a sim volume directly (below the Volume facade)."""

from __future__ import annotations

from coalesce_core.stream import records as R
from coalesce_sim import SimFS, open_sim


def sim_apply(fs: SimFS, qtree: str, changes, use_purgatory: bool = False):
    """Apply bare change records through the hook path (one CP at the end)."""
    import coalesce_sim

    return coalesce_sim.coalesce_apply(
        volume=fs, qtree=qtree, records=R.framed(qtree, None, "x", list(changes)), use_purgatory=use_purgatory
    )


def reopen(fs: SimFS, query: str = "fsync=0") -> SimFS:
    """Drop a handle (as a dying process would) and open the directory again."""
    import coalesce_sim

    with coalesce_sim.volume._OPEN_LOCK:
        if coalesce_sim.volume._OPEN.get(fs.path) is fs:
            del coalesce_sim.volume._OPEN[fs.path]
    fs.raid.close()
    return open_sim(f"{fs.path}?{query}")
