"""Shared helpers: the plugin manager, applying and fingerprinting, expected
exceptions, the context of a plain check, and the diff + apply check."""

from __future__ import annotations

import os
from typing import Any, Callable

from coalesce_core.backend.manager import plugin_manager
from coalesce_core.backend.volume import Volume
from coalesce_core.stream import fingerprint
from coalesce_core.stream.records import MAX_DATA, Begin, End, Write, framed
from coalesce_core.testing.conformance.base import ConformanceError, _check
from coalesce_core.testing.conformance.model import Model

_PM_CACHE: dict[tuple, Any] = {}


def _pm(plugins: tuple = ()) -> Any:
    # one manager per (extra plugins, environment that plugin_manager() reads)
    key = (tuple(id(p) for p in plugins), os.environ.get("COALESCE_PLUGINS"), os.environ.get("COALESCE_FAULTS"))
    pm = _PM_CACHE.get(key)
    if pm is None:
        pm = _PM_CACHE[key] = plugin_manager(extra=plugins)
    return pm


def _apply(vol: Volume, qtree: str, changes: list[object], use_purgatory: bool = False) -> dict[str, int]:
    res = vol.apply(qtree, framed(qtree, None, "conformance", changes), use_purgatory=use_purgatory)
    _check(
        isinstance(res, dict) and res.get("records") == len(changes),
        f"apply returned {res!r}, expected records={len(changes)}",
    )
    nbytes = sum(len(r.data) for r in changes if isinstance(r, Write))
    _check(res.get("bytes") == nbytes, f"apply returned {res!r}, expected bytes={nbytes}")
    return res


EMPTY_FP = fingerprint.digest([])


def _fps(vol: Volume, snapshot: str | None = None) -> dict[str, str]:
    return {q: vol.fingerprint(q, snapshot) for q in vol.qtree_list(snapshot)}


def _expect(exc_types: tuple[type[BaseException], ...], fn: Callable[[], Any], what: str) -> BaseException:
    try:
        fn()
    except exc_types as exc:
        return exc
    except Exception as exc:  # noqa: BLE001
        raise ConformanceError(f"{what}: expected {[t.__name__ for t in exc_types]}, got {exc!r}") from exc
    raise ConformanceError(f"{what}: expected {[t.__name__ for t in exc_types]}, nothing was raised")


def check_diff(
    vol: Volume,
    qtree: str,
    base: str | None,
    target: str,
    *,
    base_model: Model | None,
    target_fp: str,
    scratch: str = "cf-copy",
    use_purgatory: bool = True,
) -> list[object]:
    """diff(base, target) is deterministic, framed, obeys the order contract and,
    applied to a qtree equal to ``base``, reproduces ``target`` exactly."""
    r1 = list(vol.diff(qtree, base, target))
    r2 = list(vol.diff(qtree, base, target))
    _check(r1 == r2, f"diff({qtree}, {base}, {target}) is not deterministic")
    _check(
        len(r1) >= 2 and isinstance(r1[0], Begin) and isinstance(r1[-1], End),
        "a diff must start with Begin and end with End",
    )
    _check(
        r1[0].base == base and r1[0].target == target,
        f"Begin names base={r1[0].base!r} target={r1[0].target!r}, expected {base!r} {target!r}",
    )
    _check(r1[-1].records == len(r1) - 2, "End.records must count the change records")
    _check(not any(isinstance(r, (Begin, End)) for r in r1[1:-1]), "Begin/End inside a diff")
    _check(all(len(r.data) <= MAX_DATA for r in r1 if isinstance(r, Write)), "a Write carries more than 1 MiB")
    if base_model is not None or base is None:
        m = base_model.copy() if base_model is not None else Model()
        m.apply_all(r1)
        _check(
            m.digest() == target_fp,
            f"diff({qtree}, {base}, {target}) applied to the reference model does not give the target",
        )
    vol.remove_qtree(scratch)
    if base is not None:
        vol.apply(scratch, vol.diff(qtree, None, base), use_purgatory=False)
        _check(
            vol.fingerprint(scratch) == vol.fingerprint(qtree, base),
            f"baseline diff(None, {base}) applied to an empty qtree does not reproduce {base}",
        )
    vol.apply(scratch, iter(r1), use_purgatory=use_purgatory)
    _check(
        vol.fingerprint(scratch) == target_fp,
        f"diff({qtree}, {base}, {target}) applied to a copy of the base does not reproduce the target",
    )
    return r1


class _Ctx:
    def __init__(self, make_volume_url: Callable[[], str], plugins: tuple, fresh_urls: bool) -> None:
        self.make = make_volume_url
        self.pm = _pm(plugins)
        self.fresh_urls = fresh_urls

    def volume(self) -> Volume:
        return Volume.open(self.pm, self.make(), create=True)
