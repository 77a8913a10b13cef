"""Progress of remote transfers reaches the terminal views (docs/terminal.md: progress in bytes and records)."""

from __future__ import annotations

import io
import time

from net.netkit import RemoteHarness
from rich.console import Console

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.testing.workload import fill
from coalesce_core.ui import render
from coalesce_core.ui.tracker import Tracker


def test_remote_transfer_progress_feeds_the_live_views(remote_config):
    tracker = Tracker()
    progress: list[tuple[str, int, int]] = []

    class Progress:
        @hookimpl
        def coalesce_transfer_progress(self, group, replica, records, nbytes):
            progress.append((replica, records, nbytes))

    h = RemoteHarness(remote_config(replicas=("A",)), plugins=[tracker, Progress()])
    tracker.replica_of = lambda volume, qtree: qtree if qtree == "A" else None
    fill(h.writer, ["A"], files=700, size=300)  # > 2 x PROGRESS_EVERY records
    h.cycle()
    t = tracker.transfers["A"]
    assert t.kind == "baseline" and t.ok
    assert t.records >= 700 and t.nbytes >= 700 * 300
    # the agent's own progress events, every 256 records, counted on the destination side
    assert [r for r, _n, _b in progress] and {r for r, _n, _b in progress} == {"A"}
    counts = [n for _r, n, _b in progress]
    assert counts == sorted(counts) and counts[-1] >= 512
    assert progress[-1][2] > 0
    c = Console(record=True, width=160, file=io.StringIO())
    c.print(render.transfers_table(tracker.transfers, time.monotonic()))
    text = c.export_text()
    assert "baseline" in text and "done" in text and "kB" in text
