"""Mutual TLS 1.3 and per-client authorization of the source service.

No certificate, a certificate from another CA, an expired one, an identity
the server does not know, a client that only speaks TLS 1.2, and a valid
identity asking for a qtree, a PCPI or an operation it is not allowed: all
refused with a clear error, logged on the server, and nothing read.
"""

from __future__ import annotations

import logging
import socket
import ssl

import pytest
from net.netkit import client_env, remote_plugins

import coalesce_mem
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import BackendError
from coalesce_remote.client import TLSRefused
from coalesce_remote.protocol import PREAMBLE, Refused


@pytest.fixture
def served(tls_service):
    local = "mem://tlssec-src"
    coalesce_mem.forget(local)
    vol = coalesce_mem.volume_for(local)
    vol.write_file("A/a.txt", b"alpha")
    vol.write_file("B/secret.txt", b"bravo secret")
    vol.snapshot_create("co-g-src-000001")
    vol.snapshot_create("private-snapshot")
    url = tls_service.expose(local, name="src")
    yield tls_service, url
    coalesce_mem.forget(local)


def _pm():
    return plugin_manager(remote_plugins())


def _refusals(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "coalesce.serve" and r.levelno >= logging.WARNING]


def test_valid_client_reads(served):
    svc, url = served
    v = Volume.open(_pm(), url)
    assert v.snapshot_list() == ["co-g-src-000001"]  # only names of the groups it may use
    assert sorted(v.qtree_list(None)) == ["A", "B"]
    assert [type(r).__name__ for r in v.diff("A", None, "co-g-src-000001")][0] == "Begin"
    assert v.handle.welcome["identity"] == "backup1"
    v.close()


def test_no_client_certificate_is_refused(served, caplog):
    svc, _url = served
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(svc.certs.ca)
    with caplog.at_level(logging.INFO, logger="coalesce.serve"):
        raw = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            tls.sendall(PREAMBLE)
            assert tls.recv(100) == b""  # the server closed without a word of the protocol
            raise ConnectionError("closed")
        _wait(lambda: any("TLS handshake failed" in m for m in _refusals(caplog)))
    assert svc.recorder.calls == []


@pytest.mark.parametrize("which", ["other_ca", "expired"])
def test_bad_client_certificates_are_refused(served, which, monkeypatch, caplog):
    svc, url = served
    client_env(monkeypatch, svc.certs, which, COALESCE_RETRIES="0")
    with caplog.at_level(logging.INFO, logger="coalesce.serve"):
        with pytest.raises(TLSRefused, match="refused the TLS connection"):
            Volume.open(_pm(), url)
        _wait(lambda: any("TLS handshake failed" in m for m in _refusals(caplog)))
    text = " ".join(_refusals(caplog))
    assert (
        ("unknown ca" in text.lower() or "certificate verify failed" in text.lower())
        if which == "other_ca"
        else "expired" in text.lower()
    )
    assert svc.recorder.calls == []


def test_server_certificate_from_another_ca_is_refused_by_the_client(served, monkeypatch, tmp_path):
    svc, url = served
    from net.netkit import CA

    rogue = CA(tmp_path, "client-trusts-this-ca-only")
    monkeypatch.setenv("COALESCE_TLS_CA", rogue.path)
    with pytest.raises(TLSRefused, match="not trusted"):
        Volume.open(_pm(), url)


def test_tls12_only_client_is_refused(served):
    svc, _url = served
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(svc.certs.ca)
    ctx.load_cert_chain(*svc.certs.client)
    raw = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
    with pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    raw.close()


def test_unknown_identity_is_refused(served, monkeypatch, caplog):
    svc, url = served
    client_env(monkeypatch, svc.certs, "stranger")
    with caplog.at_level(logging.INFO, logger="coalesce.serve"):
        with pytest.raises(Refused, match="'stranger' is not configured"):
            Volume.open(_pm(), url)
    assert any("refused 'stranger'" in m for m in _refusals(caplog))
    assert svc.recorder.calls == []


def test_volume_not_granted_is_refused(served, monkeypatch):
    svc, _url = served
    with pytest.raises(Refused, match="may not read volume"):
        Volume.open(_pm(), f"tls://127.0.0.1:{svc.port}/no-such-volume")


