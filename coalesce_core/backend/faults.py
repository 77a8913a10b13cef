"""Fault injection as a plugin: pluggy wrappers around the primitive hooks.

Tests and ``coalesce demo`` register a :class:`FaultInjector` with rules
such as "the 2nd ``coalesce_diff`` of qtree B fails at its 5th record" or
"every ``coalesce_rollback`` of C fails".  No ``if testing:`` branch exists
anywhere else.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

import attrs

from coalesce_core.backend.hookspecs import PRIMITIVE_HOOKS, hookimpl
from coalesce_core.errors import BackendError


class InjectedFault(BackendError):
    """The failure a FaultInjector rule produced."""


@attrs.define
class Rule:
    """Fail ``hook`` (e.g. "coalesce_diff").

    qtree   only calls for this qtree (None: any)
    nth     only the n-th matching call, counting from 1 (None: every call)
    record  coalesce_diff only: let this many records through, then fail
            while the stream is being consumed (a transfer cut mid-way)
    times   how many times the rule may fire (None: unlimited)
    volume  only calls on a volume whose handle's ``url`` string contains this
    updates_only
            coalesce_diff only: only incremental diffs (with a base PCPI), not
            baselines or re-seeds (a stream the destination can never apply)
    """

    hook: str = attrs.field(validator=attrs.validators.in_(PRIMITIVE_HOOKS))
    qtree: str | None = None
    nth: int | None = None
    record: int | None = None
    times: int | None = None
    volume: str | None = None
    updates_only: bool = False
    message: str = "injected fault"
    calls: int = 0
    fired: int = 0

    def __attrs_post_init__(self) -> None:
        if (self.record is not None or self.updates_only) and self.hook != "coalesce_diff":
            raise ValueError("Rule.record and Rule.updates_only apply to coalesce_diff only")


#: the calls to a source volume that a FaultInjector wraps: opening it, its PCPIs and its diffs
SOURCE_HOOKS = (
    "coalesce_open_volume",
    "coalesce_snapshot_list",
    "coalesce_snapshot_create",
    "coalesce_snapshot_delete",
    "coalesce_diff",
)


def source_outage(volume: str, message: str = "source unreachable") -> list[Rule]:
    """The rules of a source whose host is down (``volume`` as in :class:`Rule`): opening it and every
    call to it fail."""
    return [Rule(hook=hook, volume=volume, message=message) for hook in SOURCE_HOOKS]


def _volume_text(volume: Any) -> str:
    return str(getattr(volume, "url", volume))


class FaultInjector:
    """A plugin whose wrappers apply the armed rules."""

    def __init__(self, *rules: Rule) -> None:
        self.rules: list[Rule] = list(rules)
        self._lock = threading.Lock()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _match(self, hook: str, kwargs: dict[str, Any]) -> Rule | None:
        """Count the call for every matching rule; the first that fires wins."""
        chosen = None
        with self._lock:
            for rule in self.rules:
                if rule.hook != hook:
                    continue
                if rule.qtree is not None and kwargs.get("qtree") != rule.qtree:
                    continue
                if rule.volume is not None and rule.volume not in _volume_text(kwargs.get("volume")):
                    continue
                if rule.updates_only and kwargs.get("base") is None:
                    continue
                rule.calls += 1
                if chosen is not None:
                    continue
                if rule.nth is not None and rule.calls != rule.nth:
                    continue
                if rule.times is not None and rule.fired >= rule.times:
                    continue
                rule.fired += 1
                chosen = rule
        return chosen

    @staticmethod
    def _cut(records: Any, rule: Rule) -> Iterator[Any]:
        for i, rec in enumerate(records, 1):
            if i > (rule.record or 0):
                raise InjectedFault(f"{rule.message} ({rule.hook} at record {i})")
            yield rec

    def _wrap(self, hook: str, kwargs: dict[str, Any]):
        rule = self._match(hook, kwargs)
        if rule is not None and rule.record is None:
            raise InjectedFault(f"{rule.message} ({hook} of {kwargs.get('qtree', '')})")
        result = yield
        if rule is not None and hook == "coalesce_diff" and result is not None:
            return self._cut(result, rule)
        return result

    # One wrapper per primitive; pluggy needs real functions with the spec's names.
    @hookimpl(wrapper=True)
    def coalesce_open_volume(self, url, create):
        """A volume that cannot be opened (a source whose host is down): ``volume`` matches the URL."""
        return (yield from self._wrap("coalesce_open_volume", {"volume": url}))

    @hookimpl(wrapper=True)
    def coalesce_snapshot_list(self, volume):
        return (yield from self._wrap("coalesce_snapshot_list", {"volume": volume}))

    @hookimpl(wrapper=True)
    def coalesce_snapshot_create(self, volume, name):
        return (yield from self._wrap("coalesce_snapshot_create", {"volume": volume, "name": name}))

    @hookimpl(wrapper=True)
    def coalesce_snapshot_delete(self, volume, name):
        return (yield from self._wrap("coalesce_snapshot_delete", {"volume": volume, "name": name}))

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree, base, target):
        return (yield from self._wrap("coalesce_diff", {"volume": volume, "qtree": qtree, "base": base}))

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume, qtree, records):
        return (yield from self._wrap("coalesce_apply", {"volume": volume, "qtree": qtree}))

    @hookimpl(wrapper=True)
    def coalesce_rollback(self, volume, qtree):
        return (yield from self._wrap("coalesce_rollback", {"volume": volume, "qtree": qtree}))

    @hookimpl(wrapper=True)
    def coalesce_export(self, volume, mapping):
        return (yield from self._wrap("coalesce_export", {"volume": volume}))

    @hookimpl(wrapper=True)
    def coalesce_purge_purgatory(self, volume, qtrees):
        return (yield from self._wrap("coalesce_purge_purgatory", {"volume": volume}))

    @hookimpl(wrapper=True)
    def coalesce_remove_qtree(self, volume, qtree):
        return (yield from self._wrap("coalesce_remove_qtree", {"volume": volume, "qtree": qtree}))


def parse_rules(text: str) -> list[Rule]:
    """Rules from ``COALESCE_FAULTS``: ``hook[:key=value]...`` separated by ``;``.

    Example: ``coalesce_diff:qtree=B:record=3:times=1:volume=src;coalesce_rollback:qtree=C``;
    ``coalesce_diff:qtree=B:updates_only=1`` fails every update of B but not its baselines.
    """
    rules = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        hook, *kvs = part.split(":")
        kwargs: dict[str, Any] = {}
        for kv in kvs:
            key, _, value = kv.partition("=")
            if key == "updates_only":
                kwargs[key] = value.lower() in ("1", "true", "yes")
            else:
                kwargs[key] = int(value) if key in ("nth", "record", "times") else value
        rules.append(Rule(hook=hook if hook.startswith("coalesce_") else f"coalesce_{hook}", **kwargs))
    return rules
