"""A hostile or broken peer on either side: clear errors, the connection closes,
nothing is written, and the server keeps serving its other clients.
Includes hypothesis fuzzing of the server's and the client's frame parsers."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import zlib
from typing import Iterable, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from net.netkit import ServerRecorder, recv_all, serve_pair

import coalesce_mem
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.urls import VolumeURL
from coalesce_core.errors import CoalesceError, UnrequestedStream
from coalesce_core.stream import codec
from coalesce_core.stream.records import Begin, Record, framed
from coalesce_remote import protocol as P
from coalesce_remote.client import ClientSettings, RemoteVolume
from coalesce_remote.serve import Grant, ServerConfig, SourceService, parse_server_config

SRC = "mem://proto-src"


@pytest.fixture(scope="module")
def service():
    coalesce_mem.forget(SRC)
    vol = coalesce_mem.volume_for(SRC)
    vol.write_file("A/f.txt", b"x" * 5000)
    vol.write_file("A/d/g.txt", b"y" * 100)
    vol.snapshot_create("co-g-src-000001")
    rec = ServerRecorder()
    cfg = ServerConfig(
        volumes={"src": SRC},
        clients={"backup1": Grant(volumes=("src",), take=True, release=True)},
        timeout=2.0,
        handshake_timeout=2.0,
        idle_timeout=2.0,
    )
    svc = SourceService(cfg, pm=plugin_manager([rec]))
    svc.recorder = rec
    yield svc
    coalesce_mem.forget(SRC)


def _state():
    v = coalesce_mem.volume_for(SRC)
    return v.snapshot_list(), v.fingerprint("A", None)


def _hello(volume: str = "src", **over) -> bytes:
    body = {
        "protocol": P.PROTOCOL_VERSION,
        "volume": volume,
        "capabilities": ["resume", "zlib"],
        "client": "t",
        "bandwidth": None,
    }
    body.update(over)
    return P.encode_message(P.HELLO, 0, json.dumps(body).encode())


def _messages(data: bytes) -> list[tuple[int, dict | bytes]]:
    assert data[:9] == P.PREAMBLE
    out, pos = [], 9
    while pos + 4 <= len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        kind, rid, body = P.check_message(
            data[pos : pos + 4], data[pos + 4 : pos + 9], data[pos + 9 : pos + n], data[pos + n : pos + 4 + n]
        )
        out.append((kind, P.decode_json(kind, body) if kind in P.CONTROL_KINDS else body))
        pos += 4 + n
    return out


def _exchange(service, payload: bytes, *, shut: bool = True) -> tuple[list, threading.Thread]:
    sock, t = serve_pair(service)
    sock.sendall(payload)
    if shut:
        sock.shutdown(socket.SHUT_WR)
    data = recv_all(sock)
    sock.close()
    t.join(10)
    assert not t.is_alive(), "the server hangs on this input"
    return _messages(data), t


def test_a_good_session(service):
    req = P.encode_message(P.REQUEST, 7, json.dumps({"op": "snapshots", "args": {}}).encode())
    msgs, _ = _exchange(service, P.PREAMBLE + _hello() + req)
    assert msgs[0][0] == P.WELCOME and msgs[0][1]["compression"] == "zlib"
    assert msgs[1] == (P.REPLY, {"result": ["co-g-src-000001"]})


HOSTILE = [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not a coalesce"),
    (b"COALPROT\x09", "protocol version 9"),
    (P.PREAMBLE + b"\xff\xff\xff\xff" + b"x" * 100, "claims a length"),
    (P.PREAMBLE + struct.pack(">IBI", 12, 77, 0) + b"abc", "unknown kind"),
    (P.PREAMBLE + _hello()[:-1] + b"\x00", "checksum"),
    (P.PREAMBLE + P.encode_message(P.HELLO, 0, b"[1,2]"), "not a JSON object"),
    (P.PREAMBLE + P.encode_message(P.HELLO, 0, b"[" * 60000), "not valid UTF-8 JSON"),
    (P.PREAMBLE + P.encode_message(P.HELLO, 0, b"\xff\xfe"), "not valid UTF-8 JSON"),
    (P.PREAMBLE + P.encode_message(P.REQUEST, 0, b"{}"), "REQUEST where HELLO"),
    (P.PREAMBLE + _hello(volume="v" * 5000), "volume"),
    (P.PREAMBLE + _hello(capabilities="zlib"), "capabilities"),
    (P.PREAMBLE + _hello(bandwidth=-1), "bandwidth"),
    (P.PREAMBLE + _hello() + P.encode_message(P.DATA, 1, b"x"), "DATA where REQUEST"),
    (
        P.PREAMBLE
        + _hello()
        + P.encode_message(
            P.REQUEST,
            1,
            json.dumps(
                {"op": "diff", "args": {"qtree": "A", "base": None, "target": "co-g-src-000001", "skip": -5}}
            ).encode(),
        ),
        "skip",
    ),
    (
        P.PREAMBLE
        + _hello()
        + P.encode_message(
            P.REQUEST, 1, json.dumps({"op": "take", "args": {"name": "co-g-src-" + "9" * 300}}).encode()
        ),
        "name",
    ),
    (
        P.PREAMBLE
        + _hello()
        + P.encode_message(P.REQUEST, 1, json.dumps({"op": "fingerprint", "args": {"qtree": "../etc"}}).encode()),
        "not allowed",
    ),
]


@pytest.mark.parametrize("payload, match", HOSTILE, ids=[m for _p, m in HOSTILE])
def test_hostile_client_gets_a_clear_error_and_is_disconnected(service, payload, match):
    before = _state()
    msgs, _ = _exchange(service, payload)
    errors = [m for k, m in msgs if k == P.ERROR]
    assert errors, msgs
    assert match in errors[-1]["message"], errors
    assert _state() == before
    assert not any(c[0] in ("take", "release") for c in service.recorder.calls)


def test_oversize_control_message_is_refused_before_it_is_read(service):
    sock, t = serve_pair(service)
    sock.sendall(P.PREAMBLE + struct.pack(">IBI", P.MAX_CONTROL + 100, P.HELLO, 0))  # and nothing more
    data = recv_all(sock)
    t.join(5)
    assert not t.is_alive()
    assert "limit" in _messages(data)[-1][1]["message"]


def test_a_silent_client_is_dropped_after_the_handshake_timeout(service):
    sock, t = serve_pair(service)
    t0 = time.monotonic()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 6
    sock.close()


def test_server_keeps_serving_others_while_one_is_hostile(service):
    bad, tb = serve_pair(service)
    bad.sendall(P.PREAMBLE + b"\x00\x00\x00\x20")  # a frame that never completes
    good = P.encode_message(P.REQUEST, 1, json.dumps({"op": "qtrees", "args": {}}).encode())
    msgs, _ = _exchange(service, P.PREAMBLE + _hello() + good)
    assert msgs[-1] == (P.REPLY, {"result": ["A"]})
    bad.close()
    tb.join(10)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    prefix=st.sampled_from(["none", "preamble", "hello"]),
    junk=st.binary(max_size=3000),
    flips=st.lists(st.integers(0, 10_000), max_size=4),
)
def test_fuzz_server_parser(service, prefix, junk, flips):
    """Random bytes, or a valid session with flipped bits: the server neither crashes nor hangs nor writes."""
    before = _state()
    req = P.encode_message(
        P.REQUEST,
        3,
        json.dumps({"op": "diff", "args": {"qtree": "A", "base": None, "target": "co-g-src-000001"}}).encode(),
    )
    base = {"none": b"", "preamble": P.PREAMBLE, "hello": P.PREAMBLE + _hello() + req}[prefix]
    data = bytearray(base + junk)
    for f in flips:
        if data:
            data[f % len(data)] ^= 1 << (f % 8)
    sock, t = serve_pair(service)
    try:
        sock.sendall(bytes(data))
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    recv_all(sock, 5)
    sock.close()
    t.join(10)
    assert not t.is_alive()
    assert _state() == before
    assert not any(c[0] in ("take", "release") for c in service.recorder.calls)


# --------------------------------------------------------------------------- the client's parser
def _fake_server(payload_after_request: bytes) -> socket.socket:
    """A fake source service: a correct handshake, then ``payload_after_request`` once a request arrives."""
    a, b = socket.socketpair()

    def run():
        try:
            b.settimeout(5)
            conn = P.Connection(P.SocketChannel(b, "fake", 5))
            conn.send_preamble()
            conn.read_preamble()
            conn.recv()
            conn.send_json(
                P.WELCOME,
                0,
                {
                    "protocol": P.PROTOCOL_VERSION,
                    "identity": "x",
                    "volume": "v",
                    "capabilities": ["resume"],
                    "compression": None,
                },
            )
            conn.recv()
            b.sendall(payload_after_request)
        except Exception:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    threading.Thread(target=run, daemon=True).start()
    return a


def _fake_client(payload: bytes) -> RemoteVolume:
    v = RemoteVolume(VolumeURL.parse("tls://127.0.0.1:1/v"), ClientSettings(retries=1, retry_delay=0.0, timeout=2.0))
    v._tls_channel = lambda: P.SocketChannel(_fake_server(payload), "fake", 2.0)  # type: ignore[method-assign]
    return v


def _valid_stream_messages() -> bytes:
    local = coalesce_mem.volume_for(SRC)
    # MemVolume.diff yields change records framed by Begin/End, typed Iterator[object] in coalesce_mem
    records = cast("Iterable[Record]", local.diff("A", None, "co-g-src-000001"))
    raw = b"".join(bytes(c) for c in codec.encode(records))
    out = b""
    for i in range(0, len(raw), 700):
        out += P.encode_message(P.DATA, 1, raw[i : i + 700])
    return out + P.encode_message(P.END, 1, b'{"records": 0}')


@pytest.mark.parametrize(
    "begin",
    [
        Begin(qtree="B", base=None, target="co-g-src-000001"),
        Begin(qtree="A", base="co-g-src-000000", target="co-g-src-000001"),
        Begin(qtree="A", base=None, target="co-g-src-000002"),
    ],
    ids=["qtree", "base", "target"],
)
def test_a_server_that_sends_another_stream_is_refused_at_its_begin_and_not_retried(service, begin):
    """A hostile server answers the diff of A (baseline to co-g-src-000001) with another stream's
    Begin: the client refuses it at once (no resume: asking again would only get the same)."""
    local = coalesce_mem.volume_for(SRC)
    changes = list(local.diff("A", None, "co-g-src-000001"))[1:-1]
    raw = b"".join(
        bytes(c) for c in codec.encode(cast("Iterable[Record]", framed(begin.qtree, begin.base, begin.target, changes)))
    )
    payload = P.encode_message(P.DATA, 1, raw) + P.encode_message(P.END, 1, b'{"records": 0}')
    v = _fake_client(payload)
    connections = []
    channel = v._tls_channel
    v._tls_channel = lambda: connections.append(1) or channel()
    got = []
    with pytest.raises(
        UnrequestedStream, match="the transfer asked for qtree 'A' from the empty tree to 'co-g-src-000001'"
    ):
        for rec in v.diff("A", None, "co-g-src-000001"):
            got.append(rec)
    assert got == [] and len(connections) == 1
    v.close()


def test_client_reads_a_valid_fake_stream(service):
    recs = list(_fake_client(_valid_stream_messages()).diff("A", None, "co-g-src-000001"))
    assert recs == list(coalesce_mem.volume_for(SRC).diff("A", None, "co-g-src-000001"))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    junk=st.binary(max_size=2000),
    flips=st.lists(st.integers(0, 100_000), min_size=1, max_size=3),
    mode=st.sampled_from(["junk", "flip", "truncate"]),
)
def test_fuzz_client_parser(service, junk, flips, mode):
    """A hostile server: the client raises a CoalesceError (never anything else), never hangs, and a
    destination applying what it yields writes nothing outside the replica's qtree."""
    good = _valid_stream_messages()
    if mode == "junk":
        payload = junk
    elif mode == "flip":
        data = bytearray(good)
        for f in flips:
            data[f % len(data)] ^= 1 << (f % 8)
        payload = bytes(data)
    else:
        payload = good[: flips[0] % len(good)]
    dst = coalesce_mem.volume_for("mem://proto-dst")
    if "other" not in dst.qtree_list(None):
        dst.write_file("other/keep.txt", b"keep")
    keep = dst.fingerprint("other", None)
    t0 = time.monotonic()
    try:
        dst.apply("replica", _fake_client(payload).diff("A", None, "co-g-src-000001"), True)
    except CoalesceError:
        pass
    assert time.monotonic() - t0 < 15
    assert dst.fingerprint("other", None) == keep
    assert set(dst.qtree_list(None)) <= {"other", "replica"}


