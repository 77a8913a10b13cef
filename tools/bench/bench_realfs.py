#!/usr/bin/env python3
"""One update on a real btrfs, coalesce versus the native `btrfs send -p | btrfs receive`.

    python tools/bench/bench_realfs.py [--quick] [--size-mib 1024] [--small-files 20000] [--fs-gib N]
                                       [--profile DIR]

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
import datetime
import hashlib
import importlib.util
import gc
import os
import platform
import pstats
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from coalesce_core.config import parse_config  # noqa: E402
from coalesce_core.backend.faults import Rule  # noqa: E402
from coalesce_core.backend.hookspecs import hookimpl  # noqa: E402
from coalesce_core.testing.harness import Harness  # noqa: E402

SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MiB = 1 << 20
QTREE = "q"
N_BIG = 8



#: ``[group] verify`` of the benchmark groups (--no-verify: false)
VERIFY = [True]


def group_config(work: str, name: str, source: str, destination: str, spool: bool | None = None):
    """Write ``work/group.toml`` for a one-replica group (qtree QTREE, 4 workers, metadata in
    ``work/meta``, retries at once; ``spool`` None: the default; ``verify`` as VERIFY says) and
    return it parsed."""
    text = (f'[group]\nname="{name}"\nsource="{source}"\ndestination="{destination}"\n'
            f'parallel=4\nmetadata="{work}/meta"\nverify={str(VERIFY[0]).lower()}\n'
            + ("" if spool is None else f"spool={str(spool).lower()}\n")
            + f'[group.retry]\ninitial=0.0\nfactor=2\nmaximum=60\n[[replica]]\nname="{QTREE}"\n')
    path = os.path.join(work, "group.toml")
    Path(path).write_text(text)
    return parse_config(text, path)

def close_harness(h) -> None:
    """Close a benchmark group's agent and ledger, whatever state a failed run left them in."""
    if h is None:
        return
    with contextlib.suppress(Exception):
        h.agent.close()
    with contextlib.suppress(Exception):
        h.agent.ledger.close()


def zfs_received(dst_ds: str, src_ds: str, prev: str | None) -> None:
    """After a native ``zfs receive`` into ``dst_ds`` (untimed): remount it, because its FUSE
    mount keeps stale cached pages after a receive and the check must read what was received,
    and destroy the previous snapshot pair, no longer the base of anything."""
    run(["zfs", "unmount", dst_ds], check=False)
    run(["zfs", "mount", dst_ds], check=False)
    if prev:
        run(["zfs", "destroy", f"{src_ds}@{prev}"], check=False)
        run(["zfs", "destroy", f"{dst_ds}@{prev}"], check=False)


def _realfs_tool():
    spec = importlib.util.spec_from_file_location("coalesce_tools_realfs", ROOT / "tools" / "realfs.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":" + SBIN_PATH)
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


ATTACH: list[str] = []          # --attach command templates
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
    zpid = (_realfs_tool()._zfs_fuse_pids() or [0])[0]
    os.makedirs(ATTACH_DIR, exist_ok=True)
    procs = []
    for i, tmpl in enumerate(ATTACH):
        out = os.path.join(ATTACH_DIR, f"{_ATTACH_SEQ[0]:02d}-{slug}-{i}")
        argv = shlex.split(tmpl.format(pid=os.getpid(), zfs_pid=zpid, out=out))
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(out + ".err", "wb")))
    time.sleep(1.0)                                  # attached before the timed part starts
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


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------
# our own loop file system
# ---------------------------------------------------------------------------

