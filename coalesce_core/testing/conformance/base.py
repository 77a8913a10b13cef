"""What every part of the kit shares: the failure it reports, and the names,
modes and digests it draws."""

from __future__ import annotations

from coalesce_core.stream import fingerprint

#: Default entry names: collisions on purpose, one non-ASCII, one non-UTF-8 (surrogateescape) name.
NAMES = ("a", "b", "c", "dd", "é", "x y", "\udcff")
SYMLINK_TARGETS = ("a", "../x", "/etc/passwd", "b/c", "../../..", "dd/")
FILE_MODES = (0o644, 0o600, 0o755, 0o640)
DIR_MODES = (0o755, 0o700, 0o750)
XATTR = "user.coalesce"
SNAP_NAMES = ("cf-a", "cf-b", "cf-c", "cf-d")
EMPTY = fingerprint.digest([])


class ConformanceError(AssertionError):
    """A backend broke a contract (the message says which)."""


class InjectedFault(Exception):
    """Raised by the kit's failing record streams (must propagate out of apply)."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConformanceError(message)
