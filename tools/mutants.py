#!/usr/bin/env python3
"""Deliberate faults in a COPY of the code, and which checker catches each one.

Each mutant is a list of exact text replacements (each must match exactly
once) in a file under coalesce_core/ or plugins/ (a path from the repository
root).  coalesce_core,
spec/ and plugins/ are copied to a temporary directory whose root and
``plugins/`` are put first on PYTHONPATH of the checker subprocesses (the
backends are imported as top-level packages, pyproject.toml's package-dir), so
the real files are never touched.  Checkers:

  hypothesis  tests/formal/test_stateful.py (mem), fixed derandomized seed, bounded examples
  crosshair   crosshair check --analysis_kind=PEP316 on the contracts
  spin        tools/spin.py on a model generated with the same fault (where it applies)
  pytest      the tests a mutant names as its killers (``"pytest"``: pytest argument lists, paths
              from the repository root); killed = one of them fails; the baseline runs every
              selected mutant's lists and must pass them (real-backend tests need root; the
              file systems of tools/realfs.py are kept up: COALESCE_REALFS_KEEP=1)

A mutant with ``"of"`` combines the edits of the named mutants (a double mutant).
Prints the kill matrix; exits non-zero if a mutant survives every checker
(or if the unmutated code fails a checker: the baseline row).

Usage: tools/mutants.py [--only NAME ...] [--checkers hypothesis,crosshair,spin,pytest] [--json] [--markdown]
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
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

#: the send scenarios (tests/send_scenarios.py) found by replicating real btrfs sources: paths unchanged or
#: reused while the objects behind them moved (docs/verification.md, "Named send scenarios")
SEND_SCENARIOS_M = [
    "m1-renamed-dir-new-dir-takes-name-child-moves-in",
    "m2-renamed-dir-new-dir-takes-name-file-moves-in",
    "m3-swapped-dirs-children-swapped-back",
    "m4-dir-to-other-qtree-new-dir-child-moves-back",
    "m5-renamed-dir-sibling-takes-name-file-moves-in",
    "m6-dirs-swapped-across-qtrees-children-swapped-back",
]

#: the agent under power cuts of its sim volumes, at every crash point (not the volume-level tests of that file)
SIM_POWER_CUTS = ["tests/plugins/sim/test_sim_power_cut.py", "-k", "power_cut_of or later_pass or at_rest"]

MUTANTS: dict[str, dict] = {
    "jump_ahead_during_update": {
        "doc": "jump-ahead allowed while a replica is in update",
        "edits": [
            (
                "coalesce_core/cycle/guards.py",
                "    flight = _in_flight()\n    return not any(s in flight for s in states)",
                '    flight = _in_flight() - {"update"}\n    return not any(s in flight for s in states)',
            ),
            (
                "coalesce_core/cycle/planner.py",
                "        if not guards.no_transfer_in_flight(state) or _pending_sources(p):\n            return",
                "        if not guards.nothing_in_flight(state) or _pending_sources(p):\n            return",
            ),
        ],
        "spin": "jump_ahead_during_update",
    },
    "rollback_pcpi_never_released": {
        "doc": "the rollback PCPI is never released",
        "edits": [
            (
                "coalesce_core/cycle/planner.py",
                '    if is_base or releasing:\n        return "keep"',
                '    if is_base or releasing or role == "rollback":\n        return "keep"',
            )
        ],
        "spin": "rollback_pcpi_never_released",
    },
    "rolled_back_to_stable": {
        "doc": "a rolled-back replica is sent to stable instead of done",
        "edits": [
            (
                "coalesce_core/cycle/planner.py",
                'r = p.fire(r, "rollback_succeeded", active_point=r.source_point)',
                'r = p.update(r, state="stable", active_point=r.source_point)',
            )
        ],
        "spin": "rolled_back_to_stable",
    },
    "recovery_skips_jump_ahead": {
        "doc": "recovery skips the unfinished jump-ahead",
        "edits": [
            (
                "coalesce_core/cycle/planner.py",
                (
                    '    if phase == "jump_ahead_1":\n        return "purge" if has_pcpi else "take_jump_ahead"\n'
                    '    if phase == "jump_ahead_2":\n'
                    '        return "roll_forward" if has_pcpi else "take_new_base"\n'
                ),
                "",
            )
        ],
        "spin": "recovery_skips_jump_ahead",
    },
    "export_replica_by_replica": {
        "doc": "the export switch is done replica by replica instead of at once",
        "edits": [
            (
                "coalesce_core/cycle/planner.py",
                '            reseed_reason="",\n        )\n    p.export(jump=True)',
                '            reseed_reason="",\n        )\n        p.export(jump=True)',
            )
        ],
        "spin": "export_replica_by_replica",
    },
    "clear_last_error_at_jump_ahead": {
        "doc": "the jump-ahead clears last_error (a failed update shows as a healthy stable replica)",
        "edits": [
            (
                "coalesce_core/cycle/planner.py",
                '            reseed_reason="",\n        )\n    p.export(jump=True)',
                '            reseed_reason="",\n            last_error="",\n        )\n    p.export(jump=True)',
            )
        ],
        "spin": None,
        "why_not_spin": "not modelled (error texts are below the model's abstraction)",
    },
    "skip_reseed_after_failures": {
        "doc": "a replica is not re-seeded after reseed_after failed updates in a row (it fails for ever)",
        "edits": [
            (
                "coalesce_core/cycle/planner.py",
                "    return reseed_after > 0 and failures >= reseed_after",
                "    return False",
            )
        ],
        "spin": None,
        "why_not_spin": "not modelled (the model re-seeds after any failed update, nondeterministically)",
    },
    "dotdot_not_checked": {
        "doc": "a stream path is not checked for '..' (records.check_path)",
        "edits": [
            ("coalesce_core/stream/records.py", '        if part in ("", ".", ".."):', '        if part in ("", "."):')
        ],
        "spin": None,
        "why_not_spin": "not modelled (stream paths are below the model's abstraction)",
    },
    "drop_inode_identity": {
        "doc": "the btrfs send-stream translation keeps a name whose path is unchanged, whatever its parent "
        "object (translate.py edges by path, not by inode identity)",
        "edits": [
            (
                "plugins/coalesce_btrfs/translate.py",
                "        return self.ident_base(_parent(path)), _name(path)",
                "        return _parent(path), _name(path)",
            ),
            (
                "plugins/coalesce_btrfs/translate.py",
                "        return self.ident_final(_parent(path)), _name(path)",
                "        return _parent(path), _name(path)",
            ),
        ],
        "spin": None,
        "why_not_spin": "not modelled (a backend's diff is below the model's abstraction)",
        "pytest": [[f"tests/plugins/btrfs/test_send_scenarios.py::test_scenario[{sc}]" for sc in SEND_SCENARIOS_M]],
    },
    "skip_update_verification": {
        "doc": "the check before `done` compares nothing (verifier.TransferCheck.run)",
        "edits": [
            (
                "coalesce_core/verifier.py",
                "    def run(self) -> V.Outcome:\n",
                "    def run(self) -> V.Outcome:\n        return V.Outcome(differences=(), checked=0)\n",
            )
        ],
        "spin": None,
        "why_not_spin": "not modelled (the model's transfers are atomic and correct)",
        "pytest": [["tests/core/test_verify_update.py"]],
    },
    "resync_without_fence": {
        "doc": "a resync takes the scratch PCPI while the broken replica still exports its writable active FS",
        "edits": [
            (
                "coalesce_core/cycle/planner.py",
                '    r = p.fire(r, "resync", retries=0, next_retry=0.0, exported=r.last_good, keep=keep)\n    p.export()\n',
                '    r = p.fire(r, "resync", retries=0, next_retry=0.0, keep=keep)\n',
            )
        ],
        "spin": None,
        "why_not_spin": "not modelled (the model has no writers of a broken replica)",
        "pytest": [["tests/core/test_scenarios.py", "-k", "after_the_resync_fence and mem"]],
    },
    "drop_the_group_lock": {
        "doc": "a second agent may open a group another one is running (grouplock.GroupLock.acquire locks nothing)",
        "edits": [
            (
                "coalesce_core/grouplock.py",
                "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n",
                "            pass\n",
            )
        ],
        "spin": None,
        "why_not_spin": "not modelled (the model has one agent)",
        "pytest": [["tests/core/test_grouplock.py"]],
    },
    "drop_the_durability_barrier": {
        "doc": "a POSIX apply returns before its writes are flushed (`done` recorded over data a power cut loses)",
        "edits": [
            (
                "plugins/coalesce_posix/volume.py",
                "        durable.syncfs(self.root)  # before the agent records `done` (hookspecs: coalesce_apply)\n",
                "",
            )
        ],
        "spin": None,
        "why_not_spin": "not modelled (the model's writes are durable when made)",
        "pytest": [["tests/plugins/posix/test_durable.py", "tests/plugins/btrfs/test_power_cut.py"]],
    },
    "drop_the_sim_durability_wait": {
        "doc": "a sim CP returns before its superblock is flushed (`done` recorded over a CP a power cut loses)",
        "edits": [
            (
                "plugins/coalesce_sim/fs.py",
                "        self.raid.write_stripe(cp % SB_STRIPES, [sb] * self.raid.ndata)\n        self.raid.sync()\n",
                "        self.raid.write_stripe(cp % SB_STRIPES, [sb] * self.raid.ndata)\n",
            )
        ],
        "spin": None,
        "why_not_spin": "not modelled (the model's writes are durable when made)",
        "pytest": [SIM_POWER_CUTS],
    },
    "drop_the_sim_apply_wait": {
        "doc": "a sim primitive returns without waiting for a CP of its changes (SimVolume._mutate)",
        "edits": [
            (
                "plugins/coalesce_sim/volume.py",
                "            self.wait_durable(need, failures)  # also when",
                "            pass  # also when",
            )
        ],
        "spin": None,
        "why_not_spin": "not modelled (the model's writes are durable when made)",
        "pytest": [SIM_POWER_CUTS],
    },
}
# a double mutant: the check before `done` would catch the wrong images of drop_inode_identity; without it
# the comparison of each exported image with its source (I3, tests/trees.py) must
MUTANTS["drop_inode_identity+skip_update_verification"] = {
    "doc": "both: wrong btrfs images and no check before `done`",
    "of": ["drop_inode_identity", "skip_update_verification"],
    "spin": None,
    "why_not_spin": "not modelled",
    "pytest": MUTANTS["drop_inode_identity"]["pytest"],
}

CHECKERS = ("hypothesis", "crosshair", "spin", "pytest")
CROSSHAIR_TARGETS = [
    "coalesce_core/cycle/planner.py",
    "coalesce_core/cycle/guards.py",
    "tests/formal/contracts_records.py",
]


def edits_of(name: str) -> list[tuple[str, str, str]]:
    """The replacements of mutant ``name`` (those of its parts, for a mutant made ``"of"`` others)."""
    m = MUTANTS[name]
    if "of" in m:
        return [e for part in m["of"] for e in edits_of(part)]
    return list(m["edits"])


def mutated_copy(name: str | None, dest: Path) -> Path:
    """Copy coalesce_core, spec/ and plugins/ to dest and apply mutant ``name``; return the copy's root."""
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "coalesce_core", dest / "coalesce_core", ignore=skip)
    shutil.copytree(ROOT / "spec", dest / "spec")
    shutil.copytree(ROOT / "plugins", dest / "plugins", ignore=skip)
    if name:
        for fname, old, new in edits_of(name):
            rel = fname
            if not rel.startswith(("coalesce_core/", "plugins/")):
                raise SystemExit(f"mutant {name}: {fname} is neither in coalesce_core/ nor in plugins/")
            f = dest / rel
            text = f.read_text(encoding="utf-8")
            n = text.count(old)
            if n != 1:
                raise SystemExit(
                    f"mutant {name}: the text to replace occurs {n} times in {rel} "
                    f"(the code changed; update tools/mutants.py): {old[:60]!r}"
                )
            f.write_text(text.replace(old, new), encoding="utf-8")
    return dest


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    # the copy before the editable install's finder (which sys.path entries precede)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(copy), str(copy / "plugins"), str(ROOT), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


