"""Scale of one group: PCPIs at peak and at rest, wall/CPU time of a no-change cycle; the fixed cost of a cycle.

    python3 -m tools.bench.bench_scale [--backend mem] [--replicas 300 1000] [--cycles 3] [--no-strace]
    python3 -m tools.bench.bench_scale --fixed [--backend mem] [--hours 500] [--idle 0 30]
    python3 -m tools.bench.bench_scale --fixed --generations 0 10 100 250 [--backend mem] [--hours 500]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

For each N: baseline cycle, then ``--cycles`` cycles with random transfer
failures (1% of replicas) counting the destination's PCPIs after every PCPI
event (read from the volume), then one no-change cycle and one cycle with one
small change per replica, timed.  Prints a markdown table.  Nothing here is a
test: figures go to docs/benchmarks.md with the command that produced them.

fsyncs and metadata writes per cycle: right after each timed cycle, ONE more
cycle of the same kind (no change; one new small change per replica) runs
under ``strace -f -y -p <this process>`` (attached for that cycle only, so
the timed figures carry no ptrace overhead), tracing fsync, fdatasync,
sync_file_range, syncfs, sync, msync and the write family (write, pwrite64,
writev, pwritev, pwritev2).  ``-y`` names each call's file, so the calls are
split exactly: *ledger* = the group's metadata directory (the SQLite file and
its -wal/-shm/-journal), *volume* = the backend's files (sim: the disk images
and raid.json of source and destination; mem has none).  SQLite's fsyncs
happen in C, which is why they are counted at the system-call level.  Without
strace (or when attaching is refused) those columns say n/a and the rest runs.

``--fixed``: the agent's fixed cost per cycle instead, in the scenario of
tests/core/cycle/test_generations.py's year of hourly cycles (I1): replicas A,
B and C, A changing every 5th hour, B every 7th, C never after its baseline,
``[retention] keep = "24h 7d 4w 12m"``, the agent's clock moved one hour per
cycle; plus ``--idle`` K more replicas that never change (an idle replica's
cost is the difference per replica).  After 50 untimed cycles (the
generations build up), ``--hours`` cycles are timed: process CPU (every
thread) and wall per cycle, ledger commits and threads started per cycle.
The ledger (and a sim volume) is durable as a user runs it; ``--no-fsync``: without their fsyncs
(the ledger's ``PRAGMA synchronous=OFF``, ``COALESCE_SIM_FSYNC=0``), as that test runs them: the
agent's own cost alone.

``--fixed --generations G ...``: the same scenario with G retained coalesced generations held on
the destination instead of the calendar policy: ``keep_min`` longer than any run and ``max = G``
(G = 0: no ``[retention]``, the old base released). Untimed cycles run until G are held (at least
the 50 above), then each timed cycle keeps its old base and prunes the oldest generation; besides the
columns above: the prune's plan (``generations.prune``: the policy's view and plan) and its release
of the pruned PCPI on the destination, wall per cycle, and the ledger's size (its pages, and its
manifests' JSON) at the end. mem's PCPI limit is raised to hold G (sim's stays 255: G <= 251);
``--backend btrfs`` makes a loop btrfs of its own (root).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import coalesce_mem
from coalesce_core import retention
from coalesce_core.backend.faults import Rule
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.config import parse_config
from coalesce_core.cycle import generations as gen
from coalesce_core.testing.harness import FakeClock, Harness
from coalesce_core.testing.workload import fill
from tools.bench.common import (
    LoopFS,
    close_harness,
    command,
    cpu,
    git_commit,
    host,
    loads,
    provenance,
    qtree_names,
    replicas_config,
    utc_now,
)


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


SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync", "msync")
WRITE_CALLS = ("write", "pwrite64", "writev", "pwritev", "pwritev2")
_LINE = re.compile(r"^\d+\s+(?:<\.\.\. )?(\w+)\((?:(-?\d+)(?:<([^>]*)>)?)?")


class Strace:
    """``strace -f -y`` attached to THIS process for the duration of a ``with`` block.

    ``counts`` maps (kind, where) -> calls, kind "sync" or "write", where "ledger",
    "volume" or "other" (by the path strace prints for the file descriptor)."""

    path = shutil.which("strace")

    def __init__(self, ledger_dir: str, volume_dirs: list[str]) -> None:
        self.ledger_dir = os.path.realpath(ledger_dir) + "/"
        self.volume_dirs = [os.path.realpath(d) + "/" for d in volume_dirs]
        self.counts: dict[tuple[str, str], int] = {}
        self.proc: subprocess.Popen | None = None
        self.out = ""

    @classmethod
    def unavailable(cls) -> str | None:
        """Why the fsync columns cannot be filled, or None."""
        if cls.path is None:
            return "strace not found (apt-get install strace)"
        return None

    def __enter__(self) -> "Strace":
        assert self.path is not None  # entered only when unavailable() found no reason
        # Yama (ptrace_scope=1) lets a process trace only its descendants: allow any tracer
        with_libc = ctypes.CDLL(None, use_errno=True)
        with_libc.prctl(0x59616D61, ctypes.c_ulong(-1 & 0xFFFFFFFFFFFFFFFF), 0, 0, 0)  # PR_SET_PTRACER, ANY
        fd, self.out = tempfile.mkstemp(prefix="coalesce-bench-strace-")
        os.close(fd)
        calls = ",".join(SYNC_CALLS + WRITE_CALLS)
        self.proc = subprocess.Popen(
            [
                self.path,
                "-f",
                "-qq",
                "-y",
                "-e",
                f"trace={calls}",
                "-e",
                "signal=none",
                "-o",
                self.out,
                "-p",
                str(os.getpid()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None  # stderr=PIPE
        deadline = time.monotonic() + 10
        while not self._attached():  # every thread of this process is traced
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.poll() is not None else ""
                self._stop()
                raise RuntimeError(f"strace could not attach: {err or 'timeout'}")
            time.sleep(0.01)
        return self

    def _attached(self) -> bool:
        assert self.proc is not None
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/status") as f:
                    tracer = next(int(x.split()[1]) for x in f if x.startswith("TracerPid:"))
            except (OSError, StopIteration):
                continue
            if tracer != self.proc.pid:
                return False
        return True

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # strace detaches and flushes its output
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def __exit__(self, *exc) -> None:
        self._stop()
        try:
            with open(self.out, errors="replace") as f:
                for line in f:
                    m = _LINE.match(line)
                    if not m or "resumed>" in line.split("(", 1)[0]:
                        continue  # the "<... resumed>" half of a split call
                    name, path = m.group(1), os.path.realpath(m.group(3) or "")
                    kind = "sync" if name in SYNC_CALLS else "write" if name in WRITE_CALLS else None
                    if kind is None:
                        continue
                    where = (
                        "ledger"
                        if path.startswith(self.ledger_dir)
                        else "volume"
                        if any(path.startswith(d) for d in self.volume_dirs)
                        else "other"
                    )
                    self.counts[(kind, where)] = self.counts.get((kind, where), 0) + 1
        finally:
            os.unlink(self.out)

    def get(self, kind: str, where: str) -> int:
        return self.counts.get((kind, where), 0)


def traced_cycle(h: Harness, meta: str, volume_dirs: list[str], why_not: list[str]) -> dict | None:
    """One cycle under strace: {"sync": (ledger, volume), "write": (ledger, volume), "commits": n}."""
    if why_not:
        h.cycle()
        return None
    c0 = h.agent.ledger.commits
    st = Strace(meta, volume_dirs)
    try:
        st.__enter__()
    except RuntimeError as exc:  # e.g. ptrace refused in a container: run untraced
        why_not.append(str(exc))
        h.cycle()
        return None
    try:
        h.cycle()
    finally:
        st.__exit__(None, None, None)
    other = st.get("sync", "other")
    if other:
        print(f"bench_scale: {other} fsync-family calls on other files", file=sys.stderr)
    return {
        "sync": (st.get("sync", "ledger"), st.get("sync", "volume")),
        "write": (st.get("write", "ledger"), st.get("write", "volume")),
        "commits": h.agent.ledger.commits - c0,
    }


def one(backend: str, n: int, cycles: int, seed: int, why_not: list[str]) -> dict:
    tmp = tempfile.mkdtemp(prefix="coalesce-bench-")
    try:
        return _one(tmp, backend, n, cycles, seed, why_not)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _one(tmp: str, backend: str, n: int, cycles: int, seed: int, why_not: list[str]) -> dict:
    names = qtree_names(n)
    if backend == "mem":
        src, dst = f"mem://bench-src-{n}-{seed}", f"mem://bench-dst-{n}-{seed}"
    else:
        src, dst = f"{backend}://{tmp}/src", f"{backend}://{tmp}/dst"
    text = replicas_config("b", src, dst, f"{tmp}/meta", names)
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
    vdirs = [f"{tmp}/src", f"{tmp}/dst"] if backend != "mem" else []
    nochange_io = traced_cycle(h, f"{tmp}/meta", vdirs, why_not)  # the same cycle again, under strace
    for q in names:
        h.writer.write(q, "f", rng.randbytes(64))
    commits0 = h.agent.ledger.commits
    t0, c0 = time.perf_counter(), cpu()
    h.cycle()
    small_s, small_cpu = time.perf_counter() - t0, cpu() - c0
    small_commits = h.agent.ledger.commits - commits0
    for q in names:
        h.writer.write(q, "f", rng.randbytes(64))
    small_io = traced_cycle(h, f"{tmp}/meta", vdirs, why_not)
    h.assert_invariants()
    close_harness(h)
    return {
        "backend": backend,
        "n": n,
        "peak_cycle": counter.peak_cycle,
        "peak_all": counter.peak_all,
        "at_rest": at_rest,
        "injected_failures": failures,
        "baseline_s": baseline_s,
        "nochange_s": nochange_s,
        "nochange_cpu": nochange_cpu,
        "small_s": small_s,
        "small_cpu": small_cpu,
        "commits": commits,
        "small_commits": small_commits,
        "nochange_io": nochange_io,
        "small_io": small_io,
    }


#: the fixed-cost scenario (tests/core/cycle/test_generations.py, the year of hourly cycles): who changes
#: every how many hours; C never does after its baseline
FIXED_CHANGES = {"A": 5, "B": 7}
FIXED_WARM = 50  # untimed cycles first: the retained generations build up
HOUR = 3600.0
BTRFS_SIZE = 1 << 30  # --backend btrfs: the loop file system's size (sparse)


class _Starts:
    """Counts the threads this process starts while a ``with`` block runs."""

    def __init__(self) -> None:
        self.n = 0
        self._real = threading.Thread.start

    def __enter__(self) -> "_Starts":
        real, me = self._real, self

        def start(thread: threading.Thread) -> None:
            me.n += 1
            real(thread)

        threading.Thread.start = start  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        threading.Thread.start = self._real  # type: ignore[method-assign]


def retention_toml(generations: int | None) -> str:
    """The ``[retention]`` of the fixed-cost scenario: its calendar policy (None), or one that holds
    ``generations`` G at steady state (``keep_min`` longer than any run, ``max = G``: each cycle
    keeps its old base and ``max`` prunes the oldest), or none at all (G = 0: the old base is
    released)."""
    if generations is None:
        return '[retention]\nkeep = "24h 7d 4w 12m"\n'
    if generations == 0:
        return ""
    return f'[retention]\nkeep_min = "520w"\nmax = {generations}\n'


class _PruneTimer:
    """Times the pure prune (``generations.prune``: the policy's view and plan) and the destination's
    release of each generation it prunes while a ``with`` block runs (wall, seconds)."""

    def __init__(self, dest: Any) -> None:
        self.dest = dest
        self.plan_s = 0.0
        self.release_s = 0.0
        self.pruned = 0
        self._names: set[str] = set()

    def __enter__(self) -> "_PruneTimer":
        real_prune, real_delete, me = gen.prune, self.dest.snapshot_delete, self

        def prune(state: Any, now: float) -> Any:
            t0 = time.perf_counter()
            plan = real_prune(state, now)
            me.plan_s += time.perf_counter() - t0
            me._names.update(g.id for g in plan.pruned)
            return plan

        def snapshot_delete(name: str) -> Any:
            if name not in me._names:
                return real_delete(name)
            t0 = time.perf_counter()
            try:
                return real_delete(name)
            finally:
                me.release_s += time.perf_counter() - t0
                me._names.discard(name)
                me.pruned += 1

        gen.prune = prune
        self.dest.snapshot_delete = snapshot_delete
        self._real = (real_prune, real_delete)
        return self

    def __exit__(self, *exc: object) -> None:
        gen.prune = self._real[0]
        del self.dest.snapshot_delete  # the instance's own attribute: the class's method again


def ledger_bytes(conn: sqlite3.Connection) -> tuple[int, int]:
    """The size of a ledger's database (its pages, the write-ahead log's included; not the log's
    file, which SQLite reuses) and the bytes of its manifests' JSON."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    manifests = conn.execute("SELECT coalesce(sum(length(data)), 0) FROM manifests").fetchone()[0]
    return pages, manifests


