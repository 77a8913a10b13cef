"""A plugin for subprocess tests (``COALESCE_PLUGINS=slow_apply``, tests/ on PYTHONPATH): every apply on the
destination waits ``COALESCE_SLOW_APPLY`` seconds first, so a cycle is reliably under way for that long."""

from __future__ import annotations

import os
import time

from coalesce_core.backend.hookspecs import hookimpl


@hookimpl(wrapper=True)
def coalesce_apply(volume, qtree, records, use_purgatory):
    if "dst" in str(getattr(volume, "url", volume)):
        time.sleep(float(os.environ.get("COALESCE_SLOW_APPLY", "0")))
    return (yield)
