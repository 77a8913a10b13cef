"""Helpers for tests and tools that drive a sim volume directly (below the Volume facade), and a
power cut under a running agent."""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable

from coalesce_core import crashpoints
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.stream import records as R
from coalesce_sim import SimVolume, open_sim
from coalesce_sim.volume import power_cut


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


def power_cut_at(
    harness: Any,
    point: str | None,
    step: Callable[[], Any],
    volumes: Iterable[str] = ("destination",),
    rng: random.Random | None = None,
) -> bool:
    """Run ``step`` of a :class:`~coalesce_core.testing.harness.Harness` on sim volumes and cut the
    power at crash point ``point`` (``name[:n]``): at that instant the agent dies and the group's
    sim ``volumes`` (``"source"``: every source of the group, ``"destination"``) lose every write not
    yet flushed (with ``rng``: a random subset, some torn).  If ``point`` is None or never reached, the power is cut
    when the step ends.  Then a new agent recovers from the ledger (committed transactions only:
    SQLite, synchronous=FULL) on the reopened volumes; the harness's source writers follow them.
    Returns True if the point fired."""
    sources = {one.name: one.url for one in harness.config.sources}
    urls = [url for v in volumes for url in (sources.values() if v == "source" else [harness.config.destination])]

    def cut(_point: str) -> None:
        for url in urls:
            power_cut(url, rng)

    remove = crashpoints.at_crash(cut)
    try:
        crashed = crashpoints.run_armed(point, step)
    finally:
        remove()
    if not crashed:
        cut("at rest")
    harness.restart()
    if "source" in volumes:
        # the test's own handle of the reopened source, not the agent's: the agent's calls may be
        # made to fail (a source outage), the test's writes and reads never are
        for name, url in sources.items():
            harness.writers[name].volume = Volume.open(plugin_manager(), url)
    return crashed
