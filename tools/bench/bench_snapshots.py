"""Snapshot consumption vs number of replicas: coalesce (sim, btrfs) against btrbk on the same btrfs.

    python3 -m tools.bench.bench_snapshots [--quick] [--replicas 1 10 100 255 1000] [--cycles 3]
                                           [--tools sim btrfs btrbk] [--plot PATH] [-v]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

For each N, the same workload for every tool: N replicas ("qtrees") get a
64-byte file each, a baseline cycle copies them, then ``--cycles`` cycles
where 10% of the replicas change (at least 1) and 1% of them (at least 1,
chosen among the changed ones) have their transfer cut mid-way.  The number
of snapshots on the destination and on the source is counted after every
snapshot taken or released; the table gives the peak and the count at rest
(after the last cycle, the last cycle's failures still pending, as in
bench_scale.py).

* ``coalesce sim``: one group on two ``sim://`` volumes (fsync on), counted
  with the backend's snapshot list hook (read from the volume), after every
  ``coalesce_snapshot_create`` / ``coalesce_snapshot_delete``.  Failures:
  ``Rule(hook="coalesce_diff", qtree=q, record=1, times=1, volume="src")``,
  as in bench_scale.py.
* ``coalesce btrfs``: the same group with btrfs:// source and destination on
  the bench's own loop btrfs (common.LoopFS), counted with ``btrfs
  subvolume list`` after every snapshot create / delete (the time spent
  counting is subtracted from the wall time).
* ``btrbk``: btrbk (Debian's package) with its DEFAULT retention
  (snapshot_preserve_min and target_preserve_min ``all``; snapshot_create
  ``always``; incremental ``yes``) on the SAME loop btrfs, the N qtrees being
  N source subvolumes ``q0000..`` of one ``volume`` section, snapshots in
  ``btrbk_snapshots/`` and one send-receive ``target`` directory; ``btrbk
  run`` once for the baseline and once per cycle, with the changes written
  before each run.  btrbk runs ``btrfs`` through a wrapper (first in its
  PATH) that counts the entries of the snapshot and target directories
  after every ``btrfs subvolume snapshot|delete`` and ``btrfs receive``, and
  cuts the ``btrfs send`` of the chosen subvolumes half-way (the first half
  of the real stream, then exit 1): a transfer cut mid-way, as for
  coalesce.  The at-rest figures are read with ``btrfs subvolume list``.

Wall time: the cycles / ``btrbk run`` calls only (not the writes, not the
counting).  Prints a markdown table and writes a PNG (log-log: N vs
snapshots; ``--plot PATH``, default docs/img/snapshot-consumption.png;
``--quick`` writes it to a temporary directory).  Needs root for btrfs and
btrbk; without root only the sim part runs.  ``--quick``: N = 1 and 3.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from coalesce_core.backend.faults import Rule
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.config import parse_config
from coalesce_core.testing.harness import Harness
from tools.bench.common import (
    ROOT,
    SBIN_PATH,
    LoopFS,
    bench_dir,
    close_harness,
    command,
    fanin_config,
    host,
    loads,
    md_table,
    progress,
    provenance,
    qtree_names,
    replicas_config,
    run,
    self_cpu,
    source_layout,
    utc_now,
)

DEFAULT_PLOT = ROOT / "docs" / "img" / "snapshot-consumption.png"
TOOLS = ("sim", "btrfs", "btrbk")
LABEL = {"sim": "coalesce (sim)", "btrfs": "coalesce (btrfs)", "btrbk": "btrbk 0.32 (btrfs), default retention"}


# ---------------------------------------------------------------------------
# the workload, identical for every tool
# ---------------------------------------------------------------------------
def plan(n: int, cycles: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Per update cycle: (replicas changed, replicas whose transfer is cut), from one seeded RNG."""
    rng = random.Random(seed)
    names = qtree_names(n)
    out = []
    for _ in range(cycles):
        changed = sorted(rng.sample(names, max(1, n // 10)))
        failed = sorted(rng.sample(changed, max(1, n // 100)))
        out.append((changed, failed))
    return out


# ---------------------------------------------------------------------------
# coalesce
# ---------------------------------------------------------------------------
class SnapCounter:
    """After every snapshot create / delete (any volume), count the snapshots on both volumes
    (while :attr:`enabled`)."""

    def __init__(self, count) -> None:
        self.count = count  # () -> (source, destination)
        self.peak_src = self.peak_dst = self.peak_sum = 0
        self.events = 0
        self.count_s = 0.0  # time spent counting (subtracted from the wall time)
        self.enabled = True
        self.lock = threading.Lock()

    def _after(self) -> None:
        if not self.enabled:
            return
        with self.lock:
            t0 = time.perf_counter()
            s, d = self.count()
            self.count_s += time.perf_counter() - t0
            self.events += 1
            self.peak_src, self.peak_dst = max(self.peak_src, s), max(self.peak_dst, d)
            self.peak_sum = max(self.peak_sum, s + d)

    @hookimpl(wrapper=True)
    def coalesce_snapshot_create(self, volume, name):
        try:
            return (yield)
        finally:
            self._after()

    @hookimpl(wrapper=True)
    def coalesce_snapshot_delete(self, volume, name):
        try:
            return (yield)
        finally:
            self._after()


def btrfs_list(mnt: str) -> list[str]:
    """Paths (relative to the top-level subvolume) of every subvolume on the file system."""
    out = run(["btrfs", "subvolume", "list", mnt]).stdout
    return [line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line]


def settle(h: Harness, rounds: int = 5) -> int:
    """Run cycles until every replica is ``stable`` (the cut transfers retried); returns how many ran."""
    for i in range(rounds):
        if all(s == "stable" for s in h.states().values()):
            return i
        h.cycle()
    bad = {r: s for r, s in h.states().items() if s != "stable"}
    raise RuntimeError(f"replicas not stable after {rounds} cycles: {bad}")


def idle_cycles(h: Harness, times: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (this process and its reaped children: the ``btrfs`` commands) of ``times`` calls of
    ``run_cycle`` in which no source changed."""
    walls, cpus = [], []
    for _ in range(times):
        c0, t0 = self_cpu(), time.perf_counter()
        report = h.agent.run_cycle()
        walls.append(time.perf_counter() - t0)
        cpus.append(self_cpu() - c0)
        if not report:
            raise RuntimeError(f"an idle cycle did not run: {h.agent.refusals}")
    return walls, cpus


def coalesce_run(
    backend: str, n: int, cycles: int, seed: int, where: str, mnt: str | None, sources: int = 1, idle: int = 0
) -> dict:
    """``where``: a fresh directory (sim volumes, or under the btrfs mount for btrfs).  ``sources``: the
    group's source volumes (common.source_layout; more than one: a fan-in group of ``[[source]]``
    tables).  ``idle``: after the workload and the counts at rest, settle every replica and time that
    many cycles in which no source changed (:func:`idle_cycles`; the snapshots are not counted then)."""
    layout = source_layout(n, sources)
    names = [q for qs in layout.values() for q in qs]
    urls = {s: f"{backend}://{where}/{s}" for s in layout}
    dst = f"{backend}://{where}/dst"
    meta = os.path.join(where, "meta")
    if sources == 1:
        text = replicas_config("snap", urls["src"], dst, meta, names)
        origin = dict.fromkeys(names, "default")
    else:
        text = fanin_config("snap", {s: (urls[s], qs) for s, qs in layout.items()}, dst, meta)
        origin = {q: s for s, qs in layout.items() for q in qs}
    holder: dict = {}
    if backend == "btrfs":
        assert mnt is not None
        rel = os.path.relpath(where, mnt)
        # the source volumes src, or src00, src01, ...: their PCPIs in .coalesce-snapshots/src*/
        src_pre, dst_pre = f"{rel}/.coalesce-snapshots/src", f"{rel}/.coalesce-snapshots/dst/"

        def count():
            paths = btrfs_list(mnt)
            return (sum(p.startswith(src_pre) for p in paths), sum(p.startswith(dst_pre) for p in paths))
    else:

        def count():
            a = holder["h"].agent
            return sum(len(a.source_volume(s).snapshot_list()) for s in set(origin.values())), len(
                a.dest.snapshot_list()
            )

    counter = SnapCounter(count)
    h = Harness(parse_config(text), plugins=[counter])
    holder["h"] = h
    try:
        data = random.Random(seed + 1)
        for q in names:
            h.writers[origin[q]].write(q, "f", data.randbytes(64))
        wall = 0.0
        t0 = time.perf_counter()
        h.cycle()
        wall += time.perf_counter() - t0
        rules = []
        for changed, failed in plan(n, cycles, seed):
            for q in changed:
                h.writers[origin[q]].write(q, "f", data.randbytes(64))
            for q in failed:
                r = Rule(hook="coalesce_diff", qtree=q, record=1, times=1, volume="src")
                rules.append(r)
                h.faults.add(r)
            t0 = time.perf_counter()
            h.cycle()
            wall += time.perf_counter() - t0
        c0 = counter.count_s
        rest_src, rest_dst = count()
        counter.count_s = c0
        fired = sum(r.fired for r in rules)
        h.assert_invariants()
        # every snapshot-count event happened inside a timed cycle: take the counting out
        wall -= counter.count_s
        counter.enabled = False
        idle_wall: list[float] = []
        idle_cpu: list[float] = []
        settled = 0
        if idle:
            settled = settle(h)
            idle_wall, idle_cpu = idle_cycles(h, idle)
            h.assert_invariants()
    finally:
        close_harness(h)
    return {
        "tool": backend,
        "n": n,
        "sources": sources,
        "cycles": cycles,
        "peak_dst": counter.peak_dst,
        "rest_dst": rest_dst,
        "peak_src": counter.peak_src,
        "rest_src": rest_src,
        "peak_sum": counter.peak_sum,
        "failures": len(rules),
        "fired": fired,
        "events": counter.events,
        "wall": wall,
        "settled": settled,
        "idle_wall": idle_wall,
        "idle_cpu": idle_cpu,
    }


# ---------------------------------------------------------------------------
# btrbk
# ---------------------------------------------------------------------------
WRAPPER = r"""#!/bin/bash
# btrfs wrapper for btrbk in tools/bench/bench_snapshots.py: counts snapshots after every
# snapshot / delete / receive, and cuts the send of the subvolumes listed in $FAIL half-way.
# @SNAPGLOB@: the snapshots of every source volume (one btrbk_snapshots directory per volume).
REAL=@REAL@
LOG=@LOG@
FAIL=@FAIL@
TGTDIR=@TGTDIR@
count() {
    local t0=$EPOCHREALTIME
    shopt -s nullglob
    local s=(@SNAPGLOB@) t=("$TGTDIR"/*.*)
    echo "count $1 ${#s[@]} ${#t[@]} ${t0/./} ${EPOCHREALTIME/./}" >> "$LOG"
}
case "$1" in
    send)
        snap="${@: -1}"
        name="${snap##*/}"
        sub="${name%%.*}"
        if [ -e "$FAIL/$sub" ]; then
            rm -f "$FAIL/$sub"
            tmp=$(mktemp)
            "$REAL" "$@" > "$tmp" || { rm -f "$tmp"; exit 1; }
            size=$(stat -c %s "$tmp")
            head -c $((size / 2)) "$tmp"
            rm -f "$tmp"
            echo "cut $sub $size" >> "$LOG"
            echo "btrfs send: transfer of $name cut after $((size / 2)) of $size bytes (injected)" >&2
            exit 1
        fi
        exec "$REAL" "$@" ;;
    receive)
        "$REAL" "$@"; rc=$?; count receive; exit $rc ;;
    subvolume)
        case "$2" in
            snapshot|delete) "$REAL" "$@"; rc=$?; count "$2"; exit $rc ;;
        esac
        exec "$REAL" "$@" ;;
    *)
        exec "$REAL" "$@" ;;
esac
"""


def btrbk_version() -> str:
    p = run(["btrbk", "--version"], check=False)
    return p.stdout.strip().rsplit(" ", 1)[-1] if p.returncode == 0 else "not installed"


def btrbk_run(n: int, cycles: int, seed: int, where: str, mnt: str, log, sources: int = 1) -> dict:
    """btrbk on the workload of :func:`plan`, in ``where`` on the loop btrfs mounted at ``mnt``.
    ``sources`` 1: one ``volume`` section ``where/src`` holding the N subvolumes; more: the fan-in of
    common.source_layout, a ``volume`` section per source (``where/src/src00``, ..., each a subvolume
    holding its subvolumes and its own ``btrbk_snapshots``), every one sending to the same ``target``."""
    layout = source_layout(n, sources)
    names = [q for qs in layout.values() for q in qs]
    top, tgt = os.path.join(where, "src"), os.path.join(where, "target")
    vols = {s: top if sources == 1 else os.path.join(top, s) for s in layout}
    volume_of = {q: vols[s] for s, qs in layout.items() for q in qs}
    bindir, faildir = os.path.join(where, "bin"), os.path.join(where, "fail")
    wlog = os.path.join(where, "wrapper.log")
    for d in (top, tgt, bindir, faildir):
        os.makedirs(d)
    for v in vols.values():
        if v != top:
            run(["btrfs", "subvolume", "create", v])
        os.makedirs(os.path.join(v, "btrbk_snapshots"))
    snapglob = shlex.quote(top) + ("/btrbk_snapshots/*.*" if sources == 1 else "/*/btrbk_snapshots/*.*")
    real = shutil.which("btrfs", path=os.environ.get("PATH", "") + ":" + SBIN_PATH)
    if real is None:
        raise RuntimeError(f"btrfs not found (PATH, {SBIN_PATH})")
    script = (
        WRAPPER.replace("@REAL@", real)
        .replace("@LOG@", wlog)
        .replace("@FAIL@", faildir)
        .replace("@SNAPGLOB@", snapglob)
        .replace("@TGTDIR@", tgt)
    )
    Path(bindir, "btrfs").write_text(script)
    os.chmod(os.path.join(bindir, "btrfs"), 0o755)
    # the default retention: no *_preserve* option at all (snapshot_preserve_min / target_preserve_min: all)
    conf = os.path.join(where, "btrbk.conf")
    Path(conf).write_text(
        "".join(
            f"volume {vols[s]}\n  snapshot_dir btrbk_snapshots\n  target {tgt}\n"
            + "".join(f"  subvolume {q}\n" for q in qs)
            for s, qs in layout.items()
        )
    )
    for q in names:
        run(["btrfs", "subvolume", "create", os.path.join(volume_of[q], q)])
    env = dict(os.environ, PATH=bindir + ":" + os.environ.get("PATH", "") + ":" + SBIN_PATH)
    data = random.Random(seed + 1)

    def write(q: str) -> None:
        with open(os.path.join(volume_of[q], q, "f"), "wb") as f:
            f.write(data.randbytes(64))

    def btrbk() -> tuple[float, int, str]:
        os.sync()
        t0 = time.perf_counter()
        p = subprocess.run(["btrbk", "-c", conf, "run"], capture_output=True, text=True, env=env)
        return time.perf_counter() - t0, p.returncode, p.stdout + p.stderr

    for q in names:
        write(q)
    runs = []
    wall, rc, out = btrbk()
    runs.append((wall, rc, out))
    injected = 0
    for changed, failed in plan(n, cycles, seed):
        for q in changed:
            write(q)
        for q in failed:
            Path(faildir, q).touch()
            injected += 1
        wall, rc, out = btrbk()
        runs.append((wall, rc, out))
        log(f"btrbk N={n}: run {len(runs)} {wall:.1f} s rc {rc}")
    peak_s = peak_t = peak_sum = 0
    count_s = 0.0
    cut = 0
    for line in Path(wlog).read_text().splitlines():
        f = line.split()
        if f[0] == "count":
            s, t = int(f[2]), int(f[3])
            peak_s, peak_t, peak_sum = max(peak_s, s), max(peak_t, t), max(peak_sum, s + t)
            count_s += (int(f[5]) - int(f[4])) / 1e6
        elif f[0] == "cut":
            cut += 1
    paths = btrfs_list(mnt)
    rel = os.path.relpath(where, mnt)
    rest_s = sum(p.startswith(f"{rel}/src/") and "/btrbk_snapshots/" in p for p in paths)
    rest_t = sum(p.startswith(f"{rel}/target/") for p in paths)
    alltext = "\n".join(o for _, _, o in runs)
    garbled = alltext.count("Deleted partially received (garbled) subvolume")
    bad_rc = [rc for _, rc, _ in runs if rc not in (0, 10)]
    if bad_rc or (not injected and any(rc for _, rc, _ in runs)):
        raise RuntimeError(f"btrbk run failed (rc {[rc for _, rc, _ in runs]}): {alltext[-2000:]}")
    # the newest backup of every subvolume (`subvolume list` is in creation order) holds what the
    # source holds now, except for those whose transfer was cut in the last run
    latest = {}
    for p in paths:
        if p.startswith(f"{rel}/target/"):
            latest[p.rsplit("/", 1)[1].split(".", 1)[0]] = p
    last_failed = set(plan(n, cycles, seed)[-1][1]) if cycles else set()
    for q in names:
        if q not in latest:
            raise RuntimeError(f"btrbk: no backup at all for {q}")
        if q not in last_failed:
            a = Path(volume_of[q], q, "f").read_bytes()
            b = Path(mnt, latest[q], "f").read_bytes()
            if a != b:
                raise RuntimeError(f"btrbk: newest backup {latest[q]} differs from the source")
    return {
        "tool": "btrbk",
        "n": n,
        "sources": sources,
        "cycles": cycles,
        "peak_dst": peak_t,
        "rest_dst": rest_t,
        "peak_src": peak_s,
        "rest_src": rest_s,
        "peak_sum": peak_sum,
        "failures": injected,
        "fired": cut,
        "garbled_deleted": garbled,
        "rcs": [rc for _, rc, _ in runs],
        "wall": sum(w for w, _, _ in runs) - count_s,
        "log_tail": alltext[-1500:],
    }


def cleanup_btrfs_dir(mnt: str, where: str) -> None:
    """Delete every subvolume under ``where`` (deepest first), then the directory."""
    rel = os.path.relpath(where, mnt)
    subs = sorted((p for p in btrfs_list(mnt) if p.startswith(rel + "/")), key=lambda p: -p.count("/"))
    for i in range(0, len(subs), 200):
        run(["btrfs", "subvolume", "delete"] + [os.path.join(mnt, p) for p in subs[i : i + 200]], check=False)
    shutil.rmtree(where, ignore_errors=True)


def run_in_own_dir(mnt: str, name: str, label: str, tool_run: Any, log: Any) -> dict:
    """``tool_run(where)`` in a new directory ``mnt/name`` of the loop btrfs, logged under ``label``;
    its subvolumes and the directory are deleted after (the cleanup timed apart). Its row."""
    where = os.path.join(mnt, name)
    os.makedirs(where)
    r = tool_run(where)
    log(f"{label}: " + str({k: v for k, v in r.items() if k != "log_tail"}))
    t0 = time.perf_counter()
    cleanup_btrfs_dir(mnt, where)
    log(f"{label}: cleanup {time.perf_counter() - t0:.1f} s")
    return r


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    return md_table(
        "| tool | replicas (N) | destination snapshots: peak | at rest | source snapshots: peak | at rest "
        "| transfers cut (fired) | wall time (s) |",
        (
            f"| {LABEL[r['tool']]} | {r['n']} | {r['peak_dst']} | {r['rest_dst']} | {r['peak_src']} "
            f"| {r['rest_src']} | {r['failures']} ({r['fired']}) | {r['wall']:.1f} |"
            for r in rows
        ),
    )


def plot(rows: list[dict], path: str, title: str, projected: Collection[int] = (), runs: int = 4) -> None:
    """``projected``: N for which btrbk was not run; drawn dotted at N x ``runs`` (its default retention
    deletes nothing, so every run adds one snapshot per subvolume on each side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    # sim and btrfs give the same counts: sim is drawn wider underneath so that both stay visible
    style = {"sim": ("tab:blue", "o", 9, 4), "btrfs": ("tab:green", "s", 5, 1.5), "btrbk": ("tab:red", "^", 6, 1.5)}
    ns = sorted({r["n"] for r in rows} | set(projected))
    for ax, side, what in ((axes[0], "dst", "destination"), (axes[1], "src", "source")):
        for tool in TOOLS:
            rs = sorted((r for r in rows if r["tool"] == tool), key=lambda r: r["n"])
            if not rs:
                continue
            color, marker, size, width = style[tool]
            line: dict[str, Any] = dict(color=color, marker=marker, markersize=size, linewidth=width)
            xs = [r["n"] for r in rs]
            ax.plot(xs, [r[f"peak_{side}"] for r in rs], **line, label=f"{LABEL[tool]}: peak")
            ax.plot(
                xs,
                [r[f"rest_{side}"] for r in rs],
                **line,
                linestyle="--",
                markerfacecolor="none",
                label=f"{LABEL[tool]}: at rest",
            )
            if tool == "btrbk" and projected:
                px = [xs[-1]] + sorted(projected)
                py = [rs[-1][f"peak_{side}"]] + [n * runs for n in sorted(projected)]
                ax.plot(
                    px, py, color=color, linestyle=":", marker="x", label=f"btrbk projected, not run: N x {runs} runs"
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ns))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("replicas (N)")
        ax.set_title(f"{what} snapshots")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("snapshots (log scale)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 10, 100, 255, 1000])
    ap.add_argument("--cycles", type=int, default=3, help="update cycles after the baseline (default 3)")
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    ap.add_argument("--btrbk-max", type=int, default=None, help="skip btrbk for N above this (say so in the doc)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fs-gib", type=float, default=8.0, help="sparse loop file size per N")
    ap.add_argument(
        "--plot",
        default=None,
        help=f"PNG path (default {DEFAULT_PLOT.relative_to(ROOT)}; --quick: a temporary directory)",
    )
    ap.add_argument("--quick", action="store_true", help="N = 1 and 3 (seconds): a smoke test")
    ap.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)
    sizes = [1, 3] if args.quick else args.replicas
    log = progress(args.verbose)
    try:
        import matplotlib
    except ImportError:
        print("bench_snapshots.py needs matplotlib (pip install -e '.[test]')", file=sys.stderr)
        return 2
    tools = list(args.tools)
    if os.geteuid() != 0 and (set(tools) - {"sim"}):
        print(
            "bench_snapshots.py: not root, running the sim part only (btrfs and btrbk need a loop btrfs)",
            file=sys.stderr,
        )
        tools = [t for t in tools if t == "sim"]
    if "btrbk" in tools and not shutil.which("btrbk"):
        print("bench_snapshots.py: btrbk is not installed (apt-get install btrbk)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    when = utc_now()
    load0 = os.getloadavg()
    rows: list[dict] = []
    problems: list[str] = []
    for n in sizes:
        if "sim" in tools:
            tmp = tempfile.mkdtemp(prefix="coalesce-bench-snap-", dir=bench_dir())
            try:
                r = coalesce_run("sim", n, args.cycles, args.seed, tmp, None)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log(f"sim N={n}: {r}")
            rows.append(r)
        fs_tools = [
            t
            for t in tools
            if t in ("btrfs", "btrbk") and not (t == "btrbk" and args.btrbk_max is not None and n > args.btrbk_max)
        ]
        if fs_tools:
            fs = LoopFS(int(args.fs_gib * (1 << 30)))
            try:
                mnt = fs.up()
                for t in fs_tools:
                    rows.append(
                        run_in_own_dir(
                            mnt,
                            f"{t}-{n}",
                            f"{t} N={n}",
                            lambda where: (
                                coalesce_run("btrfs", n, args.cycles, args.seed, where, mnt)
                                if t == "btrfs"
                                else btrbk_run(n, args.cycles, args.seed, where, mnt, log)
                            ),
                            log,
                        )
                    )
            finally:
                problems += fs.down()
    total = time.perf_counter() - started
    load1 = os.getloadavg()
    order = {t: i for i, t in enumerate(TOOLS)}
    rows.sort(key=lambda r: (order[r["tool"]], r["n"]))
    cmd = command("bench_snapshots", argv)
    versions = (
        f"btrfs-progs {run(['btrfs', '--version'], check=False).stdout.strip().split()[-1]} btrbk {btrbk_version()} "
        if os.geteuid() == 0
        else ""
    )
    print(
        provenance(
            when,
            f"{host(node=True)} {versions}matplotlib {matplotlib.__version__}",
            f"load average {loads(load0)} at start, {loads(load1)} at end",
            f"{args.fs_gib:g} GiB btrfs on a loop file under {bench_dir()} per N",
            f"command: {cmd}",
            f"script ran {total:.0f} s",
        )
    )
    print(table(rows))
    btr = [r for r in rows if r["tool"] == "btrbk"]
    for r in btr:
        print(
            f"\n<!-- btrbk N={r['n']}: `btrbk run` exit codes {r['rcs']}; {r['garbled_deleted']} partially received "
            f"(garbled) targets deleted by btrbk -->",
            end="",
        )
    if btr:
        print()
    path = args.plot or (
        os.path.join(tempfile.mkdtemp(prefix="coalesce-bench-plot-"), "snapshot-consumption.png")
        if args.quick
        else str(DEFAULT_PLOT)
    )
    capped = [n for n in sizes if "btrbk" in tools and args.btrbk_max is not None and n > args.btrbk_max]
    plot(
        rows,
        path,
        f"snapshots over a baseline + {args.cycles} cycles with transfers cut mid-way "
        f"(1% of replicas per cycle, at least 1)",
        projected=capped,
        runs=args.cycles + 1,
    )
    if args.quick and not args.plot:  # a smoke test: check the PNG, leave nothing behind
        ok = Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        print(
            f"\nplot: a {'valid' if ok else 'BROKEN'} PNG was written to a temporary directory (removed; --plot PATH keeps it)"
        )
        if not ok:
            problems.append("the plot is not a PNG")
    else:
        print(f"\nplot: {path}")
    for p in problems:
        print(f"cleanup: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
