"""Sizes written by people: ``"4G"``, ``"512M"``, ``"16GiB"``, ``"1T"``.

One number (an integer or a decimal, not negative) and an optional binary unit, optionally
separated by spaces: ``K``, ``M``, ``G``, ``T`` (powers of 1024), each optionally followed by
``iB`` or ``B``; ``B`` or no unit is bytes.  Used by the configuration (``[group] spool_max``,
docs/config.md).
"""

from __future__ import annotations

import math
import re

_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


class SizeError(ValueError):
    """Text that is not a size; the message says what a size looks like."""


def parse_size(text: str | int | float) -> int:
    """Bytes of ``text`` (``"4G"`` -> 4294967296); a number is bytes."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise SizeError(f'{text!r} is not a size (write e.g. "512M", "4G", "1T")')
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise SizeError(f"a size is a finite number of bytes >= 0, not {text!r}")
        return int(text)
    m = _RE.match(text)
    if m is None:
        raise SizeError(f'{text!r} is not a size: write a number and K, M, G or T (powers of 1024), e.g. "4G"')
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))
