"""A reader of the ZFS send stream that ``zfs send [-i base] target`` writes (zfs-fuse, pool
version 23), written from the format's definition (``dmu_replay_record_t`` in sys/zfs_ioctl.h).

A stream is a sequence of fixed 312-byte records in the sender's byte order
(the BEGIN record's magic tells which), some followed by a payload:

* BEGIN (magic, version info, GUIDs of the two snapshots, the target's name);
* OBJECT (object number, types, block size, bonus length), then the bonus
  buffer padded to 8 bytes: for a file or directory (bonus type ZNODE) the
  ``znode_phys_t``, whose ``zp_gen`` at offset 64 is the object's generation,
  the txg that created it (:attr:`Object.gen`; an object number freed and
  used again gets a new one);
* FREEOBJECTS (a range of object numbers that are free in the target);
* WRITE (object, offset, length), then ``length`` bytes of the block's
  logical (uncompressed) data;
* FREE (object, offset, length; length ``2**64 - 1`` means to the end): a
  range of the object that is a hole in the target;
* END (a fletcher-4 checksum of the stream, the target's GUID).

Applying an incremental stream's records to the base snapshot gives the
target: an object's bytes that no WRITE or FREE names are the same in both.
WRITE_BYREF (``zfs send -D``), a version info with feature flags, or a
payload length in a record header are newer formats this reader refuses
(CorruptStream, before any data), as are record types it does not know.
The END checksum is not verified: the stream comes from the local ``zfs``
through a pipe, its exit status is checked, and a short read is raised as
TruncatedStream; every record's target GUID must be the BEGIN record's.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Iterator, Union

import attrs

from coalesce_core.errors import CorruptStream
from coalesce_posix.run import read_exact

RECORD = 312
MAGIC = 0x2F5BACBAC
DRR_BEGIN, DRR_OBJECT, DRR_FREEOBJECTS, DRR_WRITE, DRR_FREE, DRR_END, DRR_WRITE_BYREF = range(7)
NAMES = {
    DRR_BEGIN: "BEGIN",
    DRR_OBJECT: "OBJECT",
    DRR_FREEOBJECTS: "FREEOBJECTS",
    DRR_WRITE: "WRITE",
    DRR_FREE: "FREE",
    DRR_END: "END",
    DRR_WRITE_BYREF: "WRITE_BYREF",
}
SUBSTREAM = 1  # DMU_SUBSTREAM: one dataset's stream (not a `zfs send -R` package)
TO_END = (1 << 64) - 1  # a FREE of this length runs to the end of the object
MAX_BLOCK = 16 << 20  # the largest block any ZFS writes (large_blocks); v23: 128 KiB
MAX_BONUS = 320  # DN_MAX_BONUSLEN
DMU_OT_ZNODE = 17  # the bonus type of a ZPL file or directory: znode_phys_t
DMU_OT_PLAIN_FILE_CONTENTS = 19
ZP_GEN = 64  # offset of zp_gen in znode_phys_t


@attrs.frozen
class Begin:
    toguid: int
    fromguid: int
    toname: str
    incremental: bool


@attrs.frozen
class Object:
    object: int
    type: int
    blksz: int
    gen: int | None = None  # zp_gen of a file's or directory's znode (None for other objects)


@attrs.frozen
class FreeObjects:
    first: int
    count: int


@attrs.frozen
class Write:
    object: int
    type: int
    offset: int
    data: bytes


@attrs.frozen
class Free:
    object: int
    offset: int
    length: int  # TO_END: to the end of the object


@attrs.frozen
class End:
    toguid: int


Record = Union[Begin, Object, FreeObjects, Write, Free, End]


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    return read_exact(f, n, what, "zfs send")


class _Layout:
    """The record structs in one byte order."""

    def __init__(self, order: str) -> None:
        self.head = struct.Struct(order + "II")
        self.begin = struct.Struct(order + "QQQIIQQ256s")  # at 8
        self.object = struct.Struct(order + "QIIIIBB6xQ")  # at 8
        self.u64 = struct.Struct(order + "Q")
        self.freeobjects = struct.Struct(order + "QQQ")  # at 8
        self.write = struct.Struct(order + "QIIQQQ")  # at 8
        self.free = struct.Struct(order + "QQQQ")  # at 8
        self.end = struct.Struct(order + "32xQ")  # at 8


_LE, _BE = _Layout("<"), _Layout(">")


def records(f: BinaryIO) -> Iterator[Record]:
    """The records of one stream, BEGIN first and END last; nothing may follow END.

    Raises TruncatedStream for a stream that stops early, CorruptStream for one
    that is malformed or of a format this reader does not know."""
    head = _read_exact(f, RECORD, "the BEGIN record")
    for lay in (_LE, _BE):
        kind, plen = lay.head.unpack_from(head, 0)
        magic, vinfo, _ctime, _ostype, _flags, toguid, fromguid, name = lay.begin.unpack_from(head, 8)
        if kind == DRR_BEGIN and magic == MAGIC:
            break
    else:
        raise CorruptStream(
            "not a ZFS send stream (no BEGIN record with the stream magic)",
            hint="is the input the output of `zfs send`?",
        )
    if plen != 0 or vinfo & 3 != SUBSTREAM or vinfo >> 2 != 0:
        raise CorruptStream(
            f"ZFS send stream of a format this reader does not know (version info {vinfo:#x}, payload {plen})",
            hint="a newer ZFS than zfs-fuse's; set COALESCE_ZFS_DIFF=walk to compare the images",
        )
    yield Begin(
        toguid=toguid,
        fromguid=fromguid,
        incremental=fromguid != 0,
        toname=name.split(b"\0", 1)[0].decode("utf-8", "replace"),
    )
    count = 1
    while True:
        rec = _read_exact(f, RECORD, f"record {count}")
        count += 1
        kind, plen = lay.head.unpack_from(rec, 0)
        if plen != 0:
            raise CorruptStream(
                f"ZFS send stream record {count} ({NAMES.get(kind, kind)}) has a payload length "
                f"{plen}: a newer stream format than zfs-fuse's",
                hint="set COALESCE_ZFS_DIFF=walk to compare the images instead",
            )
        if kind == DRR_WRITE:
            obj, typ, _pad, off, length, guid = lay.write.unpack_from(rec, 8)
            if length == 0 or length > MAX_BLOCK or off + length > TO_END:
                raise CorruptStream(f"ZFS send stream: WRITE of {length} bytes at {off} of object {obj}")
            data = _read_exact(f, length, f"the data of record {count}")
            out: Record = Write(object=obj, type=typ, offset=off, data=data)
        elif kind == DRR_FREE:
            obj, off, length, guid = lay.free.unpack_from(rec, 8)
            out = Free(object=obj, offset=off, length=length)
        elif kind == DRR_OBJECT:
            obj, typ, bonustype, blksz, bonuslen, _ck, _comp, guid = lay.object.unpack_from(rec, 8)
            if bonuslen > MAX_BONUS or blksz > MAX_BLOCK:
                raise CorruptStream(
                    f"ZFS send stream: OBJECT {obj} with a bonus of {bonuslen} bytes, blocks of {blksz}"
                )
            bonus = _read_exact(f, (bonuslen + 7) & ~7, f"the bonus buffer of record {count}")
            gen = (
                lay.u64.unpack_from(bonus, ZP_GEN)[0] if bonustype == DMU_OT_ZNODE and bonuslen >= ZP_GEN + 8 else None
            )
            out = Object(object=obj, type=typ, blksz=blksz, gen=gen)
        elif kind == DRR_FREEOBJECTS:
            first, n, guid = lay.freeobjects.unpack_from(rec, 8)
            out = FreeObjects(first=first, count=n)
        elif kind == DRR_END:
            (guid,) = lay.end.unpack_from(rec, 8)
            if guid != toguid:
                raise CorruptStream(f"ZFS send stream: END of snapshot GUID {guid:#x}, BEGIN named {toguid:#x}")
            yield End(toguid=guid)
            return
        else:
            raise CorruptStream(
                f"ZFS send stream record {count} has type {NAMES.get(kind, kind)}, which this reader does not take",
                hint="zfs send -D and newer formats are not supported; "
                "set COALESCE_ZFS_DIFF=walk to compare the images instead",
            )
        if guid != toguid:
            raise CorruptStream(
                f"ZFS send stream record {count} ({NAMES[kind]}) is of snapshot GUID {guid:#x}, BEGIN named {toguid:#x}"
            )
        yield out
