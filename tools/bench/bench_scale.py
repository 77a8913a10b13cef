#!/usr/bin/env python3
"""Scale of one group: PCPIs at peak and at rest, wall/CPU time of a no-change cycle.

    python tools/bench/bench_scale.py [--backend mem] [--replicas 300 1000] [--cycles 3]

For each N: baseline cycle, then ``--cycles`` cycles with random transfer
failures (1% of replicas) counting the destination's PCPIs after every PCPI
event (read from the volume), then one no-change cycle and one cycle with one
small change per replica, timed.  Prints a markdown table.  Nothing here is a
test: figures go to docs/benchmarks.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from coalesce_core.config import parse_config  # noqa: E402
from coalesce_core.faults import Rule  # noqa: E402
from coalesce_core.hookspecs import hookimpl  # noqa: E402
from coalesce_core.testing.harness import Harness  # noqa: E402


class PeakCounter:
    def __init__(self) -> None:
        self.h: Harness | None = None
        self.peak_cycle = 0
        self.peak_all = 0

    @hookimpl
    def coalesce_pcpi_taken(self, group, volume, name, role):
        if self.h is None or role == "source":
            return
        self.peak_cycle = max(self.peak_cycle, self.h.cycle_pcpis_on_volume())
        mine = [n for n in self.h.agent.dest.snapshot_list() if n.startswith(f"co-{group}-")]
        self.peak_all = max(self.peak_all, len(mine))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one(backend: str, n: int, cycles: int, seed: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="coalesce-bench-")
    names = [f"q{i:04d}" for i in range(n)]
    if backend == "mem":
        src, dst = f"mem://bench-src-{n}-{seed}", f"mem://bench-dst-{n}-{seed}"
    else:
        src, dst = f"{backend}://{tmp}/src", f"{backend}://{tmp}/dst"
    text = (f'[group]\nname="b"\nsource="{src}"\ndestination="{dst}"\nparallel=8\nmetadata="{tmp}/meta"\n'
            "[group.retry]\ninitial=0\n" + "".join(f'[[replica]]\nname="{q}"\n' for q in names))
    counter = PeakCounter()
    h = Harness(parse_config(text), plugins=[counter])
    counter.h = h
    rng = random.Random(seed)
    for q in names:
        h.writer.write(q, "f", rng.randbytes(64))
    t0 = time.perf_counter()
    h.cycle()
    baseline_s = time.perf_counter() - t0
    failures = 0
    for _ in range(cycles):
        for q in rng.sample(names, max(1, n // 10)):
            h.writer.write(q, "f", rng.randbytes(64))
        for q in rng.sample(names, max(1, n // 100)):
            h.faults.add(Rule(hook="coalesce_diff", qtree=q, record=1, times=1, volume="src"))
            failures += 1
        h.cycle()
    at_rest = h.cycle_pcpis_on_volume()
    commits0 = h.agent.ledger.commits
    t0, c0 = time.perf_counter(), cpu()
    h.cycle()
    nochange_s, nochange_cpu = time.perf_counter() - t0, cpu() - c0
    commits = h.agent.ledger.commits - commits0
    for q in names:
        h.writer.write(q, "f", rng.randbytes(64))
    t0, c0 = time.perf_counter(), cpu()
    h.cycle()
    small_s, small_cpu = time.perf_counter() - t0, cpu() - c0
    h.assert_invariants()
    return {"backend": backend, "n": n, "peak_cycle": counter.peak_cycle, "peak_all": counter.peak_all,
            "at_rest": at_rest, "injected_failures": failures, "baseline_s": baseline_s,
            "nochange_s": nochange_s, "nochange_cpu": nochange_cpu, "small_s": small_s, "small_cpu": small_cpu,
            "commits": commits}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="mem")
    ap.add_argument("--replicas", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="N=10 and 50 only")
    args = ap.parse_args(argv)
    sizes = [10, 50] if args.quick else args.replicas
    print(f"<!-- {platform.node()} {platform.machine()} python {platform.python_version()} "
          f"cpus {os.cpu_count()}; command: python tools/bench/bench_scale.py {' '.join(argv or sys.argv[1:])} -->")
    print("| backend | replicas | cycle-role PCPIs at peak | all group PCPIs at peak | at rest | injected failures "
          "| baseline cycle (s) | no-change cycle wall (s) | CPU (s) | ledger commits | one change per replica wall (s) | CPU (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        r = one(args.backend, n, args.cycles, args.seed)
        print(f"| {r['backend']} | {r['n']} | {r['peak_cycle']} | {r['peak_all']} | {r['at_rest']} | {r['injected_failures']} "
              f"| {r['baseline_s']:.2f} | {r['nochange_s']:.2f} | {r['nochange_cpu']:.2f} | {r['commits']} "
              f"| {r['small_s']:.2f} | {r['small_cpu']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
