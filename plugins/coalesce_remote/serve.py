"""The source service: ``coalesce serve`` (docs/network.md, docs/protocol.md).

The destination agent decides; the source service only answers.  It offers,
for one volume per connection, exactly what an agent needs from a source
volume: list, take and release source PCPIs, list qtrees, stream one qtree's
change records between two source PCPIs (or a baseline) in the core's framed
change-stream format, and fingerprint a qtree.  It keeps no coalescing state.

Two listeners share one protocol implementation (:class:`SourceService`):

* ``--stdio``: one connection on stdin/stdout, for ssh's forced command
  (``command="coalesce serve --stdio --config F --identity NAME"``);
* ``--listen HOST:PORT``: mutual TLS 1.3 (a client certificate signed by the
  configured CA is required; the client's identity is its subject CN), a
  thread per connection.

Authorization is the server's own TOML config (``[clients.<identity>]``):
which volumes, which qtrees, whether PCPIs may be taken and released and
under which group names.  Every refusal is logged with the identity and the
peer and answered with a clear error; a protocol violation closes the
connection; other connections are not affected.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import logging.handlers
import math
import os
import socket
import ssl
import sys
import threading
import time
import tomllib
from typing import Any, Iterator

import attrs

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.cycle.planner import is_group_source_pcpi
from coalesce_core.errors import CoalesceError, ConfigError
from coalesce_core.readahead import read_ahead
from coalesce_core.stream import codec
from coalesce_core.stream.records import Begin, End
from coalesce_core.ui.errors import report_error
from coalesce_core.ui.peertext import LineFormatter, quoted

from . import protocol as P

log = logging.getLogger("coalesce.serve")

DEFAULT_PORT = P.DEFAULT_PORT


# --------------------------------------------------------------------------- config
@attrs.frozen
class Grant:
    """What one client identity may do."""

    volumes: tuple[str, ...] = ()
    qtrees: tuple[str, ...] = ("*",)  # fnmatch patterns, for every granted volume
    volume_qtrees: dict = attrs.field(factory=dict)  # volume -> tuple of patterns (overrides qtrees)
    take: bool = False
    release: bool = False
    groups: tuple[str, ...] = ("*",)  # group names whose co-<group>-src-NNNNNN PCPIs it may use

    def may_read_volume(self, name: str) -> bool:
        return name in self.volumes or "*" in self.volumes

    def may_read_qtree(self, volume: str, qtree: str) -> bool:
        pats = self.volume_qtrees.get(volume, self.qtrees)
        return any(fnmatch.fnmatchcase(qtree, p) for p in pats)

    def may_use_pcpi(self, name: str) -> bool:
        if not name.startswith("co-") or "-src-" not in name:
            return False
        for g in self.groups:
            if g == "*":
                group = name[3 : name.rfind("-src-")]
                if group and is_group_source_pcpi(group, name):
                    return True
            elif is_group_source_pcpi(g, name):
                return True
        return False


@attrs.frozen
class ServerConfig:
    volumes: dict = attrs.field(factory=dict)  # name -> volume URL
    clients: dict = attrs.field(factory=dict)  # identity -> Grant
    listen: str | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    bandwidth: float | None = None  # bytes/s per connection
    compression: bool = True
    timeout: float = 60.0  # no data from a peer for this long: it is dead
    idle_timeout: float = 600.0  # an idle connection between requests
    handshake_timeout: float = 15.0  # from accept to WELCOME (TLS handshake, preamble, HELLO), in all
    request_timeout: float = 60.0  # waiting on the client during one request, beyond what min_rate allows
    min_rate: float = 1024.0  # bytes/s: a client slower than this over a request is closed
    keepalive: float = 15.0  # TCP keep-alive idle seconds
    max_connections: int = 64  # connections from accept to close (TLS handshakes included)
    log: str | None = None
    path: str | None = None

    def volume_name(self, ref: str) -> str | None:
        """A HELLO's volume reference (a configured name, or the URL one maps to) -> the name."""
        if ref in self.volumes:
            return ref
        for name, url in self.volumes.items():
            if url == ref:
                return name
        return None


def _bool(t: dict, key: str, where: str, default: bool) -> bool:
    v = t.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: `{key}` must be true or false")
    return v


def _strs(t: dict, key: str, where: str, default: tuple[str, ...]) -> tuple[str, ...]:
    v = t.get(key, list(default))
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{where}: `{key}` must be a list of strings")
    return tuple(v)


