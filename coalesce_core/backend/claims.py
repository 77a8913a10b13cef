"""Owner records kept with a volume: the default store behind the ``coalesce_claim`` hook.

An owner record is a short text under a key (the core's keys are ``destination`` and
``source.<group>``, coalesce_core/ownership.py), written once: the first writer wins, and
every later claim reads back what is stored.  The default store is one file per key in
``<metadata dir>/owners/``, made by a hard link of a complete, fsynced temporary file, so a
record is whole or absent and of two writers exactly one wins.  Nothing here ever changes
or removes a record: a person does (docs/operations.md, "One owner per volume").
"""

from __future__ import annotations

import errno
import os
import re
import threading

from coalesce_core.errors import BackendError

#: the directory of the records, inside the volume's metadata directory
OWNERS = "owners"
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_key(key: str) -> str:
    """A key is one file name: letters, digits, ``_ . -``, starting with a letter or digit."""
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(f"{key!r} is not an owner-record key")
    return key


def record_path(metadata_dir: str, key: str) -> str:
    """Where the default store keeps the record ``key`` of a volume whose metadata directory is given."""
    return os.path.join(metadata_dir, OWNERS, check_key(key))


def claim_in(metadata_dir: str, key: str, value: str | None) -> str:
    """The record ``key`` in ``metadata_dir``: first store ``value`` if it is given and the key holds
    nothing; then return what the key holds ("" for nothing).  Durable before it returns."""
    path = record_path(metadata_dir, key)
    try:
        if value is not None and not os.path.exists(path):
            _create(path, value)
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise BackendError(
            f"cannot read or write the owner record {path}: {exc.strerror or exc}",
            hint="the volume's metadata directory must be readable and writable by coalesce (see ls -l, df, dmesg)",
        ) from None


def _create(path: str, value: str) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, value.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if the key holds a record: the first writer won
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        _create_without_links(path, value)  # a file system without hard links
    finally:
        os.unlink(tmp)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _create_without_links(path: str, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    try:
        os.write(fd, value.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
