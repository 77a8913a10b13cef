"""Recovery after a real SIGKILL at each named crash point: time from restart to a consistent group.

    python3 -m tools.bench.bench_recovery [--backend sim mem] [--replicas 10 1000] [--points NAME ...]

from the repository root (the benchmarks are modules of the package ``tools.bench``; docs/benchmarks.md).

For each backend and N, one group is set up once in a subprocess (N replicas,
baseline done, then changes in a tenth of the replicas, one of whose transfers
the crashing cycle will cut at its 3rd record so the cycle rolls back) and
copied to the same path before each point.  Then, per crash point:

1. ``coalesce run --once`` runs in a subprocess with ``COALESCE_CRASH_AT=<point>``
   (and ``COALESCE_FAULTS`` for the cut transfer); it must die by SIGKILL
   (exit status -9), else the point is reported as not reached;
2. a fresh process times ``Agent.open(..., recover=False)`` and ``recover()``
   (wall and process CPU, all threads), counting what recovery did (ledger
   commits, PCPIs taken and released, export switches, replica transitions),
   then checks the group (I1-I5, I8, I9 read from the volumes by
   ``invariants.live_check``; agent idle, nothing in flight);
3. the same process runs cycles (``run_once``, at most 4) until every replica
   is stable at one source point with one PCPI at rest on each volume, timed,
   and checks the invariants again.

Two points need another setup: ``mid_baseline`` (one more replica, not yet
baselined, joins in the crashing cycle) and ``mid_retry`` (a replica whose
transfer and rollback failed is due for a retry, which ``run --once`` runs
first).  Volumes: ``sim:///DIR`` (fsync on) and ``mem:///FILE`` (the mem
backend written to a file after every mutating primitive: the only mem form
that survives SIGKILL).  Prints a markdown table; figures go to
docs/benchmarks.md by hand.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from coalesce_core.backend.hookspecs import hookimpl  # noqa: E402
from coalesce_core.crashpoints import CRASH_POINTS, FAN_IN_POINTS, STRAGGLER_POINTS  # noqa: E402
from tools.bench.common import ROOT, command, cpu, host, loads, provenance, qtree_names, utc_now  # noqa: E402

SCENARIO = {"mid_baseline": "baseline", "mid_retry": "retry"}
QUICK_POINTS = ["after_commit", "after_rollback_pcpi", "mid_apply", "mid_release", "mid_retry"]
GENERIC_SIM = {"COALESCE_SIM_NATIVE_ROLLBACK": "0"}
CUT = "q0001"  # the replica whose transfer the crashing cycle cuts (rollback)


def urls(backend: str, d: Path) -> tuple[str, str]:
    if backend == "mem":
        return f"mem://{d}/src.vol", f"mem://{d}/dst.vol"
    return f"{backend}://{d}/src", f"{backend}://{d}/dst"


def config_text(backend: str, d: Path, replicas: list[str]) -> str:
    src, dst = urls(backend, d)
    return (
        f'[group]\nname = "b"\nsource = "{src}"\ndestination = "{dst}"\nparallel = 8\n'
        "[group.retry]\ninitial = 0\n" + "".join(f'[[replica]]\nname = "{q}"\n' for q in replicas)
    )


# -- children --------------------------------------------------------------------
def child_setup(backend: str, d: Path, n: int, scenario: str) -> dict:
    """Build the group in ``d`` (this process then exits: nothing of it survives but the files)."""
    import random

    from coalesce_core.backend.faults import Rule
    from coalesce_core.config import parse_config
    from coalesce_core.testing.harness import Harness

    rng = random.Random(n)
    qs = qtree_names(n)
    cfg_path = d / "coalesce.toml"
    text = config_text(backend, d, qs)
    cfg_path.write_text(text, encoding="utf-8")
    t0 = time.perf_counter()
    h = Harness(parse_config(text, str(cfg_path)))
    if backend == "mem":
        # mem:///FILE rewrites the whole file after every primitive (O(N) each, O(N^2) for
        # this setup at N=1000: ~5 min); the setup is not measured, so write the files once
        # at the end.  The crashing run and the recovery persist as usual.
        from coalesce_mem.volume import MemVolume

        persist = MemVolume.persist
        MemVolume.persist = lambda self: None  # type: ignore[method-assign]
    for q in qs:
        h.writer.write(q, "f0", rng.randbytes(2048))
        h.writer.write(q, "d/f1", rng.randbytes(512))
    h.cycle()  # baseline
    for q in qs[: max(2, n // 10)]:  # a tenth of the replicas change
        h.writer.write(q, "f0", rng.randbytes(2048))
        h.writer.write(q, f"new-{q}", rng.randbytes(300))
    for k in range(3):  # the replica whose transfer is cut has a few more records
        h.writer.write(CUT, f"more{k}", rng.randbytes(300))
    if scenario == "retry":
        h.faults.add(Rule(hook="coalesce_diff", qtree=CUT, record=1, times=1, volume="src"))
        h.faults.add(Rule(hook="coalesce_rollback", qtree=CUT, times=1))
        h.cycle()
        assert h.states()[CUT] == "unstable_uncoalesced", h.states()[CUT]
    elif scenario == "baseline":
        for k in range(4):
            h.writer.write("qnew", f"f{k}", rng.randbytes(1024))
        cfg_path.write_text(text + '[[replica]]\nname = "qnew"\n', encoding="utf-8")
    if backend == "mem":
        MemVolume.persist = persist  # type: ignore[method-assign]
        h.agent.source.handle.persist()
        h.agent.dest.handle.persist()
    h.assert_invariants()
    h.agent.close()
    return {"setup_s": time.perf_counter() - t0}


class Counter:
    """Observer plugin: what recovery did."""

    def __init__(self) -> None:
        self.taken = self.released = self.exports = self.transitions = 0

    @hookimpl
    def coalesce_pcpi_taken(self, group, volume, name, role):
        self.taken += 1

    @hookimpl
    def coalesce_pcpi_released(self, group, volume, name):
        self.released += 1

    @hookimpl
    def coalesce_state_changed(self, group, replica, trigger, source, dest):
        self.transitions += 1

    @hookimpl(wrapper=True)
    def coalesce_export(self, volume, mapping):
        result = yield
        self.exports += 1
        return result

    def snap(self) -> tuple[int, int, int, int]:
        return (self.taken, self.released, self.exports, self.transitions)


def child_recover(cfg_path: Path) -> dict:
    """A fresh process: open + recover (timed), check, then cycles until the group is at rest."""
    from coalesce_core.agent import Agent
    from coalesce_core.config import load_config
    from coalesce_core.cycle.invariants import live_check
    from coalesce_core.cycle.planner import is_group_pcpi
    from coalesce_core.cycle.spec import load_spec
    from coalesce_core.ledger import iter_log_edges
    from coalesce_core.stream import privileges

    imports_s = time.perf_counter() - _T_START
    in_flight = load_spec().in_flight_states
    cfg = load_config(cfg_path)
    counter = Counter()
    t0, c0 = time.perf_counter(), cpu()
    agent = Agent.open(cfg, plugins=[counter], recover=False)
    t1 = time.perf_counter()
    commits0, acts0 = agent.ledger.commits, counter.snap()
    agent.recover()
    t2, c2 = time.perf_counter(), cpu()
    acts = [b - a for a, b in zip(acts0, counter.snap())]
    commits = agent.ledger.commits - commits0

    def check() -> list[str]:
        s = agent.state
        bad = [
            f"{f.invariant}: {f.detail}"
            for f in live_check(
                s,
                privileges.view(agent.source, agent.config.privileges),
                agent.dest,
                None,
                edges=list(iter_log_edges(agent.ledger.transitions())),
            )
            if not f.ok
        ]
        if s.phase != "idle":
            bad.append(f"phase {s.phase}")
        flying = sorted(r.name for r in s.replicas.values() if r.state in in_flight)
        if flying:
            bad.append(f"in flight: {flying[:3]}")
        return bad

    states: dict[str, int] = {}
    for r in agent.state.replicas.values():
        states[r.state] = states.get(r.state, 0) + 1
    bad_after_recover = check()
    t3, c3 = time.perf_counter(), cpu()
    cycles = 0
    for _ in range(4):
        at_rest = (
            all(r.state == "stable" for r in agent.state.replicas.values())
            and len({r.source_point for r in agent.state.replicas.values()}) == 1
        )
        if at_rest:
            break
        agent.run_once()
        cycles += 1
    t4, c4 = time.perf_counter(), cpu()
    bad_at_rest = check()
    if not all(r.state == "stable" for r in agent.state.replicas.values()):
        bad_at_rest.append("not all stable after 4 cycles")
    held_d = [x for x in agent.dest.snapshot_list() if is_group_pcpi(cfg.name, x)]
    held_s = [x for x in agent.source.snapshot_list() if x.startswith(f"co-{cfg.name}-src")]
    if len(held_d) != 1 or len(held_s) != 1:
        bad_at_rest.append(f"PCPIs at rest: {len(held_d)} destination, {len(held_s)} source")
    not_exported = [r.name for r in agent.state.replicas.values() if not r.exported]
    if not_exported:
        bad_at_rest.append(f"not exported: {not_exported[:3]}")
    agent.close()
    return {
        "imports_s": imports_s,
        "open_s": t1 - t0,
        "recover_s": t2 - t1,
        "recovery_s": t2 - t0,
        "recovery_cpu": c2 - c0,
        "commits": commits,
        "taken": acts[0],
        "released": acts[1],
        "exports": acts[2],
        "transitions": acts[3],
        "states": states,
        "bad_after_recover": bad_after_recover,
        "settle_cycles": cycles,
        "settle_s": t4 - t3,
        "settle_cpu": c4 - c3,
        "bad_at_rest": bad_at_rest,
    }


# -- the driver ------------------------------------------------------------------------
def _child(*args: str, env: dict | None = None, timeout: int = 3600) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("COALESCE_CRASH_AT", "COALESCE_FAULTS")}
    e.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, cwd=ROOT, timeout=timeout)


def _json_child(*args: str, env: dict | None = None) -> dict:
    p = _child("-m", "tools.bench.bench_recovery", *args, env=env)  # this module, in a fresh process
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def copy_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)


def one_point(backend: str, n: int, point: str, work: Path, template: Path, extra_env: dict | None = None) -> dict:
    copy_tree(template, work)
    cfg = work / "coalesce.toml"
    env = {"COALESCE_CRASH_AT": point, **(extra_env or {})}
    if SCENARIO.get(point) is None:
        env["COALESCE_FAULTS"] = f"coalesce_diff:qtree={CUT}:record=3:times=1:volume={work}/src"
    t0 = time.perf_counter()
    p = _child("-m", "coalesce_core.ui.cli", "--config", str(cfg), "run", "--once", "--quiet", env=env)
    row = {"backend": backend, "n": n, "point": point, "rc": p.returncode, "crash_run_s": time.perf_counter() - t0}
    if p.returncode != -9:
        row["not_reached"] = True
        return row
    t0 = time.perf_counter()
    row.update(_json_child("_recover", str(cfg), env=extra_env))
    row["restart_process_s"] = time.perf_counter() - t0
    return row


def fmt(r: dict) -> str:
    head = f"| {r['backend']} | {r['n']} | {r['point']} |"
    if r.get("not_reached"):
        what = "the run ended without passing it" if r["rc"] in (0, 3) else "run failed"
        return head + f" not reached (exit {r['rc']}: {what}) | | | | | | | | |"
    acts = (
        f"{r['commits']} commits, {r['taken']} taken, {r['released']} released, "
        f"{r['exports']} export, {r['transitions']} transitions"
    )
    ok = "yes" if not r["bad_after_recover"] else "NO: " + "; ".join(r["bad_after_recover"])[:120]
    rest = "yes" if not r["bad_at_rest"] else "NO: " + "; ".join(r["bad_at_rest"])[:120]
    return (
        head + f" -9 | {r['open_s']:.3f} | {r['recover_s']:.3f} | {r['recovery_s']:.3f} | {r['recovery_cpu']:.3f} "
        f"| {acts} | {ok} | {r['settle_cycles']} / {r['settle_s']:.2f} | {rest} |"
    )


def header(argv: list[str]) -> str:
    return (
        provenance(utc_now(), host(node=True), f"load average {loads()}", f"command: {command('bench_recovery', argv)}")
        + "\n"
        "| backend | N | crash point | exit | open (s) | recover (s) | recovery wall (s) | CPU (s) "
        "| what recovery did | consistent after recover | cycles / wall (s) to rest | at rest, consistent |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_setup"]:
        print(json.dumps(child_setup(argv[1], Path(argv[2]), int(argv[3]), argv[4])))
        return 0
    if argv[:1] == ["_recover"]:
        print(json.dumps(child_recover(Path(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", nargs="+", default=["sim", "mem"], choices=["sim", "mem"])
    ap.add_argument("--replicas", type=int, nargs="+", default=[10, 1000])
    # the scenario is a cycle of one source without stragglers: the points it passes
    ours = [p for p in CRASH_POINTS if p not in FAN_IN_POINTS + STRAGGLER_POINTS]
    ap.add_argument("--points", nargs="+", choices=ours, default=ours)
    ap.add_argument("--json", type=Path, help="also write every row as JSON lines here")
    ap.add_argument("--quick", action="store_true", help=f"mem, N=3, points {', '.join(QUICK_POINTS)}")
    args = ap.parse_args(argv)
    if args.quick:
        args.backend, args.replicas, args.points = ["mem"], [3], QUICK_POINTS
    t_all = time.perf_counter()
    print(header(argv), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="coalesce-bench-recovery-") as tmp:
        for backend in args.backend:
            for n in args.replicas:
                templates: dict[str, Path] = {}
                for point in args.points:
                    scenario = SCENARIO.get(point, "cycle")
                    work = Path(tmp) / "work"
                    if scenario not in templates:
                        if work.exists():
                            shutil.rmtree(work)
                        work.mkdir()
                        setup = _json_child("_setup", backend, str(work), str(n), scenario)
                        print(
                            f"<!-- setup {backend} N={n} {scenario}: {setup['setup_s']:.1f} s -->",
                            file=sys.stderr,
                            flush=True,
                        )
                        templates[scenario] = Path(tmp) / f"template-{scenario}"
                        copy_tree(work, templates[scenario])
                    got = [one_point(backend, n, point, work, templates[scenario])]
                    if got[0].get("not_reached") and backend == "sim" and point in ("mid_rollback", "mid_retry"):
                        # sim's native rollback re-points inode records: no record stream to crash in.
                        # The generic rollback (diff + apply) is what other backends without one run.
                        got.append(one_point(backend, n, point, work, templates[scenario], GENERIC_SIM))
                        got[-1]["point"] += " (generic rollback)"
                    for r in got:
                        rows.append(r)
                        print(fmt(r), flush=True)
                        if args.json:
                            with args.json.open("a", encoding="utf-8") as f:
                                f.write(json.dumps(r) + "\n")
                for t in templates.values():
                    shutil.rmtree(t, ignore_errors=True)
    bad = [r for r in rows if not r.get("not_reached") and (r["bad_after_recover"] or r["bad_at_rest"])]
    print(
        f"\n<!-- {len(rows)} points, {sum(1 for r in rows if r.get('not_reached'))} not reached, "
        f"{len(bad)} inconsistent; ran {time.perf_counter() - t_all:.0f} s -->"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
