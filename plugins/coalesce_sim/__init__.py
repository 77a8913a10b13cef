"""The `sim` backend (under construction)."""

from coalesce_core.hookspecs import hookimpl


@hookimpl
def coalesce_backend_info():
    return {"scheme": "sim", "description": "sim backend (under construction)"}
