"""``coalesce demo``: the patent's Fig. 7 scenario, scaled down to seconds.

Three qtrees A, B and C whose updates take 10 s, 2 min and 45 min in the
patent's story (here 0.1 s, 0.4 s and 1.5 s, divided by ``--speed``).  Cycle
1 baselines them; cycle 2 shows readers keeping the old images of A and B
until C completes, then all three switching at once; cycle 3 injects a
transfer failure (rollback, Fig. 9); cycle 4 a failed rollback (C leaves the
cycle, retries with backoff, rejoins).  It ends with the invariant report of
``coalesce check``.

On a terminal it draws a live view (render.dashboard: one row per replica
with its transfer's progress, the PCPI budget, the agent's phase, an event
log); otherwise, or with ``--plain``, it prints one plain line per event so
it reads well in CI logs and pipes.
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from coalesce_core.backend.faults import Rule
from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.config import parse_config
from coalesce_core.errors import CoalesceError
from coalesce_core.testing.harness import Harness
from coalesce_core.testing.workload import fill

FIG7_SECONDS = {"A": 10, "B": 120, "C": 2700}
FIG7_DEMO = {"A": 0.1, "B": 0.4, "C": 1.5}
DEFAULT_BACKEND = "sim"


class Throttle:
    """Makes each destination qtree's apply take a set time (the transfer's duration)."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.dest: Any = None  # the destination volume's handle, set once the harness opened it

    def _is_dest(self, volume: Any) -> bool:
        if self.dest is not None:
            return volume is self.dest
        return "dst" in str(getattr(volume, "url", volume))

    @hookimpl(wrapper=True)
    def coalesce_apply(self, volume: Any, qtree: str, records: Any):
        t0 = time.monotonic()
        result = yield
        if self._is_dest(volume):
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

    def chapter(self, text: str) -> None:
        self.out("\n== " + text)

    def note(self, text: str) -> None:
        self.out(text)

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

    @hookimpl
    def coalesce_cycle_finished(self, group: str, report: Any) -> None:
        self.say(
            f"cycle {report.get('cycle')} finished in {report.get('seconds', 0):.2f}s: slowest "
            f"{report.get('slowest') or '-'} ({report.get('slowest_seconds', 0):.2f}s), "
            f"{len(report.get('pcpis_taken') or [])} PCPIs taken, {len(report.get('pcpis_released') or [])} "
            f"released, {report.get('failures', 0)} failures"
        )


