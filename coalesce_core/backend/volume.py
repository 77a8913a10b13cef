"""The typed facade the rest of the core calls: :class:`Volume`, one open volume of any backend.

The plugin manager it calls through is built by coalesce_core.backend.manager.
The rest of the core never writes ``pm.hook.<name>``: it calls
:class:`Volume`, which calls hooks with keywords only and turns "no plugin
answered" into a clear BackendError.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

import pluggy

from coalesce_core.backend import claims
from coalesce_core.backend.handles import VolumeHandle
from coalesce_core.backend.manager import backend_infos
from coalesce_core.backend.urls import VolumeURL
from coalesce_core.errors import BackendError, UnknownBackend
from coalesce_core.stream.records import MAX_FILE_SIZE


class Volume:
    """An open volume: a typed facade over the primitive hooks for one handle."""

    def __init__(self, pm: pluggy.PluginManager, url: VolumeURL, handle: Any) -> None:
        self.pm = pm
        self.url = url
        self.handle = handle

    @classmethod
    def open(
        cls,
        pm: pluggy.PluginManager,
        url: str | VolumeURL,
        *,
        create: bool = False,
        options: Mapping[str, Any] | None = None,
    ) -> "Volume":
        """Open ``url`` through the backend that serves its scheme; ``options``: the settings the
        group config gives the volume (a source's transport tables, SourceConfig.options), passed
        to the backend as the hook's ``options``."""
        parsed = url if isinstance(url, VolumeURL) else VolumeURL.parse(url)
        handle = pm.hook.coalesce_open_volume(url=parsed, create=create, options=options)
        if handle is None:
            schemes = ", ".join(i["scheme"] for i in backend_infos(pm)) or "none"
            raise UnknownBackend(
                f"no installed backend serves {parsed.scheme!r} volumes ({parsed})",
                hint=f"installed backends: {schemes}; see `coalesce backends`",
            )
        return cls(pm, parsed, handle)

    def __repr__(self) -> str:
        return f"Volume({self.url})"

    # A handle that is not a VolumeHandle (a backend that writes its own primitive hooks) has neither.
    @property
    def records_decoded(self) -> bool:
        """:meth:`diff` yields records its transport's codec already decoded and checked
        (VolumeHandle.records_decoded): the agent does not encode and decode them again."""
        return isinstance(self.handle, VolumeHandle) and bool(self.handle.records_decoded)

    @property
    def resumable_diff(self) -> bool:
        """:meth:`diff` takes ``skip`` (VolumeHandle.resumable_diff): the source regenerates the
        stream and leaves out the records the destination already has."""
        return isinstance(self.handle, VolumeHandle) and bool(self.handle.resumable_diff)

    @property
    def describes_ranges(self) -> bool:
        """:meth:`describe` reads only the byte ranges asked (VolumeHandle.describes_ranges)."""
        return isinstance(self.handle, VolumeHandle) and bool(self.handle.describes_ranges)

    @property
    def max_pcpis(self) -> int | None:
        """The most PCPIs the volume holds (VolumeHandle.max_pcpis); None: no limit it declares."""
        if not isinstance(self.handle, VolumeHandle) or self.handle.max_pcpis is None:
            return None
        return int(self.handle.max_pcpis)

    @property
    def max_file_size(self) -> int:
        """The largest file the volume stores (VolumeHandle.max_file_size), at most 2^63 - 1
        (records.MAX_FILE_SIZE, also when the handle declares nothing)."""
        declared = self.handle.max_file_size if isinstance(self.handle, VolumeHandle) else None
        return MAX_FILE_SIZE if declared is None else min(int(declared), MAX_FILE_SIZE)

    def _call(self, hook: str, **kwargs: Any) -> Any:
        result = getattr(self.pm.hook, hook)(volume=self.handle, **kwargs)
        if result is None:
            raise BackendError(
                f"no backend implements {hook} for {self.url}",
                hint="the backend is incomplete; see docs/writing-a-backend.md",
            )
        return result

    def close(self) -> None:
        self.pm.hook.coalesce_close_volume(volume=self.handle)

    def metadata_dir(self) -> str | None:
        return self.pm.hook.coalesce_metadata_dir(volume=self.handle)

    def claim(self, key: str, value: str | None = None) -> str | None:
        """The owner record ``key`` ("" when it holds nothing), ``value`` stored first if the key
        holds nothing; None when the volume keeps no owner records (see the hookspec)."""
        claims.check_key(key)
        return self.pm.hook.coalesce_claim(volume=self.handle, key=key, value=value)

    def snapshot_create(self, name: str) -> str:
        return self._call("coalesce_snapshot_create", name=name)

    def snapshot_delete(self, name: str) -> bool:
        return self._call("coalesce_snapshot_delete", name=name)

    def snapshot_list(self) -> list[str]:
        return list(self._call("coalesce_snapshot_list"))

    def qtree_list(self, snapshot: str | None = None) -> list[str]:
        return list(self._call("coalesce_qtree_list", snapshot=snapshot))

    def diff(self, qtree: str, base: str | None, target: str, *, skip: int = 0) -> Iterator[Any]:
        """Begin, the change records (after the first ``skip``), End.

        ``skip`` needs a handle that resumes by itself (a remote source: its server skips);
        a local stream is skipped by the caller after the codec checked it whole
        (coalesce_core.stream.spool.skip_changes), since its End counts every record.
        A resumed diff goes through the hook chain like any other."""
        if skip and not self.resumable_diff:
            raise ValueError(f"{self.url}: this backend's diff cannot skip records")
        return iter(self._call("coalesce_diff", qtree=qtree, base=base, target=target, skip=skip))

    def apply(self, qtree: str, records: Iterable[Any], *, use_purgatory: bool = True) -> dict[str, int]:
        return self._call("coalesce_apply", qtree=qtree, records=records, use_purgatory=use_purgatory)

    def rollback(self, qtree: str, rollback_pcpi: str, to_pcpi: str | None) -> bool:
        return self._call("coalesce_rollback", qtree=qtree, rollback_pcpi=rollback_pcpi, to_pcpi=to_pcpi)

    def purge_purgatory(self, qtrees: list[str]) -> bool:
        return self._call("coalesce_purge_purgatory", qtrees=list(qtrees))

    def remove_qtree(self, qtree: str) -> bool:
        return self._call("coalesce_remove_qtree", qtree=qtree)

    def export(self, mapping: Mapping[str, str | None]) -> bool:
        return self._call("coalesce_export", mapping=dict(mapping))

    def exported(self) -> dict[str, str | None]:
        return dict(self._call("coalesce_exported"))

    def export_path(self, replica: str) -> str | None:
        return self.pm.hook.coalesce_export_path(volume=self.handle, replica=replica)

    def pcpi_path(self, pcpi: str, qtree: str) -> str | None:
        """Where ``qtree`` of PCPI ``pcpi`` is readable, or None (hook ``coalesce_pcpi_path``)."""
        return self.pm.hook.coalesce_pcpi_path(volume=self.handle, pcpi=pcpi, qtree=qtree)

    def fingerprint(self, qtree: str, snapshot: str | None = None) -> str:
        return self._call("coalesce_fingerprint", qtree=qtree, snapshot=snapshot)

    def describe(
        self,
        qtree: str,
        snapshot: str | None,
        paths: Sequence[tuple[str, bool]],
        ranges: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    ) -> list[Any]:
        """One coalesce_core.verify.Description per ``(path, content)``, in order; ``ranges``: the
        byte ranges of some of them whose part digests are asked instead of their contents
        (see the hookspec; without :attr:`describes_ranges`, whole contents)."""
        paths = [(p, bool(c)) for p, c in paths]
        if not paths:
            return []
        got = self.pm.hook.coalesce_describe(
            volume=self.handle, qtree=qtree, snapshot=snapshot, paths=paths, ranges=ranges or None
        )
        if got is None:
            raise BackendError(
                f"no backend implements coalesce_describe for {self.url}, so its replicas cannot be "
                f"checked against their source PCPIs",
                hint="implement it (docs/writing-a-backend.md), or set `verify = false` in [group] "
                "to replicate without the check",
            )
        out = list(got)
        if len(out) != len(paths) or any(d.path != p for d, (p, _c) in zip(out, paths)):
            raise BackendError(
                f"{self.url}: coalesce_describe answered {len(out)} descriptions for "
                f"{len(paths)} paths, or not in their order",
                hint="the backend is broken; see docs/writing-a-backend.md",
            )
        return out

    def describe_tree(self, qtree: str, snapshot: str | None, *, content: bool = False) -> Iterator[Any]:
        """Every path of the qtree, in path order (see the hookspec); walked through
        :meth:`describe` a directory at a time when the backend has no walk of its own."""
        it = self.pm.hook.coalesce_describe_tree(volume=self.handle, qtree=qtree, snapshot=snapshot, content=content)
        if it is None:
            from coalesce_core.verify import generic_tree

            return generic_tree(lambda batch: self.describe(qtree, snapshot, batch), content)
        return iter(it)

    def describe_holds(self) -> Any:
        """What the volume keeps of an entry (coalesce_core.verify.Holds)."""
        return self._call("coalesce_describe_holds")
