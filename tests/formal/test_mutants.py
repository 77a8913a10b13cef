"""The checks can fail: every deliberate fault of tools/mutants.py is caught (docs/verification.md,
"Mutant kill matrix").  In CI each mutant of the core's decisions runs through the hypothesis
stateful checker (bounded: a fixed seed, 50 examples x 50 steps, no shrinking), plus the
unmutated baseline; each mutant that names its killing tests (``"pytest"``: the btrfs
translation, the check before ``done``) runs them, and the unmutated code passes them.
The full matrix (hypothesis x CrossHair x SPIN x pytest) is `python tools/mutants.py`
(run by `tools/check --long`; recorded in docs/verification.md)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from ._tools import tool

mutants = tool("mutants")

#: mutants killed by the tests they name, not by the mem model (a backend's translation, the check before `done`)
BY_TESTS = [n for n, m in mutants.MUTANTS.items() if m.get("pytest")]


@pytest.mark.parametrize("name", [None, *(n for n in mutants.MUTANTS if n not in BY_TESTS)])
def test_mutant_is_killed_by_the_stateful_checker(name):
    with tempfile.TemporaryDirectory(prefix="coalesce-mutant-") as tmp:
        copy = mutants.mutated_copy(name, Path(tmp))
        assert mutants._where(copy, mutants._env(copy)).startswith(str(copy))
        killed, detail = mutants.run_hypothesis(copy, examples=50, steps=50)
    if name is None:
        assert not killed, f"the unmutated core fails the stateful checker: {detail}"
    else:
        assert killed, f"mutant {name} ({mutants.MUTANTS[name]['doc']}) survives the stateful checker"


def _on_btrfs(argvs: list[list[str]]) -> bool:
    return any(a.startswith("tests/plugins/btrfs/") for argv in argvs for a in argv)


def _param(name: str):
    return pytest.param(name, marks=[pytest.mark.btrfs] if _on_btrfs(mutants.pytest_argvs(name, [])) else [], id=name)


#: the baseline once per killing test list (each list alone, so the mem/sim one runs without btrfs)
KILLER_LISTS = mutants.pytest_argvs(None, BY_TESTS)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(a, marks=[pytest.mark.btrfs] if _on_btrfs([a]) else [], id=f"{a[0].split('::')[0]}:{len(a)}")
        for a in KILLER_LISTS
    ],
)
def test_the_unmutated_code_passes_the_killing_tests(argv, request):
    if _on_btrfs([argv]):
        request.getfixturevalue("realfs")  # up in this session; the checker's session keeps it (KEEP=1)
    with tempfile.TemporaryDirectory(prefix="coalesce-mutant-") as tmp:
        copy = mutants.mutated_copy(None, Path(tmp))
        killed, detail = mutants.run_pytest(copy, [argv])
    assert killed is False, f"the unmutated code fails {argv}: {detail}"


@pytest.mark.parametrize("name", [_param(n) for n in BY_TESTS])
def test_mutant_is_killed_by_its_tests(name, request):
    argvs = mutants.pytest_argvs(name, [])
    if _on_btrfs(argvs):
        request.getfixturevalue("realfs")
    with tempfile.TemporaryDirectory(prefix="coalesce-mutant-") as tmp:
        copy = mutants.mutated_copy(name, Path(tmp))
        imported = mutants._imported(copy, mutants._env(copy))
        assert all(f.startswith(str(copy)) for f in imported), imported
        killed, detail = mutants.run_pytest(copy, argvs)
    assert killed, f"mutant {name} ({mutants.MUTANTS[name]['doc']}) survives {argvs}: {detail}"


def test_every_mutant_edit_still_applies():
    """The code changed under a mutant: its text no longer matches (exactly once)."""
    for name in mutants.MUTANTS:
        with tempfile.TemporaryDirectory() as tmp:
            mutants.mutated_copy(name, Path(tmp))
