"""The client side: a volume handle that is a proxy to a source service.

``RemoteVolume`` answers the source-volume primitives an agent needs
(snapshot create/delete/list, qtree list, diff, fingerprint, describe) by asking the
source service (coalesce_remote.serve) over ssh or mutual TLS.  Everything a
destination writes stays local; the remote side is only read (and asked to
take and release source PCPIs).

Control requests share one connection (reopened transparently when it
drops: every request is idempotent).  Each diff stream and each describe has a
connection of its own while it runs, so transfers run in parallel: a finished
one from the volume's idle pool, else a new one; it goes back to the pool only
when its request ended cleanly (docs/network.md, "Connections").  A stream
**resumes**: the client counts
the change records it has delivered; when the connection drops it
reconnects and asks for the same (qtree, base, target) from that record,
and the server regenerates the deterministic stream and skips to it.  Only
after ``retries`` failed attempts in a row does the iterator raise (the
agent then takes the rollback path).
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import socket
import ssl
import subprocess
import threading
import time
import tomllib
import weakref
from collections import deque
from typing import Any, Iterator, Mapping

import attrs

from coalesce_core import deadlines
from coalesce_core.backend.handles import VolumeHandle
from coalesce_core.backend.urls import VolumeURL, check_authority
from coalesce_core.errors import BackendError, ConfigError, CorruptStream, HostilePath, StreamError, UnrequestedStream
from coalesce_core.stream import codec
from coalesce_core.stream.records import Begin, End
from coalesce_core.stream.requested import check_begin
from coalesce_core.ui.peertext import clean

from . import protocol as P

_OPEN: "weakref.WeakSet[RemoteVolume]" = weakref.WeakSet()


# --------------------------------------------------------------------------- settings
@attrs.frozen
class ClientSettings:
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None
    compression: str = "auto"  # auto | zlib | zstd | none
    bandwidth: float | None = None  # bytes/s asked of the server (it applies the smaller of both limits)
    retries: int = 3
    retry_delay: float = 1.0
    timeout: float = 30.0  # no data for this long: the peer or the link is dead
    keepalive: float = 15.0
    ssh: tuple[str, ...] = ("ssh",)
    ssh_remote_command: str = "coalesce serve --stdio"


#: the tables of client settings (the COALESCE_CLIENT_CONFIG file, a source's [source.*] tables):
#: table -> key -> the ClientSettings field it sets (docs/network.md, "Client settings")
TABLES: dict[str, dict[str, str]] = {
    "tls": {"cert": "cert", "key": "key", "ca": "ca", "server_name": "server_name"},
    "transfer": {k: k for k in ("compression", "bandwidth", "retries", "retry_delay", "timeout", "keepalive")},
    "ssh": {"command": "ssh", "remote_command": "ssh_remote_command"},
}

_HINT = 'see docs/network.md, "Client settings"'


def settings_fields(tables: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ClientSettings fields, converted and checked, that ``tables`` (``{"tls": {...},
    "transfer": {...}, "ssh": {...}}``) set; a ConfigError naming ``where`` for an unknown table or
    key or a bad value."""
    return _converted(_raw_fields(tables, where), where)


def with_options(base: ClientSettings, options: Mapping[str, Any] | None, where: str) -> ClientSettings:
    """``base`` (the process-wide settings) with what a source's transport tables ``options`` set:
    they override it key by key."""
    return attrs.evolve(base, **settings_fields(options, where)) if options else base


