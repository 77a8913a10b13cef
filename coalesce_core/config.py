"""The group's TOML configuration (docs/config.md documents every key).

[group]
name = "home"                      # letters, digits, _ . - (becomes part of PCPI names)
destination = "sim:///srv/dst"     # the destination volume URL
parallel = 4                       # concurrent transfers
interval = "5m"                    # between cycles of `coalesce run` (a duration, or seconds)
metadata = "/var/lib/coalesce"     # optional: where the ledger lives
spool = true                       # optional: resume an update after a restart
                                   # (default: on for a remote source)
spool_max = "4G"                   # a replica's spool keeps at most this prefix of an update
spool_group_max = "16G"            # the group's spools together
reseed_after = 3                   # re-seed a replica after 3 failed updates in a row (0: never)
max_lag = "1d"                     # optional: `check` fails for a replica whose image is older
straggler_after = "15m"            # optional: an update still running this long after the cycle
                                   # started leaves the cycle; the others jump ahead without it
verify = true                      # check each update against its source PCPI before `done`
verify_every = "7d"                # optional: full background verification, spread over replicas
privileges = "strip"               # "keep": carry setuid/setgid bits and security.*/trusted.* xattrs
transfer_stall = "10m"             # a transfer that receives no change record this long fails
transfer_timeout = "12h"           # optional: a transfer that lasts longer fails

[group.retry]                      # rollback retry of unstable_uncoalesced
initial = "30s"
factor = 2
maximum = "1h"

[[source]]                         # one per source volume (or `source = "URL"` in [group]:
name = "office"                    # one source named "default"); names are unique
url = "tls://office.example:7450/home"
interval = "15m"                   # optional: a source PCPI at most this often (default: every cycle)
parallel = 2                       # optional: at most this many of its transfers at once
[source.tls]                       # optional, remote sources only: [source.tls], [source.transfer],
ca = "/etc/coalesce/office-ca.crt" # [source.ssh] override the client settings (docs/network.md)

[[replica]]
name = "A"                         # destination qtree
source = "A"                       # source qtree (default: name)
from = "office"                    # its [[source]] (needed when there are several)
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any

import attrs

from coalesce_core.backend.urls import VolumeURL
from coalesce_core.cycle.state import DEFAULT_SOURCE, NAME_RE, RetryPolicy
from coalesce_core.deadlines import KEYS, TransferLimits, parse_limits, parse_overrides
from coalesce_core.durations import config_seconds
from coalesce_core.errors import ConfigError
from coalesce_core.retention import Policy, known_zone, parse_keep
from coalesce_core.stream import privileges as privilege_policy

#: a source's transport tables (docs/network.md, "Client settings"): the TOML types of each key
#: and the schemes whose sources they act on
TRANSPORT: dict[str, tuple[dict[str, tuple[type, ...]], tuple[str, ...]]] = {
    "tls": ({"cert": (str,), "key": (str,), "ca": (str,), "server_name": (str,)}, ("tls",)),
    "transfer": (
        {
            "compression": (str,),
            "bandwidth": (str, int, float),
            "retries": (int,),
            "retry_delay": (int, float),
            "timeout": (int, float),
            "keepalive": (int, float),
        },
        ("ssh", "tls"),
    ),
    "ssh": ({"command": (str, list), "remote_command": (str,)}, ("ssh",)),
}


@attrs.frozen
class ReplicaConfig:
    name: str
    #: the source qtree
    source: str
    #: the name of the source (SourceConfig.name) the replica comes from: its `from`
    origin: str = DEFAULT_SOURCE


@attrs.frozen
class SourceConfig:
    """One source volume of the group: a ``[[source]]`` table, or ``[group] source``."""

    name: str
    url: str
    #: seconds: the source is due when this long has passed since its last source PCPI (None: every cycle)
    interval: float | None = None
    #: at most this many of this source's transfers at once (None: only the group's `parallel`)
    parallel: int | None = None
    #: its transport tables, ``((table, ((key, value), ...)), ...)`` in file order (lists as tuples)
    transport: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    #: the transfer deadlines it sets itself (coalesce_core.deadlines.parse_overrides); the rest are the group's
    deadlines: tuple[tuple[str, float | None], ...] = ()

    def due(self, last_pcpi: float | None, now: float) -> bool:
        """Whether a cycle at ``now`` takes a PCPI of this source, whose last source PCPI was taken
        by the cycle that started at ``last_pcpi`` (None: never)."""
        return self.interval is None or last_pcpi is None or now - last_pcpi >= self.interval

    def options(self) -> dict[str, dict[str, Any]] | None:
        """What ``Volume.open`` passes the source's backend (``options``): ``{"tls": {...},
        "transfer": {...}, "ssh": {...}}`` with the tables the source has; None when it has none."""
        if not self.transport:
            return None
        return {t: {k: list(v) if isinstance(v, tuple) else v for k, v in items} for t, items in self.transport}


@attrs.frozen
class GroupConfig:
    name: str
    #: every source volume, in file order (``[group] source``: one, named DEFAULT_SOURCE)
    sources: tuple[SourceConfig, ...]
    destination: str
    parallel: int = 4
    interval: float = 300.0
    metadata: str | None = None
    retry: RetryPolicy = RetryPolicy()
    replicas: tuple[ReplicaConfig, ...] = ()
    path: str | None = None
    #: spool received change records so an update a restart interrupts resumes
    #: (coalesce_core.stream.spool); None: on for a remote source, off for a local one
    spool: bool | None = None
    #: bytes a replica's spool, and the group's spools together, hold at most (None: no bound)
    spool_max: int | None = 4 << 30
    spool_group_max: int | None = 16 << 30
    #: re-seed a replica after this many failed updates in a row (0: never)
    reseed_after: int = 3
    #: seconds: `coalesce check` fails for a replica whose exported image is older (None: lag is informative)
    max_lag: float | None = None
    #: an update still in flight this long after the cycle started leaves the cycle (None: wait for it)
    straggler_after: float | None = None
    #: check every update against its source PCPI before it is `done` (coalesce_core.verify)
    verify: bool = True
    #: seconds: verify one replica's whole export in the background of a cycle so that each
    #: one is verified about once per period (None: never)
    verify_every: float | None = None
    #: what of a source's privileges a replica receives: "strip" (no setuid/setgid bits, no
    #: security.*/trusted.* xattrs) or "keep" (coalesce_core.stream.privileges)
    privileges: str = privilege_policy.DEFAULT
    #: how long a transfer may wait on its source (coalesce_core.deadlines)
    deadlines: TransferLimits = TransferLimits()
    #: which retained coalesced generations to keep ([retention], coalesce_core.retention)
    retention: Policy = Policy()

    def source_named(self, name: str) -> SourceConfig:
        """The source called ``name``; a ConfigError when the config has none of that name (a source
        the ledger still knows, whose [[source]] table was removed)."""
        for one in self.sources:
            if one.name == name:
                return one
        raise ConfigError(
            f"{self.path or 'the config'}: group {self.name!r} has no source named {name!r}",
            hint=f"sources: {', '.join(repr(s.name) for s in self.sources)}; put its [[source]] table back "
            f'(docs/config.md, "Sources")',
        )

    @property
    def source(self) -> str:
        """The URL of the group's one source (a ConfigError for a config of several, :meth:`sole_source`)."""
        return self.sole_source().url

    @property
    def source_options(self) -> dict[str, dict[str, Any]] | None:
        """What opening the group's one source passes its backend (``Volume.open``'s ``options``): its
        transport tables, which override the process-wide client settings key by key."""
        return self.sole_source().options()

    def with_source(self, url: str) -> "GroupConfig":
        """This config with the URL of its sole source replaced by ``url`` (its name and settings kept)."""
        return attrs.evolve(self, sources=(attrs.evolve(self.sole_source(), url=url),))

    def limits_for(self, source: str) -> TransferLimits:
        """The deadlines of a transfer from source ``source``: the group's, with those its
        ``[[source]]`` table sets in their place (docs/config.md, "Deadlines")."""
        for one in self.sources:
            if one.name == source:
                return self.deadlines.overridden(one.deadlines)
        return self.deadlines

    def sole_source(self) -> SourceConfig:
        """The group's one source; a ConfigError naming the sources when it has several (for what
        speaks of one source: `coalesce add` of a replica the config lacks, tests of one source)."""
        if len(self.sources) == 1:
            return self.sources[0]
        names = ", ".join(repr(s.name) for s in self.sources)
        raise ConfigError(
            f"{self.path or 'the config'}: group {self.name!r} has {len(self.sources)} sources ({names}); "
            "say which one",
            hint='give the replica a `from = "NAME"` naming its [[source]] (docs/config.md, "Sources")',
        )

    def spool_dir(self, metadata_dir: str | None) -> Path:
        """Where the spools of this group's updates live (next to the ledger)."""
        return self.ledger_path(metadata_dir).with_name(f"{self.name}.spool")

    def ledger_path(self, metadata_dir: str | None) -> Path:
        where = self.metadata or metadata_dir
        if not where:
            raise ConfigError(
                f"the destination {self.destination} has no place for metadata",
                hint='set `metadata = "/some/dir"` in [group]',
            )
        return Path(where) / f"{self.name}.sqlite"


