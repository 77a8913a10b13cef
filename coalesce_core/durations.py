"""Durations written by people: ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"``, ``"1w"``.

One number (an integer or a decimal, not negative) and one unit, optionally
separated by spaces; a bare number is seconds.  Units: ``s`` (seconds),
``m`` (minutes), ``h`` (hours), ``d`` (days), ``w`` (weeks).  Used by the
configuration (``[group] verify_every``, docs/config.md) and by whatever
else takes a period.
"""

from __future__ import annotations

import math
import re

UNITS: dict[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}

_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


class DurationError(ValueError):
    """Text that is not a duration; the message says what a duration looks like."""


def parse_duration(text: str | int | float) -> float:
    """Seconds of ``text`` (``"7d"`` -> 604800.0); a number is taken as seconds.

    Raises :class:`DurationError` for anything else: a negative, empty,
    infinite or unit-less text other than a plain number, an unknown unit,
    several numbers."""
    if isinstance(text, bool):
        raise DurationError(f'{text!r} is not a duration (write e.g. "90s", "15m", "2h", "1d", "1w")')
    if isinstance(text, (int, float)):
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise DurationError(f"a duration is a finite number of seconds >= 0, not {text!r}")
        return value
    if not isinstance(text, str):
        raise DurationError(f'{text!r} is not a duration (write e.g. "90s", "15m", "2h", "1d", "1w")')
    m = _RE.match(text)
    if m is None:
        raise DurationError(
            f"{text!r} is not a duration: write one number and a unit, "
            f's (seconds), m (minutes), h (hours), d (days) or w (weeks), e.g. "90s" or "7d"'
        )
    return float(m.group(1)) * UNITS[m.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """The shortest exact text of ``seconds`` in the largest whole unit (``604800`` -> ``"1w"``)."""
    for unit in ("w", "d", "h", "m"):
        n = seconds / UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return format(seconds, "f").rstrip("0").rstrip(".") + "s"


def config_seconds(value: object, key: str, where: str, hint: str) -> float:
    """Seconds of the configured duration ``value`` of ``key``; a ConfigError naming ``where`` and
    the key, with ``hint``, when it is not one (the configuration's every time goes through here)."""
    from coalesce_core.errors import ConfigError

    try:
        return parse_duration(value)  # type: ignore[arg-type]
    except DurationError as exc:
        raise ConfigError(f"{where}: `{key}`: {exc}", hint=hint) from None