class LiveNarrator:
    """The same narration for the live view: into the tracker's event log and header."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.chapter_text = ""

    def say(self, text: str) -> None:
        self.tracker.log(text.strip(), "italic")

    def chapter(self, text: str) -> None:
        self.chapter_text = text
        self.tracker.log("== " + text, "bold cyan")

    def note(self, text: str) -> None:
        self.tracker.log(text.strip(), "italic")


def _names(replicas: int) -> list[str]:
    return [chr(ord("A") + i) if i < 26 else f"Z{i - 25:02d}" for i in range(replicas)]


def run_demo(
    backend: str = DEFAULT_BACKEND,
    replicas: int = 3,
    seed: int = 7,
    speed: float = 1.0,
    out: Callable[[str], None] | None = None,
    live: bool = False,
    console: Any = None,
) -> int:
    """Run the demo; returns 0 when every replica ends stable and every invariant holds.

    ``live=True`` draws the rich live view on ``console`` (a terminal);
    otherwise plain lines go to ``out``."""
    out = out or (lambda s: print(s, flush=True))
    if replicas < 1:
        out("error: --replicas must be at least 1")
        return 2
    names = _names(replicas)
    scale = 1.0 / max(speed, 0.01)
    seconds = {n: FIG7_DEMO.get(n, 0.05 + 0.02 * i) * scale for i, n in enumerate(names)}
    with tempfile.TemporaryDirectory(prefix="coalesce-demo-") as tmp:
        if backend == "mem":
            src, dst = f"mem://demo-src-{Path(tmp).name}", f"mem://demo-dst-{Path(tmp).name}"
        else:
            src, dst = f"{backend}://{tmp}/src", f"{backend}://{tmp}/dst"
        text = (
            f'[group]\nname = "demo"\nsource = "{src}"\ndestination = "{dst}"\nparallel = {max(3, replicas)}\n'
            f'metadata = "{tmp}/metadata"\n[group.retry]\ninitial = {0.2 * scale}\nfactor = 2\nmaximum = 5\n'
            + "".join(f'[[replica]]\nname = "{n}"\n' for n in names)
        )
        config = parse_config(text, f"{tmp}/demo.toml")
        t0 = time.monotonic()
        throttle = Throttle(seconds)
        intro = [
            f"coalesce demo: {replicas} qtrees on the {backend} backend in {tmp}",
            "Fig. 7: updates take "
            + ", ".join(f"{n} {FIG7_SECONDS.get(n, '?')}s" for n in names[:3])
            + f" in the patent; here {', '.join(f'{n} {seconds[n]:.2f}s' for n in names[:3])}",
        ]
        if not live:
            narrator: Any = Narrator(out, t0)
            h = _harness(config, [throttle, narrator], backend)
            throttle.dest = h.agent.dest.handle
            for line in intro:
                out(line)
            ok, _findings = _scenario(h, narrator, names, seed, scale, out)
            return 0 if ok else 1
        from rich.live import Live

        from coalesce_core.ui import render
        from coalesce_core.ui.tracker import Tracker

        tracker = Tracker()
        for n in names:
            tracker.expect(n, seconds[n])
        tracker.replica_of = lambda volume, qtree: qtree if qtree in seconds else None
        narrator = LiveNarrator(tracker)
        h = _harness(config, [throttle, tracker], backend)
        throttle.dest = h.agent.dest.handle
        for line in intro:
            tracker.log(line, "bold")
        width, height = console.size
        # header, chapter, table head, budget, PCPI table (tall terminals only), panel borders, air
        room = height - (20 if height >= 40 else 13)
        log_lines = max(3, min(14, room - len(names)))
        max_rows = max(3, room - log_lines)
        title = f"coalesce demo · {backend} backend · speed {speed:g}"
        if console.size.width < 110:
            title = f"demo · {backend}"

        def frame() -> Any:
            return render.dashboard(
                h.agent.state,
                tracker,
                title=title,
                chapter=narrator.chapter_text,
                log_lines=log_lines,
                max_rows=max_rows,
                width=width,
                height=height,
            )

        lines: list[str] = []
        with Live(
            get_renderable=frame, console=console, refresh_per_second=10, transient=False, vertical_overflow="crop"
        ) as lv:
            ok, findings = _scenario(h, narrator, names, seed, scale, lines.append, report=False)
            narrator.chapter("finished: the invariant report of `coalesce check` follows")
            lv.refresh()
        console.print(render.check_table(findings))
        for line in lines:
            console.print(line, highlight=False, markup=False)
        return 0 if ok else 1


def _harness(config: Any, plugins: list[object], backend: str) -> Harness:
    try:
        return Harness(config, plugins=plugins, clock=time.time)
    except CoalesceError as exc:
        if backend not in ("sim", "mem"):
            exc.hint = (exc.hint + "; " if exc.hint else "") + (
                f"the demo makes its volumes in a temporary directory, which {backend} cannot use: "
                "run it with --backend sim (the default) or --backend mem"
            )
        raise


def _scenario(
    h: Harness, ui: Any, names: list[str], seed: int, scale: float, out: Callable[[str], None], report: bool = True
) -> tuple[bool, list[Any]]:
    rng = random.Random(seed)
    try:
        fill(h.writer, names, files=4, size=2048, seed=seed)

        ui.chapter("cycle 1: baseline transfers (uninitialized -> baseline -> done -> stable)")
        h.cycle()

        ui.chapter("cycle 2: Fig. 7 — readers see the old images until the slowest qtree (C) completes")
        for n in names:
            h.writer.random_changes(rng, n, 3)
        before = h.exported_fingerprints()
        watcher = threading.Thread(target=_watch, args=(h, before, ui), daemon=True)
        watcher.start()
        h.cycle()
        watcher.join(5)
        after = h.exported_fingerprints()
        ui.note(f"   all {sum(1 for n in names if after[n] != before[n])} changed replicas switched in one export")

        victim = names[1] if len(names) > 1 else names[0]
        ui.chapter(f"cycle 3: {victim}'s transfer fails mid-stream -> rollback (Fig. 9) with ONE rollback PCPI")
        for n in names:
            h.writer.random_changes(rng, n, 2)
        h.faults.add(Rule(hook="coalesce_diff", qtree=victim, record=2, times=1, volume="src", message="link dropped"))
        h.cycle()

        slow = names[2] if len(names) > 2 else names[-1]
        ui.chapter(f"cycle 4: {slow}'s rollback fails -> unstable_uncoalesced (its own PCPI), retry, rejoin")
        h.writer.random_changes(rng, slow, 2)
        h.faults.add(Rule(hook="coalesce_diff", qtree=slow, record=2, times=1, volume="src", message="source error"))
        h.faults.add(Rule(hook="coalesce_rollback", qtree=slow, times=1, message="disk full"))
        h.cycle()
        r = h.agent.state.replicas[slow]
        ui.note(f"   {slow} is {r.state}, exporting its individual PCPI {r.exported}")
        for _ in range(50):
            if h.agent.state.replicas[slow].state != "unstable_uncoalesced":
                break
            time.sleep(0.1 * scale)
            h.agent.tick()
        h.cycle()
        h.cycle()

        findings = h.findings()
        states = h.states()
        if report:
            out("\n== coalesce check")
            for f in findings:
                out(f"   {f.invariant:15} {'ok' if f.ok else 'VIOLATED':8} {f.detail}")
        out(f"\nfinal states: {', '.join(f'{k}={v}' for k, v in sorted(states.items()))}")
        out(f"PCPIs on the destination: {len(h.agent.dest.snapshot_list())} (coalesced base only)")
        ok = all(f.ok for f in findings) and set(states.values()) == {"stable"}
        out("demo finished: all replicas stable, every invariant holds" if ok else "demo FAILED")
        return ok, findings
    finally:
        h.agent.close()


def _watch(h: Harness, before: dict[str, Any], ui: Any) -> None:
    """Report, once, that finished replicas still export their old image."""
    for _ in range(400):
        st = h.agent.state
        done = [r.name for r in st.replicas.values() if r.state == "done"]
        busy = [r.name for r in st.replicas.values() if r.state == "update"]
        if done and busy:
            same = all(h.exported_fingerprints().get(n) == before.get(n) for n in done)
            ui.say(
                f"   {', '.join(sorted(done))} done but still exporting the old image "
                f"({'verified' if same else 'NOT the old image!'}); waiting for {', '.join(sorted(busy))}"
            )
            return
        time.sleep(0.02)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