def _where_on_disk(url: VolumeURL) -> tuple[str, str] | None:
    """What a URL names, to compare two of them: ("path", real path) for a location that is an
    absolute path (mem, sim, btrfs: symlinks resolved, ``?options`` left out), ("dataset", name)
    for ZFS; None for anything else (a remote source, ``mem://NAME``)."""
    if url.scheme == "zfs":
        return ("dataset", url.location.strip("/"))
    if url.location.startswith("/"):
        return ("path", os.path.realpath(url.location.partition("?")[0]))
    return None


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _inodes_up(path: str) -> set[tuple[int, int]]:
    """(device, inode) of ``path`` and of each of its parents that exists."""
    out = set()
    while True:
        ino = _inode(path)
        if ino is not None:
            out.add(ino)
        parent = os.path.dirname(path)
        if parent == path:
            return out
        path = parent


def overlap(source: VolumeURL, destination: VolumeURL) -> str | None:
    """How ``destination`` overlaps ``source`` on this host: "is" (the same volume under another
    spelling: a trailing slash, a symlink, a bind mount), "lies inside" or "holds"; None when
    they are apart or cannot be compared (docs/config.md)."""
    s, d = _where_on_disk(source), _where_on_disk(destination)
    if s is None or d is None or s[0] != d[0]:
        return None
    if s[1] == d[1]:
        return "is"
    if d[1].startswith(s[1].rstrip("/") + "/"):
        return "lies inside"
    if s[1].startswith(d[1].rstrip("/") + "/"):
        return "holds"
    if s[0] == "path":  # a bind mount or a hard link is the same place under another name
        s_ino, d_ino = _inode(s[1]), _inode(d[1])
        if s_ino is not None and s_ino == d_ino:
            return "is"
        if s_ino is not None and s_ino in _inodes_up(d[1]):
            return "lies inside"
        if d_ino is not None and d_ino in _inodes_up(s[1]):
            return "holds"
    return None