#: what a checker imports: the core, a backend by its module and through its entry point
_WHERE = """
import importlib.metadata as md, coalesce_core, coalesce_btrfs.translate, coalesce_posix.walk
btrfs = [e for e in md.entry_points(group="coalesce.backends") if e.name == "btrfs"][0].load()
for m in (coalesce_core, coalesce_btrfs.translate, coalesce_posix.walk, btrfs):
    print(m.__file__)
"""


def _where(copy: Path, env: dict) -> str:
    """The file of coalesce_core as the checkers import it (see :func:`_imported`)."""
    return _imported(copy, env)[0]


def _imported(copy: Path, env: dict) -> list[str]:
    """The files of coalesce_core, coalesce_btrfs.translate, coalesce_posix.walk and of the btrfs
    backend's entry point as a checker subprocess imports them."""
    p = subprocess.run([PY, "-c", _WHERE], env=env, check=False, capture_output=True, text=True, cwd=copy)
    if p.returncode != 0:
        raise SystemExit(f"importing the copy failed: {p.stderr.strip()[-300:]}")
    return p.stdout.split()


def run_hypothesis(copy: Path, examples: int, steps: int) -> tuple[bool, str]:
    env = _env(copy)
    env.update(
        COALESCE_STATEFUL_EXAMPLES=str(examples),
        COALESCE_STATEFUL_STEPS=str(steps),
        HYPOTHESIS_PROFILE="ci",
        COALESCE_STATEFUL_SIM="0",
        COALESCE_STATEFUL_NOSHRINK="1",
    )
    cmd = [
        PY,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests/formal/test_stateful.py"),
        "-k",
        "mem",
        "--rootdir",
        str(ROOT),
        "-o",
        "addopts=",
        "--hypothesis-seed=0",
    ]
    p = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, cwd=copy, timeout=900)
    killed = p.returncode != 0
    detail = ""
    if killed:
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "AssertionError" in ln or ln.startswith("E ")]
        detail = (lines[0] if lines else p.stdout[-300:]).strip()[:160]
    return killed, detail


