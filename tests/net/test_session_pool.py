"""Reuse of connections to a remote source: each RemoteVolume keeps an idle pool of finished
sessions for its change streams and describes (docs/network.md, "Connections")."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from net.netkit import LOCAL_OF, RemoteHarness, TLSService, client_env, random_source, remote_plugins

import coalesce_mem
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.testing.workload import fill

SNAP = "co-g-src-000001"
QTREES = ("A", "B", "C")
PARALLEL = 2


@pytest.fixture(params=["tls", "ssh"])
def served(request, certs, monkeypatch, tmp_path):
    """``expose(local) -> remote URL`` and ``opened() -> connections the server accepted so far``,
    over TLS (an in-process server) or ssh (a real sshd; its `coalesce serve` processes log each one)."""
    if request.param == "tls":
        svc = TLSService(certs)
        client_env(monkeypatch, certs)
        try:
            yield svc.expose, lambda: svc.service.stats["connections"]
        finally:
            import coalesce_remote

            coalesce_remote.close_all()
            svc.stop()
    else:
        sshd = request.getfixturevalue("ssh_env")
        log: Path = sshd.log

        def opened() -> int:
            text = log.read_text() if log.exists() else ""
            return len(re.findall(r"connection from \S+ \(identity '[^']*'\)$", text, re.M))

        yield sshd.expose, opened


def _harness(expose: Callable[[str], str], group_config: Any, tmp_path: Path) -> RemoteHarness:
    local = f"mem://{tmp_path}/pool-src-{time.monotonic_ns()}.mem"
    coalesce_mem.volume_for(local)
    remote = expose(local)
    LOCAL_OF[remote] = local
    h = RemoteHarness(group_config(source_url=local, replicas=QTREES, parallel=PARALLEL).with_source(remote))
    fill(h.writer, QTREES, files=4, size=50_000)
    return h


def test_a_cycle_opens_one_control_and_at_most_parallel_data_connections_and_a_warm_one_none(
    served, group_config, tmp_path
):
    expose, opened = served
    h = _harness(expose, group_config, tmp_path)
    before = opened()
    t0 = time.monotonic()
    report = h.cycle()
    first, took = opened() - before, time.monotonic() - t0
    assert report["failures"] == 0 and set(h.states().values()) == {"stable"}
    h.assert_invariants()
    # the control connection was opened with the agent: the cycle's are stream sessions only
    assert 1 <= first <= PARALLEL, f"the first cycle opened {first} connections"
    for q in QTREES:
        h.writer.write(q, "new", random.Random(q).randbytes(20_000))
    before = opened()
    t0 = time.monotonic()
    report = h.cycle()
    second, took2 = opened() - before, time.monotonic() - t0
    print(f"connections: first cycle {first} ({took:.2f} s), second cycle {second} ({took2:.2f} s)")
    assert report["failures"] == 0 and set(h.states().values()) == {"stable"}
    h.assert_invariants()  # I3: the exported images equal the source PCPI, byte for byte
    assert second == 0, f"a cycle with a warm pool opened {second} connections"


# --------------------------------------------------------------------------- one RemoteVolume, TLS
def _big_source(name: str) -> str:
    """A mem volume with qtrees A (six files of 400 kB: a stream of several DATA messages) and B."""
    url = f"mem://{name}-{os.getpid()}-{time.monotonic_ns()}"
    random_source(url, 7, 400_000, SNAP)
    vol = coalesce_mem.volume_for(url)
    vol.write_file("B/only-b", b"b" * 1000)
    vol.snapshot_delete(SNAP)
    vol.snapshot_create(SNAP)
    return url


def _open(url: str) -> Volume:
    return Volume.open(plugin_manager(remote_plugins()), url)


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
def test_one_connection_serves_diffs_and_describes_one_after_another(certs, monkeypatch, compression):
    """The server's per-request state (request ids, compression, the authorization of each
    request) lets one connection serve every stream request of a volume in turn."""
    from coalesce_remote import protocol as P

    if compression not in ("none", *P.COMPRESSIONS):
        pytest.skip(f"{compression} is not installed")
    svc = TLSService(certs)
    try:
        client_env(monkeypatch, certs, COALESCE_COMPRESSION=compression)
        local = _big_source("serial")
        v = _open(svc.expose(local))
        here = coalesce_mem.volume_for(local)
        paths = [("", True), ("f0", True), ("f5", True), ("nope", False)]
        for _ in range(2):
            for q in ("A", "B"):
                assert list(v.diff(q, None, SNAP)) == list(here.diff(q, None, SNAP))
            assert v.describe("A", SNAP, paths) == here.describe("A", SNAP, paths)
            assert list(v.describe_tree("B", SNAP, content=True)) == list(here.describe_tree("B", SNAP, content=True))
        assert v.handle.welcome["compression"] == (None if compression == "none" else compression)
        assert svc.service.stats["connections"] == 2  # the control connection and one for every stream
        assert v.handle.stats["connections"] == 2 and v.handle.stats["reused"] == 7
        assert v.handle.idle_sessions == 1
        v.close()
        assert v.handle.idle_sessions == 0
    finally:
        svc.stop()


def test_a_refused_request_closes_its_session_and_grants_nothing_to_the_next(certs, monkeypatch):
    """An ERROR ends a request uncleanly: its session is closed, not pooled; a diff of a qtree the
    identity may read does not authorize a describe of one it may not on the same connection."""
    from coalesce_remote import protocol as P

    svc = TLSService(certs)
    try:
        client_env(monkeypatch, certs, which="reader")  # qtree A only
        local = _big_source("refused")
        v = _open(svc.expose(local))
        assert list(v.diff("A", None, SNAP)) == list(coalesce_mem.volume_for(local).diff("A", None, SNAP))
        assert v.handle.idle_sessions == 1
        with pytest.raises(P.Refused, match="may not read qtree 'B'"):
            v.describe("B", SNAP, [("only-b", True)])
        assert v.handle.idle_sessions == 0  # the refused request's session was closed
        assert [d.kind for d in v.describe("A", SNAP, [("f1", False)])] == ["f"]
        assert svc.service.stats["connections"] == 3
        v.close()
    finally:
        svc.stop()


def test_an_abandoned_stream_is_not_pooled_and_the_next_request_reads_no_leftovers(tls_service):
    local = _big_source("abandoned")
    v = _open(tls_service.expose(local))
    want = list(coalesce_mem.volume_for(local).diff("A", None, SNAP))
    it = v.diff("A", None, SNAP)
    assert next(it) == want[0] and next(it) == want[1]  # Begin and one record: most of it unread
    it.close()
    assert v.handle.idle_sessions == 0
    # had the half-read session gone back to the pool, this request would read the old one's DATA
    assert list(v.diff("A", None, SNAP)) == want
    walk = v.describe_tree("A", SNAP, content=True)
    next(walk)
    walk.close()
    assert v.handle.idle_sessions == 0
    assert list(v.diff("A", None, SNAP)) == want
    assert v.handle.stats["connections"] == 1 + 3
    v.close()


def test_a_transfer_cut_mid_stream_resumes_on_a_new_session_and_only_that_one_is_pooled(tls_service):
    from net.netkit import FlakyProxy

    local = _big_source("cut")
    name = f"src-cut-{time.monotonic_ns()}"
    tls_service.expose(local, name=name)
    proxy = FlakyProxy("127.0.0.1", tls_service.port, cut_after=700_000, cuts=1)
    try:
        v = _open(f"tls://127.0.0.1:{proxy.port}/{name}")
        want = list(coalesce_mem.volume_for(local).diff("A", None, SNAP))
        assert list(v.diff("A", None, SNAP)) == want
        assert proxy.cut_count == 1 and v.handle.stats["resumes"] == 1
        assert v.handle.idle_sessions == 1
        assert list(v.diff("A", None, SNAP)) == want
        assert v.handle.stats["reused"] == 1 and v.handle.stats["resumes"] == 1
        v.close()
    finally:
        proxy.stop()


def test_a_pooled_session_whose_link_died_unnoticed_is_replaced_without_spending_a_retry(tls_service, monkeypatch):
    """The link of an idle session resets and the client does not see it before it sends (its
    hang-up check is made blind): the request that finds it dead opens a new connection at once."""
    from net.netkit import FlakyProxy

    from coalesce_remote import client as C

    local = _big_source("unnoticed")
    name = f"src-unnoticed-{time.monotonic_ns()}"
    tls_service.expose(local, name=name)
    proxy = FlakyProxy("127.0.0.1", tls_service.port)
    try:
        monkeypatch.setenv("COALESCE_RETRIES", "0")  # no retry budget at all
        v = _open(f"tls://127.0.0.1:{proxy.port}/{name}")
        want = list(coalesce_mem.volume_for(local).diff("A", None, SNAP))
        assert list(v.diff("A", None, SNAP)) == want
        paths = [("f2", True)]
        described = v.describe("A", SNAP, paths)
        monkeypatch.setattr(C.P.SocketChannel, "hung_up", lambda self, wait=0.0: False)
        proxy.drop_all()  # the pooled session's link (and the control connection's) is gone
        assert list(v.diff("A", None, SNAP)) == want
        proxy.drop_all()
        assert v.describe("A", SNAP, paths) == described
        assert v.handle.stats["resumes"] == 0 and v.handle.stats["connections"] == 1 + 3
        v.close()
    finally:
        proxy.stop()


# --------------------------------------------------------------------------- ssh: the server process killed
def _serve_pids(sshd: Any) -> set[int]:
    out = set()
    for pid in sshd.children():
        try:
            if b"coalesce_remote.serve" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.add(pid)
        except OSError:
            pass
    return out


def test_a_pooled_session_whose_server_was_killed_while_idle_is_replaced(ssh_env, tmp_path, monkeypatch):
    local = f"mem://{tmp_path}/ssh-pool.mem"
    random_source(local, 5, 200_000, SNAP)
    monkeypatch.setenv("COALESCE_RETRIES", "0")  # a replaced session spends no attempt
    v = _open(ssh_env.expose(local))
    control = _serve_pids(ssh_env)
    want = list(coalesce_mem.volume_for(local).diff("A", None, SNAP))
    assert list(v.diff("A", None, SNAP)) == want
    pooled = _serve_pids(ssh_env) - control
    assert len(pooled) == 1 and v.handle.idle_sessions == 1
    for pid in pooled:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _serve_pids(ssh_env) & pooled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(v.diff("A", None, SNAP)) == want
    assert v.handle.stats["resumes"] == 0 and v.handle.stats["connections"] == 3
    assert v.handle.idle_sessions == 1
    v.close()
