"""The privilege policy of a group's replicas (``[group] privileges``, docs/config.md).

A source decides what its files are: it can make one setuid root, or give it a file capability
(the ``security.capability`` xattr).  Replicated faithfully, such a file in an export hands the
source's privileges to whoever on the destination can run it.  The policy says what of that a
replica receives:

* ``"keep"``: everything, faithfully (a full-system backup that root restores);
* ``"strip"`` (the default, docs/decisions.md): no setuid or setgid bit (``mode & 0o6000``) on
  any entry, and no xattr of the kernel's privileged namespaces (:data:`PRIVILEGED_XATTR_PREFIXES`:
  ``security.*``, file capabilities, SELinux labels, IMA/EVM signatures; ``trusted.*``, which
  only root may write, overlayfs' redirects among them).  ``user.*`` and ``system.*`` (POSIX ACLs)
  xattrs, owners, the other permission bits and the data are carried as they are.

:class:`as_policy` is the stream filter the transfer pipeline puts between the spool and the
destination's apply (coalesce_core.transfer), so every backend receives the same records and a
spool holds the source's records as they came (a resume counts and skips those).
:func:`description` and :class:`PolicyView` give a source's descriptions and fingerprints as
the policy transforms them, for every comparison of a replica with its source (the check before
``done``, ``coalesce verify``, I3): under "strip" a replica equals its source *as stripped*.
"""

from __future__ import annotations

from typing import Any, Generator, Iterable, Iterator, Mapping

import attrs

from coalesce_core.stream.closing import ClosingFilter
from coalesce_core.stream.records import End, MkDir, MkFile, SetAttr, SetXattr

KEEP = "keep"
STRIP = "strip"
POLICIES = (KEEP, STRIP)
DEFAULT = STRIP

#: the setuid and setgid bits, which "strip" clears
SETID = 0o6000
#: xattr namespaces whose meaning the destination's kernel and security modules give: "strip"
#: carries none of them (docs/config.md, "Privileges")
PRIVILEGED_XATTR_PREFIXES = ("security.", "trusted.")


def is_privileged_xattr(name: str) -> bool:
    """Whether xattr ``name`` is one "strip" does not carry."""
    return name.startswith(PRIVILEGED_XATTR_PREFIXES)


def split_xattrs(xattrs: Mapping[str, bytes]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """``xattrs`` as (the plain ones, the privileged ones)."""
    plain: dict[str, bytes] = {}
    privileged: dict[str, bytes] = {}
    for name, value in xattrs.items():
        (privileged if is_privileged_xattr(name) else plain)[name] = value
    return plain, privileged


def check(policy: str) -> str:
    """``policy`` if it is one of :data:`POLICIES`, else ValueError."""
    if policy not in POLICIES:
        raise ValueError(f"privileges is one of {POLICIES}, not {policy!r}")
    return policy


class as_policy(ClosingFilter):
    """``records`` as a replica under ``policy`` receives them.

    "keep": unchanged.  "strip": MkFile, MkDir and SetAttr modes lose :data:`SETID`; SetXattr
    records of privileged xattrs are dropped, and End counts the records that remain (the
    appliers check it).  ``close()`` closes the wrapped stream too."""

    def __init__(self, records: Iterable[Any], policy: str) -> None:
        self.policy = check(policy)
        super().__init__(records)

    def _filter(self, it: Iterator[Any]) -> Generator[Any, None, None]:
        if self.policy == KEEP:
            yield from it
            return
        dropped = 0
        for rec in it:
            t = type(rec)
            if t is SetXattr and is_privileged_xattr(rec.name):
                dropped += 1
                continue
            if (t is MkFile or t is MkDir or t is SetAttr) and rec.mode is not None and rec.mode & SETID:
                rec = attrs.evolve(rec, mode=rec.mode & ~SETID)
            elif t is End and dropped:
                rec = End(records=max(0, rec.records - dropped))
            yield rec


def description(d: Any, policy: str) -> Any:
    """A source's ``coalesce_core.verify.Description`` as a replica under ``policy`` holds it."""
    if policy == KEEP or (not (d.mode or 0) & SETID and d.privileged_xattrs is None):
        return d
    return attrs.evolve(d, mode=None if d.mode is None else d.mode & ~SETID, privileged_xattrs=None)


class PolicyView:
    """A source volume (``coalesce_core.backend.volume.Volume``) whose descriptions and
    fingerprints are those of its images as a replica under ``policy`` holds them; everything
    else is the volume's own.  Under "keep" it is the volume itself (:func:`view`)."""

    def __init__(self, volume: Any, policy: str) -> None:
        self.volume = volume
        self.policy = check(policy)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.volume, name)

    def describe(self, qtree: str, snapshot: str | None, paths: Any, ranges: Any = None) -> list[Any]:
        return [description(d, self.policy) for d in self.volume.describe(qtree, snapshot, paths, ranges)]

    def describe_tree(self, qtree: str, snapshot: str | None, *, content: bool) -> Iterator[Any]:
        inner = iter(self.volume.describe_tree(qtree, snapshot, content=content))
        try:
            for d in inner:
                yield description(d, self.policy)
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()

    def fingerprint(self, qtree: str, snapshot: str | None = None) -> str:
        """The fingerprint (coalesce_core.stream.fingerprint) of the qtree as stripped: computed
        from its descriptions with content (the backend's own fingerprint covers the setid bits)."""
        from coalesce_core.stream import fingerprint as fp

        entries = []
        for d in self.describe_tree(qtree, snapshot, content=True):
            if d.path == "" or d.kind not in ("d", "f", "l"):
                continue
            entries.append(
                fp.Entry(
                    path=d.path,
                    kind=d.kind,
                    mode=d.mode or 0,
                    size=d.size or 0,
                    content_sha256=d.content or "",
                    target=d.target or "",
                )
            )
        return fp.digest(entries)


def view(volume: Any, policy: str) -> Any:
    """``volume`` as a replica under ``policy`` would hold its images (:class:`PolicyView`), or
    ``volume`` itself for "keep"."""
    return volume if check(policy) == KEEP else PolicyView(volume, policy)
