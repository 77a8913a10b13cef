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
        return cls(scheme=scheme.lower(), location=location)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.location}"
