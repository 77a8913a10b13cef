"""A source that never ends its stream, as a stuck or hostile one would (docs/network.md, "Threat model").

:class:`Stall` wraps ``coalesce_diff`` (like tests/forger.py) for the updates of one qtree (of the volumes
whose URL holds ``volume``); its ``mode``:

* ``keepalive``: the Begin, then nothing: the source service sends only its keep-alives (empty
  DATA messages every ``keepalive`` seconds of its [server]) while it waits, for ever (until
  :attr:`release` is set or ``hold`` seconds passed);
* ``endless``: the Begin, then change records without end (the same 4 KiB written again and again);
* ``dribble``: the real stream, but the process's stdout is slowed to one byte a second from the
  moment the diff starts (only in the fake ssh below: a byte at a time of the protocol itself).

Registered in a source service's plugin manager it makes a hostile server (tests/net).  Run as
a program it is a fake ``ssh``: ``COALESCE_SSH="python3 tests/stallpeer.py"`` with ``STALLPEER_MODE``,
``STALLPEER_QTREE`` and ``STALLPEER_VOLUME`` (a ``mem:///FILE`` URL) in its environment, it ignores
its arguments and serves the volume on stdin/stdout (``coalesce serve --stdio``) with that plugin;
it exits after ``STALLPEER_LIFE`` seconds (default 60) whatever happens.  With ``STALLPEER_PIDS`` (a
directory) a process whose diff stalled leaves an empty file named by its PID there.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.stream import records as R


class Stall:
    def __init__(self, mode: str, qtree: str = "A", hold: float = 30.0, volume: str = "", pace: float = 0.002) -> None:
        assert mode in ("keepalive", "endless", "dribble"), mode
        self.mode = mode
        self.qtree = qtree
        self.volume = volume
        self.pace = pace  # seconds between two records without end
        self.hold = hold
        self.armed = True
        self.release = threading.Event()
        #: set when a stalled diff started (the fake ssh's dribble starts then)
        self.started = threading.Event()
        self.sent = 0

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree, base, target):
        result = yield
        if (
            result is None
            or not self.armed
            or qtree != self.qtree
            or base is None
            or self.volume not in str(getattr(volume, "url", volume))
        ):
            return result
        self.started.set()
        if self.mode == "dribble":
            return result
        return self._stall(result)

    def _stall(self, records: Any):
        it = iter(records)
        try:
            yield next(it)  # the Begin
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        if self.mode == "keepalive":
            self.release.wait(self.hold)
            return
        end = time.monotonic() + self.hold
        while not self.release.is_set() and time.monotonic() < end:
            self.sent += 1
            yield R.Write(path="a/f", offset=0, data=b"x" * 4096)
            time.sleep(self.pace)


def _dribble(src: int, dst: int, start: threading.Event) -> None:
    """Copy ``src`` to ``dst``: at once until ``start`` is set, then one byte a second."""
    while True:
        data = os.read(src, 1 if start.is_set() else 65536)
        if not data:
            return
        if start.is_set():
            for b in data:
                os.write(dst, bytes((b,)))
                time.sleep(1.0)
        else:
            os.write(dst, data)


def main() -> None:  # the fake ssh
    from coalesce_core.backend.manager import plugin_manager
    from coalesce_remote.serve import Grant, ServerConfig, SourceService, serve_stdio

    signal.alarm(int(float(os.environ.get("STALLPEER_LIFE", "60"))))
    stall = Stall(os.environ["STALLPEER_MODE"], qtree=os.environ.get("STALLPEER_QTREE", "A"), hold=60.0)
    config = ServerConfig(
        volumes={"src": os.environ["STALLPEER_VOLUME"]},
        clients={"backup1": Grant(volumes=("*",), take=True, release=True)},
        keepalive=0.3,
        timeout=60.0,
    )
    service = SourceService(config, pm=plugin_manager([stall]))
    out = os.dup(1)
    os.dup2(2, 1)  # nothing but the protocol on the real stdout
    sys.stdout = sys.stderr
    if stall.mode == "dribble":
        r, w = os.pipe()
        threading.Thread(target=_dribble, args=(r, out, stall.started), daemon=True).start()
        out = w
    marks = os.environ.get("STALLPEER_PIDS")
    if marks:

        def mark() -> None:
            stall.started.wait()
            with open(os.path.join(marks, str(os.getpid())), "w"):
                pass

        threading.Thread(target=mark, daemon=True).start()
    serve_stdio(service, "backup1", 0, out)


if __name__ == "__main__":
    main()
