"""A link emulator the tests and the network benchmark build themselves: delay, loss, a rate limit.

Topology (every address exists only between namespaces made here)::

    this namespace (A end)          router namespace R                 namespace B (far end)
    10.213.K.1/30  <-- veth -->  10.213.K.2/30 | 10.213.K.5/30  <-- veth -->  10.213.K.6/30

The router forwards between its two veths through the emulator:

* where the kernel has ``sch_netem`` (probed once per process), a ``netem``
  qdisc on each of R's two egress veths (delay, loss) with a ``tbf`` child
  (the rate limit);
* otherwise (this project's VMs: ``CONFIG_NET_SCH_NETEM`` is not set) a
  userspace delay line: policy routing by incoming interface sends every
  packet that arrives on one of R's veths to a TUN device that a small Python
  process (``python linkemu.py --worker``, inside R) reads; it holds each
  packet for the one-way delay of its direction, drops a fraction ``loss`` of
  them (counted), and writes the rest back into the TUN device.  A packet
  that comes back in through the TUN device is routed by the main table
  (``iif tun`` matches no rule), so it leaves on the other veth and is never
  looped back.  The rate limit is a ``tbf`` qdisc on both of R's egress veths.

``delay_ms`` is the ONE-WAY delay, applied in each direction (as ``netem
delay`` on both ends of a link): the round trip is ``2 * delay_ms``.
Packets are MTU-sized (no GSO through a TUN device without a virtio header),
so the MTU (the same on every device of the path) sets the packet rate the
worker must sustain.  Measured on the 2-core development VM (one TCP flow,
200 MB): MTU 1500: 1.3 Gbit/s without delay, the worker then CPU-bound;
MTU 9000 (the default: jumbo frames, 14,000 packets/s at 1 Gbit/s): 3.2
Gbit/s without delay, 1.0 Gbit/s with a 20 ms round trip, 0.9 Gbit/s
through a 1 Gbit/s tbf.  Do not go to a 64 KiB MTU: the receiver's initial
window is then one or two segments, and a TCP receiver that autotunes its
window slowly (a Python TLS reader) stays window-limited for seconds
(seen: 30-50 % of the rate on a 100 Mbit/s link).  The worker runs at a low
real-time priority, so that a loaded machine does not delay packets more
than asked (``max_late_ms``, ``late_1ms`` count the packets it released late).

This namespace stays the A end (a test's in-process client is here); the
route to B goes through R, and a blackhole route for 10.213.K.0/24 keeps
packets from ever taking the default route while the link is down.  Every
namespace, device, route and process made here is removed by :meth:`Link.close`
(processes by their PID), also when a test fails; the worker also exits when
its control pipe closes, and its TUN device is not persistent (it goes with
the worker's file descriptor).

Used by tests/net/test_link_faults.py and tools/bench/bench_net.py.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

MTU = 9000
_ids = itertools.count()
_NETEM: bool | None = None


def _run(argv: list[str], ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + argv
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _qdisc_add(ns: str, dev: str, parent: list[str], handle: str, kind: str, **options: object) -> None:
    """``tc qdisc add dev DEV PARENT handle HANDLE KIND NAME VALUE...`` in namespace ``ns``, the options in order."""
    argv = ["tc", "qdisc", "add", "dev", dev, *parent, "handle", handle, kind]
    for name, value in options.items():
        argv += [name, str(value)]
    _run(argv, ns=ns)


def parse_rate_bits(rate: str | float | int | None) -> float | None:
    """``"100mbit"``, ``"1gbit"``, ``"800kbit"`` (tc's units) or bits/s -> bits/s."""
    if rate is None or rate == "" or rate == 0:
        return None
    if isinstance(rate, (int, float)):
        return float(rate)
    s = rate.strip().lower().removesuffix("/s").removesuffix("ps")
    for suffix, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * mult
    return float(s)


def netem_available() -> bool:
    """Does this kernel have sch_netem?  Probed once, on the loopback of a namespace made for it."""
    global _NETEM
    if _NETEM is None:
        ns = f"coprobe{os.getpid() % 100000}"
        _run(["ip", "netns", "add", ns])
        try:
            p = _run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], ns=ns, check=False)
            _NETEM = p.returncode == 0
        finally:
            _run(["ip", "netns", "del", ns], check=False)
    return _NETEM