def pipeline(send_argv: list[str], recv_argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run ``send | receive`` (no shell); raise with both stderrs if either side fails."""
    send = subprocess.Popen(send_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    recv = subprocess.Popen(recv_argv, stdin=send.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert send.stdout is not None
    send.stdout.close()
    _, rerr = recv.communicate()
    serr = send.stderr.read() if send.stderr else b""
    send.wait()
    if send.returncode or recv.returncode:
        raise RuntimeError(f"{what} failed: send {send.returncode} {serr!r}, receive {recv.returncode} {rerr!r}")

class LoopFS:
    def __init__(self, size: int) -> None:
        base = os.environ.get("COALESCE_BENCH_DIR", "/var/tmp")
        self.dir = tempfile.mkdtemp(prefix="coalesce-bench-realfs-", dir=base)
        self.img = os.path.join(self.dir, "btrfs.img")
        self.mnt = os.path.join(self.dir, "mnt")
        self.size = size
        self.loop: str | None = None
        self.mounted = False

    def up(self) -> str:
        os.makedirs(self.mnt)
        with open(self.img, "wb") as f:
            f.truncate(self.size)
        self.loop = run(["losetup", "-f", "--show", self.img]).stdout.strip()
        run(["mkfs.btrfs", "-q", "-f", self.loop])
        run(["mount", "-t", "btrfs", self.loop, self.mnt])
        self.mounted = True
        return self.mnt

    def down(self) -> list[str]:
        problems = []
        # a transfer cut by an injected fault (the rollback rows) leaves its source stream, and an
        # open file of a source PCPI, in the fault's traceback until the cycle collector runs
        gc.collect()
        if self.mounted:
            if run(["umount", self.mnt], check=False).returncode != 0:
                time.sleep(1)
                if run(["umount", self.mnt], check=False).returncode != 0:
                    p = run(["umount", "-l", self.mnt], check=False)
                    problems.append(f"lazy unmount of {self.mnt} (rc {p.returncode})")
            self.mounted = False
        if self.loop:
            p = run(["losetup", "-d", self.loop], check=False)
            if p.returncode != 0:
                problems.append(f"losetup -d {self.loop}: {p.stderr.strip()}")
            self.loop = None
        shutil.rmtree(self.dir, ignore_errors=True)
        if os.path.exists(self.dir):
            problems.append(f"{self.dir} not removed")
        return problems


# ---------------------------------------------------------------------------
# timing plugin
# ---------------------------------------------------------------------------
class Timer:
    """Wall time per primitive hook (the wrapper includes every implementation, generic ones too).

    With ``profile`` set (a ``cProfile.Profile``), the diff and apply calls are profiled: they run
    in the agent's transfer thread, which cProfile started from the main thread would not see."""

    def __init__(self) -> None:
        self.t: dict[str, list[float]] = {}
        self.profile = None

    def reset(self) -> None:
        self.t = {}

    def _add(self, hook: str, dt: float) -> None:
        self.t.setdefault(hook, []).append(dt)

    def total(self, hook: str) -> float:
        return sum(self.t.get(hook, []))

    @contextlib.contextmanager
    def _timed(self, hook: str):
        prof = self.profile if hook in ("diff", "apply") else None
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._add(hook, time.perf_counter() - t0)
            if prof is not None:
                prof.disable()

    @contextlib.contextmanager
    def verify_timed(self):
        """Time the check before `done` after the apply (coalesce_core.verifier.TransferCheck.run) while
        the block runs (its source side described during the apply is not in it: that overlaps)."""
        from coalesce_core import verifier

        real = verifier.TransferCheck.run

        def timed(check):
            with self._timed("verify"):
                return real(check)

        verifier.TransferCheck.run = timed
        try:
            yield
        finally:
            verifier.TransferCheck.run = real

    @hookimpl(wrapper=True)
    def coalesce_rollback(self, volume, qtree, rollback_pcpi, to_pcpi):
        with self._timed("rollback"):
            return (yield)

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume, qtree, records, use_purgatory):
        with self._timed("apply"):          # consumes the diff's records: read source + write dest
            return (yield)

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree, base, target):
        with self._timed("diff"):           # btrfs: the `btrfs send --no-data` run and its parse
            return (yield)

    @hookimpl(wrapper=True)
    def coalesce_snapshot_create(self, volume, name):
        with self._timed("snapshot"):
            return (yield)


