#!/usr/bin/env python3
"""Deliberate faults in a COPY of the core, and which checker catches each one.

Each mutant is a list of exact text replacements in coalesce_core/*.py (each
must match exactly once).  The mutated package is written to a temporary
directory that is put first on PYTHONPATH of the checker subprocesses, so
the real files are never touched.  Checkers:

  hypothesis  tests/formal/test_stateful.py (mem), fixed derandomized seed, bounded examples
  crosshair   crosshair check --analysis_kind=PEP316 on the contracts
  spin        tools/spin.py on a model generated with the same fault (where it applies)

Prints the kill matrix; exits non-zero if a mutant survives every checker
(or if the unmutated core fails a checker: the baseline row).

Usage: tools/mutants.py [--only NAME ...] [--checkers hypothesis,crosshair,spin] [--json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

MUTANTS: dict[str, dict] = {
    "jump_ahead_during_update": {
        "doc": "jump-ahead allowed while a replica is in update",
        "edits": [
            ("guards.py", "    flight = _in_flight()\n    return not any(s in flight for s in states)",
             "    flight = _in_flight() - {\"update\"}\n    return not any(s in flight for s in states)"),
            ("planner.py", "        if not guards.no_transfer_in_flight(state):\n            return",
             "        if not guards.nothing_in_flight(state):\n            return"),
        ],
        "spin": "jump_ahead_during_update",
    },
    "rollback_pcpi_never_released": {
        "doc": "the rollback PCPI is never released",
        "edits": [("planner.py", "    if is_base or releasing:\n        return \"keep\"",
                   "    if is_base or releasing or role == \"rollback\":\n        return \"keep\"")],
        "spin": "rollback_pcpi_never_released",
    },
    "rolled_back_to_stable": {
        "doc": "a rolled-back replica is sent to stable instead of done",
        "edits": [("planner.py", 'p.fire(r, "rollback_succeeded", active_point=r.source_point, error="")',
                   'p.update(r, state="stable", active_point=r.source_point, error="")')],
        "spin": "rolled_back_to_stable",
    },
    "recovery_skips_jump_ahead": {
        "doc": "recovery skips the unfinished jump-ahead",
        "edits": [("planner.py",
                   "    if phase == \"jump_ahead_1\":\n        return \"purge\" if has_pcpi else \"take_jump_ahead\"\n"
                   "    if phase == \"jump_ahead_2\":\n        return \"roll_forward\" if has_pcpi else \"take_new_base\"\n",
                   "")],
        "spin": "recovery_skips_jump_ahead",
    },
    "export_replica_by_replica": {
        "doc": "the export switch is done replica by replica instead of at once",
        "edits": [("planner.py",
                   "               last_good=None, scratch=None, retries=0, next_retry=0.0, error=\"\", resume=False)\n    p.export(jump=True)",
                   "               last_good=None, scratch=None, retries=0, next_retry=0.0, error=\"\", resume=False)\n        p.export(jump=True)")],
        "spin": "export_replica_by_replica",
    },
    "dotdot_not_checked": {
        "doc": "a stream path is not checked for '..' (records.check_path)",
        "edits": [("records.py", '        if part in ("", ".", ".."):', '        if part in ("", "."):')],
        "spin": None,
    },
}

CHECKERS = ("hypothesis", "crosshair", "spin")
CROSSHAIR_TARGETS = ["coalesce_core/planner.py", "coalesce_core/guards.py", "tests/formal/contracts_records.py"]


def mutated_copy(name: str | None, dest: Path) -> Path:
    """Copy coalesce_core (and spec/) to dest and apply mutant ``name``; return the copy's root."""
    shutil.copytree(ROOT / "coalesce_core", dest / "coalesce_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "spec", dest / "spec")
    if name:
        for fname, old, new in MUTANTS[name]["edits"]:
            f = dest / "coalesce_core" / fname
            text = f.read_text(encoding="utf-8")
            n = text.count(old)
            if n != 1:
                raise SystemExit(f"mutant {name}: the text to replace occurs {n} times in {fname} "
                                 f"(the core changed; update tools/mutants.py): {old[:60]!r}")
            f.write_text(text.replace(old, new), encoding="utf-8")
    return dest


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _where(copy: Path, env: dict) -> str:
    p = subprocess.run([PY, "-c", "import coalesce_core; print(coalesce_core.__file__)"], env=env,
                       capture_output=True, text=True, cwd=copy)
    return p.stdout.strip()


def run_hypothesis(copy: Path, examples: int, steps: int) -> tuple[bool, str]:
    env = _env(copy)
    env.update(COALESCE_STATEFUL_EXAMPLES=str(examples), COALESCE_STATEFUL_STEPS=str(steps),
               HYPOTHESIS_PROFILE="ci", COALESCE_STATEFUL_SIM="0", COALESCE_STATEFUL_NOSHRINK="1")
    cmd = [PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           str(ROOT / "tests/formal/test_stateful.py"), "-k", "mem",
           "--rootdir", str(ROOT), "-o", "addopts=", "--hypothesis-seed=0", "-p", "no:hypothesispytest"] if False else [
        PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/formal/test_stateful.py"),
        "-k", "mem", "--rootdir", str(ROOT), "-o", "addopts=", "--hypothesis-seed=0"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=copy, timeout=900)
    killed = p.returncode != 0
    detail = ""
    if killed:
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "AssertionError" in ln or ln.startswith("E ")]
        detail = (lines[0] if lines else p.stdout[-300:]).strip()[:160]
    return killed, detail


