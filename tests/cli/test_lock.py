"""One agent per group, as an operator meets it: a second `coalesce run` beside a running one, two started
together, administrative verbs beside a running agent (docs/operations.md, "One agent per group")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backends import on_backend

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.testing.workload import SourceWriter, fill

EXE = [sys.executable, "-m", "coalesce_core.ui.cli"]


@pytest.fixture(params=[on_backend("sim"), on_backend("btrfs")])
def group(request, tmp_path: Path):
    """An initialised two-replica group on sim or real btrfs volumes; returns (config path, source writer)."""
    if request.param == "sim":
        src, dst = f"sim://{tmp_path}/src", f"sim://{tmp_path}/dst"
    else:
        urls = request.getfixturevalue("btrfs_urls")
        src, dst = urls("src"), urls("dst")
    cfg = tmp_path / "coalesce.toml"
    cfg.write_text(
        f'[group]\nname = "locked"\nsource = "{src}"\ndestination = "{dst}"\n'
        f'metadata = "{tmp_path}/meta"\n[[replica]]\nname = "A"\n[[replica]]\nname = "B"\n'
    )
    source = Volume.open(plugin_manager(), src, create=True)
    fill(SourceWriter(source), ["A", "B"])
    source.close()
    assert coalesce(cfg, "init").returncode == 0
    return cfg


def coalesce(cfg: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COALESCE_SIM_FSYNC": "0"}
    return subprocess.run(
        [*EXE, "--config", str(cfg), *args], capture_output=True, text=True, env=env, timeout=300, **kw
    )


def _status(cfg: Path) -> dict:
    p = coalesce(cfg, "status", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_a_second_agent_is_refused_beside_a_running_one_I1(group):
    cfg = group
    env = {**os.environ, "COALESCE_SIM_FSYNC": "0"}
    runner = subprocess.Popen(
        [*EXE, "--config", str(cfg), "run", "--interval", "3600", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while True:  # the first cycle ends; the agent then waits for the next one, holding the group
            st = _status(cfg)
            if {r["state"] for r in st["replicas"]} == {"stable"} and st["phase"] == "idle":
                break
            assert runner.poll() is None, runner.communicate()
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        second = coalesce(cfg, "run", "--once")
        assert second.returncode == 9, second.stderr
        assert f"is in use by PID {runner.pid} " in second.stderr and "`coalesce run`" in second.stderr
        assert "hint:" in second.stderr
        assert coalesce(cfg, "break", "A").returncode == 9  # never silently undone by the running agent
        holder = _status(cfg)["agent"]  # status names the running agent, from the kernel's lock table
        assert holder is not None and holder["pid"] == runner.pid and holder["verb"] == "run"
        assert f"PID {runner.pid}" in coalesce(cfg, "status").stdout
        for verb in ("status", "history", "check"):  # the read verbs work beside it
            p = coalesce(cfg, verb)
            assert p.returncode == 0, (verb, p.stdout, p.stderr)
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    assert _status(cfg)["agent"] is None and "agent: none running" in coalesce(cfg, "status").stdout
    assert coalesce(cfg, "run", "--once").returncode == 0  # the lock died with its holder
    assert coalesce(cfg, "check").returncode == 0


def test_two_runs_started_together_leave_a_consistent_group_I1_I3(group):
    cfg = group
    env = {**os.environ, "COALESCE_SIM_FSYNC": "0"}
    procs = [
        subprocess.Popen(
            [*EXE, "--config", str(cfg), "run", "--once", "--quiet"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    results = [(p.pid, p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(rc for _pid, rc, _err in results)
    assert codes in ([0, 0], [0, 9]), results  # one after the other, or one refused
    for pid, rc, err in results:
        if rc == 9:
            other = next(q for q, _rc, _e in results if q != pid)
            assert f"PID {other} " in err, err
    check = coalesce(cfg, "check")
    assert check.returncode == 0, check.stdout + check.stderr
