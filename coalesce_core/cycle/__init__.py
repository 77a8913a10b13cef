"""The pure cycle: the spec, its machines, guards, state, events, effects, the planner and the invariants.

No I/O and no knowledge of the agent, the ledger, a backend or the terminal
(tests/core/test_layering.py checks the imports).
"""
