"""A reader of the btrfs send stream (protocol v1 and v2), written from the
format btrfs-progs and the kernel document (fs/btrfs/send.h).

Layout: a stream header (``"btrfs-stream\\0"`` then a little-endian u32
version), then commands.  A command is a 10-byte header (le32 payload length,
le16 command, le32 crc32c of header-with-zero-crc plus payload) and a payload
of TLV attributes (le16 type, le16 length, value).  In v2 the DATA attribute
has no length: it is the last attribute and runs to the end of the command.

The crc is not verified (the stream comes from the local kernel through a
pipe; a short read is detected and raised as TruncatedStream).
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

import attrs

from coalesce_core.errors import CorruptStream
from coalesce_posix.run import read_exact

MAGIC = b"btrfs-stream\0"

# commands
C = dict(
    UNSPEC=0,
    SUBVOL=1,
    SNAPSHOT=2,
    MKFILE=3,
    MKDIR=4,
    MKNOD=5,
    MKFIFO=6,
    MKSOCK=7,
    SYMLINK=8,
    RENAME=9,
    LINK=10,
    UNLINK=11,
    RMDIR=12,
    SET_XATTR=13,
    REMOVE_XATTR=14,
    WRITE=15,
    CLONE=16,
    TRUNCATE=17,
    CHMOD=18,
    CHOWN=19,
    UTIMES=20,
    END=21,
    UPDATE_EXTENT=22,
    FALLOCATE=23,
    FILEATTR=24,
    ENCODED_WRITE=25,
    ENABLE_VERITY=26,
)
CMD_NAMES = {v: k for k, v in C.items()}

# attributes
A = dict(
    UNSPEC=0,
    UUID=1,
    CTRANSID=2,
    INO=3,
    SIZE=4,
    MODE=5,
    UID=6,
    GID=7,
    RDEV=8,
    CTIME=9,
    MTIME=10,
    ATIME=11,
    OTIME=12,
    XATTR_NAME=13,
    XATTR_DATA=14,
    PATH=15,
    PATH_TO=16,
    PATH_LINK=17,
    FILE_OFFSET=18,
    DATA=19,
    CLONE_UUID=20,
    CLONE_CTRANSID=21,
    CLONE_PATH=22,
    CLONE_OFFSET=23,
    CLONE_LEN=24,
    FALLOCATE_MODE=25,
    FILEATTR=26,
    UNENCODED_FILE_LEN=27,
    UNENCODED_LEN=28,
    UNENCODED_OFFSET=29,
    COMPRESSION=30,
    ENCRYPTION=31,
)
ATTR_NAMES = {v: k for k, v in A.items()}
_U64 = {
    A[n]
    for n in (
        "CTRANSID",
        "INO",
        "SIZE",
        "MODE",
        "UID",
        "GID",
        "RDEV",
        "FILE_OFFSET",
        "CLONE_CTRANSID",
        "CLONE_OFFSET",
        "CLONE_LEN",
        "FILEATTR",
        "UNENCODED_FILE_LEN",
        "UNENCODED_LEN",
        "UNENCODED_OFFSET",
    )
}
_U32 = {A["FALLOCATE_MODE"], A["COMPRESSION"], A["ENCRYPTION"]}
_TIMES = {A["CTIME"], A["MTIME"], A["ATIME"], A["OTIME"]}

_HDR = struct.Struct("<IHI")
_TLV = struct.Struct("<HH")


@attrs.frozen
class Command:
    """One decoded command: ``name`` (e.g. "RENAME") and its attributes by name.

    Paths are bytes as on disk; integers are ints; times are (sec, nsec);
    ``DATA`` is a memoryview/bytes (absent in --no-data streams).
    """

    name: str
    attrs: dict

    def path(self, key: str = "PATH") -> bytes:
        try:
            return self.attrs[key]
        except KeyError:
            raise CorruptStream(f"btrfs send command {self.name} lacks its {key} attribute") from None


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    return read_exact(f, n, what, "btrfs send")


def read_header(f: BinaryIO) -> int:
    head = _read_exact(f, len(MAGIC) + 4, "the stream header")
    if head[: len(MAGIC)] != MAGIC:
        raise CorruptStream("not a btrfs send stream (bad magic)", hint="is the input the output of `btrfs send`?")
    (version,) = struct.unpack_from("<I", head, len(MAGIC))
    if version not in (1, 2, 3):
        raise CorruptStream(f"btrfs send stream version {version} is not supported (1, 2 and 3 are)")
    return version


_U16 = struct.Struct("<H")
_Q = struct.Struct("<Q")
_I = struct.Struct("<I")
_QI = struct.Struct("<QI")
_DATA = A["DATA"]
# attribute type -> (name, how its value is decoded): 8 u64, 4 u32, 12 (sec, nsec), 0 raw bytes
_ATTRS = {t: (n, 8 if t in _U64 else 4 if t in _U32 else 12 if t in _TIMES else 0) for n, t in A.items()}
_STRUCTS = {8: _Q, 4: _I}


def decode(payload: bytes, cmd: int, version: int) -> Command:
    out: dict = {}
    pos, end = 0, len(payload)
    mv = memoryview(payload)
    tlv = _TLV.unpack_from
    attrs_ = _ATTRS
    while pos < end:
        if end - pos < 2:
            raise CorruptStream("a btrfs send TLV header is cut short")
        if version >= 2 and _U16.unpack_from(payload, pos)[0] == _DATA:
            out["DATA"] = mv[pos + 2 :]
            break
        if end - pos < 4:
            raise CorruptStream("a btrfs send TLV header is cut short")
        t, ln = tlv(payload, pos)
        pos += 4
        if pos + ln > end:
            raise CorruptStream(f"a btrfs send attribute ({ATTR_NAMES.get(t, t)}) overruns its command")
        info = attrs_.get(t)
        if info is None:
            out[f"A{t}"] = bytes(mv[pos : pos + ln])
        else:
            name, kind = info
            if kind == ln and kind:
                if kind == 12:
                    out[name] = _QI.unpack_from(payload, pos)
                else:
                    out[name] = _STRUCTS[kind].unpack_from(payload, pos)[0]
            elif t == _DATA:
                out[name] = mv[pos : pos + ln]
            else:
                out[name] = bytes(mv[pos : pos + ln])
        pos += ln
    return Command(name=CMD_NAMES.get(cmd, f"C{cmd}"), attrs=out)


def commands(f: BinaryIO) -> Iterator[Command]:
    """Decode every command of the stream ``f``, ending after END (or EOF)."""
    version = read_header(f)
    while True:
        hdr = f.read(_HDR.size)
        if not hdr:
            return  # a stream may end without END (multiple subvols)
        if len(hdr) < _HDR.size:
            hdr += _read_exact(f, _HDR.size - len(hdr), "a command header")
        length, cmd, _crc = _HDR.unpack(hdr)
        payload = _read_exact(f, length, f"command {CMD_NAMES.get(cmd, cmd)}") if length else b""
        c = decode(payload, cmd, version)
        yield c
        if cmd == C["END"]:
            return
