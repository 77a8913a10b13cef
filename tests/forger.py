"""A test plugin that sends another stream than the one asked for, as a hostile source would.

:class:`ForgeBegin` wraps ``coalesce_diff`` (like tests/dropper.py): while armed, the Begin of
the source's stream names ``fields`` (``qtree``, ``base``, ``target``) instead of the request's,
and the rest of the stream follows unchanged.  ``pulled`` counts the records each forged
stream handed on, so a test can see that nothing after the Begin was taken.  Registered in
the agent's plugin manager it is a hostile local source; in a source service's, a hostile
server (tests/net).
"""

from __future__ import annotations

from typing import Any

import attrs

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.stream import records as R


class ForgeBegin:
    def __init__(self, volume: str = "src", **fields: Any) -> None:
        self.fields = fields
        self.volume = volume
        self.armed = False
        self.pulled: list[int] = []

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree, base, target):
        result = yield
        if result is None or not self.armed or self.volume not in str(getattr(volume, "url", volume)):
            return result
        self.pulled.append(0)
        return self._forge(result, len(self.pulled) - 1)

    def _forge(self, records, i):
        for rec in records:
            if type(rec) is R.Begin:
                rec = attrs.evolve(rec, **self.fields)
            self.pulled[i] += 1
            yield rec
