"""A change stream checked against the request that opened it.

A source answers ``diff(qtree, base, target)`` with a stream whose Begin names the qtree and
the two source PCPIs it carries (docs/stream-format.md).  A source that is broken, misconfigured
or hostile may send another qtree's stream, or one between other PCPIs: applied to the replica
that asked, it would give that replica someone else's data or an image the ledger does not
describe.  :func:`as_requested` lets a stream through only if it opens with the Begin of the
request and holds no other Begin; the transfer pipeline (coalesce_core.transfer) passes every
source's stream through it (local, ssh and TLS alike) before the spool or the applier sees a
record, so a refused stream has applied nothing.
"""

from __future__ import annotations

from typing import Any, Generator, Iterable, Iterator

from coalesce_core.errors import UnrequestedStream
from coalesce_core.stream.closing import ClosingFilter
from coalesce_core.stream.records import Begin

_HINT = (
    "the source volume is misconfigured or the source is hostile: nothing of this stream was applied; "
    "the update takes the rollback path and is retried next cycle (check the group's source URL and "
    "the source service's [volumes])"
)


def _text(value: object) -> str:
    """A field of the peer's Begin, quoted (it is peer text: repr keeps control characters inert)."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _describe(qtree: object, base: object, target: object) -> str:
    return f"qtree {_text(qtree)} from {'the empty tree' if base is None else _text(base)} to {_text(target)}"


def check_begin(record: object, qtree: str, base: str | None, target: str) -> Begin:
    """Return ``record`` if it is ``Begin(qtree, base, target)``, else raise UnrequestedStream
    naming what was asked and what came."""
    asked = _describe(qtree, base, target)
    if record is None:
        raise UnrequestedStream(f"the source's stream is empty: no Begin of {asked}", hint=_HINT)
    if type(record) is not Begin:
        raise UnrequestedStream(
            f"the source's stream starts with {type(record).__name__}, not the Begin of {asked}", hint=_HINT
        )
    if (record.qtree, record.base, record.target) != (qtree, base, target):
        raise UnrequestedStream(
            f"the source sent the stream of {_describe(record.qtree, record.base, record.target)}; "
            f"the transfer asked for {asked}",
            hint=_HINT,
        )
    return record


class as_requested(ClosingFilter):
    """``records`` (Begin, changes, End) if its Begin is the request's (:func:`check_begin`) and no
    second Begin follows; raises UnrequestedStream at the first record that is not.

    ``close()`` closes the wrapped stream too, even before the first record (a diff holds
    clones or pipes until it is closed)."""

    def __init__(self, records: Iterable[Any], qtree: str, base: str | None, target: str) -> None:
        self.qtree, self.base, self.target = qtree, base, target
        super().__init__(records)

    def _filter(self, it: Iterator[Any]) -> Generator[Any, None, None]:
        qtree, base, target = self.qtree, self.base, self.target
        first = next(it, None)
        yield check_begin(first, qtree, base, target)
        for rec in it:
            if type(rec) is Begin:
                raise UnrequestedStream(
                    f"the source's stream of {_describe(qtree, base, target)} holds a second Begin, "
                    f"of {_describe(rec.qtree, rec.base, rec.target)}",
                    hint=_HINT,
                )
            yield rec
