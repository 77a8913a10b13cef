"""One update on a real btrfs, coalesce versus the native `btrfs send -p | btrfs receive`.

    python3 -m tools.bench.bench_realfs [--quick] [--size-mib 1024] [--small-files 20000] [--fs-gib N]
                                        [--profile DIR]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

Needs root.  Creates its OWN btrfs file system on a sparse loop file under
``$COALESCE_BENCH_DIR`` (default ``/var/tmp``; separate from tools/realfs.py's
test file system) and removes it at the end, also on failure or Ctrl-C.

On that file system: a source subvolume with one qtree ``q`` and a coalesce
group (Harness, btrfs:// source and destination, one replica).  Data is
written straight into the source qtree with plain file I/O.  After the
baseline cycle, for each change

  (a) ``--size-mib`` rewritten in 8 large files (random data),
  (b) ``--small-files`` new 4 KiB files (random data) in 20 directories,
  (c) the same small files rewritten in place,

ONE coalesce update cycle (``agent.run_cycle()``) is timed, and then the
native pipeline for the same change: ``btrfs subvolume snapshot -r`` of the
source, ``btrfs send -p <previous> <new> | btrfs receive <dir>`` (a
subprocess pipe) into a separate destination that holds the previous
snapshot received earlier, and ``btrfs filesystem sync`` (coalesce's cycle
ends with a destination snapshot, which commits the written data, so the
native time includes the commit too).  Both runs see a warm page cache (the
change was just written; ``sync`` before each timed part).

Rollback: the change (a) again, with the transfer failed half-way
(``Rule(hook="coalesce_diff", record=K)``); the ``coalesce_rollback`` hook
is timed with the native btrfs rollback (reflink copy + RENAME_EXCHANGE) and,
for a second identical failure, with ``COALESCE_BTRFS_ROLLBACK=generic``
(the variable is read at each rollback, so one process serves both).  The
pair runs twice: after (a), when the qtree holds only the large files, and
after (c), when it also holds the small files (the native rollback's cost
follows the qtree's entry count, the generic one's follows the change).

``--zfs`` adds the zfs-fuse equivalent on a private pool (tools/realfs.py
functions with their own state directory; :func:`zfs_pool`).  zfs-fuse is ONE
daemon per machine: do not run ``--zfs`` while the real-FS tests run; if
another pool appeared on the daemon we started, it is left running (and
reported).  ``sync`` does not reach zfs-fuse, so before each timed zfs part the
pool's open transaction group is committed (a snapshot of the source made and
destroyed): neither side pays for committing what was written before it.

Every coalesce image and native received snapshot is checked against the
source (names, sizes and sampled bytes) before it counts.  Prints markdown.
``--quick``: 8 MiB and 200 small files, for CI smoke tests (seconds).
``--profile DIR``: cProfile of each timed btrfs update's diff and apply calls
(``DIR/<n>-<change>.prof`` and ``.txt``); profiled figures are not benchmark figures.
``--attach CMD`` (repeatable) with ``--attach-dir DIR``: run CMD in the background
during each timed coalesce update and each native pipeline run, SIGINT it after;
``{pid}`` is this process, ``{zfs_pid}`` the zfs-fuse daemon (0 if none), ``{out}``
a file prefix under DIR naming the run, e.g. ``--attach 'strace -f -c -o {out}.strace
-p {pid}'``, ``--attach 'perf record -g -o {out}.perf -p {zfs_pid}'``; traced
figures are not benchmark figures.  ``--no-btrfs`` runs only the ``--zfs`` part.
The column "check before done" is the wall time of the check of each update against its
source PCPI (coalesce_core.verifier, ``[group] verify``), part of the coalesce wall time;
``--no-verify`` runs the groups with ``verify = false``, to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import random
import shlex
import signal
import subprocess
import sys
import time

from coalesce_core.backend.faults import Rule
from coalesce_core.testing.harness import Harness
from tools.bench.common import (
    N_BIG,
    QTREE,
    SBIN_PATH,
    LoopFS,
    MiB,
    Timer,
    bench_dir,
    close_harness,
    command,
    cpu,
    group_config,
    host,
    loads,
    pipeline,
    progress,
    provenance,
    realfs_tool,
    run,
    same_tree,
    save_profile,
    utc_now,
    write_big,
    zfs_mountpoint,
    zfs_pool,
    zfs_received,
    zfs_settle,
)

#: ``[group] verify`` of the benchmark groups (--no-verify: false)
VERIFY = [True]


ATTACH: list[str] = []  # --attach command templates
ATTACH_DIR = "."
_ATTACH_SEQ = [0]


@contextlib.contextmanager
def attached(label: str):
    """Run the --attach commands (profilers, tracers) while the block runs; SIGINT them after."""
    if not ATTACH:
        yield
        return
    _ATTACH_SEQ[0] += 1
    slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")[:48].rstrip("-")
    zpid = (realfs_tool()._zfs_fuse_pids() or [0])[0]
    os.makedirs(ATTACH_DIR, exist_ok=True)
    procs = []
    for i, tmpl in enumerate(ATTACH):
        out = os.path.join(ATTACH_DIR, f"{_ATTACH_SEQ[0]:02d}-{slug}-{i}")
        argv = shlex.split(tmpl.format(pid=os.getpid(), zfs_pid=zpid, out=out))
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(out + ".err", "wb")))
    time.sleep(1.0)  # attached before the timed part starts
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def write_small(qdir: str, count: int, rnd: random.Random) -> int:
    d = os.path.join(qdir, "small")
    for i in range(count):
        sub = os.path.join(d, f"d{i % 20:02d}")
        if i < 20:
            os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i:06d}"), "wb") as f:
            f.write(rnd.randbytes(4096))
    return count * 4096


# ---------------------------------------------------------------------------
# native pipeline
# ---------------------------------------------------------------------------
class Native:
    def __init__(self, mnt: str, src: str) -> None:
        self.src = src
        self.snaps = os.path.join(mnt, "native-snaps")  # read-only snapshots of the source
        self.dst = os.path.join(mnt, "native-dst")  # where `btrfs receive` puts them
        os.makedirs(self.snaps)
        os.makedirs(self.dst)
        self.n = 0
        self.prev: str | None = None

    def step(self) -> dict:
        """snapshot -r, send [-p prev] | receive, fs sync; the previous pair is deleted afterwards."""
        name = f"n{self.n}"
        self.n += 1
        new = os.path.join(self.snaps, name)
        os.sync()
        t0 = time.perf_counter()
        run(["btrfs", "subvolume", "snapshot", "-r", self.src, new])
        t1 = time.perf_counter()
        argv = ["btrfs", "send", "-q"] + (["-p", os.path.join(self.snaps, self.prev)] if self.prev else []) + [new]
        pipeline(argv, ["btrfs", "receive", "-q", self.dst], "native pipeline")
        t2 = time.perf_counter()
        run(["btrfs", "filesystem", "sync", self.dst])
        t3 = time.perf_counter()
        if self.prev:
            for p in (os.path.join(self.dst, self.prev), os.path.join(self.snaps, self.prev)):
                run(["btrfs", "subvolume", "delete", p], check=False)
        self.prev = name
        return {
            "wall": t3 - t0,
            "snapshot": t1 - t0,
            "send_receive": t2 - t1,
            "sync": t3 - t2,
            "image": os.path.join(self.dst, name, QTREE),
        }


# ---------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------
def bench(mnt: str, work: str, size_mib: int, small: int, seed: int, log, profile_dir: str | None = None) -> dict:
    rnd = random.Random(seed)
    src_path, dst_path = os.path.join(mnt, "src"), os.path.join(mnt, "dst")
    timer = Timer()
    h = Harness(
        group_config(work, "rb", f"btrfs://{src_path}", f"btrfs://{dst_path}", verify=VERIFY[0]), plugins=[timer]
    )
    try:
        qdir = os.path.join(src_path, QTREE)
        os.makedirs(qdir)
        return _bench(
            h, timer, Native(mnt, src_path), qdir, size_mib, small, rnd, log, rollback=True, profile_dir=profile_dir
        )
    finally:
        close_harness(h)


def _bench(
    h, timer, native, qdir, size_mib, small, rnd, log, rollback: bool, profile_dir: str | None = None, settle=None
) -> dict:
    a = h.agent
    rows: list[dict] = []
    rb: list[dict] = []
    n_records_half = max(2, (size_mib // 2))  # 1 MiB Write records: about half the data applied

    def check_coalesce(label):
        if not a.all_stable():
            raise RuntimeError(f"{label}: replica not stable after the cycle: {h.states()}")
        bad = same_tree(qdir, a.export_path(QTREE), rnd)
        if bad:
            raise RuntimeError(f"{label}: coalesce image differs from the source: {bad}")

    def measure(label, nbytes, files):
        os.sync()
        if settle is not None:
            settle()
        timer.reset()
        if profile_dir:
            timer.profile = cProfile.Profile()
        with attached(f"{label} coalesce"), timer.verify_timed():
            c0, t0 = cpu(), time.perf_counter()
            rep = a.run_cycle()
            wall, cpus = time.perf_counter() - t0, cpu() - c0
        if profile_dir:
            save_profile(timer.profile, profile_dir, len(rows), label, log)
            timer.profile = None
        if rep.get("failures"):
            raise RuntimeError(f"{label}: the cycle had failures: {rep}")
        check_coalesce(label)
        with attached(f"{label} native"):
            nat = native.step()
        bad = same_tree(qdir, nat["image"], rnd)
        if bad:
            raise RuntimeError(f"{label}: native received snapshot differs from the source: {bad}")
        row = {
            "label": label,
            "mib": nbytes / MiB,
            "files": files,
            "wall": wall,
            "cpu": cpus,
            "diff": timer.total("diff"),
            "apply": timer.total("apply"),
            "snap": timer.total("snapshot"),
            "verify": timer.total("verify"),
            "records": rep.get("records", 0),
            "native": nat,
        }
        rows.append(row)
        log(
            f"{label}: coalesce {wall:.2f} s (cpu {cpus:.2f}, diff {row['diff']:.2f}, apply {row['apply']:.2f}, "
            f"verify {row['verify']:.2f}), "
            f"native {nat['wall']:.2f} s"
        )
        return row

    def rollback_pair(rb):
        """(a) again, cut half-way, with the native then the generic rollback."""
        entries = sum(len(d) + len(f) for _, d, f in os.walk(qdir))
        for mode in ("native", "generic"):
            write_big(qdir, size_mib, rnd)
            os.sync()
            h.faults.add(Rule(hook="coalesce_diff", qtree=QTREE, record=n_records_half, times=1, volume="src"))
            old = os.environ.get("COALESCE_BTRFS_ROLLBACK")
            os.environ["COALESCE_BTRFS_ROLLBACK"] = mode
            try:
                timer.reset()
                t0 = time.perf_counter()
                rep = a.run_cycle()
                wall = time.perf_counter() - t0
                rbt = list(timer.t.get("rollback", []))
            finally:
                if old is None:
                    os.environ.pop("COALESCE_BTRFS_ROLLBACK", None)
                else:
                    os.environ["COALESCE_BTRFS_ROLLBACK"] = old
                h.faults.clear()
            if not rep.get("failures") or not rbt:
                raise RuntimeError(f"rollback {mode}: the injected failure did not lead to a rollback: {rep} {rbt}")
            # the image the readers see is still the previous one; the next cycles retry and catch up
            for _ in range(4):
                if a.all_stable() and not same_tree(qdir, a.export_path(QTREE), rnd):
                    break
                h.cycle()
            check_coalesce(f"after rollback {mode}")
            native.step()  # keep the native chain in step with the source
            rb.append(
                {
                    "mode": mode,
                    "rollback": rbt[0],
                    "calls": len(rbt),
                    "cycle": wall,
                    "applied": n_records_half,
                    "entries": entries,
                }
            )
            log(f"rollback {mode} ({entries} entries): {rbt[0]:.3f} s (calls {len(rbt)}, failed cycle {wall:.2f} s)")

    # baseline: the big files only (the small files arrive in change (b))
    nbytes = write_big(qdir, size_mib, rnd)
    measure("baseline (full copy of the large files)", nbytes, N_BIG)
    # (a) rewrite every large file
    nbytes = write_big(qdir, size_mib, rnd)
    measure(f"(a) {nbytes // MiB} MiB rewritten in {N_BIG} large files", nbytes, N_BIG)
    if rollback:
        rollback_pair(rb)  # the qtree holds the large files only
    # (b) create the small files
    nbytes = write_small(qdir, small, rnd)
    measure(f"(b) {small} small files (4 KiB) created", nbytes, small)
    # (c) rewrite them in place
    nbytes = write_small(qdir, small, rnd)
    measure(f"(c) {small} small files (4 KiB) rewritten", nbytes, small)
    if rollback:
        rollback_pair(rb)  # the same change, the qtree now also holds the small files

    return {"rows": rows, "rollback": rb}


# ---------------------------------------------------------------------------
# zfs-fuse (optional, smaller)
# ---------------------------------------------------------------------------
class NativeZfs:
    """``zfs snapshot`` of the source, ``zfs send [-i prev] | zfs receive -F <pool>/ndst``."""

    def __init__(self, src_ds: str, dst_ds: str, dst_mnt: str) -> None:
        self.src_ds, self.dst_ds, self.dst_mnt = src_ds, dst_ds, dst_mnt
        self.n = 0
        self.prev: str | None = None

    def settle(self) -> None:
        """Commit what was written to the source before a timed part: ``sync`` does not reach
        zfs-fuse's open transaction group (FUSE has no syncfs), a snapshot does.  Without this the
        first of the two timed runs (coalesce) paid the commit of the change in its PCPI."""
        zfs_settle(self.src_ds)

    def step(self) -> dict:
        name = f"n{self.n}"
        self.n += 1
        os.sync()
        self.settle()
        t0 = time.perf_counter()
        run(["zfs", "snapshot", f"{self.src_ds}@{name}"])
        t1 = time.perf_counter()
        argv = ["zfs", "send"] + (["-i", f"{self.src_ds}@{self.prev}"] if self.prev else []) + [f"{self.src_ds}@{name}"]
        env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":" + SBIN_PATH)
        pipeline(argv, ["zfs", "receive", "-F", self.dst_ds], "native zfs pipeline", env=env)
        t2 = time.perf_counter()
        zfs_received(self.dst_ds, self.src_ds, self.prev)
        self.prev = name
        return {
            "wall": t2 - t0,
            "snapshot": t1 - t0,
            "send_receive": t2 - t1,
            "sync": 0.0,
            "image": os.path.join(self.dst_mnt, QTREE),
        }


def bench_zfs(size_mib: int, small: int, seed: int, log) -> tuple[dict, list[str]]:
    """The zfs-fuse part on a private pool (:func:`zfs_pool`), torn down after."""
    rnd = random.Random(seed)
    problems: list[str] = []
    with zfs_pool(max(1 << 30, 6 * size_mib * MiB + (1 << 30)), log) as z:
        problems = z["problems"]
        pool, mp, state = z["pool"], z["mountpoint"], z["state"]
        h = None
        try:
            work = os.path.join(state, "work")
            os.makedirs(work)
            timer = Timer()
            h = Harness(
                group_config(work, "rz", f"zfs://{pool}/src", f"zfs://{pool}/dst", verify=VERIFY[0]), plugins=[timer]
            )
            src_mp = zfs_mountpoint(f"{pool}/src")
            qdir = os.path.join(src_mp, QTREE)
            os.makedirs(qdir)
            native = NativeZfs(f"{pool}/src", f"{pool}/ndst", os.path.join(mp, "ndst"))
            res = _bench(h, timer, native, qdir, size_mib, small, rnd, log, rollback=False, settle=native.settle)
        finally:
            close_harness(h)
    return res, problems


def table(res: dict, fs: str = "btrfs") -> str:
    nat = "snapshot / send\\|receive / sync" if fs == "btrfs" else "snapshot / send\\|receive"
    out = [
        f"| {fs}: change | data | coalesce wall (s) | coalesce MiB/s | files/s | CPU (s) | of which diff / apply / snapshots (s) "
        f"| check before done (s) | native wall (s) | native MiB/s | of which {nat} (s) | coalesce / native |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        n = r["native"]
        out.append(
            f"| {r['label']} | {r['mib']:.{0 if r['mib'] >= 10 else 1}f} MiB | {r['wall']:.2f} | {r['mib'] / r['wall']:.1f} | "
            f"{r['files'] / r['wall']:.0f} | {r['cpu']:.2f} | {r['diff']:.2f} / {r['apply']:.2f} / {r['snap']:.2f} | "
            + (f"{r['verify']:.2f} ({100 * r['verify'] / r['wall']:.0f} %)" if VERIFY[0] else "off")
            + " | "
            f"{n['wall']:.2f} | {r['mib'] / n['wall']:.1f} | {n['snapshot']:.2f} / {n['send_receive']:.2f}"
            + (f" / {n['sync']:.2f}" if fs == "btrfs" else "")
            + f" | {r['wall'] / n['wall']:.1f}x |"
        )
    if not res["rollback"]:
        return "\n".join(out)
    out += [
        "",
        "| rollback of change (a) cut after about half its 1 MiB Write records | entries in the qtree "
        "| rollback hook wall (s) | whole failed cycle (s) |",
        "|---|---|---|---|",
    ]
    for r in res["rollback"]:
        what = (
            "native (`cp -a --reflink=always` + RENAME_EXCHANGE)"
            if r["mode"] == "native"
            else "generic (`COALESCE_BTRFS_ROLLBACK=generic`: diff + apply)"
        )
        out.append(
            f"| {what}, {r['applied']} records applied | {r['entries']} | {r['rollback']:.3f} | {r['cycle']:.2f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (8 MiB, 200 small files): a smoke test")
    ap.add_argument("--size-mib", type=int, default=1024, help="data rewritten in the 8 large files (MiB)")
    ap.add_argument("--small-files", type=int, default=20000)
    ap.add_argument("--fs-gib", type=float, default=None, help="loop file size (sparse); default from the sizes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--zfs",
        action="store_true",
        help="also the zfs-fuse equivalent (smaller sizes; zfs-fuse is slow).  Starts zfs-fuse when none "
        "runs and stops it at the end: do not run it while the real-FS tests run (they would "
        "share the daemon)",
    )
    ap.add_argument("--zfs-size-mib", type=int, default=128)
    ap.add_argument("--zfs-small-files", type=int, default=2000)
    ap.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="cProfile the diff and apply calls of each timed btrfs update (in the transfer thread) "
        "into DIR/<n>-<change>.prof and .txt; the profiler slows Python code, so the figures "
        "of a profiled run are not the benchmark's",
    )
    ap.add_argument(
        "--attach",
        action="append",
        default=[],
        metavar="CMD",
        help="run CMD during each timed coalesce update and native run, SIGINT it after; {pid} = "
        "this process, {zfs_pid} = the zfs-fuse daemon, {out} = a file prefix in --attach-dir "
        "(e.g. 'strace -f -c -o {out}.strace -p {pid}'); traced figures are not benchmark figures",
    )
    ap.add_argument("--attach-dir", default=".", metavar="DIR", help="where {out} of --attach points")
    ap.add_argument("--no-btrfs", action="store_true", help="only the --zfs part")
    ap.add_argument(
        "--no-verify",
        action="store_true",
        help="[group] verify = false: no check of each update before `done` (to measure what it costs)",
    )
    args = ap.parse_args(argv)
    VERIFY[0] = not args.no_verify
    ATTACH[:] = args.attach
    global ATTACH_DIR
    ATTACH_DIR = args.attach_dir
    if args.no_btrfs and not args.zfs:
        ap.error("--no-btrfs needs --zfs")
    if args.quick:
        args.size_mib, args.small_files = 8, 200
        args.zfs_size_mib, args.zfs_small_files = 4, 100
    if os.geteuid() != 0:
        print("bench_realfs.py needs root (loop devices, mount, btrfs)", file=sys.stderr)
        return 2
    realfs_tool().ensure_tools(btrfs=True, zfs=False)
    # source: base+target of the big files; coalesce dest: image + base PCPI; native dest: 2 snapshots;
    # rollbacks leave 1-2 more copies in purgatory/snapshots; x12 plus 4 GiB (sparse): x6 ran out
    fs_gib = args.fs_gib or max(2.0, 12 * args.size_mib / 1024 + 4)
    log = progress(args.verbose)
    started = time.perf_counter()
    when = utc_now()
    problems: list[str] = []
    load0 = loads()
    cmd = command("bench_realfs", argv)
    if not args.no_btrfs:
        fs = LoopFS(int(fs_gib * (1 << 30)))
        try:
            mnt = fs.up()
            log(f"btrfs {fs_gib:.1f} GiB on {fs.loop} at {mnt}")
            work = os.path.join(fs.dir, "work")
            os.makedirs(work)
            res = bench(mnt, work, args.size_mib, args.small_files, args.seed, log, profile_dir=args.profile)
        finally:
            problems = fs.down()
            for p in problems:
                print(f"cleanup: {p}", file=sys.stderr)
        total = time.perf_counter() - started
        btrfs_v = run(["btrfs", "--version"], check=False).stdout.strip()
        print(
            provenance(
                when,
                f"{host()} {btrfs_v}",
                f"{fs_gib:.1f} GiB btrfs on a loop file under {bench_dir()}",
                f"command: {cmd}",
                f"script ran {total:.0f} s",
                f"load average {load0} before, {loads()} after",
            )
        )
        print(table(res))
    if args.zfs:
        t0 = time.perf_counter()
        zres: dict | None = None
        zproblems: list[str] = []
        try:
            zres, zproblems = bench_zfs(args.zfs_size_mib, args.zfs_small_files, args.seed, log)
        finally:
            for p in zproblems:
                print(f"cleanup: {p}", file=sys.stderr)
        problems += zproblems
        print(
            "\n"
            + provenance(
                f"zfs-fuse part: {args.zfs_size_mib} MiB, {args.zfs_small_files} small files",
                f"ran {time.perf_counter() - t0:.0f} s",
                f"load average {loads()} after{'' if not args.no_btrfs else f', {load0} before'}",
                f"command: {cmd}",
            )
        )
        print(table(zres, "zfs-fuse"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
