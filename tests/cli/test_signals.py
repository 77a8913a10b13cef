"""`coalesce run` and signals, as a service manager sends them (docs/operations.md, "Stopping"): the first
SIGTERM or SIGINT stops at the next safe point and exits 0 saying so, a second one aborts to the
crash-recovery path (exit 130), and the next run recovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.testing.workload import SourceWriter, fill

EXE = [sys.executable, "-m", "coalesce_core.ui.cli"]
ENV = {**os.environ, "COALESCE_SIM_FSYNC": "0"}


@pytest.fixture
def group(tmp_path: Path):
    src, dst = f"sim://{tmp_path}/src", f"sim://{tmp_path}/dst"
    cfg = tmp_path / "coalesce.toml"
    cfg.write_text(
        f'[group]\nname = "sig"\nsource = "{src}"\ndestination = "{dst}"\nmetadata = "{tmp_path}/meta"\n'
        '[[replica]]\nname = "A"\n[[replica]]\nname = "B"\n'
    )
    source = Volume.open(plugin_manager(), src, create=True)
    writer = SourceWriter(source)
    fill(writer, ["A", "B"])
    assert coalesce(cfg, "init").returncode == 0
    return cfg, writer


def coalesce(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, "--config", str(cfg), *args], capture_output=True, text=True, env=ENV, timeout=300)


def _runner(cfg: Path, env: dict[str, str] = ENV) -> subprocess.Popen:
    return subprocess.Popen(
        [*EXE, "--config", str(cfg), "run", "--interval", "3600", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(cfg: Path, runner: subprocess.Popen, ok) -> None:
    deadline = time.monotonic() + 120
    while True:
        p = coalesce(cfg, "status", "--json")
        assert p.returncode == 0, p.stderr
        if ok(json.loads(p.stdout)):
            return
        assert runner.poll() is None, runner.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_between_cycles_stops_the_run_at_once_and_exits_0(group, sig):
    cfg, _writer = group
    runner = _runner(cfg)
    try:
        _wait_for(cfg, runner, lambda st: st["phase"] == "idle" and {r["state"] for r in st["replicas"]} == {"stable"})
        runner.send_signal(sig)
        out, err = runner.communicate(timeout=30)  # the hour-long wait ends at once
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, err
    assert f"{sig.name}: stopping after the current cycle" in err and "stopped between cycles" in err
    assert coalesce(cfg, "check").returncode == 0
    assert coalesce(cfg, "run", "--once").returncode == 0  # the lock went with the process


def test_a_second_signal_aborts_the_cycle_and_the_next_run_recovers(group):
    cfg, writer = group
    writer.write("A", "new", b"changed")
    tests = str(Path(__file__).resolve().parents[1])
    env = {
        **ENV,
        "COALESCE_PLUGINS": "slow_apply",
        "COALESCE_SLOW_APPLY": "5",  # each apply waits 5 s
        "PYTHONPATH": os.pathsep.join(filter(None, [tests, ENV.get("PYTHONPATH")])),
    }
    runner = _runner(cfg, env)
    try:
        _wait_for(cfg, runner, lambda st: st["phase"] not in ("idle",))
        runner.send_signal(signal.SIGTERM)
        assert runner.stderr is not None
        assert "stopping after the current cycle" in runner.stderr.readline()  # the first one was handled
        runner.send_signal(signal.SIGTERM)  # the cycle is still waiting in its apply: this one aborts it
        out, rest = runner.communicate(timeout=60)
        err = "stopping after the current cycle\n" + rest
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 130, err
    assert "aborted; the next `coalesce run` recovers" in err
    done = coalesce(cfg, "run", "--once")
    assert done.returncode == 0, done.stderr
    check = coalesce(cfg, "check")
    assert check.returncode == 0, check.stdout
