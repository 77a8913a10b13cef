"""What the check of each update before `done` costs: the same update cycles with ``verify = true`` and false.

    python3 -m tools.bench.bench_verify [--quick] [--backends sim,btrfs,zfs] [--repeats 3] [-v]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

The check (docs/verification.md, "Replicas checked against their source PCPIs"; ``[group] verify``,
docs/config.md) describes every path an update's records name, with content digests of the regular
files, in the source PCPI and in the replica, after the apply (coalesce_core/verifier.py).

For each backend, each repeat makes two one-replica groups side by side (same volume kind, own
source and destination), one with ``verify = true`` and one with ``verify = false``, writes the
same changes into both sources and times ONE update cycle (``agent.run_cycle()``) of each, the
order of the two alternating between repeats.  Changes, after the baseline (the workloads of
bench_realfs.py, plus three):

  baseline: ``--size-mib`` in 8 large files and ``--base-files`` 4 KiB files (a full copy);
  (a) the 8 large files rewritten whole (random data);
  (b) ``--small-files`` new 4 KiB files in 20 directories;
  (c) the same small files rewritten;
  (d) one large file (``big/f0.bin``, 1/8 of ``--size-mib``) rewritten in part (``--patch-mib``);
  (e) the small files of (b) renamed, each into the next directory.

btrfs: a loop btrfs of its own per repeat (common.LoopFS); zfs: a private zfs-fuse pool on
a file in a tmpfs per repeat (common.zfs_pool, as bench_zfs_qtrees.py; an already running
daemon is shared, not stopped); sim: ``sim://`` volumes (fsync on) in a temporary directory.
btrfs and zfs need root and are skipped without it.  Page cache warm (the change was just written;
``sync``, and on zfs a snapshot of each source made and destroyed, before each timed cycle).

Per change: the cycle's wall and CPU (this process; on zfs plus the zfs-fuse daemon, which also
serves any other pool on it) with and without the check, medians and ranges over the repeats, the
overhead (with - without) / without of the medians and the range of the per-repeat overheads, and
the time of the check after the apply (``TransferCheck.run``; the source side of an update is
described while it is applied, in a helper thread, which this column does not include).  Every
export is compared with its source (sampled bytes; sim: fingerprints) before it counts.  Prints
markdown.  ``--quick``: toy sizes, one repeat (the CI smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, cast

from coalesce_core import verifier
from coalesce_core.stream.records import MkDir, MkFile, Rename, Write, framed
from coalesce_core.testing.harness import Harness
from tools.bench.common import (
    N_BIG,
    QTREE,
    LoopFS,
    MiB,
    bench_dir,
    close_harness,
    command,
    group_config,
    host,
    loads,
    md_table,
    progress,
    provenance,
    run,
    same_tree,
    self_cpu,
    utc_now,
    zfs_fuse_cpu,
    zfs_mountpoint,
    zfs_pool,
    zfs_settle,
)

NDIRS = 20
SIZES = {  # backend: (size_mib, base_files, small_files, patch_mib)
    "sim": (128, 1000, 2000, 1),
    "btrfs": (1024, 5000, 20000, 1),
    "zfs": (128, 1000, 2000, 1),
}
QUICK = (8, 50, 100, 1)


# ---------------------------------------------------------------------------
# writing the changes: plain file I/O (btrfs, zfs) or change records (sim)
# ---------------------------------------------------------------------------
class PosixSource:
    """Writes into a mounted source qtree directory."""

    def __init__(self, qdir: str) -> None:
        self.qdir = qdir
        os.makedirs(qdir, exist_ok=True)

    def files(self, items: list[tuple[str, bytes]]) -> None:
        for rel, data in items:
            p = os.path.join(self.qdir, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)

    def patch(self, rel: str, offset: int, data: bytes) -> None:
        with open(os.path.join(self.qdir, rel), "r+b") as f:
            f.seek(offset)
            f.write(data)

    def renames(self, pairs: list[tuple[str, str]]) -> None:
        for old, new in pairs:
            os.rename(os.path.join(self.qdir, old), os.path.join(self.qdir, new))


class SimSource:
    """Writes into a sim source qtree with one stream of change records per change."""

    def __init__(self, h: Harness) -> None:
        self.vol = h.agent.source
        self.dirs: set[str] = set()
        self.known: set[str] = set()
        h.writer.ensure_qtree(QTREE)

    def _apply(self, changes: list) -> None:
        self.vol.apply(QTREE, framed(QTREE, None, "workload", changes), use_purgatory=False)

    def files(self, items: list[tuple[str, bytes]]) -> None:
        changes: list = []
        for rel, data in items:
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in self.dirs:
                    self.dirs.add(d)
                    changes.append(MkDir(path=d))
            if rel not in self.known:  # rewritten files keep their size: Writes over them
                self.known.add(rel)
                changes.append(MkFile(path=rel))
            changes += [Write(path=rel, offset=o, data=data[o : o + MiB]) for o in range(0, len(data), MiB)]
        self._apply(changes)

    def patch(self, rel: str, offset: int, data: bytes) -> None:
        self._apply([Write(path=rel, offset=offset + o, data=data[o : o + MiB]) for o in range(0, len(data), MiB)])

    def renames(self, pairs: list[tuple[str, str]]) -> None:
        self._apply([Rename(old=o, new=n) for o, n in pairs])
        for o, n in pairs:
            self.known.discard(o)
            self.known.add(n)


def big_files(size_mib: int, rnd: random.Random) -> list[tuple[str, bytes]]:
    per = max(1, size_mib // N_BIG) * MiB
    return [(f"big/f{i}.bin", rnd.randbytes(per)) for i in range(N_BIG)]


def small_files(top: str, count: int, rnd: random.Random) -> list[tuple[str, bytes]]:
    return [(f"{top}/d{i % NDIRS:02d}/f{i:06d}", rnd.randbytes(4096)) for i in range(count)]


def changes(
    size_mib: int, base: int, small: int, patch_mib: int
) -> list[tuple[str, Callable[[Any, random.Random], None], float, int]]:
    """(label, change, MiB written, entries changed) in order; a change is called with (source, rnd)."""
    per = max(1, size_mib // N_BIG)
    patch_mib = min(patch_mib, per)

    def baseline(s, rnd):
        s.files(big_files(size_mib, rnd))
        s.files(small_files("base", base, rnd))

    def patch(s, rnd):
        s.patch("big/f0.bin", (per - patch_mib) * MiB // 2, rnd.randbytes(patch_mib * MiB))

    def rename(s, rnd):
        s.renames(
            [(f"small/d{i % NDIRS:02d}/f{i:06d}", f"small/d{(i + 1) % NDIRS:02d}/r{i:06d}") for i in range(small)]
        )

    return [
        (f"baseline: {N_BIG} large + {base} small files", baseline, N_BIG * per + base * 4 / 1024, N_BIG + base),
        (
            f"(a) {N_BIG * per} MiB rewritten in {N_BIG} large files",
            lambda s, r: s.files(big_files(size_mib, r)),
            N_BIG * per,
            N_BIG,
        ),
        (
            f"(b) {small} small files (4 KiB) created",
            lambda s, r: s.files(small_files("small", small, r)),
            small * 4 / 1024,
            small,
        ),
        (
            f"(c) {small} small files (4 KiB) rewritten",
            lambda s, r: s.files(small_files("small", small, r)),
            small * 4 / 1024,
            small,
        ),
        (f"(d) {patch_mib} MiB rewritten in one {per} MiB file", patch, patch_mib, 1),
        (f"(e) {small} small files renamed", rename, 0, small),
    ]


# ---------------------------------------------------------------------------
# one group
# ---------------------------------------------------------------------------
class CheckTimer:
    """Wall time of TransferCheck.run (the check after the apply) while installed."""

    def __init__(self) -> None:
        self.total = 0.0
        self.real = verifier.TransferCheck.run

    def __enter__(self) -> CheckTimer:
        real, me = self.real, self

        def timed(check):
            t0 = time.perf_counter()
            try:
                return real(check)
            finally:
                me.total += time.perf_counter() - t0

        # installed on the class while the timer is entered; __exit__ puts the real method back
        verifier.TransferCheck.run = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc) -> None:
        verifier.TransferCheck.run = self.real  # type: ignore[method-assign]  # the real one back


def make_group(work: str, name: str, source: str, destination: str, verify: bool) -> Harness:
    os.makedirs(work, exist_ok=True)
    return Harness(group_config(work, name, source, destination, verify=verify))


class Group:
    """One group of a repeat: its harness, source writer, settle step and export check."""

    def __init__(self, h: Harness, src, verify: bool, settle, qdir: str | None) -> None:
        self.h, self.src, self.verify, self.settle, self.qdir = h, src, verify, settle, qdir

    def check(self, label: str, rnd: random.Random) -> None:
        a = self.h.agent
        if not a.all_stable():
            raise RuntimeError(f"{label}: replica not stable after the cycle: {self.h.states()}")
        if self.qdir is not None:
            export = a.export_path(QTREE)
            if export is None:
                raise RuntimeError(f"{label}: replica {QTREE} has no export path")
            bad = same_tree(self.qdir, export, rnd)
        else:
            r = a.state.replicas[QTREE]
            want = a.source.fingerprint(QTREE, r.source_point)
            bad = None if a.dest.fingerprint(QTREE, r.exported) == want else "fingerprints differ"
        if bad:
            raise RuntimeError(f"{label} (verify={self.verify}): export differs from the source: {bad}")

    def cycle(self, label: str, zfs: bool) -> dict:
        os.sync()
        if self.settle is not None:
            self.settle()
        with CheckTimer() as ct:
            c0, z0, t0 = self_cpu(), zfs_fuse_cpu() if zfs else 0.0, time.perf_counter()
            rep = self.h.agent.run_cycle()
            wall = time.perf_counter() - t0
            cpu = self_cpu() - c0 + ((zfs_fuse_cpu() - z0) if zfs else 0.0)
        if rep.get("failures"):
            raise RuntimeError(f"{label} (verify={self.verify}): the cycle had failures: {rep}")
        return {"wall": wall, "cpu": cpu, "check": ct.total, "records": rep.get("records", 0)}


def _tag(verify: bool) -> str:
    return "on" if verify else "off"


@contextlib.contextmanager
def volumes(backend: str, rep: int, size_mib: int, log):
    """Yields make(verify) -> Group on fresh volumes of ``backend``; after, the groups are closed, then the
    volumes torn down (also when a close fails)."""
    problems: list[str] = []
    pools: list[dict] = []  # a zfs pool reports its own teardown problems once it is gone
    try:
        with contextlib.ExitStack() as teardown:  # last in, first out: the groups before their volumes

            def harness(verify: bool, work: str, src: str, dst: str) -> Harness:
                """The harness of group ``von`` or ``voff`` (``[group] verify``) from ``src`` to ``dst``."""
                h = make_group(work, f"v{_tag(verify)}", src, dst, verify)
                teardown.callback(close_harness, h)
                return h

            if backend == "sim":
                d = tempfile.mkdtemp(prefix="coalesce-bench-verify-", dir=bench_dir())
                teardown.callback(shutil.rmtree, d, ignore_errors=True)

                def make(verify: bool) -> Group:
                    tag = _tag(verify)
                    h = harness(verify, f"{d}/work-{tag}", f"sim://{d}/src-{tag}", f"sim://{d}/dst-{tag}")
                    return Group(h, SimSource(h), verify, None, None)

            elif backend == "btrfs":
                fs = LoopFS(int(max(4.0, 2 * (12 * size_mib / 1024 + 2)) * (1 << 30)))
                teardown.callback(lambda: problems.extend(fs.down()))
                mnt = fs.up()
                log(f"repeat {rep}: btrfs on {fs.loop} at {mnt}")

                def make(verify: bool) -> Group:
                    tag = _tag(verify)
                    src = os.path.join(mnt, f"src-{tag}")
                    h = harness(
                        verify, os.path.join(fs.dir, f"work-{tag}"), f"btrfs://{src}", f"btrfs://{mnt}/dst-{tag}"
                    )
                    qdir = os.path.join(src, QTREE)
                    return Group(h, PosixSource(qdir), verify, None, qdir)

            else:
                z = teardown.enter_context(
                    zfs_pool(max(1 << 30, 10 * size_mib * MiB + (1 << 30)), log, prefix="cverify", in_ram=True)
                )
                pools.append(z)
                pool = z["pool"]

                def make(verify: bool) -> Group:
                    tag = _tag(verify)
                    ds = f"{pool}/src{tag}"
                    h = harness(
                        verify, os.path.join(z["state"], f"work-{tag}"), f"zfs://{ds}", f"zfs://{pool}/dst{tag}"
                    )
                    qdir = os.path.join(zfs_mountpoint(ds), QTREE)
                    return Group(h, PosixSource(qdir), verify, functools.partial(zfs_settle, ds), qdir)

            yield make, problems
    finally:
        for z in pools:
            problems += z["problems"]
        for p in problems:
            print(f"bench_verify: cleanup: {p}", file=sys.stderr)


def bench_backend(backend: str, sizes: tuple[int, int, int, int], repeats: int, seed: int, log) -> list[dict]:
    """Rows: one per change with the samples of each setting."""
    steps = changes(*sizes)
    rows: list[dict[Any, Any]] = [  # str keys, and True / False: the samples of each setting
        {"backend": backend, "label": lab, "mib": mib, "entries": n, True: [], False: []} for lab, _f, mib, n in steps
    ]
    for rep in range(repeats):
        order = (True, False) if rep % 2 == 0 else (False, True)
        with volumes(backend, rep, sizes[0], log) as (make, _problems):
            groups = {v: make(v) for v in (True, False)}
            for row, (label, change, _mib, _n) in zip(rows, steps):
                for v in (True, False):  # the same data into both sources
                    change(groups[v].src, random.Random(f"{seed}-{rep}-{label}"))
                for v in order:
                    s = groups[v].cycle(label, backend == "zfs")
                    row[v].append(s)
                    log(
                        f"{backend} #{rep} verify={v} {label}: {s['wall']:.2f} s wall, {s['cpu']:.2f} s CPU, "
                        f"check {s['check']:.2f} s"
                    )
                chk = random.Random(rep)
                for v in (True, False):
                    groups[v].check(label, chk)
    return rows


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
def _mr(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else f"{xs[0]:.2f}"


def _over(on: list[float], off: list[float]) -> str:
    mon, moff = statistics.median(on), statistics.median(off)
    main = f"{100 * (mon - moff) / moff:+.0f} %" if moff > 0 else "-"
    if len(on) < 2:
        return main
    paired = [100 * (a - b) / b for a, b in zip(on, off) if b > 0]
    return f"{main} ({min(paired):+.0f} to {max(paired):+.0f})"


def table(rows: list[dict]) -> str:
    def line(r: dict) -> str:
        on, off = r[True], r[False]
        w_on, w_off = [s["wall"] for s in on], [s["wall"] for s in off]
        c_on, c_off = [s["cpu"] for s in on], [s["cpu"] for s in off]
        return (
            f"| {r['backend']} | {r['label']} | {r['mib']:.{0 if r['mib'] >= 10 or not r['mib'] else 1}f} MiB, "
            f"{r['entries']} files | {_mr(w_off)} | "
            f"{_mr(w_on)} | {_over(w_on, w_off)} | {_mr([s['check'] for s in on])} | {_mr(c_off)} | "
            f"{_mr(c_on)} | {_over(c_on, c_off)} |"
        )

    return md_table(
        "| backend | change | data | wall, verify off (s) | wall, verify on (s) | wall overhead "
        "| check after apply (s) | CPU off (s) | CPU on (s) | CPU overhead |",
        map(line, rows),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes, one repeat: a smoke test")
    ap.add_argument("--backends", default="sim,btrfs,zfs", help="comma-separated, of sim, btrfs, zfs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=None, help="the 8 large files (default per backend)")
    ap.add_argument("--base-files", type=int, default=None, help="4 KiB files of the baseline")
    ap.add_argument("--small-files", type=int, default=None, help="4 KiB files of (b), (c), (e)")
    ap.add_argument("--patch-mib", type=int, default=None, help="data rewritten in one large file in (d)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in SIZES]
    if bad:
        ap.error(f"unknown backend(s) {bad}")
    if os.geteuid() != 0:
        for b in [b for b in backends if b != "sim"]:
            print(f"bench_verify: skipping {b} (needs root)", file=sys.stderr)
            backends.remove(b)
    repeats = 1 if args.quick else args.repeats
    log = progress(args.verbose)
    started = time.perf_counter()
    when = utc_now()
    load0 = loads()
    rows: list[dict] = []
    used = {}
    for b in backends:
        sizes = QUICK if args.quick else SIZES[b]
        sizes = cast(  # four values: the four options over the four defaults
            "tuple[int, int, int, int]",
            tuple(
                o if o is not None else d
                for o, d in zip((args.size_mib, args.base_files, args.small_files, args.patch_mib), sizes)
            ),
        )
        used[b] = sizes
        rows += bench_backend(b, sizes, repeats, args.seed, log)
    btrfs_v = run(["btrfs", "--version"], check=False).stdout.strip() if "btrfs" in backends else ""
    print(
        provenance(
            when,
            f"{host()} {btrfs_v}",
            f"backends {', '.join(backends)} (size MiB, base files, small files, patch MiB: {used})",
            f"{repeats} repeat(s)",
            f"command: {command('bench_verify', argv)}",
            f"script ran {time.perf_counter() - started:.0f} s",
            f"load average {load0} before, {loads()} after",
        )
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
