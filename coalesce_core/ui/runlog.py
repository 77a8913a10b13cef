"""What the agent does, told to the log: an observer plugin (hookimpls of
coalesce_core.backend.hookspecs) that turns the agent's events into records of the
``coalesce`` logger for the log file and the journal (coalesce_core/ui/logs.py,
docs/operations.md "Logs").  The terminal keeps its own view (the per-cycle line).

At ``info``: a cycle started, each replica's result (a transfer, rollback or retry that
succeeded; a break, resync, re-seed or remove request), the rollback and the jump-ahead of the cycle;
at ``warning``: each failure with its error; at ``debug``: every other transition and every
PCPI taken or released.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from coalesce_core.backend.hookspecs import hookimpl
from coalesce_core.ui import logs

#: Replica transitions that are a result worth a line at ``info`` (the spec's triggers).
RESULTS = {
    "baseline_succeeded": "baseline done",
    "update_succeeded": "update done",
    "reseed_succeeded": "re-seed done",
    "rollback_succeeded": "rolled back to its base",
    "retry_succeeded": "rollback retry succeeded",
    "break_mirror": "broken (writable, exports its active file system)",
    "resync": "resynchronising",
    "request_reseed": "to be re-seeded",
    "remove": "removed from the group (its data stay on the destination)",
}


def _say(level: int, message: str) -> None:
    logs.say(level, message, to="log")


class RunLog:
    """The observer; :meth:`bind` gives it the agent's state (for the cycle number and errors)."""

    def __init__(self) -> None:
        self._state: Callable[[], Any] = lambda: None
        self._jumped: list[str] = []
        self._new_base = ""

    def bind(self, state: Callable[[], Any]) -> None:
        self._state = state

    def _cycle(self) -> str:
        st = self._state()
        return f"cycle {st.cycle}" if st is not None else "cycle"

    def _error(self, replica: str, trigger: str) -> str:
        """The replica's last error as the ledger keeps it ("update failed: ..."), else the trigger."""
        st = self._state()
        r = st.replicas.get(replica) if st is not None else None
        return (r.last_error if r is not None else None) or trigger.replace("_", " ")

    @hookimpl
    def coalesce_phase_changed(self, group: str, trigger: str, source: str, dest: str) -> None:
        if trigger == "start_cycle":
            self._jumped, self._new_base = [], ""
            _say(logging.INFO, f"{self._cycle()} started")
        elif trigger == "start_rollback":
            _say(logging.INFO, f"{self._cycle()}: rolling back the failed transfers")
        elif trigger == "start_release" and self._jumped:
            names = ", ".join(sorted(self._jumped))
            _say(logging.INFO, f"{self._cycle()}: jump-ahead: {names} export {self._new_base or 'the new base'}")
            self._jumped = []
        else:
            _say(logging.DEBUG, f"agent: {source} -> {dest} ({trigger})")

    @hookimpl
    def coalesce_state_changed(self, group: str, replica: str, trigger: str, source: str, dest: str) -> None:
        if trigger.endswith("_failed"):
            _say(logging.WARNING, f"replica {replica}: {self._error(replica, trigger)} ({source} -> {dest})")
        elif trigger in RESULTS:
            _say(logging.INFO, f"replica {replica}: {RESULTS[trigger]} ({source} -> {dest})")
        else:
            if trigger == "jump_ahead":
                self._jumped.append(replica)
            _say(logging.DEBUG, f"replica {replica}: {source} -> {dest} ({trigger})")

    @hookimpl
    def coalesce_pcpi_taken(self, group: str, volume: str, name: str, role: str) -> None:
        if role == "new_base":
            self._new_base = name
        _say(logging.DEBUG, f"PCPI taken {name} ({role}) on {volume}")

    @hookimpl
    def coalesce_pcpi_released(self, group: str, volume: str, name: str) -> None:
        _say(logging.DEBUG, f"PCPI released {name} on {volume}")

    @hookimpl
    def coalesce_cycle_finished(self, group: str, report: Mapping[str, Any]) -> None:
        if self._jumped:  # a cycle that ended without a release step
            _say(logging.INFO, f"{self._cycle()}: jump-ahead: {', '.join(sorted(self._jumped))}")
            self._jumped = []
