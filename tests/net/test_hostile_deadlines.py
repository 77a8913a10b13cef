"""A source that never ends its stream (docs/network.md, "Threat model"; coalesce_core/deadlines.py):
keep-alives only (over TLS and over the ssh transport), one byte a second (ssh), change records
without end (TLS).  The transfer fails at its deadline (`transfer_stall`, `transfer_timeout`),
the replica keeps its image (the rollback path), `last_error` names the deadline and its key,
the other replica of the group completes in the same cycle, and nothing the transfer started
(threads, the ssh child of its stream) outlives it.  Deadlines of 2-3 s keep each test short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import thread as cf_thread
from pathlib import Path

import attrs
import pytest
from groups import EXE
from net.netkit import LOCAL_OF, RemoteHarness, TLSService, client_env
from stallpeer import Stall

import coalesce_mem
import coalesce_remote
from coalesce_core.deadlines import TransferLimits

STALLPEER = Path(__file__).resolve().parent.parent / "stallpeer.py"


def _two_replicas(h: RemoteHarness) -> None:
    h.writer.write("A", "a/f", b"old A")
    h.writer.write("B", "b/f", b"old B")
    h.cycle()  # the baselines (the stall wraps updates only)
    h.writer.write("A", "a/f", b"new A")
    h.writer.write("B", "b/f", b"new B")


def _assert_failed_at_deadline(h: RemoteHarness, before, report, key: str, text: str) -> None:
    assert report["failures"] == 1 and list(report["failed"]) == ["A"], h.agent.failures
    (failure,) = h.agent.failures
    assert failure["replica"] == "A" and failure["trigger"] == "update_failed"
    assert f"DeadlineExceeded: {text}" in failure["error"]
    assert f"raise `{key}` in [group]" in failure["error"]  # the hint names the key
    a = h.agent.state.replicas["A"]
    assert a.state == "stable" and a.source_point == before.source_point  # rolled back: its old image
    assert a.last_error == failure["error"]
    assert h.agent.dest.fingerprint("A", a.exported) == h.local_source.fingerprint("A", before.source_point)
    b = h.agent.state.replicas["B"]  # the other replica completed in the same cycle
    assert b.state == "stable" and b.source_point != before.source_point
    assert h.agent.dest.fingerprint("B", b.exported) == h.local_source.fingerprint("B", b.source_point)
    h.assert_invariants()
    # an agent's transfer pool lives as long as the agent (docs/architecture.md); its workers are idle
    # once the cycle returned (the cycle waits for every transfer), so only other threads count here
    workers = {t for t in threading.enumerate() if getattr(t, "_target", None) is cf_thread._worker}
    left = [
        t.name
        for t in threading.enumerate()
        if t.name.startswith(("coalesce_", "coalesce-verify", "spool-")) and t not in workers
    ]
    assert left == [], f"threads of the transfer outlived it: {left}"


@pytest.fixture(params=["mem", pytest.param("btrfs", marks=pytest.mark.btrfs)], ids=["mem", "btrfs-destination"])
def tls_stall(certs, monkeypatch, group_config, request):
    """make(mode, limits): a RemoteHarness whose TLS source service stalls replica A's updates, into a
    mem destination or a real btrfs one."""
    made: list[tuple[TLSService, Stall, str]] = []
    client_env(monkeypatch, certs)
    dest_url = request.getfixturevalue("btrfs_urls")() if request.param == "btrfs" else None

    def make(mode: str, limits: TransferLimits) -> tuple[RemoteHarness, Stall]:
        local = f"mem://stall-tls-{os.getpid()}-{len(made)}"
        coalesce_mem.forget(local)
        coalesce_mem.volume_for(local)
        stall = Stall(mode)
        svc = TLSService(certs, server_plugins=(stall,), keepalive=0.3)
        made.append((svc, stall, local))
        remote = svc.expose(local)
        LOCAL_OF[remote] = local
        cfg = group_config(source_url=local, dest_url=dest_url, replicas=("A", "B"))
        return RemoteHarness(attrs.evolve(cfg.with_source(remote), deadlines=limits)), stall

    yield make
    coalesce_remote.close_all()
    for svc, stall, local in made:
        stall.release.set()
        svc.stop()
        coalesce_mem.forget(local)


def test_a_tls_source_that_sends_only_keep_alives_fails_the_update_at_the_stall_deadline(tls_stall):
    h, stall = tls_stall("keepalive", TransferLimits(stall=2.0))
    _two_replicas(h)
    before = h.agent.state.replicas["A"]
    t0 = time.monotonic()
    report = h.cycle()
    took = time.monotonic() - t0
    assert stall.started.is_set()
    assert 2.0 <= took < 15, took  # the deadline, not the client's 10 s silence timeout (keep-alives reset it)
    _assert_failed_at_deadline(h, before, report, "transfer_stall", "no change record from the source for 2s")
    stall.armed = False  # the source recovers: the next cycle updates A
    assert h.cycle()["failures"] == 0
    a = h.agent.state.replicas["A"]
    assert h.agent.dest.fingerprint("A", a.exported) == h.local_source.fingerprint("A", a.source_point)


def test_a_tls_source_that_sends_change_records_without_end_fails_at_the_total_deadline(tls_stall):
    h, stall = tls_stall("endless", TransferLimits(stall=2.0, total=3.0))
    _two_replicas(h)
    before = h.agent.state.replicas["A"]
    t0 = time.monotonic()
    report = h.cycle()
    assert time.monotonic() - t0 < 20
    assert stall.sent > 100  # records kept coming: the stall deadline alone never fires
    _assert_failed_at_deadline(h, before, report, "transfer_timeout", "the transfer took longer than 3s")
    spool = h.agent.spool
    assert spool is not None and spool.replicas() == []  # a failed update's spool is removed


@pytest.fixture
def ssh_stall(monkeypatch, tmp_path, group_config):
    """make(mode, limits): a RemoteHarness whose source is behind a fake ssh (tests/stallpeer.py)
    serving a mem volume file with replica A's updates stalled."""

    def make(mode: str, limits: TransferLimits) -> RemoteHarness:
        local = f"mem://{tmp_path}/stall-src.mem"
        coalesce_mem.volume_for(local)
        monkeypatch.setenv("COALESCE_SSH", f"{sys.executable} {STALLPEER}")
        monkeypatch.setenv("COALESCE_RETRY_DELAY", "0.05")
        monkeypatch.setenv("COALESCE_TIMEOUT", "20")
        monkeypatch.setenv("STALLPEER_MODE", mode)
        monkeypatch.setenv("STALLPEER_VOLUME", local)
        monkeypatch.setenv("STALLPEER_QTREE", "A")
        remote = f"ssh://fake/{local}"
        LOCAL_OF[remote] = local
        cfg = group_config(source_url=local, replicas=("A", "B"))
        return RemoteHarness(attrs.evolve(cfg.with_source(remote), deadlines=limits))

    yield make
    coalesce_remote.close_all()


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("mode", ["keepalive", "dribble"], ids=["keep-alives only", "one byte a second"])
def test_an_ssh_source_that_stalls_fails_the_update_and_its_ssh_is_killed(ssh_stall, monkeypatch, tmp_path, mode):
    (tmp_path / "pids").mkdir()
    monkeypatch.setenv("STALLPEER_PIDS", str(tmp_path / "pids"))
    h = ssh_stall(mode, TransferLimits(stall=2.0))
    _two_replicas(h)
    before = h.agent.state.replicas["A"]
    t0 = time.monotonic()
    report = h.cycle()
    took = time.monotonic() - t0
    assert took < 15, took  # the client's timeout is 20 s; keep-alives and single bytes reset it anyway
    _assert_failed_at_deadline(h, before, report, "transfer_stall", "no change record from the source for 2s")
    (stalled,) = [int(p.name) for p in (tmp_path / "pids").iterdir()]
    assert not _running(stalled)  # the stalled stream's ssh was killed with the transfer
    # the source recovers: its new service processes stall nothing; the sessions pooled from the
    # failed cycle (processes that still stall A's updates) are closed with the source's handle
    monkeypatch.setenv("STALLPEER_QTREE", "none")
    h.agent.source.close()
    assert h.cycle()["failures"] == 0
    a = h.agent.state.replicas["A"]
    assert h.agent.dest.fingerprint("A", a.exported) == h.local_source.fingerprint("A", a.source_point)


