"""The ``ssh`` backend (entry point ``ssh = "coalesce_remote.ssh"``); see coalesce_remote."""

from . import make_hooks

globals().update(make_hooks("ssh"))
