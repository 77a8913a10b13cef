"""Gathering the evidence for a ledger behind its volumes (coalesce_core/cycle/restore.py decides).

For each replica that had an image, it reads what the destination exports for it now and looks
for a source PCPI of the group whose qtree is equal to that image, and one equal to the replica's
active FS, by fingerprints (the I3 comparison, coalesce_core.stream.fingerprint): the newest
such PCPI first.  This reads every file of those replicas (once on each side, a source PCPI's
digest shared by the replicas of one qtree); it runs only when recovery finds a ledger older than
its volumes, or PCPIs of it removed.  A read that fails leaves that replica unproven.
"""

from __future__ import annotations

import logging
from typing import Mapping

from coalesce_core.backend.volume import Volume
from coalesce_core.cycle.restore import Facts, Proof, examine, number, takes_proof
from coalesce_core.cycle.state import ACTIVE, GroupState, Replica
from coalesce_core.errors import CoalesceError

log = logging.getLogger("coalesce.restore")


def survey(
    state: GroupState,
    sources: Mapping[str, Volume] | None,
    dest: Volume,
    destination_pcpis: frozenset[str],
    source_pcpis: Mapping[str, frozenset[str]],
) -> Facts:
    """The :class:`Facts` for :func:`coalesce_core.cycle.restore.reconcile`; ``source_pcpis``: the
    group's PCPIs each source holds, by source name.  ``sources`` (each source's volume, by name)
    are read only for a ledger older than its volumes (None otherwise: only the destination is
    read), and a replica's image is compared with the PCPIs of the source it comes from."""
    exported = dest.exported()
    proofs: tuple[Proof, ...] = ()
    if examine(state, destination_pcpis, source_pcpis).stale:
        if sources is None:
            raise ValueError("restoring a ledger older than its volumes needs the sources")
        volumes = sources
        ours = {
            s: sorted((n for n in names if number(n) >= 0), key=number, reverse=True)
            for s, names in source_pcpis.items()
        }
        digests: dict[tuple[str, str, str], str | None] = {}

        def source_digest(origin: str, qtree: str, pcpi: str) -> str | None:
            if (origin, qtree, pcpi) not in digests:
                digests[origin, qtree, pcpi] = _digest(volumes[origin], qtree, pcpi)
            return digests[origin, qtree, pcpi]

        def equal_to(digest: str | None, r: Replica) -> str | None:
            if digest is None:
                return None
            for pcpi in ours.get(r.origin, ()):
                if source_digest(r.origin, r.source_qtree, pcpi) == digest:
                    return pcpi
            return None

        out = []
        for r in sorted(state.replicas.values(), key=lambda r: r.name):
            if not takes_proof(r):
                continue
            image = exported.get(r.name)
            if image in (None, ACTIVE) or image not in destination_pcpis:
                out.append(Proof(r.name))
                continue
            held = _digest(dest, r.name, image)
            point = equal_to(held, r)
            active = _digest(dest, r.name, None)
            out.append(
                Proof(
                    r.name,
                    image=image,
                    point=point,
                    active=point if active is not None and active == held else equal_to(active, r),
                )
            )
        proofs = tuple(out)
    return Facts(
        destination_pcpis=destination_pcpis,
        source_pcpis=source_pcpis,
        exported=tuple(sorted(exported.items())),
        proofs=proofs,
    )


def _digest(volume: Volume, qtree: str, pcpi: str | None) -> str | None:
    try:
        return volume.fingerprint(qtree, pcpi)
    except CoalesceError as exc:
        log.warning("cannot read %s of %s (%s): %s", qtree, volume.url, pcpi or "active FS", exc)
        return None
