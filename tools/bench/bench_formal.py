"""Model checking figures: the SPIN model at 2, 3 and 4 replicas; hypothesis stateful steps per second.

    python3 -m tools.bench.bench_formal [--replicas 2 3 4] [--examples 30] [--steps 30] [--skip-spin | --skip-hypothesis]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

SPIN: for each N the model is generated with ``tools/gen_promela.py
--replicas N`` (the committed spec/coalescing.pml is N=3) and both searches
of tools/spin.py run: the safety search (-DSAFETY, asserts and deadlocks) and
the I7 liveness search (ltl i7, -a -f, weak fairness).  Each is first tried
exhaustive (as tools/spin.py runs it); if that runs out of memory (pan's
-DMEMLIM, ``--memlim`` MiB) or time (``--timeout`` s), it is retried with
-DCOLLAPSE (still exhaustive, compressed states), then -DHC4 (hash compaction:
a state is kept as a 4-byte hash; a collision can hide a state) and then
-DBITSTATE (supertrace: partial coverage, pan's hash factor reported).
Every attempt is a row.

Hypothesis: the stateful test of tests/formal (the RuleBasedStateMachine that
drives the real agent: tests/formal/stateful_machine.py) on mem and on sim
(fsync off, as tests/conftest.py runs it), ``--examples`` examples of up to
``--steps`` steps, derandomized, no example database; rule executions
(initialize rule included) counted from the machine's own STATS.

Prints markdown tables; figures go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time

from tools import gen_promela, spin
from tools.bench.common import children_cpu, command, cpu, loads, provenance, utc_now

MODES = (
    ("exhaustive", ()),
    ("COLLAPSE", ("-DCOLLAPSE",)),
    ("HC4", ("-DHC4",)),
    ("BITSTATE", ("-DBITSTATE",)),
)
LOSSY = {"HC4", "BITSTATE"}


def versions() -> str:
    import hypothesis

    sv = "spin missing"
    if shutil.which("spin"):
        sv = subprocess.run(["spin", "-V"], capture_output=True, text=True).stdout.strip()
    gv = (
        subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
        if shutil.which("gcc")
        else "?"
    )
    return f"python {platform.python_version()}, {sv}, gcc {gv}, hypothesis {hypothesis.__version__}"


def header(argv: list[str], what: str) -> str:
    return provenance(
        utc_now(),
        what,
        f"{platform.node()} {platform.machine()} cpus {os.cpu_count()}",
        versions(),
        f"load average {loads()}",
        f"command: {command('bench_formal', argv)}",
    )


# -- SPIN ----------------------------------------------------------------------------
def spin_rows(
    replicas: list[int],
    memlim: int,
    timeout: float,
    modes: list[str],
    opt: str = spin.OPT,
    hash_bits: int = spin.HASH,
    searches: tuple[str, ...] = ("safety", "liveness"),
) -> list[dict]:
    rows = []
    for n in replicas:
        text = gen_promela.generate(replicas=n)
        for search in searches:
            for mode, cflags in MODES:
                if mode not in modes:
                    continue
                w = 33 if mode == "BITSTATE" else hash_bits  # bit-state: a 1 GiB bit array
                t0 = time.perf_counter()
                (res, _total) = spin.run(
                    text, opt=opt, only=search, extra_cflags=cflags, memlim=memlim, hash_bits=w, timeout=timeout
                )
                res.update(replicas=n, search=search, mode=mode, wall=time.perf_counter() - t0)
                if mode == "BITSTATE":  # pan says "Bit statespace search": that is the mode, not a fault
                    res["problems"] = [p for p in res["problems"] if p != "not a full state-space search"]
                rows.append(res)
                print(spin_row(res), flush=True)
                resource_bound = any(
                    "memory" in p or "killed after" in p or "not completed" in p for p in res["problems"]
                )
                if not resource_bound:
                    break  # passed, or failed for a reason a lossier search would not change
    return rows


def spin_row(r: dict) -> str:
    ok = "PASS" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
    mem = f"{r['memory_mb']:.0f}" if r.get("memory_mb") else "?"
    el = f"{r['elapsed_s']:.1f}" if r.get("elapsed_s") is not None else "?"
    name = "safety (asserts, deadlocks)" if r["search"] == "safety" else "liveness I7 (LTL, weak fairness)"
    return (
        f"| {r['replicas']} | {name} | {r['mode']} | {r['states']:,} | {r['matched']:,} | {r['transitions']:,} "
        f"| {r['depth']:,} | {r['state_vector']} | {mem} | {el} | {r['wall']:.1f} | {ok} |"
    )


SPIN_HEAD = (
    "| replicas | search | mode | states stored | states matched | transitions | depth | state vector (bytes) "
    "| memory (MiB) | search (s) | compile + search (s) | result |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


# -- hypothesis ----------------------------------------------------------------------
def hypothesis_rows(backends: list[str], examples: int, steps: int) -> list[dict]:
    os.environ.setdefault("COALESCE_SIM_FSYNC", "0")  # as tests/conftest.py
    from hypothesis import HealthCheck, Phase, settings

    from tests.formal.stateful_machine import STATS, CoalescingMachine, SimCoalescingMachine

    rows = []
    for backend in backends:
        machine = CoalescingMachine if backend == "mem" else SimCoalescingMachine
        test = machine.TestCase
        test.settings = settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        before = dict(STATS)
        c0 = cpu()
        t0 = time.perf_counter()
        test("runTest").runTest()
        wall = time.perf_counter() - t0
        c1 = cpu()
        d = {k: STATS[k] - before.get(k, 0) for k in STATS}
        rules = d["steps"] - d["examples"]  # the invariants run once before the first rule, then after each
        row = {
            "backend": backend,
            "examples": d["examples"],
            "rules": rules,
            "wall": wall,
            "cpu": c1 - c0,
            "crashes": d["crashes"],
            "restarts": d["restarts"],
            "steps_per_example": steps,
        }
        rows.append(row)
        print(hyp_row(row), flush=True)
    return rows


def hyp_row(r: dict) -> str:
    fsync = " (fsync off)" if r["backend"] == "sim" else ""
    return (
        f"| {r['backend']}{fsync} | {r['examples']} | {r['steps_per_example']} | {r['rules']} | {r['crashes']} / {r['restarts']} "
        f"| {r['wall']:.1f} | {r['cpu']:.1f} | {r['rules'] / r['wall']:.1f} | {r['examples'] / r['wall']:.2f} |"
    )


HYP_HEAD = (
    "| backend | examples | max steps per example | rule executions (steps) | crashes / restarts "
    "| wall (s) | CPU (s) | steps/s | examples/s |\n|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument(
        "--modes",
        nargs="+",
        default=[m for m, _ in MODES],
        choices=[m for m, _ in MODES],
        help="the search modes to try, in this order, until one fits (default: all)",
    )
    ap.add_argument("--memlim", type=int, default=8192, help="pan -DMEMLIM in MiB (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pan run (default %(default)s)")
    ap.add_argument("--backends", nargs="+", default=["mem", "sim"], choices=["mem", "sim"])
    ap.add_argument("--examples", type=int, default=30)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip-spin", action="store_true")
    ap.add_argument("--skip-hypothesis", action="store_true")
    ap.add_argument("--searches", nargs="+", default=["safety", "liveness"], choices=["safety", "liveness"])
    ap.add_argument("--opt", default=spin.OPT, help="gcc optimisation of pan.c (default %(default)s, as tools/spin.py)")
    ap.add_argument("--hash", type=int, default=spin.HASH, help="pan -w (default %(default)s, as tools/spin.py)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 replicas, the safety search only, pan.c at -O0 and -w20; 3 mem examples of 10 steps",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.replicas, args.modes, args.opt, args.hash, args.searches = [2], ["exhaustive"], "-O0", 20, ["safety"]
        args.backends, args.examples, args.steps = ["mem"], 3, 10
    t0 = time.perf_counter()
    rc = 0
    if not args.skip_spin:
        if not (shutil.which("spin") and shutil.which("gcc")):
            print("<!-- spin/gcc not installed: SPIN part skipped (apt-get install spin gcc) -->")
        else:
            print(header(argv, "SPIN, one pan run at a time"))
            print(SPIN_HEAD, flush=True)
            c0 = children_cpu()
            rows = spin_rows(
                args.replicas, args.memlim, args.timeout, args.modes, args.opt, args.hash, tuple(args.searches)
            )
            errors = [r for r in rows if r.get("errors")]
            rc |= int(bool(errors))
            print(
                f"\n<!-- SPIN part: {time.perf_counter() - t0:.0f} s wall, {children_cpu() - c0:.0f} s CPU (gcc + pan) -->\n"
            )
    if not args.skip_hypothesis:
        t1 = time.perf_counter()
        print(header(argv, "hypothesis stateful test, tests/formal/stateful_machine.py"))
        print(HYP_HEAD, flush=True)
        hypothesis_rows(args.backends, args.examples, args.steps)
        print(f"\n<!-- hypothesis part: {time.perf_counter() - t1:.0f} s -->")
    return rc


if __name__ == "__main__":
    sys.exit(main())
