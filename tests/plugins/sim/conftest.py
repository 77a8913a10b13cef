"""Fixtures of the sim backend's tests: fresh volumes (fsync off: tests do not need power-loss durability)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from coalesce_sim import SimFS, open_sim

_n = itertools.count()


@pytest.fixture
def make_sim(tmp_path: Path):
    opened: list[SimFS] = []

    def make(name: str | None = None, query: str = "fsync=0", create: bool = True) -> SimFS:
        name = name or f"vol{next(_n)}"
        fs = open_sim(f"{tmp_path}/{name}?{query}", create=create)
        opened.append(fs)
        return fs

    yield make
    import coalesce_sim

    for fs in opened:
        with coalesce_sim.volume._OPEN_LOCK:
            if coalesce_sim.volume._OPEN.get(fs.path) is fs:
                del coalesce_sim.volume._OPEN[fs.path]
        fs.raid.close()


@pytest.fixture
def sim_url(tmp_path: Path):
    def make() -> str:
        return f"sim://{tmp_path}/cv{next(_n)}?fsync=0"

    return make
