"""Running the file-system tools: argument lists only, never a shell.

Every failure becomes a :class:`coalesce_core.errors.BackendError` that names
the command, its exit status and its stderr, plus a hint a person can act on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Sequence

from coalesce_core.errors import BackendError


def which(tool: str, *, package: str) -> str:
    """Absolute path of ``tool`` or a BackendError naming the Debian package."""
    for d in (None, "/usr/sbin:/sbin:/usr/bin:/bin:/usr/local/sbin:/usr/local/bin"):
        path = shutil.which(tool, path=d)
        if path:
            return path
    raise BackendError(
        f"{tool!r} is not installed",
        hint=f"install it (Debian/Ubuntu: apt-get install {package}) or run `python tools/realfs.py up`",
    )


def run(argv: Sequence[str], *, hint: str = "", check: bool = True, input: bytes | None = None,
        timeout: float | None = 600) -> subprocess.CompletedProcess:
    """Run ``argv`` (a list, no shell) and capture its output as bytes."""
    argv = [os.fspath(a) for a in argv]
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise BackendError(f"cannot run {argv[0]!r}: not installed", hint=hint or "install the file-system tools") from exc
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"`{' '.join(argv)}` did not finish within {timeout}s", hint=hint) from exc
    if check and proc.returncode != 0:
        raise command_error(argv, proc.returncode, proc.stderr, hint=hint)
    return proc


def command_error(argv: Sequence[str], rc: int, stderr: bytes | str, *, hint: str = "") -> BackendError:
    err = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    err = err.strip() or "(no error output)"
    return BackendError(f"`{' '.join(map(str, argv))}` failed with exit status {rc}: {err}", hint=hint)


def out(argv: Sequence[str], *, hint: str = "") -> str:
    """stdout of a successful command as text."""
    return run(argv, hint=hint).stdout.decode("utf-8", "surrogateescape")
