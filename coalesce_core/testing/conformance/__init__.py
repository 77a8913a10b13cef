"""The backend conformance suite: what every coalesce backend must do.

Modelled on hypothesis's provider conformance kit.  A backend's own tests
call it with a factory of fresh volume URLs; it works only through
:func:`coalesce_core.backend.manager.plugin_manager` and :class:`Volume` (it never
imports a backend), so a third-party backend is tested exactly like a bundled
one::

    from coalesce_core.testing.conformance import run_conformance

    def test_conformance(tmp_path):
        counter = itertools.count()
        run_conformance(lambda: f"mybackend://{tmp_path}/vol{next(counter)}")

or, for one pytest item per check and a state machine pytest collects::

    from coalesce_core.testing import conformance
    @pytest.mark.parametrize("check", conformance.BASIC_CHECKS)
    def test_basic(check, tmp_path): conformance.run_basic_check(check, make_url)
    TestMyBackendMachine = conformance.conformance_machine(make_url).TestCase

What is checked (section numbers refer to docs/writing-a-backend.md):

* plain checks (:data:`BASIC_CHECKS`): open/create idempotence and a clear
  error for a missing volume; an empty volume; idempotent PCPI create (not
  retaken) and delete, errors for missing PCPIs; a rich tree (nested dirs,
  empty/small/multi-MiB files with holes, symlinks, hard links, modes,
  xattrs, type changes) survives diff + apply for every pair of PCPIs,
  checked against a reference model that also enforces the order contract of
  coalesce_core.stream.records; apply's counts; a failing record stream propagates
  and the generic rollback (Fig. 9) restores the base; the purgatory is
  invisible to fingerprint and diff and purge is idempotent; export is
  idempotent, read back by ``exported()``, and a bad mapping changes
  nothing; ``pcpi_path`` is None or shows the PCPI's qtree, not the active FS;
  remove_qtree is idempotent and leaves PCPIs alone; owner records
  (``coalesce_claim``) are written once and read back by another handle; hostile
  records (``..``, absolute, NUL, through a symlink of the qtree, hard links
  out of the qtree) raise HostilePath and change nothing anywhere.
* a hypothesis ``RuleBasedStateMachine`` (:func:`conformance_machine`) that
  writes random source changes to a "src" qtree by applying generated
  records (``use_purgatory=False``), mirrors them in the model, and
  interleaves PCPI create/delete, diff + apply into a scratch qtree, partial
  apply + generic rollback, exports, purges, qtree removal and hostile
  records, checking fingerprints against the model after every step.

Step counts: ``max_examples`` / ``stateful_steps`` arguments win; else the
hypothesis profile named by ``HYPOTHESIS_PROFILE`` (if it is registered; the
names dev/ci/long have fallbacks here); else moderate defaults that run in
seconds on ``mem``.

The kit is split along these parts, one module each: ``base`` (the failure
type and the names, modes and digests drawn), ``settings`` (step counts),
``model`` (the reference model), ``changes`` (generated source changes),
``helpers`` (shared by the checks), ``primitives``, ``trees``, ``rollback``
and ``hostile`` (the plain checks), ``checks`` (:data:`BASIC_CHECKS` and
running them) and ``machine`` (the state machine and :func:`run_conformance`).
Import from the package; the module names are not an interface.
"""

from __future__ import annotations

from coalesce_core.testing.conformance.base import (  # noqa: F401  re-exported
    DIR_MODES,
    EMPTY,
    FILE_MODES,
    NAMES,
    SNAP_NAMES,
    SYMLINK_TARGETS,
    XATTR,
    ConformanceError,
    InjectedFault,
)
from coalesce_core.testing.conformance.changes import draw_changes  # noqa: F401
from coalesce_core.testing.conformance.checks import BASIC_CHECKS, run_basic_check, run_basic_checks
from coalesce_core.testing.conformance.helpers import EMPTY_FP, check_diff  # noqa: F401
from coalesce_core.testing.conformance.hostile import HOSTILE_SETUP, check_hostile, hostile_records  # noqa: F401
from coalesce_core.testing.conformance.machine import conformance_machine, run_conformance
from coalesce_core.testing.conformance.model import Model
from coalesce_core.testing.conformance.primitives import (  # noqa: F401
    check_claims,
    check_empty_volume,
    check_export,
    check_open,
    check_pcpi_path,
    check_remove_qtree,
    check_snapshots,
)
from coalesce_core.testing.conformance.rollback import check_apply_failures, check_rollback  # noqa: F401
from coalesce_core.testing.conformance.settings import (  # noqa: F401
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_STATEFUL_STEPS,
    FALLBACK_PROFILES,
    conformance_settings,
)
from coalesce_core.testing.conformance.trees import check_purgatory, check_rich_roundtrip  # noqa: F401

__all__ = [
    "BASIC_CHECKS",
    "ConformanceError",
    "Model",
    "conformance_machine",
    "conformance_settings",
    "run_basic_check",
    "run_basic_checks",
    "run_conformance",
]
