"""The wire protocol between a destination agent and a source service (docs/protocol.md).

One connection carries, in order::

    both sides   preamble   b"COALPROT" u8 protocol-version
    client       HELLO      {"protocol", "volume", "capabilities", "client", "bandwidth"}
    server       WELCOME    {"protocol", "identity", "volume", "capabilities", "compression", ...}  or ERROR
    client       REQUEST    {"op", "args"}         (request id n)
    server       REPLY      {"result"}             (request id n)  or ERROR
                 or, for op "diff": DATA* then END {"records", "bytes"} or ERROR
                 or, for op "describe": the client's DATA* (path lines) and END,
                 then the server's DATA* (description lines) and END {"count"} or ERROR

Every message is one frame::

    u32 length | u8 kind | u32 request-id | body | u32 crc32

``length`` counts the bytes after the length field (kind, id, body, crc).
The crc covers every byte before it, the length field included.  All
integers are big-endian.  Control bodies (HELLO, WELCOME, REQUEST, REPLY,
ERROR, END) are UTF-8 JSON objects of at most :data:`MAX_CONTROL` bytes;
DATA bodies carry a piece of a change stream in the core's framed,
checksummed codec format (coalesce_core.stream.codec), compressed when the
handshake negotiated it, at most :data:`MAX_DATA_MESSAGE` bytes on the wire
and at most :data:`MAX_DATA_PLAIN` bytes once decompressed.

A peer that breaks any rule (bad magic, version, length, crc, kind, JSON,
field type or size) gets a :class:`ProtocolError`: the connection is closed
and nothing it sent is acted upon.
"""

from __future__ import annotations

import json
import math
import re
import select
import socket
import struct
import threading
import time
import zlib
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol, cast, overload

from coalesce_core import deadlines
from coalesce_core.errors import BackendError, CoalesceError
from coalesce_core.ui.peertext import clean

MAGIC = b"COALPROT"
PROTOCOL_VERSION = 2  # 2: descriptions keep security.* and trusted.* xattrs apart ("X")
PREAMBLE = MAGIC + bytes((PROTOCOL_VERSION,))

# message kinds
HELLO, WELCOME, REQUEST, REPLY, ERROR, DATA, END, PING, PONG = 1, 2, 3, 4, 5, 6, 7, 8, 9
KIND_NAMES = {
    HELLO: "HELLO",
    WELCOME: "WELCOME",
    REQUEST: "REQUEST",
    REPLY: "REPLY",
    ERROR: "ERROR",
    DATA: "DATA",
    END: "END",
    PING: "PING",
    PONG: "PONG",
}
CONTROL_KINDS = frozenset({HELLO, WELCOME, REQUEST, REPLY, ERROR, END})

#: Largest JSON body of a control message.
MAX_CONTROL = 64 << 10
#: Largest (compressed) DATA body on the wire.
MAX_DATA_MESSAGE = (1 << 20) + (64 << 10)
#: Largest DATA body after decompression (a decompression bomb is refused).
MAX_DATA_PLAIN = 2 << 20
#: What a sender puts in one DATA message (before compression).
DATA_CHUNK = 256 << 10
#: Largest name (volume, qtree, PCPI, identity) in a control message.
MAX_NAME = 255
#: Largest volume reference (a name or a volume URL) in HELLO.
MAX_VOLUME_REF = 4096
#: Largest list in a reply (PCPI and qtree lists).
MAX_LIST = 100_000
#: Most paths one DESCRIBE request names (a client splits a longer list into several requests).
MAX_DESCRIBE_PATHS = 1_000_000
#: Most bytes of path lines one DESCRIBE request sends (before the server has answered anything).
MAX_DESCRIBE_REQUEST = 256 << 20
#: Most byte ranges one path of a DESCRIBE request names (coalesce_core.verify.MAX_PARTS).
MAX_DESCRIBE_RANGES = 1024
#: Longest line (one description, a directory's entries included) in a DESCRIBE reply.
MAX_DESCRIPTION_LINE = 64 << 20

