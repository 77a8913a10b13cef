"""The plugin manager: hookspecs, the core's own plugins, every installed backend, observer and command.

:func:`plugin_manager` registers, in order: the default hooks that call a
handle's methods and the generic rollback (Fig. 9), tried in that order after
every other implementation, then every entry point of
``coalesce.backends``, ``coalesce.observers`` and ``coalesce.commands``
(bundled plugins are registered exactly like third-party ones), the modules
named in ``COALESCE_PLUGINS`` (comma-separated, like PYTEST_PLUGINS), a fault
injector when ``COALESCE_FAULTS`` holds rules (faults.parse_rules), then
``extra``.  Nothing in coalesce_core imports a backend by name.
"""

from __future__ import annotations

import importlib
import os
from importlib import metadata
from typing import Iterable

import pluggy

from coalesce_core.backend import hookspecs
from coalesce_core.backend.handles import HandleHooks
from coalesce_core.backend.rollback import GenericRollback
from coalesce_core.errors import BackendError

ENTRY_POINT_GROUP = "coalesce.backends"
OBSERVER_GROUP = "coalesce.observers"
COMMANDS_GROUP = "coalesce.commands"  # plugins that add verbs only (`coalesce serve`)
PROJECT = "coalesce"


def plugin_manager(extra: Iterable[object] = ()) -> pluggy.PluginManager:
    """Build a plugin manager with every installed backend and ``extra`` plugins."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    # both are trylast, and pluggy calls the earlier-registered of two trylast implementations first:
    # a handle's own rollback (btrfs, zfs) is tried before the generic one of Fig. 9
    pm.register(HandleHooks(), name="coalesce.handles")
    pm.register(GenericRollback(pm), name="coalesce.generic")
    eps = [ep for g in (ENTRY_POINT_GROUP, OBSERVER_GROUP, COMMANDS_GROUP) for ep in metadata.entry_points(group=g)]
    for ep in eps:
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party backend must not hide the others
            raise BackendError(
                f"backend entry point {ep.name!r} ({ep.value}) failed to load: {exc}",
                hint=f"reinstall or uninstall the distribution that provides it ({ep.dist.name if ep.dist else '?'})",
            ) from exc
        pm.register(plugin, name=ep.name)
    for modname in filter(None, (m.strip() for m in os.environ.get("COALESCE_PLUGINS", "").split(","))):
        module = importlib.import_module(modname)
        if pm.get_plugin(modname) is None and not pm.is_registered(module):
            pm.register(module, name=modname)
    if os.environ.get("COALESCE_FAULTS"):
        from coalesce_core.backend.faults import FaultInjector, parse_rules

        pm.register(FaultInjector(*parse_rules(os.environ["COALESCE_FAULTS"])), name="coalesce.env-faults")
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    return pm


def backend_infos(pm: pluggy.PluginManager) -> list[dict[str, str]]:
    """Every backend's self-description, with the plugin (entry point) name."""
    out = []
    for name, plugin in pm.list_name_plugin():
        impl = getattr(plugin, "coalesce_backend_info", None)
        if impl is None:
            continue
        info = impl()
        if info:
            out.append({"plugin": name, **info})
    return sorted(out, key=lambda i: i["scheme"])
