"""Hook specifications of the ``coalesce`` plugin system (pluggy project "coalesce").

Two kinds of hooks, as in pytest's ``hookspec.py``:

* **Primitive hooks** (``firstresult=True``: the call stops at the first
  non-None result).  A storage backend implements them for the volumes it
  opened and returns ``None`` for any other volume, so exactly one backend
  serves a volume.  Every primitive is **idempotent** (creating an existing
  PCPI returns it, deleting a missing one is a no-op, applying an export
  mapping twice is the same as once), because the agent replays effects after
  a crash.  Primitives raise :class:`coalesce_core.errors.BackendError` (or a
  subclass) for failures the agent should treat as "this step failed", and
  :class:`coalesce_core.errors.StreamError` for bad change records.
* **Observer hooks** (broadcast to every plugin, results ignored).  Metrics,
  audit logs and live views are observers.  They must not raise and must not
  block; they are called from the agent's thread, after the state they report
  was persisted.

A backend is a plain module of ``@hookimpl`` functions registered through the
entry-point group ``coalesce.backends`` (see docs/writing-a-backend.md).
Hooks are always called with keyword arguments.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import pluggy

from coalesce_core.cycle.state import ACTIVE as ACTIVE  # the export-mapping value backends are handed

if TYPE_CHECKING:  # the handle class imports hookimpl from here
    from coalesce_core.backend.handles import VolumeHandle
    from coalesce_core.backend.urls import VolumeURL
    from coalesce_core.stream.records import Record
    from coalesce_core.verify import Description, Holds

hookspec = pluggy.HookspecMarker("coalesce")
hookimpl = pluggy.HookimplMarker("coalesce")


# ---------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------
@hookspec
def coalesce_backend_info() -> dict[str, str] | None:
    """Describe this backend: ``{"scheme": "mem", "description": "..."}``.

    Broadcast; backends return one dict, other plugins return None.
    """


@hookspec(firstresult=True)
def coalesce_open_volume(url: VolumeURL, create: bool, options: Mapping[str, Any] | None) -> VolumeHandle | None:
    """Open the volume named by ``url`` (a :class:`coalesce_core.backend.urls.VolumeURL`).

    Return a backend-specific volume handle if ``url.scheme`` is yours, else
    None.  With ``create=True`` an absent volume is created (idempotent); with
    ``create=False`` an absent volume raises BackendError with a hint.
    Stops at the first non-None result.

    ``options``: None, or the settings the group config gives this volume: a
    source's transport tables, ``{"tls": {...}, "transfer": {...}, "ssh": {...}}``
    (coalesce_core.config.SourceConfig.options; docs/network.md, "Client
    settings").  A backend that takes none leaves ``options`` out of its
    signature (pluggy passes an implementation only the arguments it names); one
    that takes them raises ConfigError for a value it cannot use.
    """


@hookspec(firstresult=True)
def coalesce_close_volume(volume: VolumeHandle) -> bool | None:
    """Release what the handle holds (files, mounts the backend made).  Idempotent."""


@hookspec(firstresult=True)
def coalesce_metadata_dir(volume: VolumeHandle) -> str | None:
    """A directory kept with the volume, outside every qtree and PCPI, for the
    group's ledger (DESIGN: the ``.coalesce/`` area).  None if the volume has
    no place on a file system (then the config must name one)."""


@hookspec(firstresult=True)
def coalesce_claim(volume: VolumeHandle, key: str, value: str | None) -> str | None:
    """The owner record ``key`` kept with the volume (outside every qtree and PCPI): when
    ``value`` is given and the key holds nothing, store ``value`` first.  Returns what the key
    holds now, "" for nothing.  Written once: the first writer wins and a later claim with
    another value returns the stored one unchanged (compare-and-set from empty); atomic and
    durable before it returns.  The core records which group owns a destination and which
    groups use a source (coalesce_core/ownership.py).  The default (VolumeHandle.claim) keeps
    one file per key in the metadata directory (coalesce_core/backend/claims.py) and answers
    None for a volume that has none: that volume keeps no owner records.
    """


# ---------------------------------------------------------------------------
# PCPIs (volume-wide snapshots)
# ---------------------------------------------------------------------------
@hookspec(firstresult=True)
def coalesce_snapshot_create(volume: VolumeHandle, name: str) -> str | None:
    """Take a PCPI of the whole volume's active file system, named ``name``.

    Atomic: the PCPI either exists complete or not at all.  Idempotent: if
    ``name`` exists, return it unchanged (do not retake).  Returns ``name``.
    Raises BackendError when the volume cannot hold another PCPI.
    """


@hookspec(firstresult=True)
def coalesce_snapshot_delete(volume: VolumeHandle, name: str) -> bool | None:
    """Release PCPI ``name``.  Returns True if it existed, False if it did not
    (a no-op, not an error).  Must not disturb any other PCPI or what readers
    see through an export of another PCPI."""


@hookspec(firstresult=True)
def coalesce_snapshot_list(volume: VolumeHandle) -> list[str] | None:
    """Names of every PCPI the volume holds now, read from the volume itself."""


@hookspec(firstresult=True)
def coalesce_qtree_list(volume: VolumeHandle, snapshot: str | None) -> list[str] | None:
    """Names of the qtrees (top-level directories) in ``snapshot`` (None: active FS)."""


# ---------------------------------------------------------------------------
# changes
# ---------------------------------------------------------------------------
@hookspec(firstresult=True)
def coalesce_diff(
    volume: VolumeHandle, qtree: str, base: str | None, target: str, skip: int
) -> Iterator[Record] | None:
    """Yield the change records (coalesce_core.stream.records) that turn ``qtree`` as
    it is in PCPI ``base`` into ``qtree`` as it is in PCPI ``target``;
    ``base=None`` is a baseline (everything in ``target``).

    The stream starts with ``Begin`` and ends with ``End`` and obeys the
    order contract of coalesce_core.stream.records.  Reads only; deterministic for the
    same (base, target).  Its cost should follow the change, not the qtree.
    Raises BackendError if a PCPI or the qtree does not exist.

    ``skip`` > 0 resumes a transfer: Begin, the change records after the first
    ``skip``, End (still counting every record).  Only a volume whose handle
    declares ``resumable_diff`` is asked to skip (the facade refuses the others);
    every other call passes 0.  An implementation that serves such a volume must
    name ``skip``; the others, and wrappers, may leave it out (pluggy passes an
    implementation only the arguments it names).
    """


@hookspec(firstresult=True)
def coalesce_apply(
    volume: VolumeHandle, qtree: str, records: Iterable[Record], use_purgatory: bool
) -> dict[str, int] | None:
    """Apply a change stream to ``qtree`` in the active file system; creates the
    qtree if missing.  Returns ``{"records": n, "bytes": n}``.

    Deleted or replaced entries go to the qtree's purgatory when
    ``use_purgatory`` (purged by ``coalesce_purge_purgatory``).  Every path is
    checked: nothing outside ``qtree`` is read or written, no existing symlink
    is followed (I10); a hostile record raises HostilePath before anything is
    written for it.  A failure part-way (bad record, ENOSPC, a broken
    iterator) raises and leaves a partial qtree that the rollback procedure
    repairs; it never touches a PCPI.

    Durable: it returns only once what it wrote survives a power cut
    (``syncfs``, per-file ``fsync``, a consistency point), because the agent
    records ``done`` right after it and recovery trusts that record.
    """


@hookspec(firstresult=True)
def coalesce_rollback(volume: VolumeHandle, qtree: str, rollback_pcpi: str, to_pcpi: str | None) -> bool | None:
    """Make ``qtree`` in the active FS equal to ``qtree`` in ``to_pcpi``, given
    that the active FS equalled ``rollback_pcpi`` when it was taken (Fig. 9).
    ``to_pcpi=None`` means the qtree did not exist: remove it.

    Backends may offer a faster native rollback; return None to let the
    generic one (diff ``rollback_pcpi`` -> ``to_pcpi``, then apply, in
    coalesce_core.backend.rollback) run.  Raises on failure, leaving a partial qtree.
    Durable like ``coalesce_apply``: a native rollback returns only once its result
    survives a power cut (the generic one applies through ``coalesce_apply``).
    """


@hookspec(firstresult=True)
def coalesce_purge_purgatory(volume: VolumeHandle, qtrees: list[str]) -> bool | None:
    """Delete the purgatory of each qtree (jump-ahead step 1).  Idempotent."""


@hookspec(firstresult=True)
def coalesce_remove_qtree(volume: VolumeHandle, qtree: str) -> bool | None:
    """Remove ``qtree`` and its purgatory from the active FS (a failed
    baseline's partial data).  Idempotent; PCPIs are untouched."""


# ---------------------------------------------------------------------------
# exports and checks
# ---------------------------------------------------------------------------
@hookspec(firstresult=True)
def coalesce_export(volume: VolumeHandle, mapping: Mapping[str, str | None]) -> bool | None:
    """Make readers of each replica see what ``mapping`` says, in ONE atomic
    switch for the whole mapping: replica name -> PCPI name, ``ACTIVE`` (the
    live qtree of a broken replica) or None (nothing).  The mapping is the
    whole export table; replicas absent from it export nothing.  Idempotent.
    A reader holding a file open in an old image keeps reading it intact.
    """


@hookspec(firstresult=True)
def coalesce_exported(volume: VolumeHandle) -> dict[str, str | None] | None:
    """The export table as the volume itself has it now (read back, not remembered)."""


@hookspec(firstresult=True)
def coalesce_export_path(volume: VolumeHandle, replica: str) -> str | None:
    """The stable path where readers find ``replica``'s exported image, or None
    when the backend has no file system path (mem)."""


@hookspec(firstresult=True)
def coalesce_pcpi_path(volume: VolumeHandle, pcpi: str, qtree: str) -> str | None:
    """A path where readers find ``qtree`` as PCPI ``pcpi`` holds it (read-only, as long as the PCPI
    exists), or None when the backend has none without extra work (mem, sim, zfs-fuse: no
    browsable snapshots) or the volume holds no such PCPI.  Never takes, mounts or clones anything;
    `status` shows it for a kept PCPI (docs/operations.md, "Writes kept at a resync")."""


@hookspec(firstresult=True)
def coalesce_fingerprint(volume: VolumeHandle, qtree: str, snapshot: str | None) -> str | None:
    """Content digest of ``qtree`` in PCPI ``snapshot`` (None: active FS),
    computed with coalesce_core.stream.fingerprint so that every backend agrees on
    the same tree: names, types, permission bits, sizes, bytes, link targets.
    A missing qtree digests as the empty tree.  A file's bytes enter as its
    content digest (holes read as zeros), which must cost the file's data, not
    its size; no tree depth or path length may make it fail."""


@hookspec(firstresult=True)
def coalesce_describe(
    volume: VolumeHandle,
    qtree: str,
    snapshot: str | None,
    paths: Sequence[tuple[str, bool]],
    ranges: Mapping[str, Sequence[tuple[int, int]]] | None,
) -> list[Description] | None:
    """Describe qtree-relative paths of ``qtree`` in PCPI ``snapshot`` (None: the
    active FS), for verification: one :class:`coalesce_core.verify.Description`
    per ``(path, content)`` pair, in the same order (``""`` is the qtree root).

    ``content``: for a regular file, compute its content digest
    (coalesce_core.stream.fingerprint ``ContentDigest``, at the cost of its data, holes
    skipped).  Every backend describes the same tree identically (names, kinds,
    permission bits, owners, sizes, mtimes, link targets,
    coalesce_core.verify.xattr_fields (xattr digests), a directory's sorted (name, kind)
    entries, a regular file's identity for hard-link groups).  A path that does
    not exist -- or whose parent is not a directory, or is reached through a
    symlink: nothing is followed -- is ``absent``; a missing qtree describes
    every path as absent.  Reads only.  Raises BackendError if ``snapshot``
    does not exist, HostilePath for a path that is not qtree-relative.

    ``ranges`` (optional; None or empty for most calls): for some of the paths
    asked with ``content``, sorted disjoint ``(start, end)`` byte ranges; a
    regular file there is described with ``part`` (fingerprint.part_digest over
    those ranges, reading only them) instead of ``content``.  A handle declares
    that it reads ranges (``VolumeHandle.describes_ranges``); the default
    implementation describes the paths of a handle that does not with their
    whole content, which the check before ``done`` then compares whole on both
    sides (docs/writing-a-backend.md).
    """


@hookspec(firstresult=True)
def coalesce_describe_tree(
    volume: VolumeHandle, qtree: str, snapshot: str | None, content: bool
) -> Iterator[Description] | None:
    """Every path of ``qtree`` in PCPI ``snapshot`` (None: the active FS), the qtree
    root ``""`` first, as coalesce_core.verify.Description in path order (pre-order,
    names by their bytes, coalesce_core.verify.path_key), with content digests
    of regular files when ``content``.  Lazy; memory bounded by the current
    branch, never by the qtree; iterative at any depth; the image stays open
    until the iterator ends or is closed.  Optional: without it the core walks
    the tree through ``coalesce_describe``, a directory at a time.  Reads
    only; raises like ``coalesce_describe``.
    """


@hookspec(firstresult=True)
def coalesce_describe_holds(volume: VolumeHandle) -> Holds | None:
    """What the volume keeps of an entry: a :class:`coalesce_core.verify.Holds`
    (owners, xattrs, the resolution of its mtimes).  Verification compares a
    field only where the destination holds it and reports the fields it
    cannot (never silently).  Reads only."""


@hookspec
def coalesce_cli_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add backend-specific verbs to the CLI (``coalesce sim info`` ...).

    Broadcast.  ``subparsers`` is the argparse sub-parser action of the top
    level; add a parser and ``set_defaults(func=callable(args) -> int)``.
    """


# ---------------------------------------------------------------------------
# observers (broadcast)
# ---------------------------------------------------------------------------
@hookspec
def coalesce_state_changed(group: str, replica: str, trigger: str, source: str, dest: str) -> None:
    """A replica moved along a transition of the spec (already persisted)."""


@hookspec
def coalesce_phase_changed(group: str, trigger: str, source: str, dest: str) -> None:
    """The management agent moved to another phase (already persisted)."""


@hookspec
def coalesce_pcpi_taken(group: str, volume: str, name: str, role: str) -> None:
    """A PCPI was taken on ``volume`` (a URL string) in ``role``."""


@hookspec
def coalesce_pcpi_released(group: str, volume: str, name: str) -> None:
    """A PCPI was released on ``volume``."""


@hookspec
def coalesce_transfer_progress(group: str, replica: str, records: int, nbytes: int) -> None:
    """Progress of a running transfer (called every few hundred records)."""


@hookspec
def coalesce_cycle_finished(group: str, report: Mapping[str, object]) -> None:
    """A cycle ended; ``report`` is the history row (see docs/cli.md, history)."""


PRIMITIVE_HOOKS = (
    "coalesce_open_volume",
    "coalesce_close_volume",
    "coalesce_metadata_dir",
    "coalesce_claim",
    "coalesce_snapshot_create",
    "coalesce_snapshot_delete",
    "coalesce_snapshot_list",
    "coalesce_qtree_list",
    "coalesce_diff",
    "coalesce_apply",
    "coalesce_rollback",
    "coalesce_purge_purgatory",
    "coalesce_remove_qtree",
    "coalesce_export",
    "coalesce_exported",
    "coalesce_export_path",
    "coalesce_pcpi_path",
    "coalesce_fingerprint",
    "coalesce_describe",
    "coalesce_describe_tree",
    "coalesce_describe_holds",
)
OBSERVER_HOOKS = (
    "coalesce_state_changed",
    "coalesce_phase_changed",
    "coalesce_pcpi_taken",
    "coalesce_pcpi_released",
    "coalesce_transfer_progress",
    "coalesce_cycle_finished",
)
