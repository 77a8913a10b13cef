"""Replication over an emulated network link: coalesce over SSH and TLS against ``btrfs send | ssh | btrfs receive``.

    python3 -m tools.bench.bench_net [--quick] [--size-mib 1024] [--comp-mib 256] [--resume-mib 256] [--zfs] [-v]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

Needs root.  Builds, and removes at the end (also on failure or Ctrl-C):

* its own btrfs on a sparse loop file (``LoopFS`` of common.py), with a
  source subvolume ``src`` holding one qtree ``q``;
* a link between this namespace (the destination) and a namespace B (the
  source host), through a router namespace that delays, drops and rate-limits
  (tests/net/linkemu.py: netem where the kernel has it, else a userspace TUN
  delay line plus tbf); every address is inside those namespaces;
* in B: ``coalesce serve --listen`` (mutual TLS; certificates made here) and
  Debian's sshd (tests/net/netkit.py's ``SSHD``, fresh keys) whose key for
  coalesce has the forced command ``coalesce serve --stdio`` and whose second
  key has a forced command that snapshots the source and runs ``btrfs send``.

Three replications of the same source, each with its own destination on the
same loop FS: a coalesce group whose source is ``ssh://...``, one whose source
is ``tls://...``, and the native pipeline ``ssh src 'btrfs subvolume snapshot
-r; btrfs send [-p prev] new' | btrfs receive`` followed by ``btrfs filesystem
sync`` (a coalesce cycle ends with a destination snapshot, which commits).

Parts (each printed as a markdown table with a comment naming the machine,
versions, load average and command):

1. one update with ``--size-mib`` rewritten in 8 large files (random data), on
   a link of 1 Gbit/s and of 100 Mbit/s, 20 ms round trip; each method's wall
   time, bytes on the wire (counted by the emulator) and CPU, and the ratio
   native time / coalesce time (the goal: at least 0.9);
2. compression: ``--comp-mib`` of compressible data (words) on the 100 Mbit/s
   link, coalesce with each compression the protocol offers
   (``COALESCE_COMPRESSION``) and none, next to native with and without ``ssh -C``;
3. a link drop half-way through a ``--resume-mib`` transfer (the link goes
   down, both ends' TCP connections are aborted with ``ss -K``, the link comes
   back after ``--outage`` s): coalesce resumes from the last record; with
   ``COALESCE_RETRIES=0`` it fails, rolls back and the next cycle starts over;
   the native pipeline starts over.

``--zfs`` adds part 1 on zfs-fuse, in the same run and over the same link: a
private pool (common.py's ``zfs_pool``: its own state directory and
pool file, by default in a tmpfs and allocated up front, ``--zfs-pool disk``
for a sparse file on disk; zfs-fuse is started when none runs and stopped at
the end, as bench_realfs.py --zfs does, so do not run it while the real-FS
tests run),
with a source dataset exposed by the same TLS server and sshd in B, a coalesce
group per transport whose source AND destination are zfs datasets, and the
native ``ssh B 'zfs snapshot; zfs send [-i prev] new' | zfs receive -F``
(zfs-fuse is one daemon for the machine, reached through its unix socket, so
the processes in namespace B run ``zfs`` too).  Before each timed zfs run the
source's open transaction group is committed (a snapshot made and destroyed:
``sync`` does not reach zfs-fuse).

The zfs table has a column for the zfs-fuse daemon's own CPU (it serves both
ends of every method).  ``--no-btrfs`` runs part 1 on zfs-fuse only.  Part 1
first gives each link shape one untimed update of the full size by every
method (``--no-warmup`` to skip it).

``--quick``: 8 MiB, the 100 Mbit/s link only (a CI smoke test; seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import CoalesceError
from coalesce_core.testing.harness import Harness
from tools.bench.common import (
    N_BIG,
    QTREE,
    LoopFS,
    MiB,
    command,
    group_config,
    loads,
    md_table,
    pipeline,
    proc_cpu,
    provenance,
    realfs_tool,
    run,
    same_tree,
    say,
    self_cpu,
    utc_now,
    write_big,
    zfs_fuse_cpu,
    zfs_mountpoint,
    zfs_pool,
    zfs_received,
    zfs_settle,
)

TLS_PORT, SSH_PORT = 7450, 2222
SHAPES = [("1gbit", 10.0), ("100mbit", 10.0)]  # rate, one-way delay (ms): a 20 ms round trip


def log(msg: str) -> None:
    if VERBOSE:
        say(msg)


VERBOSE = False
SPOOL: bool | None = None  # --spool: the groups' `spool` (None: the default, on for a remote source)


# ---------------------------------------------------------------------------- data
def write_words(qdir: str, total_mib: int, seed: int) -> int:
    """8 files of text-like data (words from a 2,000-word vocabulary): zstd level 3 makes it 3-4x smaller."""
    rnd = random.Random(seed)
    vocab = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 10))) for _ in range(2000)]
    block = " ".join(rnd.choices(vocab, k=600_000)).encode()[: 4 * MiB]
    d = os.path.join(qdir, "big")
    os.makedirs(d, exist_ok=True)
    per = max(1, total_mib // N_BIG) * MiB
    for i in range(N_BIG):
        with open(os.path.join(d, f"f{i}.bin"), "wb") as f:
            left, off = per, (i * 977 + seed * 131) % len(block)
            while left:
                piece = (block[off:] + block[:off])[: min(left, len(block))]
                f.write(piece)
                left -= len(piece)
                off = (off + 7919) % len(block)
    return N_BIG * per


# ---------------------------------------------------------------------------- the far end
class Source:
    """Namespace B's services: coalesce serve --listen (TLS) and sshd (coalesce forced command + native key)."""

    def __init__(self, link: Any, work: Path, mnt: str, zfs_ds: str | None = None) -> None:
        from tests.net.netkit import CA, SSHD, serve_in_b, write_serve_config

        self.link = link
        self.src = os.path.join(mnt, "src")
        self.snaps = os.path.join(mnt, "native-snaps")
        os.makedirs(self.snaps, exist_ok=True)
        certs = work / "certs"
        certs.mkdir()
        ca = CA(certs, "bench-ca")
        server = ca.issue("bench-source", server=True, ips=(link.b_ip,))
        self.client = ca.issue("backup1")
        self.ca = ca.path
        volumes = {"src": f"btrfs://{self.src}", **({"zsrc": f"zfs://{zfs_ds}"} if zfs_ds else {})}
        cfg = write_serve_config(work / "serve.toml", server, ca.path, volumes, timeout=30, keepalive=5)
        # with a zfs source the services in B run in THIS mount namespace (nsenter), only their network is
        # B's: `ip netns exec` gives a process its own copy of the mounts, where the clones zfs-fuse mounts
        # for a diff would not appear and `zfs destroy`'s unmount would not reach the daemon's mount
        self.enter = ["nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--"] if zfs_ds else []
        self.tls = serve_in_b(link, cfg, TLS_PORT, prefix=tuple(self.enter))
        (work / "sshd").mkdir()
        self.sshd = SSHD(work / "sshd", host=link.b_ip, port=SSH_PORT, netns=link.ns_b)
        self.ssh_url = self.sshd.expose(f"btrfs://{self.src}")
        self.tls_url = f"tls://{link.b_ip}:{TLS_PORT}/src"
        # the native pipeline's key: its forced command snapshots the source and sends it, nothing else
        self.native_ssh = self._native_key(
            "native",
            f'[ -d "{self.snaps}/$2" ] || btrfs subvolume snapshot -r "{self.src}" "{self.snaps}/$2" >/dev/null',
            f'if [ "$1" = "-" ]; then exec btrfs send -q "{self.snaps}/$2"; fi',
            f'exec btrfs send -q -p "{self.snaps}/$1" "{self.snaps}/$2"',
        )
        self.zfs_ds = zfs_ds
        if zfs_ds:
            self._zfs_keys(zfs_ds)

    def _zfs_keys(self, ds: str) -> None:
        """The zfs source: exposed over ssh (and TLS, above); ``coalesce serve --stdio`` runs in this mount
        namespace (see ``enter``) with this process's COALESCE_ZFS_STATE_DIR (sshd passes no environment),
        so that every coalesce process shares one state directory and its zfs command lock; a key whose
        forced command snapshots the dataset and runs ``zfs send``."""
        d = self.sshd.d
        self.zfs_ssh_url = self.sshd.expose(f"zfs://{ds}")
        self.zfs_tls_url = f"tls://{self.link.b_ip}:{TLS_PORT}/zsrc"
        state = os.environ["COALESCE_ZFS_STATE_DIR"]
        keys = (d / "authorized_keys").read_text()
        (d / "authorized_keys").write_text(
            keys.replace('command="', f'command="{" ".join(self.enter)} env COALESCE_ZFS_STATE_DIR={state} ', 1)
        )
        zfs = shutil.which("zfs", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or "zfs"
        self.native_zfs_ssh = self._native_key(
            "native_zfs",
            f'{zfs} list -H -o name "{ds}@$2" >/dev/null 2>&1 || {zfs} snapshot "{ds}@$2"',
            f'if [ "$1" = "-" ]; then exec {zfs} send "{ds}@$2"; fi',
            f'exec {zfs} send -i "{ds}@$1" "{ds}@$2"',
        )

    def _native_key(self, name: str, *send: str) -> list[str]:
        """The ssh command of a new key ``{name}_key`` whose forced command is the script ``{name}-send.sh``:
        the two snapshot names of the command line (base or ``-``, target) checked, then the ``send`` lines,
        which take the target snapshot where it is missing and send it."""
        d = self.sshd.d
        script = d / f"{name}-send.sh"
        script.write_text(
            "\n".join(
                [
                    "#!/bin/sh",
                    "set -e",
                    "set -- $SSH_ORIGINAL_COMMAND",
                    'case "$1$2" in *[!A-Za-z0-9_-]*) echo "bad snapshot names" >&2; exit 2;; esac',
                    *send,
                    "",
                ]
            )
        )
        script.chmod(0o755)
        key = d / f"{name}_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        pub = (d / f"{name}_key.pub").read_text().strip()
        with open(d / "authorized_keys", "a") as f:
            f.write(f'command="{script}",restrict {pub}\n')
        return self.sshd.ssh.replace(str(d / "client_key"), str(key)).split()

    def native_send(self, ssh: list[str], base: str | None, target: str) -> list[str]:
        """The command that runs the forced command of a native key (``ssh``, from :meth:`_native_key`) on B:
        send snapshot ``target``, incremental from ``base`` (whole without one)."""
        return [*ssh, "-o", "BatchMode=yes", "-p", str(SSH_PORT), f"root@{self.link.b_ip}", "--", base or "-", target]

    def server_cpu(self) -> float:
        """CPU of every source-side process: the TLS server, sshd and what it ran (reaped)."""
        return (
            proc_cpu(self.tls.pid, children=True)
            + proc_cpu(self.sshd.proc.pid, children=True)
            + sum(proc_cpu(p, children=True) for p in self.sshd.children())
        )

    def close(self) -> None:
        self.sshd.stop()


# ---------------------------------------------------------------------------- the three replications
class Coalesce:
    def __init__(self, kind: str, url: str, mnt: str, work: Path, dest: str | None = None, tag: str = "") -> None:
        from tests.net.netkit import remote_plugins

        self.kind = kind
        self.plugins = remote_plugins()
        d = work / f"group-{tag}{kind}"
        d.mkdir()
        self.h = Harness(
            group_config(str(d), f"n{tag}{kind}", url, dest or f"btrfs://{mnt}/d{kind}", spool=SPOOL),
            plugins=self.plugins,
        )

    def reopen(self) -> None:
        """A new agent on the same group: the client settings (COALESCE_*) are read again."""
        with contextlib.suppress(Exception):
            self.h.agent.close()
        self.h.restart()

    def stats(self) -> dict:
        return dict(getattr(self.h.agent.source.handle, "stats", {}))

    def update(
        self, until_stable: bool = False, wait: Callable[[], None] | None = None, done: Callable[[], bool] | None = None
    ) -> dict:
        """One cycle; with ``until_stable``, cycles until the replica is stable and ``done()`` (its image is
        the source's: a cycle that raised may leave it stable on the old image)."""
        a = self.h.agent
        t0 = time.perf_counter()
        rep: dict = {}
        cycles = failures = errors = 0
        while cycles < 8:
            cycles += 1
            try:
                rep = a.run_cycle() if cycles == 1 else self.h.cycle()
                failures += rep.get("failures", 0)
            except CoalesceError as exc:
                # the cycle itself raised (with COALESCE_RETRIES=0 a control request on a connection that
                # died fails at once): what `coalesce run` under a service manager does, start it again
                if not until_stable:
                    raise
                log(f"coalesce over {self.kind}: cycle {cycles} raised {exc.message[:160]}; reopening")
                errors += 1
                if wait is not None:
                    wait()  # the link is back
                self.reopen()
                a = self.h.agent
            if not until_stable or (a.all_stable() and (done is None or done())):
                break
        wall = time.perf_counter() - t0
        if not a.all_stable():
            raise RuntimeError(f"coalesce over {self.kind}: not stable after {cycles} cycle(s): {rep}")
        return {"wall": wall, "cycles": cycles, "failures": failures + errors}

    def image(self) -> str:
        path = self.h.agent.export_path(QTREE)
        if path is None:
            raise RuntimeError(f"coalesce over {self.kind}: {QTREE} has no export")
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.h.agent.close()


class Native:
    """``ssh B 'snapshot -r; btrfs send [-p prev] new' | btrfs receive dst``, then ``btrfs filesystem sync``."""

    def __init__(self, src: Source, mnt: str) -> None:
        self.src = src
        self.dst = os.path.join(mnt, "native-dst")
        os.makedirs(self.dst)
        self.n = 0
        self.prev: str | None = None
        self.extra_ssh: list[str] = []

    def _once(self, name: str) -> None:
        ssh = self.src.native_send([*self.src.native_ssh, *self.extra_ssh], self.prev, name)
        pipeline(ssh, ["btrfs", "receive", "-q", self.dst], "native ssh pipeline")

    def update(
        self, until_stable: bool = False, wait: Callable[[], None] | None = None, done: Callable[[], bool] | None = None
    ) -> dict:
        name = f"n{self.n}"
        self.n += 1
        t0 = time.perf_counter()

        def discard_partial() -> None:
            partial = os.path.join(self.dst, name)
            if os.path.exists(partial):  # a partial receive: delete it and start over
                run(["btrfs", "subvolume", "delete", partial], check=False)

        attempts = _retried(lambda: self._once(name), until_stable, wait, discard_partial)
        run(["btrfs", "filesystem", "sync", self.dst])
        wall = time.perf_counter() - t0
        if self.prev:
            run(["btrfs", "subvolume", "delete", os.path.join(self.dst, self.prev)], check=False)
            run(["btrfs", "subvolume", "delete", os.path.join(self.src.snaps, self.prev)], check=False)
        self.prev = name
        return {"wall": wall, "cycles": attempts, "failures": attempts - 1}

    def image(self) -> str:
        return os.path.join(self.dst, self.prev or "", QTREE)


def _retried(
    once: Callable[[], None],
    until_stable: bool,
    wait: Callable[[], None] | None,
    after_failure: Callable[[], None] | None = None,
) -> int:
    """Run a native pipeline; ``until_stable``: after a failure (a link drop) wait for the link,
    clean up, and run it again from the start, at most 4 times.  Returns the attempts made."""
    attempts = 0
    while True:
        attempts += 1
        try:
            once()
            return attempts
        except RuntimeError:
            if not until_stable or attempts >= 4:
                raise
            if wait is not None:
                wait()  # the link is back
            if after_failure is not None:
                after_failure()


class NativeZfs:
    """``ssh B 'zfs snapshot; zfs send [-i prev] new' | zfs receive -F dst`` (zfs-fuse).  As in
    bench_realfs.py's NativeZfs, no sync after it; the received dataset is remounted (untimed) so
    that the check reads what was received, not pages the FUSE mount cached before."""

    def __init__(self, src: Source, dst_ds: str, dst_mnt: str) -> None:
        self.src = src
        self.dst_ds, self.dst_mnt = dst_ds, dst_mnt
        self.n = 0
        self.prev: str | None = None

    def _once(self, name: str) -> None:
        pipeline(
            self.src.native_send(self.src.native_zfs_ssh, self.prev, name),
            ["zfs", "receive", "-F", self.dst_ds],
            "native zfs ssh pipeline",
            env=dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"),
        )

    def update(
        self, until_stable: bool = False, wait: Callable[[], None] | None = None, done: Callable[[], bool] | None = None
    ) -> dict:
        name = f"z{self.n}"
        self.n += 1
        t0 = time.perf_counter()
        attempts = _retried(lambda: self._once(name), until_stable, wait)
        wall = time.perf_counter() - t0
        assert self.src.zfs_ds is not None  # a NativeZfs is made only for a Source with a zfs dataset
        zfs_received(self.dst_ds, self.src.zfs_ds, self.prev)
        self.prev = name
        return {"wall": wall, "cycles": attempts, "failures": attempts - 1}

    def image(self) -> str:
        return os.path.join(self.dst_mnt, QTREE)


# ---------------------------------------------------------------------------- measuring one run
@attrs.define
class Bench:
    """Runs of the replication ``methods`` (by name) of ``qdir``, a qtree of ``source`` on file system
    ``fs`` (``settle``: what makes its latest writes visible to a reader, if anything), over ``link``."""

    link: Any
    source: Source
    qdir: str
    methods: dict[str, Any]
    fs: str = "btrfs"
    settle: Callable[[], None] | None = None
    rnd: random.Random = attrs.field(factory=lambda: random.Random(5))  # picks the files the checks compare

    def measure(self, name: str, **kw: Any) -> dict:
        m = self.methods[name]
        os.sync()
        if self.settle is not None:
            self.settle()
        s0, c0, sv0, z0 = self.link.stats(), self_cpu(), self.source.server_cpu(), zfs_fuse_cpu()
        res0 = m.stats().get("resumes", 0) if isinstance(m, Coalesce) else 0
        r = m.update(**kw)
        s1, c1, sv1, z1 = self.link.stats(), self_cpu(), self.source.server_cpu(), zfs_fuse_cpu()
        bad = same_tree(self.qdir, m.image(), self.rnd)
        if bad:
            raise RuntimeError(f"{name}: the replica differs from the source: {bad}")
        # bytes that crossed the rate limit (both directions; a packet tbf dropped and sent again counts once)
        wire = sum(
            s1["qdiscs"][d].get("tbf", {}).get("bytes", 0) - s0["qdiscs"][d].get("tbf", {}).get("bytes", 0)
            for d in ("a_to_b", "b_to_a")
        )
        drops = sum(s1[d]["dropped"] - s0[d]["dropped"] for d in ("a_to_b", "b_to_a")) if "a_to_b" in s1 else 0
        r.update(
            name=name,
            fs=self.fs,
            wire=wire,
            emu_drops=drops,
            client_cpu=c1 - c0,
            server_cpu=sv1 - sv0,
            zfs_cpu=z1 - z0,
            emu_busy=s1.get("busy_s", 0.0) - s0.get("busy_s", 0.0),
        )
        if isinstance(m, Coalesce):
            r["resumes"] = m.stats().get("resumes", 0) - (res0 if m.stats().get("resumes", 0) >= res0 else 0)
        log(
            f"{name}: {r['wall']:.2f} s, {wire / MiB:.1f} MiB on the wire, cpu client {r['client_cpu']:.2f} "
            f"server {r['server_cpu']:.2f} zfs-fuse {r['zfs_cpu']:.2f}, cycles {r['cycles']}, failures {r['failures']}"
        )
        return r


def header(cmd: str, extra: str) -> str:
    def v(argv):
        p = subprocess.run(argv, capture_output=True, text=True)
        return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr) else "?"

    import ssl

    try:
        import zstandard

        zv = zstandard.__version__
    except ImportError:
        zv = "absent"
    return provenance(
        utc_now(),
        f"{platform.machine()} {platform.processor() or ''} cpus {os.cpu_count()} python "
        f"{platform.python_version()} kernel {platform.release()} {v(['btrfs', '--version'])}",
        v(["ssh", "-V"]),
        ssl.OPENSSL_VERSION,
        f"zstandard {zv}",
        f"load average {loads()}",
        extra,
        f"command: {cmd}",
    )


