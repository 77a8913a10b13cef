"""Transfer deadlines: how long one transfer may wait on its source (docs/config.md, "Deadlines").

Two limits per transfer (:class:`TransferLimits`, read from a config table by
:func:`parse_limits`): ``stall``, the source kept the transfer waiting that long for its next
change record (in the check before ``done``: for its next description); ``total``, the whole
transfer, apply, check and any wait for the destination included.  Keep-alives and other
protocol chatter are not progress.

A transfer owns a :class:`Deadline`.  Whatever runs under :func:`bound` (the transfer's
thread, and every call of the source volume wrapped by :class:`Bounded`, from whatever
thread) sees it as :func:`current`: what waits on a peer (the remote client's reads,
connects and back-offs) waits at most :meth:`Deadline.left` and then raises
:class:`DeadlineExceeded`, and the client closes that connection (kills its ssh) instead of
resuming.  The transfer itself checks between records, which is all a local source gets.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from typing import Any, Callable, Iterator

import attrs

from coalesce_core.durations import config_seconds, format_duration
from coalesce_core.errors import TransferFailed

#: the config keys of :class:`TransferLimits` (``[group]``, and a ``[[source]]`` table for its own transfers)
STALL_KEY = "transfer_stall"
TOTAL_KEY = "transfer_timeout"
KEYS = (STALL_KEY, TOTAL_KEY)
#: no change record for this long fails the transfer (docs/config.md argues the figure)
DEFAULT_STALL = 600.0


@attrs.frozen
class TransferLimits:
    """Seconds; None: no such limit."""

    stall: float | None = DEFAULT_STALL
    total: float | None = None

    def overridden(self, overrides: tuple[tuple[str, float | None], ...]) -> "TransferLimits":
        """These limits with those of ``overrides`` (:func:`parse_overrides`) in their place."""
        return attrs.evolve(self, **dict(overrides)) if overrides else self


def parse_limits(table: dict[str, Any], where: str) -> TransferLimits:
    """The limits ``table`` sets (its other keys are the caller's): durations
    (coalesce_core.durations); 0 turns a limit off; ConfigError naming the key."""
    values: dict[str, float | None] = {}
    for key, field, default in ((STALL_KEY, "stall", DEFAULT_STALL), (TOTAL_KEY, "total", None)):
        if key not in table:
            values[field] = default
            continue
        hint = f'for example {key} = "10m"; 0 for no limit (docs/config.md)'
        values[field] = config_seconds(table[key], key, where, hint) or None
    return TransferLimits(**values)


def parse_overrides(table: dict[str, Any], where: str) -> tuple[tuple[str, float | None], ...]:
    """The limits ``table`` sets itself, as ``(TransferLimits field, seconds or None)``; the limits it
    leaves out are inherited (:meth:`TransferLimits.overridden`)."""
    return tuple(
        (field, config_seconds(table[key], key, where, f'for example {key} = "10m"; 0 for no limit') or None)
        for key, field in ((STALL_KEY, "stall"), (TOTAL_KEY, "total"))
        if key in table
    )


class DeadlineExceeded(TransferFailed):
    """A transfer waited on its source past one of its deadlines: it fails and takes the rollback
    path (the replica keeps its image); the source's connection is closed, not resumed."""


class Deadline:
    """The deadlines of one running transfer; ``what`` names it in the error."""

    def __init__(self, limits: TransferLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.started = self.last = clock()
        self.records = 0
        self.checking = False

    def asking(self) -> None:
        """The transfer asks its source for the next record (or description) now: the stall
        counts from here, so time spent applying (or waiting for the destination) is not the
        source's."""
        self.last = self.clock()

    def arrived(self) -> None:
        """A record of the stream arrived."""
        self.records += 1

    def start_check(self) -> None:
        """The stream ended; from now on the stall counts from the last description."""
        self.checking = True
        self.last = self.clock()

    def _lefts(self) -> list[tuple[float, str]]:
        now = self.clock()
        out = []
        if self.limits.stall is not None:
            out.append((self.last + self.limits.stall - now, "stall"))
        if self.limits.total is not None:
            out.append((self.started + self.limits.total - now, "total"))
        return out

    def left(self) -> float | None:
        """Seconds before the nearest deadline (<= 0: past it); None without limits."""
        lefts = self._lefts()
        return min(lefts)[0] if lefts else None

    def check(self, stall: bool = True) -> None:
        """Raise DeadlineExceeded when past a deadline (``stall`` False: the total one only)."""
        for left, which in sorted(self._lefts()):
            if left <= 0 and (stall or which == "total"):
                raise self.error(which)

    def error(self, which: str | None = None) -> DeadlineExceeded:
        """The error of the deadline passed (``which``: "stall" or "total"; None: the nearest)."""
        if which is None:
            lefts = self._lefts()
            which = min(lefts)[1] if lefts else "total"
        got = f"{self.records} records had arrived"
        if which == "stall":
            stall = format_duration(self.limits.stall or 0)
            what = "no description in the check before done" if self.checking else "no change record"
            return DeadlineExceeded(
                f"{what} from the source for {stall}, past the stall deadline `{STALL_KEY}` ({got})",
                hint=f"the source is stuck or hostile (keep-alives are not progress); the update is rolled back "
                f"and retried next cycle. If the source is only slow, raise `{STALL_KEY}` in [group] "
                "or in the source's [[source]] table (docs/config.md)",
            )
        total = format_duration(self.limits.total or 0)
        return DeadlineExceeded(
            f"the transfer took longer than {total}, its deadline `{TOTAL_KEY}` ({got})",
            hint=f"the source sent no end to its stream in time; the update is rolled back and retried next "
            f"cycle. If the change is only large, raise `{TOTAL_KEY}` in [group] or in "
            "the source's [[source]] table (docs/config.md)",
        )


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("coalesce_deadline", default=None)


def current() -> Deadline | None:
    """The deadline of the transfer this code runs for, if any."""
    return _current.get()


@contextlib.contextmanager
def bound(deadline: Deadline | None) -> Iterator[None]:
    """Run the block with ``deadline`` as :func:`current` (in this thread)."""
    token = _current.set(deadline)
    try:
        yield
    finally:
        _current.reset(token)


class Bounded:
    """``volume`` whose every method call, and every item of an iterator a call returns, runs
    under :func:`bound` ``deadline``, in whatever thread makes it (the verifier's helpers
    describe the source from threads of their own)."""

    def __init__(self, volume: Any, deadline: Deadline) -> None:
        self._volume = volume
        self._deadline = deadline

    def __repr__(self) -> str:
        return repr(self._volume)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._volume, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with bound(self._deadline):
                result = attr(*args, **kwargs)
            return _BoundIterator(result, self._deadline) if isinstance(result, Iterator) else result

        return call


class _BoundIterator:
    def __init__(self, it: Iterator[Any], deadline: Deadline) -> None:
        self.it = it
        self.deadline = deadline

    def __iter__(self) -> "_BoundIterator":
        return self

    def __next__(self) -> Any:
        with bound(self.deadline):
            return next(self.it)

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if close is not None:
            with bound(self.deadline):
                close()
