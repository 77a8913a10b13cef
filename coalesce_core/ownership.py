"""One owner per volume: the records that tie a group, its ledger and its volumes together.

* A **destination** belongs to one group.  Its export table is the whole volume's
  (``coalesce_export`` replaces it), so a second group there would wipe the first one's
  exports at its first switch.  The destination records ``{"group", "id"}`` under the key
  ``destination``.
* A **source** serves any number of groups, but not two of one name: the source PCPIs a
  group takes are named after it alone (``co-<group>-src-NNNNNN``), so each would release the
  other's as unknown at its recovery.  The source records ``{"group", "id", "destination"}``
  under ``source.<group>``.
* The **ledger** keeps the group's id (made by ``coalesce init``).  A ledger whose id is not
  the one its destination records is another group's (a copy of a same-named group's ledger,
  a wrong ``metadata`` path), and is refused: it would take the volumes for its own.

Records go through the ``coalesce_claim`` hook (coalesce_core/backend/claims.py): written
once, the first writer wins.  The destination's record and the ledger's identity are checked
when the destination is opened (:func:`bind`), the source's when the agent first opens the
source, for transfers (:func:`bind_source`; the agent opens it lazily).  A volume that keeps
no records (a remote source, whose server grants PCPI names per client: docs/network.md) is
not guarded.  Groups and ledgers from before the records existed are recorded at those opens.  docs/operations.md, "One owner
per volume", says what a refusal means and how to undo a record.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from pathlib import Path

import attrs

from coalesce_core.backend import claims
from coalesce_core.backend.volume import Volume
from coalesce_core.config import GroupConfig
from coalesce_core.cycle.planner import is_group_source_pcpi
from coalesce_core.errors import MetadataError, VolumeInUse
from coalesce_core.ledger import Ledger

log = logging.getLogger("coalesce.ownership")

#: a destination PCPI of any group: ``co-<group>-<6 digits>-<role>`` (coalesce_core.cycle.planner)
_DEST_PCPI = re.compile(r"co-(.+)-\d{6}-[a-z_]+")

DESTINATION = "destination"


def source_key(group: str) -> str:
    """The key of the record a source keeps for the group named ``group``."""
    return f"source.{group}"


def new_identity() -> str:
    """A group's identity: random, made once by ``coalesce init``."""
    return uuid.uuid4().hex


@attrs.frozen
class Owner:
    """One owner record: the group's name and identity (and, on a source, its destination)."""

    group: str
    id: str
    destination: str = ""

    def dump(self) -> str:
        return json.dumps(attrs.asdict(self, filter=lambda a, v: a.name != "destination" or v), sort_keys=True)

    @classmethod
    def parse(cls, text: str, volume: Volume, key: str) -> "Owner":
        try:
            raw = json.loads(text)
            return cls(group=str(raw["group"]), id=str(raw["id"]), destination=str(raw.get("destination", "")))
        except (ValueError, TypeError, KeyError):
            raise MetadataError(
                f"the owner record {key!r} of {volume.url} is damaged: {text[:80]!r}",
                hint=f"remove it ({where(volume, key)}); the next run records the owner again",
            ) from None


def where(volume: Volume, key: str) -> str:
    """Where a person finds the record ``key`` of ``volume`` (the default store's file)."""
    md = volume.metadata_dir()
    if md is None:
        return f"the owner record {key!r} kept with {volume.url}"
    return claims.record_path(md, key)


def read(volume: Volume, key: str) -> Owner | None:
    """The record ``key`` of ``volume``; None when it holds none or keeps no records."""
    text = volume.claim(key)
    return Owner.parse(text, volume, key) if text else None


def check_free(config: GroupConfig, source: Volume, dest: Volume, ledger_path: Path) -> None:
    """``coalesce init`` of a new group: the destination must belong to no group, and the source
    must serve no other group of this name (VolumeInUse, exit 2).  Reads only.  Besides the
    records, the PCPIs tell: a group made before owner records existed has none yet, and must not
    be shut out of its own volumes by a newcomer's records."""
    owner = read(dest, DESTINATION)
    if owner is not None:
        if owner.group != config.name:
            raise _destination_taken(config, dest, owner)
        raise VolumeInUse(
            f"destination {dest.url} belongs to a group named {owner.group!r} whose ledger is not at {ledger_path}",
            hint=f"restore that group's ledger to {ledger_path} (or set `metadata` to where it is) instead of "
            f"initialising again; if that group is gone for good, remove its owner record "
            f"{where(dest, DESTINATION)} and run init again",
        )
    user = read(source, source_key(config.name))
    if user is not None:
        raise _source_taken(config, source, user)
    others = sorted({m.group(1) for n in dest.snapshot_list() if (m := _DEST_PCPI.fullmatch(n))} - {config.name})
    if others:
        raise VolumeInUse(
            f"destination {dest.url} holds the PCPIs of group {others[0]!r} "
            f"(co-{others[0]}-NNNNNN-...): it is that group's destination",
            hint=f"give group {config.name!r} a destination volume of its own; if {others[0]!r} is gone for good, "
            f"release its PCPIs first",
        )
    leftover = sorted(n for n in source.snapshot_list() if is_group_source_pcpi(config.name, n))
    if leftover:
        raise VolumeInUse(
            f"source {source.url} holds source PCPIs of a group named {config.name!r} ({', '.join(leftover[:3])}"
            f"{', ...' if len(leftover) > 3 else ''}): another group of this name uses it",
            hint="give this group another [group] name; if no other group of this name uses the source, "
            "release those PCPIs first (they are left over from an earlier group)",
        )


