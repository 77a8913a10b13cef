"""Logs (docs/operations.md, "Logs"), through the real command line in a subprocess on a sim group:
`--log-file` gets timestamped lines with level and group and survives rotation, `--log-level` filters,
under systemd (`$JOURNAL_STREAM` naming standard error) standard error carries sd-daemon(3) priority
prefixes, a bad `--log-file` is a user mistake (exit 2), and errors reach the log too."""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from groups import cli_group, run_cli, start_cli, wait_until

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import ConfigError
from coalesce_core.testing.workload import SourceWriter
from coalesce_core.ui import cli

# a zone 14 hours from UTC, spelled without tzdata: a local time where UTC is due would show
TZ = {"TZ": "XYZ-14"}
LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (DEBUG|INFO|NOTICE|WARNING|ERROR) (\S+)\[(\d+)\] (.*)$")
FAULT_A = {"COALESCE_FAULTS": "coalesce_apply:qtree=A"}


@pytest.fixture
def group(tmp_path: Path):
    cfg, writer = cli_group(tmp_path, "logs")
    writer.volume.close()
    return cfg


def change(cfg: Path, name: str = "new") -> None:
    """A new file in source qtree A, written through a handle of its own (the runs change the volume)."""
    source = Volume.open(plugin_manager(), f"sim://{cfg.parent}/src")
    try:
        SourceWriter(source).write("A", name, b"changed")
    finally:
        source.close()