def _need(table: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}: missing `{key}`", hint=f"add `{key} = ...` (see docs/config.md)")
    value = table[key]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise ConfigError(f"{where}: `{key}` has the wrong type ({type(value).__name__})", hint="see docs/config.md")
    return value


def _name(value: str, where: str) -> str:
    if not NAME_RE.match(value):
        raise ConfigError(
            f"{where}: {value!r} is not a valid name",
            hint="use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit",
        )
    return value


def _duration(
    table: dict[str, Any], key: str, where: str, *, default: float, example: str, positive: bool = False
) -> float:
    """Seconds of the duration ``table[key]`` (coalesce_core.durations: ``"15m"`` or a number of
    seconds), ``default`` if absent; longer than 0 when ``positive``."""
    if key not in table:
        return default
    seconds = config_seconds(table[key], key, where, hint=f"for example {key} = {example}")
    if positive and seconds <= 0:
        raise ConfigError(f"{where}: `{key}` must be longer than 0", hint=f"for example {key} = {example}")
    return seconds


def _optional_duration(table: dict[str, Any], key: str, where: str, *, example: str, unset: str) -> float | None:
    """Seconds of the optional duration ``table[key]`` (coalesce_core.durations), longer than 0; None if absent."""
    value = table.get(key)
    if value is None:
        return None
    seconds = config_seconds(value, key, where, hint=f"for example {key} = {example}")
    if seconds <= 0:
        raise ConfigError(f"{where}: `{key}` must be longer than 0", hint=unset)
    return seconds