def save_profile(prof, out_dir: str, n: int, label: str, log) -> None:
    """``<n>-<label>.prof`` (pstats) and ``.txt`` (top entries by own time and by cumulative time)."""
    os.makedirs(out_dir, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")[:40].rstrip("-")
    base = os.path.join(out_dir, f"{n}-{slug}")
    prof.dump_stats(base + ".prof")
    with open(base + ".txt", "w") as f:
        for key in ("tottime", "cumulative"):
            pstats.Stats(prof, stream=f).strip_dirs().sort_stats(key).print_stats(30)
    log(f"profile of the diff and apply calls: {base}.prof / .txt")


# ---------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------
def write_big(qdir: str, total_mib: int, rnd: random.Random) -> int:
    d = os.path.join(qdir, "big")
    os.makedirs(d, exist_ok=True)
    per = max(1, total_mib // N_BIG) * MiB
    for i in range(N_BIG):
        with open(os.path.join(d, f"f{i}.bin"), "wb") as f:  # rewritten from offset 0, same size
            left = per
            while left:
                n = min(left, 16 * MiB)
                f.write(rnd.randbytes(n))
                left -= n
    return N_BIG * per


def write_small(qdir: str, count: int, rnd: random.Random) -> int:
    d = os.path.join(qdir, "small")
    for i in range(count):
        sub = os.path.join(d, f"d{i % 20:02d}")
        if i < 20:
            os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i:06d}"), "wb") as f:
            f.write(rnd.randbytes(4096))
    return count * 4096


def same_tree(a: str, b: str, rnd: random.Random) -> str | None:
    """Names, types and sizes of every entry, plus sampled bytes of every file over 64 KiB and of
    up to 200 others; None if equal."""
    def listing(top):
        out = {}
        for dp, dns, fns in os.walk(top):
            dns[:] = [x for x in dns if not x.startswith(".coalesce")]
            for n in fns:
                p = os.path.join(dp, n)
                out[os.path.relpath(p, top)] = os.lstat(p).st_size
        return out
    la, lb = listing(a), listing(b)
    if la != lb:
        diff = sorted(set(la.items()) ^ set(lb.items()))[:5]
        return f"listings differ ({len(la)} vs {len(lb)} files): {diff}"
    # every large file, and a sample of 200 of the others (a sample of all of them could miss
    # the 8 large files among 20,000 small ones)
    large = sorted(r for r, size in la.items() if size > 65536)
    rest = sorted(r for r, size in la.items() if size <= 65536)
    for rel in large + rnd.sample(rest, min(200, len(rest))):
        size = la[rel]
        offs = [0] if size <= 65536 else [0, rnd.randrange(size - 65536), size - 65536]
        for off in offs:
            with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
                fa.seek(off)
                fb.seek(off)
                if hashlib.sha256(fa.read(65536)).digest() != hashlib.sha256(fb.read(65536)).digest():
                    return f"{rel} differs at {off}"
    return None


# ---------------------------------------------------------------------------
# native pipeline
# ---------------------------------------------------------------------------
class Native:
    def __init__(self, mnt: str, src: str) -> None:
        self.src = src
        self.snaps = os.path.join(mnt, "native-snaps")   # read-only snapshots of the source
        self.dst = os.path.join(mnt, "native-dst")       # where `btrfs receive` puts them
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
        return {"wall": t3 - t0, "snapshot": t1 - t0, "send_receive": t2 - t1, "sync": t3 - t2,
                "image": os.path.join(self.dst, name, QTREE)}


# ---------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------
def bench(mnt: str, work: str, size_mib: int, small: int, seed: int, log, profile_dir: str | None = None) -> dict:
    rnd = random.Random(seed)
    src_path, dst_path = os.path.join(mnt, "src"), os.path.join(mnt, "dst")
    timer = Timer()
    h = Harness(group_config(work, "rb", f"btrfs://{src_path}", f"btrfs://{dst_path}"), plugins=[timer])
    try:
        qdir = os.path.join(src_path, QTREE)
        os.makedirs(qdir)
        return _bench(h, timer, Native(mnt, src_path), qdir, size_mib, small, rnd, log, rollback=True,
                      profile_dir=profile_dir)
    finally:
        close_harness(h)


def _bench(h, timer, native, qdir, size_mib, small, rnd, log, rollback: bool, profile_dir: str | None = None,
           settle=None) -> dict:
    a = h.agent
    rows = []
    rb: list[dict] = []
    n_records_half = max(2, (size_mib // 2))      # 1 MiB Write records: about half the data applied

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
        row = {"label": label, "mib": nbytes / MiB, "files": files, "wall": wall, "cpu": cpus,
               "diff": timer.total("diff"), "apply": timer.total("apply"), "snap": timer.total("snapshot"),
               "verify": timer.total("verify"),
               "records": rep.get("records", 0), "native": nat}
        rows.append(row)
        log(f"{label}: coalesce {wall:.2f} s (cpu {cpus:.2f}, diff {row['diff']:.2f}, apply {row['apply']:.2f}, "
            f"verify {row['verify']:.2f}), "
            f"native {nat['wall']:.2f} s")
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
            native.step()                          # keep the native chain in step with the source
            rb.append({"mode": mode, "rollback": rbt[0], "calls": len(rbt), "cycle": wall,
                       "applied": n_records_half, "entries": entries})
            log(f"rollback {mode} ({entries} entries): {rbt[0]:.3f} s (calls {len(rbt)}, failed cycle {wall:.2f} s)")

    # baseline: the big files only (the small files arrive in change (b))
    nbytes = write_big(qdir, size_mib, rnd)
    measure("baseline (full copy of the large files)", nbytes, N_BIG)
    # (a) rewrite every large file
    nbytes = write_big(qdir, size_mib, rnd)
    measure(f"(a) {nbytes // MiB} MiB rewritten in {N_BIG} large files", nbytes, N_BIG)
    if rollback:
        rollback_pair(rb)                          # the qtree holds the large files only
    # (b) create the small files
    nbytes = write_small(qdir, small, rnd)
    measure(f"(b) {small} small files (4 KiB) created", nbytes, small)
    # (c) rewrite them in place
    nbytes = write_small(qdir, small, rnd)
    measure(f"(c) {small} small files (4 KiB) rewritten", nbytes, small)
    if rollback:
        rollback_pair(rb)                          # the same change, the qtree now also holds the small files

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
        run(["zfs", "snapshot", f"{self.src_ds}@settle"])
        run(["zfs", "destroy", f"{self.src_ds}@settle"])

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
        return {"wall": t2 - t0, "snapshot": t1 - t0, "send_receive": t2 - t1, "sync": 0.0,
                "image": os.path.join(self.dst_mnt, QTREE)}


@contextlib.contextmanager
def zfs_pool(size: int, log, prefix: str = "cbench", in_ram: bool = False):
    """A private zfs-fuse pool through tools/realfs.py (own state dir, pool ``<prefix><pid>`` on a
    sparse file of ``size`` bytes), torn down after, also on failure.  Yields a dict: ``tool`` (the
    tools/realfs.py module), ``pool``, ``mountpoint``, ``state`` (its directory; coalesce's zfs
    state, COALESCE_ZFS_STATE_DIR, is ``state/zfs-state`` meanwhile) and ``problems`` (filled in by
    the teardown: what could not be cleaned up).

    ``in_ram``: the state directory, the pool's file included, is a tmpfs of its own and the file is
    allocated whole at once.  zfs-fuse writes its file vdev through the page cache; on a file system
    on disk, the first write to a region of it whose pages are not cached took several seconds of
    the daemon's CPU per GiB on this VM (docs/benchmarks.md), which fell on whichever method wrote
    there first.  In RAM every page exists from the start, so the methods compare on equal terms."""
    base = os.environ.get("COALESCE_BENCH_DIR", "/var/tmp")
    state = tempfile.mkdtemp(prefix="coalesce-bench-zfs-", dir=base)
    saved = {k: os.environ.get(k) for k in ("COALESCE_REALFS_DIR", "COALESCE_REALFS_POOL", "COALESCE_ZFS_STATE_DIR")}
    pool = f"{prefix}{os.getpid()}"
    os.environ["COALESCE_REALFS_DIR"] = state          # read when the tool module is loaded
    os.environ["COALESCE_REALFS_POOL"] = pool
    os.environ["COALESCE_ZFS_STATE_DIR"] = os.path.join(state, "zfs-state")
    tool = _realfs_tool()
    tool.ZFS_SIZE = size
    tool.ZFS_PREALLOCATE = in_ram
    res: dict = {"tool": tool, "pool": pool, "state": state, "problems": []}
    problems = res["problems"]
    try:
        if in_ram:
            run(["mount", "-t", "tmpfs", "-o", f"size={size + (256 << 20)},mode=0755", "coalesce-bench-zfs", state])
        tool.ensure_tools(btrfs=False, zfs=True)
        info = tool.zfs_up(pool)
        res["mountpoint"] = info["mountpoint"]
        log(f"zfs-fuse pool {pool} at {info['mountpoint']} (daemon started by us: "
            f"{os.path.exists(os.path.join(state, 'zfs-fuse.pid'))})")
        yield res
    finally:
        try:
            # zfs-fuse is one daemon per machine: a tools/realfs.py `up` (the real-FS tests) that ran
            # while ours was up put its pool on OUR daemon without recording a PID.  Stopping the
            # daemon then would take that pool away, so leave it running and say so.
            others = [] if not tool._zfs_fuse_pids() else [
                n for n in run(["zpool", "list", "-H", "-o", "name"], check=False).stdout.split() if n != pool]
            pidfile = os.path.join(state, "zfs-fuse.pid")
            if others and os.path.exists(pidfile):
                run(["zpool", "destroy", "-f", pool], check=False)
                pid = Path(pidfile).read_text().strip()
                problems.append(f"left the zfs-fuse daemon we started (PID {pid}) running: pools {others} of "
                                f"others use it; stop it with `kill {pid}` when they are done")
            else:
                tool.zfs_down(pool)        # destroys the pool; stops the daemon only if we started it
        except Exception as exc:
            problems.append(f"zfs_down: {exc}")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for mp_ in tool._zfs_mounts_under(state):
            problems.append(f"FUSE mount left: {mp_}")
        if in_ram and not tool._zfs_mounts_under(state):
            if run(["umount", state], check=False).returncode != 0:
                problems.append(f"tmpfs left mounted at {state}")
        if not tool._zfs_mounts_under(state):
            shutil.rmtree(state, ignore_errors=True)
        if os.path.exists(state):
            problems.append(f"{state} not removed")


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
            h = Harness(group_config(work, "rz", f"zfs://{pool}/src", f"zfs://{pool}/dst"), plugins=[timer])
            src_mp = run(["zfs", "get", "-H", "-o", "value", "mountpoint", f"{pool}/src"]).stdout.strip()
            qdir = os.path.join(src_mp, QTREE)
            os.makedirs(qdir)
            native = NativeZfs(f"{pool}/src", f"{pool}/ndst", os.path.join(mp, "ndst"))
            res = _bench(h, timer, native, qdir, size_mib, small, rnd, log, rollback=False, settle=native.settle)
        finally:
            close_harness(h)
    return res, problems


def table(res: dict, fs: str = "btrfs") -> str:
    nat = "snapshot / send\\|receive / sync" if fs == "btrfs" else "snapshot / send\\|receive"
    out = [f"| {fs}: change | data | coalesce wall (s) | coalesce MiB/s | files/s | CPU (s) | of which diff / apply / snapshots (s) "
           f"| check before done (s) | native wall (s) | native MiB/s | of which {nat} (s) | coalesce / native |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        n = r["native"]
        out.append(f"| {r['label']} | {r['mib']:.{0 if r['mib'] >= 10 else 1}f} MiB | {r['wall']:.2f} | {r['mib'] / r['wall']:.1f} | "
                   f"{r['files'] / r['wall']:.0f} | {r['cpu']:.2f} | {r['diff']:.2f} / {r['apply']:.2f} / {r['snap']:.2f} | "
                   + (f"{r['verify']:.2f} ({100 * r['verify'] / r['wall']:.0f} %)" if VERIFY[0] else "off") + " | "
                   f"{n['wall']:.2f} | {r['mib'] / n['wall']:.1f} | {n['snapshot']:.2f} / {n['send_receive']:.2f}"
                   + (f" / {n['sync']:.2f}" if fs == "btrfs" else "") + f" | {r['wall'] / n['wall']:.1f}x |")
    if not res["rollback"]:
        return "\n".join(out)
    out += ["", "| rollback of change (a) cut after about half its 1 MiB Write records | entries in the qtree "
            "| rollback hook wall (s) | whole failed cycle (s) |", "|---|---|---|---|"]
    for r in res["rollback"]:
        what = ("native (`cp -a --reflink=always` + RENAME_EXCHANGE)" if r["mode"] == "native"
                else "generic (`COALESCE_BTRFS_ROLLBACK=generic`: diff + apply)")
        out.append(f"| {what}, {r['applied']} records applied | {r['entries']} | {r['rollback']:.3f} | {r['cycle']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (8 MiB, 200 small files): a smoke test")
    ap.add_argument("--size-mib", type=int, default=1024, help="data rewritten in the 8 large files (MiB)")
    ap.add_argument("--small-files", type=int, default=20000)
    ap.add_argument("--fs-gib", type=float, default=None, help="loop file size (sparse); default from the sizes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--zfs", action="store_true",
                    help="also the zfs-fuse equivalent (smaller sizes; zfs-fuse is slow).  Starts zfs-fuse when none "
                         "runs and stops it at the end: do not run it while the real-FS tests run (they would "
                         "share the daemon)")
    ap.add_argument("--zfs-size-mib", type=int, default=128)
    ap.add_argument("--zfs-small-files", type=int, default=2000)
    ap.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="cProfile the diff and apply calls of each timed btrfs update (in the transfer thread) "
                         "into DIR/<n>-<change>.prof and .txt; the profiler slows Python code, so the figures "
                         "of a profiled run are not the benchmark's")
    ap.add_argument("--attach", action="append", default=[], metavar="CMD",
                    help="run CMD during each timed coalesce update and native run, SIGINT it after; {pid} = "
                         "this process, {zfs_pid} = the zfs-fuse daemon, {out} = a file prefix in --attach-dir "
                         "(e.g. 'strace -f -c -o {out}.strace -p {pid}'); traced figures are not benchmark figures")
    ap.add_argument("--attach-dir", default=".", metavar="DIR", help="where {out} of --attach points")
    ap.add_argument("--no-btrfs", action="store_true", help="only the --zfs part")
    ap.add_argument("--no-verify", action="store_true",
                    help="[group] verify = false: no check of each update before `done` (to measure what it costs)")
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
    _realfs_tool().ensure_tools(btrfs=True, zfs=False)
    # source: base+target of the big files; coalesce dest: image + base PCPI; native dest: 2 snapshots;
    # rollbacks leave 1-2 more copies in purgatory/snapshots; x12 plus 4 GiB (sparse): x6 ran out
    fs_gib = args.fs_gib or max(2.0, 12 * args.size_mib / 1024 + 4)
    log = (lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)) if args.verbose \
        else (lambda m: None)
    started = time.perf_counter()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    problems: list[str] = []
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cmd = "python tools/bench/bench_realfs.py " + " ".join(argv if argv is not None else sys.argv[1:])
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
        print(f"<!-- {when}; {platform.machine()} cpus {os.cpu_count()} python {platform.python_version()} "
              f"kernel {platform.release()} {btrfs_v}; {fs_gib:.1f} GiB btrfs on a loop file under "
              f"{os.environ.get('COALESCE_BENCH_DIR', '/var/tmp')}; command: {cmd.strip()}; script ran {total:.0f} s; "
              f"load average {load0} before, {' '.join(f'{x:.2f}' for x in os.getloadavg())} after -->")
        print(table(res))
    if args.zfs:
        t0 = time.perf_counter()
        zres, zproblems = None, []
        try:
            zres, zproblems = bench_zfs(args.zfs_size_mib, args.zfs_small_files, args.seed, log)
        finally:
            for p in zproblems:
                print(f"cleanup: {p}", file=sys.stderr)
        problems += zproblems
        print(f"\n<!-- zfs-fuse part: {args.zfs_size_mib} MiB, {args.zfs_small_files} small files; "
              f"ran {time.perf_counter() - t0:.0f} s; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
              f"after{'' if not args.no_btrfs else f', {load0} before'}; command: {cmd.strip()} -->")
        print(table(zres, "zfs-fuse"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
