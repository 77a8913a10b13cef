"""Hostile clients against `coalesce serve`'s resource limits (docs/network.md, "Threat model"
and "Limits"): connection slots from accept to close, the handshake deadline, the per-request
deadline and minimum rate, HELLO's numbers, threads and slots freed when a client goes away;
the same limits behind ``--stdio``.

Every client here is bounded in count (a few sockets) and time (seconds, the deadlines are made
small through the server config); the server is the real TLS listener on loopback
(tests/net/netkit.py, TLSService) or a ``coalesce serve --stdio`` process.
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from net.netkit import TLSService, client_env, remote_plugins

import coalesce_mem
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_remote import protocol as P

SRC = "mem://limits-src"
PCPI = "co-g-src-000001"


@pytest.fixture
def source():
    coalesce_mem.forget(SRC)
    vol = coalesce_mem.volume_for(SRC)
    rng = random.Random(19)
    vol.write_file("A/small.txt", b"alpha")
    vol.write_file("A/big", rng.randbytes(12 << 20))  # incompressible: the diff is about 12 MiB
    vol.snapshot_create(PCPI)
    yield SRC
    coalesce_mem.forget(SRC)


class SlowDiff:
    """A server plugin: every diff stalls ``stall`` seconds after its Begin (a slow backend)."""

    def __init__(self, stall: float) -> None:
        self.stall = stall

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree, base, target):
        records = yield

        def slow():
            it = iter(records)
            yield next(it)
            time.sleep(self.stall)
            yield from it

        return slow()


def _service(certs, monkeypatch, *, plugins=(), **cfg) -> TLSService:
    svc = TLSService(certs, server_plugins=plugins, **cfg)
    svc.expose(SRC, name="src")
    client_env(monkeypatch, certs, COALESCE_RETRIES="0")
    return svc


def _tls(svc: TLSService, *, rcvbuf: int | None = None) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(svc.certs.ca)
    ctx.load_cert_chain(*svc.certs.client)
    raw = socket.socket()
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(5)
    raw.connect(("127.0.0.1", svc.port))
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _hello(bandwidth=None, compression: bool = False, raw: bytes | None = None) -> bytes:
    caps = ["resume", "zlib"] if compression else ["resume"]
    body = {
        "protocol": P.PROTOCOL_VERSION,
        "volume": "src",
        "capabilities": caps,
        "client": "t",
        "bandwidth": bandwidth,
    }
    return P.encode_message(P.HELLO, 0, raw if raw is not None else json.dumps(body).encode())


def _request(op: str, reqid: int = 1, **args) -> bytes:
    return P.encode_message(P.REQUEST, reqid, json.dumps({"op": op, "args": args}).encode())


def _session(svc: TLSService, **kw) -> tuple[ssl.SSLSocket, P.Connection]:
    """A TLS connection past WELCOME."""
    sock = _tls(svc, **kw)
    conn = P.Connection(P.SocketChannel(sock, "server", 5.0))
    sock.sendall(P.PREAMBLE + _hello())
    conn.read_preamble()
    conn.recv_json((P.WELCOME,))
    return sock, conn


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Read (and drop) what the server sends until it closes ``sock``: the seconds that took, or
    None when it is still open after ``seconds``."""
    t0 = time.monotonic()
    while (left := t0 + seconds - time.monotonic()) > 0:
        sock.settimeout(min(left, 0.5))
        try:
            if not sock.recv(1 << 16):
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except (OSError, ssl.SSLError):
            return time.monotonic() - t0
    return None


def _dribble(sock: socket.socket, data: bytes, every: float, within: float) -> float | None:
    """Send ``data`` one byte every ``every`` seconds: the seconds until the server closed the
    connection, or None when it was still open after ``within`` seconds (or all was sent)."""
    t0 = time.monotonic()
    for i in range(len(data)):
        if time.monotonic() - t0 > within:
            return None
        try:
            sock.sendall(data[i : i + 1])
        except (OSError, ssl.SSLError):
            return time.monotonic() - t0
        if _closed_within(sock, every) is not None:
            return time.monotonic() - t0
    return None


def _serving_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("coalesce-serve-1")]


def _wait(cond, within: float) -> bool:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------- slots and the handshake
def test_half_open_handshakes_hold_slots_until_the_handshake_deadline(certs, monkeypatch, source):
    """TCP connections that never finish their TLS handshake count against max_connections from
    accept (one handshake failing meanwhile frees no other's slot): the server holds at most
    max_connections sockets, closes the rest at once and every half-open one at handshake_timeout;
    then a good client is served."""
    svc = _service(certs, monkeypatch, max_connections=3, handshake_timeout=1.5, timeout=30.0)
    socks: list[socket.socket] = []
    more: list[socket.socket] = []
    try:
        for _ in range(2):
            socks.append(socket.create_connection(("127.0.0.1", svc.port), timeout=5))
        time.sleep(0.3)  # accepted: in their handshakes
        bad = socket.create_connection(("127.0.0.1", svc.port), timeout=5)  # the third slot, fails its handshake
        bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert _closed_within(bad, 2.0) is not None
        bad.close()
        time.sleep(0.3)  # its thread frees its slot after closing it
        more = [socket.create_connection(("127.0.0.1", svc.port), timeout=5) for _ in range(3)]
        held = [s for s in more if _closed_within(s, 0.5) is None]
        assert len(held) == 1, f"{len(held)} more connections held; max_connections leaves room for 1"
        socks += held
        # the half-open ones end at the handshake deadline (1.5 s from accept)
        took = [_closed_within(s, 5.0) for s in socks]
        assert all(t is not None for t in took), took
        assert _wait(lambda: len(svc.server._conns) == 0, 2.0)
        v = Volume.open(plugin_manager(remote_plugins()), f"tls://127.0.0.1:{svc.port}/src")
        assert v.snapshot_list() == [PCPI]
        v.close()
    finally:
        for s in socks + more:
            s.close()
        svc.stop()


