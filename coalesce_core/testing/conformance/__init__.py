"""The backend conformance suite: what every coalesce backend must do.

Modelled on hypothesis's provider conformance kit.  A backend's own tests
call it with a factory of fresh volume URLs; it works only through
:func:`coalesce_core.backend.volume.plugin_manager` and :class:`Volume` (it never
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
  nothing; remove_qtree is idempotent and leaves PCPIs alone; hostile
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
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Iterable, Iterator

from hypothesis import HealthCheck, note, settings as Settings, strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from coalesce_core.stream import fingerprint
from coalesce_core.errors import BackendError, HostilePath, StreamError
from coalesce_core.backend.hookspecs import ACTIVE
from coalesce_core.backend.volume import Volume, plugin_manager
from coalesce_core.stream.records import (
    MAX_DATA, ROOT, Begin, End, HardLink, MkDir, MkFile, Rename, RmDir, SetAttr, SetXattr, Symlink, Truncate, Unlink,
    Write, framed,
)

__all__ = [
    "BASIC_CHECKS", "ConformanceError", "Model", "conformance_machine", "conformance_settings",
    "run_basic_check", "run_basic_checks", "run_conformance",
]

DEFAULT_MAX_EXAMPLES = 20
DEFAULT_STATEFUL_STEPS = 25
#: Used when HYPOTHESIS_PROFILE names a profile the project did not register.
FALLBACK_PROFILES = {
    "dev": dict(max_examples=10, stateful_step_count=15),
    "ci": dict(max_examples=DEFAULT_MAX_EXAMPLES, stateful_step_count=DEFAULT_STATEFUL_STEPS),
    "long": dict(max_examples=300, stateful_step_count=60),
}
#: Default entry names: collisions on purpose, one non-ASCII, one non-UTF-8 (surrogateescape) name.
NAMES = ("a", "b", "c", "dd", "é", "x y", "\udcff")
SYMLINK_TARGETS = ("a", "../x", "/etc/passwd", "b/c", "../../..", "dd/")
FILE_MODES = (0o644, 0o600, 0o755, 0o640)
DIR_MODES = (0o755, 0o700, 0o750)
XATTR = "user.coalesce"
SNAP_NAMES = ("cf-a", "cf-b", "cf-c", "cf-d")
EMPTY = fingerprint.digest([])


class ConformanceError(AssertionError):
    """A backend broke a contract (the message says which)."""


class InjectedFault(Exception):
    """Raised by the kit's failing record streams (must propagate out of apply)."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConformanceError(message)


# ---------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------
def conformance_settings(max_examples: int | None = None, stateful_steps: int | None = None,
                         parent: Settings | None = None) -> Settings:
    """Settings for the state machine: explicit counts > HYPOTHESIS_PROFILE > defaults."""
    if parent is None:
        name = os.environ.get("HYPOTHESIS_PROFILE")
        if name:
            try:
                parent = Settings.get_profile(name)
            except InvalidArgument:
                if name in FALLBACK_PROFILES:
                    parent = Settings(**FALLBACK_PROFILES[name])
    if parent is None:
        parent = Settings(max_examples=DEFAULT_MAX_EXAMPLES, stateful_step_count=DEFAULT_STATEFUL_STEPS)
    kw: dict[str, Any] = {}
    if max_examples is not None:
        kw["max_examples"] = max_examples
    if stateful_steps is not None:
        kw["stateful_step_count"] = stateful_steps
    suppress = [h for h in (HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much)]
    return Settings(parent, deadline=None, suppress_health_check=suppress, **kw)


# ---------------------------------------------------------------------------
# the reference model of one qtree
# ---------------------------------------------------------------------------
def _parent(path: str) -> str:
    return path.rpartition("/")[0]


