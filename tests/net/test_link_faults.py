"""Delay, loss and a rate limit on a link between namespaces the test makes (tests/net/linkemu.py).

This kernel has no sch_netem, so the link emulator is, unless the kernel has
netem, a userspace delay line in a router namespace between this test's
namespace and a namespace B where `coalesce serve --listen` and a test sshd
(forced command `coalesce serve --stdio`) run.  The emulator is tested on its
own counters (it really delays: a TCP connect takes at least the round trip;
it really drops: what it counts as dropped never arrives; the tbf rate
limit holds), and a coalesce update over TLS and over SSH through a link
with delay, loss and a rate limit must leave exactly the source image.
No timing assertion on coalesce itself.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time

import pytest
from net.linkemu import Link
from net.netkit import LOCAL_OF, SSHD, RemoteHarness, client_env, serve_in_b, write_serve_config

import coalesce_mem

TLS_PORT, SSH_PORT, SINK_PORT = 7450, 2222, 5001


@pytest.fixture(scope="module")
def link(certs, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the link-fault tests need root (ip netns, tc, /dev/net/tun)")
    d = tmp_path_factory.mktemp("linkfaults")
    local = f"mem://{d}/src.mem"
    coalesce_mem.volume_for(local)  # the file, so that the servers can open it
    write_serve_config(d / "serve.toml", certs.server, certs.ca, {"src": local}, timeout=10, keepalive=5)
    lk = Link(mtu=1500, log=str(d / "linkemu.log"))
    sshd = None
    try:
        lk.start()
        serve_in_b(lk, d / "serve.toml", TLS_PORT, within=15)
        (d / "sshd").mkdir()
        sshd = SSHD(d / "sshd", host=lk.b_ip, port=SSH_PORT, netns=lk.ns_b)
        yield {"link": lk, "sshd": sshd, "local": local, "dir": d}
    finally:
        if sshd is not None:
            sshd.stop()
        problems = lk.close()
        assert not problems, problems


@pytest.fixture
def shaped(link):
    yield link["link"]
    link["link"].shape()  # the next test starts from a clean link


def _connect_rtt(host: str, port: int, n: int = 5) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        socket.create_connection((host, port), timeout=5).close()
        best = min(best, time.perf_counter() - t0)
    return best


def test_the_emulator_really_delays(shaped):
    lk = shaped
    assert _connect_rtt(lk.b_ip, TLS_PORT) < 0.015  # unshaped: well under a round trip of the shaped link
    lk.shape(delay_ms=10)  # one way: a 20 ms round trip
    before = lk.stats()
    rtt = _connect_rtt(lk.b_ip, TLS_PORT)  # SYN -> SYN-ACK: one round trip
    after = lk.stats()
    assert rtt >= 0.020, rtt
    if lk.mode == "tun":
        for d in ("a_to_b", "b_to_a"):
            assert after[d]["delayed"] > before[d]["delayed"], after


def test_the_emulator_really_drops(shaped):
    """2 % loss: what the emulator counts as dropped is exactly what never arrives."""
    lk = shaped
    sink = lk.popen_b(
        [
            sys.executable,
            "-c",
            (
                "import socket,sys\n"
                f"s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('{lk.b_ip}',{SINK_PORT}));s.settimeout(1.5)\n"
                "s.setsockopt(socket.SOL_SOCKET,33,16<<20)\n"  # SO_RCVBUFFORCE: room for every datagram
                "sys.stdout.write('up\\n');sys.stdout.flush();n=0\n"
                "while True:\n"
                "    try:s.recv(2048)\n"
                "    except socket.timeout:break\n"
                "    n+=1\n"
                "print(n)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout.readline().strip() == "up"
    lk.shape(loss=0.02, seed=4)
    before = lk.stats()
    sent = 3000
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(sent):
            s.sendto(i.to_bytes(4, "big") * 100, (lk.b_ip, SINK_PORT))
            if i % 100 == 99:
                time.sleep(0.002)  # no socket-buffer overflow anywhere: loss only where the emulator drops
    out, _ = sink.communicate(timeout=20)
    after = lk.stats()
    received = int(out.strip())
    key = "a_to_b"
    dropped = after[key]["dropped"] - before[key]["dropped"]
    seen = after[key]["packets"] - before[key]["packets"]
    assert seen == sent, (seen, after)
    assert 0.005 * sent < dropped < 0.05 * sent, dropped  # 2 % of 3000 = 60 expected
    assert received == sent - dropped


def test_the_tbf_rate_limit_holds(shaped):
    lk = shaped
    lk.shape(rate="8mbit")
    size = 1_500_000
    src = lk.popen_b(
        [
            sys.executable,
            "-c",
            (
                "import socket\n"
                f"s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{lk.b_ip}',{SINK_PORT}))\n"
                f"s.listen(1);c,_=s.accept();c.sendall(b'x'*{size});c.close()\n"
            ),
        ]
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            c = socket.create_connection((lk.b_ip, SINK_PORT), timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    t0, n = time.perf_counter(), 0
    with c:
        while chunk := c.recv(1 << 16):
            n += len(chunk)
    took = time.perf_counter() - t0
    src.wait(10)
    assert n == size
    assert took > 0.8 * size * 8 / 8e6, took  # 1.5 s at 8 Mbit/s
    tbf = lk.stats()["qdiscs"]["b_to_a"]
    assert tbf.get("tbf", {}).get("packets", 0) > size // 1500, tbf


@pytest.mark.parametrize("kind", ["tls", "ssh"])
def test_update_over_a_slow_lossy_link_leaves_exactly_the_source_image(
    kind, link, shaped, certs, group_config, monkeypatch
):
    lk = shaped
    client_env(
        monkeypatch,
        certs,
        COALESCE_TLS_SERVER_NAME="localhost",
        COALESCE_TIMEOUT="20",
        COALESCE_RETRIES="6",
        COALESCE_RETRY_DELAY="0.2",
    )
    if kind == "tls":
        remote = f"tls://{lk.b_ip}:{TLS_PORT}/src"
    else:
        monkeypatch.setenv("COALESCE_SSH", link["sshd"].ssh)
        remote = link["sshd"].expose(link["local"])
    LOCAL_OF[remote] = link["local"]
    qtree = f"q{kind}"
    cfg = group_config(source_url=link["local"], replicas=(qtree,), name=f"g{kind}").with_source(remote)
    lk.shape(delay_ms=10, loss=0.01, rate="50mbit", seed=7)
    before = lk.stats()
    h = RemoteHarness(cfg)
    try:
        rng = random.Random(kind)
        for i in range(3):
            h.writer.write(qtree, f"d/f{i}", rng.randbytes(400_000))
        assert h.cycle()["failures"] == 0  # the baseline
        h.writer.write(qtree, "d/f1", rng.randbytes(900_000))  # the update: one file rewritten,
        h.writer.write(qtree, "new", rng.randbytes(600_000))  # one created,
        h.writer.delete(qtree, "d/f2")  # one deleted
        report = h.cycle()
        assert report["failures"] == 0
        assert h.states() == {qtree: "stable"}
        h.assert_invariants()  # I3: the exported image equals the source PCPI's, byte for byte
        src = h.local_source
        snaps = [s for s in src.snapshot_list() if s.startswith(f"co-g{kind}-src-")]
        assert h.exported_fingerprints()[qtree] == src.fingerprint(qtree, max(snaps))
    finally:
        h.agent.close()
        h.agent.ledger.close()
    after = lk.stats()
    moved = sum(after[d]["packets"] - before[d]["packets"] for d in ("a_to_b", "b_to_a"))
    dropped = sum(after[d]["dropped"] - before[d]["dropped"] for d in ("a_to_b", "b_to_a"))
    assert moved > 2000 and dropped > 0, after  # the link really lost packets under coalesce
    assert after["qdiscs"]["b_to_a"].get("tbf", {}).get("packets", 0) > 0
