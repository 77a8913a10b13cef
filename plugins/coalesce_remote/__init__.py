"""The ``ssh`` and ``tls`` backends: source volumes behind a source service.

A volume URL ``ssh://[user@]host[:port]/<volume URL>`` or
``tls://host:port/<volume name>`` opens a :class:`~coalesce_remote.client.RemoteVolume`,
a client proxy that answers the source primitives (snapshot create, delete
and list, qtree list, diff, fingerprint, describe) by asking ``coalesce serve`` on the
source host (docs/network.md, docs/protocol.md).  The destination primitives
(apply, export, ...) are not offered: a remote volume is a source only.

Two entry-point modules, one per scheme (``coalesce_remote.ssh`` and
``coalesce_remote.tls``), so that each backend describes itself and the
plugin manager registers two distinct plugins.  For tests without the entry
points: ``COALESCE_PLUGINS=coalesce_remote.ssh,coalesce_remote.tls``.
"""

from __future__ import annotations

from typing import Any, Iterator

from coalesce_core.hookspecs import hookimpl
from coalesce_core.volume import VolumeURL

from .client import ClientSettings, RemoteVolume, close_all, load_settings

__all__ = ["RemoteVolume", "ClientSettings", "load_settings", "close_all", "make_hooks", "plugins"]

_DESCRIPTIONS = {
    "ssh": "a source volume on another host, through ssh and `coalesce serve --stdio` "
           "(ssh://[user@]host[:port]/<volume URL>)",
    "tls": "a source volume served by `coalesce serve --listen` over mutual TLS 1.3 (tls://host:port/<name>)",
}


def make_hooks(scheme: str) -> dict[str, Any]:
    """The @hookimpl functions of the backend for ``scheme`` (each module calls this once)."""

    def _mine(volume: Any) -> bool:
        return isinstance(volume, RemoteVolume) and volume.target.scheme == scheme

    @hookimpl
    def coalesce_backend_info() -> dict[str, str]:
        return {"scheme": scheme, "description": _DESCRIPTIONS[scheme]}

    @hookimpl
    def coalesce_open_volume(url: VolumeURL, create: bool) -> RemoteVolume | None:
        if url.scheme != scheme:
            return None
        vol = RemoteVolume(url, load_settings())
        vol.connect()  # refusals and unreachable servers surface here, with their hint
        return vol

    @hookimpl
    def coalesce_close_volume(volume: Any) -> bool | None:
        if not _mine(volume):
            return None
        volume.close()
        return True

    @hookimpl
    def coalesce_metadata_dir(volume: Any) -> str | None:
        return None

    @hookimpl
    def coalesce_snapshot_create(volume: Any, name: str) -> str | None:
        return volume.snapshot_create(name) if _mine(volume) else None

    @hookimpl
    def coalesce_snapshot_delete(volume: Any, name: str) -> bool | None:
        return volume.snapshot_delete(name) if _mine(volume) else None

    @hookimpl
    def coalesce_snapshot_list(volume: Any) -> list[str] | None:
        return volume.snapshot_list() if _mine(volume) else None

    @hookimpl
    def coalesce_qtree_list(volume: Any, snapshot: str | None) -> list[str] | None:
        return volume.qtree_list(snapshot) if _mine(volume) else None

    @hookimpl
    def coalesce_diff(volume: Any, qtree: str, base: str | None, target: str) -> Iterator[Any] | None:
        return volume.diff(qtree, base, target) if _mine(volume) else None

    @hookimpl
    def coalesce_fingerprint(volume: Any, qtree: str, snapshot: str | None) -> str | None:
        return volume.fingerprint(qtree, snapshot) if _mine(volume) else None

    @hookimpl
    def coalesce_describe(volume: Any, qtree: str, snapshot: str | None, paths: Any) -> list | None:
        return volume.describe(qtree, snapshot, paths) if _mine(volume) else None

    @hookimpl
    def coalesce_describe_tree(volume: Any, qtree: str, snapshot: str | None, content: bool) -> Any:
        return volume.describe_tree(qtree, snapshot, content) if _mine(volume) else None

    return {k: v for k, v in locals().items() if k.startswith("coalesce_")}


def plugins() -> list[Any]:
    """The two backend modules, for ``plugin_manager(extra=...)`` when the entry points are not installed."""
    from . import ssh, tls

    return [ssh, tls]
