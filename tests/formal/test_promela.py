"""SPIN: an exhaustive search of spec/coalescing.pml (I1 I2 I4 I5 I8 I11 asserts, deadlocks)
and the I7 LTL property under weak fairness.  Skipped when spin/gcc are missing
unless COALESCE_REQUIRE_SPIN=1 (CI sets it)."""

from __future__ import annotations

import os
import shutil

import pytest

from ._tools import ROOT, tool

spin = tool("spin")

pytestmark = pytest.mark.skipif(
    not (shutil.which("spin") and shutil.which("gcc")) and os.environ.get("COALESCE_REQUIRE_SPIN") != "1",
    reason="spin and gcc are not installed (apt-get install spin gcc)",
)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("search", ["safety", "liveness"])
def test_spin_exhaustive(search):
    """One search per test, so that the two (minutes each) run in parallel under pytest-xdist."""
    results = spin.run((ROOT / "spec" / "coalescing.pml").read_text(encoding="utf-8"), only=search)
    runs = [r for r in results if r["name"] != "total"]
    assert [r["name"] for r in runs] == [{"safety": "safety", "liveness": "liveness-i7"}[search]]
    for r in runs:
        assert not r["problems"], f"{r['name']}: {r['problems']}\n{r.get('trail', '')}"
        assert r["states"] > 100_000, r  # the model really was explored
    assert not list(ROOT.glob("pan*")) and not list((ROOT / "spec").glob("*.trail"))


def test_parse_detects_incomplete_searches():
    out = "error: max search depth too small\nWarning: Search not completed\nState-vector 96 byte, depth reached 9, errors: 0\n"
    problems = spin.parse(out)["problems"]
    assert "max search depth too small" in problems and "search not completed" in problems
    assert spin.parse("pan:1: assertion violated (x) (at depth 3)\nerrors: 1\nFull statespace search")["problems"]
