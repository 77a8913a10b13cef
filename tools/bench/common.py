"""What the benchmarks share: CPU time, the provenance line above each table, the benchmarks' own
loop btrfs and zfs-fuse pool, and the groups, workloads, checks and timing plugin of the benchmarks
on real file systems.

The provenance line is an HTML comment (:func:`provenance`) made of parts: the date
(:func:`utc_now`), the machine (:func:`host`), versions, the load average (:func:`loads`), the
commit (:func:`git_commit`) and the command that reproduces the run (:func:`command`); each
benchmark keeps its own choice and order of parts.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import importlib.util
import os
import platform
import pstats
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

from coalesce_core.backend.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parents[2]
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MiB = 1 << 20
QTREE = "q"  # the qtree of the one-replica groups
N_BIG = 8  # the large files of write_big


# ---------------------------------------------------------------------------
# CPU time
# ---------------------------------------------------------------------------
def cpu() -> float:
    """This process's CPU time (user + system, every thread), in seconds."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def children_cpu() -> float:
    """The CPU time of this process's reaped children, in seconds."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu() -> float:
    """This process's CPU time and its reaped children's."""
    return cpu() + children_cpu()


def proc_cpu(pid: int, children: bool = False) -> float:
    """utime+stime (and the reaped children's with ``children``) of a process, in seconds."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def zfs_fuse_cpu() -> float:
    """CPU of the zfs-fuse daemon(s) (0 where none runs): it serves both ends of a zfs run and is in
    neither process column."""
    return sum(proc_cpu(pid) for pid in realfs_tool()._zfs_fuse_pids())


# ---------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------
def utc_now() -> str:
    """``2026-11-25 04:20 UTC``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def loads(values: tuple[float, ...] | None = None) -> str:
    """A load average (now, or ``values`` from an earlier ``os.getloadavg()``): ``1.86 1.91 2.02``."""
    return " ".join(f"{x:.2f}" for x in (os.getloadavg() if values is None else values))


def host(node: bool = False, kernel: bool = True) -> str:
    """``[node ]x86_64 cpus 2 python 3.11.7[ kernel 6.18...]``."""
    return (
        (f"{platform.node()} " if node else "") + f"{platform.machine()} cpus {os.cpu_count()} "
        f"python {platform.python_version()}" + (f" kernel {platform.release()}" if kernel else "")
    )


def git_commit() -> str:
    """The short commit of the working tree, ``+dirty`` when tracked files differ from it; ``?``
    outside a git checkout."""
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    if (
        commit
        and run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], check=False).stdout.strip()
    ):
        commit += "+dirty"
    return commit or "?"


def command(module: str, argv: list[str] | None = None) -> str:
    """The command that reproduces a run, from the repository root: ``python3 -m tools.bench.<module>
    ARGS`` (``argv``: the arguments given to ``main``; None: the process's)."""
    return " ".join(["python3", "-m", f"tools.bench.{module}", *(sys.argv[1:] if argv is None else argv)])


def provenance(*parts: str) -> str:
    """The comment written above a table: ``<!-- part; part; ... -->``."""
    return "<!-- " + "; ".join(parts) + " -->"


# ---------------------------------------------------------------------------
# progress on stderr
# ---------------------------------------------------------------------------
def say(msg: str) -> None:
    """A progress line on stderr, with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def progress(verbose: bool):
    """:func:`say` with ``verbose``, else a function that prints nothing."""
    return say if verbose else (lambda m: None)


# ---------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------
def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (text output captured; the sbin directories on PATH); raise if it fails and ``check``."""
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":" + SBIN_PATH)
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


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


def md_table(head: str, lines: Iterable[str]) -> str:
    """A Markdown table: the heading row ``head`` (``| a | b |``), the rule under it, then ``lines``."""
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1), *lines])


