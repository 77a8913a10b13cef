"""The backend seam (coalesce_core.backend.handles): a handle's methods are the primitives."""

from __future__ import annotations

import pytest

from coalesce_core.backend.faults import FaultInjector, InjectedFault, Rule
from coalesce_core.backend.handles import VolumeHandle
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.errors import BackendError
from coalesce_core.stream.records import Begin, End, MkDir


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
    assert vol.metadata_dir() is None  # VolumeHandle's default: the config names one
    vol.close()
    assert h.closed == 1
    with pytest.raises(BackendError, match="no backend implements coalesce_qtree_list"):
        vol.qtree_list()  # a method the handle lacks


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

    plain, remote, duck = (
        Volume.open(plugin_manager([Backend(h)]), "tiny-handle://x") for h in (Tiny(), Remote(), Duck())
    )
    assert (plain.records_decoded, plain.resumable_diff) == (False, False)
    assert (remote.records_decoded, remote.resumable_diff) == (True, True)
    assert (duck.records_decoded, duck.resumable_diff) == (False, False)


class Resumable(Tiny):
    """A source whose diff resumes by itself (as the remote client's does)."""

    resumable_diff = True

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, int]] = []

    def diff(self, qtree: str, base: str | None, target: str, skip: int = 0):
        self.asked.append((qtree, skip))
        changes = [MkDir(path=f"d{i}") for i in range(5)]
        return iter([Begin(qtree=qtree, base=base, target=target), *changes[skip:], End(records=len(changes))])


class SeesSkip:
    """A wrapper that names ``skip`` (a tracking or throttling plugin)."""

    def __init__(self) -> None:
        self.skips: list[int] = []

    @hookimpl(wrapper=True)
    def coalesce_diff(self, volume, qtree, skip):
        self.skips.append(skip)
        return (yield)


def test_a_resumed_diff_goes_through_the_hook_chain():
    """Volume.diff(skip=k) reaches the handle through coalesce_diff: a fault rule on diff fires for
    it, and wrappers that name ``skip`` see it (those that do not, like the fault injector, still run)."""
    faults = FaultInjector(Rule(hook="coalesce_diff", qtree="q", times=1, message="link dropped"))
    seen = SeesSkip()
    h = Resumable()
    vol = Volume.open(plugin_manager([Backend(h), faults, seen]), "tiny-handle://x")
    with pytest.raises(InjectedFault, match="link dropped"):
        vol.diff("q", "a", "b", skip=2)
    assert h.asked == []  # refused before the handle was asked
    got = list(vol.diff("q", "a", "b", skip=2))
    assert got == [
        Begin(qtree="q", base="a", target="b"),
        MkDir(path="d2"),
        MkDir(path="d3"),
        MkDir(path="d4"),
        End(records=5),
    ]
    assert h.asked == [("q", 2)] and seen.skips == [2, 2]
    assert len(list(vol.diff("q", "a", "b"))) == 7 and h.asked[-1] == ("q", 0) and seen.skips[-1] == 0


def test_a_diff_that_cannot_resume_is_not_asked_to_skip():
    class Plain(Tiny):
        def diff(self, qtree, base, target):  # no skip: the default hook calls it without one
            return iter([Begin(qtree=qtree, base=base, target=target), End(records=0)])

    vol = Volume.open(plugin_manager([Backend(Plain())]), "tiny-handle://x")
    assert len(list(vol.diff("q", None, "b"))) == 2
    with pytest.raises(ValueError, match="cannot skip"):
        vol.diff("q", None, "b", skip=1)


class Native(Tiny):
    """A handle with its own rollback (as btrfs and zfs have)."""

    def __init__(self) -> None:
        super().__init__()
        self.rollbacks: list[tuple[str, str, str | None]] = []

    def rollback(self, qtree: str, rollback_pcpi: str, to_pcpi: str | None) -> bool:
        self.rollbacks.append((qtree, rollback_pcpi, to_pcpi))
        return True

    def diff(self, qtree: str, base: str | None, target: str):
        raise AssertionError("the generic rollback ran (it diffs) although the handle rolls back natively")


def test_a_handles_own_rollback_wins_over_the_generic_one():
    """Both defaults are trylast; the handle's method must be tried before Fig. 9's diff-and-apply."""
    handle = Native()
    pm = plugin_manager([Backend(handle)])
    assert pm.hook.coalesce_rollback(volume=handle, qtree="q", rollback_pcpi="r", to_pcpi="base") is True
    assert handle.rollbacks == [("q", "r", "base")]
