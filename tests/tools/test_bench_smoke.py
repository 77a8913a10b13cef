"""The benchmarks still run (`python3 tools/bench --quick`, each as `python3 -m tools.bench.bench_<name> --quick`):
a smoke test, never a timed assertion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"


def test_every_benchmark_runs_at_toy_sizes():
    p = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in (
        "scale",
        "sim",
        "realfs",
        "diffcost",
        "snapshots",
        "recovery",
        "formal",
        "spool",
        "net",
        "zfsqtrees",
        "verify",
    ):
        assert f"### {name}:" in p.stdout
    # each benchmark printed a markdown table with at least one data row
    assert p.stdout.count("|---") >= 3
    assert "| mem | 10 | 4 | 4 | 1 |" in p.stdout  # I1 at toy size: peak 4 cycle PCPIs, 1 at rest
