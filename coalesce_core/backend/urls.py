"""Volume URLs: ``scheme://location`` names a volume and the backend that serves it."""

from __future__ import annotations

import attrs

from coalesce_core.errors import ConfigError


@attrs.frozen
class VolumeURL:
    """A parsed volume URL: ``mem://name``, ``sim:///path``, ``btrfs:///mnt/vol``, ``zfs://pool/ds``.

    ``location`` is everything after ``scheme://`` (so ``sim:///a/b`` has
    location ``/a/b`` and ``zfs://pool/ds`` has ``pool/ds``).
    """

    scheme: str
    location: str

    @classmethod
    def parse(cls, text: str) -> "VolumeURL":
        if not isinstance(text, str) or "://" not in text:
            raise ConfigError(
                f"{text!r} is not a volume URL",
                hint="write scheme://location, e.g. sim:///srv/vol, btrfs:///mnt/pool/vol, zfs://pool/ds, mem://name",
            )
        scheme, location = text.split("://", 1)
        if not scheme or not scheme.replace("+", "").replace("-", "").isalnum() or not location:
            raise ConfigError(f"{text!r} is not a volume URL", hint="write scheme://location")
        if not location.isprintable():
            raise ConfigError(
                f"{text!r}: a volume URL holds no control characters", hint="write the URL on one line, as it is"
            )
        check_authority(text, location.split("/", 1)[0])
        return cls(scheme=scheme.lower(), location=location)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.location}"


def check_authority(url: str, authority: str) -> None:
    """Refuse the first part of a URL's location (``[user@]host[:port]`` of a network URL, a
    volume's name or pool otherwise) if its host or user starts with ``-`` or it holds
    whitespace: a program given the host (ssh) could read it as an option, e.g.
    ``ssh://-oProxyCommand=...`` (docs/network.md, "Threat model")."""
    if any(ch.isspace() for ch in authority):
        raise ConfigError(
            f"{url!r}: {authority!r} holds whitespace",
            hint="a host, user or volume name in a URL has no spaces; write ssh://user@host/<volume URL>",
        )
    user, _, host = authority.rpartition("@")
    for what, part in (("user", user), ("host", host)):
        if part.startswith("-"):
            raise ConfigError(
                f"{url!r}: the {what} {part!r} starts with '-'",
                hint=f"a {what} never starts with '-' (ssh would read it as an option); check the URL",
            )
