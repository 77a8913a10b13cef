"""The benchmarks still run (`python3 tools/bench --quick`, each as `python3 -m tools.bench.bench_<name> --quick`):
a smoke test, never a timed assertion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"


#: the benchmarks that use host-wide resources (loop btrfs file systems, the zfs-fuse daemon, network
#: namespaces): they run in the real-file-system worker, one after another (tests/conftest.py)
HOST_WIDE = {"realfs", "diffcost", "snapshots", "fanin", "net", "zfsqtrees", "verify"}
NAMES = [
    "scale",
    "sim",
    "realfs",
    "diffcost",
    "snapshots",
    "fanin",
    "stragglers",
    "recovery",
    "formal",
    "spool",
    "net",
    "zfsqtrees",
    "verify",
    "retention",
]


def test_the_smoke_test_covers_every_benchmark():
    from tools.bench.__main__ import BENCHES

    assert sorted(BENCHES) == sorted(NAMES)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.xdist_group("realfs")) if n in HOST_WIDE else n for n in NAMES]
)
def test_every_benchmark_runs_at_toy_sizes(name):
    p = subprocess.run([sys.executable, str(BENCH), "--quick", name], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"### {name}:" in p.stdout
    assert p.stdout.count("|---") >= 1  # it printed a markdown table with at least one data row
    if name == "scale":
        assert "| mem | 10 | 4 | 4 | 1 |" in p.stdout  # I1 at toy size: peak 4 cycle PCPIs, 1 at rest


def test_scale_fixed_with_generations_holds_them_and_prunes_one_a_cycle():
    argv = ["-m", "tools.bench.bench_scale", "--fixed", "--quick", "--no-fsync", "--generations", "0", "3"]
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600, cwd=BENCH.parents[1])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line.split(" | ") for line in p.stdout.splitlines() if line.startswith("| mem |")]
    # generations held, untimed cycles, timed cycles, ..., pruned per cycle
    assert [(r[2], r[4], r[8]) for r in rows] == [("0", "20", "0.00"), ("3", "20", "1.00")]