def coalesce(cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`coalesce ARGS` in a subprocess (tests/groups.py) in the zone of :data:`TZ`."""
    return run_cli(cfg, *args, env={**TZ, **(env or {})})


def parsed(path: Path) -> list[re.Match]:
    lines = path.read_text(encoding="utf-8").splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches) if not m]
    return [m for m in matches if m]


def utc(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc).timestamp()


def test_the_log_file_has_utc_timestamps_levels_the_group_and_the_cycle(group):
    cfg = group
    log = cfg.parent / "coalesce.log"
    before = time.time()
    p = coalesce(cfg, "--log-file", str(log), "run", "--once")
    after = time.time()
    assert p.returncode == 0, p.stderr
    lines = parsed(log)
    for m in lines:
        assert before - 1 <= utc(m[1]) <= after + 1  # UTC, not the TZ of the process
        assert m[3] == "logs" and int(m[4]) > 0
    text = [f"{m[2]} {m[5]}" for m in lines]
    assert text[0].startswith("NOTICE coalesce ") and "run --once" in text[0] and str(cfg) in text[0]
    assert "INFO cycle 1 started" in text
    assert {
        "INFO replica A: baseline done (baseline -> done)",
        "INFO replica B: baseline done (baseline -> done)",
    } <= set(text)
    assert any(re.fullmatch(r"INFO cycle 1: jump-ahead: A, B export co-logs-\d+-new_base", t) for t in text)
    assert text[-1].startswith("INFO cycle 1: ") and "failures 0" in text[-1]
    assert not any(t.startswith("DEBUG") for t in text)  # the default level is info
    # the terminal (not a terminal here: plain lines) keeps its own view: the cycle line, no timestamps
    assert p.stdout.startswith("cycle 1: ") and not LINE.match(p.stdout.splitlines()[0])
    assert "cycle 1 started" not in p.stdout + p.stderr


def test_failures_reach_the_log_with_their_error_and_lines_are_appended(group):
    cfg = group
    log = cfg.parent / "coalesce.log"
    assert coalesce(cfg, "--log-file", str(log), "run", "--once").returncode == 0
    first = log.read_text(encoding="utf-8")
    change(cfg)
    p = coalesce(cfg, "--log-file", str(log), "run", "--once", env=FAULT_A)
    assert p.returncode == cli.EXIT_TRANSFER_FAILED, p.stderr
    text = log.read_text(encoding="utf-8")
    assert text.startswith(first)  # appended, the first run's lines kept
    new = [f"{m[2]} {m[5]}" for m in parsed(log)][len(first.splitlines()) :]
    failed = [t for t in new if t.startswith("WARNING replica A: update failed: ")]
    assert len(failed) == 1 and "InjectedFault" in failed[0] and failed[0].endswith("(update -> rollback)")
    assert "INFO cycle 2: rolling back the failed transfers" in new
    assert "INFO replica A: rolled back to its base (rollback -> done)" in new
    # the terminal: the one-line summary, as before (the detail is in the log)
    assert "failed: A (`coalesce status` shows why" in p.stderr and "InjectedFault" not in p.stderr


def test_log_level_and_debug(group):
    cfg = group
    quiet, loud = cfg.parent / "warning.log", cfg.parent / "debug.log"
    assert coalesce(cfg, "--log-file", str(loud), "--debug", "run", "--once").returncode == 0
    levels = {m[2] for m in parsed(loud)}
    assert {"DEBUG", "INFO", "NOTICE"} <= levels  # --debug: debug lines (PCPIs, every transition)
    assert any("PCPI taken co-logs-" in m[5] for m in parsed(loud))
    change(cfg)
    p = coalesce(cfg, "--log-file", str(quiet), "--log-level", "warning", "run", "--once", env=FAULT_A)
    assert p.returncode == cli.EXIT_TRANSFER_FAILED
    assert [m[2] for m in parsed(quiet)] == ["WARNING"]  # the failure, nothing below warning
    assert p.stdout == ""  # the per-cycle line (info) is below the level on the terminal too


def test_errors_reach_the_log(group):
    cfg = group
    log = cfg.parent / "coalesce.log"
    p = coalesce(cfg, "--log-file", str(log), "break", "nobody")
    assert p.returncode == 6 and p.stderr.startswith("error: ")
    lines = [(m[2], m[3], m[5]) for m in parsed(log)]
    assert lines[0][:2] == ("ERROR", "logs") and lines[0][2] == p.stderr.splitlines()[0]
    assert lines[1][:2] == ("ERROR", "logs") and lines[1][2].startswith("hint: ")


@pytest.mark.parametrize("where", ["missing-dir/coalesce.log", "."])
def test_a_log_file_that_cannot_be_opened_is_exit_2_with_a_hint(group, where):
    cfg = group
    p = coalesce(cfg, "--log-file", str(cfg.parent / where), "run", "--once")
    assert p.returncode == ConfigError.exit_code == 2
    err = p.stderr.splitlines()
    assert err[0].startswith(f"error: --log-file {cfg.parent / where}: cannot open it for appending: ")
    assert err[1].startswith("hint: ") and len(err) == 2  # no traceback
    st = coalesce(cfg, "history", "--json")
    assert st.returncode == 0 and st.stdout.strip() == "[]"  # nothing ran


def _journal(cfg: Path, *args: str, stream: str | None = None, env: dict[str, str] | None = None):
    """Run with standard error on a pipe that $JOURNAL_STREAM names (as systemd does), or ``stream``."""
    r, w = os.pipe()
    st = os.fstat(w)
    journal = stream if stream is not None else f"{st.st_dev}:{st.st_ino}"
    with start_cli(cfg, *args, env={**TZ, **(env or {}), "JOURNAL_STREAM": journal}, stderr=w) as p:
        os.close(w)
        with os.fdopen(r, encoding="utf-8") as f:
            err = f.read()
        out, _ = p.communicate(timeout=300)
    return p.returncode, out, err


def test_under_systemd_standard_error_has_priorities_and_no_timestamps(group):
    cfg = group
    assert coalesce(cfg, "run", "--once").returncode == 0
    change(cfg)
    rc, out, err = _journal(cfg, "run", "--once", env=FAULT_A)
    assert rc == cli.EXIT_TRANSFER_FAILED
    lines = err.splitlines()
    assert lines and all(re.match(r"<[2-7]>logs: ", line) for line in lines), err
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines)  # the journal stamps them
    assert lines[0].startswith("<5>logs: coalesce ")  # notice: the agent starting
    assert "<6>logs: cycle 2 started" in lines
    assert any(line.startswith("<4>logs: replica A: update failed: ") for line in lines)
    assert any(line.startswith("<6>logs: cycle 2: ") and "failures 1" in line for line in lines)
    assert out == ""  # the per-cycle line went to the journal, once
    assert not any("`coalesce status` shows why" in line for line in lines)  # the terminal's summary

    rc, out, err = _journal(cfg, "break", "nobody")
    assert rc == 6 and err.splitlines()[0].startswith("<3>logs: error: ") and err.splitlines()[1].startswith("<3>")


def test_journal_stream_of_another_file_is_not_the_journal(group):
    """A child of a service whose standard error was redirected inherits $JOURNAL_STREAM: it only counts
    when it names standard error itself (systemd.exec(5))."""
    cfg = group
    rc, out, err = _journal(cfg, "break", "nobody", stream="1:2")
    assert rc == 6 and err.startswith("error: ") and "<3>" not in err


def _cycles(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(n) for n in re.findall(r"\] cycle (\d+) started$", path.read_text(encoding="utf-8"), re.M)]


def test_logging_goes_on_after_logrotate_moves_or_truncates_the_file(group):
    cfg = group
    log = cfg.parent / "coalesce.log"
    with start_cli(cfg, "--log-file", str(log), "run", "--interval", "0.2", "--quiet", env=TZ) as runner:
        wait_until(runner, lambda: len(_cycles(log)) >= 2, "cycles logged")
        os.rename(log, cfg.parent / "coalesce.log.1")  # logrotate's default: move, a new file is created
        wait_until(runner, lambda: len(_cycles(log)) >= 2, "cycles logged in the new file")
        moved, kept = _cycles(cfg.parent / "coalesce.log.1"), _cycles(log)
        assert moved + kept == list(range(1, max(kept) + 1))  # the new file goes on where the old one stopped
        os.truncate(log, 0)  # logrotate's copytruncate
        wait_until(runner, lambda: len(_cycles(log)) >= 1, "cycles logged after the truncation")
        runner.send_signal(signal.SIGTERM)
        _out, err = runner.communicate(timeout=60)
    assert runner.returncode == 0, err
    text = log.read_text(encoding="utf-8")
    assert not text.startswith("\0")  # appended: after a truncation writes start at 0, no hole
    parsed(log)
    assert "NOTICE logs[" in text and "coalesce run: SIGTERM: stopping after the current cycle" in text
    assert text.rstrip().endswith("coalesce run: stopped between cycles, as asked; the group is at rest")


def test_the_administrative_verbs_log_what_they_changed(group):
    cfg = group
    log = cfg.parent / "coalesce.log"
    assert coalesce(cfg, "run", "--once").returncode == 0
    assert coalesce(cfg, "--log-file", str(log), "break", "A").returncode == 0
    assert coalesce(cfg, "--log-file", str(log), "resync", "A").returncode == 0
    said = [(m[2], m[5]) for m in parsed(log)]
    assert ("INFO", "replica A: broken (writable, exports its active file system) (stable -> broken)") in said
    assert any(level == "INFO" and msg.startswith("replica A: resynchronising (broken -> ") for level, msg in said)
    assert coalesce(cfg, "--log-file", str(log), "remove", "B").returncode == 0
    said = [(m[2], m[5]) for m in parsed(log)]
    assert ("INFO", "replica B: removed from the group (its data stay on the destination) (stable -> removed)") in said


def test_quiet_prints_nothing_for_a_clean_run_and_the_file_still_has_the_cycle(group):
    """What cron mails (docs/operations.md, "Cron"): nothing for a clean `run --once --quiet`."""
    cfg = group
    log = cfg.parent / "coalesce.log"
    p = coalesce(cfg, "--log-file", str(log), "run", "--once", "--quiet")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert any(m[5].startswith("cycle 1: ") for m in parsed(log))
