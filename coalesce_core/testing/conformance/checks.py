"""The plain checks by name, and running them."""

from __future__ import annotations

from typing import Callable, Iterable

from coalesce_core.testing.conformance.base import ConformanceError
from coalesce_core.testing.conformance.helpers import _Ctx
from coalesce_core.testing.conformance.hostile import check_hostile
from coalesce_core.testing.conformance.primitives import (
    check_claims,
    check_empty_volume,
    check_export,
    check_open,
    check_pcpi_path,
    check_remove_qtree,
    check_snapshots,
)
from coalesce_core.testing.conformance.rollback import check_apply_failures
from coalesce_core.testing.conformance.trees import check_purgatory, check_rich_roundtrip

BASIC_CHECKS: dict[str, Callable[[_Ctx], None]] = {
    "open": check_open,
    "empty_volume": check_empty_volume,
    "snapshots": check_snapshots,
    "rich_roundtrip": check_rich_roundtrip,
    "apply_failures_and_rollback": check_apply_failures,
    "purgatory": check_purgatory,
    "export": check_export,
    "pcpi_path": check_pcpi_path,
    "remove_qtree": check_remove_qtree,
    "claims": check_claims,
    "hostile_records": check_hostile,
}


def run_basic_check(
    name: str, make_volume_url: Callable[[], str], *, plugins: Iterable[object] = (), fresh_urls: bool = True
) -> None:
    """Run one plain check by name (see :data:`BASIC_CHECKS`)."""
    BASIC_CHECKS[name](_Ctx(make_volume_url, tuple(plugins), fresh_urls))


def run_basic_checks(
    make_volume_url: Callable[[], str], *, plugins: Iterable[object] = (), fresh_urls: bool = True
) -> None:
    for name in BASIC_CHECKS:
        try:
            run_basic_check(name, make_volume_url, plugins=plugins, fresh_urls=fresh_urls)
        except ConformanceError as exc:
            raise ConformanceError(f"conformance check {name!r}: {exc}") from exc
