"""Models of other sizes (`tools/gen_promela.py --replicas N --sources K`, `tools/spin.py
--replicas N --sources K`): the committed model (3 replicas of 2 sources) is the default, every
size generates, each replica reads from its own source, and a model of one source passes the
exhaustive safety search (tools/bench/bench_formal.py measures 2, 3 and 4 replicas)."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from ._tools import ROOT, tool

gen = tool("gen_promela")
spin = tool("spin")

needs_spin = pytest.mark.skipif(
    not (shutil.which("spin") and shutil.which("gcc")) and os.environ.get("COALESCE_REQUIRE_SPIN") != "1",
    reason="spin and gcc are not installed (apt-get install spin gcc)",
)


def test_default_size_is_the_committed_model():
    committed = (ROOT / "spec" / "coalescing.pml").read_text(encoding="utf-8")
    assert gen.generate(replicas=3, slots=9, keepers=1, breakers=1, sources=2) == committed


@pytest.mark.parametrize("n", [2, 4, 5])
def test_every_size_generates(n):
    text = gen.generate(replicas=n)
    assert f"#define N {n}\n" in text
    assert "@" not in text.replace("@edge", "")
    # every per-replica expansion covers exactly replicas 0 .. n-1
    assert f"rs[{n - 1}] == R_stable" in text and f"rs[{n}]" not in text
    assert len(re.findall(r"/\* --- replica \d+ \(source \d+\) --- \*/", text)) == n


def test_sizes_out_of_range_and_stale_check_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gen.generate(replicas=6)
    with pytest.raises(SystemExit):  # never over the committed model
        gen.main(["--replicas", "2"])
    with pytest.raises(SystemExit):
        gen.main(["--replicas", "2", "--check"])
    with pytest.raises(SystemExit):  # only a replica that may break can keep its writes
        gen.generate(keepers=2, breakers=1)
    for sources in (0, 3):  # every source has a replica
        with pytest.raises(SystemExit):
            gen.generate(replicas=2, sources=sources)
    with pytest.raises(SystemExit):
        gen.main(["--sources", "1"])
    assert gen.main(["--replicas", "2", "--out", str(tmp_path / "m2.pml")]) == 0
    assert (tmp_path / "m2.pml").read_text(encoding="utf-8") == gen.generate(replicas=2)


@pytest.mark.parametrize(("replicas", "sources"), [(2, 1), (3, 2), (4, 3)])
def test_each_replica_reads_from_its_own_source(replicas, sources):
    """Replica i belongs to source i % sources: its transfers start when that source's PCPI of the
    cycle is taken and bring that source's point; a source that refuses its PCPI (while faults may
    happen) makes only its replicas miss the cycle; I7 waits for each replica's own source."""
    text = gen.generate(replicas=replicas, sources=sources)
    assert f"#define NSRC {sources} " in text
    owners = re.findall(r"/\* --- replica (\d) \(source (\d)\) --- \*/", text)
    assert owners == [(str(i), str(i % sources)) for i in range(replicas)]
    for i in range(replicas):
        assert f"T_update_succeeded({i}); ap[{i}] = tgt[{i % sources}];" in text
        assert f"T_straggle({i}); lg[{i}] = ex[{i}]; rt[{i}] = tgt[{i % sources}];" in text
        assert f"sp[{i}] == newest[{i % sources}]" in text  # I7
    takes = re.findall(r"d_step \{ ph == A_updating && NOREL && stk\[(\d)\] (&& faults )?->", text)
    assert takes == [(str(k), f) for k in range(sources) for f in ("", "&& faults ")]
    assert text.count("SRC(i) != ") == sources  # a source's take starts only its own replicas


@needs_spin
def test_one_source_model_passes_safety():
    """Two replicas of ONE source (the CI's model has one replica of each of two sources)."""
    results = spin.run(gen.generate(replicas=2, sources=1), opt="-O0", only="safety", hash_bits=22)
    (r,) = [r for r in results if r["name"] != "total"]
    assert not r["problems"], f"{r['problems']}\n{r.get('trail', '')}"
    assert r["states"] > 10_000 and r["elapsed_s"] is not None


def test_only_the_replicas_that_may_break_do_and_only_the_keepers_keep_I11():
    text = gen.generate(replicas=3, breakers=2, keepers=1)
    resyncs = re.findall(r"d_step \{ ph == A_idle && QUIET && rs\[(\d)\] == R_broken && (.*?) ->", text)
    assert resyncs == [("0", "kp[0] == NONE"), ("1", "false"), ("2", "false")]
    breaks = re.findall(r"faults && (true|false) && \(rs\[(\d)\] == R_stable \|\|", text)
    assert breaks == [("true", "0"), ("true", "1"), ("false", "2")]


@needs_spin
@pytest.mark.parametrize("mutant", ["kept_released_by_the_cycle", "recovery_releases_the_kept_scratch"])
def test_a_kept_pcpi_lost_is_an_I11_violation(mutant):
    """The model's I11 assertions catch a kept PCPI released but by `coalesce release`."""
    results = spin.run(gen.generate(mutant=mutant, replicas=2, sources=2), opt="-O0", only="safety", hash_bits=22)
    (r,) = [r for r in results if r["name"] != "total"]
    assert any("assertion violated" in p for p in r["problems"]), r["problems"]
