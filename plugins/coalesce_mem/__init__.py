"""The `mem` backend (under construction)."""

from coalesce_core.hookspecs import hookimpl


@hookimpl
def coalesce_backend_info():
    return {"scheme": "mem", "description": "mem backend (under construction)"}