def run_crosshair(copy: Path, timeout: int) -> tuple[bool, str]:
    env = _env(copy)
    targets = [str(copy / t) if t.startswith("coalesce_core") else str(ROOT / t) for t in CROSSHAIR_TARGETS]
    cmd = ["crosshair", "check", "--analysis_kind=PEP316", f"--per_condition_timeout={timeout}",
           "--per_path_timeout=2", *targets]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=copy, timeout=600)
    out = (p.stdout + p.stderr).strip()
    killed = p.returncode != 0 and bool(out)
    return killed, (out.splitlines()[0][:160] if killed else "")


def run_spin(name: str | None) -> tuple[bool | None, str]:
    if name is not None and MUTANTS[name]["spin"] is None:
        return None, "not modelled (stream paths are below the model's abstraction)"
    if not shutil.which("spin"):
        return None, "spin not installed"
    cmd = [PY, str(ROOT / "tools/spin.py"), "--json", "--opt=-O0"]
    if name is not None:
        cmd += ["--mutant", MUTANTS[name]["spin"]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    data = json.loads(p.stdout)
    probs = [f"{r['name']}: {r['problems'][0]}" for r in data["runs"] if r.get("problems")]
    return (not data["ok"]), (probs[0][:160] if probs else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(MUTANTS))
    ap.add_argument("--checkers", default=",".join(CHECKERS))
    ap.add_argument("--examples", type=int, default=25, help="hypothesis examples per mutant")
    ap.add_argument("--steps", type=int, default=30, help="hypothesis steps per example")
    ap.add_argument("--crosshair-timeout", type=int, default=4, help="seconds per condition")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated row")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="print the matrix as a Markdown table")
    args = ap.parse_args(argv)
    checkers = [c for c in args.checkers.split(",") if c]
    names: list[str | None] = ([] if args.no_baseline else [None]) + list(args.only or MUTANTS)
    rows = []
    for name in names:
        row = {"mutant": name or "(baseline: no mutation)", "doc": MUTANTS[name]["doc"] if name else "", "results": {}}
        with tempfile.TemporaryDirectory(prefix="coalesce-mutant-") as tmp:
            copy = mutated_copy(name, Path(tmp))
            where = _where(copy, _env(copy))
            if not where.startswith(str(copy)):
                raise SystemExit(f"the mutated copy is not the one imported ({where}); is PYTHONPATH honoured?")
            for c in checkers:
                t0 = time.perf_counter()
                if c == "hypothesis":
                    killed, detail = run_hypothesis(copy, args.examples, args.steps)
                elif c == "crosshair":
                    killed, detail = run_crosshair(copy, args.crosshair_timeout)
                else:
                    killed, detail = run_spin(name)
                row["results"][c] = {"killed": killed, "detail": detail, "seconds": round(time.perf_counter() - t0, 1)}
                if not args.json:
                    mark = {True: "KILLED", False: "survived", None: "n/a"}[killed]
                    print(f"  {row['mutant']:32} {c:10} {mark:8} {row['results'][c]['seconds']:6}s  {detail}",
                          flush=True)
        rows.append(row)
    bad = []
    for row in rows:
        res = row["results"]
        if row["mutant"].startswith("(baseline"):
            if any(v["killed"] for v in res.values()):
                bad.append("the unmutated core fails a checker")
        elif not any(v["killed"] for v in res.values()):
            bad.append(f"mutant {row['mutant']} survives every checker")
    if args.json:
        print(json.dumps({"ok": not bad, "problems": bad, "rows": rows}, indent=2))
    else:
        print()
        print(matrix(rows, checkers, markdown=args.markdown))
        for b in bad:
            print("FAIL:", b)
        if not bad:
            print("every mutant is killed by at least one checker; the baseline passes them all")
    return 1 if bad else 0


def matrix(rows: list[dict], checkers: list[str], markdown: bool = False) -> str:
    mark = {True: "killed", False: "-", None: "n/a"}
    if markdown:
        out = ["| mutant | " + " | ".join(checkers) + " |", "|---|" + "---|" * len(checkers)]
        for r in rows:
            label = f"`{r['mutant']}`" + (f" ({r['doc']})" if r["doc"] else "")
            base = r["mutant"].startswith("(baseline")
            cells = [("pass" if base and not r["results"][c]["killed"] else mark[r["results"][c]["killed"]])
                     for c in checkers]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(out)
    w = max(len(r["mutant"]) for r in rows) + 2
    out = [f"{'mutant':{w}}" + "".join(f"{c:>12}" for c in checkers)]
    for r in rows:
        base = r["mutant"].startswith("(baseline")
        out.append(f"{r['mutant']:{w}}" + "".join(
            f"{('pass' if base and not r['results'][c]['killed'] else mark[r['results'][c]['killed']]):>12}"
            for c in checkers))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
