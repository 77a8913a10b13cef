"""SSH transport specifics: a real sshd, a forced command, the server killed mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from net.netkit import random_source, remote_plugins

import coalesce_mem
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import BackendError

SNAP = "co-g-src-000001"


@pytest.fixture
def ssh_source(ssh_env, tmp_path):
    local = f"mem://{tmp_path}/ssh-src.mem"
    random_source(local, 3, 400_000, SNAP)
    return ssh_env, local, ssh_env.expose(local)


def test_forced_command_ignores_what_the_client_asks_to_run(ssh_source, monkeypatch, tmp_path):
    sshd, local, url = ssh_source
    marker = tmp_path / "pwned"
    monkeypatch.setenv("COALESCE_SSH_REMOTE_COMMAND", f"touch {marker}; coalesce serve --stdio")
    v = Volume.open(plugin_manager(remote_plugins()), url)
    assert v.snapshot_list() == [SNAP]
    assert v.handle.welcome["identity"] == "backup1"  # fixed by the forced command, not by the client
    v.close()
    r = subprocess.run(
        sshd.ssh.split() + ["-o", "BatchMode=yes", "-p", str(sshd.port), "root@127.0.0.1", f"touch {marker}"],
        capture_output=True,
        timeout=20,
    )
    assert not marker.exists()
    assert r.stdout.startswith(b"COALPROT")  # whatever is asked, only the service answers


def test_a_key_that_is_not_authorized_is_refused(ssh_source, monkeypatch, tmp_path):
    sshd, local, url = ssh_source
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    monkeypatch.setenv("COALESCE_SSH", sshd.ssh.replace(str(sshd.d / "client_key"), str(tmp_path / "other")))
    monkeypatch.setenv("COALESCE_RETRIES", "0")
    with pytest.raises(BackendError, match="Permission denied"):
        Volume.open(plugin_manager(remote_plugins()), url)


def _serve_pids(sshd) -> list[int]:
    out = []
    for pid in sshd.children():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"coalesce_remote.serve" in cmd:
            out.append(pid)
    return out


def test_server_killed_mid_stream_resumes(ssh_source, monkeypatch):
    sshd, local, url = ssh_source
    monkeypatch.setenv("COALESCE_BANDWIDTH", "1MiB/s")  # slow enough to kill it mid-stream
    monkeypatch.setenv("COALESCE_COMPRESSION", "none")
    v = Volume.open(plugin_manager(remote_plugins()), url)
    before = set(_serve_pids(sshd))
    got: list = []
    err: list = []

    def run():
        try:
            got.extend(v.diff("A", None, SNAP))
        except Exception as exc:  # pragma: no cover - reported below
            err.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 20
    victims: list[int] = []
    while time.monotonic() < deadline and not victims:
        victims = [p for p in _serve_pids(sshd) if p not in before]
        time.sleep(0.1)
    assert victims, "the stream's server process never appeared"
    time.sleep(0.8)
    killed = 0
    for p in [p for p in _serve_pids(sshd) if p not in before]:  # listed again: a short-lived one may be gone
        try:
            os.kill(p, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    assert killed, "no server process was left to kill mid-stream"
    t.join(60)
    assert not t.is_alive() and not err, err
    assert v.handle.stats["resumes"] >= 1
    assert got == list(coalesce_mem.volume_for(local).diff("A", None, SNAP))
    v.close()
