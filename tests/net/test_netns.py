"""Faults on a real link between network namespaces the test creates.

A veth pair joins this test's namespace (10.213.0.1) to a namespace made by
the test (10.213.0.2), where `coalesce serve --listen` runs as a separate
process.  tc netem adds delay, loss and a rate limit; `ip link` takes the
link down mid-transfer and brings it back: the transfer resumes.  The
namespace, the veth pair and the server are removed even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from net.netkit import client_env, random_source, remote_plugins, write_serve_config

import coalesce_mem
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume

SNAP = "co-g-src-000001"
HOST_IP, NS_IP = "10.213.0.1", "10.213.0.2"


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


@pytest.fixture
def link(certs, tmp_path, monkeypatch):
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.fail("the netns tests need root and iproute2 (ip, tc)")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"cotest{tag}", f"coh{tag}", f"con{tag}"
    made: list[str] = []
    proc = None
    try:
        _ip("ip", "netns", "add", ns)
        made.append("ns")
        _ip("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        made.append("veth")
        _ip("ip", "link", "set", ns_if, "netns", ns)
        _ip("ip", "addr", "add", f"{HOST_IP}/30", "dev", host_if)
        _ip("ip", "link", "set", host_if, "up")
        # While the link is down, packets for the test subnet must go nowhere (never the default route).
        _ip("ip", "route", "add", "blackhole", "10.213.0.0/30", "metric", "32000")
        made.append("route")
        _ip("ip", "addr", "add", f"{NS_IP}/30", "dev", ns_if, ns=ns)
        _ip("ip", "link", "set", ns_if, "up", ns=ns)
        _ip("ip", "link", "set", "lo", "up", ns=ns)
        local = f"mem://{tmp_path}/ns-src.mem"
        random_source(local, 9, 500_000, SNAP)
        cfg = write_serve_config(
            tmp_path / "serve.toml",
            certs.server,
            certs.ca,
            {"src": local},
            timeout=3,
            keepalive=2,
            listen=f"{NS_IP}:7450",
        )
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "coalesce_remote.serve",
                "--listen",
                "--config",
                str(cfg),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection((NS_IP, 7450), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.1)
        client_env(monkeypatch, certs)
        yield {
            "ns": ns,
            "host_if": host_if,
            "ns_if": ns_if,
            "local": local,
            "url": f"tls://{NS_IP}:7450/src",
            "log": tmp_path / "serve.log",
        }
    finally:
        if proc is not None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if "route" in made:
            _ip("ip", "route", "del", "blackhole", "10.213.0.0/30", "metric", "32000", check=False)
        if "veth" in made:
            _ip("ip", "link", "del", host_if, check=False)
        if "ns" in made:
            _ip("ip", "netns", "del", ns, check=False)


def _shape(link, netem: list[str], rate: str) -> bool:
    """netem delay/loss/rate on both ends; where the kernel has no sch_netem, a tbf rate limit only.
    Returns True if netem was available."""
    for dev, ns in ((link["host_if"], None), (link["ns_if"], link["ns"])):
        r = _ip("tc", "qdisc", "replace", "dev", dev, "root", "netem", *netem, "rate", rate, ns=ns, check=False)
        if r.returncode != 0:
            _ip(
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "64kb",
                "latency",
                "400ms",
                ns=ns,
            )
    return r.returncode == 0


def _want(link):
    return list(coalesce_mem.volume_for(link["local"]).diff("A", None, SNAP))


def test_transfer_over_delay_loss_and_rate_limit(link):
    _shape(link, ["delay", "10ms", "2ms", "loss", "1%"], "100mbit")
    t0 = time.monotonic()
    v = Volume.open(plugin_manager(remote_plugins()), link["url"])
    got = list(v.diff("A", None, SNAP))
    took = time.monotonic() - t0
    assert got == _want(link)
    assert took > 3_000_000 * 8 / 100e6  # the rate limit holds
    v.close()


def _slow_client(link, monkeypatch, **settings: str) -> Volume:
    """The served volume, opened by a client limited to 1 MiB/s (a transfer that lasts long enough to cut
    the link under it) with the client ``settings`` (COALESCE_<NAME>, docs/network.md)."""
    monkeypatch.setenv("COALESCE_BANDWIDTH", "1MiB/s")
    for name, value in settings.items():
        monkeypatch.setenv(f"COALESCE_{name}", value)
    return Volume.open(plugin_manager(remote_plugins()), link["url"])


def test_link_down_mid_transfer_then_up_resumes(link, monkeypatch):
    v = _slow_client(link, monkeypatch, TIMEOUT="1.5", RETRIES="8", RETRY_DELAY="0.3", COMPRESSION="none")
    got, err = [], []

    def run():
        try:
            got.extend(v.diff("A", None, SNAP))
        except Exception as exc:
            err.append(exc)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    _ip("ip", "link", "set", link["host_if"], "down")
    time.sleep(3.0)
    _ip("ip", "link", "set", link["host_if"], "up")
    t.join(90)
    assert not t.is_alive() and not err, err
    assert v.handle.stats["resumes"] >= 1
    assert got == _want(link)
    v.close()


def test_link_that_stays_down_fails_the_transfer_in_bounded_time(link, monkeypatch):
    from coalesce_core.errors import BackendError

    v = _slow_client(link, monkeypatch, TIMEOUT="1", RETRIES="2", RETRY_DELAY="0.1")
    it = v.diff("A", None, SNAP)
    next(it)
    _ip("ip", "link", "set", link["host_if"], "down")
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="failed after"):
        for _ in it:
            pass
    assert time.monotonic() - t0 < 15
    _ip("ip", "link", "set", link["host_if"], "up")
