"""How an error reaches a person: an ``error:`` line, a ``hint:`` line and the exit code.

Every command path ends its errors in :func:`report_error`: the ``coalesce``
verbs (``cli.main``), the verbs plugins add (``coalesce sim``, ``coalesce
serve``) and the standalone source service (``python -m
coalesce_remote.serve``).  The exit code is the error class's own
(coalesce_core/errors.py; the table is in docs/cli.md), so a new error class
brings its code along.  It lives apart from cli.py so that a plugin's
commands can use it without importing the command line.  Inside a ``coalesce``
verb the lines are records of the ``coalesce`` logger (coalesce_core/ui/logs.py),
so they also reach ``--log-file`` and, under systemd, the journal at priority 3.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console

from coalesce_core.errors import CoalesceError
from coalesce_core.ui import logs
from coalesce_core.ui.peertext import clean, markup

#: An unexpected failure (a bug): docs/cli.md, "Exit codes".
EXIT_INTERNAL = 1


def report_error(exc: BaseException, *, styled: bool = True, prog: str = "") -> int:
    """Print ``exc`` on standard error and return the exit code for it.

    A :class:`CoalesceError` prints ``error: <message>`` and, when it has one,
    ``hint: <hint>``, and returns its class's ``exit_code``.  Anything else is
    a bug: ``internal error: <type>: <message>`` and a hint to run again with
    ``--debug``; exit 1.

    ``styled`` prints through rich (bold labels, red ``error:`` on a terminal;
    the message escaped, so brackets print as they are); without it the lines
    are written as they are.  Either way a control character in them (a peer's text) is shown
    as its escape (coalesce_core.ui.peertext).  ``prog`` goes before ``error:`` and ``internal error:``
    (``coalesce serve: error: ...``) where standard error is a server's log.

    While :func:`coalesce_core.ui.logs.configure` is in force the lines are log records at
    ``error``: the terminal shows them as above, and the log file and the journal get them too,
    with an internal error's traceback (which the terminal shows only with ``--debug``).
    """
    lead = f"{prog}: " if prog else ""
    if logs.active():
        _log_error(exc, styled, lead)
        return exc.exit_code if isinstance(exc, CoalesceError) else EXIT_INTERNAL
    if not isinstance(exc, CoalesceError):
        sys.stderr.write(
            f"{lead}internal error: {type(exc).__name__}: {clean(exc)}\n"
            "hint: run again with --debug for the traceback and report it\n"
        )
        return EXIT_INTERNAL
    if styled:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        err.print(f"{markup(lead)}[bold red]error:[/] {markup(exc.message)}", markup=True)
        if exc.hint:
            err.print(f"[bold]hint:[/] {markup(exc.hint)}", markup=True)
    else:
        print(f"{lead}error: {clean(exc.message)}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {clean(exc.hint)}", file=sys.stderr)
    return exc.exit_code


def _log_error(exc: BaseException, styled: bool, lead: str) -> None:
    if not isinstance(exc, CoalesceError):
        logs.say(logging.ERROR, f"{lead}internal error: {type(exc).__name__}: {exc}")
        logs.say(logging.ERROR, "hint: run again with --debug for the traceback and report it")
        logs.log.error("traceback:", exc_info=(type(exc), exc, exc.__traceback__), extra={"to": "log"})
        return
    logs.say(
        logging.ERROR,
        f"{lead}error: {exc.message}",
        markup=f"{markup(lead)}[bold red]error:[/] {markup(exc.message)}" if styled else None,
    )
    if exc.hint:
        logs.say(logging.ERROR, f"hint: {exc.hint}", markup=f"[bold]hint:[/] {markup(exc.hint)}" if styled else None)