# ---------------------------------------------------------------------------- profiling
class Spy:
    """py-spy (a sampling profiler that sees every thread and native frames; pyinstrument sees only the
    thread that started it, and coalesce moves data in the agent's worker threads and the server's
    connection threads) on this process and on the source-side processes, during one run."""

    def __init__(self, out: Path, label: str, pids: dict[str, int], sshd: Any = None) -> None:
        self.files: dict[str, Path] = {}
        self.procs: list[subprocess.Popen] = []
        exe = shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        self.exe = exe
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.label = out, label
        for side, pid in pids.items():
            self.files[side] = self._record(pid, f"{label}-{side}")
        self.parts: list[Path] = []
        self.done = threading.Event()
        self.watch = None
        if sshd is not None:  # each ssh connection runs its own `coalesce serve --stdio`: follow them
            self.files["source"] = out / f"{label}-source.txt".replace(" ", "_")
            self.watch = threading.Thread(target=self._follow, args=(sshd,), daemon=True)
            self.watch.start()
        time.sleep(1.0)  # attached before the run starts

    def _record(self, pid: int, name: str) -> Path:
        f = self.out / f"{name}.txt".replace(" ", "_")
        self.procs.append(
            subprocess.Popen(
                [
                    self.exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "--native",
                    "--rate",
                    "50",
                    "--output",
                    str(f),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        return f

    def _follow(self, sshd: Any) -> None:
        seen: set[int] = set()
        while not self.done.is_set():
            for pid in sshd.children():
                if pid in seen:
                    continue
                seen.add(pid)
                try:
                    if b"coalesce_remote.serve" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        continue
                except OSError:
                    continue
                self.parts.append(self._record(pid, f"{self.label}-source-{pid}"))
            time.sleep(0.05)

    def stop(self) -> dict[str, list[tuple[str, float]]]:
        import signal

        self.done.set()
        if self.watch is not None:
            self.watch.join()
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.parts:
            with open(self.files["source"], "w") as out:
                for part in self.parts:
                    with contextlib.suppress(OSError):
                        out.write(part.read_text())
        for f in self.files.values():
            write_profile_report(f)
        return {side: stages(f) for side, f in self.files.items()}


def _frame(f: str) -> str:
    """``func (path/file.py:123)`` -> ``func (file.py)``."""
    name, _, where = f.partition(" (")
    return f"{name} ({where.split(':')[0].split('/')[-1].rstrip(')')})" if where else name


def _samples(path: Path) -> list[tuple[list[str], int]]:
    """The collapsed stacks of a ``py-spy --format raw`` file: (frames outermost first, sample count)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        stack, _, c = line.rpartition(" ")
        if c.isdigit():
            out.append((stack.split(";"), int(c)))
    return out


def _shares(counts: dict[str, int], total: int, n: int | None = None) -> list[tuple[str, float]]:
    return [(k, v / total) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:n]] if total else []


def top_frames(path: Path, n: int = 12, inclusive: bool = False) -> list[tuple[str, float]]:
    """Share of the samples (collapsed stacks of ``py-spy --format raw``) whose innermost frame is each
    function, or (``inclusive``) that have the function anywhere on the stack."""
    counts: dict[str, int] = {}
    total = 0
    for stack, c in _samples(path):
        frames = [_frame(f) for f in stack]
        for f in set(frames) if inclusive else frames[-1:]:
            counts[f] = counts.get(f, 0) + c
        total += c
    return _shares(counts, total, n)


#: (marker frame, stage) from the innermost outwards: the first marker found on a stack names its stage
_STAGES = [
    ("Applier.one", "apply: write the records"),
    ("Connection.recv", "network: receive, frame checks"),
    ("Connection.send", "network: send (frame crc, TLS or pipe write)"),
    ("Compressor.compress", "compress"),
    ("Decompressor.decompress", "decompress"),
    ("Queue.get", "thread hand-off"),
    ("Queue.put", "thread hand-off"),
    ("encode", "codec encode"),
    ("_decode", "codec decode"),
    ("coalesce_diff", "backend diff (btrfs send, pread)"),
    ("Applier.apply", "apply: write the records"),
]
_WAIT = ("select", "poll", "clock_nanosleep", "epoll_wait", "pthread_cond_wait", "sem_wait", "accept")


def stages(path: Path) -> list[tuple[str, float]]:
    """Busy samples by stage (a stack whose innermost frame waits in select/poll/sleep is not busy); on the
    destination, the codec passes of the agent's own ``codec.roundtrip`` are told apart from the decode of
    the network stream (which runs inside ``RemoteVolume._diff``)."""
    counts: dict[str, int] = {}
    total = 0
    for stack, c in _samples(path):
        frames = [f.split(" (")[0] for f in stack]
        total += c
        if frames[-1].startswith(_WAIT) or "Spy._follow" in frames:
            counts["(waiting)"] = counts.get("(waiting)", 0) + c
            continue
        stage = "other"
        for i in range(len(frames) - 1, -1, -1):
            hit = next((st for m, st in _STAGES if frames[i] == m), None)
            if hit:
                if hit.startswith("codec") and "RemoteVolume._diff" in frames[:i]:
                    hit = "network: " + hit
                elif hit.startswith("codec") and "run_transfer" in frames[:i]:
                    hit = "agent round trip: " + hit
                stage = hit
                break
        counts[stage] = counts.get(stage, 0) + c
    return _shares(counts, total)


def write_profile_report(path: Path) -> None:
    with open(path.with_suffix(".top.txt"), "w") as f:
        f.write(f"{path.name}: stages (share of all samples)\n")
        f.writelines(f"  {v:6.1%}  {k}\n" for k, v in stages(path))
        f.write("innermost frames\n")
        f.writelines(f"  {v:6.1%}  {k}\n" for k, v in top_frames(path, 30))
        f.write("on the stack (inclusive)\n")
        f.writelines(f"  {v:6.1%}  {k}\n" for k, v in top_frames(path, 60, inclusive=True))


# ---------------------------------------------------------------------------- the parts
def baselines(b: Bench, size_mib: int, seed: int) -> None:
    """Untimed, on the unshaped link: a baseline of min(size, 64 MiB) for every method, so that all
    hold the same first image."""
    write_big(b.qdir, min(size_mib, 64), random.Random(seed))
    for name in b.methods:
        b.measure(name)


def part_main(
    b: Bench,
    shapes: list[tuple[str, float]],
    size_mib: int,
    seed: int,
    repeat: int = 1,
    profile: Path | None = None,
    warmup: bool = True,
) -> list[dict]:
    """Part 1.  With ``warmup``, each link shape first gets one untimed update of the full size by every
    method, so that the timed ones rewrite files of their final size over a link that carried the
    same load just before (the first update after the baselines, which makes the files grow, and the
    first over a newly shaped link, ran up to 20 % slower, for whichever method came first)."""
    rows: list[dict] = []
    for rate, delay in shapes:
        b.link.shape(delay_ms=delay, rate=rate)
        if warmup:
            write_big(b.qdir, size_mib, random.Random(seed - 1))
            for name in b.methods:
                log(f"warm-up on {rate}:")
                b.measure(name)
        for i in range(repeat):
            write_big(b.qdir, size_mib, random.Random(seed + len(rows)))
            order = list(b.methods)  # coalesce over SSH, over TLS, native
            for name in order[i % 3 :] + order[: i % 3]:  # the first method runs with the coldest cache
                spy = None
                if profile is not None:
                    pids = {"destination": os.getpid(), **({"source": b.source.tls.pid} if "TLS" in name else {})}
                    spy = Spy(profile, f"{rate}-{name}", pids, sshd=None if "TLS" in name else b.source.sshd)
                r = b.measure(name)
                if spy is not None:
                    r["profile"] = spy.stop()
                    for side, top in r["profile"].items():
                        log(f"profile {name} {side}: " + ", ".join(f"{k} {v:.0%}" for k, v in top[:10]))
                r.update(rate=rate, rtt=2 * delay, mib=size_mib, run=i)
                rows.append(r)
    return rows


def part_compression(b: Bench, rate: str, delay: float, mib: int, seed: int, quick: bool = False) -> list[dict]:
    from coalesce_remote import protocol as P

    b.link.shape(delay_ms=delay, rate=rate)
    rows = []
    runs: list[tuple[str, str]] = [
        (f"coalesce over {kind}", comp) for kind in ("TLS", "SSH") for comp in ("none", *P.COMPRESSIONS)
    ]
    runs += [("native over SSH", "none"), ("native over SSH", "ssh -C")]
    if quick:  # one run of each kind
        runs = [runs[0], runs[1], runs[-2], runs[-1]]
    for i, (name, comp) in enumerate(runs):
        write_words(b.qdir, mib, seed + i)
        m = b.methods[name]
        if isinstance(m, Coalesce):
            os.environ["COALESCE_COMPRESSION"] = comp
            m.reopen()
            welcome = m.h.agent.source.handle.welcome
        else:
            m.extra_ssh = ["-C"] if comp == "ssh -C" else []
        try:
            r = b.measure(name)
        finally:
            os.environ["COALESCE_COMPRESSION"] = "auto"
            if isinstance(m, Native):
                m.extra_ssh = []
        if isinstance(m, Coalesce):
            r["negotiated"] = welcome.get("compression") or "none"
            m.reopen()
        else:
            r["negotiated"] = comp
        r.update(rate=rate, rtt=2 * delay, mib=mib, comp=comp)
        rows.append(r)
    return rows


def part_resume(
    b: Bench, rate: str, delay: float, mib: int, outage: float, seed: int, quick: bool = False
) -> list[dict]:
    b.link.shape(delay_ms=delay, rate=rate)
    rows = []
    plan = [
        ("coalesce over TLS", "resume"),
        ("coalesce over SSH", "resume"),
        ("coalesce over TLS", "restart (COALESCE_RETRIES=0)"),
        ("native over SSH", "restart"),
    ]
    if quick:
        plan = [plan[0], plan[3]]
    for i, (name, how) in enumerate(plan):
        m = b.methods[name]
        write_big(b.qdir, mib, random.Random(seed + 2 * i))
        base = b.measure(name)
        write_big(b.qdir, mib, random.Random(seed + 2 * i + 1))
        if how.startswith("restart (COALESCE"):
            os.environ["COALESCE_RETRIES"] = "0"
            m.reopen()
        up = threading.Event()
        at = base["wall"] / 2

        def cut() -> None:
            time.sleep(at)
            b.link.down()
            b.link.drop_connections()
            time.sleep(outage)
            b.link.up()
            up.set()

        t = threading.Thread(target=cut, daemon=True)
        t.start()
        try:
            r = b.measure(
                name,
                until_stable=True,
                wait=up.wait,
                done=lambda: same_tree(b.qdir, m.image(), random.Random(0)) is None,
            )
        finally:
            t.join()
            if how.startswith("restart (COALESCE"):
                os.environ["COALESCE_RETRIES"] = "6"
                m.reopen()
        r.update(
            how=how, base=base["wall"], at=at, outage=outage, mib=mib, rate=rate, rtt=2 * delay, missed=r["wall"] < at
        )
        rows.append(r)
    return rows


# ---------------------------------------------------------------------------- tables
def t_main(rows: list[dict]) -> str:
    """Part 1's table; rows on zfs-fuse get a column for the daemon's CPU (it serves both ends)."""
    zfs = any(r.get("fs") == "zfs-fuse" for r in rows)

    def line(r: dict) -> str:
        nat = next(
            x
            for x in rows
            if (x["rate"], x["run"], x.get("fs")) == (r["rate"], r["run"], r.get("fs"))
            and x["name"].startswith("native")
        )
        return (
            f"| {r['rate']}, {r['rtt']:.0f} ms RTT | {r['name']} | {r['mib']} MiB | {r['wall']:.2f} | "
            f"{r['mib'] / r['wall']:.1f} | {r['wire'] / MiB:.0f} | {r['client_cpu']:.1f} / "
            f"{r['server_cpu']:.1f} | " + (f"{r['zfs_cpu']:.1f} | " if zfs else "") + f"{nat['wall'] / r['wall']:.2f} |"
        )

    head = (
        "| link | method | data | wall (s) | MiB/s | MiB on the wire | CPU here / at the source (s) "
        + ("| zfs-fuse daemon CPU (s) " if zfs else "")
        + "| native / this (goal >= 0.9) |"
    )
    return md_table(head, map(line, rows))


def t_profile(rows: list[dict]) -> str:
    return md_table(
        "| link | method | side | samples by stage (py-spy --native, every thread of the side's Python "
        "processes; waiting = innermost frame in select/poll/sleep) |",
        (
            f"| {r['rate']} | {r['name']} | {side} | " + ", ".join(f"{k} {v:.0%}" for k, v in top if v >= 0.01) + " |"
            for r in rows
            for side, top in r.get("profile", {}).items()
        ),
    )


def t_comp(rows: list[dict]) -> str:
    return md_table(
        "| link | method | compression (negotiated) | data | wall (s) | MiB on the wire | wire / data "
        "| CPU here / at the source (s) |",
        (
            f"| {r['rate']}, {r['rtt']:.0f} ms RTT | {r['name']} | {r['comp']} ({r['negotiated']}) | "
            f"{r['mib']} MiB of words | {r['wall']:.2f} | {r['wire'] / MiB:.0f} | "
            f"{r['wire'] / (r['mib'] * MiB):.2f} | {r['client_cpu']:.1f} / {r['server_cpu']:.1f} |"
            for r in rows
        ),
    )


def t_resume(rows: list[dict]) -> str:
    return md_table(
        "| link | method | after the drop | data | uninterrupted (s) | drop at (s) | outage (s) "
        "| with the drop (s) | time lost (s) | MiB on the wire | resumes / failed cycles / attempts |",
        (
            f"| {r['rate']}, {r['rtt']:.0f} ms RTT | {r['name']} | {r['how']}"
            + (" (the drop came after the end)" if r["missed"] else "")
            + f" | {r['mib']} MiB | {r['base']:.2f} | {r['at']:.1f} | {r['outage']:.0f} | {r['wall']:.2f} | "
            f"{r['wall'] - r['base']:.2f} | {r['wire'] / MiB:.0f} | {r.get('resumes', '-')} / {r['failures']} "
            f"/ {r['cycles']} |"
            for r in rows
        ),
    )


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    global VERBOSE, SPOOL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 MiB, the 100 Mbit/s link only: a smoke test")
    ap.add_argument("--size-mib", type=int, default=1024, help="the update of part 1 (8 large files)")
    ap.add_argument("--comp-mib", type=int, default=256, help="compressible data of part 2")
    ap.add_argument("--resume-mib", type=int, default=256, help="the transfer cut by a link drop in part 3")
    ap.add_argument("--outage", type=float, default=3.0, help="seconds the link stays down in part 3")
    ap.add_argument("--parts", default="main,compression,resume")
    ap.add_argument("--rates", default=",".join(r for r, _ in SHAPES), help="link rates of part 1 (tc units)")
    ap.add_argument("--repeat", type=int, default=1, help="part 1: run each method this many times (alternating)")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="part 1: py-spy every run (this process and the source "
        "side), raw stacks to DIR, the top frames as a table",
    )
    ap.add_argument(
        "--zfs",
        action="store_true",
        help="part 1 also on zfs-fuse (zfs source and destinations; native: zfs send -i | ssh | zfs "
        "receive), on a private pool; starts zfs-fuse when none runs and stops it at the end: do "
        "not run it while the real-FS tests run",
    )
    ap.add_argument("--no-btrfs", action="store_true", help="part 1 on zfs-fuse only (needs --zfs and --parts main)")
    ap.add_argument("--zfs-size-mib", type=int, default=None, help="the zfs update of part 1 (default: --size-mib)")
    ap.add_argument(
        "--spool",
        choices=["default", "on", "off"],
        default="default",
        help="the groups' `spool` (default: on, as for every remote source)",
    )
    ap.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="part 1: one untimed update of the full size per link shape before the timed ones (default: on)",
    )
    ap.add_argument(
        "--zfs-pool",
        choices=["ram", "disk"],
        default="ram",
        help="--zfs: the pool's file in a tmpfs, allocated up front (default), or a sparse file on "
        "disk (common.zfs_pool)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args(argv)
    VERBOSE = args.verbose
    SPOOL = {"default": None, "on": True, "off": False}[args.spool]
    shapes = [(r, SHAPES[0][1]) for r in args.rates.split(",")]
    if args.no_btrfs and (not args.zfs or args.parts != "main"):
        ap.error("--no-btrfs needs --zfs and --parts main (compression and resume run on btrfs)")
    if args.quick:
        args.size_mib = args.comp_mib = args.resume_mib = 8
        args.zfs_size_mib = 8 if args.zfs_size_mib is None else min(args.zfs_size_mib, 8)
        args.outage = 1.0
        shapes = [SHAPES[1]]
    if os.geteuid() != 0:
        print("bench_net.py needs root (network namespaces, a TUN device, a loop btrfs, sshd)", file=sys.stderr)
        return 2
    realfs_tool().ensure_tools(btrfs=True, zfs=False)
    from tests.net.linkemu import Link

    parts = set(args.parts.split(","))
    cmd = command("bench_net", argv)
    fs_gib = max(2.0, 8 * max(args.size_mib, args.comp_mib, args.resume_mib) / 1024 + 2)
    started = time.perf_counter()
    fs = LoopFS(int(fs_gib * (1 << 30)))
    if args.zfs_size_mib is None:
        args.zfs_size_mib = args.size_mib
    link = source = None
    zstack = contextlib.ExitStack()
    zfs_info: dict | None = None
    methods: dict[str, Any] = {}
    zmethods: dict[str, Any] = {}
    out: list[str] = []
    problems: list[str] = []
    saved_env = {
        k: os.environ.get(k)
        for k in (
            "COALESCE_TLS_CERT",
            "COALESCE_TLS_KEY",
            "COALESCE_TLS_CA",
            "COALESCE_SSH",
            "COALESCE_RETRIES",
            "COALESCE_RETRY_DELAY",
            "COALESCE_TIMEOUT",
            "COALESCE_COMPRESSION",
        )
    }
    try:
        mnt = fs.up()
        work = Path(fs.dir) / "work"
        work.mkdir()
        pm = plugin_manager()
        Volume.open(pm, f"btrfs://{mnt}/src", create=True).close()
        qdir = os.path.join(mnt, "src", QTREE)
        os.makedirs(qdir)
        zq = None
        if args.zfs and "main" in parts:
            # before the source services start: they inherit COALESCE_ZFS_STATE_DIR from zfs_pool
            zfs_info = zstack.enter_context(
                zfs_pool(
                    max(2 << 30, 10 * args.zfs_size_mib * MiB + (2 << 30)),
                    log,
                    prefix="cnet",
                    in_ram=args.zfs_pool == "ram",
                )
            )
            zpool = zfs_info["pool"]
            Volume.open(pm, f"zfs://{zpool}/src", create=True).close()
            zq = os.path.join(zfs_mountpoint(f"{zpool}/src"), QTREE)
            os.makedirs(zq)
        link = Link(log=str(work / "linkemu.log")).start()
        log(f"btrfs {fs_gib:.1f} GiB at {mnt}; link {link.mode} {link.a_ip} <-> {link.b_ip}, mtu {link.mtu}")
        source = Source(link, work, mnt, zfs_ds=f"{zfs_info['pool']}/src" if zfs_info else None)
        os.environ.update(
            COALESCE_TLS_CERT=source.client[0],
            COALESCE_TLS_KEY=source.client[1],
            COALESCE_TLS_CA=source.ca,
            COALESCE_SSH=source.sshd.ssh,
            COALESCE_RETRIES="6",
            COALESCE_RETRY_DELAY="0.5",
            COALESCE_TIMEOUT="10",
            COALESCE_COMPRESSION="auto",
        )
        methods = {
            "coalesce over SSH": Coalesce("ssh", source.ssh_url, mnt, work),
            "coalesce over TLS": Coalesce("tls", source.tls_url, mnt, work),
            "native over SSH": Native(source, mnt),
        }
        b = Bench(link, source, qdir, methods)
        # baselines on the unshaped link (not reported): every method holds the same first image
        if not args.no_btrfs:
            baselines(b, args.size_mib, args.seed)
        zb = None
        if zfs_info is not None:
            assert zq is not None  # made with zfs_info, above
            zpool = zfs_info["pool"]
            zmethods = {
                "coalesce over SSH, zfs": Coalesce(
                    "ssh", source.zfs_ssh_url, mnt, work, dest=f"zfs://{zpool}/dssh", tag="z"
                ),
                "coalesce over TLS, zfs": Coalesce(
                    "tls", source.zfs_tls_url, mnt, work, dest=f"zfs://{zpool}/dtls", tag="z"
                ),
                "native zfs over SSH": NativeZfs(
                    source, f"{zpool}/nzdst", os.path.join(zfs_info["mountpoint"], "nzdst")
                ),
            }

            def settle(ds: str = f"{zpool}/src") -> None:
                zfs_settle(ds)

            zb = Bench(link, source, zq, zmethods, fs="zfs-fuse", settle=settle)
            baselines(zb, args.zfs_size_mib, args.seed)
        emu = (
            f"link: {link.mode} emulator (tests/net/linkemu.py), MTU {link.mtu}, tbf rate limit, "
            f"delay {SHAPES[1][1]:.0f} ms each way"
        )
        if "main" in parts and not args.no_btrfs:
            rows = part_main(
                b,
                shapes,
                args.size_mib,
                args.seed + 10,
                args.repeat,
                Path(args.profile) if args.profile else None,
                args.warmup,
            )
            out += [header(cmd, emu + "; default compression (auto)"), t_main(rows), ""]
            print("\n".join(out[-3:]), flush=True)
            if args.profile:
                print(t_profile(rows) + "\n", flush=True)
        if "main" in parts:
            if zb is not None:
                zrows = part_main(
                    zb,
                    shapes,
                    args.zfs_size_mib,
                    args.seed + 10,
                    args.repeat,
                    Path(args.profile) if args.profile else None,
                    args.warmup,
                )
                zv = (
                    subprocess.run(
                        ["dpkg-query", "-W", "-f", "${Version}", "zfs-fuse"], capture_output=True, text=True
                    ).stdout.strip()
                    or "?"
                )
                out += [
                    header(
                        cmd,
                        emu
                        + f"; default compression (auto); zfs-fuse {zv}, one pool on "
                        + (
                            "a file in a tmpfs, allocated up front"
                            if args.zfs_pool == "ram"
                            else "a sparse file on disk"
                        )
                        + "; zfs source and destinations",
                    ),
                    t_main(zrows),
                    "",
                ]
                print("\n".join(out[-3:]), flush=True)
                if args.profile:
                    print(t_profile(zrows) + "\n", flush=True)
        rate, delay = SHAPES[1]
        if "compression" in parts:
            rows = part_compression(b, rate, delay, args.comp_mib, args.seed + 100, args.quick)
            out += [header(cmd, emu), t_comp(rows), ""]
            print("\n".join(out[-3:]), flush=True)
        if "resume" in parts:
            rows = part_resume(b, rate, delay, args.resume_mib, args.outage, args.seed + 200, args.quick)
            out += [header(cmd, emu + "; drop = link down + ss -K of both ends' TCP connections"), t_resume(rows), ""]
            print("\n".join(out[-3:]), flush=True)
    finally:
        for m in [*methods.values(), *zmethods.values()]:
            if isinstance(m, Coalesce):
                m.close()
        with contextlib.suppress(Exception):
            import coalesce_remote

            coalesce_remote.close_all()
        if source is not None:
            with contextlib.suppress(Exception):
                source.close()
        if link is not None:
            problems += link.close()
        try:
            zstack.close()  # the zfs pool (and the daemon, if we started it)
        except Exception as exc:  # noqa: BLE001 -- keep tearing down
            problems.append(f"zfs teardown: {exc}")
        if zfs_info is not None:
            problems += zfs_info["problems"]
        problems += fs.down()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for p in problems:
            print(f"cleanup: {p}", file=sys.stderr)
    print(f"<!-- bench_net.py ran {time.perf_counter() - started:.0f} s -->")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