def test_decompression_bomb_is_refused():
    d = P.Decompressor("zlib")
    bomb = zlib.compress(b"\0" * (P.MAX_DATA_PLAIN * 4))
    with pytest.raises(P.ProtocolError, match="decompresses to more than"):
        d.decompress(bomb)


def test_zstd_frames_round_trip_and_bombs_are_refused_from_the_header():
    import zstandard

    c, d = P.Compressor("zstd"), P.Decompressor("zstd")
    for chunk in (b"", b"x" * 100_000, bytes(range(256)) * 1000):
        assert d.decompress(c.compress(chunk)) == chunk
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * (P.MAX_DATA_PLAIN * 4))
    with pytest.raises(P.ProtocolError, match="decompresses to more than"):
        d.decompress(bomb)
    # a frame that hides its size (streaming) could inflate without bound: refused unread
    hidden = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    sizeless = hidden.compress(b"\0" * 1000) + hidden.flush()
    with pytest.raises(P.ProtocolError, match="states its size"):
        d.decompress(sizeless)
    with pytest.raises(P.ProtocolError, match="states its size"):
        d.decompress(b"not zstd at all")
    good = c.compress(b"y" * 5000)
    with pytest.raises(P.ProtocolError):
        d.decompress(good[:-3])  # truncated frame