def load_settings(env: dict[str, str] | None = None) -> ClientSettings:
    """Client settings: the TOML file ``COALESCE_CLIENT_CONFIG`` (if set), then ``COALESCE_*`` variables."""
    env = dict(os.environ if env is None else env)
    kw: dict[str, Any] = {}
    path = env.get("COALESCE_CLIENT_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read the client config {path}: {exc}", hint="see docs/network.md") from None
        kw = _raw_fields(data, path)
    for var, k in (
        ("COALESCE_TLS_CERT", "cert"),
        ("COALESCE_TLS_KEY", "key"),
        ("COALESCE_TLS_CA", "ca"),
        ("COALESCE_TLS_SERVER_NAME", "server_name"),
        ("COALESCE_COMPRESSION", "compression"),
        ("COALESCE_BANDWIDTH", "bandwidth"),
        ("COALESCE_RETRIES", "retries"),
        ("COALESCE_RETRY_DELAY", "retry_delay"),
        ("COALESCE_TIMEOUT", "timeout"),
        ("COALESCE_SSH", "ssh"),
        ("COALESCE_SSH_REMOTE_COMMAND", "ssh_remote_command"),
    ):
        if env.get(var):
            kw[k] = env[var]
    return ClientSettings(**_converted(kw, "client settings"))


