"""The spool (coalesce_core/stream/spool.py): what it costs, and what it saves when the agent is killed.

    python3 -m tools.bench.bench_spool [--quick] [--mib 128] [--rate 8MiB/s] [--dir /var/tmp]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

1. **Cost.**  The same change records pass through ``Spool.record`` (written
   through to a file in ``--dir``) and, for comparison, through a plain loop:
   1 MiB Write records (``--mib`` MiB) and 20,000 small files (MkFile, a 2 KiB
   Write, SetAttr).  Then ``Spool.resume`` replays the spool.  Wall and
   process CPU; the spool's size.
2. **A SIGKILL mid-update.**  A source service (mutual TLS on loopback, a
   thread of this process) serves a mem volume; the agent is a separate
   ``coalesce`` process with a ``sim://`` destination (fsync on), reading at
   ``--rate`` (the client's bandwidth limit).  One group runs the update
   uninterrupted; two more are killed (SIGKILL from outside, at half the
   uninterrupted time) and restarted with ``coalesce run --once``: one with
   ``spool = true`` (recovery rolls back, replays the spool, fetches the rest:
   same cycle), one with ``spool = false`` (recovery rolls back; the cycle that
   follows sends the update again).  Time lost = time to the kill + the
   restart run - the uninterrupted run; MiB the server sent in whole streams
   (after the restart, for the killed groups).

Prints markdown tables; figures go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from coalesce_core.stream.records import Begin, End, MkFile, SetAttr, Write
from coalesce_core.stream.spool import Spool
from tools.bench.common import MiB, children_cpu, command, cpu, utc_now

EXE = [sys.executable, "-m", "coalesce_core.ui.cli"]


# --------------------------------------------------------------------------- 1. cost
def big_records(mib: int) -> list:
    data = random.Random(1).randbytes(MiB)
    recs: list = [Begin(qtree="A", base="s1", target="s2")]
    for f in range(max(1, mib // 64)):
        recs.append(MkFile(path=f"big{f}"))
    for i in range(mib):
        recs.append(Write(path=f"big{i // 64}", offset=(i % 64) * MiB, data=data))
    return [*recs, End(records=len(recs) - 1)]


def small_records(files: int) -> list:
    data = random.Random(2).randbytes(2048)
    recs: list = [Begin(qtree="A", base="s1", target="s2")]
    for i in range(files):
        p = f"d{i % 100}/f{i}"
        recs += [MkFile(path=p), Write(path=p, offset=0, data=data), SetAttr(path=p, mode=0o644, mtime_ns=i)]
    return [*recs, End(records=len(recs) - 1)]


def cost(name: str, recs: list, where: Path) -> dict:
    sp = Spool(where)
    t0, c0 = time.perf_counter(), cpu()
    n = sum(1 for _ in recs)
    plain = (time.perf_counter() - t0, cpu() - c0)
    t0, c0 = time.perf_counter(), cpu()
    for _ in sp.record("A", iter(recs)):
        pass
    spooled = (time.perf_counter() - t0, cpu() - c0)
    size = sp.path("A").stat().st_size
    os.sync()
    t0, c0 = time.perf_counter(), cpu()
    got = sum(1 for _ in sp.resume("A", recs[0], lambda k: iter([recs[0], recs[-1]])))
    replay = (time.perf_counter() - t0, cpu() - c0)
    assert got == n, (got, n)
    sp.discard("A")
    data = sum(len(r.data) for r in recs if type(r) is Write)
    return {
        "name": name,
        "records": n - 2,
        "data": data,
        "size": size,
        "plain": plain,
        "spooled": spooled,
        "replay": replay,
    }


# --------------------------------------------------------------------------- 2. SIGKILL
def certs(d: Path) -> types.SimpleNamespace:
    from tests.net.netkit import CA

    d.mkdir(parents=True, exist_ok=True)
    ca = CA(d, "bench-spool-ca")
    return types.SimpleNamespace(
        ca=ca.path, server=ca.issue("bench-source", server=True, ips=("127.0.0.1",)), client=ca.issue("backup1")
    )


def run(cfg: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, "--config", str(cfg), *args], capture_output=True, text=True, env=env, timeout=3600)


def kill_test(mib: int, rate: str, work: Path) -> list[dict]:
    from coalesce_core.backend.manager import plugin_manager
    from coalesce_core.backend.volume import Volume
    from coalesce_core.testing.workload import SourceWriter
    from tests.net.netkit import TLSService

    c = certs(work / "certs")
    svc = TLSService(c)
    env = dict(
        os.environ,
        COALESCE_TLS_CERT=c.client[0],
        COALESCE_TLS_KEY=c.client[1],
        COALESCE_TLS_CA=c.ca,
        COALESCE_BANDWIDTH=rate,
        COALESCE_COMPRESSION="none",
        COALESCE_TIMEOUT="30",
    )
    env.pop("COALESCE_CRASH_AT", None)
    local = f"mem://bench-spool-{os.getpid()}"
    src = Volume.open(plugin_manager(), local, create=True)
    writer = SourceWriter(src)
    url = svc.expose(local, name="src")
    modes = ["uninterrupted", "killed, spool = true", "killed, spool = false"]
    groups = []
    try:
        for i, mode in enumerate(modes):
            q = f"q{i}"
            writer.ensure_qtree(q)
            writer.write(q, "seed", b"seed")
            cfg = work / f"g{i}.toml"
            spool = "false" if mode.endswith("false") else "true"
            cfg.write_text(
                "\n".join(
                    [
                        "[group]",
                        f'name = "g{i}"',
                        f'source = "{url}"',
                        f'destination = "sim://{work}/dst{i}?size={2 * mib + 64}M"',
                        f'metadata = "{work}/meta{i}"',
                        f"spool = {spool}",
                        "[[replica]]",
                        f'name = "{q}"',
                        f'source = "{q}"',
                        "",
                    ]
                )
            )
            for args in (("init",), ("run", "--once")):
                p = run(cfg, env, *args)
                if p.returncode != 0:
                    raise SystemExit(f"{mode}: coalesce {' '.join(args)} failed: {p.stderr[-2000:]}")
            groups.append((mode, q, cfg))
        data = random.Random(7).randbytes(4 * MiB)
        for _mode, q, _cfg in groups:
            for f in range(mib // 4):
                writer.write(q, f"new/f{f}", data[f:] + data[:f])
        rows = []
        uninterrupted = None
        for i, (mode, q, cfg) in enumerate(groups):
            b0 = svc.service.stats["bytes_out"]
            c0 = children_cpu()
            t0 = time.perf_counter()
            if mode == "uninterrupted":
                p = run(cfg, env, "run", "--once")
                assert p.returncode == 0, p.stderr
                uninterrupted = time.perf_counter() - t0
                row = {"mode": mode, "first": uninterrupted, "restart": 0.0, "lost": 0.0}
            else:
                assert uninterrupted is not None  # modes[0], run first, measured it
                proc = subprocess.Popen(
                    [*EXE, "--config", str(cfg), "run", "--once"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(uninterrupted / 2)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                first = time.perf_counter() - t0
                spooled = Spool(work / f"meta{i}" / f"g{i}.spool").count(q)
                t1 = time.perf_counter()
                b0 = svc.service.stats["bytes_out"]  # (a stream cut by the kill is never counted)
                p = run(cfg, env, "run", "--once")
                assert p.returncode == 0, p.stderr
                restart = time.perf_counter() - t1
                row = {
                    "mode": mode,
                    "first": first,
                    "restart": restart,
                    "lost": first + restart - uninterrupted,
                    "spooled": spooled,
                }
            row["sent"] = svc.service.stats["bytes_out"] - b0
            row["cpu"] = children_cpu() - c0
            st = json.loads(run(cfg, env, "status", "--json").stdout)
            row["stable"] = [r["state"] for r in st["replicas"]] == ["stable"]
            chk = run(cfg, env, "check")
            row["check"] = chk.returncode == 0
            rows.append(row)
        return rows
    finally:
        svc.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes (CI smoke test)")
    ap.add_argument("--mib", type=int, default=128, help="MiB changed in the SIGKILL test (default 128)")
    ap.add_argument("--cost-mib", type=int, default=1024, help="MiB of Write records in the cost test (default 1024)")
    ap.add_argument("--files", type=int, default=20000, help="small files in the cost test (default 20000)")
    ap.add_argument("--rate", default="8MiB/s", help="the agent's bandwidth limit in the SIGKILL test")
    ap.add_argument("--dir", default="/var/tmp", help="where the spools and volumes go")
    args = ap.parse_args(argv)
    if args.quick:
        args.mib, args.cost_mib, args.files, args.rate = 8, 16, 500, "4MiB/s"
    work = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir))
    try:
        print(
            f"`{command('bench_spool', argv)}` on {platform.node()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, {utc_now()}, load {os.getloadavg()[0]:.2f}\n"
        )
        print(
            "| records | change records | data (MiB) | spool file (MiB) | plain loop wall / CPU (s) "
            "| through the spool wall / CPU (s) | spool MiB/s | replay wall / CPU (s) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, recs in (
            (f"{args.cost_mib} x 1 MiB Write", big_records(args.cost_mib)),
            (f"{args.files} small files", small_records(args.files)),
        ):
            r = cost(name, recs, work / "cost")
            del recs
            mbps = r["size"] / MiB / max(r["spooled"][0], 1e-9)
            print(
                f"| {r['name']} | {r['records']:,} | {r['data'] / MiB:.0f} | {r['size'] / MiB:.1f} "
                f"| {r['plain'][0]:.3f} / {r['plain'][1]:.3f} | {r['spooled'][0]:.2f} / {r['spooled'][1]:.2f} "
                f"| {mbps:.0f} | {r['replay'][0]:.2f} / {r['replay'][1]:.2f} |",
                flush=True,
            )
        print(
            f"\nSIGKILL mid-update: {args.mib} MiB changed, client limit {args.rate}, TLS on loopback, "
            "destination sim:// (fsync on), killed at half the uninterrupted time\n"
        )
        print(
            "| run | until done or killed (s) | restart run (s) | time lost (s) | records in the spool "
            "| MiB the source sent (after the restart) | agent CPU, all runs (s) | stable, `coalesce check` |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for row in kill_test(args.mib, args.rate, work):
            print(
                f"| {row['mode']} | {row['first']:.2f} | {row['restart']:.2f} | {row['lost']:.2f} "
                f"| {row.get('spooled', '-')} | {row['sent'] / MiB:.1f} | {row['cpu']:.2f} "
                f"| {'yes' if row['stable'] else 'NO'}, {'ok' if row['check'] else 'FAILED'} |",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
