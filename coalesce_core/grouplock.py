"""One agent per group: the group's exclusive lock (docs/operations.md, "One agent per group").

Every verb that changes a group (``init``, ``run``, ``add``, ``remove``, ``break``, ``resync``,
``reseed``) holds the lock while it runs (beside a running ``coalesce run`` the last five hand a
request to it instead: coalesce_core.requests); the read verbs (``status``, ``history``,
``check``, ``graph``, ``verify``) never take it and never write the group's state.

The lock is ``flock(2)`` on ``<ledger>.lock`` beside the ledger: the kernel
releases it when its holder exits however it exits (SIGKILL, a power cut), so
a crash never leaves a stale lock and recovery needs nothing from it.  flock
locks belong to an open file, so a second open in the same process conflicts
too.  The holder writes who it is (PID, host, verb, since when) into the file
for the next one to name; that text is advisory, the flock is the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from coalesce_core.errors import GroupLocked


def lock_path(ledger_path: Path) -> Path:
    """Where the lock of the group whose ledger is ``ledger_path`` lives."""
    return ledger_path.with_name(ledger_path.name + ".lock")


def holder(path: Path) -> dict[str, Any]:
    """What the current (or last) holder wrote into the lock file; {} if nothing readable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def running_agent(ledger_path: Path) -> dict[str, Any] | None:
    """The holder of the group's lock when it is a running ``coalesce run`` (which takes requests,
    coalesce_core.requests), else None."""
    info = probe(ledger_path)
    return info if info is not None and info.get("verb") == "run" else None


def probe(ledger_path: Path) -> dict[str, Any] | None:
    """Who holds the group's lock now (for `status`), or None when no process does.

    Reads only, and takes no lock (a probe must never make a starting agent fail): the kernel's
    table of locks (/proc/locks) names the PID that holds an exclusive flock on the lock file's
    inode, confirmed by that process having the file open; the rest (host, verb, since) is what
    the holder wrote into the file."""
    path = lock_path(ledger_path)
    try:
        ino = os.stat(path).st_ino
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in table.splitlines():
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK" or f[3] != "WRITE" or not f[4].isdigit():
            continue  # waiters ("->") and other kinds of lock
        if f[5].rsplit(":", 1)[-1] != str(ino) or not _has_open(int(f[4]), path):
            continue
        pid = int(f[4])
        info = holder(path)
        if info.get("pid") != pid:  # the holder has not written itself yet: the text is its predecessor's
            info = {}
        info["pid"] = pid
        return info
    return None


def _has_open(pid: int, path: Path) -> bool:
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return False
    real = os.path.realpath(path)
    for name in names:
        try:
            if os.readlink(os.path.join(fds, name)) == real:
                return True
        except OSError:
            continue
    return False


def describe(info: Mapping[str, Any]) -> str:
    """The holder as a person reads it: ``PID 4242 on backup1 (`coalesce run`, since 2026-12-07 01:12:40)``."""
    if not info:
        return "another process"
    if "verb" not in info:  # known from the kernel's lock table only: it has just started
        return f"PID {info.get('pid', '?')} (starting)"
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"PID {info.get('pid', '?')} on {info.get('host', '?')} (`coalesce {info.get('verb', '?')}`, since {when})"


class GroupLock:
    """The held lock of one group; :meth:`release` (or the holder's exit) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, ledger_path: Path, group: str, verb: str) -> "GroupLock":
        """Take the lock of ``group`` without waiting; GroupLocked names the holder when another has it."""
        path = lock_path(ledger_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            # the kernel names the holder even before it has written itself into the file
            exc = GroupLocked(
                f"group {group!r} is in use by {describe(probe(ledger_path) or holder(path))}",
                hint="one agent changes a group at a time: wait for it to finish, or stop the running "
                "`coalesce run` (SIGTERM) first; status, history, check and verify work beside it",
            )
            exc.ledger = str(ledger_path)
            raise exc from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": os.uname().nodename, "verb": verb, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Free the lock (idempotent).  The file stays: removing it would let two processes lock
        two different files of the same name."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor of the open file releases the flock
