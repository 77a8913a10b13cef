"""One agent per group, as an operator meets it: a second `coalesce run` beside a running one, two started
together, `init` beside a running agent (docs/operations.md, "One agent per group"; the verbs a running agent
takes as requests: tests/cli/test_config_truth.py)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from backends import on_backend
from groups import at_rest, cli_group, run_cli, start_cli, status, wait_until


@pytest.fixture(params=[on_backend("sim"), on_backend("btrfs")])
def group(request, tmp_path: Path):
    """An initialised two-replica group on sim or real btrfs volumes (tests/groups.py); returns its config's
    path."""
    if request.param == "sim":
        cfg, writer = cli_group(tmp_path, "locked")
    else:
        urls = request.getfixturevalue("btrfs_urls")
        cfg, writer = cli_group(tmp_path, "locked", urls("src"), urls("dst"))
    writer.volume.close()
    return cfg


def test_a_second_agent_is_refused_beside_a_running_one_I1(group):
    cfg = group
    with start_cli(cfg, "run", "--interval", "3600", "--quiet") as runner:
        # the first cycle ends; the agent then waits for the next one, holding the group
        wait_until(runner, lambda: at_rest(status(cfg)), "the first cycle ended")
        second = run_cli(cfg, "run", "--once")
        assert second.returncode == 9, second.stderr
        assert f"is in use by PID {runner.pid} " in second.stderr and "`coalesce run`" in second.stderr
        assert "hint:" in second.stderr
        assert run_cli(cfg, "init").returncode == 9  # a verb the agent does not take as a request
        holder = status(cfg)["agent"]  # status names the running agent, from the kernel's lock table
        assert holder is not None and holder["pid"] == runner.pid and holder["verb"] == "run"
        assert f"PID {runner.pid}" in run_cli(cfg, "status").stdout
        for verb in ("status", "history", "check"):  # the read verbs work beside it
            p = run_cli(cfg, verb)
            assert p.returncode == 0, (verb, p.stdout, p.stderr)
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    assert status(cfg)["agent"] is None and "agent: none running" in run_cli(cfg, "status").stdout
    assert run_cli(cfg, "run", "--once").returncode == 0  # the lock died with its holder
    assert run_cli(cfg, "check").returncode == 0


def test_two_runs_started_together_leave_a_consistent_group_I1_I3(group):
    cfg = group
    with start_cli(cfg, "run", "--once", "--quiet") as first, start_cli(cfg, "run", "--once", "--quiet") as second:
        results = [(p.pid, p.wait(timeout=300), p.communicate()[1]) for p in (first, second)]
    codes = sorted(rc for _pid, rc, _err in results)
    assert codes in ([0, 0], [0, 9]), results  # one after the other, or one refused
    for pid, rc, err in results:
        if rc == 9:
            other = next(q for q, _rc, _e in results if q != pid)
            assert f"PID {other} " in err, err
    check = run_cli(cfg, "check")
    assert check.returncode == 0, check.stdout + check.stderr
