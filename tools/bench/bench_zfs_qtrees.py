"""Many qtrees of one zfs-fuse dataset changed between the same two PCPIs: the source's diffs.

    python3 -m tools.bench.bench_zfs_qtrees [--quick] [--qtrees 1 4 16] [--mib 32] [--parallel 1 4] [-v]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

Needs root.  A private zfs-fuse pool (common.py's ``zfs_pool``, its file
in a tmpfs; zfs-fuse is started when none runs and stopped at the end, so do not
run it while the real-FS tests run).  For each K of ``--qtrees``, a fresh
dataset with K qtrees holding one file of ``--mib`` MiB each; PCPI ``a``; every
file rewritten with random data; PCPI ``b``.  Then the K diffs ``a -> b`` that
an update cycle asks of the source (``Volume.diff``, each iterated to its end,
the Write bytes counted), ``--parallel`` at a time (the agent's default
``parallel`` is 4), in three ways:

* ``walk``: ``COALESCE_ZFS_DIFF=walk``, every changed file read through FUSE
  from both images;
* ``send per qtree``: every diff runs its own ``zfs send -i`` of the dataset
  (the block maps turned off: ``SendData.READ_COST`` infinite);
* ``shared map`` (the default): a diff that finds the block map of a stream
  another diff read to its end takes its records from it, reading its changed
  blocks from the target image.

Each way starts without block maps and with the two PCPIs' read-only clones
already mounted (one untimed diff of the first qtree).  Wall time, this
process's CPU with its children (``zfs send``), the zfs-fuse daemon's CPU,
and the number of ``zfs send`` runs (counted as the block maps kept: each
send read to its end keeps one); the bytes of data every diff yielded must
be K x ``--mib`` MiB in every way, else the bench fails.  Prints
markdown.  ``--quick``: K = 2, 2 MiB (the CI smoke test).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.stream.records import Write
from tools.bench.common import (
    MiB,
    command,
    host,
    loads,
    md_table,
    provenance,
    self_cpu,
    utc_now,
    zfs_fuse_cpu,
    zfs_pool,
)

WAYS = ("walk", "send per qtree", "shared map")
VERBOSE = False


def log(msg: str) -> None:
    if VERBOSE:
        print(msg, file=sys.stderr, flush=True)


def rewrite(path: str, mib: int, rnd: random.Random) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(rnd.randbytes(MiB))


def one_diff(vol, qtree: str) -> int:
    return sum(len(r.data) for r in vol.diff(qtree, "a", "b") if type(r) is Write)


def run_way(vol, way: str, qtrees: list[str], parallel: int) -> dict:
    from coalesce_zfs import ZfsVolume
    from coalesce_zfs.senddata import BlockMaps, SendData

    cls = type(vol.handle)
    assert cls is ZfsVolume
    read_cost = SendData.READ_COST
    os.environ["COALESCE_ZFS_DIFF"] = "walk" if way == "walk" else "send"
    if way == "send per qtree":
        SendData.READ_COST = float("inf")
    try:
        cls._block_maps = BlockMaps()
        one_diff(vol, qtrees[0])  # untimed: mounts the PCPIs' clones
        cls._block_maps = maps = BlockMaps()  # every send read to its end keeps one map: maps.published
        t0, c0, z0 = time.perf_counter(), self_cpu(), zfs_fuse_cpu()
        with ThreadPoolExecutor(parallel) as pool:
            data = sum(pool.map(lambda q: one_diff(vol, q), qtrees))
        return {
            "wall": time.perf_counter() - t0,
            "cpu": self_cpu() - c0,
            "daemon": zfs_fuse_cpu() - z0,
            "data": data,
            "sends": maps.published,
        }
    finally:
        SendData.READ_COST = read_cost
        os.environ.pop("COALESCE_ZFS_DIFF", None)


def bench_k(pool: str, k: int, mib: int, parallels: list[int], rnd: random.Random) -> list[dict]:
    ds = f"{pool}/k{k}"
    subprocess.run(["zfs", "create", ds], check=True)
    vol = Volume.open(plugin_manager(), f"zfs://{ds}", create=True)
    rows = []
    try:
        root = vol.handle.root
        qtrees = [f"q{i:03d}" for i in range(k)]
        for q in qtrees:
            os.makedirs(os.path.join(root, q))
            rewrite(os.path.join(root, q, "f"), mib, rnd)
        vol.snapshot_create("a")
        for q in qtrees:
            rewrite(os.path.join(root, q, "f"), mib, rnd)
        vol.snapshot_create("b")
        for parallel in parallels:
            for way in WAYS:
                log(f"K={k} parallel={parallel}: {way}")
                r = run_way(vol, way, qtrees, parallel)
                if r["data"] != k * mib * MiB:
                    raise SystemExit(f"K={k} {way}: the diffs yielded {r['data']} bytes of data, not {k * mib * MiB}")
                rows.append({"k": k, "parallel": parallel, "way": way, **r})
    finally:
        vol.close()
        subprocess.run(["zfs", "destroy", "-r", "-f", ds], check=False)
    return rows


def table(rows: list[dict], mib: int) -> str:
    return md_table(
        "| qtrees changed | diffs at a time | way | data (MiB) | wall (s) | CPU here (s) | zfs-fuse daemon CPU (s) "
        "| `zfs send` runs |",
        (
            f"| {r['k']} x {mib} MiB | {r['parallel']} | {r['way']} | {r['data'] / MiB:.0f} | {r['wall']:.2f} "
            f"| {r['cpu']:.2f} | {r['daemon']:.2f} | {r['sends'] if r['way'] != 'walk' else '-'} |"
            for r in rows
        ),
    )


def main(argv: list[str] | None = None) -> int:
    global VERBOSE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="K = 2, 2 MiB: a smoke test")
    ap.add_argument("--qtrees", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--mib", type=int, default=32, help="the file rewritten in each qtree (MiB)")
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 4], help="diffs at a time")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args(argv)
    VERBOSE = args.verbose
    if args.quick:
        args.qtrees, args.mib, args.parallel = [2], 2, [2]
    if os.geteuid() != 0:
        print("bench_zfs_qtrees: needs root (zfs-fuse)", file=sys.stderr)
        return 2
    rnd = random.Random(args.seed)
    size = max(1 << 30, 3 * max(args.qtrees) * args.mib * MiB + (512 << 20))
    started = time.perf_counter()
    load0 = os.getloadavg()
    rows: list[dict] = []
    with zfs_pool(size, log, prefix="cbq", in_ram=True) as z:
        for k in args.qtrees:
            rows += bench_k(z["pool"], k, args.mib, args.parallel, rnd)
    problems = z["problems"]
    print(
        provenance(
            utc_now(),
            host(kernel=False),
            "zfs-fuse, one pool on a file in a tmpfs",
            f"load average {loads(load0)} at the start, {loads()} at the end",
            f"ran {time.perf_counter() - started:.0f} s",
            f"command: {command('bench_zfs_qtrees', argv)}",
        )
    )
    print(table(rows, args.mib))
    for p in problems:
        print(f"bench_zfs_qtrees: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
