"""The retention policy's prune (coalesce_core/retention.py, coalesce_core/cycle/generations.py): what it costs.

    python3 -m tools.bench.bench_retention [--quick] [--generations 10 100 1000] [--replicas 1 100 1000]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

Pure: no volume, no ledger, no clock but the timer; the states are built in memory.

1. **The plan.** ``retention.plan`` over G retained generations an hour apart (G = ``--generations``),
   under ``keep = "24h 14d 8w 12m 2y"`` with and without ``max = 60``, and ``keep_min = "30d"``
   alone: the median of ``--repeat`` runs with the module's caches (month and label lookups) warm (a
   long-running agent, which prunes at every cycle) and the first run after clearing them (a fresh
   process: every administrative verb, `coalesce generations --plan`).
2. **The replicas.** ``generations.as_retained`` (the policy's view of the group: each generation's
   fresh replicas counted from its manifest, the generations pinned by replicas outside the cycle)
   and the whole prune (``generations.prune``: that view, then the plan) over G = 100 generations
   whose manifests hold R entries each, with R replicas in the group (R = ``--replicas``): whether a
   prune's cost grows with the number of replicas.

Prints markdown tables; figures go to docs/benchmarks.md by hand.  Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

from coalesce_core import retention
from coalesce_core.cycle import generations as gen
from coalesce_core.cycle.state import GENERATION, GroupState, Pcpi, Replica
from tools.bench.common import command, host, loads, md_table, provenance, utc_now

HOUR = 3600.0
#: the present of every plan: 2026-12-07 12:30 UTC (the worked example of docs/config.md)
NOW = 1_796_646_600.0
#: the policies of part 1: name -> Policy
POLICIES = {
    'keep = "24h 14d 8w 12m 2y"': retention.Policy(keep="24h 14d 8w 12m 2y"),
    'keep = "24h 14d 8w 12m 2y", max = 60': retention.Policy(keep="24h 14d 8w 12m 2y", max=60),
    'keep_min = "30d"': retention.Policy(keep_min=30 * 86400),
}
#: the policy of part 2
POLICY = retention.Policy(keep="24h 14d 8w 12m 2y", max=60)


def generations(g: int) -> list[retention.Generation]:
    """``g`` generations an hour apart, the newest an hour before :data:`NOW`, oldest first."""
    return [retention.Generation(id=f"g{i:06d}", time=NOW - (g - i) * HOUR, fresh=i % 3, seq=i) for i in range(g)]


def clear_caches() -> None:
    """The state of a fresh process: every cache of the retention module empty (its month and label
    lookups, and any other ``functools`` cache it keeps)."""
    for value in vars(retention).values():
        clear = getattr(value, "cache_clear", None)
        if callable(clear):
            clear()


def timed(fn: Callable[[], object], repeat: int) -> float:
    """The median wall time of ``repeat`` calls of ``fn`` (seconds)."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def cold(fn: Callable[[], object]) -> float:
    """The wall time of one call of ``fn`` after :func:`clear_caches` (seconds)."""
    clear_caches()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def plan_rows(sizes: list[int], repeat: int) -> list[str]:
    rows = []
    for name, policy in POLICIES.items():
        for g in sizes:
            gens = generations(g)
            kept = len(retention.plan(gens, NOW, policy).kept)
            first = cold(lambda: retention.plan(gens, NOW, policy))
            warm = timed(lambda: retention.plan(gens, NOW, policy), repeat)
            rows.append(f"| {name} | {g} | {kept} | {warm * 1e3:.2f} | {warm / g * 1e6:.1f} | {first * 1e3:.2f} |")
    return rows


def group(g: int, r: int) -> GroupState:
    """A group of ``r`` stable replicas and ``g`` generations (plus the base) an hour apart, each with
    a manifest of ``r`` entries (every replica updated in every image but one in three)."""
    replicas = {f"q{j:05d}": Replica(name=f"q{j:05d}", source_qtree=f"q{j:05d}", state="stable") for j in range(r)}
    pcpis, manifests = {}, {}
    for i in range(g + 1):
        name = f"co-g-{3 * i + 3:06d}-new_base"
        role = GENERATION if i < g else "base"
        pcpis[name] = Pcpi(name=name, role=role, cycle=i + 1, taken=True, taken_at=NOW - (g + 1 - i) * HOUR)
        entries = tuple(
            gen.Entry(
                q, gen.UPDATED if (i + j) % 3 else gen.STALE, f"co-g-src-{3 * i + 1:06d}", NOW - (g + 1 - i) * HOUR
            )
            for j, q in enumerate(replicas)
        )
        manifests[name] = gen.Manifest(pcpi=name, cycle=i + 1, time=NOW - (g + 1 - i) * HOUR, entries=entries)
        if i == g:
            replicas = {q: Replica(name=q, source_qtree=q, state="stable", exported=name) for q in replicas}
    return GroupState(name="g", replicas=replicas, pcpis=pcpis, manifests=manifests, retention=POLICY)


def replica_rows(g: int, sizes: list[int], repeat: int) -> list[str]:
    rows = []
    for r in sizes:
        state = group(g, r)
        view = timed(lambda: gen.as_retained(state), repeat)
        gens = gen.as_retained(state)
        plan = timed(lambda: retention.plan(gens, NOW, POLICY), repeat)
        whole = timed(lambda: gen.prune(state, NOW), repeat)
        rows.append(
            f"| {r} | {g} | {g * r:,} | {view * 1e3:.2f} | {view / g * 1e6:.1f} | {plan * 1e3:.2f} "
            f"| {whole * 1e3:.2f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="G = 10, 100; R = 1, 10; 5 repeats: a smoke test")
    ap.add_argument("--generations", type=int, nargs="+", default=[10, 100, 1000], help="G of part 1")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 100, 1000], help="R of part 2")
    ap.add_argument("--per-replica-generations", type=int, default=100, help="G of part 2")
    ap.add_argument("--repeat", type=int, default=21, help="runs of each measurement (the median is shown)")
    args = ap.parse_args(argv)
    if args.quick:
        args.generations, args.replicas, args.repeat = [10, 100], [1, 10], 5
    load0 = loads()
    started = time.perf_counter()
    plans = plan_rows(args.generations, args.repeat)
    per_replica = replica_rows(args.per_replica_generations, args.replicas, args.repeat)
    print(
        provenance(
            utc_now(),
            host(kernel=False),
            f"median of {args.repeat} runs",
            f"load average {load0} at the start, {loads()} at the end",
            f"ran {time.perf_counter() - started:.0f} s",
            f"command: {command('bench_retention', argv)}",
        )
    )
    print(
        md_table(
            "| policy | generations | kept | plan, warm (ms) | per generation (µs) | plan, cold caches (ms) |",
            plans,
        )
    )
    print()
    print(
        md_table(
            "| replicas | generations | manifest entries | as_retained (ms) | as_retained per generation (µs) "
            "| plan (ms) | prune: both (ms) |",
            per_replica,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
