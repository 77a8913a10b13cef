"""docs/state-graph.md embeds the GENERATED Mermaid graph, equal to `coalesce graph --format mermaid`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from coalesce_core.cycle.spec import load_spec

DOC = Path(__file__).resolve().parents[2] / "docs" / "state-graph.md"


def graph(fmt: str) -> str:
    """What `coalesce graph --format FMT` prints."""
    p = subprocess.run(
        [sys.executable, "-m", "coalesce_core.ui.cli", "graph", "--format", fmt],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return p.stdout


def test_state_graph_doc_embeds_the_generated_mermaid():
    text = DOC.read_text(encoding="utf-8")
    m = re.search(
        r"<!-- BEGIN GENERATED: coalesce graph --format mermaid -->\n```mermaid\n(.*?)```\n"
        r"<!-- END GENERATED -->",
        text,
        re.S,
    )
    assert m, "the generated block is missing from docs/state-graph.md"
    want = graph("mermaid")
    assert m.group(1) == want, (
        "docs/state-graph.md is stale; replace the block between the markers with:\n```mermaid\n" + want + "```"
    )


def test_state_graph_doc_table_lists_every_state():
    text = DOC.read_text(encoding="utf-8")
    for s in load_spec().replica.states:
        assert re.search(rf"^\| `{s.name}` \| {re.escape(s.ref)} \|", text, re.M), s.name


def test_dot_has_both_fields_as_clusters():
    dot = graph("dot")
    assert "subgraph cluster_cycle" in dot and "subgraph cluster_outside" in dot
    assert 'rollback -> unstable_uncoalesced [label="rollback_failed 1022"]' in dot