_HEAD = struct.Struct(">IBI")
_U32 = struct.Struct(">I")
_MIN_LENGTH = 1 + 4 + 4

_zstd: ModuleType | None
try:  # optional: zstd when the zstandard package is installed
    import zstandard as _zstd
except ImportError:  # pragma: no cover - depends on the installation
    _zstd = None

#: Compression methods this side can speak, best first (negotiated in the handshake).
COMPRESSIONS: tuple[str, ...] = ("zstd", "zlib") if _zstd is not None else ("zlib",)
#: ``ranges``: a describe path line may carry byte ranges, answered with part digests (docs/protocol.md)
CAPABILITIES: tuple[str, ...] = ("resume", "ranges", *COMPRESSIONS)

_NAME_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@+=:,-]*")

DEFAULT_PORT = 7450  # `coalesce serve --listen` and tls:// URLs without a port


def ranges_of(value: object) -> tuple[tuple[int, int], ...]:
    """The byte ranges of a describe path line: sorted, disjoint ``[start, end]`` pairs with
    ``0 <= start < end <= 2**63``, at most MAX_DESCRIBE_RANGES; ProtocolError otherwise."""
    if not isinstance(value, list) or len(value) > MAX_DESCRIBE_RANGES:
        raise ProtocolError(f"the ranges of a DESCRIBE path are not a list of at most {MAX_DESCRIBE_RANGES}")
    out: list[tuple[int, int]] = []
    last = 0
    for r in value:
        if (
            not isinstance(r, list)
            or len(r) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in r)
            or not last <= r[0] < r[1] <= 1 << 63
        ):
            raise ProtocolError("a DESCRIBE range is not a sorted, disjoint [start, end] pair")
        out.append((r[0], r[1]))
        last = r[1]
    return tuple(out)