def run_crosshair(copy: Path, timeout: int) -> tuple[bool, str]:
    env = _env(copy)
    targets = [str(copy / t) if t.startswith("coalesce_core") else str(ROOT / t) for t in CROSSHAIR_TARGETS]
    cmd = [
        "crosshair",
        "check",
        "--analysis_kind=PEP316",
        f"--per_condition_timeout={timeout}",
        "--per_path_timeout=2",
        *targets,
    ]
    p = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, cwd=copy, timeout=600)
    out = (p.stdout + p.stderr).strip()
    killed = p.returncode != 0 and bool(out)
    return killed, (out.splitlines()[0][:160] if killed else "")


def run_spin(name: str | None) -> tuple[bool | None, str]:
    if name is not None and MUTANTS[name]["spin"] is None:
        return None, MUTANTS[name].get("why_not_spin", "not modelled (below the model's abstraction)")
    if not shutil.which("spin"):
        return None, "spin not installed"
    cmd = [PY, str(ROOT / "tools/spin.py"), "--json", "--opt=-O0"]
    if name is not None:
        cmd += ["--mutant", MUTANTS[name]["spin"]]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    data = json.loads(p.stdout)
    probs = [f"{r['name']}: {r['problems'][0]}" for r in data["runs"] if r.get("problems")]
    return (not data["ok"]), (probs[0][:160] if probs else "")


