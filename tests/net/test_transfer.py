"""Resume after a dropped connection, compression, bandwidth limit, dead-peer timeouts."""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import time

import pytest
from net.netkit import LOCAL_OF, FlakyProxy, RemoteHarness, remote_plugins

import coalesce_mem
from coalesce_core.backend.faults import Rule  # noqa: F401
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.testing.workload import fill

SNAP = "co-g-src-000001"


def _source(name: str, files: int = 12, size: int = 300_000, compressible: bool = False) -> str:
    url = f"mem://{name}-{os.getpid()}"
    coalesce_mem.forget(url)
    vol = coalesce_mem.volume_for(url)
    rng = random.Random(1)
    for i in range(files):
        data = (b"coalesce " * (size // 9 + 1))[:size] if compressible else rng.randbytes(size)
        vol.write_file(f"A/d{i % 3}/f{i}", data)
    vol.write_file(
        "A/big", b"z" * 2_500_000 if compressible else rng.randbytes(2_500_000)
    )  # three Write records of up to 1 MiB
    vol.snapshot_create(SNAP)
    return url


def _dest_fingerprint(records) -> str:
    url = f"mem://dst-{time.monotonic_ns()}"
    d = coalesce_mem.volume_for(url)
    d.apply("A", records, False)
    fp = d.fingerprint("A", None)
    coalesce_mem.forget(url)
    return fp


def test_resume_gives_exactly_the_uninterrupted_stream(tls_service):
    local = _source("resume")
    name = "src-resume"
    tls_service.expose(local, name=name)
    proxy = FlakyProxy("127.0.0.1", tls_service.port, cut_after=700_000, cuts=3)
    try:
        v = Volume.open(plugin_manager(remote_plugins()), f"tls://127.0.0.1:{proxy.port}/{name}")
        got = list(v.diff("A", None, SNAP))
        assert proxy.cut_count == 3
        assert v.handle.stats["resumes"] == 3
        want = list(coalesce_mem.volume_for(local).diff("A", None, SNAP))
        assert got == want  # record for record
        assert _dest_fingerprint(iter(got)) == coalesce_mem.volume_for(local).fingerprint("A", SNAP)
        v.close()
    finally:
        proxy.stop()


def _proxied_harness(tls_service, group_config, proxy_holder, **kw):
    local = f"mem://src-agent-{time.monotonic_ns()}"
    coalesce_mem.volume_for(local)
    name = f"src-agent-{len(LOCAL_OF)}"
    tls_service.expose(local, name=name)
    proxy = FlakyProxy("127.0.0.1", tls_service.port)
    proxy_holder.append(proxy)
    remote = f"tls://127.0.0.1:{proxy.port}/{name}"
    LOCAL_OF[remote] = local

    cfg = group_config(source_url=local, **kw).with_source(remote)
    h = RemoteHarness(cfg)
    fill(h.writer, ["A", "B"], files=4, size=400_000)
    return h, proxy


def test_agent_update_resumes_instead_of_failing(tls_service, group_config):
    proxies: list = []
    try:
        h, proxy = _proxied_harness(tls_service, group_config, proxies, replicas=("A", "B"))
        h.cycle()
        for q in "AB":
            h.writer.write(q, "new", random.Random(q).randbytes(1_500_000))
        proxy.cut_after, proxy.cuts = 500_000, 2
        report = h.cycle()
        assert proxy.cut_count == 2
        assert report["failures"] == 0  # resumed, not rolled back
        assert set(h.states().values()) == {"stable"}
        h.assert_invariants()  # I3: the exported images equal the source PCPI, byte for byte
    finally:
        for p in proxies:
            p.stop()


def test_after_a_restart_an_update_resumes_and_fetches_only_the_rest_I3(tls_service, group_config, caplog):
    """Resume across a crash of the agent (docs/network.md): the records that had arrived are
    replayed from the spool and the server is asked for the stream from the next one."""
    proxies: list = []
    try:
        h, proxy = _proxied_harness(tls_service, group_config, proxies, replicas=("A", "B"))
        h.cycle()
        rng = random.Random(9)
        for i in range(30):
            h.writer.write("A", f"new/f{i}", rng.randbytes(100_000))
        cycle = h.agent.state.cycle
        with caplog.at_level(logging.INFO, logger="coalesce.spool"):
            assert h.crash("mid_apply:50", h.cycle)
        replayed = [int(n) for n in re.findall(r"replica A: (\d+) change records replayed", caplog.text)]
        assert replayed and replayed[0] > 0
        received = h.agent.source.handle.stats["records"]  # the reopened agent's connection only
        a = h.agent.state.replicas["A"]
        assert received + replayed[0] == a.records  # nothing fetched twice, nothing missing
        assert ("A", "resume_update", "done", "update") in h.recorder.transitions
        assert h.agent.state.cycle == cycle + 1 and h.agent.state.phase == "idle"
        assert set(h.states().values()) == {"stable"}
        h.assert_invariants()  # I3: byte for byte the image of the source PCPI
    finally:
        for p in proxies:
            p.stop()


def test_repeated_drops_fail_the_update_and_take_the_rollback_path(tls_service, group_config, monkeypatch):
    monkeypatch.setenv("COALESCE_RETRIES", "2")
    proxies: list = []
    try:
        h, proxy = _proxied_harness(tls_service, group_config, proxies, replicas=("A", "B"))
        h.cycle()
        before = h.exported_fingerprints()
        h.writer.write("A", "new", random.Random(5).randbytes(1_500_000))
        proxy.cut_after, proxy.cuts = 300_000, None  # every transfer connection dies
        report = h.cycle()
        trans = [t for t in h.recorder.transitions if t[0] == "A"]
        assert ("A", "update_failed", "update", "rollback") in trans
        assert report["failures"] >= 1
        assert h.exported_fingerprints()["A"] == before["A"]  # nothing partial is exported
        h.assert_invariants()
        proxy.cuts = 0  # the link heals: the next cycle brings A up to date
        proxy.cut_after = None
        h.cycle()
        assert h.exported_fingerprints()["A"] != before["A"]
        h.assert_invariants()
    finally:
        for p in proxies:
            p.stop()


def test_compression_is_negotiated_and_shrinks_compressible_data(tls_service, monkeypatch):
    local = _source("comp", compressible=True)
    tls_service.expose(local, name="src-comp")
    url = f"tls://127.0.0.1:{tls_service.port}/src-comp"
    out = {}
    for mode in ("none", "auto", "zstd", "zlib"):
        monkeypatch.setenv("COALESCE_COMPRESSION", mode)
        v = Volume.open(plugin_manager(remote_plugins()), url)
        recs = list(v.diff("A", None, SNAP))
        out[mode] = (v.handle.welcome["compression"], v.handle.stats["bytes_in"], recs)
        v.close()
    assert out["none"][0] is None
    assert out["auto"][0] == "zstd"  # zstd is preferred when both sides have it (a pinned dependency)
    assert (out["zstd"][0], out["zlib"][0]) == ("zstd", "zlib")
    for mode in ("auto", "zstd", "zlib"):
        assert out[mode][2] == out["none"][2], mode
        assert out[mode][1] * 5 < out["none"][1], mode


def test_bandwidth_limit(tls_service, monkeypatch):
    local = _source("bw", files=1, size=100)
    tls_service.expose(local, name="src-bw")
    monkeypatch.setenv("COALESCE_BANDWIDTH", "1MiB/s")
    monkeypatch.setenv("COALESCE_COMPRESSION", "none")
    v = Volume.open(plugin_manager(remote_plugins()), f"tls://127.0.0.1:{tls_service.port}/src-bw")
    assert v.handle.welcome["bandwidth"] == 1024 * 1024
    t0 = time.monotonic()
    list(v.diff("A", None, SNAP))
    took = time.monotonic() - t0
    assert 1.8 < took < 6, took  # 2.5 MB at 1 MiB/s (one burst of 0.1 s is free)
    v.close()


def test_a_dead_peer_is_noticed_within_the_timeout(tls_service, monkeypatch):
    """A server that accepts and then says nothing: the client gives up after `timeout` x attempts."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    monkeypatch.setenv("COALESCE_TIMEOUT", "1")
    monkeypatch.setenv("COALESCE_RETRIES", "1")
    t0 = time.monotonic()
    from coalesce_core.errors import BackendError

    with pytest.raises(BackendError, match="failed after 2 attempts"):
        Volume.open(plugin_manager(remote_plugins()), f"tls://127.0.0.1:{port}/x")
    assert time.monotonic() - t0 < 5
    silent.close()


def test_server_timeout_drops_a_stalled_client(tls_service):
    """The server side notices a client that stopped reading: its send times out, the thread ends."""
    import json

    from net.netkit import serve_pair

    from coalesce_remote import protocol as P

    local = _source("stall", files=2, size=100)
    tls_service.config.volumes["stall"] = local
    svc = tls_service.service
    object.__setattr__(svc.config, "timeout", 1.0)
    try:
        sock, t = serve_pair(svc, timeout=1.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hello = {
            "protocol": P.PROTOCOL_VERSION,
            "volume": "stall",
            "capabilities": [],
            "client": "t",
            "bandwidth": None,
        }
        req = {"op": "diff", "args": {"qtree": "A", "base": None, "target": SNAP}}
        sock.sendall(
            P.PREAMBLE
            + P.encode_message(P.HELLO, 0, json.dumps(hello).encode())
            + P.encode_message(P.REQUEST, 1, json.dumps(req).encode())
        )
        t.join(10)  # we never read: the server gives up
        assert not t.is_alive()
        sock.close()
    finally:
        object.__setattr__(svc.config, "timeout", 10.0)


class _SlowDiff:
    """Server-side plugin: the backend's diff thinks for a while before its first record."""

    from coalesce_core.backend.hookspecs import hookimpl as _h

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    @_h(wrapper=True)
    def coalesce_diff(self, volume, qtree, base, target):
        result = yield

        def slow():
            time.sleep(self.seconds)
            yield from result

        return slow()


def test_server_keepalives_during_a_slow_diff(certs, monkeypatch):
    """The client's 1 s dead-peer timeout does not fire while the server's backend works for 2.5 s:
    the server sends keep-alive messages every 0.3 s."""
    from net.netkit import TLSService, client_env

    svc = TLSService(certs, server_plugins=(_SlowDiff(2.5),), keepalive=0.3)
    try:
        local = _source("slow", files=1, size=100)
        url = svc.expose(local, name="src-slow")
        client_env(monkeypatch, certs, COALESCE_TIMEOUT="1", COALESCE_RETRIES="0")
        v = Volume.open(plugin_manager(remote_plugins()), url)
        got = list(v.diff("A", None, SNAP))
        assert got == list(coalesce_mem.volume_for(local).diff("A", None, SNAP))
        assert v.handle.stats["resumes"] == 0
        v.close()
    finally:
        svc.stop()


def test_a_control_connection_that_died_while_idle_is_reopened_without_spending_a_retry(tls_service, monkeypatch):
    local = _source("idle", files=1, size=100)
    tls_service.expose(local, name="src-idle")
    proxy = FlakyProxy("127.0.0.1", tls_service.port)
    try:
        monkeypatch.setenv("COALESCE_RETRIES", "0")  # no retry budget at all
        v = Volume.open(plugin_manager(remote_plugins()), f"tls://127.0.0.1:{proxy.port}/src-idle")
        before = v.snapshot_list()
        proxy.drop_all()  # the idle control connection is gone; the client does not know yet
        assert v.snapshot_list() == before
        assert v.handle.stats["connections"] == 2
        proxy.drop_all()
        proxy.stop()  # now the server is unreachable: the one free reconnect fails, and that is an error
        from coalesce_core.errors import BackendError

        with pytest.raises(BackendError, match="failed after 1 attempts"):
            v.snapshot_list()
        v.close()
    finally:
        proxy.stop()
