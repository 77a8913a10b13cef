"""How an error reaches a person: an ``error:`` line, a ``hint:`` line and the exit code.

Every command path ends its errors in :func:`report_error`: the ``coalesce``
verbs (``cli.main``), the verbs plugins add (``coalesce sim``, ``coalesce
serve``) and the standalone source service (``python -m
coalesce_remote.serve``).  The exit code is the error class's own
(coalesce_core/errors.py; the table is in docs/cli.md), so a new error class
brings its code along.  It lives apart from cli.py so that a plugin's
commands can use it without importing the command line.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

from coalesce_core.errors import CoalesceError

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
    are written as they are.  ``prog`` goes before ``error:`` and ``internal error:``
    (``coalesce serve: error: ...``) where standard error is a server's log.
    """
    lead = f"{prog}: " if prog else ""
    if not isinstance(exc, CoalesceError):
        sys.stderr.write(
            f"{lead}internal error: {type(exc).__name__}: {exc}\n"
            "hint: run again with --debug for the traceback and report it\n"
        )
        return EXIT_INTERNAL
    if styled:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        err.print(f"{escape(lead)}[bold red]error:[/] {escape(exc.message)}", markup=True)
        if exc.hint:
            err.print(f"[bold]hint:[/] {escape(exc.hint)}", markup=True)
    else:
        print(f"{lead}error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
    return exc.exit_code