def _pytest_args(argv: list[str]) -> list[str]:
    """``argv`` with its test paths (``tests/...``, node ids included) made absolute."""
    return [str(ROOT / a) if a.startswith("tests/") else a for a in argv]


def run_pytest(copy: Path, argvs: list[list[str]], timeout: int = 900) -> tuple[bool | None, str]:
    """Run each pytest argument list against the copy; killed when a test of one of them fails.

    A run that ends otherwise than passed or failed (a target not found, a collection error)
    is no verdict: it stops the tool (SystemExit) with pytest's own words."""
    if not argvs:
        return None, "names no tests"
    env = _env(copy)
    env["COALESCE_REALFS_KEEP"] = "1"  # a checker run must never tear down the shared real file systems
    total = failed = errors = 0
    bads: list[str] = []
    for i, argv in enumerate(argvs):
        xml = copy / f"pytest-{i}.xml"
        cmd = [
            PY,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT),
            f"--junitxml={xml}",
            *_pytest_args(argv),
        ]
        p = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, cwd=copy, timeout=timeout)
        if p.returncode not in (0, 1) or not xml.exists():
            raise SystemExit(
                f"pytest checker {argv}: exit code {p.returncode}, no verdict:\n{(p.stdout + p.stderr)[-1500:]}"
            )
        for case in ET.parse(xml).getroot().iter("testcase"):
            total += 1
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
                errors += bad is not None
            else:
                failed += 1
            if bad is not None:
                msg = (bad.get("message") or bad.text or "").strip().splitlines()
                bads.append(f"{case.get('name')}: {msg[0][:300] if msg else ''}")
    if not failed and not errors:
        return False, f"{total} passed"
    return True, f"{failed} of {total} failed" + (f", {errors} errors" if errors else "") + ": " + " | ".join(bads)


