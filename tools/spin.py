#!/usr/bin/env python3
"""Run SPIN on spec/coalescing.pml: an exhaustive safety search and the I7 liveness search.

    spin -a coalescing.pml
    gcc -O1 -DSAFETY -DNOCLAIM  -> ./pan -m<depth> -w<hash>        (asserts I1 I2 I3 I4 I5 I8 I11, deadlocks)
    gcc -O1 -DNFAIR=3           -> ./pan -m<depth> -w<hash> -a -f   (ltl i7 under weak fairness)

Everything runs in a temporary directory (no pan* files in the repository).
No -DBITSTATE, -DHC or -DCOLLAPSE: the search is exhaustive and lossless.  The
run FAILS on any error, on "max search depth too small", on a search that
did not complete, or when pan's hash table overflowed its memory bound.

Usage: tools/spin.py [--model FILE | --mutant NAME] [--replicas N] [--sources K] [--retain GMAX]
                     [--opt -O0] [--hash BITS] [--memlim MIB] [--collapse] [--json] [--keep DIR]
Exit status 0 when both searches pass.  ``--replicas N`` / ``--sources K`` check a model of
that size generated on the fly (tools/gen_promela.py; the committed model has 3 replicas of 2
sources, the CI's has 2 of 2: docs/verification.md, "Which size runs where");
tools/bench/bench_formal.py measures how the search grows with N.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "spec" / "coalescing.pml"
DEPTH = 1_000_000
HASH = 26  # -w26: 2^26 slots (512 MiB table)
MEMLIM = 4096  # MiB (-DMEMLIM): fail rather than thrash

#: gcc -O1: pan.c of this model takes ~20 s to compile at -O2 and the search then saves ~1 s
OPT = "-O1"
RUNS: tuple[tuple[str, list[str], list[str]], ...] = (
    ("safety", ["-DSAFETY", "-DNOCLAIM", f"-DMEMLIM={MEMLIM}"], []),
    ("liveness-i7", ["-DNFAIR=3", f"-DMEMLIM={MEMLIM}"], ["-a", "-f"]),
)


def parse(out: str) -> dict:
    def num(pat: str) -> float | None:
        m = re.search(pat, out)
        return float(m.group(1)) if m else None

    errors = num(r"errors:\s*(\d+)")
    res: dict[str, Any] = {
        "errors": int(errors) if errors is not None else None,
        "states": int(num(r"([\d.e+]+) states, stored") or 0),
        "transitions": int(num(r"([\d.e+]+) transitions") or 0),
        "depth": int(num(r"depth reached (\d+)") or 0),
        "state_vector": int(num(r"State-vector (\d+) byte") or 0),
        "memory_mb": num(r"([\d.]+)\s+total actual memory usage"),
        "matched": int(num(r"([\d.e+]+) states, matched") or 0),
        "elapsed_s": num(r"pan: elapsed time ([\d.e+]+) seconds"),
        "problems": [],
    }
    if res["errors"] is None:
        res["problems"].append("pan printed no summary (crashed or killed)")
    elif res["errors"]:
        first = re.search(r"pan:\d+: (.*)", out)
        res["problems"].append(f"{res['errors']} error(s): {first.group(1) if first else '?'}")
    if "max search depth too small" in out:
        res["problems"].append("max search depth too small")
    if "Search not completed" in out:
        res["problems"].append("search not completed")
    if "out of memory" in out.lower() or "memory limit" in out.lower():
        res["problems"].append("pan ran out of memory")
    if "Full statespace search" not in out:
        res["problems"].append("not a full state-space search")
    return res


def trail(workdir: Path, model: str, defines: tuple[str, ...] = ()) -> str:
    """The counterexample as one line per step (the model prints STEP lines)."""
    p = subprocess.run(["spin", *(f"-D{d}" for d in defines), "-t", model], cwd=workdir, capture_output=True, text=True)
    steps = [ln.strip() for ln in p.stdout.splitlines() if ln.strip().startswith("STEP")]
    return "\n".join(steps[-25:])


def run(
    model_text: str,
    keep: Path | None = None,
    opt: str = OPT,
    only: str | None = None,
    *,
    extra_cflags: tuple[str, ...] = (),
    memlim: int = MEMLIM,
    hash_bits: int = HASH,
    timeout: float | None = None,
    defines: tuple[str, ...] = (),
) -> list[dict]:
    """Both searches (or ``only`` one); ``defines`` are the model's own switches, given to
    ``spin -D`` (``RETAIN``, ``GMAX=2``: retained generations, spec/invariants.md I1).  The keyword arguments are for tools/bench/bench_formal.py:
    ``extra_cflags`` such as -DCOLLAPSE, -DHC4 or -DBITSTATE make the search lossy or compressed
    (then "not a full state-space search" may be reported as a problem for bit-state runs)."""
    if not shutil.which("spin") or not shutil.which("gcc"):
        raise SystemExit("spin and gcc are needed (Debian/Ubuntu: apt-get install spin gcc)")
    results = []
    with tempfile.TemporaryDirectory(prefix="coalesce-spin-") as tmp:
        work = Path(tmp)
        (work / "coalescing.pml").write_text(model_text, encoding="utf-8")
        t0 = time.perf_counter()
        spin_d = [f"-D{d}" for d in defines]
        p = subprocess.run(["spin", *spin_d, "-a", "coalescing.pml"], cwd=work, capture_output=True, text=True)
        if p.returncode != 0 or not (work / "pan.c").exists():
            raise SystemExit(f"spin -a failed:\n{p.stdout}\n{p.stderr}")
        for name, cflags, flags in RUNS:
            if only and not name.startswith(only):
                continue
            cflags = [
                opt,
                *(c if not c.startswith("-DMEMLIM=") else f"-DMEMLIM={memlim}" for c in cflags),
                *extra_cflags,
            ]
            t1 = time.perf_counter()
            exe = f"pan_{name.split('-')[0]}"
            c = subprocess.run(["gcc", *cflags, "-w", "-o", exe, "pan.c"], cwd=work, capture_output=True, text=True)
            if c.returncode != 0:
                raise SystemExit(f"gcc failed:\n{c.stderr}")
            cmd = [f"./{exe}", f"-m{DEPTH}", f"-w{hash_bits}", *flags]
            try:
                r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout)
                out = r.stdout + r.stderr
            except subprocess.TimeoutExpired as exc:
                out = (
                    (exc.stdout or b"").decode(errors="replace")
                    if isinstance(exc.stdout, bytes)
                    else (exc.stdout or "")
                )
                out += f"\ntimeout: killed after {timeout} s\n"
            res = parse(out)
            if "timeout: killed" in out:
                res["problems"].append(f"killed after {timeout} s")
            res.update(
                name=name,
                seconds=round(time.perf_counter() - t1, 2),
                command=f"spin {' '.join([*spin_d, '-a'])} coalescing.pml && "
                f"gcc {' '.join(cflags)} -o pan pan.c && ./pan {' '.join(cmd[1:])}",
            )
            if res["problems"] and (work / "coalescing.pml.trail").exists():
                res["trail"] = trail(work, "coalescing.pml", defines)
                (work / "coalescing.pml.trail").unlink()
            results.append(res)
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            for f in work.iterdir():
                shutil.copy(f, keep / f.name)
        results.append({"name": "total", "seconds": round(time.perf_counter() - t0, 2)})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--mutant", help="check a deliberately broken model (tools/gen_promela.py --mutant)")
    ap.add_argument("--replicas", type=int, help="check a model of N replicas generated on the fly (2..5)")
    ap.add_argument("--sources", type=int, help="... of K sources (1..N; replica i reads from source i %% K)")
    ap.add_argument("--memlim", type=int, default=MEMLIM, help="pan's memory bound in MiB (default %(default)s)")
    ap.add_argument("--hash", type=int, default=HASH, help="pan -w: 2^BITS hash slots (default %(default)s)")
    ap.add_argument(
        "--collapse",
        action="store_true",
        help="-DCOLLAPSE: lossless state compression (still exhaustive; less memory, more time)",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--opt", default=OPT, help="gcc optimisation flag (default %(default)s)")
    ap.add_argument("--only", choices=["safety", "liveness"], help="run one of the two searches")
    ap.add_argument("--keep", type=Path, help="copy the work directory (pan.c, trail) here")
    ap.add_argument(
        "--retain",
        type=int,
        metavar="GMAX",
        help="check the model with retained generations (spin -DRETAIN -DGMAX=GMAX; spec/invariants.md I1)",
    )
    args = ap.parse_args(argv)
    if args.mutant or args.replicas or args.sources:
        if TYPE_CHECKING or __package__:  # imported as tools.spin (the type checker's name for it, too)
            from tools import gen_promela
        else:  # `python3 tools/spin.py`: tools/ is the first entry of sys.path
            import gen_promela
        text = gen_promela.generate(
            mutant=args.mutant,
            replicas=args.replicas or gen_promela.N_REPLICAS,
            sources=args.sources or min(gen_promela.N_SOURCES, args.replicas or gen_promela.N_REPLICAS),
        )
    else:
        text = args.model.read_text(encoding="utf-8")
    defines = ("RETAIN", f"GMAX={args.retain}") if args.retain else ()
    results = run(
        text,
        args.keep,
        args.opt,
        args.only,
        defines=defines,
        memlim=args.memlim,
        hash_bits=args.hash,
        extra_cflags=("-DCOLLAPSE",) if args.collapse else (),
    )
    ok = all(not r.get("problems") for r in results if r["name"] != "total")
    if args.json:
        print(json.dumps({"ok": ok, "runs": results}, indent=2))
    else:
        for r in results:
            if r["name"] == "total":
                print(f"total {r['seconds']}s")
                continue
            status = "PASS" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
            print(
                f"{r['name']:12} {r['states']:>10,} states  {r['transitions']:>10,} transitions  "
                f"depth {r['depth']:>7}  {r['memory_mb'] or 0:>8,.0f} MB  {r['seconds']:>6}s  {status}"
            )
            print(f"             {r['command']}")
            if r.get("trail"):
                print(r["trail"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
