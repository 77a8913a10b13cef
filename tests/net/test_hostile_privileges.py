"""A compromised source host behind TLS that planted a setuid-root binary with a file capability in
a qtree it serves: under the default ``privileges = "strip"`` the export has neither, the check
before done passes and the replica equals the source as stripped; under "keep" both arrive
(coalesce_core.stream.privileges; local sources in tests/core/test_privileges.py)."""

from __future__ import annotations

import os

import pytest
from net.netkit import LOCAL_OF, RemoteHarness, TLSService, client_env

import coalesce_mem
import coalesce_remote
from coalesce_core import verifier
from coalesce_core.stream import privileges
from coalesce_core.stream import records as R
from coalesce_core.verify import xattr_digest

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep


@pytest.mark.parametrize("policy", ["strip", "keep"])
def test_a_setuid_binary_planted_by_a_tls_source_is_stripped(certs, monkeypatch, group_config, policy):
    local = f"mem://hostile-priv-{policy}-{os.getpid()}"
    coalesce_mem.forget(local)
    coalesce_mem.volume_for(local)
    svc = TLSService(certs)
    client_env(monkeypatch, certs)
    try:
        remote = svc.expose(local)
        LOCAL_OF[remote] = local
        cfg = group_config(source_url=local, replicas=("A",), privileges=None if policy == "strip" else policy)
        h = RemoteHarness(cfg.with_source(remote))
        h.writer.write("A", "README", b"hello")
        assert h.cycle()["failures"] == 0
        h.writer.write("A", "usr/bin/helper", b"\x7fELF planted", mode=0o4755)
        plant = [
            R.SetAttr(path="usr/bin/helper", mode=0o4755, uid=0, gid=0),
            R.SetXattr(path="usr/bin/helper", name="security.capability", value=CAP),
        ]
        h.local_source.apply("A", R.framed("A", None, "plant", plant), use_purgatory=False)
        assert h.cycle()["failures"] == 0, h.agent.failures
        r = h.agent.state.replicas["A"]
        (d,) = h.agent.dest.describe("A", r.exported, [("usr/bin/helper", True)])
        keep = policy == "keep"
        assert (d.mode, d.uid) == ((0o4755 if keep else 0o755), 0)
        assert d.privileged_xattrs == (xattr_digest({"security.capability": CAP}) if keep else None)
        h.assert_invariants()
        view = privileges.view(h.agent.source, h.agent.config.privileges)
        (row,) = verifier.verify_replicas(view, h.agent.dest, h.agent.state, ["A"], full=True)
        assert row["result"] == "ok", row
    finally:
        coalesce_remote.close_all()
        svc.stop()
        coalesce_mem.forget(local)