def _size(table: dict[str, Any], key: str, where: str, default: int) -> int:
    """Bytes of the size ``table[key]`` (coalesce_core.sizes), at least 1 MiB; ``default`` if absent."""
    if key not in table:
        return default
    from coalesce_core.sizes import SizeError, parse_size

    try:
        size = parse_size(table[key])
    except SizeError as exc:
        raise ConfigError(f"{where}: `{key}`: {exc}", hint=f'for example {key} = "4G" (docs/config.md)') from None
    if size < 1 << 20:
        raise ConfigError(
            f"{where}: `{key}` must be at least 1M", hint="to spool nothing, set `spool = false` (docs/config.md)"
        )
    return size


def _retention(table: object, where: str) -> Policy:
    """The retention policy of the ``[retention]`` table (docs/config.md, "Retention")."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table", hint='write it as [retention] with keep = "..." below it')
    known = {"keep_min", "keep", "max", "prefer_complete", "timezone"}
    if set(table) - known:
        raise ConfigError(f"{where}: unknown key(s) {sorted(set(table) - known)}", hint=f"known keys: {sorted(known)}")
    keep_min = _duration(table, "keep_min", where, default=0.0, example='"1d"')
    keep = table.get("keep", "")
    example = 'for example keep = "24h 14d 8w 12m 2y" (docs/config.md, "Retention")'
    if not isinstance(keep, str):
        raise ConfigError(f"{where}: `keep` must be a text of counts and units", hint=example)
    try:
        buckets = parse_keep(keep)
    except ValueError as exc:
        raise ConfigError(f"{where}: `keep`: {exc}", hint=example) from None
    most = table.get("max")
    if most is not None and (not isinstance(most, int) or isinstance(most, bool) or most < 1):
        raise ConfigError(
            f"{where}: `max` must be a whole number >= 1", hint="the most generations kept, e.g. max = 30"
        )
    prefer_complete = table.get("prefer_complete", False)
    if not isinstance(prefer_complete, bool):
        raise ConfigError(
            f"{where}: `prefer_complete` must be true or false", hint="false (the default) keeps the first"
        )
    zone = table.get("timezone", "UTC")
    if not isinstance(zone, str) or not known_zone(zone):
        raise ConfigError(
            f"{where}: `timezone` must name an IANA time zone, not {zone!r}",
            hint='for example timezone = "Europe/Berlin"; "UTC" (the default) for periods the same on every host',
        )
    try:
        return Policy(keep_min=keep_min, keep=buckets, max=most, prefer_complete=prefer_complete, zone=zone)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}", hint='add keep_min or keep, e.g. keep = "14d"') from None


def parse_config(text: str, path: str = "<config>") -> GroupConfig:
    """Parse and validate config text; every problem is a ConfigError naming the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", hint="fix the syntax at the line shown") from None
    unknown = set(data) - {"group", "source", "replica", "retention"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown table(s) {sorted(unknown)}",
            hint="only [group], [[source]], [[replica]] and [retention] exist",
        )
    group = data.get("group")
    if not isinstance(group, dict):
        raise ConfigError(f"{path}: missing [group] table", hint="see docs/config.md for an example")
    where = f"{path} [group]"
    known = {
        "name",
        "source",
        "destination",
        "parallel",
        "interval",
        "metadata",
        "retry",
        "spool",
        "spool_max",
        "spool_group_max",
        "reseed_after",
        "max_lag",
        "straggler_after",
        "verify",
        "verify_every",
        "privileges",
        *KEYS,
    }
    if set(group) - known:
        raise ConfigError(f"{where}: unknown key(s) {sorted(set(group) - known)}", hint=f"known keys: {sorted(known)}")
    name = _name(_need(group, "name", str, where), where)
    sources = _sources(data, group, path, where)
    destination = _url(_need(group, "destination", str, where), "destination", where)
    for one in sources:  # each apart from the destination
        if "source" in group:
            _apart(one.url, "source", where, destination)
        else:
            _apart(one.url, "url", f"{path} [[source]] {one.name!r}", destination)
    parallel = group.get("parallel", 4)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= 256:
        raise ConfigError(f"{where}: `parallel` must be an integer from 1 to 256")
    interval = _duration(group, "interval", where, default=300.0, example='"5m"', positive=True)
    metadata = group.get("metadata")
    if metadata is not None and not isinstance(metadata, str):
        raise ConfigError(f"{where}: `metadata` must be a directory path")
    if metadata and not os.path.isabs(metadata) and path != "<config>":
        # relative to the config file, never to the working directory of whoever runs the verb
        metadata = os.path.join(os.path.dirname(os.path.abspath(path)), metadata)
    spool = group.get("spool")
    if spool is not None and not isinstance(spool, bool):
        raise ConfigError(
            f"{where}: `spool` must be true or false", hint="leave it out for the default (on for a remote source)"
        )
    spool_max = _size(group, "spool_max", where, 4 << 30)
    spool_group_max = _size(group, "spool_group_max", where, 16 << 30)
    reseed_after = group.get("reseed_after", 3)
    if not isinstance(reseed_after, int) or isinstance(reseed_after, bool) or reseed_after < 0:
        raise ConfigError(
            f"{where}: `reseed_after` must be a whole number >= 0",
            hint="the failed updates in a row after which a replica is re-seeded; 0 never re-seeds",
        )
    max_lag = _optional_duration(group, "max_lag", where, example='"1d"', unset="leave it out to report lag only")
    straggler_after = _optional_duration(
        group, "straggler_after", where, example='"15m"', unset="leave it out for a cycle that waits for every update"
    )
    verify = group.get("verify", True)
    if not isinstance(verify, bool):
        raise ConfigError(
            f"{where}: `verify` must be true or false",
            hint="true (the default) checks every update against its source PCPI before it is done",
        )
    verify_every = _optional_duration(
        group, "verify_every", where, example='"7d"', unset="leave it out for no background verification"
    )
    privileges = group.get("privileges", privilege_policy.DEFAULT)
    if privileges not in privilege_policy.POLICIES:
        raise ConfigError(
            f'{where}: `privileges` must be "strip" or "keep", not {privileges!r}',
            hint='"strip" (the default) gives replicas no setuid/setgid bits and no security.* or trusted.* '
            'xattrs; "keep" carries them for a full-system backup that root restores (docs/config.md, "Privileges")',
        )
    limits = parse_limits(group, where)
    retry_t = group.get("retry", {})
    if not isinstance(retry_t, dict) or set(retry_t) - {"initial", "factor", "maximum"}:
        raise ConfigError(f"{where}: [group.retry] takes initial, factor, maximum")
    rwhere = f"{path} [group.retry]"
    factor = retry_t.get("factor", 2.0)
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor) or factor < 1:
        raise ConfigError(f"{rwhere}: `factor` must be a number >= 1", hint="for example factor = 2")
    retry = RetryPolicy(
        initial=_duration(retry_t, "initial", rwhere, default=30.0, example='"30s"'),
        factor=float(factor),
        maximum=_duration(retry_t, "maximum", rwhere, default=3600.0, example='"1h"'),
    )
    return GroupConfig(
        name=name,
        sources=sources,
        destination=destination,
        parallel=parallel,
        interval=float(interval),
        metadata=metadata,
        retry=retry,
        replicas=_replicas(data, sources, path),
        path=path,
        spool=spool,
        spool_max=spool_max,
        spool_group_max=spool_group_max,
        reseed_after=reseed_after,
        max_lag=max_lag,
        straggler_after=straggler_after,
        verify=verify,
        verify_every=verify_every,
        privileges=privileges,
        deadlines=limits,
        retention=_retention(data.get("retention", {}), f"{path} [retention]"),
    )


