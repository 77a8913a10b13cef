"""The plugin contract: documented hookspecs, firstresult primitives, docs in sync."""

from __future__ import annotations

import inspect
from pathlib import Path

import pluggy

from coalesce_core.backend import hookspecs
from coalesce_core.backend.manager import plugin_manager

DOC = Path(__file__).resolve().parents[3] / "docs" / "writing-a-backend.md"


def _specs():
    return {n: f for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("coalesce_")}


def test_every_hook_has_a_contract_docstring():
    for name, f in _specs().items():
        assert f.__doc__ and len(f.__doc__.strip()) > 30, name


def test_primitives_are_firstresult_and_observers_broadcast():
    pm = pluggy.PluginManager("coalesce")
    pm.add_hookspecs(hookspecs)
    for name in hookspecs.PRIMITIVE_HOOKS:
        assert getattr(pm.hook, name).spec.opts["firstresult"], name
    for name in hookspecs.OBSERVER_HOOKS:
        assert not getattr(pm.hook, name).spec.opts["firstresult"], name
    assert set(hookspecs.PRIMITIVE_HOOKS) | set(hookspecs.OBSERVER_HOOKS) | {
        "coalesce_backend_info",
        "coalesce_cli_commands",
    } == set(_specs())


def test_every_hook_is_documented_for_backend_writers():
    text = DOC.read_text()
    missing = [n for n in _specs() if n not in text]
    assert not missing, f"hooks missing from docs/writing-a-backend.md: {missing}"


def test_every_primitive_is_served_by_each_bundled_backend():
    """A backend serves a primitive by a hook of its own or by its handle's method of the same
    name, which the core's default hooks call (coalesce_core.backend.handles)."""
    import coalesce_btrfs
    import coalesce_mem
    import coalesce_sim
    import coalesce_zfs
    from coalesce_core.backend.handles import HandleHooks, VolumeHandle

    handles = {
        "mem": coalesce_mem.MemVolume,
        "sim": coalesce_sim.SimVolume,
        "btrfs": coalesce_btrfs.BtrfsVolume,
        "zfs": coalesce_zfs.ZfsVolume,
    }
    pm = plugin_manager()
    for backend in ("mem", "sim", "btrfs", "zfs"):
        plugin = pm.get_plugin(backend)
        assert plugin is not None, backend
        handle = handles.get(backend)
        assert handle is None or issubclass(handle, VolumeHandle)

        def served(hook: str) -> bool:
            if hasattr(plugin, hook):
                return True
            method = {"coalesce_close_volume": "close"}.get(hook, hook.removeprefix("coalesce_"))
            return handle is not None and hasattr(HandleHooks, hook) and callable(getattr(handle, method, None))

        missing = [h for h in hookspecs.PRIMITIVE_HOOKS if h != "coalesce_rollback" and not served(h)]
        assert not missing, f"{backend} lacks {missing}"


def test_the_diff_implementations_fit_the_spec_and_skip_is_never_hidden():
    """``skip`` is a spec argument without a default (a default would hide it from every
    implementation); the bundled backends and the core's wrappers register against it, and an
    implementation that names ``skip`` names it without a default (pluggy would not pass it)."""
    from dropper import DropRecord

    from coalesce_core.backend.faults import FaultInjector
    from coalesce_core.ui.tracker import Tracker

    pm = plugin_manager([FaultInjector(), Tracker(), DropRecord(lambda rec: False)])
    caller = pm.hook.coalesce_diff
    assert caller.spec.argnames == ("volume", "qtree", "base", "target", "skip") and not caller.spec.kwargnames
    impls = caller.get_hookimpls()
    assert "coalesce.handles" in {i.plugin_name for i in impls} and len(impls) >= 4
    for impl in impls:
        assert set(impl.argnames) <= set(caller.spec.argnames) and "skip" not in impl.kwargnames, impl.plugin_name
    assert "skip" in next(i for i in impls if i.plugin_name == "coalesce.handles").argnames  # resumable handles


def test_open_volume_hands_options_only_to_the_backends_that_name_them():
    """``options`` is a spec argument without a default (pluggy would hide one with a default from every
    implementation); Volume.open always passes it, None by default, so the call never lacks a spec
    argument, and a backend that does not name it (mem) opens as before."""
    import warnings

    from coalesce_core.backend.hookspecs import hookimpl
    from coalesce_core.backend.volume import Volume

    seen: list[object] = []

    class Recorder:  # a backend of another scheme that takes options: it sees every call's, answers None
        @hookimpl
        def coalesce_open_volume(self, url, create, options):
            seen.append(options)

    pm = plugin_manager([Recorder()])
    caller = pm.hook.coalesce_open_volume
    assert caller.spec.argnames == ("url", "create", "options") and not caller.spec.kwargnames
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pluggy warns about a call without a spec argument
        vol = Volume.open(pm, "mem://opts-a", create=True)
        Volume.open(pm, "mem://opts-b", create=True, options={"transfer": {"retries": 1}})
    assert seen == [None, {"transfer": {"retries": 1}}]
    assert vol.snapshot_list() == []
    mem = next(i for i in caller.get_hookimpls() if i.plugin_name == "mem")
    assert mem.argnames == ("url", "create")
