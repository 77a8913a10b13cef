"""`python3 -m tools.bench [--quick] [NAME ...]`: run the benchmarks, print markdown.

Also `python3 tools/bench [--quick] [NAME ...]`, from any directory.  NAME is one of the keys of
BENCHES below (default: all).  Each runs as `python3 -m tools.bench.bench_<name> [--quick]` from
the repository root, the command printed above its output; a benchmark with options of its own
is run that way directly (docs/benchmarks.md gives the command of every figure).  Results go to
docs/benchmarks.md by hand.  realfs, diffcost, net and zfsqtrees need root (loop btrfs, network
namespaces, zfs-fuse) and are skipped without it; snapshots and fanin then run only their sim
part, verify only its sim backend.  `--quick` runs every benchmark at toy sizes: the smoke test CI
runs (tests/tools/test_bench_smoke.py) to prove the scripts still work.  Nothing here is a timed
assertion.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHES = {
    "scale": "bench_scale",  # PCPIs and cycle cost vs number of replicas (mem, sim)
    "sim": "bench_sim",  # PCPI create/delete, diff cost, apply, rollback on sim
    "realfs": "bench_realfs",  # btrfs (root): one update vs btrfs send | receive
    "snapshots": "bench_snapshots",  # snapshots vs N: coalesce (sim, btrfs) vs btrbk (root for btrfs)
    "fanin": "bench_fanin",  # S sources x Q qtrees into one destination: snapshots vs btrbk; an idle cycle's cost
    "stragglers": "bench_stragglers",  # the healthy replicas' export lag beside one slow update, with/without straggler_after
    "diffcost": "bench_diffcost",  # btrfs (root): diff cost vs qtree size for the same change
    "recovery": "bench_recovery",  # SIGKILL at each crash point, then time to a consistent group
    "formal": "bench_formal",  # SPIN states/time at 2-4 replicas; hypothesis steps/s
    "spool": "bench_spool",  # the spool's cost, and the time a SIGKILL mid-update loses with and without it
    "net": "bench_net",  # (root) one update over an emulated link: coalesce ssh/tls vs btrfs send | ssh | receive
    "zfsqtrees": "bench_zfs_qtrees",  # (root) many qtrees of one zfs-fuse dataset: one zfs send for all diffs
    "verify": "bench_verify",  # cost of the check before `done`: verify = true vs false (sim; btrfs, zfs: root)
    "retention": "bench_retention",  # (pure) the retention plan vs generations; the prune vs replicas per manifest
}
ROOT_ONLY = {"realfs", "diffcost", "net", "zfsqtrees"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tools.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes (CI smoke test)")
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(BENCHES)} (default: all)")
    args = ap.parse_args(argv)
    names = args.names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
    if os.geteuid() != 0:
        for name in [n for n in names if n in ROOT_ONLY]:
            print(
                f"tools/bench: skipping {name} (needs root: loop btrfs, network namespaces, zfs-fuse)", file=sys.stderr
            )
            names.remove(name)
    rc = 0
    for name in names:
        cmd = ["-m", f"tools.bench.{BENCHES[name]}"] + (["--quick"] if args.quick else [])
        print(f"\n### {name}: python3 {' '.join(cmd)}\n", flush=True)
        # from the repository root, where the package `tools` is
        code = subprocess.run([sys.executable, *cmd], cwd=ROOT).returncode
        if code:
            print(f"tools/bench: {name} exited {code}", file=sys.stderr, flush=True)
        rc |= code
    return rc


if __name__ == "__main__":
    sys.exit(main())