class Model:
    """A plain-Python model of one qtree that applies change records *strictly*
    (the order contract of coalesce_core.stream.records is checked) and digests
    itself the canonical way.  Nodes: path -> {"k": "d", "mode"} |
    {"k": "f", "ino"} | {"k": "l", "target"}; inodes: ino -> {"mode", "data"}."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.inodes: dict[int, dict[str, Any]] = {}
        self.next_ino = 1
        self.sealed: set[str] = set()

    def copy(self) -> "Model":
        m = copy.deepcopy(self)
        m.sealed = set()
        return m

    # --- queries
    def is_dir(self, path: str) -> bool:
        return path == "" or self.nodes.get(path, {}).get("k") == "d"

    def children(self, path: str) -> list[str]:
        return sorted(p for p in self.nodes if _parent(p) == path)

    def of_kind(self, *kinds: str) -> list[str]:
        return sorted(p for p, n in self.nodes.items() if n["k"] in kinds)

    def dirs(self) -> list[str]:
        return [""] + self.of_kind("d")

    def data(self, path: str) -> bytearray:
        return self.inodes[self.nodes[path]["ino"]]["data"]

    def entries(self) -> list[fingerprint.Entry]:
        out = []
        for p, n in self.nodes.items():
            if n["k"] == "d":
                out.append(fingerprint.Entry(path=p, kind="d", mode=n["mode"]))
            elif n["k"] == "f":
                ino = self.inodes[n["ino"]]
                out.append(fingerprint.file_entry(p, ino["mode"], bytes(ino["data"])))
            else:
                out.append(fingerprint.Entry(path=p, kind="l", target=n["target"]))
        return out

    def digest(self) -> str:
        return fingerprint.digest(self.entries())

    # --- strict application
    def _fail(self, rec: object, why: str) -> None:
        raise ConformanceError(f"record {rec!r} breaks the order contract: {why}")

    def _new(self, rec: object, path: str) -> None:
        if path in self.nodes:
            self._fail(rec, f"{path!r} exists (replaced entries must be removed first)")
        if not self.is_dir(_parent(path)):
            self._fail(rec, f"the parent of {path!r} is not a directory created earlier")

    def apply(self, rec: object) -> None:
        # SetAttr of a directory comes after its contents: no entry of it is
        # created, removed or renamed afterwards (that would change its mtime).
        changed = (rec.path,) if isinstance(rec, (MkDir, MkFile, Symlink, HardLink, Unlink, RmDir)) else \
            (rec.old, rec.new) if isinstance(rec, Rename) else ()
        for p in changed:
            if _parent(p) in self.sealed:
                self._fail(rec, f"it changes an entry of {_parent(p)!r} after the SetAttr of that directory")
        if isinstance(rec, MkDir):
            self._new(rec, rec.path)
            self.nodes[rec.path] = {"k": "d", "mode": rec.mode & 0o7777}
        elif isinstance(rec, MkFile):
            self._new(rec, rec.path)
            self.inodes[self.next_ino] = {"mode": rec.mode & 0o7777, "data": bytearray()}
            self.nodes[rec.path] = {"k": "f", "ino": self.next_ino}
            self.next_ino += 1
        elif isinstance(rec, Symlink):
            self._new(rec, rec.path)
            self.nodes[rec.path] = {"k": "l", "target": rec.target}
        elif isinstance(rec, HardLink):
            self._new(rec, rec.path)
            src = self.nodes.get(rec.existing)
            if not src or src["k"] != "f":
                self._fail(rec, f"{rec.existing!r} is not an existing regular file")
            self.nodes[rec.path] = {"k": "f", "ino": src["ino"]}
        elif isinstance(rec, Rename):
            if rec.old not in self.nodes:
                self._fail(rec, f"{rec.old!r} does not exist")
            self._new(rec, rec.new)
            if (rec.new + "/").startswith(rec.old + "/"):
                self._fail(rec, "a directory cannot move into itself")
            moved = {p: n for p, n in self.nodes.items() if p == rec.old or p.startswith(rec.old + "/")}
            for p in moved:
                del self.nodes[p]
            for p, n in moved.items():
                self.nodes[rec.new + p[len(rec.old):]] = n
        elif isinstance(rec, Unlink):
            n = self.nodes.get(rec.path)
            if n is None or n["k"] == "d":
                self._fail(rec, f"{rec.path!r} is not an existing non-directory")
            del self.nodes[rec.path]
        elif isinstance(rec, RmDir):
            if not self.nodes.get(rec.path, {}).get("k") == "d" or self.children(rec.path):
                self._fail(rec, f"{rec.path!r} is not an existing empty directory")
            del self.nodes[rec.path]
        elif isinstance(rec, (Write, Truncate)):
            if self.nodes.get(rec.path, {}).get("k") != "f":
                self._fail(rec, f"{rec.path!r} is not a regular file created earlier or present at the base")
            data = self.data(rec.path)
            if isinstance(rec, Write):
                if rec.offset > len(data):
                    data.extend(bytes(rec.offset - len(data)))
                data[rec.offset:rec.offset + len(rec.data)] = rec.data
            elif rec.size < len(data):
                del data[rec.size:]
            else:
                data.extend(bytes(rec.size - len(data)))
        elif isinstance(rec, (SetAttr, SetXattr)) and rec.path == ROOT:
            if isinstance(rec, SetAttr):
                self.sealed.add(ROOT)       # the qtree root's entries are final by now
        elif isinstance(rec, (SetAttr, SetXattr)):
            n = self.nodes.get(rec.path)
            if n is None:
                self._fail(rec, f"{rec.path!r} does not exist")
            if isinstance(rec, SetAttr):
                if rec.mode is not None and n["k"] == "d":
                    n["mode"] = rec.mode & 0o7777
                elif rec.mode is not None and n["k"] == "f":
                    self.inodes[n["ino"]]["mode"] = rec.mode & 0o7777
                if n["k"] == "d":
                    self.sealed.add(rec.path)
        elif isinstance(rec, (Begin, End)):
            pass
        else:
            raise ConformanceError(f"unknown record {rec!r}")

    def apply_all(self, records: Iterable[object]) -> None:
        for rec in records:
            self.apply(rec)
        self.sealed = set()


# ---------------------------------------------------------------------------
# generated source changes (valid by construction; applied to the model as drawn)
# ---------------------------------------------------------------------------
def _content(draw: Callable, big_files: bool) -> bytes:
    kind = draw(st.integers(0, 19))
    if big_files and kind == 0:
        size = draw(st.sampled_from([MAX_DATA + 3, 2 * MAX_DATA + 1]))
        fill = draw(st.integers(0, 255))
        return bytes([fill]) * size  # fill 0: one big hole
    return draw(st.binary(max_size=40))


def _free(draw: Callable, model: Model, names: tuple[str, ...]) -> str | None:
    parent = draw(st.sampled_from(model.dirs()))
    name = draw(st.sampled_from(names))
    path = f"{parent}/{name}" if parent else name
    return None if path in model.nodes else path


def _file_records(path: str, data: bytes, mode: int) -> list[object]:
    recs: list[object] = [MkFile(path=path, mode=0o600)]
    recs += [Write(path=path, offset=o, data=data[o:o + MAX_DATA]) for o in range(0, len(data), MAX_DATA)]
    recs.append(SetAttr(path=path, mode=mode))
    return recs


def draw_changes(draw: Callable, model: Model, count: int, *, names: tuple[str, ...] = NAMES,
                 xattrs: bool = True, big_files: bool = True) -> list[object]:
    """``count`` random valid operations on ``model`` as change records (applied to it)."""
    out: list[object] = []
    ops = ["mkdir", "mkfile", "mkfile", "write", "truncate", "unlink", "rmtree", "rename", "symlink",
           "hardlink", "chmod", "mtime"] + (["xattr"] if xattrs else [])
    for _ in range(count):
        op = draw(st.sampled_from(ops))
        recs: list[object] = []
        files, nondirs, dirs = model.of_kind("f"), model.of_kind("f", "l"), model.of_kind("d")
        if op == "mkdir":
            path = _free(draw, model, names)
            if path:
                mode = draw(st.sampled_from(DIR_MODES))
                recs = [MkDir(path=path, mode=0o700), SetAttr(path=path, mode=mode)]
        elif op == "mkfile":
            path = _free(draw, model, names)
            if path:
                recs = _file_records(path, _content(draw, big_files), draw(st.sampled_from(FILE_MODES)))
        elif op == "write" and files:
            path = draw(st.sampled_from(files))
            size = len(model.data(path))
            recs = [Write(path=path, offset=draw(st.integers(0, size + 16)), data=draw(st.binary(min_size=1, max_size=24)))]
        elif op == "truncate" and files:
            path = draw(st.sampled_from(files))
            recs = [Truncate(path=path, size=draw(st.integers(0, len(model.data(path)) + 40)))]
        elif op == "unlink" and nondirs:
            recs = [Unlink(path=draw(st.sampled_from(nondirs)))]
        elif op == "rmtree" and dirs:
            top = draw(st.sampled_from(dirs))
            below = sorted((p for p in model.nodes if p == top or p.startswith(top + "/")), reverse=True)
            recs = [RmDir(path=p) if model.nodes[p]["k"] == "d" else Unlink(path=p) for p in below]
        elif op == "rename" and model.nodes:
            old = draw(st.sampled_from(sorted(model.nodes)))
            new = _free(draw, model, names)
            if new and not (new + "/").startswith(old + "/"):
                recs = [Rename(old=old, new=new)]
        elif op == "symlink":
            path = _free(draw, model, names)
            if path:
                recs = [Symlink(path=path, target=draw(st.sampled_from(SYMLINK_TARGETS)))]
        elif op == "hardlink" and files:
            path = _free(draw, model, names)
            if path:
                recs = [HardLink(path=path, existing=draw(st.sampled_from(files)))]
        elif op == "chmod" and (files or dirs):
            path = draw(st.sampled_from(files + dirs))
            modes = DIR_MODES if model.nodes[path]["k"] == "d" else FILE_MODES
            recs = [SetAttr(path=path, mode=draw(st.sampled_from(modes)))]
        elif op == "mtime" and model.nodes:
            recs = [SetAttr(path=draw(st.sampled_from(sorted(model.nodes))), mtime_ns=draw(st.integers(0, 2**62)))]
        elif op == "xattr" and (files or dirs):
            value = draw(st.one_of(st.none(), st.binary(max_size=8)))
            recs = [SetXattr(path=draw(st.sampled_from(files + dirs)), name=XATTR, value=value)]
        model.apply_all(recs)
        out += recs
    return out


# ---------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------
_PM_CACHE: dict[tuple, Any] = {}


def _pm(plugins: tuple = ()) -> Any:
    # one manager per (extra plugins, environment that plugin_manager() reads)
    key = (tuple(id(p) for p in plugins), os.environ.get("COALESCE_PLUGINS"), os.environ.get("COALESCE_FAULTS"))
    pm = _PM_CACHE.get(key)
    if pm is None:
        pm = _PM_CACHE[key] = plugin_manager(extra=plugins)
    return pm


def _raw(cls: type, **fields: Any) -> Any:
    """A record that bypasses its validators, as a hostile producer would send it."""
    obj = object.__new__(cls)
    for k, v in fields.items():
        object.__setattr__(obj, k, v)
    return obj


def _apply(vol: Volume, qtree: str, changes: list[object], use_purgatory: bool = False) -> dict[str, int]:
    res = vol.apply(qtree, framed(qtree, None, "conformance", changes), use_purgatory=use_purgatory)
    _check(isinstance(res, dict) and res.get("records") == len(changes),
           f"apply returned {res!r}, expected records={len(changes)}")
    nbytes = sum(len(r.data) for r in changes if isinstance(r, Write))
    _check(res.get("bytes") == nbytes, f"apply returned {res!r}, expected bytes={nbytes}")
    return res


EMPTY_FP = fingerprint.digest([])


def _fps(vol: Volume, snapshot: str | None = None) -> dict[str, str]:
    return {q: vol.fingerprint(q, snapshot) for q in vol.qtree_list(snapshot)}


def _expect(exc_types: tuple[type, ...], fn: Callable[[], Any], what: str) -> BaseException:
    try:
        fn()
    except exc_types as exc:
        return exc
    except Exception as exc:  # noqa: BLE001
        raise ConformanceError(f"{what}: expected {[t.__name__ for t in exc_types]}, got {exc!r}") from exc
    raise ConformanceError(f"{what}: expected {[t.__name__ for t in exc_types]}, nothing was raised")


def check_diff(vol: Volume, qtree: str, base: str | None, target: str, *, base_model: Model | None,
               target_fp: str, scratch: str = "cf-copy", use_purgatory: bool = True) -> list[object]:
    """diff(base, target) is deterministic, framed, obeys the order contract and,
    applied to a qtree equal to ``base``, reproduces ``target`` exactly."""
    r1 = list(vol.diff(qtree, base, target))
    r2 = list(vol.diff(qtree, base, target))
    _check(r1 == r2, f"diff({qtree}, {base}, {target}) is not deterministic")
    _check(len(r1) >= 2 and isinstance(r1[0], Begin) and isinstance(r1[-1], End),
           "a diff must start with Begin and end with End")
    _check(r1[0].base == base and r1[0].target == target,
           f"Begin names base={r1[0].base!r} target={r1[0].target!r}, expected {base!r} {target!r}")
    _check(r1[-1].records == len(r1) - 2, "End.records must count the change records")
    _check(not any(isinstance(r, (Begin, End)) for r in r1[1:-1]), "Begin/End inside a diff")
    _check(all(len(r.data) <= MAX_DATA for r in r1 if isinstance(r, Write)), "a Write carries more than 1 MiB")
    if base_model is not None or base is None:
        m = base_model.copy() if base_model is not None else Model()
        m.apply_all(r1)
        _check(m.digest() == target_fp,
               f"diff({qtree}, {base}, {target}) applied to the reference model does not give the target")
    vol.remove_qtree(scratch)
    if base is not None:
        vol.apply(scratch, vol.diff(qtree, None, base), use_purgatory=False)
        _check(vol.fingerprint(scratch) == vol.fingerprint(qtree, base),
               f"baseline diff(None, {base}) applied to an empty qtree does not reproduce {base}")
    vol.apply(scratch, iter(r1), use_purgatory=use_purgatory)
    _check(vol.fingerprint(scratch) == target_fp,
           f"diff({qtree}, {base}, {target}) applied to a copy of the base does not reproduce the target")
    return r1


def check_rollback(vol: Volume, qtree: str, base: str, target: str, k: int, *, scratch: str = "cf-copy",
                   to_none: bool = False) -> None:
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

    _expect((InjectedFault,), lambda: vol.apply(scratch, failing(), use_purgatory=True),
            "an exception of the record iterator must propagate out of apply")
    vol.snapshot_create(crb)
    if to_none:
        _check(bool(vol.rollback(scratch, crb, None)), "rollback returned a false value")
        _check(scratch not in vol.qtree_list(), "rollback to None must remove the qtree")
        _check(vol.fingerprint(scratch) == EMPTY, "a removed qtree must digest as the empty tree")
    else:
        _check(bool(vol.rollback(scratch, crb, cbase)), "rollback returned a false value")
        _check(vol.fingerprint(scratch) == base_fp,
               f"the generic rollback after a failure at record {k} did not restore the base")
    _check(vol.fingerprint(scratch, cbase) == base_fp, "the rollback changed a PCPI")
    for name in (crb, cbase):
        _check(vol.snapshot_delete(name) is True, f"deleting PCPI {name} did not return True")


HOSTILE_SETUP = [MkFile(path="f"), Write(path="f", offset=0, data=b"in h"), MkDir(path="d"),
                 Symlink(path="esc", target="../cf-other"), Symlink(path="escf", target="../cf-other/f")]


def hostile_records() -> list[tuple[str, object, tuple[type, ...]]]:
    """(label, record, accepted exceptions); the qtree holds HOSTILE_SETUP and the
    sibling qtree "cf-other" holds a file "f" and a directory "d"."""
    H: tuple[type, ...] = (HostilePath,)
    return [
        ("dotdot", _raw(MkFile, path="../evil", mode=0o644), H),
        ("dotdot-inner", _raw(MkDir, path="d/../../evil", mode=0o755), H),
        ("absolute", _raw(MkFile, path="/tmp/cf-evil", mode=0o644), H),
        ("nul", _raw(MkFile, path="a\x00b", mode=0o644), H),
        ("empty", _raw(Unlink, path=""), H),
        ("dot", _raw(MkDir, path="./x", mode=0o755), H),
        ("double-slash", _raw(MkFile, path="d//x", mode=0o644), H),
        ("write-through-symlink", Write(path="esc/f", offset=0, data=b"evil"), H),
        ("truncate-through-symlink", Truncate(path="esc/f", size=0), H),
        ("create-through-symlink", MkFile(path="esc/evil"), H),
        ("mkdir-through-symlink", MkDir(path="esc/evil"), H),
        ("symlink-through-symlink", Symlink(path="esc/evil", target="x"), H),
        ("unlink-through-symlink", Unlink(path="esc/f"), H),
        ("rmdir-through-symlink", RmDir(path="esc/d"), H),
        ("chmod-through-symlink", SetAttr(path="esc/f", mode=0o777), H),
        ("xattr-through-symlink", SetXattr(path="esc/f", name=XATTR, value=b"x"), H),
        ("rename-out", _raw(Rename, old="f", new="../evil"), H),
        ("rename-through-symlink", Rename(old="f", new="esc/moved"), H),
        ("rename-from-symlink-dir", Rename(old="esc/f", new="stolen"), H),
        ("hardlink-out", _raw(HardLink, path="hl", existing="../cf-other/f"), H),
        ("hardlink-absolute", _raw(HardLink, path="hl", existing="/etc/passwd"), H),
        ("hardlink-through-symlink", HardLink(path="hl", existing="esc/f"), H),
        ("write-to-symlink", Write(path="escf", offset=0, data=b"evil"), (StreamError, BackendError)),
        ("truncate-symlink", Truncate(path="escf", size=0), (StreamError, BackendError)),
    ]


# ---------------------------------------------------------------------------
# plain checks
# ---------------------------------------------------------------------------
class _Ctx:
    def __init__(self, make_volume_url: Callable[[], str], plugins: tuple, fresh_urls: bool) -> None:
        self.make = make_volume_url
        self.pm = _pm(plugins)
        self.fresh_urls = fresh_urls

    def volume(self) -> Volume:
        return Volume.open(self.pm, self.make(), create=True)


def _rich_tree() -> list[object]:
    big = bytes(range(256)) * ((2 * MAX_DATA + 1000) // 256)
    holey = b"head" + bytes(MAX_DATA + 10) + b"tail" + bytes(MAX_DATA)
    recs: list[object] = [MkDir(path="d1", mode=0o700), MkDir(path="d1/d2", mode=0o700), MkDir(path="e")]
    recs += _file_records("d1/d2/small", b"small file\n", 0o640)
    recs += _file_records("empty", b"", 0o600)
    recs += _file_records("big", big, 0o644)
    recs += _file_records("holey", holey, 0o755)
    recs += _file_records("tobedir", b"x", 0o644)
    recs += [MkDir(path="tobefile"), MkDir(path="tobefile/sub")] + _file_records("tobefile/sub/f", b"f", 0o644)
    recs += [Symlink(path="lnk", target="d1/d2/small"), Symlink(path="dangling", target="../../nowhere"),
             Symlink(path="abs", target="/etc/passwd"), Symlink(path="tobefile2", target="x")]
    recs += _file_records("h1", b"linked", 0o644)
    recs += [HardLink(path="d1/h2", existing="h1"), HardLink(path="e/h3", existing="h1")]
    recs += [SetXattr(path="h1", name=XATTR, value=b"v"), SetXattr(path="d1", name=XATTR, value=b"dir"),
             SetAttr(path="d1/d2", mode=0o755, mtime_ns=10**18), SetAttr(path="d1", mode=0o750)]
    return recs


def _rich_changes() -> list[object]:
    recs: list[object] = [Unlink(path="tobedir"), MkDir(path="tobedir", mode=0o755)]
    recs += _file_records("tobedir/in", b"now a dir", 0o644)
    recs += [Unlink(path="tobefile/sub/f"), RmDir(path="tobefile/sub"), RmDir(path="tobefile")]
    recs += _file_records("tobefile", b"now a file", 0o600)
    recs += [Unlink(path="tobefile2")] + _file_records("tobefile2", b"was a symlink", 0o644)
    recs += [Unlink(path="empty"), Symlink(path="empty", target="big")]
    recs += [Write(path="big", offset=MAX_DATA + 5, data=b"changed in the middle"), Truncate(path="holey", size=7)]
    recs += [Unlink(path="e/h3"), HardLink(path="d1/d2/h4", existing="h1"), Write(path="h1", offset=0, data=b"L")]
    recs += [Rename(old="d1/d2", new="e/moved"), SetAttr(path="e", mode=0o700), SetAttr(path="lnk", mtime_ns=5)]
    recs += [SetXattr(path="h1", name=XATTR, value=None)]
    return recs


def check_open(ctx: _Ctx) -> None:
    url = ctx.make()
    if ctx.fresh_urls:
        exc = _expect((BackendError,), lambda: Volume.open(ctx.pm, url, create=False),
                      "opening a volume that does not exist with create=False")
        _check(bool(getattr(exc, "hint", "")), "the BackendError for a missing volume must carry a hint")
    v1 = Volume.open(ctx.pm, url, create=True)
    _apply(v1, "q", [MkFile(path="f")])
    v2 = Volume.open(ctx.pm, url, create=True)
    _check(v2.qtree_list() == ["q"], "open(create=True) of an existing volume must not empty it")
    v3 = Volume.open(ctx.pm, url, create=False)
    _check(v3.fingerprint("q") == v1.fingerprint("q"), "two handles of one volume disagree")
    md = v3.metadata_dir()
    _check(md is None or os.path.isdir(md), f"metadata_dir {md!r} is not None or an existing directory")
    for v in (v1, v2, v3):
        v.close()
        v.close()  # idempotent


def check_empty_volume(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _check(vol.snapshot_list() == [], "a new volume holds no PCPI")
    _check(vol.qtree_list() == [], "a new volume holds no qtree")
    _check(vol.fingerprint("missing") == EMPTY, "a missing qtree must digest as fingerprint.digest([])")
    _check(all(v is None for v in vol.exported().values()), "a new volume exports nothing")
    _apply(vol, "q", [])
    _check(vol.qtree_list() == ["q"], "apply must create the qtree")
    _check(vol.fingerprint("q") == EMPTY, "an empty qtree digests like a missing one")


def check_snapshots(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "q", _file_records("f", b"one", 0o644))
    _check(vol.snapshot_create("s1") == "s1", "snapshot_create must return the name")
    fp1 = vol.fingerprint("q", "s1")
    _check(fp1 == vol.fingerprint("q"), "a fresh PCPI equals the active FS")
    _apply(vol, "q", [Write(path="f", offset=0, data=b"two"), MkDir(path="new")])
    _check(vol.snapshot_create("s1") == "s1", "snapshot_create of an existing name must return the name")
    _check(vol.fingerprint("q", "s1") == fp1, "snapshot_create of an existing name retook the PCPI")
    _check(vol.fingerprint("q") != fp1, "the active FS did not change")
    _check(vol.snapshot_list() == ["s1"], f"snapshot_list is {vol.snapshot_list()}")
    vol.snapshot_create("s2")
    _check(sorted(vol.snapshot_list()) == ["s1", "s2"], "snapshot_list must list every PCPI")
    _check(vol.qtree_list("s1") == ["q"], "qtree_list of a PCPI")
    _apply(vol, "q2", [])
    _check(vol.qtree_list("s1") == ["q"] and vol.qtree_list() == ["q", "q2"], "qtree_list after a new qtree")
    _check(vol.snapshot_delete("s1") is True, "deleting an existing PCPI returns True")
    _check(vol.snapshot_delete("s1") is False, "deleting a missing PCPI returns False (a no-op)")
    _check(vol.snapshot_list() == ["s2"], "snapshot_list after delete")
    _check(vol.fingerprint("q", "s2") == vol.fingerprint("q"), "deleting one PCPI disturbed another")
    for what, fn in [("fingerprint of a missing PCPI", lambda: vol.fingerprint("q", "nope")),
                     ("diff to a missing PCPI", lambda: list(vol.diff("q", None, "nope"))),
                     ("diff from a missing PCPI", lambda: list(vol.diff("q", "nope", "s2"))),
                     ("qtree_list of a missing PCPI", lambda: vol.qtree_list("nope")),
                     ("diff of a qtree missing in the PCPI", lambda: list(vol.diff("nope", None, "s2")))]:
        _expect((BackendError,), fn, what)


def check_rich_roundtrip(ctx: _Ctx) -> None:
    vol = ctx.volume()
    m1 = Model()
    m1.apply_all(_rich_tree())
    _apply(vol, "q", _rich_tree())
    _check(vol.fingerprint("q") == m1.digest(), "the active FS after apply differs from the reference model")
    vol.snapshot_create("s1")
    m2 = m1.copy()
    m2.apply_all(_rich_changes())
    _apply(vol, "q", _rich_changes(), use_purgatory=True)
    _check(vol.fingerprint("q") == m2.digest(), "the active FS after the changes differs from the model")
    vol.snapshot_create("s2")
    models = {"s1": m1, "s2": m2}
    for base, target in [(None, "s1"), (None, "s2"), ("s1", "s2"), ("s2", "s1"), ("s1", "s1"), ("s2", "s2")]:
        check_diff(vol, "q", base, target, base_model=models.get(base or ""), target_fp=models[target].digest())
    # hard links survive diff + apply: a write through one name shows under every name
    fp2 = m2.digest()
    check_diff(vol, "q", None, "s2", base_model=None, target_fp=fp2, scratch="cp")
    m2.apply_all([Write(path="d1/h2", offset=1, data=b"INK")])
    _apply(vol, "cp", [Write(path="d1/h2", offset=1, data=b"INK")])
    _check(vol.fingerprint("cp") == m2.digest(), "hard links were not reproduced by diff + apply")
    _apply(vol, "q", [Write(path="d1/h2", offset=1, data=b"INK")])
    _check(vol.fingerprint("q", "s2") == fp2, "a write to the active FS changed a PCPI")


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

    _expect((Boom,), lambda: vol.apply("q3", broken(), use_purgatory=True),
            "an exception raised by the records iterator must propagate unchanged")
    _check("q3" in vol.qtree_list(), "the partial qtree stays (rollback repairs it)")


def check_purgatory(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "q", _rich_tree())
    m = Model()
    m.apply_all(_rich_tree())
    m.apply_all(_rich_changes())
    _apply(vol, "q", _rich_changes(), use_purgatory=True)
    fp = vol.fingerprint("q")
    _check(fp == m.digest(), "entries moved to the purgatory are visible to fingerprint")
    _check(vol.qtree_list() == ["q"], "the purgatory must not show up as a qtree")
    vol.snapshot_create("s")
    _check(vol.qtree_list("s") == ["q"], "the purgatory must not show up as a qtree of a PCPI")
    check_diff(vol, "q", None, "s", base_model=None, target_fp=fp)
    _check(vol.purge_purgatory(["q", "cf-copy", "missing"]), "purge_purgatory returned a false value")
    _check(vol.purge_purgatory(["q"]), "purge_purgatory twice must succeed")
    _check(vol.fingerprint("q") == fp and vol.fingerprint("q", "s") == fp, "purge changed the qtree or a PCPI")
    vol.snapshot_create("s2")
    check_diff(vol, "q", "s", "s2", base_model=m, target_fp=fp)
    _recs = list(vol.diff("q", "s", "s2"))
    _check(len(_recs) == 2, f"purging the purgatory must not show up in a diff: {_recs[1:-1][:3]}")


def check_export(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "r1", [MkFile(path="f")])
    vol.snapshot_create("s1")
    vol.snapshot_create("s2")
    mapping = {"r1": "s1", "r2": "s2", "r3": ACTIVE, "r4": None}
    for _ in range(2):
        _check(bool(vol.export(mapping)), "export returned a false value")
        got = vol.exported()
        for r, v in mapping.items():
            _check(got.get(r) == v, f"exported()[{r!r}] is {got.get(r)!r}, expected {v!r}")
    _expect((BackendError,), lambda: vol.export({"r1": "s2", "r2": "no-such-pcpi"}),
            "exporting a missing PCPI")
    got = vol.exported()
    _check(all(got.get(r) == v for r, v in mapping.items()), "a refused export changed the export table")
    vol.export({"r1": "s2"})
    got = vol.exported()
    _check(got.get("r1") == "s2" and all(got.get(r) is None for r in ("r2", "r3", "r4")),
           "replicas absent from the mapping must export nothing")
    path = vol.export_path("r1")
    _check(path is None or isinstance(path, str), "export_path must be None or a str")
    vol.export({})
    _check(all(v is None for v in vol.exported().values()), "export({}) must clear the table")


def check_remove_qtree(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "q", _rich_tree())
    _apply(vol, "keep", _file_records("f", b"keep", 0o644))
    vol.snapshot_create("s")
    fp_q, fp_keep = vol.fingerprint("q"), vol.fingerprint("keep")
    _apply(vol, "q", [Unlink(path="h1")], use_purgatory=True)
    vol.remove_qtree("q")
    vol.remove_qtree("q")
    _check(vol.qtree_list() == ["keep"], "remove_qtree left the qtree listed")
    _check(vol.fingerprint("q") == EMPTY, "a removed qtree must digest as the empty tree")
    _check(vol.fingerprint("q", "s") == fp_q, "remove_qtree changed a PCPI")
    _check(vol.fingerprint("keep") == fp_keep, "remove_qtree changed another qtree")
    _apply(vol, "q", [])
    _check(vol.fingerprint("q") == EMPTY, "a re-created qtree must start empty (purgatory included)")


def check_hostile(ctx: _Ctx) -> None:
    vol = ctx.volume()
    _apply(vol, "cf-other", [MkDir(path="d")] + _file_records("f", b"other", 0o644))
    for label, rec, accepted in hostile_records():
        vol.remove_qtree("h")
        _apply(vol, "h", HOSTILE_SETUP)
        before = _fps(vol)
        for use_purgatory in (False, True):
            _expect(accepted, lambda: vol.apply("h", framed("h", None, "x", [rec]), use_purgatory=use_purgatory),
                    f"hostile record {label} ({rec!r})")
            _check(_fps(vol) == before, f"hostile record {label} changed something")


BASIC_CHECKS: dict[str, Callable[[_Ctx], None]] = {
    "open": check_open,
    "empty_volume": check_empty_volume,
    "snapshots": check_snapshots,
    "rich_roundtrip": check_rich_roundtrip,
    "apply_failures_and_rollback": check_apply_failures,
    "purgatory": check_purgatory,
    "export": check_export,
    "remove_qtree": check_remove_qtree,
    "hostile_records": check_hostile,
}


def run_basic_check(name: str, make_volume_url: Callable[[], str], *, plugins: Iterable[object] = (),
                    fresh_urls: bool = True) -> None:
    """Run one plain check by name (see :data:`BASIC_CHECKS`)."""
    BASIC_CHECKS[name](_Ctx(make_volume_url, tuple(plugins), fresh_urls))


def run_basic_checks(make_volume_url: Callable[[], str], *, plugins: Iterable[object] = (),
                     fresh_urls: bool = True) -> None:
    for name in BASIC_CHECKS:
        try:
            run_basic_check(name, make_volume_url, plugins=plugins, fresh_urls=fresh_urls)
        except ConformanceError as exc:
            raise ConformanceError(f"conformance check {name!r}: {exc}") from exc


# ---------------------------------------------------------------------------
# the state machine
# ---------------------------------------------------------------------------
def conformance_machine(make_volume_url: Callable[[], str], *, plugins: Iterable[object] = (),
                        names: tuple[str, ...] = NAMES, xattrs: bool = True, big_files: bool = True,
                        cleanup: Callable[[str], None] | None = None,
                        settings: Settings | None = None) -> type[RuleBasedStateMachine]:
    """A RuleBasedStateMachine class over the primitives of the backend that
    serves ``make_volume_url()`` (a fresh volume per example).  Its
    ``.TestCase`` is a unittest class pytest collects."""
    plugins = tuple(plugins)
    gen = dict(names=names, xattrs=xattrs, big_files=big_files)

    class BackendConformance(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.url = make_volume_url()
            self.vol = Volume.open(_pm(plugins), self.url, create=True)
            self.model = Model()                          # the "src" qtree
            self.snaps: dict[str, dict[str, Any]] = {}    # name -> {"fps", "model"}
            self.exports: dict[str, str | None] = {}
            self.markers = 0
            self.last: str | None = None                  # the newest PCPI of replication_cycle
            _apply(self.vol, "cf-other", [MkDir(path="d")] + _file_records("f", b"other", 0o644))
            self.other_fp = self.vol.fingerprint("cf-other")

        # --- source writes
        @rule(data=st.data(), count=st.integers(1, 6))
        def write_source(self, data: st.DataObject, count: int) -> None:
            recs = draw_changes(data.draw, self.model, count, **gen)
            note(f"source changes: {recs!r}")
            _apply(self.vol, "src", recs)

        # --- PCPIs
        @rule(name=st.sampled_from(SNAP_NAMES))
        def snapshot_create(self, name: str) -> None:
            if name in self.snaps:
                before = self.vol.fingerprint("src", name)
                self.markers += 1
                recs = _file_records(f"cf-marker-{self.markers}", b"written between two creates", 0o644)
                self.model.apply_all(recs)
                _apply(self.vol, "src", recs)
                _check(self.vol.snapshot_create(name) == name, "snapshot_create must return the name")
                _check(self.vol.fingerprint("src", name) == before == self.snaps[name]["fps"]["src"],
                       f"snapshot_create({name!r}) of an existing PCPI retook it")
            else:
                self.vol.snapshot_delete(name)
                _apply(self.vol, "src", [])  # make sure "src" exists
                _check(self.vol.snapshot_create(name) == name, "snapshot_create must return the name")
                self.snaps[name] = {"fps": _fps(self.vol, name), "model": self.model.copy()}
                _check(self.snaps[name]["fps"] == _fps(self.vol), "a new PCPI differs from the active FS")
            _check(name in self.vol.snapshot_list(), "snapshot_list misses a PCPI")

        @precondition(lambda self: self.snaps)
        @rule(data=st.data())
        def snapshot_delete(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(sorted(self.snaps)))
            if name in self.exports.values():
                return
            _check(self.vol.snapshot_delete(name) is True, "deleting an existing PCPI returns True")
            _check(self.vol.snapshot_delete(name) is False, "deleting it again returns False")
            del self.snaps[name]
            _check(name not in self.vol.snapshot_list(), "snapshot_list still shows a deleted PCPI")

        @rule()
        def verify_snapshots(self) -> None:
            _check(sorted(self.vol.snapshot_list()) == sorted(self.snaps), "snapshot_list disagrees")
            for name, info in self.snaps.items():
                _check(_fps(self.vol, name) == info["fps"], f"PCPI {name} changed after it was taken")

        # --- diff + apply
        @rule(data=st.data(), count=st.integers(1, 8), use_purgatory=st.booleans())
        def replication_cycle(self, data: st.DataObject, count: int, use_purgatory: bool) -> None:
            """What the agent does on a source: change, take a new PCPI, diff from the last one."""
            last = self.last if self.last in self.snaps else None
            recs = draw_changes(data.draw, self.model, count, **gen)
            note(f"source changes: {recs!r}")
            _apply(self.vol, "src", recs)
            free = [n for n in SNAP_NAMES if n not in self.snaps]
            if not free:
                victims = [n for n in sorted(self.snaps) if n != last and n not in self.exports.values()]
                if not victims:
                    return
                self.vol.snapshot_delete(victims[0])
                del self.snaps[victims[0]]
                free = [victims[0]]
            name = free[0]
            _check(self.vol.snapshot_create(name) == name, "snapshot_create must return the name")
            self.snaps[name] = {"fps": _fps(self.vol, name), "model": self.model.copy()}
            self.last = name
            check_diff(self.vol, "src", last, name, base_model=self.snaps[last]["model"] if last else None,
                       target_fp=self.snaps[name]["fps"].get("src", EMPTY_FP), use_purgatory=use_purgatory)

        @precondition(lambda self: self.snaps)
        @rule(data=st.data(), use_purgatory=st.booleans())
        def diff_apply(self, data: st.DataObject, use_purgatory: bool) -> None:
            names_ = sorted(self.snaps)
            base = data.draw(st.one_of(st.sampled_from(names_), st.none()))
            target = data.draw(st.sampled_from(names_))
            check_diff(self.vol, "src", base, target, base_model=self.snaps[base]["model"] if base else None,
                       target_fp=self.snaps[target]["fps"].get("src", EMPTY_FP), use_purgatory=use_purgatory)

        @precondition(lambda self: self.snaps)
        @rule(data=st.data(), to_none=st.booleans())
        def partial_apply_and_rollback(self, data: st.DataObject, to_none: bool) -> None:
            names_ = sorted(self.snaps)
            base = data.draw(st.sampled_from(names_))
            target = data.draw(st.sampled_from(names_))
            n = len(list(self.vol.diff("src", base, target))) - 2
            k = data.draw(st.integers(0, n))
            check_rollback(self.vol, "src", base, target, k, to_none=to_none)

        # --- exports
        @rule(data=st.data())
        def export(self, data: st.DataObject) -> None:
            values = [None, ACTIVE] + sorted(self.snaps)
            mapping = {r: data.draw(st.sampled_from(values))
                       for r in data.draw(st.lists(st.sampled_from(["r1", "r2", "r3"]), unique=True))}
            for _ in range(2):
                _check(bool(self.vol.export(mapping)), "export returned a false value")
                got = self.vol.exported()
                _check(all(got.get(r) == mapping.get(r) for r in set(got) | set(mapping)),
                       f"exported() is {got}, expected {mapping}")
            self.exports = mapping

        # --- purgatory, removal
        @rule()
        def purge(self) -> None:
            before = _fps(self.vol)
            _check(bool(self.vol.purge_purgatory(list(before))), "purge_purgatory returned a false value")
            _check(bool(self.vol.purge_purgatory(list(before))), "purge_purgatory twice")
            _check(_fps(self.vol) == before, "purging the purgatory changed a qtree")

        @rule()
        def remove_scratch(self) -> None:
            self.vol.remove_qtree("cf-copy")
            self.vol.remove_qtree("cf-copy")
            _check("cf-copy" not in self.vol.qtree_list(), "remove_qtree left the qtree")
            _check(self.vol.fingerprint("cf-copy") == EMPTY, "a removed qtree digests as the empty tree")

        # --- hostile streams
        @rule(data=st.data(), use_purgatory=st.booleans())
        def hostile(self, data: st.DataObject, use_purgatory: bool) -> None:
            label, rec, accepted = data.draw(st.sampled_from(hostile_records()))
            self.vol.remove_qtree("h")
            _apply(self.vol, "h", HOSTILE_SETUP)
            before = _fps(self.vol)
            _expect(accepted, lambda: self.vol.apply("h", framed("h", None, "x", [rec]),
                                                     use_purgatory=use_purgatory), f"hostile record {label}")
            _check(_fps(self.vol) == before, f"hostile record {label} changed something")

        # --- after every step
        @invariant()
        def source_matches_model(self) -> None:
            _check(self.vol.fingerprint("src") == self.model.digest(),
                   "the src qtree differs from the reference model")
            _check(self.vol.fingerprint("cf-other") == self.other_fp, "an apply elsewhere changed cf-other (I10)")

        def teardown(self) -> None:
            self.vol.close()
            if cleanup is not None:
                cleanup(self.url)

    BackendConformance.TestCase.settings = settings or conformance_settings()
    return BackendConformance


def run_conformance(make_volume_url: Callable[[], str], *, max_examples: int | None = None,
                    stateful_steps: int | None = None, plugins: Iterable[object] = (),
                    basic: bool = True, fresh_urls: bool = True, names: tuple[str, ...] = NAMES,
                    xattrs: bool = True, big_files: bool = True,
                    cleanup: Callable[[str], None] | None = None) -> None:
    """Run the whole suite against the backend serving ``make_volume_url()``.

    ``make_volume_url`` returns the URL of a *new* volume on every call (set
    ``fresh_urls=False`` if it cannot, to skip the missing-volume check).
    ``plugins`` are extra plugin objects to register (e.g. a backend under
    development that has no entry point yet).  Raises ConformanceError (an
    AssertionError) or the backend's exception, with hypothesis's minimal
    failing program printed for the stateful part.
    """
    plugins = tuple(plugins)
    if basic:
        run_basic_checks(make_volume_url, plugins=plugins, fresh_urls=fresh_urls)
    machine = conformance_machine(make_volume_url, plugins=plugins, names=names, xattrs=xattrs,
                                  big_files=big_files, cleanup=cleanup)
    run_state_machine_as_test(machine, settings=conformance_settings(max_examples, stateful_steps))
