"""Stragglers: the export lag of the healthy replicas with one straggler, with and without ``straggler_after``.

    python3 -m tools.bench.bench_stragglers [--quick] [--backends sim mem] [--replicas 10] [--delay 3]
                                            [--cycles 8] [--divisors 10 3] [-v]

from the repository root (docs/benchmarks.md, "Stragglers").

One group of R healthy replicas and one straggler (``--replicas`` R, qtrees ``q0000``... and ``slow``)
on one source and one destination volume of a backend (``sim``, ``mem``), run on the agent's real clock
(``time.time``: ``straggler_after`` is measured from the cycle's start by the agent's clock).  After the
baselines, every apply to the straggler's destination qtree first sleeps ``--delay`` D seconds (a
plugin wrapping ``coalesce_apply`` on the destination, as a slow link or a huge change set would);
every source qtree changes before each of ``--cycles`` K cycles, run back to back (``run_once``), then
one more cycle, untimed, with nothing slowed and no change, in which a straggler of the K-th rejoins.
Settings: ``straggler_after`` unset (the cycle waits for the slowest update, Fig. 7), then D / d for
each ``--divisors`` d.

An observer plugin (wrapping ``coalesce_export`` on the destination, as tests/formal's I4 observer
does) gives, at every export switch, each replica whose export changed the age of the image it now
shows: the switch's time less the ``taken_at`` of the source PCPI the replica's ``source_point`` names
(docs/architecture.md; spec/invariants.md, I3), both by the agent's clock.  Those are the export
lags: of the healthy replicas (median and maximum over the K cycles; also apart for the cycles in
which the straggler updates and the others, in which it only rejoins with the image it brought) and of
the straggler when its image is switched in (its rejoin, the extra cycle's included, or with the others
when unset).  At every destination PCPI take and export switch it counts the group's PCPIs on the
volume by role (cycle roles: I1, at most 4; individual: I2, at most 2 per replica outside the cycle)
and checks both on the agent's state; the group's live invariants are checked after the last cycle.
Cycles per hour: K over the wall time of the K cycles.

The lags follow D and ``straggler_after``, not the machine's load (a healthy update takes
milliseconds on sim and mem, though a loaded machine slows a cycle's own work); the load average is in the provenance comment all the same.  Prints a
markdown table; figures go to docs/benchmarks.md by hand.  Nothing here is asserted.  ``--quick``: 3
healthy replicas, D = 0.4 s, 3 cycles, divisor 3 (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import attrs

from coalesce_core.backend.hookspecs import ACTIVE, hookimpl
from coalesce_core.config import parse_config
from coalesce_core.cycle.invariants import i1_fixed_consumption, i2_bounded_extras
from coalesce_core.cycle.state import INDIVIDUAL
from coalesce_core.testing.harness import Harness
from tools.bench.common import close_harness, command, host, loads, md_table, progress, provenance, qtree_names, utc_now

#: the straggler's qtree (the healthy ones are ``qtree_names(R)``)
SLOW = "slow"
CYCLE_ROLES = ("base", "rollback", "jump_ahead", "new_base")


def _is(volume, url: str) -> bool:
    """Whether the backend's handle ``volume`` is the volume of ``url`` (a handle names its URL in its repr)."""
    return url in str(getattr(volume, "url", volume))


class SlowApply:
    """Every apply to destination qtree ``qtree`` sleeps ``delay`` seconds first, once ``armed``."""

    def __init__(self, dest_url: str, qtree: str, delay: float) -> None:
        self.dest_url = dest_url
        self.qtree = qtree
        self.delay = delay
        self.armed = False

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume, qtree, records):
        if self.armed and qtree == self.qtree and _is(volume, self.dest_url):
            time.sleep(self.delay)
        return (yield)


@attrs.frozen
class Lag:
    """One replica's export switch: in ``cycle``, to the image of the source PCPI of ``image_cycle``, that
    image ``seconds`` old."""

    cycle: int
    replica: str
    image_cycle: int
    seconds: float


