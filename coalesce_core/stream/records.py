"""Change records: the system-independent, path-based change stream (DESIGN §4).

A stream for one qtree is ``Begin``, then any number of change records, then
``End``.  Paths are relative to the qtree's root, use ``/`` as separator and
are checked by :func:`check_path` (I10): no empty, ``.`` or ``..`` component,
no leading ``/``, no NUL, bounded length.  Paths are ``str``; bytes that are
not UTF-8 are carried with ``surrogateescape`` (``os.fsdecode``).

Order contract (what an applier may rely on; every diff must produce it):
a directory's ``MkDir`` comes before anything created in it; ``SetAttr`` and
``SetXattr`` may name the qtree root itself (path :data:`ROOT`, ``""``); ``Rename`` moves
an existing entry and replaces nothing (the target was unlinked first);
``Write`` and ``Truncate`` address a file created earlier in the stream or
present at the base; ``SetAttr`` of a directory comes after its contents.
Appliers must be idempotent per record where they can (``MkDir`` of an
existing directory, ``Unlink`` of a missing file), because recovery may
replay.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Union

import attrs

from coalesce_core.errors import HostilePath

#: A path inside a qtree: as long as the file system allows (none bounds a path, only a name:
#: a deep tree has paths longer than PATH_MAX), bounded for hostile streams (docs/stream-format.md).
MAX_PATH = 1 << 20
MAX_NAME = 255
#: A symlink's target: Linux refuses one of PATH_MAX (4096) bytes or more.
MAX_TARGET = 4096
MAX_DATA = 1 << 20  # one Write carries at most 1 MiB
#: The largest file size and end of data any record may carry: Linux's loff_t (2^63 - 1); a
#: destination may store less (VolumeHandle.max_file_size, coalesce_core.stream.limits).
MAX_FILE_SIZE = (1 << 63) - 1
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 << 10


def check_path(path: str, *, what: str = "path") -> str:
    """Return ``path`` if it stays inside a qtree, else raise HostilePath (I10)."""
    # Fast path (every record is checked three times: made by the diff, decoded, applied):
    # an ASCII path of at most MAX_NAME characters has no component, and no whole, over
    # its limit; framed by "/", an empty, "." or ".." component (a leading or trailing
    # "/" included) shows as "//", "/./" or "/../".  Anything else takes the full check.
    if type(path) is str and 0 < len(path) <= MAX_NAME and path.isascii() and "\x00" not in path:
        framed_path = f"/{path}/"
        if "//" not in framed_path and "/./" not in framed_path and "/../" not in framed_path:
            return path
    return check_path_fully(path, what=what)


def check_path_fully(path: str, *, what: str = "path") -> str:
    """:func:`check_path` without its fast path (the reference the fast path is tested against)."""
    if not isinstance(path, str) or not path:
        raise HostilePath(f"{what} is empty", hint="a change record must name a path inside the qtree")
    if "\x00" in path:
        raise HostilePath(f"{what} {path[:300]!r} contains NUL", hint="the stream is corrupt or hostile")
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_PATH:
        raise HostilePath(f"{what} is longer than {MAX_PATH} bytes", hint="the stream is corrupt or hostile")
    if path.startswith("/"):
        raise HostilePath(f"{what} {path[:300]!r} is absolute", hint="records must use paths relative to the qtree")
    # the common case of a long path (thousands of components) in a few C-level scans
    framed_path = b"/" + raw + b"/"
    if (
        b"//" not in framed_path
        and b"/./" not in framed_path
        and b"/../" not in framed_path
        and max(map(len, raw.split(b"/"))) <= MAX_NAME
    ):
        return path
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise HostilePath(
                f"{what} {path[:300]!r} has a {part or 'empty'!r} component that would leave or confuse the qtree",
                hint="the source sent a hostile or corrupt stream; the update is rolled back",
            )
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise HostilePath(f"{what} {path[:300]!r} has a component longer than {MAX_NAME} bytes")
    return path


def _path(_inst: object, attribute: attrs.Attribute, value: str) -> None:
    check_path(value, what=attribute.name)


#: The path of the qtree root itself; only attribute records (SetAttr, SetXattr) may name it.
ROOT = ""


def check_path_or_root(path: str, *, what: str = "path") -> str:
    """:func:`check_path`, also accepting :data:`ROOT` (for the records that may address the qtree root)."""
    if path == ROOT and type(path) is str:
        return path
    return check_path(path, what=what)


def _path_or_root(_inst: object, attribute: attrs.Attribute, value: str) -> None:
    check_path_or_root(value, what=attribute.name)


def _nonneg(_inst: object, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative int, got {value!r}")


def _data(_inst: object, attribute: attrs.Attribute, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) > MAX_DATA:
        raise ValueError(f"{attribute.name} must be bytes of at most {MAX_DATA} bytes")


def _end(inst: "Write", _attribute: attrs.Attribute, value: bytes) -> None:
    if inst.offset + len(value) > MAX_FILE_SIZE:
        raise ValueError(f"a Write of {len(value)} bytes at offset {inst.offset} ends past {MAX_FILE_SIZE} bytes")


def _file_size(_inst: object, attribute: attrs.Attribute, value: int) -> None:
    _nonneg(_inst, attribute, value)
    if value > MAX_FILE_SIZE:
        raise ValueError(f"{attribute.name} {value} is larger than {MAX_FILE_SIZE} bytes")


@attrs.frozen
class Begin:
    """Opens the stream of ``qtree`` from source PCPI ``base`` (None: baseline) to ``target``."""

    qtree: str = attrs.field(validator=_path)
    base: str | None
    target: str


@attrs.frozen
class MkDir:
    """Create directory ``path`` (its parent exists)."""

    path: str = attrs.field(validator=_path)
    mode: int = 0o755


@attrs.frozen
class MkFile:
    """Create an empty regular file ``path`` (data follows in Write records)."""

    path: str = attrs.field(validator=_path)
    mode: int = 0o644


@attrs.frozen
class Symlink:
    """Create symlink ``path`` pointing to ``target`` (stored, never followed by appliers)."""

    path: str = attrs.field(validator=_path)
    target: str = attrs.field()

    @target.validator
    def _t(self, _a: attrs.Attribute, value: str) -> None:
        if not value or "\x00" in value or len(value.encode("utf-8", "surrogateescape")) > MAX_TARGET:
            raise HostilePath(f"symlink target {value[:300]!r} is empty, longer than {MAX_TARGET} bytes or has NUL")


@attrs.frozen
class HardLink:
    """Create ``path`` as another name of the existing file ``existing``."""

    path: str = attrs.field(validator=_path)
    existing: str = attrs.field(validator=_path)


@attrs.frozen
class Rename:
    """Move ``old`` to ``new`` (``new`` does not exist)."""

    old: str = attrs.field(validator=_path)
    new: str = attrs.field(validator=_path)


@attrs.frozen
class Unlink:
    """Remove the non-directory ``path``."""

    path: str = attrs.field(validator=_path)


@attrs.frozen
class RmDir:
    """Remove the directory ``path`` (empty by the time this record comes)."""

    path: str = attrs.field(validator=_path)


@attrs.frozen
class Write:
    """Write ``data`` at ``offset`` into regular file ``path``."""

    path: str = attrs.field(validator=_path)
    offset: int = attrs.field(validator=_nonneg)
    data: bytes = attrs.field(validator=[_data, _end])


@attrs.frozen
class Truncate:
    """Set the size of regular file ``path`` (extending makes a hole)."""

    path: str = attrs.field(validator=_path)
    size: int = attrs.field(validator=_file_size)


@attrs.frozen
class SetAttr:
    """Set mode, owner and modification time of ``path`` (None leaves a field as is);
    ``path`` may be :data:`ROOT`, the qtree root."""

    path: str = attrs.field(validator=_path_or_root)
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None


@attrs.frozen
class SetXattr:
    """Set extended attribute ``name`` of ``path``; ``value`` None removes it; ``path`` may be
    :data:`ROOT`, the qtree root."""

    path: str = attrs.field(validator=_path_or_root)
    name: str = attrs.field()
    value: bytes | None = attrs.field(default=None)

    @name.validator
    def _n(self, _a: attrs.Attribute, value: str) -> None:
        if not value or "\x00" in value or len(value.encode("utf-8", "surrogateescape")) > MAX_XATTR_NAME:
            raise HostilePath(f"xattr name {value!r} is empty, too long or has NUL")

    @value.validator
    def _v(self, _a: attrs.Attribute, value: bytes | None) -> None:
        if value is not None and (not isinstance(value, bytes) or len(value) > MAX_XATTR_VALUE):
            raise ValueError(f"xattr value must be bytes of at most {MAX_XATTR_VALUE} bytes")


@attrs.frozen
class End:
    """Closes the stream; ``records`` counts the change records between Begin and End."""

    records: int = attrs.field(validator=_nonneg)


Change = Union[MkDir, MkFile, Symlink, HardLink, Rename, Unlink, RmDir, Write, Truncate, SetAttr, SetXattr]
Record = Union[Begin, Change, End]

#: Stable wire codes for the codec; never renumber.
RECORD_TYPES: dict[int, type] = {
    1: Begin,
    2: MkDir,
    3: MkFile,
    4: Symlink,
    5: HardLink,
    6: Rename,
    7: Unlink,
    8: RmDir,
    9: Write,
    10: Truncate,
    11: SetAttr,
    12: SetXattr,
    15: End,
}
CHANGE_TYPES: tuple[type, ...] = (
    MkDir,
    MkFile,
    Symlink,
    HardLink,
    Rename,
    Unlink,
    RmDir,
    Write,
    Truncate,
    SetAttr,
    SetXattr,
)


def paths_of(record: object) -> tuple[str, ...]:
    """Every qtree-relative path a record touches (for filters and audits); :data:`ROOT` for an
    attribute record of the qtree root."""
    if isinstance(record, Rename):
        return (record.old, record.new)
    if isinstance(record, HardLink):
        return (record.path, record.existing)
    path = getattr(record, "path", None)
    return (path,) if path is not None else ()


def framed(qtree: str, base: str | None, target: str, changes: Iterable[object]) -> Iterator[object]:
    """Wrap bare change records in Begin ... End (counting them)."""
    yield Begin(qtree=qtree, base=base, target=target)
    n = 0
    for c in changes:
        n += 1
        yield c
    yield End(records=n)


def changes_only(stream: Iterable[object]) -> Iterator[object]:
    """Strip Begin/End from a stream, checking that End's count matches.

    Raises TruncatedStream if End is missing and CorruptStream on a bad count.
    """
    from coalesce_core.errors import CorruptStream, TruncatedStream

    n = 0
    began = False
    for rec in stream:
        if isinstance(rec, Begin):
            if began:
                raise CorruptStream("a second Begin record inside one stream")
            began = True
            continue
        if not began:
            raise CorruptStream("the stream does not start with a Begin record")
        if isinstance(rec, End):
            if rec.records != n:
                raise CorruptStream(f"End says {rec.records} records, the stream carried {n}")
            return
        n += 1
        yield rec
    raise TruncatedStream(
        f"the change stream ended after {n} records without its End record",
        hint="the source or the link failed mid-transfer; the update is rolled back and retried next cycle",
    )
