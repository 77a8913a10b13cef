"""Hypothesis stateful test: the sim file system against a plain dict model under random operations,
PCPIs, crashes between block writes, power cuts (at rest and mid-CP, torn writes), clean reopens and
disk failures."""

from __future__ import annotations

import itertools
import os
import random
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from coalesce_core.stream import records as R
from coalesce_sim import SimCrash, SimVolume, close_sim, open_sim
from coalesce_sim import diff as D
from coalesce_sim.raid import BS
from coalesce_sim.testing import reopen, sim_apply

NAMES = st.sampled_from(["a", "b", "c", "d"])
DATA = st.one_of(st.binary(min_size=0, max_size=64), st.integers(1, 3 * BS + 100).map(lambda n: b"\x07" * n))
_n = itertools.count()


class SimFSMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="simfsm")
        self.fs: SimVolume | None = None
        self.model: dict[str, tuple] = {}
        self.snaps: dict[str, dict[str, tuple]] = {}

    @initialize(disks=st.integers(1, 4))
    def make_volume(self, disks):
        self.fs = open_sim(f"{self.dir}/v{next(_n)}?fsync=0&disks={disks}", create=True)
        sim_apply(self.fs, "q", [])

    def teardown(self) -> None:
        if self.fs is not None and self.fs.broken is None:
            close_sim(self.fs)
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers
    def dirs(self) -> list[str]:
        return [""] + sorted(p for p, v in self.model.items() if v[0] == "d")

    def of_kind(self, kinds: str) -> list[str]:
        return sorted(p for p, v in self.model.items() if v[0] in kinds)

    def free_path(self, data, name: str) -> str | None:
        parent = data.draw(st.sampled_from(self.dirs()))
        p = f"{parent}/{name}" if parent else name
        return None if p in self.model else p

    def dying_write(self, p: str, content: bytes, after: int) -> bool:
        """Create file ``p`` with ``content``, the writer dying after ``after`` block writes of that CP:
        True if it died (the handle then refuses work until it is reopened)."""
        assert self.fs is not None
        self.fs.raid.crash_after_writes = after
        try:
            sim_apply(self.fs, "q", [R.MkFile(path=p, mode=0o640), R.Write(path=p, offset=0, data=content)])
            return False
        except SimCrash:
            return True
        finally:
            self.fs.raid.crash_after_writes = None

    def do(self, recs, model_update) -> None:
        assert self.fs is not None  # opened by make_volume, the initialize rule, before any other rule
        sim_apply(self.fs, "q", recs)
        model_update()

    # -- rules
    @rule(data=st.data(), name=NAMES, mode=st.sampled_from([0o755, 0o700]))
    def mkdir(self, data, name, mode):
        p = self.free_path(data, name)
        if p:
            self.do([R.MkDir(path=p, mode=mode)], lambda: self.model.__setitem__(p, ("d", mode)))

    @rule(data=st.data(), name=NAMES, content=DATA, off=st.integers(0, 2 * BS))
    def write(self, data, name, content, off):
        files = self.of_kind("f")
        if files and data.draw(st.booleans()):
            p = data.draw(st.sampled_from(files))
            old = self.model[p][2]
            new = (old + bytes(max(0, off - len(old))))[:off] + content + old[off + len(content) :]
            self.do(
                [R.Write(path=p, offset=off, data=content)],
                lambda: self.model.__setitem__(p, ("f", self.model[p][1], new)),
            )
        else:
            p = self.free_path(data, name)
            if p:
                self.do(
                    [R.MkFile(path=p, mode=0o640), R.Write(path=p, offset=0, data=content)],
                    lambda: self.model.__setitem__(p, ("f", 0o640, content)),
                )

    @rule(data=st.data(), size=st.integers(0, 3 * BS))
    def truncate(self, data, size):
        files = self.of_kind("f")
        if files:
            p = data.draw(st.sampled_from(files))
            old = self.model[p][2]
            new = old[:size] + bytes(max(0, size - len(old)))
            self.do([R.Truncate(path=p, size=size)], lambda: self.model.__setitem__(p, ("f", self.model[p][1], new)))

    @rule(data=st.data(), name=NAMES, dest=st.sampled_from(["a", "../x", "/abs", "b/c"]))
    def symlink(self, data, name, dest):
        p = self.free_path(data, name)
        if p:
            self.do([R.Symlink(path=p, target=dest)], lambda: self.model.__setitem__(p, ("l", dest)))

    @rule(data=st.data(), purgatory=st.booleans())
    def remove(self, data, purgatory):
        cands = self.of_kind("fl") + [
            d for d in self.of_kind("d") if not any(k.startswith(d + "/") for k in self.model)
        ]
        if cands:
            p = data.draw(st.sampled_from(cands))
            rec = R.RmDir(path=p) if self.model[p][0] == "d" else R.Unlink(path=p)
            sim_apply(self.fs, "q", [rec], use_purgatory=purgatory)
            del self.model[p]

    @rule(data=st.data(), name=NAMES)
    def rename(self, data, name):
        if not self.model:
            return
        old = data.draw(st.sampled_from(sorted(self.model)))
        new = self.free_path(data, name)
        if new is None or new == old or (new + "/").startswith(old + "/"):
            return
        sim_apply(self.fs, "q", [R.Rename(old=old, new=new)])
        moved = {k: v for k, v in self.model.items() if k == old or k.startswith(old + "/")}
        for k in moved:
            del self.model[k]
        for k, v in moved.items():
            self.model[new + k[len(old) :]] = v

    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o711, 0o4755]))
    def chmod(self, data, mode):
        cands = self.of_kind("fd")
        if cands:
            p = data.draw(st.sampled_from(cands))
            v = self.model[p]
            self.do([R.SetAttr(path=p, mode=mode)], lambda: self.model.__setitem__(p, (v[0], mode) + v[2:]))

    @precondition(lambda self: len(self.snaps) < 6)
    @rule(name=st.sampled_from(["s1", "s2", "s3", "s4", "s5", "s6"]))
    def snapshot(self, name):
        self.fs.snapshot_create(name)
        self.snaps.setdefault(name, dict(self.model))

    @precondition(lambda self: bool(self.snaps))
    @rule(data=st.data())
    def snapshot_delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        assert self.fs.snapshot_delete(name) is True
        del self.snaps[name]

    @rule(data=st.data(), after=st.integers(0, 12), name=NAMES, content=DATA)
    def crash(self, data, after, name, content):
        """Kill the writer after ``after`` block writes of the next CP, then reopen."""
        p = self.free_path(data, name) or "crashfile"
        if p in self.model:
            return
        before = dict(self.model)
        after_model = dict(self.model)
        after_model[p] = ("f", 0o640, content)
        crashed = self.dying_write(p, content, after)
        self.fs = reopen(self.fs)
        got = D.tree_dict(self.fs, "q")
        assert got in (before, after_model)
        if not crashed:
            assert got == after_model
        self.model = got

    @rule(
        data=st.data(),
        after=st.none() | st.integers(0, 12),
        name=NAMES,
        content=DATA,
        torn=st.none() | st.integers(0, 2**16),
    )
    def power_cut(self, data, after, name, content, torn):
        """Cut the power, at rest (``after`` None: every primitive returned, so nothing is lost) or
        when the writer dies after ``after`` block writes of the next CP: that CP is lost, or with
        torn writes (``torn``) kept whole if a copy of its superblock reached the disk."""
        rng = None if torn is None else random.Random(torn)
        if after is None:
            self.fs.power_cut(rng)
            self.fs = reopen(self.fs)
            return
        p = self.free_path(data, name) or "cutfile"
        if p in self.model:
            return
        before = dict(self.model)
        after_model = {**self.model, p: ("f", 0o640, content)}
        crashed = self.dying_write(p, content, after)
        self.fs.power_cut(rng)
        self.fs = reopen(self.fs)
        got = D.tree_dict(self.fs, "q")
        if not crashed:
            assert got == after_model, "a primitive that returned was lost by a power cut"
        elif rng is None:
            assert got == before, "a CP whose superblock was never flushed survived a power cut"
        else:
            assert got in (before, after_model)
        self.model = got

    @rule()
    def clean_reopen(self):
        close_sim(self.fs)
        self.fs = open_sim(f"{self.fs.path}?fsync=0")

    @precondition(lambda self: self.fs.raid.failed is None)
    @rule(disk=st.integers(0, 4))
    def fail_disk(self, disk):
        self.fs.fail_disk(min(disk, self.fs.raid.ndata))
        self.fs = reopen(self.fs)

    @precondition(lambda self: self.fs.raid.failed is not None)
    @rule()
    def reconstruct(self):
        self.fs.reconstruct()
        assert self.fs.scrub()["mismatches"] == []

    # -- invariants
    @invariant()
    def active_matches_model(self):
        assert D.tree_dict(self.fs, "q") == self.model

    @invariant()
    def pcpis_match_their_models(self):
        assert sorted(self.fs.pcpi_names()) == sorted(self.snaps)
        for name, m in self.snaps.items():
            assert D.tree_dict(self.fs, "q", name) == m, name

    @invariant()
    def block_map_is_exact(self):
        assert self.fs.fsck() == []


SimFSMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("COALESCE_SIM_EXAMPLES", "60")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestSimFS = SimFSMachine.TestCase