def test_a_tls_handshake_sent_one_byte_at_a_time_ends_at_the_handshake_deadline(certs, monkeypatch, source):
    svc = _service(certs, monkeypatch, handshake_timeout=1.5, timeout=30.0)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(svc.certs.ca)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = out.read()  # the ClientHello
        sock = socket.create_connection(("127.0.0.1", svc.port), timeout=5)
        took = _dribble(sock, hello, every=0.25, within=8.0)
        assert took is not None and took < 4.0, took
        sock.close()
    finally:
        svc.stop()


def test_a_hello_sent_one_byte_at_a_time_ends_at_the_handshake_deadline(certs, monkeypatch, source):
    """The handshake deadline covers the protocol's handshake too (preamble, HELLO), not each read."""
    svc = _service(certs, monkeypatch, handshake_timeout=1.5, timeout=30.0)
    try:
        sock = _tls(svc)
        took = _dribble(sock, P.PREAMBLE + _hello(), every=0.25, within=8.0)
        assert took is not None and took < 4.0, took
        sock.close()
    finally:
        svc.stop()


# --------------------------------------------------------------------------- requests: deadline and rate
def test_a_request_sent_one_byte_at_a_time_is_closed(certs, monkeypatch, source):
    """One byte per (idle_timeout - 1) s keeps every read alive; request_timeout ends the request."""
    svc = _service(certs, monkeypatch, idle_timeout=1.0, timeout=1.0, request_timeout=1.0, min_rate=1024)
    try:
        sock, _conn = _session(svc)
        took = _dribble(sock, _request("snapshots"), every=0.4, within=8.0)
        assert took is not None and took < 4.0, took
        sock.close()
    finally:
        svc.stop()


@pytest.mark.parametrize("reader", ["stops", "slow"])
def test_a_client_that_reads_a_diff_too_slowly_is_closed(certs, monkeypatch, source, reader):
    """A diff the client stops reading, or reads at 8 KiB/s (below min_rate), ends after
    request_timeout plus what the bytes it took allow; the socket's own timeout is far longer."""
    svc = _service(certs, monkeypatch, timeout=30.0, request_timeout=1.0, min_rate=2 << 20)
    try:
        sock, _conn = _session(svc, rcvbuf=32 << 10)
        sock.sendall(_request("diff", qtree="A", base=None, target=PCPI))
        t0 = time.monotonic()
        closed = None
        while closed is None and time.monotonic() - t0 < 10.0:
            if reader == "slow":  # 1 KiB each 1/8 s (what the kernel buffered first comes out of it)
                sock.settimeout(1.0)
                try:
                    sock.recv(1024)
                except (OSError, ssl.SSLError):
                    pass
            time.sleep(1024 / (8 << 10))
            if len(svc.server._conns) == 0:  # the server closed its end, and freed the slot
                closed = time.monotonic() - t0
        assert closed is not None and closed < 9.0, closed
        sock.close()
    finally:
        svc.stop()


def test_a_client_that_disconnects_mid_diff_frees_its_thread_and_slot_at_once(certs, monkeypatch, source):
    """Slow backend, long keepalive: max_connections clients start a diff and hang up; their
    threads and slots are free within a second and a good client is served."""
    svc = _service(certs, monkeypatch, plugins=(SlowDiff(2.0),), max_connections=2, keepalive=30.0, timeout=30.0)
    try:
        before = len(_serving_threads())
        for _ in range(2):
            sock, _conn = _session(svc)
            sock.sendall(_request("diff", qtree="A", base=None, target=PCPI))
            time.sleep(0.3)  # the server is in the diff, waiting for the backend
            sock.close()
        t0 = time.monotonic()
        assert _wait(lambda: len(svc.server._conns) == 0, 1.5), "the slots of clients that hung up are still held"
        assert _wait(lambda: len(_serving_threads()) <= before, 1.0), _serving_threads()
        assert time.monotonic() - t0 < 2.5
        v = Volume.open(plugin_manager(remote_plugins()), f"tls://127.0.0.1:{svc.port}/src")
        assert v.qtree_list(None) == ["A"]
        v.close()
    finally:
        svc.stop()


