"""The ``tls`` backend (entry point ``tls = "coalesce_remote.tls"``); see coalesce_remote."""

from . import scheme_hooks

coalesce_backend_info, coalesce_open_volume = scheme_hooks("tls")
