"""One agent per group (coalesce_core/grouplock.py): the second one is refused and told who holds the group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from coalesce_core.agent import Agent
from coalesce_core.errors import GroupLocked
from coalesce_core.grouplock import GroupLock, holder, lock_path
from coalesce_core.testing.workload import SourceWriter, fill


def test_a_second_holder_is_refused_and_told_who_holds_it(tmp_path):
    ledger = tmp_path / "g.ledger"
    first = GroupLock.acquire(ledger, "g", "run")
    with pytest.raises(GroupLocked) as ei:
        GroupLock.acquire(ledger, "g", "break")  # a second open file conflicts, even in this process
    assert ei.value.exit_code == 9
    assert f"PID {os.getpid()}" in str(ei.value) and "`coalesce run`" in str(ei.value)
    assert holder(lock_path(ledger))["verb"] == "run"
    first.release()
    first.release()  # idempotent
    second = GroupLock.acquire(ledger, "g", "break")
    assert holder(lock_path(ledger))["verb"] == "break"
    second.release()


def test_the_lock_dies_with_its_holder(tmp_path):
    """SIGKILL (or a power cut) leaves no stale lock: the kernel frees a dead process's flock."""
    ledger = tmp_path / "g.ledger"
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from coalesce_core.grouplock import GroupLock
        GroupLock.acquire(Path({str(ledger)!r}), "g", "run")
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(GroupLocked, match=f"PID {proc.pid} "):
            GroupLock.acquire(ledger, "g", "run")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    GroupLock.acquire(ledger, "g", "run").release()


def test_a_holder_that_has_not_written_itself_yet_is_named_from_the_kernels_lock_table(tmp_path):
    """Between its flock and its write the file holds the previous holder's text (or nothing): the refusal
    names the PID that holds the flock, never the predecessor."""
    ledger = tmp_path / "g.ledger"
    GroupLock.acquire(ledger, "g", "break").release()  # a predecessor's text, with this process's PID
    path = lock_path(ledger)
    code = textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(path)!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(GroupLocked) as ei:
            GroupLock.acquire(ledger, "g", "run")
        assert f"PID {proc.pid} (starting)" in str(ei.value) and "`coalesce break`" not in str(ei.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_second_agent_is_refused_and_readers_work_beside_the_first_I1(group_config):
    cfg = group_config(replicas=("A", "B"))
    agent = Agent.init(cfg)
    try:
        fill(SourceWriter(agent.source), ["A", "B"])
        with pytest.raises(GroupLocked, match="is in use by PID"):
            Agent.open(cfg)
        agent.run_once()
        reader = Agent.open(cfg, readonly=True)
        try:
            assert reader.lock is None
            assert reader.state == agent.state  # the committed state, nothing recovered or written
        finally:
            reader.close()
    finally:
        agent.close()
    again = Agent.open(cfg)  # closing the first freed the group
    try:
        assert set(r.state for r in again.state.replicas.values()) == {"stable"}
    finally:
        again.close()


def test_a_failed_open_frees_the_lock(group_config):
    cfg = group_config(replicas=("A",))
    Agent.init(cfg).close()
    os.remove(cfg.ledger_path(Agent.open(cfg, readonly=True).dest.metadata_dir()))
    from coalesce_core.errors import MetadataError

    with pytest.raises(MetadataError):
        Agent.open(cfg)
    with pytest.raises(MetadataError):  # not GroupLocked: the failed open released what it took
        Agent.open(cfg)


def test_a_recovery_that_fails_frees_the_lock(group_config, monkeypatch):
    """An open whose recovery raises (a destination error, a crash point in a test) closes the agent:
    the same process (a `coalesce run` that opens again after an error) is not refused by its own lock."""
    cfg = group_config(replicas=("A",))
    Agent.init(cfg).close()

    def broken(self, reach_source=True):
        raise OSError("the destination failed during recovery")

    monkeypatch.setattr(Agent, "recover", broken)
    with pytest.raises(OSError, match="during recovery"):
        Agent.open(cfg)
    monkeypatch.undo()
    Agent.open(cfg).close()  # not GroupLocked
