"""The checks can fail (issue 3, part 4): every deliberate fault of tools/mutants.py is
caught.  In CI each mutant runs through the hypothesis stateful checker (bounded:
a fixed seed, 25 examples x 30 steps, no shrinking), plus the unmutated baseline.
The full matrix (hypothesis x CrossHair x SPIN) is `python tools/mutants.py`
(run by `tools/check --long`; recorded in docs/verification.md)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from ._tools import tool

mutants = tool("mutants")


@pytest.mark.parametrize("name", [None, *mutants.MUTANTS])
def test_mutant_is_killed_by_the_stateful_checker(name):
    with tempfile.TemporaryDirectory(prefix="coalesce-mutant-") as tmp:
        copy = mutants.mutated_copy(name, Path(tmp))
        assert mutants._where(copy, mutants._env(copy)).startswith(str(copy))
        killed, detail = mutants.run_hypothesis(copy, examples=25, steps=30)
    if name is None:
        assert not killed, f"the unmutated core fails the stateful checker: {detail}"
    else:
        assert killed, f"mutant {name} ({mutants.MUTANTS[name]['doc']}) survives the stateful checker"


def test_every_mutant_edit_still_applies():
    """The core changed under a mutant: its text no longer matches (exactly once)."""
    for name in mutants.MUTANTS:
        with tempfile.TemporaryDirectory() as tmp:
            mutants.mutated_copy(name, Path(tmp))