def _url(value: str, key: str, where: str) -> str:
    """``value`` when it is a volume URL (VolumeURL.parse), else a ConfigError naming ``key``."""
    try:
        VolumeURL.parse(value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: `{key}`: {exc.message}", hint=exc.hint) from None
    return value


def _apart(url: str, key: str, where: str, destination: str) -> None:
    """A ConfigError unless the source ``url`` is apart from the destination (``overlap``)."""
    if VolumeURL.parse(url) == VolumeURL.parse(destination):
        raise ConfigError(
            f"{where}: `{key}`: source and destination are the same volume ({url})",
            hint="replicate into another volume",
        )
    relation = overlap(VolumeURL.parse(url), VolumeURL.parse(destination))
    if relation:
        raise ConfigError(
            f"{where}: `{key}`: the destination {destination} {relation} the source {url}",
            hint="replicate into a volume of its own, apart from the source: the agent writes, rolls back and "
            "removes in the destination, and would do it to the source's files",
        )


def _sources(data: dict[str, Any], group: dict[str, Any], path: str, where: str) -> tuple[SourceConfig, ...]:
    """The group's sources: ``[group] source`` (one, named DEFAULT_SOURCE) or the ``[[source]]``
    tables, each apart from the others (docs/config.md, "Sources")."""
    raw = data.get("source")
    if raw is None:
        if "source" not in group:
            raise ConfigError(
                f"{where}: missing `source`",
                hint='add `source = "URL"` to [group], or one [[source]] table per source volume '
                '(docs/config.md, "Sources")',
            )
        url = _url(_need(group, "source", str, where), "source", where)
        return (SourceConfig(name=DEFAULT_SOURCE, url=url),)
    if "source" in group:
        raise ConfigError(
            f"{where}: `source` and [[source]] tables both name sources",
            hint='`source = "URL"` in [group] is the short form of one source: move it into a [[source]] table '
            '(name = "...", url = "...") with the others, and take it out of [group]',
        )
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(
            f"{path}: `source` must be an array of tables ([[source]])",
            hint='write each source as a [[source]] table with name = "..." and url = "..."',
        )
    if not raw:
        raise ConfigError(f"{path}: [[source]] holds no table", hint="give the group at least one [[source]]")
    sources: list[SourceConfig] = []
    for i, table in enumerate(raw):
        source = _source(table, f"{path} [[source]]", i)
        w = f"{path} [[source]] {source.name!r}"
        for other in sources:
            if other.name == source.name:
                raise ConfigError(f"{w}: source {source.name!r} appears twice", hint="source names are unique")
            same = VolumeURL.parse(other.url) == VolumeURL.parse(source.url)
            relation = "is" if same else overlap(VolumeURL.parse(other.url), VolumeURL.parse(source.url))
            if relation:
                raise ConfigError(
                    f"{w}: `url`: {source.url} {relation} the volume of source {other.name!r} ({other.url})",
                    hint="name each source volume once, apart from the others: the replicas of several "
                    "qtrees of one volume are [[replica]] tables with the same `from`",
                )
        sources.append(source)
    return tuple(sources)


def _source(table: dict[str, Any], head: str, index: int) -> SourceConfig:
    """The ``[[source]]`` table number ``index`` (from 0), checked on its own; ``head``: the file and table."""
    where = f"{head} #{index + 1}"
    known = {"name", "url", "interval", "parallel", *KEYS, *TRANSPORT}
    if set(table) - known:
        raise ConfigError(f"{where}: unknown key(s) {sorted(set(table) - known)}", hint=f"known keys: {sorted(known)}")
    name = _name(_need(table, "name", str, where), where)
    where = f"{head} {name!r}"
    url = _url(_need(table, "url", str, where), "url", where)
    interval = _optional_duration(
        table, "interval", where, example='"15m"', unset="leave it out to take a PCPI of this source every cycle"
    )
    parallel = table.get("parallel")
    if parallel is not None and (
        not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= 256
    ):
        raise ConfigError(
            f"{where}: `parallel` must be an integer from 1 to 256",
            hint="at most this many of this source's transfers at once; leave it out for the group's `parallel` only",
        )
    transport = []
    scheme = VolumeURL.parse(url).scheme
    for tname, (types, schemes) in TRANSPORT.items():
        if tname not in table:
            continue
        sub, tw = table[tname], f"{where} [source.{tname}]"
        if not isinstance(sub, dict):
            raise ConfigError(f"{where}: `{tname}` must be a table ([source.{tname}])", hint="see docs/network.md")
        if scheme not in schemes:
            raise ConfigError(
                f"{tw}: a {scheme}:// source takes no [source.{tname}] (it would do nothing)",
                hint=f"remove it: [source.{tname}] acts on {' and '.join(s + '://' for s in schemes)} sources only",
            )
        if set(sub) - set(types):
            raise ConfigError(
                f"{tw}: unknown key(s) {sorted(set(sub) - set(types))}", hint=f"known keys: {sorted(types)}"
            )
        for key, value in sub.items():
            ok = isinstance(value, types[key]) and not isinstance(value, bool)
            if ok and isinstance(value, list) and not all(isinstance(v, str) for v in value):
                ok = False
            if not ok:
                raise ConfigError(
                    f"{tw}: `{key}` has the wrong type ({type(value).__name__})",
                    hint='see docs/network.md, "Client settings"',
                )
        items = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sub.items())
        transport.append((tname, items))
    return SourceConfig(
        name=name,
        url=url,
        interval=interval,
        parallel=parallel,
        transport=tuple(transport),
        deadlines=parse_overrides(table, where),
    )


