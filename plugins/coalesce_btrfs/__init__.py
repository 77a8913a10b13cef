"""The `btrfs` backend (under construction)."""

from coalesce_core.hookspecs import hookimpl


@hookimpl
def coalesce_backend_info():
    return {"scheme": "btrfs", "description": "btrfs backend (under construction)"}
