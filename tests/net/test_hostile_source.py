"""A source service that answers a diff with another qtree's stream (a hostile or misconfigured
server behind TLS): the update fails at the stream's Begin, before any record is applied, and
takes the rollback path (coalesce_core.stream.requested; local sources in
tests/core/test_hostile_source.py, a fake server's other base or target in test_protocol.py)."""

from __future__ import annotations

import os

from forger import ForgeBegin
from net.netkit import LOCAL_OF, RemoteHarness, TLSService, client_env

import coalesce_mem
import coalesce_remote


def test_a_tls_server_that_sends_another_qtree_fails_the_update(certs, monkeypatch, group_config):
    local = f"mem://hostile-tls-{os.getpid()}"
    coalesce_mem.forget(local)
    coalesce_mem.volume_for(local)
    forge = ForgeBegin(volume="hostile-tls", qtree="B")
    svc = TLSService(certs, server_plugins=(forge,))  # the forger sits in the SERVER's plugin manager
    client_env(monkeypatch, certs)
    try:
        remote = svc.expose(local)
        LOCAL_OF[remote] = local
        seen = ForgeBegin(volume="tls://")  # forges nothing: counts what the client passed on
        seen.armed = True
        h = RemoteHarness(group_config(source_url=local, replicas=("A",)).with_source(remote), plugins=[seen])
        h.writer.write("A", "a/f", b"old")
        h.writer.write("B", "secret", b"B's data")
        h.cycle()
        before = h.agent.state.replicas["A"]
        h.writer.write("A", "a/f", b"new")
        forge.armed = True
        assert h.cycle()["failures"] == 1
        assert len(forge.pulled) == 1 and seen.pulled[-1] == 0  # the client passed on nothing, not even the Begin
        (failure,) = h.agent.failures
        assert "UnrequestedStream: the source sent the stream of qtree 'B'" in failure["error"]
        assert f"the transfer asked for qtree 'A' from '{before.source_point}'" in failure["error"]
        after = h.agent.state.replicas["A"]
        assert after.state == "stable" and after.source_point == before.source_point
        assert h.agent.dest.fingerprint("A", after.exported) == h.local_source.fingerprint("A", before.source_point)
        h.assert_invariants()
        forge.armed = False
        assert h.cycle()["failures"] == 0
        r = h.agent.state.replicas["A"]
        assert h.agent.dest.fingerprint("A", r.exported) == h.local_source.fingerprint("A", r.source_point)
    finally:
        coalesce_remote.close_all()
        svc.stop()
        coalesce_mem.forget(local)
