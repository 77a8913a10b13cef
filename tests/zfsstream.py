"""Building ZFS send streams for the tests of coalesce_zfs.sendstream and coalesce_zfs.senddata.

Written from the record layout (``dmu_replay_record_t``), independently of
the reader: every record is 312 bytes in the given byte order, followed by
its payload (OBJECT: the bonus buffer padded to 8 bytes; WRITE: the data).
"""

from __future__ import annotations

import struct

MAGIC = 0x2F5BACBAC
RECORD = 312
GUID = 0x1234_5678_9ABC_DEF0
FILE_DATA = 19  # DMU_OT_PLAIN_FILE_CONTENTS
TO_END = (1 << 64) - 1


def _rec(kind: int, body: bytes, order: str, payloadlen: int = 0) -> bytes:
    head = struct.pack(order + "II", kind, payloadlen) + body
    assert len(head) <= RECORD
    return head.ljust(RECORD, b"\0")


def begin(
    name: str = "pool/src@t",
    fromguid: int = 0x55,
    toguid: int = GUID,
    order: str = "<",
    versioninfo: int = 1,
    magic: int = MAGIC,
) -> bytes:
    return _rec(
        0,
        struct.pack(order + "QQQIIQQ256s", magic, versioninfo, 1_700_000_000, 2, 0, toguid, fromguid, name.encode()),
        order,
    )


def obj(
    number: int,
    typ: int = FILE_DATA,
    blksz: int = 131072,
    bonus: bytes = b"\x01" * 264,
    toguid: int = GUID,
    order: str = "<",
    bonustype: int = 17,
) -> bytes:
    pad = (len(bonus) + 7) & ~7
    return _rec(
        1, struct.pack(order + "QIIIIBB6xQ", number, typ, bonustype, blksz, len(bonus), 7, 2, toguid), order
    ) + bonus.ljust(pad, b"\0")


def znode(gen: int, order: str = "<") -> bytes:
    """A bonus buffer of bonus type ZNODE (17): a 264-byte znode_phys_t with zp_gen (at 64) set."""
    return (b"\x01" * 64 + struct.pack(order + "Q", gen)).ljust(264, b"\x02")


def freeobjects(first: int, count: int, toguid: int = GUID, order: str = "<") -> bytes:
    return _rec(2, struct.pack(order + "QQQ", first, count, toguid), order)


def write(number: int, offset: int, data: bytes, typ: int = FILE_DATA, toguid: int = GUID, order: str = "<") -> bytes:
    return _rec(3, struct.pack(order + "QIIQQQ", number, typ, 0, offset, len(data), toguid), order) + data


def free(number: int, offset: int, length: int, toguid: int = GUID, order: str = "<") -> bytes:
    return _rec(4, struct.pack(order + "QQQQ", number, offset, length, toguid), order)


def end(toguid: int = GUID, order: str = "<") -> bytes:
    return _rec(5, struct.pack(order + "32xQ", toguid), order)


def record(kind: int, order: str = "<", payloadlen: int = 0) -> bytes:
    """A record of any type with an all-zero body (for the reader's refusals)."""
    return _rec(kind, b"", order, payloadlen)


def file_stream(files: dict[int, bytes], name: str = "pool/src@t", blksz: int = 131072, order: str = "<") -> bytes:
    """An incremental stream that writes every block of every object in ``files`` (object -> data), the
    way ``zfs send -i`` sends files that were rewritten whole: OBJECT, FREE past the last block, then
    WRITEs of whole blocks (a file of one block has a block of its size rounded up to 512 bytes; the
    last block is padded with zeros past the end of the file, as ZFS stores it)."""
    out = [begin(name, order=order)]
    for number, data in sorted(files.items()):
        bs = blksz if len(data) > blksz else max(512, -(-len(data) // 512) * 512)
        nblocks = max(1, -(-len(data) // bs))
        out += [obj(number, blksz=bs, order=order), free(number, nblocks * bs, TO_END, order=order)]
        for i in range(nblocks):
            out.append(write(number, i * bs, data[i * bs : (i + 1) * bs].ljust(bs, b"\0"), order=order))
    out.append(end(order=order))
    return b"".join(out)
