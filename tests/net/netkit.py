"""Helpers and fixtures of the network tests: certificates, an in-process TLS source service,
a real sshd on loopback, and a harness whose source is remote.

Only hosts the tests create are used: loopback, and (test_netns.py) network
namespaces made by the test.  Every daemon is stopped by its PID, every
namespace deleted, even when a test fails.
"""

from __future__ import annotations

import datetime
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
PLUGINS_DIR = CHECKOUT / "plugins"
if str(PLUGINS_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGINS_DIR))

import coalesce_mem  # noqa: E402
import coalesce_remote  # noqa: E402
from coalesce_core.backend.manager import plugin_manager  # noqa: E402
from coalesce_core.backend.volume import Volume  # noqa: E402
from coalesce_core.testing.harness import Harness  # noqa: E402
from coalesce_core.testing.workload import SourceWriter  # noqa: E402
from coalesce_remote.serve import Grant, ServerConfig, SourceService, TLSServer, tls_server_context  # noqa: E402

_ids = itertools.count()


def remote_plugins() -> list[Any]:
    """The ssh/tls backend modules, unless the installed entry points already load them."""
    names = {ep.name for ep in metadata.entry_points(group="coalesce.backends")}
    return [] if {"ssh", "tls"} <= names else coalesce_remote.plugins()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- certificates
def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert=None, key=None) -> str:
    from cryptography.hazmat.primitives import serialization

    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
    return str(path)