class LagWatch:
    """Observer: the export lag of every replica at every export switch on the destination, the group's
    PCPIs on the volume by role at every take and switch (with I1 and I2 on the agent's state), the
    replicas that left a cycle (``straggle``) and the cycles in which the straggler ``slow`` started an
    update."""

    def __init__(self, dest_url: str, slow: str) -> None:
        self.dest_url = dest_url
        self.slow = slow
        self.h: Harness | None = None
        self.lags: list[Lag] = []
        self.slow_updates: set[int] = set()
        self.peak_cycle = 0
        self.peak_individual = 0
        self.peak_all = 0
        self.violations: list[str] = []
        self.straggled: list[str] = []

    def _count(self) -> None:
        h = self.h
        if h is None:
            return
        state = h.agent.state
        roles = {p.name: p.role for p in state.pcpis.values()}
        held = [n for n in h.agent.dest.snapshot_list() if n.startswith(f"co-{state.name}-")]
        self.peak_cycle = max(self.peak_cycle, sum(1 for n in held if roles.get(n) in CYCLE_ROLES))
        self.peak_individual = max(self.peak_individual, sum(1 for n in held if roles.get(n) == INDIVIDUAL))
        self.peak_all = max(self.peak_all, len(held))
        self.violations += [f.detail for f in (i1_fixed_consumption(state), i2_bounded_extras(state)) if not f.ok]

    @hookimpl
    def coalesce_pcpi_taken(self, group, volume, name, role):
        if role != "source":
            self._count()

    @hookimpl
    def coalesce_state_changed(self, group, replica, trigger, source, dest):
        if trigger == "straggle":
            self.straggled.append(replica)
        if trigger == "start_update" and replica == self.slow and self.h is not None:
            self.slow_updates.add(self.h.agent.state.cycle)  # committed before the observers hear of it

    @hookimpl(wrapper=True)
    def coalesce_export(self, volume, mapping):
        before = dict(volume.exported()) if _is(volume, self.dest_url) else None
        result = yield
        h = self.h
        if before is None or h is None:
            return result
        now = h.clock()
        state = h.agent.state  # committed before the switch (write-ahead): the exports it names
        for name, pcpi in mapping.items():
            r = state.replicas.get(name)
            if pcpi in (None, ACTIVE) or before.get(name) == pcpi or r is None or r.source_point is None:
                continue
            point = state.source_pcpis[r.source_point]
            self.lags.append(Lag(state.cycle, name, point.cycle, now - point.taken_at))
        self._count()
        return result


def config_text(backend: str, tmp: str, tag: str, names: list[str], straggler_after: float | None) -> tuple[str, str]:
    """The group's TOML and its destination URL: every replica's transfer at once (``parallel``), retries
    at once."""
    if backend == "mem":
        src, dst = f"mem://bench-strag-src-{tag}", f"mem://bench-strag-dst-{tag}"
    else:
        src, dst = f"{backend}://{tmp}/src", f"{backend}://{tmp}/dst"
    after = "" if straggler_after is None else f"straggler_after={straggler_after!r}\n"
    text = (
        f'[group]\nname="s"\nsource="{src}"\ndestination="{dst}"\nparallel={len(names)}\n'
        f'metadata="{tmp}/meta"\n{after}[group.retry]\ninitial=0\n'
        + "".join(f'[[replica]]\nname="{q}"\n' for q in names)
    )
    return text, dst


