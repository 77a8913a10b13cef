"""The `zfs` backend (under construction)."""

from coalesce_core.hookspecs import hookimpl


@hookimpl
def coalesce_backend_info():
    return {"scheme": "zfs", "description": "zfs backend (under construction)"}
