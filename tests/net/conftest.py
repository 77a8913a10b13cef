"""Fixtures of the network tests (defined in netkit.py, next to this file)."""

from net.netkit import (  # noqa: F401
    certs,
    remote_config,
    ssh_env,
    sshd,
    tls_service,
    transport,
)
