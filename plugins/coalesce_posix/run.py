"""Running the file-system tools: argument lists only, never a shell.

Every failure becomes a :class:`coalesce_core.errors.BackendError` that names
the command, its exit status and its stderr, plus a hint a person can act on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import BinaryIO, Sequence, cast

from coalesce_core.errors import BackendError, StreamError, TruncatedStream


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


def run(
    argv: Sequence[str], *, hint: str = "", check: bool = True, input: bytes | None = None, timeout: float | None = 600
) -> subprocess.CompletedProcess:
    """Run ``argv`` (a list, no shell) and capture its output as bytes."""
    argv = [os.fspath(a) for a in argv]
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise BackendError(
            f"cannot run {argv[0]!r}: not installed", hint=hint or "install the file-system tools"
        ) from exc
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


def read_exact(f: BinaryIO, n: int, what: str, tool: str) -> bytes:
    """``n`` bytes of the output stream ``f`` of ``tool`` (e.g. "btrfs send"), or TruncatedStream
    saying where the stream ended (``what``)."""
    buf = f.read(n)
    if buf is not None and len(buf) == n:
        return buf
    parts = [buf or b""]
    got = len(parts[0])
    while got < n:
        more = f.read(n - got)
        if not more:
            raise TruncatedStream(
                f"the {tool} stream ended inside {what} ({got} of {n} bytes)",
                hint=f"`{tool}` died or was killed; the update fails and rolls back",
            )
        parts.append(more)
        got += len(more)
    return b"".join(parts)


#: how long a command whose stream ended early is given to exit by itself (StreamingCommand)
EXIT_WAIT = 10.0


class StreamingCommand:
    """``argv`` as a child process whose stdout is a stream the caller reads (``.stdout``), as a
    context manager: ``btrfs send``, ``zfs send``.

    Leaving the ``with`` normally checks that nothing follows what the caller read and that the
    command exited 0, else BackendError with its stderr and ``hint``.  Leaving it by an exception
    kills the command (one whose stream ended, TruncatedStream, first gets ``EXIT_WAIT`` seconds to
    exit by itself); a StreamError (the caller found the stream truncated or malformed) is raised
    again with the command's exit status and stderr added to its message."""

    def __init__(self, argv: Sequence[str], hint: str = "") -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.hint = hint
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def stdout(self) -> BinaryIO:
        assert self.proc is not None and self.proc.stdout is not None
        return cast(BinaryIO, self.proc.stdout)  # __enter__ opens it binary and buffered: an io.BufferedReader

    def __enter__(self) -> "StreamingCommand":
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, bufsize=1 << 20
            )
        except OSError as exc:
            raise BackendError(f"cannot run {self.argv[0]!r}: {exc}", hint=self.hint) from None
        return self

    def __exit__(self, et, ev, tb) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        try:
            if et is not None:
                if isinstance(ev, TruncatedStream):
                    # the command closed its output, so it is exiting: its own exit status and
                    # message say why the stream ended (killed now, it would report SIGKILL)
                    try:
                        proc.wait(timeout=EXIT_WAIT)
                    except subprocess.TimeoutExpired:
                        pass
                proc.kill()
                proc.wait()
                if isinstance(ev, StreamError):
                    msg = proc.stderr.read().decode("utf-8", "replace").strip()
                    raise type(ev)(
                        f"{ev.message}; `{' '.join(self.argv)}` exit status {proc.returncode}: "
                        f"{msg or '(no error output)'}",
                        hint=ev.hint,
                    ) from ev
                return
            rest = proc.stdout.read()
            err = proc.stderr.read()
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        if rc != 0:
            raise command_error(self.argv, rc, err, hint=self.hint)
        if rest:
            raise BackendError(
                f"`{' '.join(self.argv)}` wrote {len(rest)} bytes after the end of its stream", hint=self.hint
            )