def _num(t: dict, key: str, where: str, default: float) -> float:
    v = t.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
        raise ConfigError(f"{where}: `{key}` must be a positive number of seconds")
    return float(v)


#: the default of ``min_rate`` in [server] (bytes/s)
MIN_RATE = 1024.0


def check_bandwidth(bandwidth: float | None, min_rate: float, what: str) -> None:
    """A server bandwidth limit must be finite and not below ``min_rate`` (else the server would
    close its own slow connections); ConfigError naming ``what`` otherwise."""
    if bandwidth is not None and not min_rate <= bandwidth < math.inf:
        raise ConfigError(
            f"{what}: {bandwidth:g} bytes/s is below min_rate ({min_rate:g} bytes/s) or not finite",
            hint="raise the bandwidth or lower min_rate in [server]",
        )


def parse_server_config(text: str, path: str = "<server config>") -> ServerConfig:
    """Parse the server's TOML config; every problem is a ConfigError naming the key (docs/network.md)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"server", "volumes", "clients"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}", hint="only [server], [volumes], [clients.*]")
    server = data.get("server", {})
    where = f"{path} [server]"
    known = {
        "listen",
        "cert",
        "key",
        "ca",
        "bandwidth",
        "compression",
        "timeout",
        "idle_timeout",
        "handshake_timeout",
        "request_timeout",
        "min_rate",
        "keepalive",
        "max_connections",
        "log",
    }
    if not isinstance(server, dict) or set(server) - known:
        raise ConfigError(f"{where}: unknown key(s) {sorted(set(server) - known)}", hint=f"known keys: {sorted(known)}")
    for k in ("listen", "cert", "key", "ca", "log"):
        if k in server and not isinstance(server[k], str):
            raise ConfigError(f"{where}: `{k}` must be a string")
    try:
        bandwidth = P.parse_rate(server.get("bandwidth"))
    except ValueError as exc:
        raise ConfigError(f"{where}: `bandwidth`: {exc}") from None
    try:
        min_rate = P.parse_rate(server.get("min_rate", MIN_RATE))
    except ValueError as exc:
        raise ConfigError(f"{where}: `min_rate`: {exc}") from None
    if min_rate is None or not math.isfinite(min_rate):
        raise ConfigError(
            f"{where}: `min_rate` must be a positive, finite rate", hint='e.g. min_rate = "1KiB/s" (the default)'
        )
    check_bandwidth(bandwidth, min_rate, f"{where}: `bandwidth`")
    maxc = server.get("max_connections", 64)
    if not isinstance(maxc, int) or isinstance(maxc, bool) or not 1 <= maxc <= 10000:
        raise ConfigError(f"{where}: `max_connections` must be an integer from 1 to 10000")
    volumes = data.get("volumes", {})
    if not isinstance(volumes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in volumes.items()):
        raise ConfigError(f'{path} [volumes]: must map names to volume URLs (name = "scheme://...")')
    from coalesce_core.backend.urls import VolumeURL

    for name, url in volumes.items():
        if not P.NAME_RE.fullmatch(name):
            raise ConfigError(f"{path} [volumes]: {name!r} is not a valid name")
        try:
            VolumeURL.parse(url)
        except ConfigError as exc:
            raise ConfigError(f"{path} [volumes] {name}: {exc.message}", hint=exc.hint) from None
    clients = {}
    raw_clients = data.get("clients", {})
    if not isinstance(raw_clients, dict):
        raise ConfigError(f"{path}: [clients] must be tables [clients.<identity>]")
    for ident, t in raw_clients.items():
        w = f"{path} [clients.{ident}]"
        if not isinstance(t, dict):
            raise ConfigError(f"{w}: must be a table")
        ck = {"volumes", "qtrees", "take", "release", "groups"}
        if set(t) - ck:
            raise ConfigError(f"{w}: unknown key(s) {sorted(set(t) - ck)}", hint=f"known keys: {sorted(ck)}")
        vols = _strs(t, "volumes", w, ())
        for v in vols:
            if v != "*" and v not in volumes:
                raise ConfigError(f"{w}: volume {v!r} is not in [volumes]")
        qt = t.get("qtrees", ["*"])
        per_volume: dict[str, tuple[str, ...]] = {}
        if isinstance(qt, dict):
            for v, pats in qt.items():
                per_volume[v] = _strs(qt, v, f"{w} qtrees", ())
            qtrees: tuple[str, ...] = ()
        else:
            qtrees = _strs(t, "qtrees", w, ("*",))
        clients[ident] = Grant(
            volumes=vols,
            qtrees=qtrees,
            volume_qtrees=per_volume,
            take=_bool(t, "take", w, False),
            release=_bool(t, "release", w, False),
            groups=_strs(t, "groups", w, ("*",)),
        )
    return ServerConfig(
        volumes=dict(volumes),
        clients=clients,
        listen=server.get("listen"),
        cert=server.get("cert"),
        key=server.get("key"),
        ca=server.get("ca"),
        bandwidth=bandwidth,
        compression=_bool(server, "compression", where, True),
        timeout=_num(server, "timeout", where, 60.0),
        idle_timeout=_num(server, "idle_timeout", where, 600.0),
        handshake_timeout=_num(server, "handshake_timeout", where, 15.0),
        request_timeout=_num(server, "request_timeout", where, 60.0),
        min_rate=min_rate,
        keepalive=_num(server, "keepalive", where, 15.0),
        max_connections=maxc,
        log=server.get("log"),
        path=path,
    )


def load_server_config(path: str) -> ServerConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the server config {path}: {exc.strerror}",
            hint="pass --config FILE (docs/network.md has an example)",
        ) from None
    return parse_server_config(text, path)


# --------------------------------------------------------------------------- the service
class SourceService:
    """The protocol server for one configuration; thread-safe, one call of
    :meth:`serve_connection` per connection."""

    def __init__(self, config: ServerConfig, pm: Any = None, *, bandwidth: float | None = None) -> None:
        from coalesce_core.backend.manager import plugin_manager

        self.config = config
        self.pm = pm or plugin_manager()
        self.bandwidth = bandwidth if bandwidth is not None else config.bandwidth
        self._volumes: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.stats = {"connections": 0, "refused": 0, "protocol_errors": 0, "bytes_out": 0, "records_out": 0}

    def _volume(self, name: str) -> Any:
        from coalesce_core.backend.volume import Volume

        with self._lock:
            vol = self._volumes.get(name)
            if vol is None:
                vol = self._volumes[name] = Volume.open(self.pm, self.config.volumes[name], create=False)
            return vol

    def _refuse(self, ident: str, peer: str, what: str, hint: str = "") -> P.Refused:
        with self._lock:
            self.stats["refused"] += 1
        log.warning("refused %s from %s: %s", quoted(ident), peer, what)
        return P.Refused(what, code="refused", hint=hint or "the source's server config does not allow it")

    # -- one connection ---------------------------------------------------------------
    def serve_connection(self, conn: P.Connection, identity: str, deadline: float | None = None) -> None:
        """Serve one connection to its end.  The handshake (preamble, HELLO, WELCOME) ends by
        ``deadline`` (a monotonic time; default: ``handshake_timeout`` from now)."""
        peer = conn.peer
        with self._lock:
            self.stats["connections"] += 1
        log.info("connection from %s (identity %r)", peer, identity)
        try:
            cfg = self.config
            left = cfg.handshake_timeout if deadline is None else deadline - time.monotonic()
            conn.channel.set_deadline(left, f"its handshake within handshake_timeout ({cfg.handshake_timeout:g} s)")
            conn.channel.timeout = cfg.handshake_timeout
            conn.send_preamble()
            conn.read_preamble()
            _, _, hello = conn.recv_json((P.HELLO,))
            grant, vname, method = self._handshake(conn, identity, hello)
            if grant is None:
                return
            conn.channel.set_deadline(None)
            self._loop(conn, identity, grant, vname, method)
        except P.ProtocolError as exc:
            with self._lock:
                self.stats["protocol_errors"] += 1
            log.warning("protocol error from %s (identity %r): %s; closing the connection", peer, identity, exc)
            try:
                conn.send_error(0, exc, "protocol")
            except Exception:
                pass
        except P.ConnectionLost as exc:
            log.info("connection from %s (identity %r) ended: %s", peer, identity, exc)
        except Exception:  # never let one connection take the server down
            log.exception("internal error serving %s (identity %r)", peer, identity)
        finally:
            conn.close()

    def _handshake(self, conn: P.Connection, ident: str, hello: dict[str, Any]):
        proto = P.want_int(hello, "protocol", lo=0, hi=255)
        ref = P.want_str(hello, "volume", limit=P.MAX_VOLUME_REF)
        caps = P.want_list_of_names(hello, "capabilities")
        rate = P.want_rate(hello, "bandwidth", floor=self.config.min_rate)
        if proto != P.PROTOCOL_VERSION:
            conn.send_error(
                0,
                P.ProtocolError(
                    f"protocol version {proto} is not supported; this server speaks {P.PROTOCOL_VERSION}",
                    hint="run the same coalesce version",
                ),
                "version",
            )
            return None, None, None
        grant = self.config.clients.get(ident)
        vname = self.config.volume_name(ref)
        if grant is None:
            conn.send_error(
                0,
                self._refuse(
                    ident,
                    conn.peer,
                    f"client identity {ident!r} is not configured",
                    f"add [clients.{ident}] to the server config",
                ),
            )
            return None, None, None
        if vname is None or not grant.may_read_volume(vname):
            conn.send_error(
                0,
                self._refuse(
                    ident,
                    conn.peer,
                    f"identity {ident!r} may not read volume {ref[:200]!r}",
                    "the server config's [clients] table names the volumes it may read",
                ),
            )
            return None, None, None
        method = None
        if self.config.compression:
            method = next((m for m in P.COMPRESSIONS if m in caps), None)
        limits = {"control": P.MAX_CONTROL, "data": P.MAX_DATA_MESSAGE}
        rates = [r for r in (self.bandwidth, rate) if r]
        bw = min(rates) if rates else None
        if bw:
            conn.channel.limiter = P.RateLimiter(bw)
        conn.send_json(
            P.WELCOME,
            0,
            {
                "protocol": P.PROTOCOL_VERSION,
                "identity": ident,
                "volume": vname,
                "capabilities": [c for c in P.CAPABILITIES if c in caps],
                "compression": method,
                "bandwidth": bw,
                "limits": limits,
                "take": grant.take,
                "release": grant.release,
                "server": "coalesce-serve",
            },
        )
        log.info(
            "%s (identity %r) opened volume %s (compression %s, bandwidth %s)", conn.peer, ident, vname, method, bw
        )
        return grant, vname, method

    def _loop(self, conn: P.Connection, ident: str, grant: Grant, vname: str, method: str | None) -> None:
        cfg = self.config
        pace = P.Pace(cfg.request_timeout, cfg.min_rate)
        while True:
            # between requests: idle_timeout; from a request's first byte to the end of its reply: the pace
            conn.channel.pace = None
            conn.channel.timeout = cfg.idle_timeout
            first = conn.channel.read_exact(1)
            conn.channel.timeout = cfg.timeout
            pace.start()
            conn.channel.pace = pace
            kind, reqid, body = conn.recv(first)
            if kind == P.PING:
                conn.send(P.PONG, reqid, b"")
                continue
            if kind != P.REQUEST:
                raise P.ProtocolError(f"{conn.peer} sent {P.KIND_NAMES[kind]} where REQUEST was expected")
            req = P.decode_json(kind, body)
            op = P.want_str(req, "op", limit=32)
            args = req.get("args", {})
            if not isinstance(args, dict):
                raise P.ProtocolError("field 'args' must be an object")
            if op == "bye":
                conn.send_json(P.REPLY, reqid, {"result": True})
                return
            try:
                if op == "diff":
                    self._diff(conn, reqid, ident, grant, vname, method, args)
                elif op == "describe":
                    self._describe(conn, reqid, ident, grant, vname, method, args)
                else:
                    result = self._op(conn, ident, grant, vname, op, args)
                    conn.send_json(P.REPLY, reqid, {"result": result})
            except (P.ProtocolError, P.ConnectionLost):
                raise
            except P.Refused as exc:
                conn.send_error(reqid, exc)
            except CoalesceError as exc:
                log.warning("request %s of %r on %s failed: %s", op, ident, vname, exc)
                conn.send_error(reqid, exc, exc.code if isinstance(exc, P.RemoteError) else "backend")
            except Exception as exc:
                log.exception("request %s of %r on %s: internal error", op, ident, vname)
                conn.send_error(reqid, exc, "internal")

    # -- checks
    def _pcpi(self, conn: P.Connection, ident: str, grant: Grant, args: dict, key: str, optional: bool = False):
        name = P.want_str(args, key, optional=optional, pattern=P.NAME_RE)
        if name is not None and not grant.may_use_pcpi(name):
            raise self._refuse(
                ident,
                conn.peer,
                f"identity {ident!r} may not use PCPI {name!r}",
                f"allowed: co-<group>-src-NNNNNN for groups {list(grant.groups)}",
            )
        return name

    def _qtree(self, conn: P.Connection, ident: str, grant: Grant, vname: str, args: dict) -> str:
        q = P.want_str(args, "qtree", pattern=P.NAME_RE)
        if q in (".", "..") or not grant.may_read_qtree(vname, q):
            raise self._refuse(
                ident,
                conn.peer,
                f"identity {ident!r} may not read qtree {q!r} of volume {vname}",
                "the server config's [clients] table names the qtrees it may read",
            )
        return q

    def _op(self, conn: P.Connection, ident: str, grant: Grant, vname: str, op: str, args: dict) -> Any:
        vol = self._volume(vname)
        if op == "snapshots":
            return [n for n in vol.snapshot_list() if grant.may_use_pcpi(n)]
        if op in ("take", "release"):
            allowed, act = (grant.take, vol.snapshot_create) if op == "take" else (grant.release, vol.snapshot_delete)
            if not allowed:
                raise self._refuse(
                    ident,
                    conn.peer,
                    f"identity {ident!r} may not {op} PCPIs on {vname}",
                    f"set {op} = true for it in the server config",
                )
            name = self._pcpi(conn, ident, grant, args, "name")
            log.info("%r %ss PCPI %s on %s", ident, op, name, vname)
            return act(name)
        if op == "qtrees":
            snap = self._pcpi(conn, ident, grant, args, "snapshot", optional=True)
            return [q for q in vol.qtree_list(snap) if grant.may_read_qtree(vname, q)]
        if op == "fingerprint":
            q = self._qtree(conn, ident, grant, vname, args)
            snap = self._pcpi(conn, ident, grant, args, "snapshot", optional=True)
            return vol.fingerprint(q, snap)
        raise self._refuse(
            ident,
            conn.peer,
            f"unknown request {op!r}",
            "the service offers snapshots, take, release, qtrees, fingerprint, diff, describe",
        )

    def _diff(
        self, conn: P.Connection, reqid: int, ident: str, grant: Grant, vname: str, method: str | None, args: dict
    ) -> None:
        q = self._qtree(conn, ident, grant, vname, args)
        base = self._pcpi(conn, ident, grant, args, "base", optional=True)
        target = self._pcpi(conn, ident, grant, args, "target")
        skip = P.want_int(args, "skip", lo=0, hi=2**62, optional=True) or 0
        vol = self._volume(vname)
        records = vol.diff(q, base, target)
        counter = {"n": 0}
        stream = codec.encode(_segment(records, q, base, target, skip, counter))
        sent = self._send_stream(conn, reqid, P.pieces(stream, P.DATA_CHUNK), method)
        conn.send_json(P.END, reqid, {"records": counter["n"], "bytes": sent, "skipped": skip})
        with self._lock:
            self.stats["bytes_out"] += sent
            self.stats["records_out"] += counter["n"]
        log.info(
            "%r: streamed %s %s..%s of %s (%d records from %d, %d bytes)",
            ident,
            q,
            base,
            target,
            vname,
            counter["n"],
            skip,
            sent,
        )

    def _send_stream(self, conn: P.Connection, reqid: int, chunks: Iterator[bytes], method: str | None) -> int:
        """Send ``chunks`` as DATA messages (compressed by ``method``); the bytes sent before compression.

        While the backend is slow an empty DATA message goes every ``keepalive`` seconds (the client
        sees a live server), and a client that hangs up meanwhile ends the reply at once
        (ConnectionLost): its thread and its connection slot are freed, and the backend's producer
        stops at its next item."""
        comp = P.Compressor(method)
        sent = 0
        quiet = time.monotonic()
        gen = _with_keepalive(chunks, min(self.config.keepalive, HANGUP_POLL))
        try:
            for chunk in gen:
                if chunk is None:
                    if conn.channel.hung_up():
                        raise P.ConnectionLost(f"{conn.peer} went away during the reply")
                    if time.monotonic() - quiet >= self.config.keepalive:
                        conn.send(P.DATA, reqid, b"")
                        quiet = time.monotonic()
                    continue
                conn.send(P.DATA, reqid, comp.compress(chunk))
                sent += len(chunk)
                quiet = time.monotonic()
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()
        return sent

    def _describe(
        self, conn: P.Connection, reqid: int, ident: str, grant: Grant, vname: str, method: str | None, args: dict
    ) -> None:
        """Descriptions of paths of a qtree in a source PCPI, for verification (docs/protocol.md).

        The same authorization as a diff of that qtree to that PCPI.  Without
        ``tree``, the client's DATA messages that follow carry the paths (JSON
        lines ``[path, content]``, or ``[path, content, ranges]`` with the capability
        ``ranges``: the part digest over those byte ranges) up to its END; they are all read before anything
        is answered (at most MAX_DESCRIBE_PATHS and MAX_DESCRIBE_REQUEST bytes).
        With ``tree``, every path of the qtree, in path order.  The answer is DATA
        messages of description lines (coalesce_core.verify.description_to_json),
        compressed as negotiated, then END {"count"}."""
        from coalesce_core.stream.records import check_path_or_root
        from coalesce_core.verify import description_to_json

        paths: list[tuple[str, bool]] = []
        ranges: dict[str, tuple[tuple[int, int], ...]] = {}
        problem: CoalesceError | None = None
        tree = args.get("tree", False)
        content = args.get("content", False)
        if not isinstance(tree, bool) or not isinstance(content, bool):
            raise P.ProtocolError("fields 'tree' and 'content' must be true or false")
        if not tree:
            size = 0
            pending = b""
            while True:
                kind, got, body = conn.recv()
                if got != reqid or kind not in (P.DATA, P.END):
                    raise P.ProtocolError(
                        f"{P.KIND_NAMES[kind]} for request {got} arrived inside the paths of DESCRIBE request {reqid}"
                    )
                if kind == P.END:
                    P.decode_json(kind, body)
                    if pending:
                        raise P.ProtocolError("the paths of a DESCRIBE request end inside a line")
                    break
                size += len(body)
                if size > P.MAX_DESCRIBE_REQUEST:
                    raise P.ProtocolError(f"a DESCRIBE request sends more than {P.MAX_DESCRIBE_REQUEST} bytes of paths")
                *lines, pending = (pending + body).split(b"\n")
                for line in lines:
                    try:
                        item = json.loads(line.decode("utf-8"))
                    except (UnicodeDecodeError, ValueError, RecursionError):
                        raise P.ProtocolError("a DESCRIBE path line is not JSON") from None
                    if (
                        not isinstance(item, list)
                        or len(item) not in (2, 3)
                        or not isinstance(item[0], str)
                        or not isinstance(item[1], bool)
                    ):
                        raise P.ProtocolError("a DESCRIBE path line is not [path, content] or [path, content, ranges]")
                    if len(item) == 3:  # capability "ranges"
                        ranges[item[0]] = P.ranges_of(item[2])
                    if problem is None:
                        try:
                            check_path_or_root(item[0])
                        except CoalesceError as exc:
                            problem = exc
                    paths.append((item[0], item[1]))
                    if len(paths) > P.MAX_DESCRIBE_PATHS:
                        raise P.ProtocolError(f"a DESCRIBE request names more than {P.MAX_DESCRIBE_PATHS} paths")
        q = self._qtree(conn, ident, grant, vname, args)
        snap = self._pcpi(conn, ident, grant, args, "snapshot")
        if problem is not None:
            raise P.RemoteError(f"DESCRIBE: {problem}", code="bad-request", hint=problem.hint or None)
        vol = self._volume(vname)
        counter = {"n": 0}

        def description_lines() -> Iterator[bytes]:
            # runs in _with_keepalive's thread: a slow describe (digests of large files) is not a dead server
            for d in vol.describe_tree(q, snap, content=content) if tree else vol.describe(q, snap, paths, ranges):
                counter["n"] += 1
                yield (json.dumps(description_to_json(d), separators=(",", ":")) + "\n").encode("ascii")

        sent = self._send_stream(conn, reqid, P.pieces(description_lines(), P.DATA_CHUNK), method)
        conn.send_json(P.END, reqid, {"count": counter["n"], "bytes": sent})
        with self._lock:
            self.stats["bytes_out"] += sent
        log.info("%r: described %d paths of %s in %s of %s (%d bytes)", ident, counter["n"], q, snap, vname, sent)


#: how often a reply waiting for a slow backend looks whether the client hung up (seconds)
HANGUP_POLL = 0.25


def _with_keepalive(chunks: Iterator[bytes], interval: float) -> Iterator[bytes | None]:
    """Yield ``chunks`` as they come, and None whenever none came for ``interval`` seconds.

    The producer runs in a thread (a slow backend diff must not look like a
    dead server to the client); it stops when the consumer goes away, which
    does not wait for it."""
    return read_ahead(chunks, 16, name="coalesce-serve-diff", idle=interval, wait=False)


def _segment(
    records: Iterator[Any], qtree: str, base: str | None, target: str, skip: int, counter: dict
) -> Iterator[Any]:
    """The stream from change record ``skip`` on: Begin, changes[skip:], End(count): a valid stream itself."""
    it = iter(records)
    first = next(it, None)
    if type(first) is not Begin:
        raise CoalesceError(f"the source backend's diff of {qtree} did not start with Begin")
    yield Begin(qtree=first.qtree, base=base, target=target)
    skipped = n = 0
    for rec in it:
        if type(rec) is End:
            if skipped < skip:
                raise P.RemoteError(
                    f"cannot resume {qtree} {base}..{target} at record {skip}: the stream has only "
                    f"{skipped} change records",
                    code="bad-request",
                )
            counter["n"] = n
            yield End(records=n)
            return
        if skipped < skip:
            skipped += 1
            continue
        n += 1
        yield rec
    raise CoalesceError(f"the source backend's diff of {qtree} ended without End")


# --------------------------------------------------------------------------- listeners
def serve_stdio(service: SourceService, identity: str, rfd: int = 0, wfd: int = 1) -> None:
    """Serve one connection on file descriptors (ssh's forced command)."""
    chan = P.FdChannel(
        rfd, wfd, peer=f"ssh:{os.environ.get('SSH_CLIENT', 'stdio').split(' ')[0]}", timeout=service.config.timeout
    )
    service.serve_connection(P.Connection(chan), identity)


def tls_server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the server certificate/key/CA ({cert}, {key}, {ca}): {exc}",
            hint="see docs/network.md for making them with openssl",
        ) from None
    return ctx


