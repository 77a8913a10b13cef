"""The ``ssh`` backend (entry point ``ssh = "coalesce_remote.ssh"``); see coalesce_remote."""

from . import scheme_hooks

coalesce_backend_info, coalesce_open_volume = scheme_hooks("ssh")
