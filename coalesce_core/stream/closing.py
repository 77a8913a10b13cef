"""A record filter that closes what it wraps: the scaffold of the stream's lazy filters."""

from __future__ import annotations

from typing import Any, Generator, Iterable, Iterator


class ClosingFilter:
    """Iterates ``self._filter(records)`` lazily; ``close()`` closes the filter and the wrapped stream,
    even before the first record (a diff holds clones or pipes until it is closed).  Subclasses
    implement :meth:`_filter`."""

    def __init__(self, records: Iterable[Any]) -> None:
        self._inner = iter(records)
        self._gen = self._filter(self._inner)

    def _filter(self, it: Iterator[Any]) -> Generator[Any, None, None]:
        raise NotImplementedError

    def __iter__(self) -> "ClosingFilter":
        return self

    def __next__(self) -> Any:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()
