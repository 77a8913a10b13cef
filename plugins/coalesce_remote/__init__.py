"""The ``ssh`` and ``tls`` backends: source volumes behind a source service.

A volume URL ``ssh://[user@]host[:port]/<volume URL>`` or
``tls://host:port/<volume name>`` opens a :class:`~coalesce_remote.client.RemoteVolume`,
a client proxy that answers the source primitives (snapshot create, delete
and list, qtree list, diff, fingerprint, describe) by asking ``coalesce serve`` on the
source host (docs/network.md, docs/protocol.md).  The destination primitives
(apply, export, ...) are not offered: a remote volume is a source only.

Two entry-point modules, one per scheme (``coalesce_remote.ssh`` and
``coalesce_remote.tls``), so that each backend describes itself and the
plugin manager registers two distinct plugins; each binds the hooks
:func:`scheme_hooks` makes for its scheme.  For tests without the entry
points: ``COALESCE_PLUGINS=coalesce_remote.ssh,coalesce_remote.tls``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.backend.urls import VolumeURL

from .client import ClientSettings, RemoteVolume, close_all, load_settings, with_options

__all__ = ["RemoteVolume", "ClientSettings", "load_settings", "with_options", "close_all", "scheme_hooks", "plugins"]

_DESCRIPTIONS = {
    "ssh": "a source volume on another host, through ssh and `coalesce serve --stdio` "
    "(ssh://[user@]host[:port]/<volume URL>)",
    "tls": "a source volume served by `coalesce serve --listen` over mutual TLS 1.3 (tls://host:port/<name>)",
}


def scheme_hooks(
    scheme: str,
) -> tuple[Callable[[], dict[str, str]], Callable[[VolumeURL, bool, Mapping[str, Any] | None], RemoteVolume | None]]:
    """The backend hooks of scheme ``scheme`` (``coalesce_backend_info``, ``coalesce_open_volume``), for its
    entry-point module to bind under the hooks' names."""

    @hookimpl
    def coalesce_backend_info() -> dict[str, str]:
        return {"scheme": scheme, "description": _DESCRIPTIONS[scheme]}

    @hookimpl
    def coalesce_open_volume(url: VolumeURL, create: bool, options: Mapping[str, Any] | None) -> RemoteVolume | None:
        """A connected handle for ``url`` when it is a ``scheme`` URL; the primitives are the handle's
        methods (coalesce_core.backend.handles).  ``options``: the source's transport tables, which
        override the process-wide client settings key by key (docs/network.md, "Client settings")."""
        if url.scheme != scheme:
            return None
        vol = RemoteVolume(url, with_options(load_settings(), options, f"the transport settings of source {url}"))
        vol.connect()  # refusals and unreachable servers surface here, with their hint
        return vol

    return coalesce_backend_info, coalesce_open_volume


def plugins() -> list[Any]:
    """The two backend modules, for ``plugin_manager(extra=...)`` when the entry points are not installed."""
    from . import ssh, tls

    return [ssh, tls]
