"""The systemd units in contrib/systemd (docs/operations.md, "Running under systemd"): `systemd-analyze
verify` finds nothing to say about them, their command lines are ones `coalesce` accepts, and the exit
codes they name are the command line's.  Skipped when systemd-analyze is missing unless
COALESCE_REQUIRE_SYSTEMD=1 (tools/test installs it and sets it)."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coalesce_core.errors import ConfigError, GroupLocked, MetadataError
from coalesce_core.ui import cli

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
NAMES = ("coalesce@.service", "coalesce-once@.service", "coalesce-once@.timer")

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and os.environ.get("COALESCE_REQUIRE_SYSTEMD") != "1",
    reason="systemd-analyze is not installed (apt-get install systemd)",
)


def unit(name: str) -> configparser.ConfigParser:
    p = configparser.ConfigParser(interpolation=None, strict=True)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read_string((UNITS / name).read_text(encoding="utf-8"))
    return p


def installed_copies(tmp_path: Path, edit=lambda name, text: text) -> Path:
    """The units in tmp_path with ExecStart's `coalesce` replaced by an executable that runs this
    checkout's command line (verify checks that the command exists), ``edit`` applied."""
    exe = tmp_path / "coalesce"
    exe.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m coalesce_core.ui.cli "$@"\n')
    exe.chmod(0o755)
    for name in NAMES:
        text = (UNITS / name).read_text(encoding="utf-8").replace("ExecStart=coalesce ", f"ExecStart={exe} ")
        (tmp_path / name).write_text(edit(name, text), encoding="utf-8")
    return tmp_path


def verify(where: Path, *instances: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(where / i) for i in instances)],
        capture_output=True,
        text=True,
        timeout=120,
    )


INSTANCES = ("coalesce@home.service", "coalesce-once@home.service", "coalesce-once@home.timer")


@needs_analyze
def test_systemd_analyze_verify_finds_nothing_in_the_units(tmp_path):
    p = verify(installed_copies(tmp_path), *INSTANCES)
    assert (p.returncode, p.stdout + p.stderr) == (0, "")


@needs_analyze
@pytest.mark.parametrize(
    "broken",
    [
        ("coalesce@.service", "KillMode=mixed", "KillMode=mixd"),  # a value systemd cannot parse
        ("coalesce-once@.service", "SuccessExitStatus=", "SuccesExitStatus="),  # an unknown key
        ("coalesce-once@.timer", "OnCalendar=*:0/15", "OnCalendar=every quarter"),
    ],
)
def test_verify_does_report_a_broken_unit(tmp_path, broken):
    """The check above can fail: the same verify on a copy with one mistake says so."""
    name, good, bad = broken
    assert good in (UNITS / name).read_text(encoding="utf-8")
    where = installed_copies(tmp_path, lambda n, text: text.replace(good, bad) if n == name else text)
    p = verify(where, *INSTANCES)
    assert bad.split("=")[0] in p.stdout + p.stderr or bad.split("=")[1] in p.stdout + p.stderr, p.stderr


@needs_analyze
def test_verify_reports_an_execstart_that_does_not_exist(tmp_path):
    where = installed_copies(tmp_path)
    (where / "coalesce").unlink()
    p = verify(where, "coalesce@home.service")
    assert p.returncode != 0 and "not executable" in p.stderr


@pytest.mark.parametrize("name", ["coalesce@.service", "coalesce-once@.service"])
def test_the_units_command_line_is_one_coalesce_accepts(name):
    argv = shlex.split(unit(name)["Service"]["ExecStart"].replace("%i", "home"))
    assert argv[0] == "coalesce"  # found in systemd's search path: /usr/local/bin (pip) or /usr/bin
    args = cli.build_parser().parse_args(argv[1:])
    assert args.verb == "run" and args.config == "/etc/coalesce/home.toml"
    assert args.once == (name == "coalesce-once@.service")
    assert not args.quiet  # the journal gets the per-cycle lines


def test_the_exit_codes_the_units_name_are_the_command_lines():
    """docs/operations.md explains these choices; the codes are docs/cli.md's."""
    once = unit("coalesce-once@.service")["Service"]
    assert set(once["SuccessExitStatus"].split()) == {str(cli.EXIT_NOT_STABLE), str(GroupLocked.exit_code)}
    agent = unit("coalesce@.service")["Service"]
    assert set(agent["RestartPreventExitStatus"].split()) == {str(ConfigError.exit_code), str(MetadataError.exit_code)}
    for svc in (once, agent):  # only the agent gets the first SIGTERM; it stops at its safe point
        assert (svc["KillSignal"], svc["KillMode"]) == ("SIGTERM", "mixed")
    assert unit("coalesce-once@.timer")["Timer"]["Persistent"] == "true"
