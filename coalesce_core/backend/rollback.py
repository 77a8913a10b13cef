"""The core's own plugin: the generic rollback of Fig. 9 (steps 1130-1140).

Registered by coalesce_core.backend.volume before any backend and marked
``trylast``, so a backend's native rollback (if it returns non-None) wins.
"""

from __future__ import annotations

from typing import Any

import pluggy

from coalesce_core import crashpoints
from coalesce_core.backend.hookspecs import hookimpl


class GenericRollback:
    """Rollback by diff (rollback PCPI -> exported PCPI) and apply, for every backend.

    It calls the hooks through the manager's relay, so fault-injection wrappers
    and the backend's own diff and apply take part exactly as in a transfer.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    @hookimpl(trylast=True)
    def coalesce_rollback(self, volume: Any, qtree: str, rollback_pcpi: str, to_pcpi: str | None) -> bool | None:
        hook = self.pm.hook
        if to_pcpi is None:
            return hook.coalesce_remove_qtree(volume=volume, qtree=qtree)
        records = hook.coalesce_diff(volume=volume, qtree=qtree, base=rollback_pcpi, target=to_pcpi, skip=0)
        if records is None:
            return None
        source = records
        point = crashpoints.current()
        if point is not None:
            records = crashpoints.through(records, point)
        try:
            hook.coalesce_apply(volume=volume, qtree=qtree, records=records, use_purgatory=True)
        finally:
            close = getattr(source, "close", None)  # release what a diff cut short holds
            if close is not None:
                close()
        return True