def fixed(backend: str, hours: int, idle: int, seed: int, generations: int | None = None) -> dict:
    """The fixed-cost scenario with ``idle`` more replicas that never change: per timed cycle. With
    ``generations`` G, under :func:`retention_toml` ``(G)``: untimed cycles until G generations are held
    (at least the usual 50), then every timed cycle keeps one and prunes one."""
    tmp = tempfile.mkdtemp(prefix="coalesce-bench-fixed-")
    h: Harness | None = None
    loop = LoopFS(BTRFS_SIZE) if backend == "btrfs" else None
    try:
        names = ["A", "B", "C"] + qtree_names(idle)
        if backend == "mem":  # mem volumes live as long as the process: one pair per run
            run_id = f"{idle}-{seed}" + ("" if generations is None else f"-g{generations}")
            src, dst = f"mem://bench-fixed-src-{run_id}", f"mem://bench-fixed-dst-{run_id}"
            if generations is not None:  # mem's limit is settable: room for G generations beside the cycle's
                room = generations + retention.WORKING_PCPIS
                coalesce_mem.volume_for(dst).max_pcpis = max(coalesce_mem.volume_for(dst).max_pcpis, room)
        else:
            where = tmp if loop is None else loop.up()  # btrfs: a loop file system of its own (root)
            src, dst = f"{backend}://{where}/src", f"{backend}://{where}/dst"
        text = replicas_config("f", src, dst, f"{tmp}/meta", names).replace("parallel=8", "parallel=4")
        text += retention_toml(generations)
        h = Harness(parse_config(text), clock=FakeClock(1_813_000_000.0))
        fill(h.writer, names, seed=seed)
        h.cycle()

        def run(first: int, last: int) -> None:
            assert h is not None and isinstance(h.clock, FakeClock)
            for hour in range(first, last):
                h.clock.advance(HOUR)
                for q, every in FIXED_CHANGES.items():
                    if hour % every == 0:
                        h.writer.write(q, "hourly", f"{q} at hour {hour}".encode())
                h.cycle()

        run(1, FIXED_WARM)
        warm = FIXED_WARM
        if generations is not None:
            while len(h.agent.state.generations()) < generations and warm < FIXED_WARM + 2 * generations:
                run(warm, warm + 1)
                warm += 1
            held = len(h.agent.state.generations())
            if held != generations:
                raise RuntimeError(f"{held} generations held after {warm} cycles, not {generations}")
        commits0 = h.agent.ledger.commits
        with _Starts() as starts, _PruneTimer(h.agent.dest) as pruning:
            t0, c0 = time.perf_counter(), cpu()
            run(warm, warm + hours)
            wall, used = time.perf_counter() - t0, cpu() - c0
        h.assert_invariants()
        held = len(h.agent.state.generations())
        if generations is not None and (held != generations or (generations and pruning.pruned != hours)):
            raise RuntimeError(
                f"not at steady state: {held} generations held, {pruning.pruned} pruned in {hours} cycles"
            )
        return {
            "backend": backend,
            "replicas": len(names),
            "idle": idle,
            "hours": hours,
            "cpu_ms": 1000 * used / hours,
            "wall_ms": 1000 * wall / hours,
            "commits": (h.agent.ledger.commits - commits0) / hours,
            "threads": starts.n / hours,
            "generations": held,
            "warm": warm,
            "pruned": pruning.pruned / hours,
            "plan_ms": 1000 * pruning.plan_s / hours,
            "release_ms": 1000 * pruning.release_s / hours,
            "ledger_kib": ledger_bytes(h.agent.ledger.conn)[0] / 1024,
            "manifests_kib": ledger_bytes(h.agent.ledger.conn)[1] / 1024,
        }
    finally:
        close_harness(h)
        if loop is not None:
            for problem in loop.down():
                print(f"bench_scale: {problem}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


def _without_fsync() -> None:
    """Every ledger opened from now on commits without fsync (``PRAGMA synchronous=OFF``), and every
    sim volume writes without (``COALESCE_SIM_FSYNC=0``)."""
    from coalesce_core.ledger import Ledger

    os.environ["COALESCE_SIM_FSYNC"] = "0"

    connect = Ledger._connect

    def without_fsync(cls, path):
        conn = connect(path)
        conn.execute("PRAGMA synchronous=OFF")
        return conn

    Ledger._connect = classmethod(without_fsync)  # type: ignore[method-assign,assignment]


def _fixed_provenance(args: argparse.Namespace, argv: list[str] | None, before: str) -> str:
    """The provenance comment of the ``--fixed`` tables (loads ``before`` the rows, and now)."""
    return provenance(
        f"{utc_now()}; {host()} sqlite {sqlite3.sqlite_version}; git {git_commit()}"
        + ("; ledger and volumes without fsync" if args.no_fsync else "; ledger and volumes durable"),
        f"loadavg {before} (start), {loads()} (end)",
        f"command: {command('bench_scale', argv or None)}",
    )


def main_fixed(args: argparse.Namespace, argv: list[str] | None) -> int:
    hours = 20 if args.quick else args.hours
    if args.no_fsync:
        _without_fsync()
    if args.generations is not None:
        return main_generations(args, argv, hours)
    idle = [0, 5] if args.quick else (args.idle or [0, 30])
    before = loads()
    rows = [fixed(args.backend, hours, k, args.seed) for k in idle]
    print(_fixed_provenance(args, argv, before))
    print(
        "| backend | replicas (idle) | timed cycles | CPU per cycle (ms) | wall per cycle (ms) "
        "| ledger commits per cycle | threads started per cycle |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['replicas']} ({r['idle']}) | {r['hours']} | {r['cpu_ms']:.2f} | {r['wall_ms']:.2f} "
            f"| {r['commits']:.1f} | {r['threads']:.2f} |",
            flush=True,
        )
    if len(rows) > 1 and rows[-1]["idle"] > rows[0]["idle"]:
        per = (rows[-1]["cpu_ms"] - rows[0]["cpu_ms"]) / (rows[-1]["idle"] - rows[0]["idle"])
        print(f"\nCPU per idle replica per cycle: {per:.3f} ms")
    return 0


def main_generations(args: argparse.Namespace, argv: list[str] | None, hours: int) -> int:
    """``--fixed --generations G ...``: the fixed cost per cycle with G retained generations held."""
    idle = args.idle or [0]
    before = loads()
    rows = [fixed(args.backend, hours, k, args.seed, g) for k in idle for g in args.generations]
    print(_fixed_provenance(args, argv, before))
    print(
        "| backend | replicas (idle) | generations held | untimed cycles | timed cycles | CPU per cycle (ms) "
        "| wall per cycle (ms) | ledger commits per cycle | pruned per cycle | prune plan (ms) "
        "| prune release (ms) | prune share of wall | ledger (KiB) | its manifests (KiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = (r["plan_ms"] + r["release_ms"]) / r["wall_ms"] if r["wall_ms"] else 0.0
        print(
            f"| {r['backend']} | {r['replicas']} ({r['idle']}) | {r['generations']} | {r['warm']} | {r['hours']} "
            f"| {r['cpu_ms']:.2f} | {r['wall_ms']:.2f} | {r['commits']:.1f} | {r['pruned']:.2f} "
            f"| {r['plan_ms']:.3f} | {r['release_ms']:.3f} | {100 * share:.1f} % | {r['ledger_kib']:.0f} | {r['manifests_kib']:.0f} |",
            flush=True,
        )
    return 0


def io_cells(io: dict | None) -> str:
    if io is None:
        return "n/a | n/a"
    return f"{io['sync'][0]} / {io['sync'][1]} | {io['write'][0]} / {io['write'][1]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="mem")
    ap.add_argument("--replicas", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="N=10 and 50 only")
    ap.add_argument("--no-strace", action="store_true", help="skip the fsync / metadata-write counts")
    ap.add_argument(
        "--fixed", action="store_true", help="the fixed cost of a cycle instead (hourly cycles, 3 replicas)"
    )
    ap.add_argument("--hours", type=int, default=500, help="--fixed: timed cycles")
    ap.add_argument("--no-fsync", action="store_true", help="--fixed: the ledger without fsync (the test's)")
    ap.add_argument(
        "--idle",
        type=int,
        nargs="+",
        help="--fixed: more replicas that never change (default 0 30; with --generations 0)",
    )
    ap.add_argument(
        "--generations",
        type=int,
        nargs="+",
        metavar="G",
        help="--fixed: with G retained generations held, each timed cycle keeping one and pruning one "
        "(sim holds at most 251, mem as many as asked; --backend btrfs: a loop btrfs of its own, root)",
    )
    args = ap.parse_args(argv)
    if args.fixed:
        return main_fixed(args, argv)
    sizes = [10, 50] if args.quick else args.replicas
    why_not: list[str] = []
    if args.no_strace:
        why_not.append("--no-strace")
    elif reason := Strace.unavailable():
        why_not.append(reason)
    if why_not:
        print(f"bench_scale: fsync/write columns n/a: {why_not[0]}", file=sys.stderr)
    strace_v = (
        ""
        if Strace.path is None
        else subprocess.run([Strace.path, "-V"], capture_output=True, text=True).stdout.split("\n")[0]
    )
    print(
        provenance(
            f"{platform.node()} {platform.machine()} python {platform.python_version()} sqlite "
            f"{sqlite3.sqlite_version} {strace_v or 'no strace'} cpus {os.cpu_count()} loadavg {loads()}",
            f"command: {command('bench_scale', argv or None)}",
        )
    )
    print(
        "| backend | replicas | cycle-role PCPIs at peak | all group PCPIs at peak | at rest | injected failures "
        "| baseline cycle (s) | no-change cycle wall (s) | CPU (s) | ledger commits | one change per replica wall (s) | CPU (s) "
        "| ledger commits | no-change fsyncs ledger / volume | writes ledger / volume "
        "| one-change fsyncs ledger / volume | writes ledger / volume |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        r = one(args.backend, n, args.cycles, args.seed, why_not)
        print(
            f"| {r['backend']} | {r['n']} | {r['peak_cycle']} | {r['peak_all']} | {r['at_rest']} | {r['injected_failures']} "
            f"| {r['baseline_s']:.2f} | {r['nochange_s']:.2f} | {r['nochange_cpu']:.2f} | {r['commits']} "
            f"| {r['small_s']:.2f} | {r['small_cpu']:.2f} | {r['small_commits']} "
            f"| {io_cells(r['nochange_io'])} | {io_cells(r['small_io'])} |",
            flush=True,
        )
    if why_not:
        print(f"\n<!-- fsync/write columns n/a: {why_not[0]} -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
