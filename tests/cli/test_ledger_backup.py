"""Backing up the ledger (docs/operations.md, "Backing up the ledger"): SQLite's backup API (Python's
``Connection.backup``, the sqlite3 shell's ``.backup``) copies the live WAL ledger whole while an agent
commits; the newest copy restores; a copy from before later cycles names PCPIs they released and is
recovered from: recovery makes it match what the volumes hold and says what it did."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from groups import cli_group, run_cli, start_cli, status, wait_until

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.ledger import Ledger
from coalesce_core.testing.workload import SourceWriter

GROUP = "bk"


@pytest.fixture
def group(tmp_path: Path) -> Path:
    cfg, writer = cli_group(tmp_path, GROUP)
    writer.volume.close()
    return cfg


def ledger(cfg: Path) -> Path:
    return cfg.parent / "meta" / f"{GROUP}.sqlite"


def backup_api(live: Path, copy: Path) -> None:
    """What docs/operations.md shows in Python."""
    src = sqlite3.connect(f"file:{live}?mode=ro", uri=True)
    dst = sqlite3.connect(copy)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def backup_shell(live: Path, copy: Path) -> None:
    """What docs/operations.md shows for the shell: sqlite3 LEDGER ".backup 'COPY'"."""
    p = subprocess.run(["sqlite3", str(live), f".backup '{copy}'"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not p.stderr, p.stderr


BACKUPS = [
    backup_api,
    pytest.param(  # tools/test installs the sqlite3 shell
        backup_shell, marks=pytest.mark.skipif(shutil.which("sqlite3") is None, reason="apt-get install sqlite3")
    ),
]


def whole(copy: Path) -> tuple[int, dict]:
    """The copy passes SQLite's integrity check and coalesce loads it: (cycle, replica states)."""
    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    led = Ledger.open(copy, group=GROUP)
    try:
        state = led.load()
        return state.cycle, {n: r.state for n, r in state.replicas.items()}
    finally:
        led.close()


@pytest.mark.parametrize("backup", BACKUPS)
def test_a_backup_while_the_agent_commits_is_whole_and_the_last_one_equals_the_ledger(group, tmp_path, backup):
    assert ledger(group).exists()
    assert sqlite3.connect(ledger(group)).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with start_cli(group, "run", "--interval", "0.05", "--quiet") as runner:
        wait_until(runner, lambda: status(group)["cycle"] >= 2, "two cycles")
        deadline = time.monotonic() + 120
        seen: list[int] = []
        while len(seen) < 8 or seen[-1] < seen[0] + 2:  # copies while cycles commit, until two more ended
            assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()
            copy = tmp_path / f"copy{len(seen)}.sqlite"
            backup(ledger(group), copy)
            seen.append(whole(copy)[0])
            time.sleep(0.01)
        assert seen == sorted(seen) and seen[0] >= 2
        runner.send_signal(signal.SIGTERM)
        _out, err = runner.communicate(timeout=60)
    assert runner.returncode == 0, err
    last = tmp_path / "last.sqlite"
    backup(ledger(group), last)
    assert whole(last) == whole(ledger(group))


def test_a_plain_file_copy_of_the_live_ledger_misses_what_sits_in_the_wal(group, tmp_path):
    """Why docs/operations.md says never `cp`: committed cycles live in LEDGER-wal until a checkpoint."""
    reader = sqlite3.connect(f"file:{ledger(group)}?mode=ro", uri=True)  # another process using the ledger
    try:
        reader.execute("SELECT count(*) FROM cycles").fetchone()  # so the agent's close leaves the WAL
        assert run_cli(group, "run", "--once").returncode == 0
        cp, backed = tmp_path / "cp.sqlite", tmp_path / "backup.sqlite"
        shutil.copyfile(ledger(group), cp)
        backup_api(ledger(group), backed)
    finally:
        reader.close()
    assert whole(backed)[0] == 1  # the cycle that ran
    assert whole(cp)[0] == 0  # a cp has the ledger as init left it: the cycle is lost


def _change(cfg: Path) -> None:
    source = Volume.open(plugin_manager(), f"sim://{cfg.parent}/src")
    try:
        SourceWriter(source).write("A", f"f{time.monotonic_ns()}", b"changed")
    finally:
        source.close()


def _restore(copy: Path, live: Path) -> None:
    """docs/operations.md: with no agent running, the stale -wal and -shm go, then the copy goes in place."""
    for suffix in ("-wal", "-shm"):
        Path(f"{live}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(copy, live)


def test_the_newest_copy_restores_and_an_older_one_recovers_saying_what_it_did(group, tmp_path):
    """An older copy names PCPIs that later cycles released: recovery compares it with what the volumes
    hold, keeps exporting what readers see (each image proven equal to a source PCPI), says so, and
    takes no PCPI name a second time; it used to stop for ever with `PCPI ... does not exist`."""
    old, new = tmp_path / "old.sqlite", tmp_path / "new.sqlite"
    assert run_cli(group, "run", "--once").returncode == 0
    backup_api(ledger(group), old)
    _change(group)
    assert run_cli(group, "run", "--once").returncode == 0
    backup_api(ledger(group), new)
    dest = f"sim://{group.parent}/dst"

    def volume() -> tuple[list[str], dict]:
        v = Volume.open(plugin_manager(), dest)
        try:
            return sorted(v.snapshot_list()), v.exported()
        finally:
            v.close()

    _restore(new, ledger(group))
    assert run_cli(group, "run", "--once").returncode == 0
    assert run_cli(group, "check").returncode == 0
    held, exported = volume()
    _restore(old, ledger(group))
    st = status(group)
    assert st["cycle"] == 1  # the copy's
    p = run_cli(group, "run", "--once")
    assert p.returncode == 0, p.stderr
    assert "the ledger is older than its volumes" in p.stderr
    assert "replica 'A': exports " + exported["A"] in p.stderr and "stays stable" in p.stderr
    after, _ = volume()
    newest = max(int(n.split("-")[2]) for n in held)
    assert all(int(n.split("-")[2]) > newest for n in after)  # the next cycle's names are new ones
    check = run_cli(group, "check")
    assert check.returncode == 0, check.stdout