def test_reader_may_only_read_its_qtree(served, monkeypatch, caplog):
    svc, url = served
    client_env(monkeypatch, svc.certs, "reader")
    v = Volume.open(_pm(), url)
    with caplog.at_level(logging.INFO, logger="coalesce.serve"):
        assert v.qtree_list(None) == ["A"]
        assert list(v.diff("A", None, "co-g-src-000001"))
        n_calls = len(svc.recorder.calls)
        with pytest.raises(Refused, match="may not read qtree 'B'"):
            list(v.diff("B", None, "co-g-src-000001"))
        with pytest.raises(Refused, match="may not read qtree 'B'"):
            v.fingerprint("B", None)
        with pytest.raises(Refused, match="may not take"):
            v.snapshot_create("co-g-src-000002")
        with pytest.raises(Refused, match="may not release"):
            v.snapshot_delete("co-g-src-000001")
        with pytest.raises(Refused, match="may not use PCPI 'private-snapshot'"):
            list(v.diff("A", None, "private-snapshot"))
        for hostile in ("..", "A/../B", "/etc"):
            with pytest.raises((Refused, BackendError, Exception)):
                list(v.diff(hostile, None, "co-g-src-000001"))
        # the connection survives refusals
        assert v.qtree_list(None) == ["A"]
    assert svc.recorder.calls[n_calls:] == []  # nothing was read or taken for the refused requests
    logged = _refusals(caplog)
    assert sum("refused 'reader'" in m for m in logged) >= 5
    assert "co-g-src-000002" not in coalesce_mem.volume_for("mem://tlssec-src").snapshot_list()
    v.close()


def test_take_and_release_limited_to_group_names(served):
    svc, url = served
    v = Volume.open(_pm(), url)
    assert v.snapshot_create("co-g-src-000007") == "co-g-src-000007"
    assert v.snapshot_delete("co-g-src-000007") is True
    with pytest.raises(Refused, match="may not use PCPI"):
        v.snapshot_create("anything-else")
    with pytest.raises(Refused, match="may not use PCPI"):
        v.snapshot_delete("private-snapshot")
    assert "private-snapshot" in coalesce_mem.volume_for("mem://tlssec-src").snapshot_list()
    v.close()


def _wait(cond, limit: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_client_cn_with_a_newline_cannot_forge_a_server_log_line(tmp_path, monkeypatch):
    """A CA-signed certificate whose CN holds a newline: the server's log names it quoted, on one line."""
    import attrs
    from net.netkit import CA, TLSService

    from coalesce_remote import serve

    ca = CA(tmp_path, "cn-ca")
    forged = "evil\n2026-01-01 00:00:00,000 coalesce-serve[1] INFO forged \x1b[2J"
    # CA-signed: only the client certificate's CN is hostile
    certs = attrs.evolve(_certs_of(ca), client=ca.issue(forged))
    log_file = tmp_path / "serve.log"
    handler = serve.log_handler(serve.ServerConfig(log=str(log_file)), stdio=False)
    serve.log.addHandler(handler)
    level = serve.log.level
    serve.log.setLevel(logging.INFO)
    svc = TLSService(certs)
    client_env(monkeypatch, certs)
    try:
        coalesce_mem.volume_for("mem://cn-src")
        with pytest.raises(Refused, match="is not configured"):
            Volume.open(_pm(), svc.expose("mem://cn-src"))
    finally:
        serve.log.removeHandler(handler)
        serve.log.setLevel(level)
        handler.close()
        svc.stop()
        coalesce_mem.forget("mem://cn-src")
    lines = log_file.read_text().splitlines()
    assert lines and all(" coalesce-serve[" in ln and ln[:4].isdigit() for ln in lines)
    assert not any(ln.startswith("2026-01-01") for ln in lines)
    (refused,) = [ln for ln in lines if "refused" in ln]
    assert "refused 'evil\\n2026-01-01 00:00:00,000 coalesce-serve[1] INFO forged \\x1b[2J' from 127.0.0.1:" in refused


def _certs_of(ca):
    from net.netkit import Certs

    server = ca.issue("source-server", server=True, ips=("127.0.0.1",))
    return Certs(
        ca=ca.path, server=server, client=server, reader=server, stranger=server, other_ca=server, expired=server
    )


def test_a_sources_own_tls_tables_override_the_process_settings(served, monkeypatch, tmp_path):
    """docs/config.md "Sources": the process-wide client settings name a certificate from another CA
    (refused, as above); the group's [[source]] names the good identity in [source.tls], and the agent
    replicates with it."""
    from coalesce_core.agent import Agent
    from coalesce_core.config import parse_config

    svc, url = served
    client_env(monkeypatch, svc.certs, "other_ca", COALESCE_RETRIES="0")
    cert, key = svc.certs.client
    dst = "mem://tlssec-dst"
    coalesce_mem.forget(dst)
    text = (
        f'[group]\nname = "own"\ndestination = "{dst}"\nmetadata = "{tmp_path}/meta"\n'
        f'[[source]]\nname = "web1"\nurl = "{url}"\n'
        f'[source.tls]\ncert = "{cert}"\nkey = "{key}"\nca = "{svc.certs.ca}"\n'
        '[[replica]]\nname = "A"\n'
    )
    cfg = parse_config(text, str(tmp_path / "coalesce.toml"))
    with pytest.raises(TLSRefused):  # the process-wide identity alone
        Volume.open(_pm(), url)
    Agent.init(cfg, pm=_pm()).close()
    with Agent.open(cfg, pm=_pm()) as agent:
        assert agent.run_once()["failures"] == 0
        r = agent.state.replicas["A"]
        assert r.state == "stable" and r.exported is not None
        assert agent.dest.fingerprint("A", r.exported) == agent.source.fingerprint("A", r.source_point)
    coalesce_mem.forget(dst)
