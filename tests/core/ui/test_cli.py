"""The `coalesce` command line, run as a person would (subprocesses), and
SIGKILL at every named crash point followed by a restart (I6).

Volumes are mem:///PATH files, so separate processes share them as they
would share disks; the source data is written by the test itself, which
also keeps its own record of what each source qtree held (independent I3).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from groups import EXE, mem_group

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.crashpoints import CRASH_POINTS, FAN_IN_POINTS, STRAGGLER_POINTS
from coalesce_core.testing.workload import SourceWriter


def run(tmp: Path, *args: str, env: dict[str, str] | None = None, check: int | None = 0) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("COALESCE_CRASH_AT", None)
    e.update(env or {})
    p = subprocess.run(
        [*EXE, "--config", str(tmp / "coalesce.toml"), *args], capture_output=True, text=True, env=e, timeout=120
    )
    if check is not None:
        assert p.returncode == check, f"{args}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture
def group(tmp_path: Path):
    return tmp_path, mem_group(tmp_path)


def reopen(writer: SourceWriter) -> SourceWriter:
    """The CLI processes changed the source file; drop this process's cached copy of it."""
    import coalesce_mem

    url = str(writer.volume.url)
    coalesce_mem.forget(url)
    writer.volume = Volume.open(plugin_manager(), url)
    return writer


def status(tmp: Path) -> dict:
    return json.loads(run(tmp, "status", "--json").stdout)


def test_verbs_end_to_end(group):
    tmp, writer = group
    out = run(tmp, "init").stdout
    assert "initialised group home with 2 replicas" in out
    run(tmp, "init", check=5)  # a second init refuses (metadata exists)
    run(tmp, "run", "--once")
    st = status(tmp)
    assert {r["name"]: r["state"] for r in st["replicas"]} == {"A": "stable", "B": "stable"}
    assert len({r["exported_pcpi"] for r in st["replicas"]}) == 1
    assert [p["role"] for p in st["pcpis"]] == ["base"]
    assert all(set(r) >= {"name", "state", "exported_pcpi", "source_point", "export_path"} for r in st["replicas"])
    assert run(tmp, "check").returncode == 0
    checks = json.loads(run(tmp, "check", "--json").stdout)
    assert {c["invariant"] for c in checks} >= {"I1", "I2", "I3", "I4", "I5", "I9"} and all(c["ok"] for c in checks)
    reopen(writer).ensure_qtree("C")
    writer.write("C", "c", b"c")
    assert "added replica C" in run(tmp, "add", "C").stdout
    assert 'name = "C"' in (tmp / "coalesce.toml").read_text()
    run(tmp, "add", "C", check=2)
    run(tmp, "run", "--once", "-q")
    run(tmp, "break", "A")
    st = status(tmp)
    a = next(r for r in st["replicas"] if r["name"] == "A")
    assert a["state"] == "broken" and a["exports_active_fs"]
    run(tmp, "run", "--once", check=3)  # not every replica is stable: documented exit 3
    run(tmp, "resync", "A")
    run(tmp, "run", "--once")
    hist = json.loads(run(tmp, "history", "--json").stdout)
    assert [c["cycle"] for c in hist] == [1, 2, 3, 4]
    assert all(c["failures"] == 0 for c in hist), hist
    assert "cycles" in run(tmp, "history").stdout
    assert run(tmp, "check").returncode == 0


def test_user_errors_are_one_message_and_a_hint(group, tmp_path):
    tmp, _ = group
    p = run(tmp, "status", check=4)  # before init: the destination volume does not exist
    assert "does not exist" in p.stderr and "hint:" in p.stderr and "Traceback" not in p.stderr
    run(tmp, "init")
    p = run(tmp, "break", "nope", check=6)
    assert "no replica 'nope'" in p.stderr and "Traceback" not in p.stderr
    p = run(tmp, "resync", "A", check=6)
    assert "'resync' is not a transition" in p.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[group]\nname = 'x'\n")
    p = subprocess.run([*EXE, "--config", str(bad), "status"], capture_output=True, text=True)
    assert p.returncode == 2 and "missing `source`" in p.stderr
    bad.write_text("[group]\nname='x'\nsource='nope://a'\ndestination='nope://b'\nmetadata='/tmp'\n")
    p = subprocess.run([*EXE, "--config", str(bad), "init"], capture_output=True, text=True)
    assert p.returncode == 4 and "no installed backend serves 'nope'" in p.stderr


def test_damaged_metadata_is_a_clear_error_and_is_left_alone(group):
    tmp, _ = group
    run(tmp, "init")
    run(tmp, "run", "--once")
    ledger = next((tmp / "dst.vol.coalesce").glob("*.sqlite"))
    for extra in ledger.parent.glob("*.sqlite-*"):
        extra.unlink()
    data = ledger.read_bytes()
    damaged = data[:100] + b"\xff" * 64 + data[164:]
    ledger.write_bytes(damaged)
    p = run(tmp, "run", "--once", check=5)
    assert "damaged" in p.stderr and "backup" in p.stderr
    assert ledger.read_bytes() == damaged  # nothing was rewritten or deleted


def test_backends_lists_mem(group):
    tmp, _ = group
    infos = json.loads(run(tmp, "backends", "--json").stdout)
    assert "mem" in {i["scheme"] for i in infos}


