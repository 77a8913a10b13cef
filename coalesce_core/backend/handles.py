"""The backend seam: a volume handle class whose methods are the primitives.

A backend supplies a subclass of :class:`VolumeHandle` and two hooks,
``coalesce_backend_info`` and ``coalesce_open_volume`` (which returns a handle);
:class:`HandleHooks`, registered by the plugin manager, implements every other
primitive hook by calling the handle's method of the same name (``hook
coalesce_snapshot_create(volume, name)`` -> ``volume.snapshot_create(name)``), the
way pytest's default ``pytest_runtest_call`` calls ``item.runtest()``.  A
handle that lacks a method leaves that hook to the next implementation (for
``coalesce_rollback``: the Fig. 9 generic rollback, coalesce_core.backend.rollback).
A backend implements a primitive hook itself only to replace or wrap the
method.  Every call goes through the hook chain, a resumed diff
(``Volume.diff(skip=k)``: ``diff(..., skip=k)`` of a ``resumable_diff`` handle)
included, so fault injection, tracking and throttling plugins see them.
docs/writing-a-backend.md.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Protocol, cast

from coalesce_core.backend import claims
from coalesce_core.backend.hookspecs import hookimpl


class VolumeHandle:
    """Base of the handles the default hooks serve.  Capabilities are class attributes, read
    through the facade (coalesce_core.backend.volume.Volume.records_decoded, .resumable_diff)."""

    #: ``diff`` yields records its transport's codec has already decoded and checked, so the agent
    #: does not encode and decode them a second time (coalesce_core.stream.codec)
    records_decoded: bool = False
    #: ``diff(..., skip=k)`` regenerates the stream and skips its first k change records itself
    resumable_diff: bool = False
    #: ``describe`` takes ``ranges`` (hook ``coalesce_describe``): the part digests of files over
    #: byte ranges, reading only those ranges
    describes_ranges: bool = False
    #: the most PCPIs the volume holds, whoever took them (None: no limit it knows of); the agent
    #: starts no cycle without room for the PCPIs a cycle may take (docs/writing-a-backend.md)
    max_pcpis: int | None = None
    #: the largest file (size, and end of any write) the volume stores, in bytes (None: 2^63 - 1,
    #: what the stream carries); a record past it fails the update (coalesce_core.stream.limits)
    max_file_size: int | None = None

    def metadata_dir(self) -> str | None:
        """The directory for the group's ledger kept with the volume; None: the config names one."""
        return None

    def claim(self, key: str, value: str | None) -> str | None:
        """The owner record ``key`` (hook ``coalesce_claim``): one file per key in the metadata
        directory (coalesce_core.backend.claims); None when the volume has no metadata directory."""
        where = self.metadata_dir()
        return None if where is None else claims.claim_in(where, key, value)

    def close(self) -> None:
        """Release what the handle holds (idempotent)."""

    def pcpi_path(self, pcpi: str, qtree: str) -> str | None:
        """Where ``qtree`` of PCPI ``pcpi`` is readable (hook ``coalesce_pcpi_path``); None: nowhere
        without extra work, or no such PCPI."""
        return None


class _ResumableDiff(Protocol):
    """A handle that declares ``resumable_diff``: its ``diff`` takes ``skip``."""

    def diff(self, qtree: str, base: str | None, target: str, *, skip: int) -> Iterator[Any]: ...


def _call(volume: Any, method: str, *args: Any) -> Any:
    if not isinstance(volume, VolumeHandle):
        return None
    fn = getattr(volume, method, None)
    return None if fn is None else fn(*args)


