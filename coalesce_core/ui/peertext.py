"""Text that came from a peer, made safe to print and to log (docs/network.md, "Threat model").

A source's error messages (kept in the ledger as a replica's ``last_error``), names a
peer chose, the lines an ssh process writes on standard error and the identity in a
client certificate are data, not instructions to the operator's terminal or log:

* :func:`clean` shows every character that is not printable (C0 and C1 controls, ESC and
  so the start of every CSI/OSC sequence, CR, DEL, bidi overrides, line separators) as its
  escape (``\\x1b``, ``\\r``, ``\\u202e``), so none reaches a terminal or starts a forged
  log line; a newline is kept only where a multi-line message is meant;
* :func:`markup` is :func:`clean`, escaped for rich markup (``[/]`` prints as it is);
* :func:`quoted` is the ``repr``-style quoting of an identity or a name in a log line;
* :class:`LineFormatter` makes every log record one line whatever its arguments held.
"""

from __future__ import annotations

import logging

from rich.markup import escape

#: at most this many characters of one peer text are kept (an error text, a name)
MAX_TEXT = 4000


def _escaped(ch: str) -> str:
    return repr(ch)[1:-1]  # '\x1b', '\r', '\u202e' (repr of a one-character string, unquoted)


def clean(text: object, *, multiline: bool = False, limit: int | None = MAX_TEXT) -> str:
    """``text`` with every non-printable character shown as its escape (a newline kept when
    ``multiline``), cut to ``limit`` characters (``...`` marks the cut; None: never cut)."""
    s = str(text)
    if limit is not None and len(s) > limit:
        s = s[:limit] + "..."
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() or (multiline and ch == "\n") else _escaped(ch) for ch in s)


def markup(text: object, *, multiline: bool = False) -> str:
    """:func:`clean` for a rich markup string: brackets print as they are, never as a tag."""
    return escape(clean(text, multiline=multiline))


def quoted(text: object, limit: int = 200) -> str:
    """``'backup1'``, ``'evil\\nINFO forged'``: an identity or a name, quoted, for a log line."""
    s = str(text)
    return repr(s if len(s) <= limit else s[:limit] + "...")


class LineFormatter(logging.Formatter):
    """A formatter whose records are one line each: the message (its arguments included) is
    :func:`clean`; a traceback, which the process made, follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = clean(record.message, limit=None)
        return super().formatMessage(record)
