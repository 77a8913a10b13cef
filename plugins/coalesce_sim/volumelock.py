"""Who has a sim volume open: a shared lock per writing handle, taken exclusively by the verbs that
need the volume to themselves (docs/sim.md, "One writer at a time").

A sim volume's state lives in the memory of the process that has it open (block map, free stripes,
the changes of the next CP), so two processes must never write it at once.  Every writing handle
(:func:`coalesce_sim.open_sim`) holds ``flock(LOCK_SH)`` on ``DIR/volume.lock`` for as long as it is
open; the ``coalesce sim`` verbs that change the volume or read every stripe (``put``, ``fail-disk``,
``reconstruct``, ``scrub``) turn their own lock into ``LOCK_EX`` without waiting, so they are
refused, naming the other process, while an agent has the volume open; an agent that starts
meanwhile waits for them.  The kernel drops the lock of a process however it ends.  The read verbs
(``ls``, ``cat``, ``get``, ``info``) take no lock and write nothing (coalesce_sim.reader).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from coalesce_core.errors import BackendError

LOCK_NAME = "volume.lock"


def holders(path: str) -> list[int]:
    """PIDs (other than this process) holding a lock on the volume's lock file, from the kernel's
    table of locks (/proc/locks); [] when none or unreadable."""
    try:
        ino = os.stat(os.path.join(path, LOCK_NAME)).st_ino
        table = Path("/proc/locks").read_text()
    except OSError:
        return []
    pids = []
    for line in table.splitlines():
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK" or not f[4].isdigit():
            continue  # waiters ("->") and other kinds of lock
        if f[5].rsplit(":", 1)[-1] == str(ino) and int(f[4]) != os.getpid():
            pids.append(int(f[4]))
    return sorted(set(pids))


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return ""
    words = [a.decode(errors="replace") for a in argv if a]
    if "coalesce_core.ui.cli" in words:  # python -m coalesce_core.ui.cli ...: say coalesce ...
        words = ["coalesce", *words[words.index("coalesce_core.ui.cli") + 1 :]]
    elif words and os.path.basename(words[0]).startswith("python") and len(words) > 1:
        words = words[1:]
    if words:
        words[0] = os.path.basename(words[0])
    return " ".join(" ".join(words).split())[:80]


def describe(pids: list[int]) -> str:
    if not pids:
        return "another process"
    return ", ".join(f"PID {p}" + (f" (`{c}`)" if (c := _command(p)) else "") for p in pids)


class VolumeLock:
    """The lock of one writing handle: shared while it is open; :meth:`exclusive` for a verb."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH)  # waits while a verb has the volume to itself
        except BaseException:
            self.release()
            raise

    @contextlib.contextmanager
    def exclusive(self, verb: str) -> Iterator[None]:
        """Hold the volume alone for ``verb``, or raise BackendError naming who else has it open."""
        fd = self._fd
        if fd is None:
            raise BackendError(f"sim volume {self.path} was closed", hint="open the volume again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackendError(
                f"sim volume {self.path} is open in {describe(holders(self.path))}: `coalesce sim {verb}` "
                "needs the volume to itself (one process writes a sim volume at a time)",
                hint="stop the agent that uses it first (SIGTERM to `coalesce run`; it stops at the next safe "
                "point) or wait until it exits; ls, cat, get and info read the volume beside it",
            ) from None
        try:
            yield
        finally:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self) -> None:
        """Close the lock file (idempotent); the kernel drops the lock with it."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
