"""The ``ssh`` backend (entry point ``ssh = "coalesce_remote.ssh"``); see coalesce_remote."""

from coalesce_core.backend.hookspecs import hookimpl

from . import backend_info, open_volume

SCHEME = "ssh"


@hookimpl
def coalesce_backend_info():
    return backend_info(SCHEME)


@hookimpl
def coalesce_open_volume(url, create):
    return open_volume(SCHEME, url)
