"""Errors a person can act on: what went wrong, the context, and a hint.

Modelled on pip's DiagnosticPipError: every error a user can cause carries a
short message and the fix.  The CLI prints ``message`` and ``hint`` and maps
the class to a documented exit code (docs/cli.md).
"""

from __future__ import annotations


class CoalesceError(Exception):
    """Base of every error coalesce raises on purpose."""

    exit_code = 1
    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(CoalesceError):
    """The group's TOML configuration is missing, malformed or inconsistent."""

    exit_code = 2


class VolumeInUse(ConfigError):
    """The config names a volume that another group owns or uses under the same name
    (coalesce_core/ownership.py): a configuration to fix, never a thing to repair."""


class BackendError(CoalesceError):
    """A storage backend failed (or none serves a volume URL)."""

    exit_code = 4


class UnknownBackend(BackendError):
    """No installed backend serves the scheme of a volume URL."""


class MetadataError(CoalesceError):
    """The persisted group metadata is damaged, missing or from another group."""

    exit_code = 5


class IllegalTransition(CoalesceError):
    """A trigger that the spec does not allow from the replica's current state."""

    exit_code = 6

    def __init__(self, replica: str, state: str, trigger: str, allowed: list[str] | None = None) -> None:
        allowed_txt = ", ".join(sorted(allowed or [])) or "none"
        super().__init__(
            f"replica {replica!r} is in state {state!r}: trigger {trigger!r} is not a transition "
            f"of spec/coalescing.toml from that state",
            hint=f"triggers allowed from {state!r}: {allowed_txt}",
        )
        self.replica = replica
        self.state = state
        self.trigger = trigger


class StreamError(CoalesceError):
    """A change stream is truncated, corrupted or hostile; the update fails and rolls back."""

    exit_code = 7


class TruncatedStream(StreamError):
    """The stream ended before its trailer."""


class CorruptStream(StreamError):
    """A frame's checksum, length or the trailer digest does not match."""


class HostilePath(StreamError):
    """A record names a path that would leave the replica's qtree (I10)."""


class GroupLocked(CoalesceError):
    """Another process holds the group's lock (coalesce_core.grouplock): one agent per group.

    ``ledger``: the path of the group's ledger, so that a verb can hand its request to the holder
    when the holder is a running agent (coalesce_core.requests)."""

    exit_code = 9
    ledger: str = ""


class RequestRefused(CoalesceError):
    """A running agent refused a request handed to it (coalesce_core.requests): the error it decided,
    with that error's own exit code."""

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int = 6) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


class TransferFailed(CoalesceError):
    """A transfer (baseline or update) failed; the replica takes the rollback path."""


class RollbackFailed(CoalesceError):
    """A rollback failed; the replica leaves the cycle (unstable_uncoalesced)."""


class VerificationFailed(BackendError):
    """After an update the replica's active file system differs from the source PCPI
    (coalesce_core.verify): the update fails and takes the rollback path."""

    hint = (
        "the update is rolled back and retried; a replica that keeps failing its check is "
        "re-seeded (docs/verification.md); `coalesce verify --full NAME` compares a whole export"
    )


class UnrequestedStream(StreamError):
    """A change stream's Begin names another qtree, base or target than the transfer asked for
    (coalesce_core.stream.requested): nothing of it is applied, the update rolls back."""


class FileTooLarge(BackendError):
    """A record would make a file larger than the destination stores (coalesce_core.stream.limits):
    the update fails before that record is applied and takes the rollback path."""


class NotFound(CoalesceError):
    """A history verb (`ls`, `diff`, `restore`, `pin`) names a replica, generation or path the group
    or the image does not have; exit 6, as other verbs refuse an unknown replica."""

    exit_code = 6


class RestoreRefused(CoalesceError):
    """`coalesce restore` will not write where it was asked (a directory that is not empty)."""