def bench_dir() -> str:
    """Where the benchmarks put their loop files, pools and volumes: ``$COALESCE_BENCH_DIR``, default ``/var/tmp``."""
    return os.environ.get("COALESCE_BENCH_DIR", "/var/tmp")


def realfs_tool():
    """A fresh instance of tools/realfs.py (the module ``tools.realfs``, not the one in sys.modules):
    it reads ``COALESCE_REALFS_DIR`` and ``COALESCE_REALFS_POOL`` when it is loaded, which
    :func:`zfs_pool` sets first, and zfs_pool sets its sizes on the instance."""
    spec = importlib.util.find_spec("tools.realfs")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------
# the benchmarks' own file systems
# ---------------------------------------------------------------------------
class LoopFS:
    """A btrfs of the benchmark's own on a sparse loop file under ``$COALESCE_BENCH_DIR`` (default
    ``/var/tmp``; separate from tools/realfs.py's test file system): :meth:`up` makes and mounts it,
    :meth:`down` removes everything and returns what it could not clean up.  Needs root."""

    def __init__(self, size: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="coalesce-bench-realfs-", dir=bench_dir())
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
    the daemon's CPU per GiB on this VM (docs/benchmarks-journal.md), which fell on whichever method
    wrote there first.  In RAM every page exists from the start, so the methods compare on equal terms."""
    state = tempfile.mkdtemp(prefix="coalesce-bench-zfs-", dir=bench_dir())
    saved = {k: os.environ.get(k) for k in ("COALESCE_REALFS_DIR", "COALESCE_REALFS_POOL", "COALESCE_ZFS_STATE_DIR")}
    pool = f"{prefix}{os.getpid()}"
    os.environ["COALESCE_REALFS_DIR"] = state  # read when the tool module is loaded
    os.environ["COALESCE_REALFS_POOL"] = pool
    os.environ["COALESCE_ZFS_STATE_DIR"] = os.path.join(state, "zfs-state")
    tool = realfs_tool()
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
        log(
            f"zfs-fuse pool {pool} at {info['mountpoint']} (daemon started by us: "
            f"{os.path.exists(os.path.join(state, 'zfs-fuse.pid'))})"
        )
        yield res
    finally:
        try:
            # zfs-fuse is one daemon per machine: a tools/realfs.py `up` (the real-FS tests) that ran
            # while ours was up put its pool on OUR daemon without recording a PID.  Stopping the
            # daemon then would take that pool away, so leave it running and say so.
            others = (
                []
                if not tool._zfs_fuse_pids()
                else [n for n in run(["zpool", "list", "-H", "-o", "name"], check=False).stdout.split() if n != pool]
            )
            pidfile = os.path.join(state, "zfs-fuse.pid")
            if others and os.path.exists(pidfile):
                run(["zpool", "destroy", "-f", pool], check=False)
                pid = Path(pidfile).read_text().strip()
                problems.append(
                    f"left the zfs-fuse daemon we started (PID {pid}) running: pools {others} of "
                    f"others use it; stop it with `kill {pid}` when they are done"
                )
            else:
                tool.zfs_down(pool)  # destroys the pool; stops the daemon only if we started it
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


def zfs_mountpoint(dataset: str) -> str:
    """Where a zfs dataset is mounted."""
    return run(["zfs", "get", "-H", "-o", "value", "mountpoint", dataset]).stdout.strip()


def zfs_settle(dataset: str) -> None:
    """Commit what was written to ``dataset`` before a timed part: ``sync`` does not reach zfs-fuse's
    open transaction group (FUSE has no syncfs), a snapshot does (made and destroyed)."""
    run(["zfs", "snapshot", f"{dataset}@settle"])
    run(["zfs", "destroy", f"{dataset}@settle"])


def zfs_received(dst_ds: str, src_ds: str, prev: str | None) -> None:
    """After a native ``zfs receive`` into ``dst_ds`` (untimed): remount it, because its FUSE
    mount keeps stale cached pages after a receive and the check must read what was received,
    and destroy the previous snapshot pair, no longer the base of anything."""
    run(["zfs", "unmount", dst_ds], check=False)
    run(["zfs", "mount", dst_ds], check=False)
    if prev:
        run(["zfs", "destroy", f"{src_ds}@{prev}"], check=False)
        run(["zfs", "destroy", f"{dst_ds}@{prev}"], check=False)


# ---------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------
def qtree_names(n: int) -> list[str]:
    """``q0000``, ``q0001``, ...: the replicas of the many-replica benchmarks."""
    return [f"q{i:04d}" for i in range(n)]


def replicas_config(name: str, source: str, destination: str, metadata: str, qtrees: list[str]) -> str:
    """The TOML of a group of many replicas (8 transfers at a time, retries at once)."""
    return (
        f'[group]\nname="{name}"\nsource="{source}"\ndestination="{destination}"\nparallel=8\n'
        f'metadata="{metadata}"\n[group.retry]\ninitial=0\n' + "".join(f'[[replica]]\nname="{q}"\n' for q in qtrees)
    )


def source_layout(n: int, sources: int) -> dict[str, list[str]]:
    """The qtrees of each source of a fan-in group of ``n`` replicas: ``src00``, ``src01``, ... each hold
    ``n // sources`` of :func:`qtree_names` in order (names unique across the group, so a replica is
    named as its source qtree); ``sources`` 1: ``{"src": all of them}``.  ``sources`` must divide ``n``."""
    if sources < 1 or n % sources:
        raise ValueError(f"{sources} sources do not divide {n} replicas evenly")
    names = qtree_names(n)
    if sources == 1:
        return {"src": names}
    q = n // sources
    return {f"src{i:02d}": names[i * q : (i + 1) * q] for i in range(sources)}


def fanin_config(name: str, sources: dict[str, tuple[str, list[str]]], destination: str, metadata: str) -> str:
    """The TOML of a fan-in group (docs/config.md, "Sources"): one ``[[source]]`` per item of ``sources``
    (source name: its URL and its qtrees), each qtree a replica of that name ``from`` its source;
    otherwise as :func:`replicas_config`."""
    return (
        f'[group]\nname="{name}"\ndestination="{destination}"\nparallel=8\n'
        f'metadata="{metadata}"\n[group.retry]\ninitial=0\n'
        + "".join(f'[[source]]\nname="{s}"\nurl="{url}"\n' for s, (url, _) in sources.items())
        + "".join(f'[[replica]]\nname="{q}"\nfrom="{s}"\n' for s, (_, qs) in sources.items() for q in qs)
    )


def group_config(work: str, name: str, source: str, destination: str, spool: bool | None = None, verify: bool = True):
    """Write ``work/group.toml`` for a one-replica group (qtree QTREE, 4 workers, metadata in
    ``work/meta``, retries at once; ``spool`` None: the default; ``[group] verify``) and return it parsed."""
    from coalesce_core.config import parse_config

    text = (
        f'[group]\nname="{name}"\nsource="{source}"\ndestination="{destination}"\n'
        f'parallel=4\nmetadata="{work}/meta"\nverify={str(verify).lower()}\n'
        + ("" if spool is None else f"spool={str(spool).lower()}\n")
        + f'[group.retry]\ninitial=0.0\nfactor=2\nmaximum=60\n[[replica]]\nname="{QTREE}"\n'
    )
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


# ---------------------------------------------------------------------------
# workload and checks
# ---------------------------------------------------------------------------
def write_big(qdir: str, total_mib: int, rnd: random.Random) -> int:
    """``total_mib`` of random data in N_BIG files ``big/f<i>.bin`` (rewritten from offset 0, same
    size); returns the bytes written."""
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
        with self._timed("apply"):  # consumes the diff's records: read source + write dest
            return (yield)

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree, base, target):
        with self._timed("diff"):  # btrfs: the `btrfs send --no-data` run and its parse
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
