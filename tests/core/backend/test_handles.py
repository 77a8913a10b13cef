"""The backend seam (coalesce_core.backend.handles): a handle's methods are the primitives."""

from __future__ import annotations

import pytest

from coalesce_core.errors import BackendError
from coalesce_core.backend.faults import FaultInjector, InjectedFault, Rule
from coalesce_core.backend.handles import VolumeHandle
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.backend.volume import Volume, plugin_manager


class Tiny(VolumeHandle):
    url = "tiny-handle://x"

    def __init__(self) -> None:
        self.pcpis: list[str] = []
        self.closed = 0

    def snapshot_create(self, name: str) -> str:
        self.pcpis.append(name)
        return name

    def snapshot_list(self) -> list[str]:
        return list(self.pcpis)

    def close(self) -> None:
        self.closed += 1


class Backend:
    def __init__(self, handle: object) -> None:
        self.handle = handle

    @hookimpl
    def coalesce_backend_info(self):
        return {"scheme": "tiny-handle", "description": "test"}

    @hookimpl
    def coalesce_open_volume(self, url, create):
        return self.handle if url.scheme == "tiny-handle" else None


def test_the_default_hooks_call_the_handles_methods():
    h = Tiny()
    vol = Volume.open(plugin_manager([Backend(h)]), "tiny-handle://x")
    assert vol.snapshot_create("p1") == "p1" and vol.snapshot_list() == ["p1"]
    assert vol.metadata_dir() is None          # VolumeHandle's default: the config names one
    vol.close()
    assert h.closed == 1
    with pytest.raises(BackendError, match="no backend implements coalesce_qtree_list"):
        vol.qtree_list()                        # a method the handle lacks


def test_a_backend_hook_replaces_the_method_and_wrappers_see_every_call():
    class Override:
        @hookimpl
        def coalesce_snapshot_list(self, volume):
            return ["from-the-hook"] if isinstance(volume, Tiny) else None

    faults = FaultInjector()
    faults.add(Rule(hook="coalesce_snapshot_create", times=1, message="refused"))
    h = Tiny()
    vol = Volume.open(plugin_manager([Backend(h), Override(), faults]), "tiny-handle://x")
    assert vol.snapshot_list() == ["from-the-hook"]
    with pytest.raises(InjectedFault, match="refused"):
        vol.snapshot_create("p1")
    assert h.pcpis == [] and vol.snapshot_create("p2") == "p2"


def test_objects_that_are_not_handles_are_not_served():
    class NotAHandle:
        url = "tiny-handle://y"

        def snapshot_list(self):
            return ["should not be called"]

    vol = Volume.open(plugin_manager([Backend(NotAHandle())]), "tiny-handle://y")
    with pytest.raises(BackendError, match="no backend implements coalesce_snapshot_list"):
        vol.snapshot_list()


def test_the_facade_reads_a_handles_capabilities():
    class Remote(Tiny):
        records_decoded = True
        resumable_diff = True

    class Duck:  # capabilities belong to VolumeHandle: an object that only looks like one has none
        url = "tiny-handle://z"
        records_decoded = True
        resumable_diff = True

    plain, remote, duck = (Volume.open(plugin_manager([Backend(h)]), "tiny-handle://x")
                           for h in (Tiny(), Remote(), Duck()))
    assert (plain.records_decoded, plain.resumable_diff) == (False, False)
    assert (remote.records_decoded, remote.resumable_diff) == (True, True)
    assert (duck.records_decoded, duck.resumable_diff) == (False, False)