def bind(config: GroupConfig, ledger: Ledger, dest: Volume, *, write: bool) -> None:
    """Check that ``ledger`` belongs with the destination it opens, and (``write``) record what is
    not recorded yet: the group's identity in the ledger, the owner of the destination.  Raises
    VolumeInUse (exit 2) for a destination another group owns, MetadataError (exit 5) for another
    group's ledger.  The source is checked when it is opened (:func:`bind_source`)."""
    identity = ledger.identity()
    owner = read(dest, DESTINATION)
    if owner is not None:
        if owner.group != config.name:
            raise _destination_taken(config, dest, owner)
        if identity is None:  # a ledger from before identities: the destination says whose it is
            identity = owner.id
            if write:
                ledger.set_identity(identity)
                log.info("ledger %s: recorded the group's identity from destination %s", ledger.path, dest.url)
        elif identity != owner.id:
            raise MetadataError(
                f"the ledger {ledger.path} is not the ledger of the group that owns destination {dest.url}: "
                f"both are named {config.name!r}, but the ledger is of group {identity[:12]} and the destination "
                f"of group {owner.id[:12]}",
                hint="put this group's own ledger back (from its backup: docs/operations.md, \"Backing up the "
                "ledger\"), or point `metadata` at it; another group's ledger would take these volumes for its "
                "own. Nothing was changed",
            )
    if not write:
        return
    if identity is None:
        identity = new_identity()
        ledger.set_identity(identity)
    if owner is None:
        _record(dest, DESTINATION, Owner(config.name, identity), config)


def bind_source(config: GroupConfig, ledger: Ledger, source: Volume, *, write: bool) -> None:
    """Check that ``source`` serves no other group of this name, and (``write``) record this group
    on it if it is not yet.  Raises VolumeInUse (exit 2).  A ledger without an identity (a read-only
    open of a group from before owner records) has nothing to compare: nothing is checked."""
    identity = ledger.identity()
    if identity is None:
        return
    user = read(source, source_key(config.name))
    if user is not None and user.id != identity:
        raise _source_taken(config, source, user)
    if write and user is None:
        _record(source, source_key(config.name), Owner(config.name, identity, config.destination), config)


def _record(volume: Volume, key: str, owner: Owner, config: GroupConfig) -> None:
    stored = volume.claim(key, owner.dump())
    if not stored:
        return  # the volume keeps no owner records
    got = Owner.parse(stored, volume, key)
    if got.id == owner.id:
        log.info("%s: recorded group %r (%s) as its %s", volume.url, owner.group, owner.id[:12], key.split(".")[0])
        return
    # another group recorded itself since we read: it won
    raise (_destination_taken if key == DESTINATION else _source_taken)(config, volume, got)


def _destination_taken(config: GroupConfig, dest: Volume, owner: Owner) -> VolumeInUse:
    return VolumeInUse(
        f"destination {dest.url} belongs to group {owner.group!r}; group {config.name!r} cannot use it too: "
        f"a volume has one export table, and each group's export switch would remove the other's exports",
        hint=f"give group {config.name!r} a destination volume of its own, or add its replicas to group "
        f"{owner.group!r}; if {owner.group!r} is gone for good, remove its owner record {where(dest, DESTINATION)}",
    )


def _source_taken(config: GroupConfig, source: Volume, user: Owner) -> VolumeInUse:
    dest = f" (destination {user.destination})" if user.destination else ""
    key = source_key(config.name)
    return VolumeInUse(
        f"source {source.url} already serves another group named {config.name!r}{dest}: the two would "
        f"release each other's source PCPIs (co-{config.name}-src-NNNNNN)",
        hint=f"give this group another [group] name; if that group is gone for good, remove its record "
        f"{where(source, key)}",
    )
