"""Diff cost follows the change, on btrfs: the same 100 changed files in qtrees of 1k, 10k and 100k files.

    python3 -m tools.bench.bench_diffcost [--quick] [--sizes 1000 10000 100000] [--reps 3] [--profile DIR] [-v]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

Needs root.  For each size, a FRESH btrfs on a sparse loop file under
``$COALESCE_BENCH_DIR`` (default ``/var/tmp``; common.LoopFS), removed
after that size (also on failure or Ctrl-C), so every size starts from the
same empty file system.  On it: a one-replica group (Harness, btrfs:// source
and destination, qtree ``q``), the qtree filled with N small files (4 KiB of
random data, 3 directory levels of fan-out 8: 512 leaf directories) with
plain file I/O (timed), and one baseline cycle (timed).

Then the SAME change at every size, on files whose index is below 1,000 (so
they exist at every size): 88 files rewritten in place (new random bytes,
same size), 4 created, 4 deleted, 4 renamed into another leaf directory --
100 changed files.  Timed, each the median of ``--reps`` runs, warm cache:

* the backend's ``coalesce_diff`` between two read-only snapshots of the
  source taken before and after the change (hook call = two ``btrfs subvolume
  show`` for the UUID keys + ``btrfs send --no-data -p`` + the namespace
  replay; then iterating it = the translation into records, which stats the
  touched paths and reads the changed data from the target snapshot), with a
  fresh stream cache each run, and the number of records it yields;
* ``btrfs send --no-data -p`` alone (same arguments as the plugin, stream
  read and discarded), for reference;
* once: the whole one-replica update cycle (``agent.run_cycle()``) for that
  change, wall and CPU, with the diff call / apply / snapshot split, and the
  destination image checked against the source.

``--profile DIR`` writes a cProfile of one extra diff run per size
(``DIR/<N>-diff.prof`` and ``.txt``) and a pyinstrument profile of a second,
untimed update cycle after a second change of the same kind
(``DIR/<N>-cycle.txt``).  ``--quick``: 1,000 and 2,000 files
(seconds), for the CI smoke test.  Prints markdown.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.testing.harness import Harness
from tools.bench.common import (
    QTREE,
    LoopFS,
    Timer,
    bench_dir,
    close_harness,
    command,
    cpu,
    git_commit,
    group_config,
    host,
    loads,
    progress,
    provenance,
    realfs_tool,
    run,
    same_tree,
    save_profile,
    utc_now,
)

FILE_SIZE = 4096
FANOUT = 8
N_CHANGED = 100
N_CREATE = N_DELETE = N_RENAME = 4
N_REWRITE = N_CHANGED - N_CREATE - N_DELETE - N_RENAME
POOL = 1000  # changed files are chosen among the first 1,000 (present at every size)


class CycleTimer(Timer):
    """common.Timer plus the other primitive hooks a cycle calls."""

    @hookimpl(wrapper=True)
    def coalesce_snapshot_delete(self, volume, name):
        with self._timed("snapshot_delete"):
            return (yield)

    @hookimpl(wrapper=True)
    def coalesce_export(self, volume, mapping):
        with self._timed("export"):
            return (yield)

    @hookimpl(wrapper=True)
    def coalesce_purge_purgatory(self, volume, qtrees):
        with self._timed("purge"):
            return (yield)

    @hookimpl(wrapper=True)
    def coalesce_snapshot_list(self, volume):
        with self._timed("snapshot_list"):
            return (yield)


def rel(i: int) -> str:
    return f"d{i % FANOUT}/d{(i // FANOUT) % FANOUT}/d{(i // FANOUT**2) % FANOUT}/f{i:06d}"


def fill(qdir: str, n: int, rnd: random.Random) -> None:
    made: set[str] = set()
    for i in range(n):
        p = os.path.join(qdir, rel(i))
        d = os.path.dirname(p)
        if d not in made:
            os.makedirs(d, exist_ok=True)
            made.add(d)
        with open(p, "wb") as f:
            f.write(rnd.randbytes(FILE_SIZE))


def change(qdir: str, seed: int) -> None:
    """The same 100 changed files at every size (a fixed choice among indices < 1,000)."""
    rnd = random.Random(seed)
    pick = rnd.sample(range(POOL), N_REWRITE + N_DELETE + N_RENAME)
    rewrite, delete, rename = pick[:N_REWRITE], pick[N_REWRITE : N_REWRITE + N_DELETE], pick[N_REWRITE + N_DELETE :]
    for i in rewrite:
        with open(os.path.join(qdir, rel(i)), "r+b") as f:
            f.write(rnd.randbytes(FILE_SIZE))
    for i in delete:
        os.unlink(os.path.join(qdir, rel(i)))
    for k, i in enumerate(rename):
        to = rel((i + 1) % POOL)  # another leaf directory (fan-out 8: the last digit moves)
        os.rename(os.path.join(qdir, rel(i)), os.path.join(qdir, os.path.dirname(to), f"moved{k}"))
    for k in range(N_CREATE):
        with open(os.path.join(qdir, os.path.dirname(rel(rnd.randrange(POOL))), f"new{k}"), "wb") as f:
            f.write(rnd.randbytes(FILE_SIZE))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def one_size(n: int, fs_bytes: int, reps: int, seed: int, log, profile_dir: str | None) -> dict:
    import coalesce_btrfs as cb  # the installed plugin (entry point); same module the agent uses

    fs = LoopFS(fs_bytes)
    h = None
    try:
        mnt = fs.up()
        work = os.path.join(fs.dir, "work")
        os.makedirs(work)
        src, dst = os.path.join(mnt, "src"), os.path.join(mnt, "dst")
        timer = CycleTimer()
        h = Harness(group_config(work, "dc", f"btrfs://{src}", f"btrfs://{dst}"), plugins=[timer])
        a = h.agent
        qdir = os.path.join(src, QTREE)
        os.makedirs(qdir)
        rnd = random.Random(seed)

        t0 = time.perf_counter()
        fill(qdir, n, rnd)
        create_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        os.sync()
        sync_s = time.perf_counter() - t0
        log(f"{n} files: written in {create_s:.1f} s (+ sync {sync_s:.1f} s)")
        t0 = time.perf_counter()
        rep = a.run_cycle()
        baseline_s = time.perf_counter() - t0
        if rep.get("failures") or not a.all_stable():
            raise RuntimeError(f"baseline cycle failed: {rep}")
        log(f"{n} files: baseline cycle {baseline_s:.1f} s")

        vol = a.source.handle  # the BtrfsVolume of the source
        vol.snapshot_create("bench-a")
        change(qdir, seed + 1)
        os.sync()
        vol.snapshot_create("bench-b")

        def diff_once() -> tuple[float, float, list]:
            vol.streams = cb.StreamCache()  # no parse reused from an earlier run
            t0 = time.perf_counter()
            it = h.pm.hook.coalesce_diff(volume=vol, qtree=QTREE, base="bench-a", target="bench-b", skip=0)
            t1 = time.perf_counter()
            recs = list(it)
            return t1 - t0, time.perf_counter() - t1, recs

        calls, emits, totals, parses = [], [], [], []
        recs: list = []
        commands = 0
        for _ in range(reps):
            c, e, recs = diff_once()
            calls.append(c)
            emits.append(e)
            totals.append(c + e)
            commands = next(iter(vol.streams._entries.values())).commands
            t0 = time.perf_counter()
            vol._parse_send("bench-a", "bench-b")  # the send + replay alone
            parses.append(time.perf_counter() - t0)
        kinds = Counter(type(r).__name__ for r in recs)
        if profile_dir:
            prof = cProfile.Profile()
            prof.enable()
            diff_once()
            prof.disable()
            save_profile(prof, profile_dir, n, "diff", log)

        # the native send alone, as the plugin runs it
        if cb._PROTO is None:
            cb._PROTO = cb._send_proto()
        argv = (
            ["btrfs", "-q", "send", "--no-data"]
            + (["--proto", str(cb._PROTO)] if cb._PROTO >= 2 else [])
            + ["-p", vol.snap_path("bench-a"), vol.snap_path("bench-b")]
        )
        natives, nbytes = [], 0
        for _ in range(reps):
            t0 = time.perf_counter()
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            natives.append(time.perf_counter() - t0)
            if p.returncode:
                raise RuntimeError(f"{' '.join(argv)}: {p.stderr.decode(errors='replace')}")
            nbytes = len(p.stdout)
        vol.snapshot_delete("bench-a")
        vol.snapshot_delete("bench-b")
        log(
            f"{n} files: diff {med(totals):.3f} s ({len(recs)} records, {commands} send commands), "
            f"native send {med(natives):.3f} s"
        )

        # the whole one-replica update cycle for the same change
        os.sync()
        timer.reset()
        c0, t0 = cpu(), time.perf_counter()
        rep = a.run_cycle()
        cycle_s, cycle_cpu = time.perf_counter() - t0, cpu() - c0
        if rep.get("failures") or not a.all_stable():
            raise RuntimeError(f"update cycle failed: {rep}")
        export = a.export_path(QTREE)
        if export is None:
            raise RuntimeError(f"{n} files: {QTREE} has no export")
        bad = same_tree(qdir, export, random.Random(seed))
        if bad:
            raise RuntimeError(f"{n} files: coalesce image differs from the source: {bad}")
        hooks = {
            k: timer.total(k)
            for k in ("diff", "apply", "snapshot", "snapshot_delete", "export", "purge", "snapshot_list")
        }
        log(f"{n} files: update cycle {cycle_s:.2f} s; hooks " + ", ".join(f"{k} {v:.3f}" for k, v in hooks.items()))
        if profile_dir:
            # a second change of the same kind and an UNTIMED cycle under pyinstrument (wall clock,
            # main thread: snapshots, exports, ledger; the transfer thread's diff/apply are in `hooks`)
            change(qdir, seed + 2)
            os.sync()
            try:
                from pyinstrument import Profiler
            except ImportError:
                log("pyinstrument not installed: no profile of the cycle")
            else:
                prof = Profiler(interval=0.001)
                prof.start()
                a.run_cycle()
                prof.stop()
                out = os.path.join(profile_dir, f"{n}-cycle.txt")
                Path(out).write_text(prof.output_text(unicode=False, color=False, show_all=False))
                log(f"pyinstrument profile of a second update cycle: {out}")
        return {
            "n": n,
            "create_s": create_s,
            "sync_s": sync_s,
            "baseline_s": baseline_s,
            "records": len(recs),
            "kinds": dict(kinds),
            "commands": commands,
            "diff": med(totals),
            "call": med(calls),
            "emit": med(emits),
            "parse": med(parses),
            "diff_range": (min(totals), max(totals)),
            "native": med(natives),
            "stream_bytes": nbytes,
            "cycle": cycle_s,
            "cycle_cpu": cycle_cpu,
            "cycle_records": rep.get("records", 0),
            "t_diff": hooks["diff"],
            "t_apply": hooks["apply"],
            "t_snap": hooks["snapshot"],
            "t_del": hooks["snapshot_delete"],
            "t_other": cycle_s - sum(hooks.values()),
        }
    finally:
        close_harness(h)
        for problem in fs.down():
            print(f"cleanup: {problem}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 and 2,000 files (seconds): a smoke test")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--reps", type=int, default=3, help="runs of each diff / native send (median)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", metavar="DIR", default=None, help="cProfile one extra diff run per size into DIR")
    ap.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)
    sizes = [1000, 2000] if args.quick else args.sizes
    if min(sizes) < POOL:
        ap.error(f"sizes must be at least {POOL} (the changed files are chosen among the first {POOL})")
    if os.geteuid() != 0:
        print("bench_diffcost.py needs root (loop devices, mount, btrfs)", file=sys.stderr)
        return 2
    realfs_tool().ensure_tools(btrfs=True, zfs=False)
    log = progress(args.verbose)
    when = utc_now()
    load0 = os.getloadavg()
    started = time.perf_counter()
    rows = []
    for n in sizes:
        # data x2 (source + destination) + snapshots and metadata; sparse, so generous
        fs_bytes = max(2 << 30, 4 * n * FILE_SIZE + (2 << 30))
        rows.append(one_size(n, fs_bytes, args.reps, args.seed, log, args.profile))
    total = time.perf_counter() - started
    load1 = os.getloadavg()
    cmd = command("bench_diffcost", argv)
    btrfs_v = run(["btrfs", "--version"], check=False).stdout.strip()
    print(
        provenance(
            when,
            f"git {git_commit()}",
            f"{host(node=True)} {btrfs_v}",
            f"fresh btrfs per size on a loop file under {bench_dir()}",
            f"loadavg at start {loads(load0)}, at end {loads(load1)}",
            f"command: {cmd}",
            f"script ran {total:.0f} s",
        )
    )
    print(
        f"| files in the qtree | written in (s) | baseline cycle (s) | changed files | diff records "
        f"| send commands | coalesce_diff (s), median of {args.reps} | of which hook call / iteration (s) "
        f"| send + replay alone (s) | native `send --no-data -p` (s) | stream bytes "
        f"| update cycle wall (s) | CPU (s) | of which diff call / apply / snapshot create / delete / rest (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['create_s']:.1f} | {r['baseline_s']:.1f} | {N_CHANGED} | {r['records']} "
            f"| {r['commands']} | {r['diff']:.3f} | {r['call']:.3f} / {r['emit']:.3f} | {r['parse']:.3f} "
            f"| {r['native']:.3f} | {r['stream_bytes']} | {r['cycle']:.2f} | {r['cycle_cpu']:.2f} "
            f"| {r['t_diff']:.2f} / {r['t_apply']:.2f} / {r['t_snap']:.2f} / {r['t_del']:.2f} / {r['t_other']:.2f} |"
        )
    first, last = rows[0], rows[-1]
    print(
        "\n"
        + provenance(
            f"records by kind at {last['n']} files: " + ", ".join(f"{k} {v}" for k, v in sorted(last["kinds"].items())),
            f"diff {last['n']} / {first['n']} files: {last['diff'] / first['diff']:.2f}x, "
            f"native {last['native'] / first['native']:.2f}x, "
            f"cycle {last['cycle'] / first['cycle']:.2f}x",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
