"""The ``tls`` backend (entry point ``tls = "coalesce_remote.tls"``); see coalesce_remote."""

from . import make_hooks

globals().update(make_hooks("tls"))
