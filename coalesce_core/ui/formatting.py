"""How times, durations and long names read in a table cell: plain strings, no rich.

A missing time or name reads ``—``, so a cell is never empty by accident.
"""

from __future__ import annotations

import re
from datetime import datetime


def clock(ts: float | None) -> str:
    """A Unix time as local ``HH:MM:SS``."""
    if not ts:
        return "—"
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def duration(seconds: float | None) -> str:
    """Seconds in the unit a person reads best: ``ms``, ``s``, ``min`` or ``h``."""
    s = float(seconds or 0.0)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def shorten(name: str | None, width: int = 28) -> str:
    """At most ``width`` characters: the end of a long name, after ``…``."""
    if not name:
        return "—"
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def short_pcpi(name: str | None, group: str) -> str:
    """``co-home-000014-new_base`` -> ``14-new_base``; ``co-home-src-000011`` -> ``src-11`` (narrow views)."""
    if not name:
        return "—"
    prefix = f"co-{group}-"
    if name.startswith(prefix):
        name = name[len(prefix) :]
    return re.sub(r"(^|-)0+(?=\d)", r"\1", name)