def test_server_config_errors_name_the_key(tmp_path):
    from coalesce_core.errors import ConfigError

    with pytest.raises(ConfigError, match="volume 'nope' is not in"):
        parse_server_config('[volumes]\nsrc = "mem://x"\n[clients.a]\nvolumes = ["nope"]\n')
    with pytest.raises(ConfigError, match="bandwidth"):
        parse_server_config('[server]\nbandwidth = "fast"\n')
    cfg = parse_server_config(
        '[server]\nbandwidth = "20MiB/s"\n[volumes]\nsrc = "mem://x"\n'
        '[clients.a]\nvolumes = ["src"]\nqtrees = {src = ["A*"]}\ntake = true\n'
        'groups = ["g"]\n'
    )
    g = cfg.clients["a"]
    assert cfg.bandwidth == 20 * 1024 * 1024
    assert g.may_read_qtree("src", "A1") and not g.may_read_qtree("src", "B")
    assert g.may_use_pcpi("co-g-src-000001") and not g.may_use_pcpi("co-h-src-000001")
    assert P.parse_rate("100Mbit/s") == 12.5e6 and P.parse_rate("500KB/s") == 500_000


def test_a_server_error_text_is_data():
    """A server's ERROR message, hint and code reach the operator with their control characters escaped."""
    err = P.error_from({"error": "refused\x1b", "message": "no [/] \x1b]0;owned\x07\nINFO forged", "hint": "\rx"})
    assert isinstance(err, P.RemoteError) and not isinstance(err, P.Refused)
    assert err.message == "source service: no [/] \\x1b]0;owned\\x07\\nINFO forged"
    assert err.hint == "\\rx" and err.code == "refused\\x1b"


def test_a_pipe_channel_numbered_past_1024_reads_writes_and_times_out():
    """An agent with many sources' connections (or a long-running server) holds descriptors
    numbered 1024 and more, which select(2) cannot wait on: FdChannel waits with poll(2)."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    r, w = os.pipe()
    high_r, high_w = os.dup2(r, 2000), os.dup2(w, 2001)
    os.close(r)
    os.close(w)
    ch = P.FdChannel(high_r, high_w, "a pipe", timeout=0.2)
    try:
        ch.write_all(b"ping")
        assert ch.read_some(4) == b"ping"
        with pytest.raises(CoalesceError):
            ch.read_some(4)  # nothing comes: the deadline ends the wait, no ValueError from select
    finally:
        ch.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