def tcp_keepalive(sock: socket.socket, idle: float) -> None:
    """Probe an idle TCP connection after ``idle`` seconds (both ends use it: a dead peer is noticed)."""
    for opt, val in (
        ("TCP_KEEPIDLE", max(1, int(idle))),
        ("TCP_KEEPINTVL", max(1, int(idle) // 3)),
        ("TCP_KEEPCNT", 3),
    ):
        if hasattr(socket, opt):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
            except OSError:
                pass


def shut(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways (a thread blocked reading it returns) and close it; a socket
    already closed or reset is no error."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class ProtocolError(CoalesceError):
    """The peer broke the protocol (or is not a coalesce peer at all); the connection is closed."""

    exit_code = 7


class ConnectionLost(BackendError):
    """The transport failed: EOF, reset, timeout.  Retried (resumed) by the client."""


class RemoteError(BackendError):
    """The source service answered a request with an error (refusal, backend failure)."""

    def __init__(self, message: str, *, code: str = "error", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class Refused(RemoteError):
    """The server's authorization refused the request."""


# --------------------------------------------------------------------------- channels
class Pace:
    """The minimum rate of one request (docs/network.md, "Limits"): from its first byte to the
    end of its reply, the time spent waiting on the peer (reading what it sends, writing what it
    does not take) is at most ``grace`` seconds plus one second per ``min_rate`` bytes moved.
    Time the sender itself takes (a slow backend, its own bandwidth limit) does not count."""

    def __init__(self, grace: float, min_rate: float) -> None:
        self.grace = grace
        self.min_rate = min_rate
        self.start()

    def start(self) -> None:
        self.waited = 0.0
        self.moved = 0

    def left(self) -> float:
        return self.grace + self.moved / self.min_rate - self.waited

    def account(self, waited: float, moved: int) -> None:
        self.waited += waited
        self.moved += moved


class Channel:
    """A byte pipe with exact reads, timeouts and an optional bandwidth limit.

    Every read and write waits at most ``timeout`` seconds, and never past ``deadline``
    (a monotonic time, e.g. the end of the handshake) nor past what ``pace`` allows."""

    timeout: float | None = 30.0
    limiter: "RateLimiter | None" = None
    peer: str = "?"
    deadline: float | None = None
    deadline_what: str = "its handshake"
    pace: Pace | None = None

    def read_some(self, n: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def write_all(self, data: bytes | memoryview) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fileno(self) -> int:  # pragma: no cover - abstract
        """The descriptor whose hang-up means the peer went away (the read side)."""
        raise NotImplementedError

    def set_deadline(self, seconds: float | None, what: str = "its handshake") -> None:
        """Reads and writes from now on end ``seconds`` from now at the latest (None: no deadline);
        past it they raise ConnectionLost: "<peer> did not finish <what>"."""
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.deadline_what = what

    def limit(self) -> tuple[float | None, str]:
        """How long the next read or write may wait, and which limit that is ("timeout",
        "deadline", "pace", or "transfer": the deadline of the transfer this thread runs for,
        coalesce_core.deadlines); an error when the deadline or the pace is already used up."""
        limit, why = self.timeout, "timeout"
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if limit is None or left < limit:
                limit, why = left, "deadline"
        if self.pace is not None:
            left = self.pace.left()
            if limit is None or left < limit:
                limit, why = left, "pace"
        transfer = deadlines.current()
        if transfer is not None:
            left_t = transfer.left()
            if left_t is not None and (limit is None or left_t < limit):
                limit, why = left_t, "transfer"
        if limit is not None and limit <= 0:
            raise self.expired(why, reading=True)
        return limit, why

    def expired(self, why: str, *, reading: bool) -> CoalesceError:
        """The error for a read (``reading``) or write that waited as long as limit ``why`` allows:
        ConnectionLost, or for "transfer" the transfer's DeadlineExceeded (not resumed)."""
        transfer = deadlines.current()
        if why == "transfer" and transfer is not None:
            return transfer.error()
        if why == "deadline":
            return ConnectionLost(
                f"{self.peer} did not finish {self.deadline_what}", hint="the peer is too slow or hostile"
            )
        if why == "pace" and self.pace is not None:
            p = self.pace
            return ConnectionLost(
                f"{self.peer} is slower than the minimum rate: {p.moved} bytes of one request moved while "
                f"waiting {p.waited:.1f} s on it (allowed: {p.grace:g} s and 1 s per {p.min_rate:g} bytes)",
                hint="the peer or its link is too slow, or it stopped reading (request_timeout, min_rate)",
            )
        return self.silent() if reading else self.stalled()

    def _waited(self, t0: float, moved: int) -> None:
        if self.pace is not None:
            self.pace.account(time.monotonic() - t0, moved)

    def hung_up(self, wait: float = 0.0) -> bool:
        """Whether the peer closed its end (or the link reset), waiting up to ``wait`` seconds for it.

        Data the peer sent is not a hang-up and is left unread."""
        try:
            p = select.poll()
            p.register(self.fileno(), getattr(select, "POLLRDHUP", 0))
            events = p.poll(max(0, int(wait * 1000)))
        except (OSError, ValueError):
            return True
        gone = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)
        return any(ev & gone for _fd, ev in events)

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (the bandwidth limit); ConnectionLost as soon as the peer hangs up."""
        if self.hung_up(seconds):
            raise ConnectionLost(f"{self.peer} went away", hint="the peer closed the connection")

    def silent(self) -> ConnectionLost:
        """The error for a read that waited ``timeout`` seconds for data."""
        return ConnectionLost(
            f"no data from {self.peer} for {self.timeout} s", hint="the peer or the link is dead (timeout)"
        )

    def stalled(self) -> ConnectionLost:
        """The error for a write the peer took nothing of for ``timeout`` seconds."""
        return ConnectionLost(
            f"{self.peer} accepted no data for {self.timeout} s", hint="the peer or the link is dead (timeout)"
        )

    def read_exact(self, n: int) -> bytes:
        if n <= 0:
            return b""
        chunk = self.read_some(n)
        if len(chunk) == n:  # the usual case: no copy
            return chunk
        buf = bytearray(chunk)
        while len(buf) < n:
            if not chunk:
                if not buf:
                    raise ConnectionLost(
                        f"the connection to {self.peer} was closed",
                        hint="the peer went away; a transfer resumes on reconnect",
                    )
                raise ConnectionLost(
                    f"the connection to {self.peer} was closed mid-message ({len(buf)} of {n} bytes)",
                    hint="the link or the peer failed",
                )
            chunk = self.read_some(n - len(buf))
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        if self.limiter is not None:
            view = memoryview(data)
            step = max(1024, min(64 << 10, int(self.limiter.rate // 20) or 1024))
            for i in range(0, len(view), step):
                piece = view[i : i + step]
                self.limiter.consume(len(piece), self.pause)
                self.write_all(piece)
        else:
            self.write_all(data)


class SocketChannel(Channel):
    def __init__(self, sock: socket.socket, peer: str, timeout: float | None = 30.0) -> None:
        self.sock = sock
        self.peer = peer
        self._closed = False
        self._set: float | None | str = "unset"  # the timeout the socket has now
        self.timeout = timeout

    @property
    def timeout(self) -> float | None:
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = value
        self._settimeout(value)

    def _settimeout(self, value: float | None) -> None:
        if value == self._set:
            return
        try:
            self.sock.settimeout(value)
            self._set = value
        except OSError:
            pass

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_some(self, n: int) -> bytes:
        limit, why = self.limit()
        self._settimeout(limit)
        t0 = time.monotonic()
        try:
            data = self.sock.recv(min(n, 1 << 20))
        except socket.timeout:
            self._waited(t0, 0)
            raise self.expired(why, reading=True) from None
        except OSError as exc:
            raise ConnectionLost(f"reading from {self.peer}: {exc}") from exc
        self._waited(t0, len(data))
        return data

    def write_all(self, data: Any) -> None:
        limit, why = self.limit()
        self._settimeout(limit)  # sendall (TLS too) waits at most this long in all
        t0 = time.monotonic()
        try:
            self.sock.sendall(data)
        except socket.timeout:
            self._waited(t0, 0)
            raise self.expired(why, reading=False) from None
        except OSError as exc:
            raise ConnectionLost(f"writing to {self.peer}: {exc}") from exc
        self._waited(t0, len(data))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shut(self.sock)


PIPE_SIZE = 1 << 20


def _ready(fd: int, events: int, timeout: float) -> bool:
    """Whether ``fd`` is ready for ``events`` within ``timeout`` seconds.  poll(2), not select(2):
    select cannot wait on a descriptor numbered 1024 or more, which an agent with many sources'
    connections (or a long-running server) reaches."""
    poller = select.poll()
    poller.register(fd, events | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(max(0, math.ceil(timeout * 1000))))


class FdChannel(Channel):
    """Two file descriptors (a pipe pair: ssh's stdout/stdin, or our own stdin/stdout)."""

    def __init__(self, rfd: int, wfd: int, peer: str, timeout: float | None = 30.0, on_close: Any = None) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.peer = peer
        self.timeout = timeout
        self._on_close = on_close
        self._closed = False
        self._wlock = threading.Lock()
        for fd in (rfd, wfd):  # 64 KiB pipes cost a wake-up per 64 KiB; messages are up to 256 KiB
            try:
                import fcntl

                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except (OSError, AttributeError, ValueError):
                pass  # not a pipe, or above /proc/sys/fs/pipe-max-size: keep the default

    def fileno(self) -> int:
        return self.rfd

    def read_some(self, n: int) -> bytes:
        import os

        if self._closed:
            raise ConnectionLost(f"the connection to {self.peer} is closed")
        limit, why = self.limit()
        t0 = time.monotonic()
        if limit is not None:
            if not _ready(self.rfd, select.POLLIN, limit):
                self._waited(t0, 0)
                raise self.expired(why, reading=True)
        try:
            data = os.read(self.rfd, min(n, 1 << 20))
        except OSError as exc:
            raise ConnectionLost(f"reading from {self.peer}: {exc}") from exc
        self._waited(t0, len(data))
        return data

    def write_all(self, data: Any) -> None:
        import os

        view = memoryview(data).cast("B")
        with self._wlock:
            while view:
                limit, why = self.limit()
                t0 = time.monotonic()
                if limit is not None:
                    if not _ready(self.wfd, select.POLLOUT, limit):
                        self._waited(t0, 0)
                        raise self.expired(why, reading=False)
                try:
                    n = os.write(self.wfd, view)
                except OSError as exc:
                    raise ConnectionLost(f"writing to {self.peer}: {exc}") from exc
                self._waited(t0, n)
                view = view[n:]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close()


# --------------------------------------------------------------------------- rate limit
_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)(B|bit)?(?:/s)?\s*$", re.I)


def parse_rate(text: str | int | float | None) -> float | None:
    """``"20MiB/s"`` -> bytes per second; ``"100Mbit/s"``; a bare number is bytes/s; None/0/"" -> None."""
    if text is None or text == "" or text == 0:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a bandwidth cannot be negative: {text}")
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"not a bandwidth: {text!r}")
    m = _RATE_RE.match(text)
    if not m:
        raise ValueError(f"not a bandwidth: {text!r} (write e.g. 20MiB/s, 500KB/s, 100Mbit/s)")
    value, prefix, binary, unit = float(m.group(1)), m.group(2).upper(), m.group(3), (m.group(4) or "B")
    power = "KMGT".find(prefix) + 1 if prefix else 0
    mult = (1024 if binary else 1000) ** power
    rate = value * mult
    if unit.lower() == "bit":
        rate /= 8
    return rate or None


class RateLimiter:
    """A token bucket: at most ``rate`` bytes per second, bursts of ``rate / 10``."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.burst = max(4096.0, self.rate / 10)
        self.tokens = self.burst
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def consume(self, n: int, wait: Callable[[float], None] = time.sleep) -> None:
        """Take ``n`` bytes' worth, calling ``wait(seconds)`` until there is enough (it may raise)."""
        with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= n or (self.tokens >= self.burst and n > self.burst):
                    self.tokens -= n
                    return
                wait(min(1.0, (min(n, self.burst) - self.tokens) / self.rate))


# --------------------------------------------------------------------------- compression
class _ZlibCompress(Protocol):
    """What Compressor uses of zlib.compressobj()."""

    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self, mode: int, /) -> bytes: ...


class _ZstdCompress(Protocol):
    """What Compressor uses of zstandard.ZstdCompressor."""

    def compress(self, data: bytes, /) -> bytes: ...


class _ZlibDecompress(Protocol):
    """What Decompressor uses of zlib.decompressobj()."""

    @property
    def unconsumed_tail(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int, /) -> bytes: ...


class _ZstdDecompress(Protocol):
    """What Decompressor uses of zstandard.ZstdDecompressor."""

    def decompress(self, data: bytes, *, max_output_size: int) -> bytes: ...


class Compressor:
    def __init__(self, method: str | None) -> None:
        self.method = method
        self._c: _ZlibCompress | _ZstdCompress | None
        if method == "zlib":
            self._c = zlib.compressobj(3)
        elif method == "zstd":
            assert _zstd is not None  # "zstd" is only negotiated from COMPRESSIONS, which offers it with zstandard
            self._c = _zstd.ZstdCompressor(level=3, write_content_size=True)
        else:
            self._c = None

    def compress(self, data: bytes) -> bytes:
        if self._c is None:
            return data
        if self.method == "zlib":
            c = cast(_ZlibCompress, self._c)  # __init__ made it for "zlib"
            return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
        # one zstd frame per message, with its size in the header, so the reader can bound it before it inflates
        return self._c.compress(data)


class Decompressor:
    def __init__(self, method: str | None) -> None:
        self.method = method
        self._d: _ZlibDecompress | _ZstdDecompress | None
        if method == "zlib":
            self._d = zlib.decompressobj()
        elif method == "zstd":
            assert _zstd is not None  # "zstd" is only negotiated from COMPRESSIONS, which offers it with zstandard
            self._d = _zstd.ZstdDecompressor()
        else:
            self._d = None

    def decompress(self, data: bytes) -> bytes:
        if self._d is None or not data:  # an empty DATA message is a keep-alive
            return data
        try:
            if self.method == "zlib":
                zd = cast(_ZlibDecompress, self._d)  # __init__ made it for "zlib"
                out = zd.decompress(data, MAX_DATA_PLAIN)
                if zd.unconsumed_tail:
                    raise ProtocolError(
                        f"a DATA message decompresses to more than {MAX_DATA_PLAIN} bytes",
                        hint="the peer is broken or hostile (a decompression bomb)",
                    )
                return out
            assert _zstd is not None  # as in __init__: "zstd" is negotiated only with zstandard
            try:
                size = _zstd.frame_content_size(data)
            except _zstd.ZstdError:
                size = -1
            if size < 0:
                raise ProtocolError(
                    "a DATA message is not one zstd frame that states its size", hint="the peer is broken or hostile"
                )
            if size > MAX_DATA_PLAIN:
                raise ProtocolError(
                    f"a DATA message decompresses to more than {MAX_DATA_PLAIN} bytes",
                    hint="the peer is broken or hostile (a decompression bomb)",
                )
            out = cast(_ZstdDecompress, self._d).decompress(data, max_output_size=MAX_DATA_PLAIN)  # __init__: "zstd"
        except zlib.error as exc:
            raise ProtocolError(
                f"a DATA message does not decompress: {exc}", hint="the peer is broken or hostile"
            ) from None
        except ProtocolError:
            raise
        except Exception as exc:  # zstd errors
            raise ProtocolError(
                f"a DATA message does not decompress: {exc}", hint="the peer is broken or hostile"
            ) from None
        if len(out) > MAX_DATA_PLAIN:
            raise ProtocolError(
                f"a DATA message decompresses to more than {MAX_DATA_PLAIN} bytes",
                hint="the peer is broken or hostile (a decompression bomb)",
            )
        return out


# --------------------------------------------------------------------------- messages
def encode_message(kind: int, reqid: int, body: bytes) -> bytes:
    length = 1 + 4 + len(body) + 4
    head = _HEAD.pack(length, kind, reqid)
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + body + _U32.pack(crc)


def max_body(kind: int) -> int:
    return MAX_DATA_MESSAGE if kind == DATA else MAX_CONTROL


def check_message(raw_len: bytes, head: bytes, body: bytes, crc: bytes) -> tuple[int, int, bytes]:
    """Check one frame read in its four parts (length, kind + request id, body, crc32): (kind, reqid, body)."""
    kind, reqid = struct.unpack(">BI", head)
    (want,) = _U32.unpack(crc)
    got = zlib.crc32(body, zlib.crc32(head, zlib.crc32(raw_len)))
    if got != want:
        raise ProtocolError(
            f"a {KIND_NAMES.get(kind, kind)} message fails its checksum (crc32 {got:#010x}, frame says {want:#010x})",
            hint="the link damaged the data or the peer is broken",
        )
    return kind, reqid, body


def check_length(length: int) -> None:
    if length < _MIN_LENGTH or length > 4 + max(MAX_DATA_MESSAGE, MAX_CONTROL) + 4 + 1:
        raise ProtocolError(
            f"a message claims a length of {length} bytes; a message is {_MIN_LENGTH} to {MAX_DATA_MESSAGE + 9} bytes",
            hint="the peer is broken or hostile",
        )


def decode_json(kind: int, body: bytes) -> dict[str, Any]:
    if len(body) > MAX_CONTROL:
        raise ProtocolError(f"a {KIND_NAMES[kind]} body of {len(body)} bytes exceeds {MAX_CONTROL}")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(
            f"a {KIND_NAMES[kind]} message is not valid UTF-8 JSON: {str(exc)[:200]}",
            hint="the peer is broken or hostile",
        ) from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"a {KIND_NAMES[kind]} message is not a JSON object", hint="the peer is broken or hostile")
    return obj


class Connection:
    """Message I/O over a :class:`Channel` (both sides use it)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.bytes_in = 0
        self.bytes_out = 0
        self._send_lock = threading.Lock()

    @property
    def peer(self) -> str:
        return self.channel.peer

    def close(self) -> None:
        self.channel.close()

    # -- preamble
    def send_preamble(self) -> None:
        self.channel.send(PREAMBLE)

    def read_preamble(self) -> None:
        head = self.channel.read_exact(len(PREAMBLE))
        if head[:8] != MAGIC:
            raise ProtocolError(
                f"{self.peer} is not a coalesce source service or client: it sent {head!r} instead of {MAGIC!r}",
                hint="check the URL/port; over ssh, a login banner or shell output on stdout breaks the protocol: "
                "use the forced command of docs/network.md",
            )
        if head[8] != PROTOCOL_VERSION:
            raise ProtocolError(
                f"{self.peer} speaks protocol version {head[8]}; this coalesce speaks {PROTOCOL_VERSION}",
                hint="run the same coalesce version on both hosts",
            )

    # -- messages
    def send(self, kind: int, reqid: int, body: bytes) -> None:
        if len(body) > max_body(kind):
            raise ProtocolError(
                f"refusing to send a {KIND_NAMES[kind]} body of {len(body)} bytes (limit {max_body(kind)})"
            )
        data = encode_message(kind, reqid, body)
        with self._send_lock:
            self.channel.send(data)
            self.bytes_out += len(data)

    def send_json(self, kind: int, reqid: int, obj: dict[str, Any]) -> None:
        self.send(kind, reqid, json.dumps(obj, separators=(",", ":")).encode("utf-8"))

    def send_error(self, reqid: int, exc: BaseException, code: str | None = None) -> None:
        code = code or (
            "refused"
            if isinstance(exc, Refused)
            else getattr(exc, "code", None) or ("protocol" if isinstance(exc, ProtocolError) else "error")
        )
        msg = str(getattr(exc, "message", exc))[:4000]
        hint = str(getattr(exc, "hint", "") or "")[:4000]
        self.send_json(ERROR, reqid, {"error": code, "type": type(exc).__name__[:100], "message": msg, "hint": hint})

    def recv(self, first: bytes = b"") -> tuple[int, int, bytes]:
        """The next message (kind, request id, body); ``first``: its first bytes, already read."""
        raw_len = first + self.channel.read_exact(4 - len(first))
        (length,) = _U32.unpack(raw_len)
        check_length(length)
        # peek the kind before reading a large body; the body is read on its own (no copy to split it)
        head = self.channel.read_exact(5)
        kind = head[0]
        if kind not in KIND_NAMES:
            raise ProtocolError(
                f"{self.peer} sent a message of unknown kind {kind}", hint="the peer is broken or hostile"
            )
        if length - 9 > max_body(kind):
            raise ProtocolError(
                f"{self.peer} sent a {KIND_NAMES[kind]} body of {length - 9} bytes; the limit is {max_body(kind)}",
                hint="the peer is broken or hostile",
            )
        body = self.channel.read_exact(length - 9)
        crc = self.channel.read_exact(4)
        self.bytes_in += 4 + length
        return check_message(raw_len, head, body, crc)

    def recv_json(self, expect: tuple[int, ...]) -> tuple[int, int, dict[str, Any]]:
        kind, reqid, body = self.recv()
        if kind not in expect:
            raise ProtocolError(
                f"{self.peer} sent {KIND_NAMES[kind]} where {'/'.join(KIND_NAMES[k] for k in expect)} was expected",
                hint="the peer is broken or hostile",
            )
        if kind == ERROR:
            raise error_from(decode_json(kind, body))
        return kind, reqid, decode_json(kind, body)


def error_from(obj: dict[str, Any]) -> RemoteError:
    # the peer's text: shown as escapes where it holds control characters (coalesce_core.ui.peertext)
    code = clean(obj.get("error", "error"), limit=100)
    msg = clean(obj.get("message", "the source service refused the request"))
    hint = clean(obj.get("hint", "")) or None
    cls = Refused if code == "refused" else RemoteError
    return cls(f"source service: {msg}", code=code, hint=hint)


# --------------------------------------------------------------------------- field checks
@overload
def want_str(
    obj: dict[str, Any],
    key: str,
    *,
    limit: int = ...,
    optional: Literal[False] = ...,
    pattern: re.Pattern[str] | None = ...,
) -> str: ...


@overload
def want_str(
    obj: dict[str, Any], key: str, *, limit: int = ..., optional: bool = ..., pattern: re.Pattern[str] | None = ...
) -> str | None: ...


def want_str(
    obj: dict[str, Any],
    key: str,
    *,
    limit: int = MAX_NAME,
    optional: bool = False,
    pattern: re.Pattern[str] | None = None,
) -> str | None:
    value = obj.get(key)
    if value is None:
        if optional:
            return None
        raise ProtocolError(f"field {key!r} is missing", hint="the peer is broken or hostile")
    if (
        not isinstance(value, str)
        or not value
        or len(value.encode("utf-8", "surrogatepass")) > limit
        or "\x00" in value
    ):
        raise ProtocolError(
            f"field {key!r} must be a non-empty string of at most {limit} bytes", hint="the peer is broken or hostile"
        )
    if pattern is not None and not pattern.fullmatch(value):
        raise ProtocolError(
            f"field {key!r} = {value[:80]!r} has characters that are not allowed",
            hint="names are letters, digits and _ . - @ + = : ,",
        )
    return value


def want_int(obj: dict[str, Any], key: str, *, lo: int = 0, hi: int = 2**62, optional: bool = False) -> int | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"field {key!r} must be an integer from {lo} to {hi}", hint="the peer is broken or hostile")
    return value


def want_rate(obj: dict[str, Any], key: str, *, floor: float) -> float | None:
    """A rate in bytes per second: a finite number of at least ``floor``, or None (absent, null)."""
    value = obj.get(key)
    if value is None:
        return None
    rate: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            rate = float(value)
        except OverflowError:
            rate = None
    if rate is None or not math.isfinite(rate) or rate <= 0:
        shown = f"{value:g}" if isinstance(value, float) else type(value).__name__ if rate is None else str(value)
        raise ProtocolError(
            f"field {key!r} must be a positive, finite number of bytes per second or null, not {shown[:40]}",
            hint="the peer is broken or hostile",
        )
    if rate < floor:
        raise ProtocolError(
            f"field {key!r} asks for {rate:g} bytes/s, below this server's minimum rate of {floor:g} bytes/s",
            hint="ask for no limit (null) or at least the server's min_rate: it closes connections slower than that",
        )
    return rate


def want_list_of_names(obj: dict[str, Any], key: str, *, limit: int = 64) -> list[str]:
    value = obj.get(key, [])
    if (
        not isinstance(value, list)
        or len(value) > limit
        or not all(isinstance(v, str) and 0 < len(v) <= MAX_NAME for v in value)
    ):
        raise ProtocolError(
            f"field {key!r} must be a list of at most {limit} short strings", hint="the peer is broken or hostile"
        )
    return value


NAME_RE = _NAME_RE


def pieces(chunks: Iterable[Any], size: int = DATA_CHUNK) -> Iterator[bytes]:
    """The bytes of ``chunks`` (bytes-like) regrouped into pieces of ``size`` bytes, the last one shorter.

    Each piece is built by one join of memoryview slices, so a byte is copied once here."""
    parts: list[Any] = []
    have = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view:
            take = min(len(view), size - have)
            parts.append(view[:take])
            have += take
            view = view[take:]
            if have == size:
                yield b"".join(parts)
                parts, have = [], 0
    if parts:
        yield b"".join(parts)