# --------------------------------------------------------------------------- HELLO's numbers
BAD_BANDWIDTHS = [
    (b"NaN", "not nan"),
    (b"Infinity", "not inf"),
    (b"-Infinity", "not -inf"),
    (b"-1", "not -1"),
    (b"0", "not 0"),
    (b"1e-9", "below this server's minimum rate"),
    (b"100", "below this server's minimum rate"),
    (b'"20MiB/s"', "not str"),
    (b"true", "not bool"),
    (b"[1]", "not list"),
    (b"1e999", "not inf"),
]


@pytest.mark.parametrize("value, match", BAD_BANDWIDTHS, ids=[v.decode() for v, _m in BAD_BANDWIDTHS])
def test_hello_bandwidth_is_validated(certs, monkeypatch, source, value, match):
    svc = _service(certs, monkeypatch, min_rate=1024)
    try:
        sock = _tls(svc)
        body = b'{"protocol": %d, "volume": "src", "capabilities": ["resume"], "client": "t", "bandwidth": %s}' % (
            P.PROTOCOL_VERSION,
            value,
        )
        sock.sendall(P.PREAMBLE + _hello(raw=body))
        conn = P.Connection(P.SocketChannel(sock, "server", 5.0))
        conn.read_preamble()
        kind, _rid, raw = conn.recv()
        assert kind == P.ERROR, raw
        err = P.decode_json(kind, raw)
        assert err["error"] == "protocol" and "'bandwidth'" in err["message"] and match in err["message"], err
        assert _closed_within(sock, 3.0) is not None
        sock.close()
        assert svc.service.stats["protocol_errors"] == 1
    finally:
        svc.stop()


# --------------------------------------------------------------------------- --stdio
def _stdio(tmp_path, **server) -> subprocess.Popen:
    cfg = tmp_path / "s.toml"
    lines = [f"{k} = {json.dumps(v)}" for k, v in server.items()]
    cfg.write_text(
        "[server]\n" + "\n".join(lines) + f'\nlog = "{tmp_path}/serve.log"\n'
        f'[volumes]\nsrc = "{SRC}"\n[clients.backup1]\nvolumes = ["src"]\n'
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen(
        [sys.executable, "-m", "coalesce_remote.serve", "--stdio", "--config", str(cfg), "--identity", "backup1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _read_until_eof(fd: int, within: float) -> tuple[bytes, bool]:
    out = bytearray()
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(out), True
        out += chunk
    return bytes(out), False


def test_stdio_a_dribbled_hello_ends_at_the_handshake_deadline(tmp_path):
    proc = _stdio(tmp_path, handshake_timeout=1.5, timeout=30)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        t0 = time.monotonic()
        data = P.PREAMBLE + _hello()
        for i in range(len(data)):
            if proc.poll() is not None or time.monotonic() - t0 > 8:
                break
            try:
                proc.stdin.write(data[i : i + 1])
                proc.stdin.flush()
            except BrokenPipeError:
                break
            time.sleep(0.25)
        assert proc.wait(timeout=10) == 0 and time.monotonic() - t0 < 5.0
        assert "did not finish its handshake" in (tmp_path / "serve.log").read_text()
    finally:
        proc.kill()
        proc.wait()


def test_stdio_hello_bandwidth_nan_is_a_protocol_error(tmp_path):
    proc = _stdio(tmp_path)
    try:
        body = (
            b'{"protocol": %d, "volume": "src", "capabilities": [], "client": "t", "bandwidth": NaN}'
            % P.PROTOCOL_VERSION
        )
        out, _err = proc.communicate(P.PREAMBLE + _hello(raw=body), timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert out[:9] == P.PREAMBLE
    n = int.from_bytes(out[9:13], "big")
    kind, _rid, raw = P.check_message(out[9:13], out[13:18], out[18 : 9 + n], out[9 + n : 13 + n])
    err = P.decode_json(kind, raw)
    assert kind == P.ERROR and err["error"] == "protocol" and "'bandwidth'" in err["message"], err
    assert "internal" not in (tmp_path / "serve.log").read_text()


def test_the_limits_are_configured_and_checked():
    from coalesce_core.errors import ConfigError
    from coalesce_remote.serve import parse_server_config

    cfg = parse_server_config('[server]\nrequest_timeout = 5\nmin_rate = "64KiB/s"\nbandwidth = "1MiB/s"\n')
    assert (cfg.request_timeout, cfg.min_rate, cfg.bandwidth) == (5.0, 65536.0, 1048576.0)
    assert parse_server_config("").min_rate == 1024.0
    for bad, match in [
        ("request_timeout = 0", "request_timeout"),
        ("handshake_timeout = nan", "handshake_timeout"),
        ("idle_timeout = inf", "idle_timeout"),
        ('min_rate = "slow"', "min_rate"),
        ("min_rate = 0", "min_rate"),
        ("min_rate = inf", "min_rate"),
        ('bandwidth = "100B/s"', "below min_rate"),
        ("bandwidth = inf", "bandwidth"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_server_config(f"[server]\n{bad}\n")