class Link:
    """A emulated link between this namespace and a namespace B, through a router namespace R.

    ``mode``: "auto" (netem if the kernel has it, else the TUN delay line), "netem" or "tun"
    (``COALESCE_LINKEMU`` overrides "auto")."""

    def __init__(self, mtu: int = MTU, mode: str = "auto", log: str | None = None) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the link emulator needs root (ip netns, tc, /dev/net/tun)")
        mode = os.environ.get("COALESCE_LINKEMU", mode) if mode == "auto" else mode
        if mode == "auto":
            mode = "netem" if netem_available() else "tun"
        if mode not in ("netem", "tun"):
            raise ValueError(f"link emulator mode {mode!r}: netem, tun or auto")
        self.mode = mode
        self.mtu = mtu
        self.log = log
        tag = f"{os.getpid() % 100000}{next(_ids)}"
        self.ns_r, self.ns_b = f"colr{tag}", f"colb{tag}"
        self.if_a, self.if_ra, self.if_rb, self.if_b, self.if_tun = (
            f"cla{tag}",
            f"clra{tag}",
            f"clrb{tag}",
            f"clb{tag}",
            f"clt{tag}",
        )
        self.k = self._free_octet()
        self.a_ip, self.ra_ip = f"10.213.{self.k}.1", f"10.213.{self.k}.2"
        self.rb_ip, self.b_ip = f"10.213.{self.k}.5", f"10.213.{self.k}.6"
        self.worker: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        self.shape_args: dict[str, Any] = {}

    @staticmethod
    def _free_octet() -> int:
        routes = _run(["ip", "-4", "route", "show", "table", "all"]).stdout
        start = os.getpid() % 250
        for i in range(250):
            k = 1 + (start + i) % 250
            if f"10.213.{k}." not in routes:
                return k
        raise RuntimeError("no free 10.213.K.0/24 for a test link")

    # ------------------------------------------------------------------ set-up and tear-down
    def __enter__(self) -> "Link":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> "Link":
        r, b, mtu = self.ns_r, self.ns_b, str(self.mtu)
        _run(["ip", "netns", "add", r])
        self._made.append("ns_r")
        _run(["ip", "netns", "add", b])
        self._made.append("ns_b")
        _run(["ip", "link", "add", self.if_a, "mtu", mtu, "type", "veth", "peer", "name", self.if_ra, "mtu", mtu])
        self._made.append("veth_a")
        _run(["ip", "link", "set", self.if_ra, "netns", r])
        _run(
            [
                "ip",
                "link",
                "add",
                self.if_rb,
                "mtu",
                mtu,
                "netns",
                r,
                "type",
                "veth",
                "peer",
                "name",
                self.if_b,
                "mtu",
                mtu,
                "netns",
                b,
            ]
        )
        # this namespace: the A end; nothing for 10.213.K.0/24 may ever take the default route
        _run(["ip", "route", "add", "blackhole", f"10.213.{self.k}.0/24", "metric", "32000"])
        self._made.append("blackhole")
        _run(["ip", "addr", "add", f"{self.a_ip}/30", "dev", self.if_a])
        _run(["ip", "link", "set", self.if_a, "up"])
        _run(["ip", "route", "add", f"10.213.{self.k}.4/30", "via", self.ra_ip, "dev", self.if_a])
        # B: the far end
        _run(["ip", "link", "set", "lo", "up"], ns=b)
        _run(["ip", "addr", "add", f"{self.b_ip}/30", "dev", self.if_b], ns=b)
        _run(["ip", "link", "set", self.if_b, "up"], ns=b)
        _run(["ip", "route", "add", f"10.213.{self.k}.0/30", "via", self.rb_ip, "dev", self.if_b], ns=b)
        # R: the router
        _run(["ip", "link", "set", "lo", "up"], ns=r)
        _run(["ip", "addr", "add", f"{self.ra_ip}/30", "dev", self.if_ra], ns=r)
        _run(["ip", "addr", "add", f"{self.rb_ip}/30", "dev", self.if_rb], ns=r)
        for dev in (self.if_ra, self.if_rb):
            _run(["ip", "link", "set", dev, "up"], ns=r)
        for key, val in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
        ):
            _run(["sysctl", "-q", "-w", f"{key}={val}"], ns=r)
        if self.mode == "tun":
            self._start_worker()
        self.shape()
        return self

    def _start_worker(self) -> None:
        r = self.ns_r
        err = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.worker = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                r,
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                self.if_tun,
                f"10.213.{self.k}.4/30",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
            text=True,
            bufsize=1,
        )
        if not isinstance(err, int):  # the log file opened above, not subprocess.DEVNULL
            err.close()
        line = self._read_reply(10.0)
        if line.strip() != "ready":
            raise RuntimeError(f"the link emulator's worker did not start: {line!r}")
        _run(["sysctl", "-q", "-w", f"net.ipv4.conf.{self.if_tun}.rp_filter=0"], ns=r)
        _run(["ip", "link", "set", self.if_tun, "mtu", str(self.mtu), "txqueuelen", "10000", "up"], ns=r)
        _run(["ip", "route", "add", "default", "dev", self.if_tun, "table", "100"], ns=r)
        _run(["ip", "rule", "add", "iif", self.if_ra, "lookup", "100", "pref", "100"], ns=r)
        _run(["ip", "rule", "add", "iif", self.if_rb, "lookup", "100", "pref", "101"], ns=r)

    def close(self) -> list[str]:
        """Remove every process, device, route and namespace made here (by PID and by name)."""
        problems: list[str] = []
        for p in [*reversed(self.procs), *([self.worker] if self.worker else [])]:
            _stop(p, problems)
        self.procs.clear()
        self.worker = None
        if "blackhole" in self._made:
            _run(["ip", "route", "del", "blackhole", f"10.213.{self.k}.0/24", "metric", "32000"], check=False)
        if "veth_a" in self._made:
            _run(["ip", "link", "del", self.if_a], check=False)
        for key, ns in (("ns_b", self.ns_b), ("ns_r", self.ns_r)):
            if key in self._made:
                left = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
                for pid in left:  # only processes inside OUR namespace: started by this link's users
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                        problems.append(f"killed PID {pid} left in namespace {ns}")
                    except (ProcessLookupError, ValueError):
                        pass
                p = _run(["ip", "netns", "del", ns], check=False)
                if p.returncode:
                    problems.append(f"ip netns del {ns}: {p.stderr.strip()}")
        self._made.clear()
        return problems

    # ------------------------------------------------------------------ processes at the far end
    def popen_b(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` in namespace B; it is stopped (by PID) in :meth:`close`."""
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns_b, *argv], **kw)
        self.procs.append(p)
        return p

    def run_b(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return _run(argv, ns=self.ns_b, check=check)

    # ------------------------------------------------------------------ faults
    def shape(
        self,
        delay_ms: float = 0.0,
        loss: float = 0.0,
        rate: str | float | None = None,
        queue_ms: float | None = None,
        seed: int = 9,
    ) -> None:
        """One-way ``delay_ms`` in each direction (RTT = 2 x delay), ``loss`` (0..1) of the packets dropped
        in each direction, ``rate`` (tc units, e.g. "100mbit") in each direction by tbf, whose queue holds
        ``queue_ms`` of data (default: one round trip, at least 20 ms)."""
        self.shape_args = {"delay_ms": delay_ms, "loss": loss, "rate": rate}
        bits = parse_rate_bits(rate)
        qms = queue_ms if queue_ms is not None else max(20.0, 2 * delay_ms)
        r = self.ns_r
        for dev in (self.if_ra, self.if_rb):
            _run(["tc", "qdisc", "del", "dev", dev, "root"], ns=r, check=False)
            parent = ["root"]
            if self.mode == "netem" and (delay_ms or loss):
                _qdisc_add(r, dev, ["root"], "1:", "netem", delay=f"{delay_ms}ms", loss=f"{loss * 100}%", limit=100000)
                parent = ["parent", "1:1"]
            if bits:
                burst = int(max(2 * self.mtu + 1000, bits / 8 * 0.004))
                limit = int(max(4 * self.mtu, bits / 8 * qms / 1000)) + burst
                _qdisc_add(
                    r, dev, parent, "10:", "tbf", rate=f"{int(bits)}bit", burst=burst, limit=limit, mtu=self.mtu + 100
                )
        if self.mode == "tun":
            self._ctl({"op": "set", "delay": [delay_ms / 1000, delay_ms / 1000], "loss": [loss, loss], "seed": seed})

    def down(self) -> None:
        _run(["ip", "link", "set", self.if_a, "down"])

    def up(self) -> None:
        _run(["ip", "link", "set", self.if_a, "up"])
        # the route via R went with the link: put it back
        _run(["ip", "route", "replace", f"10.213.{self.k}.4/30", "via", self.ra_ip, "dev", self.if_a])

    def drop_connections(self) -> None:
        """Abort every TCP connection between A and B at both ends (``ss -K``), as a link that dies
        under a middlebox does: each side gets an error at once instead of waiting for a timeout."""
        _run(["ss", "-K", "dst", self.b_ip], check=False)
        _run(["ss", "-K", "dst", self.a_ip], ns=self.ns_b, check=False)

    def stats(self) -> dict[str, Any]:
        """Counters: per direction ("a_to_b", "b_to_a") packets/bytes seen, dropped by the emulator, delayed;
        "queue_drops" of the tbf/netem qdiscs."""
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode == "tun":
            out.update(self._ctl({"op": "stats"}))
        qd = {}
        for name, dev in (("b_to_a", self.if_ra), ("a_to_b", self.if_rb)):
            p = _run(["tc", "-s", "-j", "qdisc", "show", "dev", dev], ns=self.ns_r, check=False)
            try:
                qs = json.loads(p.stdout or "[]")
            except ValueError:
                qs = []
            qd[name] = {
                q.get("kind", "?"): {
                    "packets": q.get("packets", 0),
                    "bytes": q.get("bytes", 0),
                    "drops": q.get("drops", 0),
                }
                for q in qs
            }
            if self.mode == "netem":
                ne = qd[name].get("netem", {"packets": 0, "drops": 0})
                out[name] = {"packets": ne["packets"] + ne["drops"], "dropped": ne["drops"]}
        out["qdiscs"] = qd
        return out

    # ------------------------------------------------------------------ worker control
    def _read_reply(self, timeout: float) -> str:
        assert self.worker is not None and self.worker.stdout is not None
        r, _, _ = select.select([self.worker.stdout], [], [], timeout)
        if not r:
            raise RuntimeError("the link emulator's worker does not answer")
        return self.worker.stdout.readline()

    def _ctl(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.worker is not None and self.worker.stdin is not None
        self.worker.stdin.write(json.dumps(msg) + "\n")
        self.worker.stdin.flush()
        line = self._read_reply(10.0)
        if not line:
            raise RuntimeError(f"the link emulator's worker exited ({self.worker.poll()})")
        return json.loads(line)


def _stop(p: subprocess.Popen, problems: list[str]) -> None:
    if p.poll() is not None:
        return
    for f in (p.stdin,):
        try:
            if f:
                f.close()
        except OSError:
            pass
    try:
        os.kill(p.pid, signal.SIGTERM)
        p.wait(5)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        problems.append(f"PID {p.pid} ignored SIGTERM: killed")
        os.kill(p.pid, signal.SIGKILL)
        p.wait()


# ---------------------------------------------------------------------- the delay line (runs inside R)
def worker(tun_name: str, b_net: str) -> int:
    """Read packets from a new TUN device, hold each for its direction's delay, drop some, write back.

    Control on stdin, one JSON object a line: {"op": "set", "delay": [ab, ba] seconds, "loss": [ab, ba],
    "seed": n} or {"op": "stats"}; each gets one JSON line on stdout.  Exits when stdin closes."""
    import fcntl
    import ipaddress
    import random
    import struct
    from collections import deque

    TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
    # A delay line must wake up on time on a loaded 2-core VM: a low real-time priority (the process
    # sleeps in select() between packets; the kernel's RT throttling bounds it anyway), else nice -10.
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        try:
            os.nice(-10)
        except OSError:
            pass
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tun_name.encode(), IFF_TUN | IFF_NO_PI))
    net = ipaddress.ip_network(b_net)
    b_lo, b_hi = int(net.network_address), int(net.broadcast_address)
    delay = [0.0, 0.0]
    loss = [0.0, 0.0]
    rng = random.Random(9)
    queues: list[deque] = [deque(), deque()]
    names = ("a_to_b", "b_to_a")
    st = {n: {"packets": 0, "bytes": 0, "dropped": 0, "delayed": 0, "overflow": 0, "queued_max": 0} for n in names}
    st_l = [st[n] for n in names]
    extra = {"write_errors": 0, "max_late_ms": 0.0, "late_1ms": 0, "busy_s": 0.0}
    queued_bytes = 0
    max_queued = 256 << 20
    ctl = sys.stdin.fileno()
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    buf = b""
    mono = time.monotonic
    read, write = os.read, os.write
    unpack = struct.Struct(">I").unpack_from
    while True:
        now = mono()
        timeout = None
        for i in (0, 1):
            q = queues[i]
            while q and q[0][0] <= now:
                t, pkt = q.popleft()
                queued_bytes -= len(pkt)
                late = (now - t) * 1000
                if late > 1.0:
                    extra["late_1ms"] += 1
                    if late > extra["max_late_ms"]:
                        extra["max_late_ms"] = late
                try:
                    write(fd, pkt)
                except OSError:
                    extra["write_errors"] += 1
            if q:
                wait = q[0][0] - now
                timeout = wait if timeout is None or wait < timeout else timeout
        r, _, _ = select.select([fd, ctl], [], [], timeout)
        t0 = mono()
        if fd in r:
            for _ in range(512):
                try:
                    pkt = read(fd, 65536)
                except BlockingIOError:
                    break
                if len(pkt) < 20 or pkt[0] >> 4 != 4:
                    continue
                dst = unpack(pkt, 16)[0]
                d = 0 if b_lo <= dst <= b_hi else 1
                s = st_l[d]
                s["packets"] += 1
                s["bytes"] += len(pkt)
                if loss[d] and rng.random() < loss[d]:
                    s["dropped"] += 1
                    continue
                if not delay[d]:
                    try:
                        write(fd, pkt)
                    except OSError:
                        extra["write_errors"] += 1
                    continue
                if queued_bytes + len(pkt) > max_queued:
                    s["overflow"] += 1
                    continue
                queues[d].append((t0 + delay[d], pkt))
                queued_bytes += len(pkt)
                s["delayed"] += 1
                if len(queues[d]) > s["queued_max"]:
                    s["queued_max"] = len(queues[d])
        if ctl in r:
            chunk = os.read(ctl, 65536)
            if not chunk:
                return 0
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg.get("op") == "set":
                    delay = [float(x) for x in msg.get("delay", delay)]
                    loss = [float(x) for x in msg.get("loss", loss)]
                    rng.seed(msg.get("seed", 9))
                    reply: dict[str, Any] = {"ok": True}
                else:
                    reply = {**st, **extra}
                out.write(json.dumps(reply) + "\n")
                out.flush()
        extra["busy_s"] += mono() - t0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        sys.exit(worker(sys.argv[2], sys.argv[3]))
    print("usage: linkemu.py --worker TUN B-NET (started by Link)", file=sys.stderr)
    sys.exit(2)
