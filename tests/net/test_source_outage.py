"""A remote source whose `coalesce serve` stops (docs/operations.md, "Recovery from each failure"):
the read verbs and `break` need only the destination, `run --once` ends its cycle with exit 4,
every replica still exporting its image, and the group catches up when the service is back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from net.netkit import TLSService

import coalesce_remote
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.testing.workload import SourceWriter, fill

EXE = [sys.executable, "-m", "coalesce_core.ui.cli"]


def _run(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COALESCE_CRASH_AT"}
    return subprocess.run([*EXE, "--config", str(cfg), *args], capture_output=True, text=True, env=env, timeout=120)


def _config(cfg: Path, url: str, tmp_path: Path) -> None:
    cfg.write_text(
        f'[group]\nname = "far"\nsource = "{url}"\ndestination = "mem://{tmp_path}/dst.vol"\n'
        f'metadata = "{tmp_path}/meta"\n[[replica]]\nname = "A"\n[[replica]]\nname = "B"\n'
    )


def test_a_stopped_source_service_never_wedges_the_group_I3(tls_service, certs, tmp_path):
    local = f"mem://outage-{os.getpid()}-{time.monotonic_ns()}"
    writer = SourceWriter(Volume.open(plugin_manager(), local, create=True))
    fill(writer, ["A", "B"])
    cfg = tmp_path / "coalesce.toml"
    _config(cfg, tls_service.expose(local, name="far"), tmp_path)
    assert _run(cfg, "init").returncode == 0
    assert _run(cfg, "run", "--once", "-q").returncode == 0
    before = json.loads(_run(cfg, "status", "--json").stdout)
    writer.write("A", "new", b"n" * 1000)
    tls_service.stop()  # `coalesce serve` stops
    coalesce_remote.close_all()
    for verb in (["status"], ["history"], ["check"], ["graph"]):
        p = _run(cfg, *verb)
        assert p.returncode == 0, (verb, p.stdout, p.stderr)
    p = _run(cfg, "run", "--once", "-q")
    assert p.returncode == 4, p.stdout + p.stderr
    assert "error: the source tls://" in p.stderr and "hint: the cycle ended without transfers" in p.stderr
    after = json.loads(_run(cfg, "status", "--json").stdout)
    assert after["phase"] == "idle"
    for was, now in zip(before["replicas"], after["replicas"]):
        assert (now["state"], now["exported_pcpi"]) == (was["state"], was["exported_pcpi"])
        assert "source unavailable" in now["last_error"]
    assert _run(cfg, "break", "B").returncode == 0
    assert _run(cfg, "resync", "B").returncode == 0
    back = TLSService(certs)  # the service is back (on another port: the config follows it)
    try:
        _config(cfg, back.expose(local, name="far"), tmp_path)
        assert _run(cfg, "run", "--once", "-q").returncode in (0, 3)  # B rejoins at this jump-ahead
        p = _run(cfg, "run", "--once", "-q")
        assert p.returncode == 0, p.stdout + p.stderr
        doc = json.loads(_run(cfg, "status", "--json").stdout)
        assert {r["state"] for r in doc["replicas"]} == {"stable"}
        points = {r["name"]: r["source_point"] for r in doc["replicas"]}
        assert points["A"] > before["replicas"][0]["source_point"]  # past the write made during the outage
        assert _run(cfg, "verify", "--full").returncode == 0  # every export equals its source PCPI
    finally:
        coalesce_remote.close_all()
        back.stop()
