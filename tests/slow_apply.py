"""A plugin for subprocess tests (``COALESCE_PLUGINS=slow_apply``, tests/ on PYTHONPATH): every apply on the
destination waits ``COALESCE_SLOW_APPLY`` seconds first, so a cycle is reliably under way for that long; with
``COALESCE_SLOW_APPLY_QTREE`` only the applies to that destination qtree do (one replica straggles)."""

from __future__ import annotations

import os
import time

from coalesce_core.backend.hookspecs import hookimpl


@hookimpl(wrapper=True)
def coalesce_apply(volume, qtree, records, use_purgatory):
    only = os.environ.get("COALESCE_SLOW_APPLY_QTREE")
    if "dst" in str(getattr(volume, "url", volume)) and only in (None, qtree):
        time.sleep(float(os.environ.get("COALESCE_SLOW_APPLY", "0")))
    return (yield)
