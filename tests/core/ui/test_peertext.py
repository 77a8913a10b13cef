"""Peer text is data (coalesce_core.ui.peertext): control characters never reach a terminal or
start a log line, rich markup in it prints as it is, identities are quoted."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from coalesce_core.ui.peertext import LineFormatter, clean, markup, quoted

HOSTILE = "boom [/] [bold]x\x1b]0;owned\x07\x1b[31mred\x9b2J\rover\u202eevil\nINFO forged"


def test_clean_shows_every_control_character_as_its_escape():
    got = clean(HOSTILE)
    assert got == "boom [/] [bold]x\\x1b]0;owned\\x07\\x1b[31mred\\x9b2J\\rover\\u202eevil\\nINFO forged"
    assert got.isprintable()
    assert clean(HOSTILE, multiline=True).split("\n") == [clean(HOSTILE.split("\n")[0]), "INFO forged"]
    assert clean("plain text, ünïcode") == "plain text, ünïcode"


def test_clean_bounds_the_text():
    assert clean("x" * 5000) == "x" * 4000 + "..."
    assert clean("x" * 5000, limit=None) == "x" * 5000


def test_markup_prints_brackets_as_they_are():
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(f"[bold]error:[/] {markup(HOSTILE)}", markup=True)
    assert out.getvalue() == f"error: {clean(HOSTILE)}\n"
    assert "\x1b" not in out.getvalue()


def test_quoted_is_repr_style():
    assert quoted("backup1") == "'backup1'"
    assert quoted("evil\nINFO forged") == "'evil\\nINFO forged'"
    assert len(quoted("y" * 1000)) < 220


def test_a_log_record_is_one_line_whatever_its_arguments_held():
    f = LineFormatter("%(levelname)s %(message)s")
    rec = logging.LogRecord("coalesce", logging.WARNING, __file__, 1, "refused %s: %s", ("evil\nINFO x", HOSTILE), None)
    line = f.format(rec)
    assert "\n" not in line and "\x1b" not in line and line.startswith("WARNING refused evil\\nINFO x: boom")
    try:
        raise ValueError("inside")
    except ValueError as exc:
        rec = logging.LogRecord("c", logging.ERROR, __file__, 1, "a\nb", (), (ValueError, exc, exc.__traceback__))
    text = f.format(rec)
    assert text.startswith("ERROR a\\nb\nTraceback")  # the traceback, ours, keeps its lines