def _replicas(data: dict[str, Any], sources: tuple[SourceConfig, ...], path: str) -> tuple[ReplicaConfig, ...]:
    """The ``[[replica]]`` tables, each with the source it comes from (``from``; needed when there are several)."""
    names = [s.name for s in sources]
    replicas = []
    seen: set[str] = set()
    raw = data.get("replica", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: `replica` must be an array of tables ([[replica]])")
    for i, r in enumerate(raw):
        w = f"{path} [[replica]] #{i + 1}"
        if not isinstance(r, dict):
            raise ConfigError(f"{w}: must be a table ([[replica]] with name = ...)")
        if set(r) - {"name", "source", "from"}:
            raise ConfigError(
                f"{w}: unknown key(s) {sorted(set(r) - {'name', 'source', 'from'})}",
                hint="known keys: name, source, from",
            )
        rname = _name(_need(r, "name", str, w), w)
        rsource = _name(r.get("source", rname), w) if isinstance(r.get("source", rname), str) else None
        if rsource is None:
            raise ConfigError(f"{w}: `source` must be a qtree name")
        if rname in seen:
            raise ConfigError(f"{w}: replica {rname!r} appears twice", hint="replica names are unique in a group")
        seen.add(rname)
        choose = f'write from = "NAME" with the name of its [[source]]: {", ".join(map(repr, names))}'
        if "from" in r:
            origin = _need(r, "from", str, w)
            if origin not in names:
                raise ConfigError(f"{w}: `from`: no source is named {origin!r}", hint=choose)
        elif len(names) == 1:
            origin = names[0]
        else:
            raise ConfigError(
                f"{w}: replica {rname!r} has no `from`, and the group has {len(names)} sources", hint=choose
            )
        replicas.append(ReplicaConfig(name=rname, source=rsource, origin=origin))
    return tuple(replicas)


def load_config(path: str | Path) -> GroupConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no config file at {p}", hint="pass --config FILE, or create one (docs/config.md)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
    return parse_config(text, str(p))


def check_replicas(config: GroupConfig, ledger: dict[str, str]) -> None:
    """The config is the truth: a replica of the ledger (``ledger``: name -> source qtree) that
    ``config`` lacks, or gives another source qtree, is a ConfigError naming the verb that
    reconciles it (`coalesce remove`, `coalesce add`).  A replica only the config has is not an
    error: it is added."""
    where = config.path or "the config"
    sources = {r.name: r.source for r in config.replicas}
    missing = sorted(n for n in ledger if n not in sources)
    changed = sorted(n for n in ledger if n in sources and sources[n] != ledger[n])
    if missing:
        name = missing[0]
        more = f" (also: {', '.join(missing[1:])})" if missing[1:] else ""
        raise ConfigError(
            f"replica {name!r} is in the ledger but not in {where}{more}",
            hint=f"`coalesce remove {name}` takes it out of the group (its data stay on the destination), "
            f'or put its [[replica]] back (name = "{name}", source = "{ledger[name]}")',
        )
    if changed:
        name = changed[0]
        more = f" (also: {', '.join(changed[1:])})" if changed[1:] else ""
        raise ConfigError(
            f"replica {name!r} has source qtree {ledger[name]!r} in the ledger, {sources[name]!r} in {where}{more}",
            hint=f'a replica\'s source cannot change: put source = "{ledger[name]}" back, or run '
            f"`coalesce remove {name}` then `coalesce add {name} --source {sources[name]}` "
            "(a new baseline from the new source)",
        )


def check_origins(config: GroupConfig, ledger: dict[str, str]) -> None:
    """A replica's source cannot change either: a replica of the ledger (``ledger``: name -> the name
    of its source) that ``config`` says comes from a source of another name is a ConfigError."""
    origins = {r.name: r.origin for r in config.replicas}
    changed = sorted(n for n in ledger if n in origins and origins[n] != ledger[n])
    if not changed:
        return
    name = changed[0]
    more = f" (also: {', '.join(changed[1:])})" if changed[1:] else ""
    raise ConfigError(
        f"replica {name!r} comes from source {ledger[name]!r} in the ledger, {origins[name]!r} in "
        f"{config.path or 'the config'}{more}",
        hint=f'a source\'s name is part of the group: name the source "{ledger[name]}" again ([[source]] '
        f'name = "{ledger[name]}"; `[group] source` is the source "{DEFAULT_SOURCE}"), or run '
        f"`coalesce remove {name}` then `coalesce add {name}` (a new baseline)",
    )


def removed_sources(config: GroupConfig, ledger: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """The source PCPIs the ledger still records (``ledger``: PCPI name -> the name of the source that
    holds it) on sources ``config`` no longer names (their [[source]] table was removed), by source
    name, sorted: the agent has no URL to release them with (docs/config.md, "Sources", "Removing a
    source"); they wait, and are reported, until the table is back."""
    named = {one.name for one in config.sources}
    out: dict[str, list[str]] = {}
    for name, source in sorted(ledger.items()):
        if source not in named:
            out.setdefault(source, []).append(name)
    return {source: tuple(names) for source, names in sorted(out.items())}


def without_replica(text: str, name: str, path: str = "<config>") -> str:
    """``text`` without the ``[[replica]]`` table of replica ``name`` (what `coalesce remove` writes
    back); ConfigError when that table cannot be told apart in the text."""
    lines = text.splitlines(keepends=True)
    heads = [i for i, line in enumerate(lines) if line.lstrip().startswith("[")] + [len(lines)]
    cut: tuple[int, int] | None = None
    for start, end in zip(heads, heads[1:]):
        head = lines[start].split("#", 1)[0].replace(" ", "").strip()
        if head != "[[replica]]":
            continue
        try:
            table = tomllib.loads("".join(lines[start:end])).get("replica", [{}])[0]
        except tomllib.TOMLDecodeError:
            continue
        if table.get("name") == name:
            cut = (start, end)
    if cut is None:
        raise ConfigError(
            f"{path}: cannot find the [[replica]] table of replica {name!r}",
            hint=f"remove replica {name!r} from {path} by hand, then run `coalesce remove {name}` again",
        )
    start, end = cut
    while start > 0 and not lines[start - 1].strip():
        start -= 1  # the blank lines before it go with it
    out = "".join(lines[:start] + lines[end:])
    if any(r.name == name for r in parse_config(out, path).replicas):
        raise ConfigError(
            f"{path}: replica {name!r} appears in a form `coalesce remove` cannot edit",
            hint=f"remove replica {name!r} from {path} by hand, then run `coalesce remove {name}` again",
        )
    return out


def write_config(path: str | Path, text: str) -> None:
    """Replace the config file by ``text`` atomically (a crash leaves the old or the new file)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, p.stat().st_mode & 0o7777)
    os.replace(tmp, p)


def replica_block(name: str, source: str, origin: str | None = None) -> str:
    """The TOML text `coalesce add` appends to a config file: replica ``name`` of qtree ``source`` of
    the source named ``origin`` (None: no ``from``, the group's only source)."""
    line = f'from = "{origin}"\n' if origin is not None else ""
    return f'\n[[replica]]\nname = "{name}"\nsource = "{source}"\n{line}'
