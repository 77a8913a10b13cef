"""Benchmarks of the sim backend (docs/sim.md, docs/benchmarks.md).

    python3 -m tools.bench.bench_sim [--quick]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

Prints one markdown table and writes nothing else (volumes live in a temporary
directory that is removed).  Measures:

* PCPI create and delete time (median of repeated runs) with 1k and 100k used
  blocks, and the block I/O each costs (the same at both sizes);
* diff time and blocks read for the same 100 changed blocks in volumes of 64 MiB,
  256 MiB and 1 GiB;
* apply throughput (MiB/s) of a baseline stream through the normal write path;
* native vs generic rollback of the same change.

``--quick`` uses 10k instead of 100k blocks and skips the 1 GiB volume.
Volumes are created with fsync on (the default), as a user would run them.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time

from coalesce_core.stream import records as R
from coalesce_sim import close_sim, coalesce_rollback, open_sim
from coalesce_sim import diff as D
from coalesce_sim.raid import BS
from tools.bench.common import MiB


def fill(fs, qtree: str, nbytes: int, file_bytes: int = 16 * MiB) -> float:
    """Write ``nbytes`` of file data into ``qtree`` through apply; returns seconds."""
    t = time.perf_counter()
    i = 0
    left = nbytes
    while left > 0:
        size = min(file_bytes, left)
        recs: list[R.Change] = [R.MkFile(path=f"f{i:05d}")]
        for off in range(0, size, MiB):
            n = min(MiB, size - off)
            recs.append(R.Write(path=f"f{i:05d}", offset=off, data=bytes([(i + off // MiB) % 251 + 1]) * n))
        fs.apply(qtree=qtree, records=R.framed(qtree, None, "t", recs), use_purgatory=False)
        left -= size
        i += 1
    return time.perf_counter() - t


def median_time(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def pcpi_bench(root: str, nblocks: int) -> dict:
    fs = open_sim(f"{root}/pcpi{nblocks}", create=True)
    fill(fs, "q", nblocks * BS)
    used = len(fs.rc)
    fs.raid.stats.update(writes=0, reads=0)
    fs.stats.update(block_reads=0)
    fs.snapshot_create("probe")
    cw, cr = fs.raid.stats["writes"], fs.stats["block_reads"]
    fs.raid.stats.update(writes=0, reads=0)
    fs.stats.update(block_reads=0)
    fs.snapshot_delete("probe")
    dw, dr = fs.raid.stats["writes"], fs.stats["block_reads"]
    names = iter(range(10**6))
    created: list[str] = []

    def create():
        created.append(f"p{next(names)}")
        fs.snapshot_create(created[-1])

    out: dict[object, object] = {"used": used, "create_io": (cw, cr), "delete_io": (dw, dr)}
    for fsync in (True, False):
        fs.raid.fsync_enabled = fsync
        out[("create", fsync)] = median_time(create, 21)
        out[("delete", fsync)] = median_time(lambda: fs.snapshot_delete(created.pop()), 21)
    close_sim(fs)
    return out


def diff_bench(root: str, nbytes: int) -> dict:
    fs = open_sim(f"{root}/diff{nbytes}", create=True)
    fill(fs, "q", nbytes, file_bytes=4 * MiB)
    fs.snapshot_create("s1")
    recs = [R.Write(path=f"f{i:05d}", offset=b * 7 * BS, data=b"C" * BS) for i in range(10) for b in range(10)]
    fs.apply(qtree="q", records=R.framed("q", None, "t", recs), use_purgatory=False)
    fs.snapshot_create("s2")
    fs.cache.clear()
    fs.dircache.clear()
    fs.stats.update(block_reads=0, cache_misses=0)
    t = time.perf_counter()
    out = list(D.diff_stream(fs, "q", "s1", "s2"))
    dt = time.perf_counter() - t
    changed = sum(len(r.data) for r in out if isinstance(r, R.Write)) // BS
    res = {
        "size": nbytes,
        "time": dt,
        "reads": fs.stats["block_reads"],
        "misses": fs.stats["cache_misses"],
        "changed": changed,
        "used": len(fs.rc),
    }
    # rollback of the same change: native (inode records -> PCPI blocks) vs generic (diff + apply);
    # fsync off here so the figures show the work, not the disk flush
    fs.raid.fsync_enabled = False
    nat: list[float] = []
    gen: list[float] = []
    for i in range(5):
        for kind, acc in (("native", nat), ("generic", gen)):
            fs.apply(qtree="q", records=D.diff_stream(fs, "q", "s1", "s2"), use_purgatory=False)
            fs.snapshot_create(f"rb-{kind}-{i}")
            t = time.perf_counter()
            if kind == "native":
                coalesce_rollback(volume=fs, qtree="q", rollback_pcpi=f"rb-{kind}-{i}", to_pcpi="s1")
            else:
                fs.apply(qtree="q", records=D.diff_stream(fs, "q", f"rb-{kind}-{i}", "s1"), use_purgatory=True)
            acc.append(time.perf_counter() - t)
            assert D.fingerprint(fs, "q", None) == D.fingerprint(fs, "q", "s1")
    res["native_rollback"] = statistics.median(nat)
    res["generic_rollback"] = statistics.median(gen)
    close_sim(fs)
    return res


def apply_bench(root: str, nbytes: int) -> float:
    fs = open_sim(f"{root}/apply", create=True)
    dt = fill(fs, "q", nbytes)
    close_sim(fs)
    return nbytes / MiB / dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller volumes (10k blocks; 64 and 256 MiB, not 1 GiB)")
    args = ap.parse_args(argv)
    big_blocks = 10_000 if args.quick else 100_000
    vols = (64 * MiB, 256 * MiB) if args.quick else (64 * MiB, 256 * MiB, 1024 * MiB)
    root = tempfile.mkdtemp(prefix="bench-sim-")
    try:
        p_small, p_big = pcpi_bench(root, 1_000), pcpi_bench(root, big_blocks)
        diffs = [diff_bench(root, v) for v in vols]
        mibs = apply_bench(root, 64 * MiB)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ms = lambda s: f"{s * 1000:.2f} ms"  # noqa: E731
    rows = []
    for op in ("create", "delete"):
        for p in (p_small, p_big):
            rows.append(
                (
                    f"PCPI {op}",
                    f"{p['used']} used blocks",
                    f"{ms(p[(op, True)])} (fsync off: {ms(p[(op, False)])})",
                    f"{p[op + '_io'][0]} block writes, {p[op + '_io'][1]} block reads",
                )
            )
    for d in diffs:
        rows.append(
            (
                "diff, 100 changed blocks",
                f"{d['size'] // MiB} MiB volume ({d['used']} blocks)",
                ms(d["time"]),
                f"{d['reads']} block reads ({d['misses']} from disk), {d['changed']} blocks sent",
            )
        )
    for d in diffs:
        rows.append(
            (
                "rollback of that change, native",
                f"{d['size'] // MiB} MiB volume",
                ms(d["native_rollback"]) + " (fsync off)",
                "inode records re-pointed at the PCPI's blocks, one CP",
            )
        )
        rows.append(
            (
                "rollback of that change, generic",
                f"{d['size'] // MiB} MiB volume",
                ms(d["generic_rollback"]) + " (fsync off)",
                "diff rollback PCPI -> base, apply with purgatory",
            )
        )
    rows.append(
        (
            "apply throughput",
            "64 MiB baseline, 16 MiB files",
            f"{mibs:.1f} MiB/s",
            "1 MiB Write records, one CP per file, fsync on",
        )
    )
    print("| operation | volume | time | cost |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