def pytest_argvs(name: str | None, names: list[str | None]) -> list[list[str]]:
    """The pytest argument lists of mutant ``name``; for the baseline (None), those of every mutant in ``names``."""
    if name is not None:
        return [list(a) for a in MUTANTS[name].get("pytest", ())]
    out: list[list[str]] = []
    for n in names:
        for a in MUTANTS[n].get("pytest", ()) if n else ():
            if list(a) not in out:
                out.append(list(a))
    return out


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
    rows: list[dict[str, Any]] = []
    for name in names:
        row: dict[str, Any] = {
            "mutant": name or "(baseline: no mutation)",
            "doc": MUTANTS[name]["doc"] if name else "",
            "results": {},
        }
        with tempfile.TemporaryDirectory(prefix="coalesce-mutant-") as tmp:
            copy = mutated_copy(name, Path(tmp))
            stray = [f for f in _imported(copy, _env(copy)) if not f.startswith(str(copy))]
            if stray:
                raise SystemExit(f"the mutated copy is not the one imported ({stray}); is PYTHONPATH honoured?")
            for c in checkers:
                t0 = time.perf_counter()
                killed: bool | None
                if c == "hypothesis":
                    killed, detail = run_hypothesis(copy, args.examples, args.steps)
                elif c == "crosshair":
                    killed, detail = run_crosshair(copy, args.crosshair_timeout)
                elif c == "pytest":
                    killed, detail = run_pytest(copy, pytest_argvs(name, names))
                else:
                    killed, detail = run_spin(name)
                row["results"][c] = {"killed": killed, "detail": detail, "seconds": round(time.perf_counter() - t0, 1)}
                if not args.json:
                    mark = {True: "KILLED", False: "survived", None: "n/a"}[killed]
                    print(
                        f"  {row['mutant']:32} {c:10} {mark:8} {row['results'][c]['seconds']:6}s  {detail}", flush=True
                    )
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
            cells = [
                ("pass" if base and r["results"][c]["killed"] is False else mark[r["results"][c]["killed"]])
                for c in checkers
            ]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(out)
    w = max(len(r["mutant"]) for r in rows) + 2
    out = [f"{'mutant':{w}}" + "".join(f"{c:>12}" for c in checkers)]
    for r in rows:
        base = r["mutant"].startswith("(baseline")
        out.append(
            f"{r['mutant']:{w}}"
            + "".join(
                f"{('pass' if base and r['results'][c]['killed'] is False else mark[r['results'][c]['killed']]):>12}"
                for c in checkers
            )
        )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
