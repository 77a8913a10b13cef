"""Reading an iterator ahead in a helper thread.

A producer whose items cost reads and digests (a tree walk, a backend's diff)
runs beside its consumer: a helper thread fills a bounded queue, the consumer
takes from it.  The verifier reads the source side of a tree compare this way
(coalesce_core/verifier.py), the remote source service a diff or description
it sends (plugins/coalesce_remote/serve.py).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Iterator, TypeVar, overload

T = TypeVar("T")

#: how often a helper blocked on a full queue looks whether the consumer went away (seconds)
POLL = 0.2


@overload
def read_ahead(items: Iterator[T], depth: int, *, name: str, idle: None = None, wait: bool = True) -> Iterator[T]: ...


@overload
def read_ahead(items: Iterator[T], depth: int, *, name: str, idle: float, wait: bool = True) -> Iterator[T | None]: ...


def read_ahead(
    items: Iterator[T], depth: int, *, name: str, idle: float | None = None, wait: bool = True
) -> Iterator[T | None]:
    """The items of ``items``, taken from it by a helper thread (named ``name``) at most ``depth`` ahead.

    An error of ``items`` is raised here, after the items that came before it.
    With ``idle``, None is yielded whenever no item came for ``idle`` seconds
    (a keep-alive while the producer is slow).  Closing the returned generator
    tells the helper to stop; the helper then closes ``items``.  With ``wait``
    the close waits for the helper to end; without, it returns at once (a
    helper blocked in a slow ``next(items)`` must not hold up the consumer)."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        """Queue ``entry``; False when the consumer went away first."""
        while not stop.is_set():
            try:
                q.put(entry, timeout=POLL)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            try:
                for item in items:
                    if not put(("item", item)):
                        return
            except BaseException as exc:  # handed to the consumer, which raises it
                put(("error", exc))
            else:
                put(("end", None))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    t = threading.Thread(target=produce, name=name, daemon=True)
    t.start()
    try:
        while True:
            try:
                kind, value = q.get(timeout=idle)
            except queue.Empty:
                yield None
                continue
            if kind == "item":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()
        if wait:
            t.join()
