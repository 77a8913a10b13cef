"""status/history/run/graph as a person sees them, and errors a person can act on."""

from __future__ import annotations

import io
import subprocess
import time

from groups import EXE, fake_run_clock
from rich.console import Console

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.ui import cli as cli_mod


class SlowApply:
    """Each destination apply takes a while, so the progress display has something to show."""

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume, qtree, records):
        result = yield
        time.sleep(0.3)
        return result


def test_run_progress_display_on_a_terminal(group, monkeypatch):
    tmp, _ = group
    monkeypatch.setattr(
        cli_mod,
        "_agent_with",
        lambda args, plugins: __import__("coalesce_core.agent", fromlist=["Agent"]).Agent.open(
            cli_mod._config(args), plugins=[*plugins, SlowApply()]
        ),
    )
    assert cli_mod.main(["init"]) == 0
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=140, record=True)
    monkeypatch.setattr(cli_mod, "_live_console", lambda: console)
    assert cli_mod.main(["run", "--once"]) == 0
    text = console.export_text()
    for col in ("transfers", "replica", "records", "bytes", "rate", "elapsed", "left"):
        assert col in text, text
    assert "baseline" in text and "coalesce run" in text and "PCPI budget" in text


def test_run_is_quiet_when_not_a_terminal(group, cli):
    assert cli("init")[0] == 0
    rc, out, err = cli("run", "--once")
    assert rc == 0 and out.startswith("cycle 1:") and "\x1b[" not in out and "transfers" not in out
    rc, out, err = cli("run", "--once", "--quiet")
    assert rc == 0 and out == ""


def test_status_graph_history_text(group, cli):
    assert cli("init")[0] == 0
    assert cli("run", "--once", "-q")[0] == 0
    rc, out, _ = cli("status")
    assert "group home — cycle 1, phase idle" in out and "PCPI budget" in out and "1 of 4 cycle PCPIs" in out
    rc, out, _ = cli("graph")
    assert "group home, replicas per state now" in out and "●● 2" in out and "line 1004" in out
    rc, out, _ = cli("history")
    # cycle 1: the jump-ahead and the new base taken, the jump-ahead released
    assert "cycles" in out and "+2 −1" in out and "stable=2" in out


def _stderr_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [line for line in p.stderr.splitlines() if line.strip()]


def test_user_errors_print_the_message_and_the_fix(group):
    tmp, _ = group
    cfg = ["--config", str(tmp / "coalesce.toml")]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=60, cwd=tmp)

    cases = [
        ((*cfg, "status"), 4, "does not exist"),  # missing volume
        (("--config", str(tmp / "nope.toml"), "status"), 2, "no config file"),  # missing config
    ]
    for args, code, text in cases:
        p = run(*args)
        lines = _stderr_lines(p)
        assert p.returncode == code, (args, p.stderr)
        assert len(lines) == 2 and lines[0].startswith("error: ") and text in lines[0], lines
        assert lines[1].startswith("hint: "), lines
    assert run(*cfg, "init").returncode == 0
    for args, code, text in [
        ((*cfg, "break", "nope"), 6, "no replica 'nope'"),  # unknown replica
        ((*cfg, "resync", "A"), 6, "'resync' is not a transition"),  # illegal now
        ((*cfg, "init"), 5, ""),  # metadata exists
    ]:
        p = run(*args)
        lines = _stderr_lines(p)
        assert p.returncode == code and len(lines) == 2, (args, p.stderr)
        assert lines[0].startswith("error: ") and text in lines[0] and lines[1].startswith("hint: ")
        assert "Traceback" not in p.stderr
    p = run(*cfg, "--debug", "break", "nope")
    assert p.returncode == 6 and "Traceback" in p.stderr  # --debug adds the traceback
    (tmp / "bad.toml").write_text("[group]\nname='x'\nsource='nope://a'\ndestination='nope://b'\nmetadata='/tmp'\n")
    p = run("--config", str(tmp / "bad.toml"), "init")
    assert p.returncode == 4 and "coalesce backends" in p.stderr
    # bad option values are usage errors: exit 2 with the reason
    for args in (("run", "--interval", "-1"), ("status", "--watch", "--count", "0"), ("demo", "--speed", "0")):
        p = run(*cfg, *args)
        assert p.returncode == 2 and "error: argument" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_internal_errors_hide_the_traceback_unless_debug(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli_mod, "cmd_backends", boom)
    assert cli_mod.main(["backends"]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: kaboom" in err and "--debug" in err and "Traceback" not in err


def test_status_watch_live_on_a_terminal(group, monkeypatch):
    assert cli_mod.main(["init"]) == 0
    console = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    monkeypatch.setattr(cli_mod, "_live_console", lambda: console)
    assert cli_mod.main(["status", "--watch", "--interval", "0.05", "--count", "3"]) == 0
    text = console.export_text()
    assert "every 0.05s" in text and "Ctrl-C to stop" in text
    assert "group home — cycle 0, phase idle" in text and "PCPI budget" in text


def test_demo_on_other_backends_says_what_to_use(monkeypatch):
    p = subprocess.run([*EXE, "demo", "--backend", "btrfs", "--plain"], capture_output=True, text=True, timeout=60)
    if p.returncode == 0:  # a btrfs /tmp: the demo simply works there
        return
    assert "--backend sim" in p.stderr and "Traceback" not in p.stderr


def test_run_survives_a_failed_export_switch_and_recovers(group, cli, monkeypatch):
    """`coalesce run` (no --once) reports a backend failure outside a transfer, recovers, goes on."""
    tmp, writer = group
    assert cli("init")[0] == 0
    monkeypatch.setenv("COALESCE_FAULTS", "coalesce_export:volume=dst.vol:nth=2:times=1:message=link down")
    sleeps = fake_run_clock(
        monkeypatch, 7, waits=4, on_wait=lambda n: writer.write("A", "dir0/file0", f"change {n}".encode())
    )
    rc, out, err = cli("run", "--interval", "7")
    assert rc == cli_mod.EXIT_INTERRUPTED
    assert "cycle failed:" in err and "link down" in err and "recovering and retrying in 7 s" in err
    assert round(sum(sleeps), 6) == 28 and max(sleeps) == cli_mod.AGENT_POLL
    assert out.count("cycle ") >= 3  # cycles before and after the failure
    monkeypatch.delenv("COALESCE_FAULTS")
    rc, out, err = cli("check")
    assert rc == 0, out + err
    rc, out, err = cli("run", "--once", "-q")
    assert rc == 0
