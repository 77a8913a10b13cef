"""Fan-in: snapshots of one destination fed by S sources of Q qtrees each, coalesce against btrbk; the cost
of a cycle in which no source changed.

    python3 -m tools.bench.bench_fanin [--quick] [--sizes 2x5 5x2 10x1 10x10 50x20:1] [--cycles 3]
                                       [--idle 5] [--tools sim btrfs btrbk] [-v]

from the repository root (docs/benchmarks.md, "Fan-in").

A size ``SxQ[:C]`` is S source volumes of Q qtrees each, S x Q replicas in one destination, and C update
cycles (default ``--cycles``).  The workload and the counting are bench_snapshots.py's, for every tool
(its ``plan``, ``coalesce_run`` and ``btrbk_run`` with ``sources=S``): a baseline, then C cycles where
10 % of the S x Q replicas change (at least 1) and the transfers of 1 % of them (at least 1, among the
changed ones) are cut mid-way; the snapshots on the destination and on all the sources together are
counted after every snapshot taken or released, the counts at rest read from the volumes after the last
cycle.

* ``coalesce sim`` / ``coalesce btrfs``: one group of S ``[[source]]`` tables (``src00``, ``src01``, ...,
  each its own ``sim://`` volume, or its own btrfs subvolume on the bench's loop btrfs) and one destination
  volume; every replica ``from`` its source (docs/config.md, "Sources").
* ``btrbk``: btrbk with its default retention on the same loop btrfs, S ``volume`` sections (each a
  subvolume holding its Q subvolumes and its ``btrbk_snapshots``), all with the same ``target`` directory.

Then, for coalesce, the cost of an idle cycle: the replicas whose transfer was cut are settled (cycles
until every replica is stable), and ``--idle`` calls of ``Agent.run_cycle`` with no source changed are
timed (wall; CPU of this process and of its reaped children, the ``btrfs`` commands), the median and
range printed with the per-replica figure.  Counts do not depend on the machine's load; times do.

Needs root for btrfs and btrbk (a loop btrfs per size); without root only the sim part runs.  ``--quick``:
sizes 2x1 and 3x1, 1 cycle, 2 idle cycles (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from tools.bench.bench_snapshots import LABEL, TOOLS, btrbk_run, btrbk_version, coalesce_run, run_in_own_dir
from tools.bench.common import (
    LoopFS,
    bench_dir,
    command,
    host,
    loads,
    md_table,
    progress,
    provenance,
    run,
    utc_now,
)

DEFAULT_SIZES = ["2x5", "5x2", "10x1", "10x10", "50x20:1"]


def parse_size(text: str, cycles: int) -> tuple[int, int, int]:
    """``SxQ[:C]`` -> (S, Q, C); C defaults to ``cycles``."""
    try:
        sq, _, c = text.partition(":")
        s, q = (int(x) for x in sq.lower().split("x"))
        out = (s, q, int(c) if c else cycles)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a size is SxQ or SxQ:C (e.g. 10x10, 50x20:1)") from None
    if min(out[:2]) < 1 or out[2] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: S and Q at least 1, C at least 0")
    return out


def fanin_table(rows: list[dict]) -> str:
    return md_table(
        "| tool | sources (S) | qtrees per source (Q) | replicas (S x Q) | update cycles | destination snapshots: peak "
        "| at rest | snapshots of all S sources: peak | at rest | transfers cut (fired) | wall time (s) |",
        (
            f"| {LABEL[r['tool']]} | {r['sources']} | {r['n'] // r['sources']} | {r['n']} | {r['cycles']} "
            f"| {r['peak_dst']} | {r['rest_dst']} | {r['peak_src']} | {r['rest_src']} | {r['failures']} ({r['fired']}) "
            f"| {r['wall']:.1f} |"
            for r in rows
        ),
    )


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    """``median (min-max)``."""
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def idle_table(rows: list[dict]) -> str:
    return md_table(
        "| backend | sources (S) | replicas (S x Q) | no-change cycles timed | wall (s), median (range) "
        "| wall per replica (ms) | CPU (s), median (range) | CPU per replica (ms) |",
        (
            f"| {r['tool']} | {r['sources']} | {r['n']} | {len(r['idle_wall'])} | {spread(r['idle_wall'])} "
            f"| {statistics.median(r['idle_wall']) * 1000 / r['n']:.2f} | {spread(r['idle_cpu'])} "
            f"| {statistics.median(r['idle_cpu']) * 1000 / r['n']:.2f} |"
            for r in rows
            if r.get("idle_wall")
        ),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help=f"SxQ[:C] (default {' '.join(DEFAULT_SIZES)})")
    ap.add_argument("--cycles", type=int, default=3, help="update cycles after the baseline, for sizes without :C")
    ap.add_argument("--idle", type=int, default=5, help="no-change cycles timed per coalesce run (0: none)")
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fs-gib", type=float, default=8.0, help="sparse loop file size per size")
    ap.add_argument("--quick", action="store_true", help="sizes 2x1 and 3x1, 1 cycle, 2 idle cycles (seconds)")
    ap.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.cycles, args.idle = ["2x1", "3x1"], 1, 2
    try:
        sizes = [parse_size(t, args.cycles) for t in args.sizes]
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    log = progress(args.verbose)
    tools = list(args.tools)
    if os.geteuid() != 0 and (set(tools) - {"sim"}):
        print(
            "bench_fanin.py: not root, running the sim part only (btrfs and btrbk need a loop btrfs)", file=sys.stderr
        )
        tools = [t for t in tools if t == "sim"]
    if "btrbk" in tools and not shutil.which("btrbk"):
        print("bench_fanin.py: btrbk is not installed (apt-get install btrbk)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    when = utc_now()
    load0 = os.getloadavg()
    rows: list[dict] = []
    problems: list[str] = []
    for s, q, cycles in sizes:
        n = s * q
        if "sim" in tools:
            tmp = tempfile.mkdtemp(prefix="coalesce-bench-fanin-", dir=bench_dir())
            try:
                r = coalesce_run("sim", n, cycles, args.seed, tmp, None, sources=s, idle=args.idle)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log(f"sim {s}x{q}: {r}")
            rows.append(r)
        fs_tools = [t for t in tools if t in ("btrfs", "btrbk")]
        if fs_tools:
            fs = LoopFS(int(args.fs_gib * (1 << 30)))
            try:
                mnt = fs.up()
                for t in fs_tools:
                    rows.append(
                        run_in_own_dir(
                            mnt,
                            f"{t}-{s}x{q}",
                            f"{t} {s}x{q}",
                            lambda where: (
                                coalesce_run("btrfs", n, cycles, args.seed, where, mnt, sources=s, idle=args.idle)
                                if t == "btrfs"
                                else btrbk_run(n, cycles, args.seed, where, mnt, log, sources=s)
                            ),
                            log,
                        )
                    )
            finally:
                problems += fs.down()
    total = time.perf_counter() - started
    load1 = os.getloadavg()
    order = {t: i for i, t in enumerate(TOOLS)}
    rows.sort(key=lambda r: (order[r["tool"]], r["n"], r["sources"]))
    versions = (
        f"btrfs-progs {run(['btrfs', '--version'], check=False).stdout.strip().split()[-1]} btrbk {btrbk_version()}"
        if os.geteuid() == 0
        else "no root: sim only"
    )
    print(
        provenance(
            when,
            f"{host(node=True)} {versions}",
            f"load average {loads(load0)} at start, {loads(load1)} at end",
            f"{args.fs_gib:g} GiB btrfs on a loop file under {bench_dir()} per size",
            f"command: {command('bench_fanin', argv)}",
            f"script ran {total:.0f} s",
        )
    )
    print(fanin_table(rows))
    for r in rows:
        if r["tool"] == "btrbk":
            print(
                f"<!-- btrbk {r['sources']}x{r['n'] // r['sources']}: `btrbk run` exit codes {r['rcs']}; "
                f"{r['garbled_deleted']} partially received (garbled) targets deleted by btrbk -->"
            )
    if any(r.get("idle_wall") for r in rows):
        print(f"\n<!-- the no-change cycles of the runs above; load average {loads(load1)} at the end -->")
        print(idle_table(rows))
    for p in problems:
        print(f"cleanup: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
