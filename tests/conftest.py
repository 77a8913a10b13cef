"""Shared fixtures.  Fixtures that build real volumes live in tests/realfs.py."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, settings

from coalesce_core import crashpoints

pytest_plugins = ["realfs"]  # tests/realfs.py: the one place that builds real volumes

# The sim backend's fsyncs make tests slow on shared VMs; durability itself is
# tested in tests/plugins/sim with explicit crash points, not by timing.
os.environ.setdefault("COALESCE_SIM_FSYNC", "0")

settings.register_profile(
    "dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile(
    "crosshair", backend="crosshair", max_examples=20, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

_ids = itertools.count()


@pytest.fixture(autouse=True)
def _disarm_crash_points():
    crashpoints.arm(None)
    yield
    crashpoints.arm(None)


@pytest.fixture
def group_config(tmp_path: Path) -> Callable[..., "object"]:
    """Build a GroupConfig for a fresh pair of volumes (mem by default)."""
    from coalesce_core.config import parse_config

    def make(
        replicas=("A", "B", "C"),
        scheme: str = "mem",
        parallel: int = 4,
        retry_initial: float = 0.0,
        name: str = "g",
        source_url: str | None = None,
        dest_url: str | None = None,
        write_file: bool = False,
        spool: bool | None = None,
        reseed_after: int | None = None,
        privileges: str | None = None,
        retention: str | None = None,
    ):
        n = next(_ids)
        if scheme == "mem":
            src = source_url or f"mem://src-{os.getpid()}-{n}-{tmp_path.name}"
            dst = dest_url or f"mem://dst-{os.getpid()}-{n}-{tmp_path.name}"
        else:
            src = source_url or f"{scheme}://{tmp_path}/src{n}"
            dst = dest_url or f"{scheme}://{tmp_path}/dst{n}"
        lines = [
            "[group]",
            f'name = "{name}"',
            f'source = "{src}"',
            f'destination = "{dst}"',
            f"parallel = {parallel}",
            f'metadata = "{tmp_path}/meta{n}"',
            *([f"spool = {str(spool).lower()}"] if spool is not None else []),
            *([f"reseed_after = {reseed_after}"] if reseed_after is not None else []),
            *([f'privileges = "{privileges}"'] if privileges is not None else []),
            "[group.retry]",
            f"initial = {retry_initial}",
            "factor = 2",
            "maximum = 60",
        ]
        for r in replicas:
            lines += ["[[replica]]", f'name = "{r}"']
        if retention is not None:  # the body of a [retention] table (docs/config.md, "Retention")
            lines += ["[retention]", retention]
        text = "\n".join(lines) + "\n"
        path = tmp_path / f"group{n}.toml"
        path.write_text(text)
        return parse_config(text, str(path))

    return make


#: modules whose tests share a host-wide resource besides the real volumes: network namespaces and the
#: test subnets (tests/net).  The mutants whose killing tests run on btrfs carry the btrfs mark, and the
#: benchmark smoke tests that use loop file systems, zfs-fuse or namespaces the group
#: (tests/formal/test_mutants.py, tests/tools/test_bench_smoke.py); the others spread over the workers.
_SHARED = {"net": ("tests/net/",)}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadgroup``, tools/test), tests that use one host-wide resource run in
    one worker, one after another: every test of the real btrfs file systems and the zfs-fuse pool in
    one, every network-namespace test in another; the rest spread over the workers."""
    root = str(config.rootpath)
    for item in items:
        rel = os.path.relpath(str(item.path), root)
        group = None
        if (
            "realfs" in getattr(item, "fixturenames", ())
            or item.get_closest_marker("btrfs")
            or item.get_closest_marker("zfs")
        ):
            group = "realfs"
        else:
            group = next((g for g, prefixes in _SHARED.items() if rel.startswith(prefixes)), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
