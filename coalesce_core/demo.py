"""``coalesce demo``: the patent's Fig. 7 scenario, scaled down to seconds.

Three qtrees A, B and C whose updates take 10 s, 2 min and 45 min in the
patent's story (here 0.1 s, 0.4 s and 1.5 s, divided by ``--speed``).  Cycle
1 baselines them; cycle 2 shows readers keeping the old images of A and B
until C completes, then all three switching at once; cycle 3 injects a
transfer failure (rollback, Fig. 9); cycle 4 a failed rollback (C leaves the
cycle, retries with backoff, rejoins).  It ends with the invariant report of
``coalesce check``.  Plain lines only: the live rich view is issue 6's.
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .config import parse_config
from .faults import Rule
from .hookspecs import hookimpl
from .testing.harness import Harness
from .testing.workload import fill

FIG7_SECONDS = {"A": 10, "B": 120, "C": 2700}


class Throttle:
    """Makes each destination qtree's apply take a set time (the transfer's duration)."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume: Any, qtree: str, records: Any):
        t0 = time.monotonic()
        result = yield
        if "dst" in str(getattr(volume, "url", volume)):
            left = self.seconds.get(qtree, 0.0) - (time.monotonic() - t0)
            if left > 0:
                time.sleep(left)
        return result


class Narrator:
    """Observer plugin that prints what the agent does, one plain line each."""

    def __init__(self, out: Callable[[str], None], t0: float) -> None:
        self.out = out
        self.t0 = t0
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            self.out(f"[{time.monotonic() - self.t0:6.2f}s] {text}")

    @hookimpl
    def coalesce_state_changed(self, group: str, replica: str, trigger: str, source: str, dest: str) -> None:
        self.say(f"replica {replica}: {source} -> {dest} ({trigger})")

    @hookimpl
    def coalesce_phase_changed(self, group: str, trigger: str, source: str, dest: str) -> None:
        self.say(f"agent: {source} -> {dest}")

    @hookimpl
    def coalesce_pcpi_taken(self, group: str, volume: str, name: str, role: str) -> None:
        self.say(f"PCPI taken    {name} ({role})")

    @hookimpl
    def coalesce_pcpi_released(self, group: str, volume: str, name: str) -> None:
        self.say(f"PCPI released {name}")


def run_demo(backend: str = "mem", replicas: int = 3, seed: int = 7, speed: float = 1.0,
             out: Callable[[str], None] | None = None) -> int:
    """Run the demo; returns 0 when every invariant holds at the end."""
    out = out or (lambda s: print(s, flush=True))
    if replicas < 1:
        out("error: --replicas must be at least 1")
        return 2
    names = [chr(ord("A") + i) if i < 26 else f"Q{i}" for i in range(replicas)]
    scale = 1.0 / max(speed, 0.01)
    fig7 = {"A": 0.1, "B": 0.4, "C": 1.5}
    seconds = {n: fig7.get(n, 0.05 + 0.02 * i) * scale for i, n in enumerate(names)}
    with tempfile.TemporaryDirectory(prefix="coalesce-demo-") as tmp:
        if backend == "mem":
            src, dst = f"mem://demo-src-{Path(tmp).name}", f"mem://demo-dst-{Path(tmp).name}"
        else:
            src, dst = f"{backend}://{tmp}/source", f"{backend}://{tmp}/destination"
        text = (f'[group]\nname = "demo"\nsource = "{src}"\ndestination = "{dst}"\nparallel = {max(3, replicas)}\n'
                f'metadata = "{tmp}/metadata"\n[group.retry]\ninitial = {0.2 * scale}\nfactor = 2\nmaximum = 5\n'
                + "".join(f'[[replica]]\nname = "{n}"\n' for n in names))
        config = parse_config(text, f"{tmp}/demo.toml")
        t0 = time.monotonic()
        narrator = Narrator(out, t0)
        h = Harness(config, plugins=[Throttle(seconds), narrator], clock=time.time)
        rng = random.Random(seed)
        out(f"coalesce demo: {replicas} qtrees on the {backend} backend in {tmp}")
        out("Fig. 7: updates take " + ", ".join(f"{n} {FIG7_SECONDS.get(n, '?')}s" for n in names[:3])
            + f" in the patent; here {', '.join(f'{n} {seconds[n]:.2f}s' for n in names[:3])}")
        fill(h.writer, names, files=4, size=2048, seed=seed)

        out("\n== cycle 1: baseline transfers (uninitialized -> baseline -> done -> stable)")
        h.cycle()

        out("\n== cycle 2: Fig. 7 — readers see the old images until the slowest qtree (C) completes")
        for n in names:
            h.writer.random_changes(rng, n, 3)
        before = h.exported_fingerprints()
        watcher = threading.Thread(target=_watch, args=(h, before, narrator), daemon=True)
        watcher.start()
        h.cycle()
        watcher.join(5)
        after = h.exported_fingerprints()
        out(f"   all {sum(1 for n in names if after[n] != before[n])} changed replicas switched in one export")

        out("\n== cycle 3: B's transfer fails mid-stream -> rollback (Fig. 9) with ONE rollback PCPI")
        for n in names:
            h.writer.random_changes(rng, n, 2)
        victim = names[1] if len(names) > 1 else names[0]
        h.faults.add(Rule(hook="coalesce_diff", qtree=victim, record=2, times=1, volume="src", message="link dropped"))
        h.cycle()

        out("\n== cycle 4: C's rollback fails -> unstable_uncoalesced (its own PCPI), retry, rejoin")
        slow = names[2] if len(names) > 2 else names[-1]
        h.writer.random_changes(rng, slow, 2)
        h.faults.add(Rule(hook="coalesce_diff", qtree=slow, record=2, times=1, volume="src", message="source error"))
        h.faults.add(Rule(hook="coalesce_rollback", qtree=slow, times=1, message="disk full"))
        h.cycle()
        r = h.agent.state.replicas[slow]
        out(f"   {slow} is {r.state}, exporting its individual PCPI {r.exported}")
        for _ in range(50):
            if h.agent.state.replicas[slow].state != "unstable_uncoalesced":
                break
            time.sleep(0.1 * scale)
            h.agent.tick()
        h.cycle()
        h.cycle()

        out("\n== coalesce check")
        findings = h.findings()
        for f in findings:
            out(f"   {f.invariant:15} {'ok' if f.ok else 'VIOLATED':8} {f.detail}")
        states = h.states()
        out(f"\nfinal states: {', '.join(f'{k}={v}' for k, v in sorted(states.items()))}")
        out(f"PCPIs on the destination: {len(h.agent.dest.snapshot_list())} (coalesced base only)")
        ok = all(f.ok for f in findings) and set(states.values()) == {"stable"}
        out("demo finished: all replicas stable, every invariant holds" if ok else "demo FAILED")
        h.agent.close()
        return 0 if ok else 1


def _watch(h: Harness, before: dict[str, Any], narrator: Narrator) -> None:
    """Report, once, that finished replicas still export their old image."""
    for _ in range(400):
        st = h.agent.state
        done = [r.name for r in st.replicas.values() if r.state == "done"]
        busy = [r.name for r in st.replicas.values() if r.state == "update"]
        if done and busy:
            same = all(h.exported_fingerprints().get(n) == before.get(n) for n in done)
            narrator.say(f"   {', '.join(sorted(done))} done but still exporting the old image "
                         f"({'verified' if same else 'NOT the old image!'}); waiting for {', '.join(sorted(busy))}")
            return
        time.sleep(0.02)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