class CA:
    def __init__(self, d: Path, cn: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        self.d = d
        self.cn = cn
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = _write(d / f"{cn}.crt", cert=self.cert)

    def issue(
        self, cn: str, *, server: bool = False, expired: bool = False, ips: tuple[str, ...] = ()
    ) -> tuple[str, str]:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID

        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (
            (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
            if expired
            else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
        )
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if server:
            sans = [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        tag = f"{self.cn}--{cn}" + ("-expired" if expired else "")
        return _write(self.d / f"{tag}.crt", cert=cert), _write(self.d / f"{tag}.key", key=key)


@attrs.frozen
class Certs:
    ca: str
    server: tuple[str, str]
    client: tuple[str, str]  # CN=backup1: reads everything, takes and releases
    reader: tuple[str, str]  # CN=reader: reads qtree A only, may not take
    stranger: tuple[str, str]  # CN=stranger: valid certificate, not in the server config
    other_ca: tuple[str, str]  # CN=backup1 signed by another CA
    expired: tuple[str, str]  # CN=backup1, expired


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca = CA(d, "coalesce-test-ca")
    rogue = CA(d, "rogue-ca")
    return Certs(
        ca=ca.path,
        server=ca.issue("source-server", server=True, ips=("127.0.0.1", "10.213.0.2")),
        client=ca.issue("backup1"),
        reader=ca.issue("reader"),
        stranger=ca.issue("stranger"),
        other_ca=rogue.issue("backup1"),
        expired=ca.issue("backup1", expired=True),
    )


def random_source(url: str, seed: int, size: int, snapshot: str) -> None:
    """Make the mem volume ``url`` hold six files of ``size`` random bytes (from ``seed``) in qtree A,
    ``A/f0`` to ``A/f5``, and take PCPI ``snapshot`` of them."""
    vol = coalesce_mem.volume_for(url)
    rng = random.Random(seed)
    for i in range(6):
        vol.write_file(f"A/f{i}", rng.randbytes(size))
    vol.snapshot_create(snapshot)


def write_serve_config(
    path: Path,
    server: tuple[str, str],
    ca: str,
    volumes: dict[str, str],
    *,
    timeout: float,
    keepalive: float,
    listen: str | None = None,
) -> Path:
    """Write the config of a `coalesce serve` process (docs/network.md) to ``path``: the server's certificate
    and key, the CA, the timeouts, a log beside ``path``, ``volumes`` (name -> local URL) and the client
    backup1, which may read them all and take and release PCPIs."""
    path.write_text(
        "\n".join(
            [
                "[server]",
                *([f'listen = "{listen}"'] if listen else []),
                f'cert = "{server[0]}"',
                f'key = "{server[1]}"',
                f'ca = "{ca}"',
                f"timeout = {timeout}",
                f"keepalive = {keepalive}",
                f'log = "{path.parent}/serve.log"',
                "[volumes]",
                *(f'{name} = "{url}"' for name, url in volumes.items()),
                "[clients.backup1]",
                "volumes = [" + ", ".join(f'"{name}"' for name in volumes) + "]",
                "take = true",
                "release = true",
                "",
            ]
        )
    )
    return path


def wait_listening(what: str, host: str, port: int, proc: subprocess.Popen, log: Path, within: float) -> None:
    """Return once ``host:port`` accepts a connection; RuntimeError with the text of ``log`` when ``proc``
    (``what``, which is to listen there) ended or ``within`` seconds passed first."""
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start: {log.read_text()}") from None
            time.sleep(0.05)


def serve_in_b(
    link: Any, config: Path, port: int, prefix: tuple[str, ...] = (), within: float = 20
) -> subprocess.Popen:
    """`coalesce serve --listen` on B's address and ``port`` with ``config``, started in namespace B of
    ``link`` (tests/net/linkemu.py), after ``prefix`` (a command it runs under); its errors go to
    serve.err beside ``config``.  Returns once it listens."""
    err = config.parent / "serve.err"
    proc = link.popen_b(
        [
            *prefix,
            sys.executable,
            "-m",
            "coalesce_remote.serve",
            "--listen",
            f"{link.b_ip}:{port}",
            "--config",
            str(config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(err, "wb"),
    )
    wait_listening("coalesce serve", link.b_ip, port, proc, err, within)
    return proc


# --------------------------------------------------------------------------- TLS service in a thread
class ServerRecorder:
    """A plugin of the SERVER's plugin manager: records every primitive the service runs."""

    from coalesce_core.backend.hookspecs import hookimpl as _h

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @_h(wrapper=True)
    def coalesce_diff(self, volume, qtree, base, target):
        self.calls.append(("diff", qtree))
        return (yield)

    @_h(wrapper=True)
    def coalesce_fingerprint(self, volume, qtree, snapshot):
        self.calls.append(("fingerprint", qtree))
        return (yield)

    @_h(wrapper=True)
    def coalesce_snapshot_create(self, volume, name):
        self.calls.append(("take", name))
        return (yield)

    @_h(wrapper=True)
    def coalesce_snapshot_delete(self, volume, name):
        self.calls.append(("release", name))
        return (yield)


class TLSService:
    def __init__(self, certs: Certs, host: str = "127.0.0.1", server_plugins: tuple = (), **cfg: Any) -> None:
        self.certs = certs
        self.recorder = ServerRecorder()
        self.config = ServerConfig(
            volumes={},
            clients={
                "backup1": Grant(volumes=("*",), take=True, release=True),
                "reader": Grant(volumes=("*",), qtrees=("A",), take=False, release=False),
            },
            timeout=cfg.pop("timeout", 10.0),
            handshake_timeout=cfg.pop("handshake_timeout", 5.0),
            **cfg,
        )
        self.service = SourceService(self.config, pm=plugin_manager([self.recorder, *server_plugins]))
        self.server = TLSServer(
            self.service, host, 0, tls_server_context(certs.server[0], certs.server[1], certs.ca)
        ).start()
        self.host = host
        self.port = self.server.port

    def expose(self, local_url: str, name: str | None = None) -> str:
        name = name or f"src-{next(_ids)}"
        self.config.volumes[name] = local_url
        return f"tls://{self.host}:{self.port}/{name}"

    def stop(self) -> None:
        self.server.stop()


def client_env(monkeypatch, certs: Certs, which: str = "client", **extra: str) -> None:
    cert, key = getattr(certs, which)
    monkeypatch.setenv("COALESCE_TLS_CERT", cert)
    monkeypatch.setenv("COALESCE_TLS_KEY", key)
    monkeypatch.setenv("COALESCE_TLS_CA", certs.ca)
    monkeypatch.setenv("COALESCE_RETRY_DELAY", "0.05")
    monkeypatch.setenv("COALESCE_TIMEOUT", "10")
    for k, v in extra.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def tls_service(certs, monkeypatch):
    svc = TLSService(certs)
    client_env(monkeypatch, certs)
    try:
        yield svc
    finally:
        coalesce_remote.close_all()
        svc.stop()


# --------------------------------------------------------------------------- sshd
class SSHD:
    """Debian's sshd on a loopback port, fresh host and client keys, a forced command.

    ``host``/``port``/``netns``: listen on an address of a network namespace the caller made
    (tests/net/linkemu.py) instead; sshd then runs inside it (``ip netns exec``)."""

    def __init__(self, d: Path, host: str = "127.0.0.1", port: int | None = None, netns: str | None = None) -> None:
        if not shutil.which("sshd") and not os.path.exists("/usr/sbin/sshd"):
            pytest.fail("openssh-server is not installed (tools/test installs it: apt-get install openssh-server)")
        self.d = d
        self.host = host
        self.port = port or free_port()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key")], check=True)
        self.server_config = d / "serve.toml"
        self.log = d / "serve.log"
        self.volumes: dict[str, str] = {}
        self.write_server_config()
        # sshd hands its forced command no PYTHONPATH: name the checkout, so that the service runs the
        # code under test whatever copy of coalesce is installed (or none)
        forced = (
            f"env PYTHONPATH={CHECKOUT}:{PLUGINS_DIR} {sys.executable} -m coalesce_remote.serve --stdio "
            f"--config {self.server_config} --identity backup1"
        )
        pub = (d / "client_key.pub").read_text().strip()
        (d / "authorized_keys").write_text(f'command="{forced}",restrict {pub}\n')
        host_pub = (d / "host_key.pub").read_text().split()
        (d / "known_hosts").write_text(f"[{host}]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        (d / "sshd_config").write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {host}",
                    f"HostKey {d / 'host_key'}",
                    f"PidFile {d / 'sshd.pid'}",
                    f"AuthorizedKeysFile {d / 'authorized_keys'}",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "PermitRootLogin forced-commands-only",
                    "PubkeyAuthentication yes",
                    "LogLevel ERROR",
                    "MaxStartups 200:30:400",
                    "MaxSessions 200",
                    "PrintMotd no",
                    "Subsystem sftp /bin/false",
                ]
            )
            + "\n"
        )
        os.makedirs("/run/sshd", exist_ok=True)
        self.proc = subprocess.Popen(
            [
                *(["ip", "netns", "exec", netns] if netns else []),
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
                str(d / "sshd_config"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(d / "sshd.log", "wb"),
            start_new_session=True,
        )
        wait_listening("sshd", host, self.port, self.proc, d / "sshd.log", 10)
        self.ssh = (
            f"ssh -F /dev/null -i {d / 'client_key'} -o IdentitiesOnly=yes "
            f"-o UserKnownHostsFile={d / 'known_hosts'} -o StrictHostKeyChecking=yes -o LogLevel=ERROR"
        )

    def write_server_config(self) -> None:
        lines = ["[server]", f'log = "{self.log}"', "timeout = 10", "", "[volumes]"]
        lines += [f'{k} = "{v}"' for k, v in self.volumes.items()]
        lines += ["", "[clients.backup1]", 'volumes = ["*"]', "take = true", "release = true", ""]
        tmp = self.server_config.with_suffix(".tmp")
        tmp.write_text("\n".join(lines))
        os.replace(tmp, self.server_config)

    def expose(self, local_url: str) -> str:
        self.volumes[f"src{next(_ids)}"] = local_url
        self.write_server_config()
        return f"ssh://root@{self.host}:{self.port}/{local_url}"

    def children(self) -> list[int]:
        """PIDs of the per-connection processes this sshd forked (and theirs)."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                out.append(k)
                todo.append(k)
        return out

    def stop(self) -> None:
        kids = self.children()
        for pid in [self.proc.pid, *kids]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sshd")
    server = SSHD(d)
    try:
        yield server
    finally:
        coalesce_remote.close_all()
        server.stop()


@pytest.fixture
def ssh_env(sshd, monkeypatch):
    monkeypatch.setenv("COALESCE_SSH", sshd.ssh)
    monkeypatch.setenv("COALESCE_RETRY_DELAY", "0.05")
    monkeypatch.setenv("COALESCE_TIMEOUT", "20")
    yield sshd
    coalesce_remote.close_all()


# --------------------------------------------------------------------------- remote harness
#: remote source URL -> the local URL of the same volume (the test writes source data through it)
LOCAL_OF: dict[str, str] = {}


class RemoteHarness(Harness):
    """A Harness whose agent reaches the source through a source service."""

    def __init__(self, config, plugins=(), clock=None, create=True) -> None:
        super().__init__(config, plugins=[*plugins, *remote_plugins()], clock=clock, create=create)
        self.local_source = Volume.open(self.pm, LOCAL_OF[config.source], create=True)
        self.writer = SourceWriter(self.local_source, config.privileges)


@pytest.fixture(params=["tls", "ssh"])
def transport(request, certs, monkeypatch, tmp_path):
    """Exposes a source volume through TLS (in-process server) or SSH (real sshd)."""
    if request.param == "tls":
        svc = TLSService(certs)
        client_env(monkeypatch, certs)

        def expose(cfg_kw: dict) -> tuple[str, str]:
            local = f"mem://src-tls-{os.getpid()}-{next(_ids)}"
            return local, svc.expose(local)

        try:
            yield request.param, expose
        finally:
            coalesce_remote.close_all()
            svc.stop()
    else:
        sshd = request.getfixturevalue("sshd")
        request.getfixturevalue("ssh_env")

        def expose(cfg_kw: dict) -> tuple[str, str]:
            local = f"mem://{tmp_path}/src-{next(_ids)}.mem"
            return local, sshd.expose(local)

        yield request.param, expose
        coalesce_remote.close_all()


@pytest.fixture
def remote_config(transport, group_config):
    """Like group_config, but the source is the remote URL of a fresh local mem volume."""
    import coalesce_mem

    _kind, expose = transport

    def make(**kw):
        local, remote = expose(kw)
        coalesce_mem.volume_for(local)  # create it, so the server can open it
        cfg = group_config(source_url=local, **kw)
        LOCAL_OF[remote] = local
        return cfg.with_source(remote)

    return make


# --------------------------------------------------------------------------- a link that drops
class FlakyProxy:
    """A TCP relay on loopback that resets a connection after ``cut_after`` bytes
    from the server, ``cuts`` times (None: every connection that gets that far)."""

    def __init__(self, host: str, port: int, cut_after: int | None = None, cuts: int | None = 0) -> None:
        self.target = (host, port)
        self.cut_after = cut_after
        self.cuts = cuts
        self.cut_count = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                s = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            c.settimeout(None)
            s.settimeout(None)
            with self._lock:
                self._socks += [c, s]
            for a, b, down in ((c, s, False), (s, c, True)):
                t = threading.Thread(target=self._pump, args=(a, b, down, c, s), daemon=True)
                t.start()
                self._threads.append(t)

    def _should_cut(self, n: int) -> bool:
        if self.cut_after is None or n < self.cut_after:
            return False
        with self._lock:
            if self.cuts is not None and self.cut_count >= self.cuts:
                return False
            self.cut_count += 1
            return True

    def drop_all(self) -> None:
        """Reset every connection relayed so far (as a NAT or firewall forgetting idle flows does)."""
        with self._lock:
            socks, self._socks = list(self._socks), []
        self._reset(*socks)

    @staticmethod
    def _reset(*socks: socket.socket) -> None:
        import struct

        for x in socks:
            try:
                x.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            try:
                x.shutdown(socket.SHUT_RDWR)  # wakes the other pump thread
            except OSError:
                pass
            try:
                x.close()
            except OSError:
                pass

    def _pump(self, a: socket.socket, b: socket.socket, down: bool, c: socket.socket, s: socket.socket) -> None:
        n = 0
        cut = False
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
                n += len(data)
                if down and self._should_cut(n):
                    cut = True
                    break
        except OSError:
            pass
        if cut:
            self._reset(c, s)
            return
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        with self._lock:
            socks = list(self._socks)
        self._reset(*socks)
        for t in self._threads:
            t.join(2)


# --------------------------------------------------------------------------- a bare connection to the service
def serve_pair(service: SourceService, identity: str = "backup1", timeout: float = 5.0):
    """A connected socket pair: the service serves one end in a thread; returns (client socket, thread)."""
    from coalesce_remote import protocol as P

    a, b = socket.socketpair()
    t = threading.Thread(
        target=service.serve_connection,
        args=(P.Connection(P.SocketChannel(b, "socketpair", timeout)), identity),
        daemon=True,
    )
    t.start()
    a.settimeout(timeout)
    return a, t


def recv_all(sock: socket.socket, limit: float = 10.0) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + limit
    sock.settimeout(limit)
    while time.monotonic() < deadline:
        try:
            d = sock.recv(65536)
        except (socket.timeout, OSError):
            break
        if not d:
            break
        out += d
    return bytes(out)
