"""SPIN: an exhaustive search of the CI's model, generated from spec/coalescing.toml like
spec/coalescing.pml with 2 replicas of 2 sources (I1 I2 I4 I5 I8 I11 asserts, deadlocks), and the
I7 LTL property under weak fairness; the safety search again with retained generations (`spin
-DRETAIN`, spec/invariants.md I1).  The committed 3-replica model takes minutes: `tools/check
--long` checks it (docs/verification.md, "Which size runs where").  Skipped when spin/gcc are
missing unless COALESCE_REQUIRE_SPIN=1 (CI sets it)."""

from __future__ import annotations

import os
import shutil

import pytest

from ._tools import ROOT, tool

spin = tool("spin")
gen = tool("gen_promela")

pytestmark = pytest.mark.skipif(
    not (shutil.which("spin") and shutil.which("gcc")) and os.environ.get("COALESCE_REQUIRE_SPIN") != "1",
    reason="spin and gcc are not installed (apt-get install spin gcc)",
)


#: the CI's model: one replica of each of two sources, so that one source fails (or refuses its
#: PCPI) while the other's replica updates, straggles, fails or jumps ahead, in every order
CI_SIZE = {"replicas": 2, "sources": 2}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("search", ["safety", "liveness"])
def test_spin_exhaustive(search):
    """One search per test, so that the two run in parallel under pytest-xdist; -O0: compiling
    pan.c costs more than the search it would speed up."""
    text = gen.generate(**CI_SIZE)
    assert "#define N 2\n" in text and "#define NSRC 2 " in text
    results = spin.run(text, opt="-O0", only=search, hash_bits=22)
    runs = [r for r in results if r["name"] != "total"]
    assert [r["name"] for r in runs] == [{"safety": "safety", "liveness": "liveness-i7"}[search]]
    for r in runs:
        assert not r["problems"], f"{r['name']}: {r['problems']}\n{r.get('trail', '')}"
        assert r["states"] > 100_000, r  # the model really was explored
    assert not list(ROOT.glob("pan*")) and not list((ROOT / "spec").glob("*.trail"))


@pytest.mark.timeout(900)
def test_spin_safety_with_retained_generations_I1():
    """The model compiled with RETAIN (GMAX = 1): the old base becomes a generation at each
    jump-ahead and the unpinned ones past GMAX are pruned; I1's generation bound, I3 on generations
    and the release step's I6 assertion hold in every reachable state.  Two replicas: the committed
    three-replica model under RETAIN takes minutes (docs/verification.md, run by hand with
    `tools/spin.py --only safety --retain 1`)."""
    results = spin.run(gen.generate(**CI_SIZE), opt="-O0", only="safety", hash_bits=22, defines=("RETAIN", "GMAX=1"))
    (r,) = [r for r in results if r["name"] != "total"]
    assert not r["problems"], f"{r['problems']}\n{r.get('trail', '')}"
    assert r["states"] > 100_000, r  # more than the 2-replica model without generations
    assert "spin -DRETAIN -DGMAX=1 -a" in r["command"]


@pytest.mark.parametrize("retain", [True, False])
def test_pruning_a_pinned_generation_is_caught_only_where_generations_exist(retain):
    """A model that prunes a generation an uncoalesced replica still exports or keeps fails an
    assertion under RETAIN; without RETAIN the same text has no generation and passes."""
    defines = ("RETAIN",) if retain else ()
    text = gen.generate(mutant="prune_pinned_generation", **CI_SIZE)
    results = spin.run(text, opt="-O0", only="safety", hash_bits=22, defines=defines)
    (r,) = [r for r in results if r["name"] != "total"]
    if retain:
        assert any("assertion violated" in p for p in r["problems"]), r["problems"]
    else:
        assert not r["problems"], r["problems"]


def test_parse_detects_incomplete_searches():
    out = "error: max search depth too small\nWarning: Search not completed\nState-vector 96 byte, depth reached 9, errors: 0\n"
    problems = spin.parse(out)["problems"]
    assert "max search depth too small" in problems and "search not completed" in problems
    assert spin.parse("pan:1: assertion violated (x) (at depth 3)\nerrors: 1\nFull statespace search")["problems"]