def test_run_once_ends_with_a_failed_update_when_the_source_stalls(certs, monkeypatch, tmp_path):
    """`coalesce run --once` (a process) against a TLS source that sends only keep-alives for A:
    it ends at the stall deadline with exit 8 (a failed transfer, docs/cli.md), B is updated,
    and `status --json` shows A's last_error naming `transfer_stall`."""
    from coalesce_core.backend.manager import plugin_manager
    from coalesce_core.backend.volume import Volume
    from coalesce_core.testing.workload import SourceWriter

    local = f"mem://stall-cli-{os.getpid()}"
    coalesce_mem.forget(local)
    src = Volume.open(plugin_manager(), local, create=True)
    writer = SourceWriter(src)
    writer.write("A", "a/f", b"old A")
    writer.write("B", "b/f", b"old B")
    stall = Stall("keepalive")
    svc = TLSService(certs, server_plugins=(stall,), keepalive=0.3)
    cert, key = certs.client
    env = dict(os.environ, COALESCE_TLS_CERT=cert, COALESCE_TLS_KEY=key, COALESCE_TLS_CA=certs.ca)
    env.pop("COALESCE_CRASH_AT", None)
    cfg = tmp_path / "g.toml"
    cfg.write_text(
        "\n".join(
            [
                "[group]",
                'name = "s"',
                f'source = "{svc.expose(local)}"',
                f'destination = "mem://{tmp_path}/dst.vol"',
                f'metadata = "{tmp_path}/meta"',
                'transfer_stall = "2s"',
                "[[replica]]",
                'name = "A"',
                "[[replica]]",
                'name = "B"',
                "",
            ]
        )
    )

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*EXE, "--config", str(cfg), *args], capture_output=True, text=True, env=env, timeout=60)

    try:
        assert run("init").returncode == 0
        assert run("run", "--once").returncode == 0
        writer.write("A", "a/f", b"new A")
        writer.write("B", "b/f", b"new B")
        t0 = time.monotonic()
        done = run("run", "--once")
        assert time.monotonic() - t0 < 40
        assert done.returncode == 8, done.stderr
        status = json.loads(run("status", "--json").stdout)
        replicas = {r["name"]: r for r in status["replicas"]}
        assert "no change record from the source for 2s" in replicas["A"]["last_error"]
        assert "`transfer_stall`" in replicas["A"]["last_error"]
        assert replicas["A"]["state"] == "stable" and replicas["B"]["state"] == "stable"
        assert not replicas["B"]["last_error"] and replicas["A"]["source_point"] != replicas["B"]["source_point"]
    finally:
        stall.release.set()
        svc.stop()
        coalesce_mem.forget(local)
