"""Apply failures and the generic rollback (Fig. 9)."""

from __future__ import annotations

from typing import Iterator

from coalesce_core.backend.volume import Volume
from coalesce_core.stream.records import Begin, MkFile
from coalesce_core.testing.conformance.base import EMPTY, InjectedFault, _check
from coalesce_core.testing.conformance.helpers import _apply, _Ctx, _expect
from coalesce_core.testing.conformance.trees import _rich_changes, _rich_tree


def check_rollback(
    vol: Volume, qtree: str, base: str, target: str, k: int, *, scratch: str = "cf-copy", to_none: bool = False
) -> None:
    """Apply diff(base, target) to a copy of base, failing after ``k`` change records;
    take a rollback PCPI and run the generic rollback (Fig. 9): the copy equals base again."""
    base_fp = vol.fingerprint(qtree, base)
    vol.remove_qtree(scratch)
    vol.apply(scratch, vol.diff(qtree, None, base), use_purgatory=False)
    cbase, crb = "cf-rb-base", "cf-rb-pcpi"
    for name in (crb, cbase):
        vol.snapshot_delete(name)
    vol.snapshot_create(cbase)
    records = list(vol.diff(qtree, base, target))
    changes = records[1:-1]

    def failing() -> Iterator[object]:
        yield records[0]
        for i, rec in enumerate(changes):
            if i == k:
                raise InjectedFault(f"injected after {k} records")
            yield rec
        raise InjectedFault("injected before End")

    _expect(
        (InjectedFault,),
        lambda: vol.apply(scratch, failing(), use_purgatory=True),
        "an exception of the record iterator must propagate out of apply",
    )
    vol.snapshot_create(crb)
    if to_none:
        _check(bool(vol.rollback(scratch, crb, None)), "rollback returned a false value")
        _check(scratch not in vol.qtree_list(), "rollback to None must remove the qtree")
        _check(vol.fingerprint(scratch) == EMPTY, "a removed qtree must digest as the empty tree")
    else:
        _check(bool(vol.rollback(scratch, crb, cbase)), "rollback returned a false value")
        _check(
            vol.fingerprint(scratch) == base_fp,
            f"the generic rollback after a failure at record {k} did not restore the base",
        )
    _check(vol.fingerprint(scratch, cbase) == base_fp, "the rollback changed a PCPI")
    for name in (crb, cbase):
        _check(vol.snapshot_delete(name) is True, f"deleting PCPI {name} did not return True")


def check_apply_failures(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "q", _rich_tree())
    vol.snapshot_create("s1")
    _apply(vol, "q", _rich_changes())
    vol.snapshot_create("s2")
    n = len(list(vol.diff("q", "s1", "s2"))) - 2
    for k in sorted({0, 1, n // 2, n}):
        check_rollback(vol, "q", "s1", "s2", k)
    check_rollback(vol, "q", "s1", "s2", n // 2, to_none=True)

    class Boom(ValueError):
        pass

    def broken() -> Iterator[object]:
        yield Begin(qtree="q", base=None, target="x")
        yield MkFile(path="partial")
        raise Boom("the link dropped")

    _expect(
        (Boom,),
        lambda: vol.apply("q3", broken(), use_purgatory=True),
        "an exception raised by the records iterator must propagate unchanged",
    )
    _check("q3" in vol.qtree_list(), "the partial qtree stays (rollback repairs it)")
