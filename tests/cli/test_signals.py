"""`coalesce run` and signals, as a service manager sends them (docs/operations.md, "Stopping"): the first
SIGTERM or SIGINT stops at the next safe point and exits 0 saying so, a second one aborts to the
crash-recovery path (exit 130), and the next run recovers."""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from groups import at_rest, cli_group, run_cli, start_cli, status, wait_until


@pytest.fixture
def group(tmp_path: Path):
    return cli_group(tmp_path, "sig")


def _runner(cfg: Path, env: dict[str, str] | None = None) -> AbstractContextManager[subprocess.Popen]:
    return start_cli(cfg, "run", "--interval", "3600", "--quiet", env=env)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_between_cycles_stops_the_run_at_once_and_exits_0(group, sig):
    cfg, _writer = group
    with _runner(cfg) as runner:
        wait_until(runner, lambda: at_rest(status(cfg)), "the first cycle ended")
        runner.send_signal(sig)
        out, err = runner.communicate(timeout=30)  # the hour-long wait ends at once
    assert runner.returncode == 0, err
    assert f"{sig.name}: stopping after the current cycle" in err and "stopped between cycles" in err
    assert run_cli(cfg, "check").returncode == 0
    assert run_cli(cfg, "run", "--once").returncode == 0  # the lock went with the process


def test_a_second_signal_aborts_the_cycle_and_the_next_run_recovers(group):
    cfg, writer = group
    writer.write("A", "new", b"changed")
    tests = str(Path(__file__).resolve().parents[1])
    env = {
        "COALESCE_PLUGINS": "slow_apply",
        "COALESCE_SLOW_APPLY": "5",  # each apply waits 5 s
        "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])),
    }
    with _runner(cfg, env) as runner:
        wait_until(runner, lambda: status(cfg)["phase"] != "idle", "a cycle started")
        runner.send_signal(signal.SIGTERM)
        assert runner.stderr is not None
        assert "stopping after the current cycle" in runner.stderr.readline()  # the first one was handled
        runner.send_signal(signal.SIGTERM)  # the cycle is still waiting in its apply: this one aborts it
        out, rest = runner.communicate(timeout=60)
        err = "stopping after the current cycle\n" + rest
    assert runner.returncode == 130, err
    assert "aborted; the next `coalesce run` recovers" in err
    done = run_cli(cfg, "run", "--once")
    assert done.returncode == 0, done.stderr
    check = run_cli(cfg, "check")
    assert check.returncode == 0, check.stdout


def test_a_signal_after_the_run_stopped_is_ignored_not_fatal():
    """The run ends after the first signal and the process goes on to exit 0; a second signal that
    comes after the handlers were taken down must not kill it by the default action (exit -15).
    Without a stop asked, the previous handlers come back (in-process, as the process does)."""
    from coalesce_core.ui import cli

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with cli._Stop(lambda line: None).installed():
            pass
        assert {s: signal.getsignal(s) for s in before} == before
        stop = cli._Stop(lambda line: None)
        with stop.installed():
            stop.on_signal(signal.SIGTERM, None)  # the first signal: stop after the cycle
        assert {s: signal.getsignal(s) for s in before} == {s: signal.SIG_IGN for s in before}
        os.kill(os.getpid(), signal.SIGTERM)  # late: ignored (this test process lives on)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
