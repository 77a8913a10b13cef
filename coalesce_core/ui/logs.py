"""Where a verb's messages go: standard error (a terminal or the journal) and a log file.

docs/operations.md ("Logs") is the user's view; this module is the one place that
decides it.  Everything is a record of the standard ``logging`` logger
``coalesce`` (and its children, e.g. ``coalesce.spool``); :func:`configure`
installs up to two handlers for the life of one command:

* the **stream** on standard error: under systemd (``$JOURNAL_STREAM`` names
  standard error's device and inode, systemd.exec(5)) each line starts with a
  syslog priority ``<3>``..``<7>`` (sd-daemon(3)) and has no timestamp, so the
  journal records the level; anywhere else the readable terminal output through
  rich (records that are results, like the per-cycle line, go to standard output);
* the **file** (``--log-file``): ``<ISO-8601 UTC> <LEVEL> <group>[<pid>] <message>``,
  appended, flushed after every line, and reopened by path when logrotate moves
  it (:class:`logging.handlers.WatchedFileHandler`; no signal needed).

A record may say who it is for with ``extra``: ``to="log"`` (the file and the
journal, not the terminal: detail a person at a terminal did not ask for),
``to="console"`` (the terminal only: a summary whose detail went to the log),
``markup`` (rich markup for the terminal, instead of the plain message; text from a peer in it
goes through coalesce_core.ui.peertext.markup) and
``stdout=True`` (the terminal's standard output).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from typing import TextIO

from rich.console import Console

from coalesce_core.errors import ConfigError
from coalesce_core.ui.peertext import LineFormatter, clean

#: The logger every coalesce message goes through; modules log to its children.
log = logging.getLogger("coalesce")

#: Between info and warning, as syslog's notice: a service starting or stopping as asked.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

#: ``--log-level`` choices.
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

#: sd-daemon(3) priority prefixes by logging level (CRITICAL 50 -> <2> ... DEBUG 10 -> <7>).
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (NOTICE, 5), (logging.INFO, 6))

_group = "-"
_installed: list[logging.Handler] = []
_saved: tuple[int, bool] | None = None


def set_group(name: str) -> None:
    """The group this command works on: every later line names it."""
    global _group
    _group = name or "-"


def active() -> bool:
    """Whether :func:`configure` installed the handlers (inside ``coalesce`` verbs)."""
    return bool(_installed)


def say(
    level: int,
    message: str,
    *,
    markup: str | None = None,
    to: str = "all",
    stdout: bool = False,
) -> None:
    """Log ``message`` (plain text) at ``level``; ``markup``, ``to``, ``stdout`` as in the module doc."""
    log.log(level, message, extra={"markup": markup, "to": to, "stdout": stdout})


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (sd-daemon(3): 3 err, 4 warning, 5 notice, 6 info, 7 debug)."""
    for floor, prio in _PRIORITY:
        if levelno >= floor:
            return prio
    return 7


def journal_stream(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal: ``$JOURNAL_STREAM`` is ``<device>:<inode>`` of the file
    systemd connected to the journal, and ``stream`` is that file (systemd.exec(5)).  A terminal
    never is, nor a file a child of a service was redirected to (it inherits the variable)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        if stream.isatty():
            return False
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _Audience(logging.Filter):
    """Lets through the records meant for one kind of destination (``extra`` ``to``)."""

    def __init__(self, *accepted: str) -> None:
        super().__init__()
        self.accepted = accepted

    def filter(self, record: logging.LogRecord) -> bool:
        record.group = _group
        return getattr(record, "to", "all") in self.accepted


class FileFormatter(LineFormatter):
    """``2026-05-09T07:35:25.123Z INFO home[4242] message``: UTC, milliseconds, one line per record
    (a traceback follows on its own lines; a control character or newline in the message, which may
    hold a peer's text, is shown as its escape: coalesce_core.ui.peertext)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(group)s[%(process)d] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JournalFormatter(LineFormatter):
    """``<6>home: message``: the priority on every line (journald reads each line as an entry),
    no timestamp (the journal keeps its own); the message is one line (coalesce_core.ui.peertext)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        group = getattr(record, "group", "-")
        lead = f"<{priority(record.levelno)}>"
        lines = text.splitlines() or [""]
        lines[0] = (f"{group}: " if group != "-" else "") + lines[0]
        return "\n".join(lead + line for line in lines)


class ConsoleHandler(logging.Handler):
    """The terminal output: a record's ``markup`` through rich, or its plain message; on
    standard output for ``stdout`` records, else on standard error (looked up at each line, as
    rich does, so a redirected ``sys.stderr`` is followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console = Console(stderr=not getattr(record, "stdout", False), highlight=False, soft_wrap=True)
            markup = getattr(record, "markup", None)
            if markup is not None:
                console.print(markup, markup=True)
            else:
                console.print(clean(self.format(record), multiline=True, limit=None), markup=False, emoji=False)
        except Exception:
            self.handleError(record)


class JournalHandler(logging.Handler):
    """Lines for the journal on standard error (looked up at each line), flushed one by one."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def open_file(path: str) -> logging.Handler:
    """The ``--log-file`` handler: appended, one flush per line, reopened when rotated.  A path that
    cannot be opened is a :class:`ConfigError` (exit 2) naming it, never a traceback."""
    try:
        handler = logging.handlers.WatchedFileHandler(path, mode="a", encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        parent = os.path.dirname(os.path.abspath(path))
        if isinstance(exc, IsADirectoryError):
            hint = "give a file name inside the directory, e.g. --log-file " + os.path.join(path, "coalesce.log")
        elif not os.path.isdir(parent):
            hint = f"create the directory {parent} first, or choose another path"
        else:
            hint = "choose a path the user running coalesce can write, or fix its permissions"
        raise ConfigError(f"--log-file {path}: cannot open it for appending: {reason}", hint=hint) from None
    handler.setFormatter(FileFormatter())
    handler.addFilter(_Audience("all", "log"))
    return handler


def configure(level: str = "info", log_file: str | None = None) -> None:
    """Install the stream handler, then the file handler (so that a bad ``log_file`` is itself
    reported on the stream); :func:`reset` takes them away again."""
    global _saved
    reset()
    _saved = (log.level, log.propagate)
    log.setLevel(LEVELS[level])
    log.propagate = False  # the command owns its output; nothing else prints these records again
    stream: logging.Handler
    if journal_stream(sys.stderr):
        stream = JournalHandler()
        stream.setFormatter(JournalFormatter())
        stream.addFilter(_Audience("all", "log"))
    else:
        stream = ConsoleHandler()
        stream.addFilter(_Audience("all", "console"))
    _install(stream)
    if log_file:
        _install(open_file(log_file))


def _install(handler: logging.Handler) -> None:
    log.addHandler(handler)
    _installed.append(handler)


def reset() -> None:
    """Remove (and close) what :func:`configure` installed, and forget the group."""
    global _saved
    while _installed:
        h = _installed.pop()
        log.removeHandler(h)
        h.close()
    if _saved is not None:
        log.setLevel(_saved[0])
        log.propagate = _saved[1]
        _saved = None
    set_group("-")