def test_graph_and_crash_point_listing():
    p = subprocess.run([*EXE, "graph", "--format", "mermaid"], capture_output=True, text=True, check=True)
    assert p.stdout.startswith("stateDiagram-v2") and "done --> stable: jump_ahead (1032)" in p.stdout
    p = subprocess.run([*EXE, "debug", "crash-points", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(p.stdout) == CRASH_POINTS


FAULTS = "coalesce_diff:qtree=qb:record=3:times=1:volume=src.vol"


@pytest.mark.parametrize(
    "point",
    [
        p
        for p in CRASH_POINTS
        if p not in ("mid_baseline", "mid_retry", "mid_reseed", "after_kept_pcpi", "after_kept_release")
        and p not in FAN_IN_POINTS + STRAGGLER_POINTS  # tests/plugins/test_sigkill.py, on a group of several sources
    ],
)
def test_sigkill_at_every_crash_point_then_restart(group, point):
    """The real thing: the process SIGKILLs itself at the point; a new process recovers (I6)."""
    tmp, writer = group
    run(tmp, "init")
    run(tmp, "run", "--once")
    old = {q: writer.expected_fingerprint(q) for q in ("A", "qb")}
    reopen(writer).write("A", "dir0/file0", b"changed A" * 100)
    writer.write("qb", "new", b"changed B" * 100)
    new = {q: writer.expected_fingerprint(q) for q in ("A", "qb")}
    p = run(tmp, "run", "--once", env={"COALESCE_CRASH_AT": point, "COALESCE_FAULTS": FAULTS}, check=None)
    assert p.returncode == -9, f"{point} was not reached: rc={p.returncode}\n{p.stderr}"
    # whatever readers see now is a complete image: the old or the new one (I3)
    pm = plugin_manager()
    dst = Volume.open(pm, f"mem://{tmp}/dst.vol")
    for name, q in (("A", "A"), ("B", "qb")):
        snap = dst.exported().get(name)
        assert snap and dst.fingerprint(name, snap) in (old[q], new[q])
    run(tmp, "run", "--once")  # restart: recovery, then a full cycle
    run(tmp, "run", "--once")
    assert run(tmp, "check").returncode == 0
    st = status(tmp)
    assert {r["state"] for r in st["replicas"]} == {"stable"}
    assert [p["role"] for p in st["pcpis"]] == ["base"]
    dst = Volume.open(plugin_manager(), f"mem://{tmp}/dst.vol")
    assert len(dst.snapshot_list()) == 1
    for name, q in (("A", "A"), ("B", "qb")):
        assert dst.fingerprint(name, dst.exported()[name]) == new[q]


def test_a_failed_update_shows_and_run_once_exits_8(group):
    """A failed update is rolled back and the replica ends stable, but `run --once` exits 8
    (docs/cli.md) and says who failed; `--debug` prints the error; status keeps last_error until
    a later update of that replica succeeds."""
    tmp, writer = group
    run(tmp, "init")
    run(tmp, "run", "--once")
    reopen(writer).write("qb", "new", b"changed B" * 100)
    p = run(tmp, "--debug", "run", "--once", env={"COALESCE_FAULTS": FAULTS}, check=8)
    assert "update_failed B: update failed: InjectedFault" in p.stderr
    b = next(r for r in status(tmp)["replicas"] if r["name"] == "B")
    assert b["state"] == "stable" and b["consecutive_failures"] == 1
    assert b["last_error"].startswith("update failed: InjectedFault") and b["error"] == b["last_error"]
    assert b["lag_seconds"] is not None and b["lag_seconds"] >= 0 and b["source_point_time"]
    hist = json.loads(run(tmp, "history", "--json").stdout)
    assert list(hist[-1]["failed"]) == ["B"] and hist[-1]["failures"] == 1
    p = run(tmp, "run", "--once", check=0)
    b = next(r for r in status(tmp)["replicas"] if r["name"] == "B")
    assert (b["last_error"], b["consecutive_failures"]) == (None, 0) and b["last_success"]
    assert json.loads(run(tmp, "history", "--json").stdout)[-1]["failed"] == {}


def test_reseed_verb_and_a_sigkill_in_the_middle_of_the_reseed(group):
    """`coalesce reseed B`: B leaves the cycle still exporting its image; the next run re-seeds it;
    a SIGKILL mid-re-seed leaves readers on the old image, and the runs after it finish the
    re-seed (I6); `check` holds throughout."""
    tmp, writer = group
    run(tmp, "init")
    run(tmp, "run", "--once")
    old = writer.expected_fingerprint("qb")
    out = run(tmp, "reseed", "B", "--reason", "test").stdout
    assert "reseed_pending" in out
    b = next(r for r in status(tmp)["replicas"] if r["name"] == "B")
    assert (b["state"], b["reseed_reason"]) == ("reseed_pending", "test")
    assert run(tmp, "check").returncode == 0
    run(tmp, "reseed", "A", "--reason", "x")
    p = run(tmp, "run", "--once", env={"COALESCE_CRASH_AT": "mid_reseed:2"}, check=None)
    assert p.returncode == -9, p.stderr
    dst = Volume.open(plugin_manager(), f"mem://{tmp}/dst.vol")
    assert dst.fingerprint("B", dst.exported()["B"]) == old
    run(tmp, "run", "--once", check=3)  # recovery, the re-seeds run: they rejoin at the next jump-ahead
    run(tmp, "run", "--once")
    st = status(tmp)
    assert {r["state"] for r in st["replicas"]} == {"stable"} and [p["role"] for p in st["pcpis"]] == ["base"]
    assert run(tmp, "check").returncode == 0
    p = run(tmp, "reseed", "nope", check=6)
    assert "no replica 'nope'" in p.stderr and "hint:" in p.stderr
