"""The source out of reach, as an operator meets it (docs/operations.md, "Recovery from each
failure"): the read verbs and `break` need only the destination, `coalesce run --once` ends its
cycle with exit 4, every replica still exporting its image; `check` writes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from backends import on_backend
from groups import fake_run_clock

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.ledger import Ledger
from coalesce_core.testing.workload import SourceWriter, fill

EXE = [sys.executable, "-m", "coalesce_core.ui.cli"]


@pytest.fixture(params=[on_backend("sim"), on_backend("btrfs")])
def group(request, tmp_path: Path):
    """A two-replica group after one cycle: (config path, source directory): sim volumes in
    tmp_path, or btrfs subvolumes of the real loop file system (tests/realfs.py)."""
    if request.param == "sim":
        src_url, dst_url = f"sim://{tmp_path / 'src'}", f"sim://{tmp_path / 'dst'}"
    else:
        urls = request.getfixturevalue("btrfs_urls")
        src_url, dst_url = urls("src"), urls("dst")
    src = Path(src_url.split("://", 1)[1])
    cfg = tmp_path / "coalesce.toml"
    cfg.write_text(
        f'[group]\nname = "out"\nsource = "{src_url}"\ndestination = "{dst_url}"\n'
        f'metadata = "{tmp_path}/meta"\n[[replica]]\nname = "A"\n[[replica]]\nname = "B"\n'
    )
    source = Volume.open(plugin_manager(), src_url, create=True)
    fill(SourceWriter(source), ["A", "B"])
    source.close()
    assert coalesce(cfg, "init").returncode == 0
    assert coalesce(cfg, "run", "--once", "-q").returncode == 0
    return cfg, src


def coalesce(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COALESCE_SIM_FSYNC": "0", "COLUMNS": "200"}  # status's note column whole
    return subprocess.run([*EXE, "--config", str(cfg), *args], capture_output=True, text=True, env=env, timeout=300)


def status(cfg: Path) -> dict:
    p = coalesce(cfg, "status", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def metadata_digest(cfg: Path) -> dict[str, str]:
    meta = cfg.parent / "meta"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(meta.iterdir()) if p.is_file()}


def test_the_read_verbs_and_break_work_with_the_source_gone_and_run_exits_4_I3(group):
    cfg, src = group
    before = status(cfg)
    gone = src.with_name(src.name + ".gone")
    src.rename(gone)  # the source volume is gone (unmounted, its host down)
    for verb in (["status"], ["status", "--json"], ["history"], ["check"], ["check", "--json"], ["graph"]):
        p = coalesce(cfg, *verb)
        assert p.returncode == 0, (verb, p.stdout, p.stderr)
    assert "coalesce verify" in coalesce(cfg, "check").stdout  # I3 without the source: contents left to verify
    run = coalesce(cfg, "run", "--once", "-q")
    assert run.returncode == 4, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-2].startswith("error: the source ") and "could not be reached or refused" in lines[-2]
    assert lines[-1].startswith("hint: the cycle ended without transfers")
    after = status(cfg)
    assert after["phase"] == "idle" and after["cycle"] == before["cycle"] + 1
    for was, now in zip(before["replicas"], after["replicas"]):
        assert (now["state"], now["exported_pcpi"], now["source_point"]) == (
            was["state"],
            was["exported_pcpi"],
            was["source_point"],
        )
        assert "source unavailable" in now["last_error"] and now["consecutive_failures"] == 1
    assert "source unavailable" in coalesce(cfg, "status").stdout
    brk = coalesce(cfg, "break", "A")
    assert brk.returncode == 0, brk.stderr
    assert coalesce(cfg, "resync", "A").returncode == 0
    assert coalesce(cfg, "run", "--once", "-q").returncode == 4  # still gone: still exit 4, nothing wedged
    gone.rename(src)  # the source is back
    assert coalesce(cfg, "run", "--once", "-q").returncode in (0, 3)  # A rejoins at this jump-ahead
    assert coalesce(cfg, "run", "--once", "-q").returncode == 0
    back = status(cfg)
    assert {r["state"] for r in back["replicas"]} == {"stable"}
    assert all(r["last_error"] is None and r["consecutive_failures"] == 0 for r in back["replicas"])
    p = coalesce(cfg, "check")
    assert p.returncode == 0, p.stdout + p.stderr


def test_check_writes_nothing_and_still_sees_an_export_move_back_I5(group):
    """`check` reads I5's high-water marks, which the agent keeps at the end of every cycle; it
    writes nothing (not even its own note).  A source point moved back in the ledger fails I5."""
    cfg, _src = group
    assert coalesce(cfg, "run", "--once", "-q").returncode == 0
    digest = metadata_digest(cfg)
    for _ in range(2):
        p = coalesce(cfg, "check", "--json")
        assert p.returncode == 0, p.stdout + p.stderr
    assert metadata_digest(cfg) == digest
    led = Ledger.open(cfg.parent / "meta" / "out.sqlite")
    try:
        marks = led.note("i5_marks")
        state = led.load()
        assert marks == {r.name: r.source_point for r in state.replicas.values()}
        older = "co-out-src-000000"
        assert older < marks["A"]
        a = state.replicas["A"]
        led.commit(state, state.with_replica(attrs.evolve(a, source_point=older)))  # a bug moved it back
    finally:
        led.close()
    p = coalesce(cfg, "check", "--json")
    assert p.returncode == 1
    (i5,) = [f for f in json.loads(p.stdout) if f["invariant"] == "I5"]
    assert not i5["ok"] and f"A: {marks['A']} -> {older}" in i5["detail"]


def test_run_goes_on_through_an_outage_and_says_why(group, capsys, monkeypatch):
    """`coalesce run` (no --once) with the source gone: every cycle prints the refusal's error and
    hint, and the run goes on (here until the interrupt of its third wait)."""
    from coalesce_core.ui import cli as cli_mod

    cfg, src = group
    gone = src.with_name(src.name + ".gone")
    src.rename(gone)
    monkeypatch.setenv("COALESCE_SIM_FSYNC", "0")
    sleeps = fake_run_clock(monkeypatch, 7, waits=3)
    capsys.readouterr()
    rc = cli_mod.main(["--config", str(cfg), "run", "--interval", "7"])
    err = capsys.readouterr().err
    assert rc == cli_mod.EXIT_INTERRUPTED and max(sleeps) == cli_mod.AGENT_POLL
    gone.rename(src)
    scheme = "sim" if "sim://" in cfg.read_text() else "btrfs"
    assert err.count(f"error: the source {scheme}://") == 3
    assert err.count("hint: the cycle ended without transfers") == 3
    assert "cycle failed" not in err  # nothing to recover from: the cycles ended normally