class HandleHooks:
    """The default implementation of every primitive hook (tried last, before the generic rollback)."""

    @hookimpl(trylast=True)
    def coalesce_close_volume(self, volume: Any) -> bool | None:
        if not isinstance(volume, VolumeHandle):
            return None
        volume.close()
        return True

    @hookimpl(trylast=True)
    def coalesce_metadata_dir(self, volume: Any) -> str | None:
        return _call(volume, "metadata_dir")

    @hookimpl(trylast=True)
    def coalesce_claim(self, volume: Any, key: str, value: str | None) -> str | None:
        return _call(volume, "claim", key, value)

    @hookimpl(trylast=True)
    def coalesce_snapshot_create(self, volume: Any, name: str) -> str | None:
        return _call(volume, "snapshot_create", name)

    @hookimpl(trylast=True)
    def coalesce_snapshot_delete(self, volume: Any, name: str) -> bool | None:
        return _call(volume, "snapshot_delete", name)

    @hookimpl(trylast=True)
    def coalesce_snapshot_list(self, volume: Any) -> list[str] | None:
        return _call(volume, "snapshot_list")

    @hookimpl(trylast=True)
    def coalesce_qtree_list(self, volume: Any, snapshot: str | None) -> list[str] | None:
        return _call(volume, "qtree_list", snapshot)

    @hookimpl(trylast=True)
    def coalesce_diff(self, volume: Any, qtree: str, base: str | None, target: str, skip: int) -> Iterator[Any] | None:
        if skip and isinstance(volume, VolumeHandle):  # a resumable_diff handle (Volume.diff checked)
            return cast(_ResumableDiff, volume).diff(qtree, base, target, skip=skip)
        return _call(volume, "diff", qtree, base, target)

    @hookimpl(trylast=True)
    def coalesce_apply(
        self, volume: Any, qtree: str, records: Iterable[Any], use_purgatory: bool
    ) -> dict[str, int] | None:
        return _call(volume, "apply", qtree, records, use_purgatory)

    @hookimpl(trylast=True)
    def coalesce_rollback(self, volume: Any, qtree: str, rollback_pcpi: str, to_pcpi: str | None) -> bool | None:
        return _call(volume, "rollback", qtree, rollback_pcpi, to_pcpi)

    @hookimpl(trylast=True)
    def coalesce_purge_purgatory(self, volume: Any, qtrees: list[str]) -> bool | None:
        return _call(volume, "purge_purgatory", list(qtrees))

    @hookimpl(trylast=True)
    def coalesce_remove_qtree(self, volume: Any, qtree: str) -> bool | None:
        return _call(volume, "remove_qtree", qtree)

    @hookimpl(trylast=True)
    def coalesce_export(self, volume: Any, mapping: Mapping[str, str | None]) -> bool | None:
        return _call(volume, "export", mapping)

    @hookimpl(trylast=True)
    def coalesce_exported(self, volume: Any) -> dict[str, str | None] | None:
        return _call(volume, "exported")

    @hookimpl(trylast=True)
    def coalesce_export_path(self, volume: Any, replica: str) -> str | None:
        return _call(volume, "export_path", replica)

    @hookimpl(trylast=True)
    def coalesce_pcpi_path(self, volume: Any, pcpi: str, qtree: str) -> str | None:
        return _call(volume, "pcpi_path", pcpi, qtree)

    @hookimpl(trylast=True)
    def coalesce_fingerprint(self, volume: Any, qtree: str, snapshot: str | None) -> str | None:
        return _call(volume, "fingerprint", qtree, snapshot)

    @hookimpl(trylast=True)
    def coalesce_describe(self, volume: Any, qtree: str, snapshot: str | None, paths: Any, ranges: Any) -> Any:
        if ranges and isinstance(volume, VolumeHandle) and volume.describes_ranges:
            return cast(Any, volume).describe(qtree, snapshot, paths, ranges)
        return _call(volume, "describe", qtree, snapshot, paths)  # whole contents: compared whole

    @hookimpl(trylast=True)
    def coalesce_describe_tree(self, volume: Any, qtree: str, snapshot: str | None, content: bool) -> Any:
        return _call(volume, "describe_tree", qtree, snapshot, content)

    @hookimpl(trylast=True)
    def coalesce_describe_holds(self, volume: Any) -> Any:
        return _call(volume, "describe_holds")