def _raw_fields(tables: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The fields ``tables`` set, as written."""
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {sorted(unknown)}", hint="[tls], [transfer], [ssh]")
    kw: dict[str, Any] = {}
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: [{name}] must be a table", hint=_HINT)
        keys = TABLES[name]
        if set(table) - set(keys):
            raise ConfigError(
                f"{where}: [{name}]: unknown key(s) {sorted(set(table) - set(keys))}",
                hint=f"known keys: {sorted(keys)}",
            )
        kw.update((keys[k], v) for k, v in table.items())
    return kw


def _ssh_command(value: Any) -> tuple[str, ...]:
    return tuple(shlex.split(value) if isinstance(value, str) else map(str, value))


#: how each ClientSettings field is made from what was written (a TOML value or an environment variable's text)
_CONVERT: dict[str, Any] = {
    "cert": str,
    "key": str,
    "ca": str,
    "server_name": str,
    "ssh_remote_command": str,
    "ssh": _ssh_command,
    "bandwidth": P.parse_rate,
    "retries": int,
    "retry_delay": float,
    "timeout": float,
    "keepalive": float,
    "compression": lambda value: str(value).lower(),
}


def _converted(kw: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields ``kw`` (as written) converted to ClientSettings' types and checked; a ConfigError
    naming ``where`` and the field."""
    out: dict[str, Any] = {}
    for k, value in kw.items():
        try:
            out[k] = _CONVERT[k](value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: `{k}`: {exc}", hint=_HINT) from None
    if out.get("compression", "auto") not in ("auto", "none", *P.COMPRESSIONS):
        raise ConfigError(
            f"{where}: compression {out['compression']!r} is not one of auto, none, {', '.join(P.COMPRESSIONS)}",
            hint=_HINT,
        )
    if out.get("retries", 0) < 0 or out.get("timeout", 1.0) <= 0:
        raise ConfigError(f"{where}: retries must be >= 0 and timeout > 0", hint=_HINT)
    return out


# --------------------------------------------------------------------------- URLs
@attrs.frozen
class Target:
    scheme: str
    host: str
    port: int | None
    user: str | None
    volume: str

    @classmethod
    def parse(cls, url: VolumeURL) -> "Target":
        loc = url.location
        authority, sep, volume = loc.partition("/")
        if not sep or not volume or not authority:
            want = "ssh://[user@]host[:port]/<volume URL>" if url.scheme == "ssh" else "tls://host:port/<volume name>"
            raise ConfigError(f"{url} is not a remote volume URL", hint=f"write {want}")
        check_authority(str(url), authority)  # also when the URL did not come through a config
        user = None
        if "@" in authority:
            user, authority = authority.rsplit("@", 1)
        if authority.startswith("["):
            host, _, rest = authority[1:].partition("]")
            port_s = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_s = authority.partition(":")
        port = None
        if port_s:
            if not port_s.isdigit() or not 0 < int(port_s) < 65536:
                raise ConfigError(f"{url}: port {port_s!r} is not a port number")
            port = int(port_s)
        if not host:
            raise ConfigError(f"{url}: no host")
        if url.scheme == "tls" and port is None:
            port = P.DEFAULT_PORT
        return cls(url.scheme, host, port, user, volume)


# --------------------------------------------------------------------------- sessions
class TLSRefused(BackendError):
    """The TLS handshake failed (certificate refused, unknown CA, expired...); not retried."""


class Session:
    """One open connection after the handshake, used by one thread at a time."""

    def __init__(self, conn: P.Connection, welcome: dict[str, Any], proc: subprocess.Popen | None = None) -> None:
        self.conn = conn
        self.welcome = welcome
        self.proc = proc
        self._ids = 0
        self.last_used = time.monotonic()
        #: every request sent on it was answered to its end (a REPLY, a PONG, a stream's END): the
        #: connection is at a message boundary, nothing of an earlier request is left to read, and
        #: it may serve the next request (RemoteVolume's idle pool takes back only such a session)
        self.settled = True
        #: messages of the reply to the last request received so far (none: the request may have
        #: found a connection that died while it was idle)
        self.received = 0

    def next_id(self) -> int:
        self._ids = (self._ids + 1) % (1 << 32) or 1
        return self._ids

    def request(self, op: str, args: dict[str, Any]) -> int:
        """Send request ``op``; its id.  The session is unsettled until its reply is read to its end."""
        rid = self.next_id()
        self.settled = False
        self.received = 0
        self.conn.send_json(P.REQUEST, rid, {"op": op, "args": args})
        return rid

    def call(self, op: str, args: dict[str, Any]) -> Any:
        rid = self.request(op, args)
        _, got, reply = self.conn.recv_json((P.REPLY, P.ERROR))
        if got != rid:
            raise P.ProtocolError(f"reply for request {got}, expected {rid}")
        self.settled = True
        self.last_used = time.monotonic()
        return reply.get("result")

    def ping(self) -> None:
        rid = self.next_id()
        self.settled = False
        self.conn.send(P.PING, rid, b"")
        kind, got, _ = self.conn.recv()
        if kind != P.PONG or got != rid:
            raise P.ProtocolError("the server did not answer PING with PONG")
        self.settled = True
        self.last_used = time.monotonic()

    def close(self) -> None:
        self.conn.close()

    def abort(self) -> None:
        """Close at once, whatever the peer does: an ssh child is killed, not waited for."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.close()


def _within(seconds: float) -> float:
    """``seconds``, or less: what is left of the deadline of the transfer this thread runs for
    (coalesce_core.deadlines); DeadlineExceeded when nothing is."""
    transfer = deadlines.current()
    left = transfer.left() if transfer is not None else None
    if transfer is None or left is None:
        return seconds
    if left <= 0:
        raise transfer.error()
    return min(seconds, left)


class _Stderr:
    """Keeps the last lines an ssh process wrote to stderr (for error messages)."""

    def __init__(self, stream: Any) -> None:
        self.lines: deque[str] = deque(maxlen=20)
        self.t = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.t.start()

    #: the longest piece of a line kept at once: an ssh (or a command behind it) that writes without
    #: newlines during a long transfer must not grow the agent's memory
    LINE_MAX = 4096

    def _run(self, stream: Any) -> None:
        for line in iter(lambda: stream.readline(self.LINE_MAX), b""):
            self.lines.append(clean(line.decode("utf-8", "replace").rstrip()))  # the peer's text
        stream.close()

    def text(self, wait: float = 0.0) -> str:
        """The last lines; ``wait``: first give the reader that long to reach the end of the stream (an
        ssh that closed the connection writes its reason, e.g. "Permission denied", as it exits)."""
        if wait:
            self.t.join(wait)
        return " | ".join(self.lines)


class RemoteVolume(VolumeHandle):
    """A source volume behind a source service (the ``ssh`` and ``tls`` backends' handle)."""

    #: diff yields records the codec has already decoded and checked (frame checksums, trailer
    #: digest, paths), so the agent does not encode and decode them a second time
    records_decoded = True
    #: ``diff(..., skip=k)``: the server regenerates the stream and skips its first k change records
    resumable_diff = True

    def __init__(self, url: VolumeURL, settings: ClientSettings | None = None) -> None:
        self.url = str(url)
        self.target = Target.parse(url)
        self.settings = settings or load_settings()
        self._ctl: Session | None = None
        self._lock = threading.Lock()
        self._sessions: set[Session] = set()
        #: the idle pool: finished stream sessions, the most recently used last (under _slock)
        self._idle: list[Session] = []
        self._slock = threading.Lock()
        #: ``reused``: stream requests served by a session from the idle pool
        self.stats = {"connections": 0, "reused": 0, "resumes": 0, "bytes_in": 0, "records": 0}
        self.welcome: dict[str, Any] = {}
        _OPEN.add(self)

    def __repr__(self) -> str:
        return f"RemoteVolume({self.url})"

    # -- connecting
    def _connect(self) -> Session:
        t = self.target
        s = self.settings
        if t.scheme == "tls":
            chan, proc, stderr = self._tls_channel(), None, None
        else:
            chan, proc, stderr = self._ssh_channel()
        conn = P.Connection(chan)
        try:
            conn.send_preamble()
            conn.read_preamble()
            caps = ["resume", "ranges"] + (
                [c for c in P.COMPRESSIONS]
                if s.compression == "auto"
                else []
                if s.compression == "none"
                else [s.compression]
            )
            conn.send_json(
                P.HELLO,
                0,
                {
                    "protocol": P.PROTOCOL_VERSION,
                    "volume": t.volume,
                    "capabilities": caps,
                    "client": "coalesce",
                    "bandwidth": s.bandwidth,
                },
            )
            _, _, welcome = conn.recv_json((P.WELCOME, P.ERROR))
            if welcome.get("protocol") != P.PROTOCOL_VERSION:
                raise P.ProtocolError(f"the server answered with protocol {welcome.get('protocol')!r}")
            comp = welcome.get("compression")
            if comp is not None and comp not in caps:
                raise P.ProtocolError(f"the server chose compression {comp!r}, which this client did not offer")
        except P.ConnectionLost as exc:
            conn.close()
            said = stderr.text(wait=2.0) if stderr is not None else ""
            extra = f" (ssh: {said})" if said else ""
            if isinstance(exc.__cause__, ssl.SSLError):
                raise TLSRefused(
                    f"{self.url}: the server refused the TLS connection: {exc.__cause__}",
                    hint="check the client certificate, its CA and its dates (docs/network.md)",
                ) from None
            raise P.ConnectionLost(f"{self.url}: {exc.message}{extra}", hint=exc.hint) from None
        except BaseException:
            conn.close()
            raise
        sess = Session(conn, welcome, proc)
        self.welcome = welcome
        self.stats["connections"] += 1
        with self._slock:
            self._sessions.add(sess)
        return sess

    def _tls_channel(self) -> P.Channel:
        t, s = self.target, self.settings
        if not (s.cert and s.key and s.ca):
            raise ConfigError(
                f"{self.url}: a tls:// source needs a client certificate, key and CA",
                hint="set COALESCE_TLS_CERT, COALESCE_TLS_KEY, COALESCE_TLS_CA or [tls] in the "
                "client config (COALESCE_CLIENT_CONFIG); docs/network.md",
            )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_cert_chain(s.cert, s.key)
            ctx.load_verify_locations(cafile=s.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the client certificate/key/CA: {exc}", hint="docs/network.md") from None
        peer = f"{t.host}:{t.port}"
        try:
            raw = socket.create_connection((t.host, t.port), timeout=_within(s.timeout))
        except OSError as exc:
            raise P.ConnectionLost(
                f"{self.url}: cannot connect to {peer}: {exc}",
                hint="is `coalesce serve --listen` running there, and the port open?",
            ) from None
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            P.tcp_keepalive(raw, s.keepalive)
            tls = ctx.wrap_socket(raw, server_hostname=s.server_name or t.host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise TLSRefused(
                f"{self.url}: the server's certificate is not trusted: {exc.verify_message}",
                hint="COALESCE_TLS_CA must be the CA that signed the server's certificate, and the "
                "certificate must name the host of the URL (or set COALESCE_TLS_SERVER_NAME)",
            ) from None
        except ssl.SSLError as exc:
            raw.close()
            raise TLSRefused(f"{self.url}: TLS handshake failed: {exc}", hint="docs/network.md") from None
        except OSError as exc:
            raw.close()
            raise P.ConnectionLost(f"{self.url}: TLS handshake with {peer} failed: {exc}") from None
        return P.SocketChannel(tls, peer, s.timeout)

    def ssh_argv(self) -> list[str]:
        """The ssh command line: options, then ``--``, the host and the remote command (docs/network.md, "SSH")."""
        t, s = self.target, self.settings
        cmd = list(s.ssh) + [
            "-o",
            "BatchMode=yes",
            "-o",
            f"ServerAliveInterval={max(1, int(s.keepalive))}",
            "-o",
            "ServerAliveCountMax=3",
            "-T",
        ]
        if t.port:
            cmd += ["-p", str(t.port)]
        if t.user:
            cmd += ["-l", t.user]
        # after "--" the host is never an option, whatever it holds (docs/network.md, "Threat model")
        cmd += ["--", t.host, s.ssh_remote_command]
        return cmd

    def _ssh_channel(self) -> tuple[P.Channel, subprocess.Popen, _Stderr]:
        t, s = self.target, self.settings
        cmd = self.ssh_argv()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                bufsize=0,
            )
        except OSError as exc:
            raise BackendError(
                f"{self.url}: cannot run {cmd[0]!r}: {exc}", hint="install an ssh client or set COALESCE_SSH"
            ) from None
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None  # stdin=, stdout=PIPE: Popen made them
        err = _Stderr(proc.stderr)

        def close() -> None:
            for f in (stdin, stdout):
                try:
                    f.close()
                except OSError:
                    pass
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        chan = P.FdChannel(stdout.fileno(), stdin.fileno(), peer=f"ssh {t.host}", timeout=s.timeout, on_close=close)
        return chan, proc, err

    def _forget(self, sess: Session | None, abort: bool = False) -> None:
        if sess is None:
            return
        with self._slock:
            self._sessions.discard(sess)
            if sess in self._idle:
                self._idle.remove(sess)
        try:
            if abort:
                sess.abort()
            else:
                sess.close()
        except Exception:
            pass

    def _backoff(self, attempt: int) -> None:
        delay = min(10.0, self.settings.retry_delay * (2**attempt))
        wait = _within(delay)
        time.sleep(wait)
        if wait < delay:  # the transfer's deadline came first
            _within(delay)

    # -- the idle pool (docs/network.md, "Connections")
    @property
    def idle_sessions(self) -> int:
        """How many finished stream sessions wait in the idle pool now."""
        with self._slock:
            return len(self._idle)

    def _checkout(self) -> tuple[Session, bool]:
        """A session for one stream request (diff, describe), and whether it came from the idle
        pool.  An idle session is taken when there is one (the most recently used first): one whose
        peer hung up is closed and the next tried, one idle longer than ``keepalive`` is pinged
        first (as :meth:`call` does) and closed when that fails; none left: a new connection.  A
        new connection is opened only when no idle session exists, so the sessions open at once
        (idle or in use) are never more than the stream requests that ran at once: the source's
        ``parallel`` and the group's transfer concurrency bound the pool."""
        while True:
            with self._slock:
                sess = self._idle.pop() if self._idle else None
            if sess is None:
                return self._connect(), False
            if sess.conn.channel.hung_up():
                self._forget(sess)
                continue
            if time.monotonic() - sess.last_used > self.settings.keepalive:
                try:
                    sess.ping()
                except (P.ConnectionLost, P.ProtocolError):
                    self._forget(sess)  # died (or broke) while idle: costs no attempt
                    continue
                except BaseException:
                    self._forget(sess, abort=True)
                    raise
            self.stats["reused"] += 1
            return sess, True

    def _checkin(self, sess: Session) -> None:
        """Give ``sess`` back to the idle pool when its last request ended cleanly (settled: its
        reply read to its END, nothing left unread) and the volume was not closed meanwhile;
        else close it."""
        if sess.settled:
            sess.last_used = time.monotonic()
            with self._slock:
                if sess in self._sessions:
                    self._idle.append(sess)
                    return
        self._forget(sess)

    def connect(self) -> None:
        """Open the control connection now (open_volume calls it so errors surface early)."""
        self.call("snapshots")

    def call(self, op: str, **args: Any) -> Any:
        """One idempotent request on the control connection, reconnecting up to ``retries`` times."""
        last: Exception | None = None
        with self._lock:
            attempt = 0
            while attempt <= self.settings.retries:
                reused = self._ctl is not None
                try:
                    if self._ctl is None:
                        self._ctl = self._connect()
                    elif time.monotonic() - self._ctl.last_used > self.settings.keepalive:
                        self._ctl.ping()
                    return self._ctl.call(op, args)
                except P.ConnectionLost as exc:
                    last = exc
                    self._forget(self._ctl)
                    self._ctl = None
                    if reused:
                        continue  # a connection that died while idle costs no attempt: reconnect now
                    if attempt < self.settings.retries:
                        self._backoff(attempt)
                    attempt += 1
                except BaseException:  # a protocol error, a transfer's deadline mid-message: not reused
                    self._forget(self._ctl)
                    self._ctl = None
                    raise
        raise BackendError(
            f"{self.url}: {op} failed after {self.settings.retries + 1} attempts: {last}",
            hint=getattr(last, "hint", "") or "check the link and the source service",
        )

    # -- the primitives
    def snapshot_list(self) -> list[str]:
        return _names(self.call("snapshots"))

    def snapshot_create(self, name: str) -> str:
        got = self.call("take", name=name)
        if got != name:
            raise P.ProtocolError(f"the server answered take({name!r}) with {str(got)[:80]!r}")
        return name

    def snapshot_delete(self, name: str) -> bool:
        return bool(self.call("release", name=name))

    def qtree_list(self, snapshot: str | None) -> list[str]:
        return _names(self.call("qtrees", snapshot=snapshot))

    def fingerprint(self, qtree: str, snapshot: str | None) -> str:
        got = self.call("fingerprint", qtree=qtree, snapshot=snapshot)
        if not isinstance(got, str) or len(got) > 256:
            raise P.ProtocolError("the server's fingerprint is not a short string")
        return got

    def diff(self, qtree: str, base: str | None, target: str, skip: int = 0) -> Iterator[Any]:
        """Begin, the change records after the first ``skip``, End (whose count includes the skipped)."""
        if not isinstance(skip, int) or skip < 0:
            raise ValueError(f"skip must be a non-negative int, not {skip!r}")
        return self._diff(qtree, base, target, skip)

    def _diff(self, qtree: str, base: str | None, target: str, skip: int = 0) -> Iterator[Any]:
        delivered = skip
        failures = 0  # failed attempts in a row that delivered no new record
        resumes = 0  # every resume of this transfer (bounded: a hostile server cannot loop us)
        max_resumes = 4 * max(1, self.settings.retries)
        begun = False
        while True:
            sess: Session | None = None
            reused = False
            try:
                sess, reused = self._checkout()
                rid = sess.request("diff", {"qtree": qtree, "base": base, "target": target, "skip": delivered})
                chunks = self._chunks(sess, rid)
                seg = 0
                for rec in codec.decode(chunks):
                    if isinstance(rec, Begin):
                        check_begin(rec, qtree, base, target)  # every resume's Begin too
                        if not begun:
                            begun = True
                            yield rec
                        continue
                    if isinstance(rec, End):
                        if rec.records != seg:
                            raise CorruptStream("the End record does not count the records received")
                        # the codec read to the end of its input (nothing after the trailer), so the
                        # reply's END is read: the session is settled, and goes back to the pool
                        self._checkin(sess)
                        sess = None
                        yield End(records=delivered)
                        return
                    seg += 1
                    delivered += 1
                    self.stats["records"] += 1
                    failures = 0  # progress was made: the retry budget is per stall, not per transfer
                    yield rec
            except deadlines.DeadlineExceeded:
                self._forget(sess, abort=True)  # closed (its ssh killed), not resumed
                sess = None
                raise
            except (P.ConnectionLost, StreamError) as exc:
                if isinstance(exc, (HostilePath, UnrequestedStream)):
                    raise  # a hostile stream is not retried
                idle_death = reused and isinstance(exc, P.ConnectionLost) and sess is not None and not sess.received
                self._forget(sess)
                sess = None
                if idle_death:
                    continue  # a pooled session that died while idle costs no attempt: a new connection now
                failures += 1
                resumes += 1
                if failures > self.settings.retries or resumes > max_resumes:
                    raise BackendError(
                        f"{self.url}: transfer of {qtree} {base}..{target} failed after {resumes} attempts "
                        f"({delivered} records delivered): {exc}",
                        hint="the update takes the rollback path and is retried next cycle",
                    ) from exc
                self.stats["resumes"] += 1
                self._backoff(failures - 1)
            finally:
                if sess is not None:  # an error, an abandoned or partly read stream: never pooled
                    self._forget(sess)

    # -- descriptions (verification; docs/protocol.md, DESCRIBE)
    @property
    def describes_ranges(self) -> bool:  # type: ignore[override]
        """The server of the last connection reads byte ranges (capability ``ranges``): an older
        one does not, and its paths are described whole (VolumeHandle.describes_ranges)."""
        return "ranges" in (self.welcome.get("capabilities") or ())

    def describe(self, qtree: str, snapshot: str | None, paths: Any, ranges: Any = None) -> list[Any]:
        """One Description per ``(path, content)``, asked in requests of at most MAX_DESCRIBE_PATHS;
        ``ranges`` are sent to a server that took the capability ``ranges`` (else the whole
        contents are described)."""
        paths = [(p, bool(c)) for p, c in paths]
        out: list[Any] = []
        for i in range(0, len(paths), P.MAX_DESCRIBE_PATHS):
            part = paths[i : i + P.MAX_DESCRIBE_PATHS]
            got = self._retrying(lambda: list(self._describe(qtree, snapshot, part, None, ranges)), f"describe {qtree}")
            if len(got) != len(part) or any(d.path != p for d, (p, _c) in zip(got, part)):
                raise P.ProtocolError(f"the server described {len(got)} paths for {len(part)} asked, or others")
            out.extend(got)
        return out

    def describe_tree(self, qtree: str, snapshot: str | None, content: bool) -> Iterator[Any]:
        """Every path of the qtree in path order, streamed (not retried: the walk is long and lazy)."""
        from coalesce_core.verify import path_key

        last: tuple | None = None
        for d in self._describe(qtree, snapshot, None, content):
            key = path_key(d.path)
            if last is not None and key <= last:
                raise P.ProtocolError("the server's tree descriptions are not in path order")
            last = key
            yield d

    def _retrying(self, fn: Any, what: str) -> Any:
        failures = 0
        while True:
            try:
                return fn()
            except P.ConnectionLost as exc:
                failures += 1
                if failures > self.settings.retries:
                    raise BackendError(
                        f"{self.url}: {what} failed after {failures} attempts: {exc}",
                        hint=exc.hint or "check the link and the source service",
                    ) from exc
                self._backoff(failures - 1)

    def _describe(
        self,
        qtree: str,
        snapshot: str | None,
        paths: list[tuple[str, bool]] | None,
        content: bool | None,
        ranges: Any = None,
    ) -> Iterator[Any]:
        from coalesce_core.verify import description_from_json

        args: dict[str, Any] = {"qtree": qtree, "snapshot": snapshot}
        if paths is None:
            args.update(tree=True, content=bool(content))
        while True:
            sess, reused = self._checkout()
            try:
                rid = sess.request("describe", args)
                if paths is not None:
                    self._send_paths(sess, rid, paths, ranges)
                yield from self._descriptions(sess, rid, description_from_json)
            except P.ConnectionLost:
                self._forget(sess)
                if reused and not sess.received:
                    continue  # a pooled session that died while idle costs no attempt: a new connection now
                raise
            except deadlines.DeadlineExceeded:
                self._forget(sess, abort=True)
                raise
            except BaseException:  # an error, a protocol error, a walk abandoned half read: never pooled
                self._forget(sess)
                raise
            self._checkin(sess)  # settled: its END was read
            return

    def _send_paths(self, sess: Session, rid: int, paths: list[tuple[str, bool]], ranges: Any) -> None:
        """The paths of describe request ``rid``: DATA messages of path lines (with their byte
        ranges when the server took the capability ``ranges``), then END."""
        asked = ranges if ranges and "ranges" in (sess.welcome.get("capabilities") or ()) else {}

        def path_line(p: str, c: bool) -> list[Any]:
            r = asked.get(p) if c else None
            return [p, c] if r is None else [p, c, [list(x) for x in r]]

        lines = ((json.dumps(path_line(p, c), separators=(",", ":")) + "\n").encode("ascii") for p, c in paths)
        for piece in P.pieces(lines, P.DATA_CHUNK):
            sess.conn.send(P.DATA, rid, piece)
        sess.conn.send_json(P.END, rid, {"paths": len(paths)})

    def _descriptions(self, sess: Session, rid: int, from_json: Any) -> Iterator[Any]:
        """The descriptions of the reply to describe request ``rid``, read to its END."""
        pending = b""
        for chunk in self._chunks(sess, rid):
            *lines_in, pending = (pending + chunk).split(b"\n")
            if len(pending) > P.MAX_DESCRIPTION_LINE:
                raise P.ProtocolError(f"a description from the server is longer than {P.MAX_DESCRIPTION_LINE} bytes")
            for line in lines_in:
                try:
                    d = from_json(json.loads(line.decode("utf-8")))
                except (UnicodeDecodeError, ValueError, RecursionError, StreamError) as exc:
                    raise P.ProtocolError(
                        f"the server sent a malformed description: {str(exc)[:200]}",
                        hint="the peer is broken or hostile",
                    ) from None
                transfer = deadlines.current()
                if transfer is not None:
                    transfer.asking()  # a description is progress (a keep-alive is not): the next one from now
                yield d
        if pending:
            raise P.ProtocolError("the server's descriptions end inside a line")

    def _chunks(self, sess: Session, rid: int) -> Iterator[bytes]:
        """The DATA bodies (decompressed) of the reply to request ``rid`` up to its END, which
        settles the session; an ERROR is raised."""
        dec = P.Decompressor(sess.welcome.get("compression"))
        while True:
            kind, got, body = sess.conn.recv()
            sess.received += 1
            if got != rid:
                raise P.ProtocolError(f"a message for request {got} arrived during request {rid}")
            if kind == P.DATA:
                self.stats["bytes_in"] += len(body)
                yield dec.decompress(body)
            elif kind == P.END:
                P.decode_json(kind, body)
                sess.settled = True
                return
            elif kind == P.ERROR:
                raise P.error_from(P.decode_json(kind, body))
            else:
                raise P.ProtocolError(f"{P.KIND_NAMES[kind]} arrived inside a change stream")

    def close(self) -> None:
        with self._lock:
            if self._ctl is not None:
                try:
                    self._ctl.call("bye", {})
                except Exception:
                    pass
            self._ctl = None
        with self._slock:  # the idle pool and the sessions in use (their requests then fail)
            sessions = list(self._sessions)
            self._sessions.clear()
            self._idle.clear()
        for s in sessions:
            try:
                s.close()
            except Exception:
                pass


def _names(value: Any) -> list[str]:
    if (
        not isinstance(value, list)
        or len(value) > P.MAX_LIST
        or not all(isinstance(v, str) and 0 < len(v) <= P.MAX_NAME for v in value)
    ):
        raise P.ProtocolError("the server's answer is not a list of names")
    return list(value)


def close_all() -> None:
    """Close every open remote volume of this process (tests, atexit)."""
    for v in list(_OPEN):
        try:
            v.close()
        except Exception:
            pass


atexit.register(close_all)