def identity_of(cert: dict | None) -> str | None:
    """The client identity: the subject CN of its (verified) certificate."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class TLSServer:
    """``coalesce serve --listen``: mutual TLS 1.3, a thread per connection."""

    def __init__(self, service: SourceService, host: str, port: int, ctx: ssl.SSLContext) -> None:
        self.service = service
        self.ctx = ctx
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
            self.sock.listen(128)
        except OSError as exc:
            self.sock.close()
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                hint="another process uses that port (`ss -ltnp` names it) or the address is not this host's: "
                "choose another --listen / [server] listen",
            ) from None
        self.sock.settimeout(0.5)  # so that stop() is noticed
        self.address = self.sock.getsockname()[:2]
        self._stop = threading.Event()
        # every connection from accept to close, by number: its socket (the TLS one once wrapped);
        # these are the connection slots max_connections counts
        self._conns: dict[int, socket.socket] = {}
        self._serial = 0
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> "TLSServer":
        self._thread = threading.Thread(target=self.serve_forever, name="coalesce-serve-accept", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        log.info("listening on %s:%d (mutual TLS 1.3)", *self.address)
        while not self._stop.is_set():
            try:
                raw, addr = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            accepted = time.monotonic()
            with self._lock:
                if len(self._conns) >= self.service.config.max_connections:
                    log.warning("refused %s:%s: %d connections already", addr[0], addr[1], len(self._conns))
                    raw.close()
                    continue
                self._serial += 1
                key = self._serial
                self._conns[key] = raw
            t = threading.Thread(
                target=self._handle,
                args=(key, raw, addr, accepted),
                name=f"coalesce-serve-{addr[0]}:{addr[1]}",
                daemon=True,
            )
            with self._lock:
                self._threads.add(t)
            t.start()

    @property
    def connections(self) -> int:
        """Connections now open, from accept to close (TLS handshakes included)."""
        with self._lock:
            return len(self._conns)

    def _handle(self, key: int, raw: socket.socket, addr: Any, accepted: float) -> None:
        """Serve one accepted connection; it holds its slot until it is closed, here."""
        peer = f"{addr[0]}:{addr[1]}"
        cfg = self.service.config
        sock: socket.socket = raw
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            P.tcp_keepalive(raw, cfg.keepalive)
            tls = self.ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            sock = tls
            with self._lock:
                self._conns[key] = tls  # stop() can shut it down mid-handshake
            try:
                # the timeout of a TLS handshake bounds all of it, however slowly the bytes come
                tls.settimeout(max(0.001, accepted + cfg.handshake_timeout - time.monotonic()))
                tls.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                with self.service._lock:
                    self.service.stats["refused"] += 1
                why = f"not done within handshake_timeout ({cfg.handshake_timeout:g} s)" if _timed_out(exc) else exc
                log.warning("refused %s: TLS handshake failed: %s", peer, why)
                return
            ident = identity_of(tls.getpeercert())
            if not ident:
                log.warning("refused %s: its certificate has no subject CN", peer)
                return
            self.service.serve_connection(
                P.Connection(P.SocketChannel(tls, peer, cfg.timeout)), ident, accepted + cfg.handshake_timeout
            )
        except Exception:
            log.exception("connection %s", peer)
        finally:
            P.shut(sock)
            with self._lock:
                self._conns.pop(key, None)
                self._threads.discard(threading.current_thread())

    def stop(self) -> None:
        self._stop.set()
        P.shut(self.sock)
        with self._lock:
            conns = list(self._conns.values())
            threads = list(self._threads)
        for c in conns:
            P.shut(c)
        for t in threads:
            t.join(5)
        if self._thread is not None:
            self._thread.join(5)


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, (socket.timeout, TimeoutError)) or "timed out" in str(exc)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {text!r}: not HOST:PORT")
    return host, int(port)


# --------------------------------------------------------------------------- CLI
@hookimpl
def coalesce_cli_commands(subparsers: Any) -> None:
    add_serve_command(subparsers)


def add_serve_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``coalesce serve`` to the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "serve",
        help="serve source volumes to destination agents (ssh or mutual TLS)",
        description="The source service (docs/network.md).",
    )
    _serve_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stdio", action="store_true", help="one connection on stdin/stdout (ssh forced command)")
    mode.add_argument("--listen", metavar="HOST:PORT", nargs="?", const="", help="mutual TLS 1.3 listener")
    p.add_argument("--config", required=True, metavar="FILE", help="the server's TOML config")
    p.add_argument(
        "--identity", metavar="NAME", help="--stdio: the client identity (set it in the authorized_keys forced command)"
    )
    p.add_argument("--bandwidth", metavar="RATE", help='per-connection limit, e.g. "20MiB/s" (overrides the config)')
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


#: where ``--stdio`` logs without ``log`` in [server]: the host's syslog socket (journald reads it)
SYSLOG = "/dev/log"


def log_handler(config: ServerConfig, stdio: bool, syslog: str = SYSLOG) -> logging.Handler:
    """Where the server's log goes: ``log`` in [server] when set; else, with ``--stdio``, the
    host's syslog (``syslog``; nothing when there is none), never standard error: behind ssh
    standard error reaches the client, which would read the server's log (identities, volume
    names, refusals) and show it; else (``--listen``) standard error.  Every record is one
    line whatever text a peer put in it (coalesce_core.ui.peertext)."""
    handler: logging.Handler
    if config.log:
        handler = logging.FileHandler(config.log)
    elif not stdio:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists(syslog):
        handler = logging.handlers.SysLogHandler(address=syslog, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(LineFormatter("coalesce-serve[%(process)d]: %(levelname)s %(message)s"))
        return handler
    else:
        return logging.NullHandler()
    handler.setFormatter(LineFormatter("%(asctime)s coalesce-serve[%(process)d] %(levelname)s %(message)s"))
    return handler


def run_serve(args: argparse.Namespace) -> int:
    config = load_server_config(args.config)
    handler = log_handler(config, bool(args.stdio))
    log.addHandler(handler)
    log.propagate = False  # its own destination: not printed again by the `coalesce` verbs' log (ui/logs.py)
    log.setLevel(args.log_level)
    try:
        bw = P.parse_rate(args.bandwidth) if args.bandwidth else None
    except ValueError as exc:
        raise ConfigError(f"--bandwidth: {exc}") from None
    check_bandwidth(bw, config.min_rate, "--bandwidth")
    service = SourceService(config, bandwidth=bw)
    if args.stdio:
        ident = args.identity or os.environ.get("COALESCE_IDENTITY")
        if not ident:
            raise ConfigError(
                "--stdio needs --identity NAME (the forced command of the client's ssh key sets it)",
                hint="see docs/network.md, 'SSH'",
            )
        # Nothing but the protocol may reach stdout: move our stdout out of the way.
        wfd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        serve_stdio(service, ident, 0, wfd)
        return 0
    listen = args.listen or config.listen
    if not listen:
        raise ConfigError("--listen needs HOST:PORT (or `listen` in [server])")
    if not (config.cert and config.key and config.ca):
        raise ConfigError("--listen needs cert, key and ca in [server]", hint="mutual TLS needs all three")
    host, port = parse_listen(listen)
    server = TLSServer(service, host, port, tls_server_context(config.cert, config.key, config.ca))
    print(f"coalesce serve: listening on {server.address[0]}:{server.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coalesce serve", description="The coalesce source service.")
    _serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except CoalesceError as exc:
        return report_error(exc, styled=False, prog="coalesce serve")


if __name__ == "__main__":
    sys.exit(main())
