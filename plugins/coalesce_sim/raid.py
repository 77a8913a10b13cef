"""RAID-4 block device of the sim backend: N data disks + 1 parity disk, 4 KiB blocks.

A volume block number (vbn) lives on data disk ``vbn % N`` at disk block
``vbn // N``; disk block ``s`` of every disk forms stripe ``s`` and the parity
disk holds the XOR of the N data blocks of the stripe.

Writes are **full-stripe writes only** (the file system above allocates whole
free stripes, WAFL "tetris" style), so parity is computed from the new data
alone and no live block ever shares a stripe that is being rewritten: a crash
in the middle of a stripe write can leave that stripe's parity stale, but the
stripe holds no block of the last complete consistency point (no RAID write
hole for live data).

One disk (data or parity) may be failed: reads of a failed data disk are
served *degraded* by XOR of the surviving blocks and parity; writes skip the
failed disk (parity still covers it).  :meth:`Raid.reconstruct` rebuilds a
replacement disk; :meth:`Raid.scrub` verifies parity.

The device counts physical block reads and writes (``stats``) and has an
injectable fault (``crash_after_writes``) that raises :class:`SimCrash` before
the (n+1)-th physical block write: the test harness's way to "kill the writer
between any two block writes".
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from coalesce_core.errors import BackendError

BS = 4096
ZERO = bytes(BS)
PARITY = "parity"


class SimCrash(BackendError):
    """Injected crash of the writer (tests and demos): the handle is dead, reopen the volume."""


def xor_blocks(blocks: Iterable[bytes]) -> bytes:
    acc = 0
    for b in blocks:
        acc ^= int.from_bytes(b, "little")
    return acc.to_bytes(BS, "little")


class Raid:
    """The disks of one volume directory."""

    def __init__(self, path: str, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync_enabled = fsync
        cfg = self._read_cfg()
        self.ndata: int = int(cfg["ndata"])
        self.failed: int | None = cfg.get("failed")  # 0..N-1 data disk, N = parity disk
        self.stats = {"reads": 0, "writes": 0, "degraded_reads": 0}
        self.crash_after_writes: int | None = None
        self.fds: list[int | None] = []
        for i in range(self.ndata + 1):
            if i == self.failed:
                self.fds.append(None)
            else:
                self.fds.append(os.open(self.disk_path(i), os.O_RDWR))

    # -- configuration -------------------------------------------------------------
    @staticmethod
    def format(path: str, ndata: int) -> None:
        if ndata < 1 or ndata > 32:
            raise BackendError(f"a sim volume needs 1..32 data disks, not {ndata}")
        os.makedirs(path, exist_ok=True)
        for i in range(ndata + 1):
            with open(os.path.join(path, Raid.disk_name(i, ndata)), "wb"):
                pass
        Raid._write_cfg(path, {"ndata": ndata, "failed": None})

    @staticmethod
    def disk_name(i: int, ndata: int) -> str:
        return "parity.img" if i == ndata else f"disk{i}.img"

    def disk_path(self, i: int) -> str:
        return os.path.join(self.path, self.disk_name(i, self.ndata))

    def disk_label(self, i: int) -> str:
        return PARITY if i == self.ndata else f"disk{i}"

    def _read_cfg(self) -> dict:
        try:
            with open(os.path.join(self.path, "raid.json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise BackendError(
                f"{self.path} is not a sim volume ({exc})", hint="create it with create=True or `coalesce init`"
            ) from exc

    @staticmethod
    def _write_cfg(path: str, cfg: dict) -> None:
        tmp = os.path.join(path, "raid.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cfg, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, "raid.json"))

    def close(self) -> None:
        for fd in self.fds:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds = [None] * len(self.fds)

    # -- block I/O -------------------------------------------------------------------
    def _raw_read(self, disk: int, stripe: int) -> bytes:
        fd = self.fds[disk]
        assert fd is not None
        self.stats["reads"] += 1
        data = os.pread(fd, BS, stripe * BS)
        return data if len(data) == BS else data + bytes(BS - len(data))

    def read(self, vbn: int) -> bytes:
        stripe, disk = divmod(vbn, self.ndata)
        if disk != self.failed:
            return self._raw_read(disk, stripe)
        self.stats["degraded_reads"] += 1
        return xor_blocks(self._raw_read(d, stripe) for d in range(self.ndata + 1) if d != disk)

    def read_stripe_copy(self, stripe: int, disk: int) -> bytes | None:
        """One disk's block of a stripe without degraded reconstruction (None if failed)."""
        if disk == self.failed:
            return None
        return self._raw_read(disk, stripe)

    def _write(self, disk: int, stripe: int, data: bytes) -> None:
        if self.crash_after_writes is not None:
            if self.crash_after_writes <= 0:
                raise SimCrash("injected crash: the writer died between two block writes")
            self.crash_after_writes -= 1
        self.stats["writes"] += 1
        fd = self.fds[disk]
        if fd is None:  # failed disk: degraded write, parity covers it
            return
        os.pwrite(fd, data, stripe * BS)

    def write_stripe(self, stripe: int, blocks: list[bytes]) -> None:
        """Full-stripe write: N data blocks then parity."""
        assert len(blocks) == self.ndata
        for d, b in enumerate(blocks):
            self._write(d, stripe, b)
        self._write(self.ndata, stripe, xor_blocks(blocks))

    def sync(self) -> None:
        """fdatasync every disk (data, then the superblock stripe, are made durable in that order)."""
        if not self.fsync_enabled:
            return
        for fd in self.fds:
            if fd is not None:
                os.fdatasync(fd)

    def nstripes_on_disk(self) -> int:
        n = 0
        for fd in self.fds:
            if fd is not None:
                n = max(n, (os.fstat(fd).st_size + BS - 1) // BS)
        return n

    # -- failure handling --------------------------------------------------------------
    def parse_disk(self, text: str | int) -> int:
        if isinstance(text, int):
            i = text
        elif str(text).lower() == PARITY:
            i = self.ndata
        else:
            t = str(text).lower().removeprefix("disk")
            if not t.isdigit():
                raise BackendError(f"no disk {text!r}", hint=f"name a data disk 0..{self.ndata - 1} or 'parity'")
            i = int(t)
        if not 0 <= i <= self.ndata:
            raise BackendError(f"no disk {text!r}", hint=f"name a data disk 0..{self.ndata - 1} or 'parity'")
        return i

    def fail(self, disk: int) -> None:
        """Fail ``disk``: its image is set aside (renamed ``*.failed``) and never read again."""
        if self.failed is not None:
            if self.failed == disk:
                return
            raise BackendError(
                f"{self.disk_label(self.failed)} has already failed; RAID-4 survives one failed disk",
                hint="run `coalesce sim reconstruct` first",
            )
        fd = self.fds[disk]
        if fd is not None:
            os.close(fd)
        self.fds[disk] = None
        os.replace(self.disk_path(disk), self.disk_path(disk) + ".failed")
        self.failed = disk
        self._write_cfg(self.path, {"ndata": self.ndata, "failed": disk})

    def reconstruct(self, nstripes: int) -> int:
        """Rebuild the failed disk onto a fresh image from the others; returns stripes rebuilt."""
        if self.failed is None:
            return 0
        disk = self.failed
        tmp = self.disk_path(disk) + ".rebuild"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        others = [d for d in range(self.ndata + 1) if d != disk]
        for s in range(nstripes):
            blk = xor_blocks(self._raw_read(d, s) for d in others)
            os.pwrite(fd, blk, s * BS)
            self.stats["writes"] += 1
        os.fsync(fd)
        os.replace(tmp, self.disk_path(disk))
        try:
            os.unlink(self.disk_path(disk) + ".failed")
        except OSError:
            pass
        self.fds[disk] = fd
        self.failed = None
        self._write_cfg(self.path, {"ndata": self.ndata, "failed": None})
        return nstripes

    def check_stripe(self, s: int) -> bool:
        blocks = [self._raw_read(d, s) for d in range(self.ndata)]
        return xor_blocks(blocks) == self._raw_read(self.ndata, s)

    def repair_stripe(self, s: int) -> None:
        blocks = [self._raw_read(d, s) for d in range(self.ndata)]
        self._write(self.ndata, s, xor_blocks(blocks))