def one(backend: str, replicas: int, delay: float, cycles: int, straggler_after: float | None, seed: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="coalesce-bench-stragglers-")
    try:
        return _one(tmp, backend, replicas, delay, cycles, straggler_after, seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _one(
    tmp: str, backend: str, replicas: int, delay: float, cycles: int, straggler_after: float | None, seed: int
) -> dict:
    names = [*qtree_names(replicas), SLOW]
    tag = f"{os.getpid()}-{Path(tmp).name}"
    text, dst = config_text(backend, tmp, tag, names, straggler_after)
    slow, watch = SlowApply(dst, SLOW, delay), LagWatch(dst, SLOW)
    h = Harness(parse_config(text), plugins=[slow, watch], clock=time.time)
    watch.h = h
    try:
        rng = random.Random(seed)
        for q in names:
            h.writer.write(q, "f", rng.randbytes(64))
        h.cycle()  # the baselines, nothing slowed
        watch.lags.clear()
        first = h.agent.state.cycle + 1
        slow.armed = True
        walls = []
        for _ in range(cycles):
            for q in names:
                h.writer.write(q, "f", rng.randbytes(64))
            t0 = time.perf_counter()
            h.cycle()
            walls.append(time.perf_counter() - t0)
        last = h.agent.state.cycle
        slow.armed = False
        h.cycle()  # untimed, no change: a straggler of the last cycle rejoins at its jump-ahead
        bad = [f"{f.invariant}: {f.detail}" for f in h.findings() if not f.ok]
        # the K cycles' switches, and the straggler's rejoin in the extra one with an image of the K cycles
        lags = [x for x in watch.lags if first <= x.cycle and x.image_cycle <= last]
        healthy = [x for x in lags if x.replica != SLOW]
        return {
            "backend": backend,
            "after": straggler_after,
            "delay": delay,
            "cycles": cycles,
            "slow_updates": len(watch.slow_updates & set(range(first, last + 1))),
            "healthy": [x.seconds for x in healthy],
            "healthy_slow": [x.seconds for x in healthy if x.cycle in watch.slow_updates],
            "healthy_other": [x.seconds for x in healthy if x.cycle not in watch.slow_updates],
            "slow": [x.seconds for x in lags if x.replica == SLOW],
            "healthy_straggled": sum(1 for q in watch.straggled if q != SLOW),
            "slow_straggled": sum(1 for q in watch.straggled if q == SLOW),
            "wall": sum(walls),
            "peak_cycle": watch.peak_cycle,
            "peak_individual": watch.peak_individual,
            "peak_all": watch.peak_all,
            "violations": watch.violations + bad,
            "states": h.states(),
        }
    finally:
        close_harness(h)


def _s(xs: list[float], how) -> str:
    return f"{how(xs):.2f}" if xs else "-"


def _mm(xs: list[float]) -> str:
    return f"{_s(xs, statistics.median)} ({_s(xs, max)})"


def _after(after: float | None) -> str:
    return "unset" if after is None else f"{after:.2f}"


def table(rows: list[dict]) -> str:
    return md_table(
        "| backend | straggler_after (s) | D (s) | cycles (the straggler updates in) | healthy lag median (s) "
        "| healthy lag max (s) | in the cycles the straggler updates: median (max) (s) "
        "| in the others: median (max) (s) | healthy updates that straggled | straggler lag at its switch, median (max) (s) | straggler updates "
        "that left the cycle | cycle-role PCPIs at peak | individual PCPIs at peak | all group PCPIs at peak "
        "| I1 / I2 | cycles per hour |",
        (
            f"| {r['backend']} | {_after(r['after'])} | {r['delay']:g} "
            f"| {r['cycles']} ({r['slow_updates']}) | {_s(r['healthy'], statistics.median)} | {_s(r['healthy'], max)} "
            f"| {_mm(r['healthy_slow'])} | {_mm(r['healthy_other'])} "
            f"| {r['healthy_straggled']} | {_mm(r['slow'])} "
            f"| {r['slow_straggled']} | {r['peak_cycle']} | {r['peak_individual']} | {r['peak_all']} "
            f"| {'ok' if not r['violations'] else 'VIOLATED'} | {3600 * r['cycles'] / r['wall']:.0f} |"
            for r in rows
        ),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="R = 3, D = 0.4 s, 3 cycles, divisor 3 (a smoke test)")
    ap.add_argument("--backends", nargs="+", default=["sim", "mem"], choices=["sim", "mem"])
    ap.add_argument("--replicas", type=int, default=10, help="R, the healthy replicas (the straggler is one more)")
    ap.add_argument("--delay", type=float, default=3.0, help="D, seconds every apply to the straggler sleeps first")
    ap.add_argument("--cycles", type=int, default=8, help="K, update cycles after the baselines, back to back")
    ap.add_argument("--divisors", type=float, nargs="+", default=[10, 3], help="straggler_after = D / each")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = ap.parse_args(argv)
    if args.quick:
        args.replicas, args.delay, args.cycles, args.divisors = 3, 0.4, 3, [3]
    log = progress(args.verbose)
    load0, started = loads(), time.perf_counter()
    rows, problems = [], []
    for backend in args.backends:
        for after in [None, *(args.delay / d for d in args.divisors)]:
            log(f"{backend}: straggler_after {after}, D {args.delay} s, {args.cycles} cycles")
            r = one(backend, args.replicas, args.delay, args.cycles, after, args.seed)
            log(f"  {r['wall']:.1f} s; states at the end {sorted(set(r['states'].values()))}")
            rows.append(r)
            problems += [f"{backend} straggler_after {after}: {v}" for v in r["violations"]]
    print(
        provenance(
            utc_now(),
            host(),
            f"{args.replicas} healthy replicas and 1 straggler, changes on every qtree before each cycle",
            f"load average {load0} at the start, {loads()} at the end",
            f"ran {time.perf_counter() - started:.0f} s",
            f"command: {command('bench_stragglers', argv)}",
        )
    )
    print(table(rows))
    for p in problems:
        print(f"<!-- {p} -->")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
