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

The disks have a volatile write cache: a block write is on the media only after the next
:meth:`Raid.sync` (the flush barrier; it is a barrier of the simulation also when the real
``fdatasync`` is off, ``fsync=0``).  Until then the device keeps the block's flushed content, so
:meth:`Raid.power_cut` can lose what a power cut loses: every write since the last flush (or,
given a random generator, any subset of them, some torn at a 512-byte sector boundary).
"""

from __future__ import annotations

import json
import os
import random
import threading
from typing import Iterable

from coalesce_core.errors import BackendError

from .volumelock import VolumeLock

BS = 4096
ZERO = bytes(BS)
PARITY = "parity"
SECTOR = 512


class SimCrash(BackendError):
    """Injected crash of the writer (tests and demos): the handle is dead, reopen the volume."""


class PowerCut(SimCrash):
    """The volume lost power (:meth:`Raid.power_cut`): nothing more reaches its disks; reopen it."""


def xor_blocks(blocks: Iterable[bytes]) -> bytes:
    acc = 0
    for b in blocks:
        acc ^= int.from_bytes(b, "little")
    return acc.to_bytes(BS, "little")


class Raid:
    """The disks of one volume directory."""

    def __init__(self, path: str, *, fsync: bool = True, readonly: bool = False, lock: bool = False) -> None:
        """Open the disks of ``path``: for reading only (nothing can be written), or for writing,
        with ``lock`` the shared lock of a writing handle (:mod:`.volumelock`; :meth:`close` drops it)."""
        self.path = path
        self.fsync_enabled = fsync
        self.readonly = readonly
        self.lock = VolumeLock(path) if lock else None
        cfg = self._read_cfg()
        self.ndata: int = int(cfg["ndata"])
        self.failed: int | None = cfg.get("failed")  # 0..N-1 data disk, N = parity disk
        self.stats = {"reads": 0, "writes": 0, "degraded_reads": 0}
        self.crash_after_writes: int | None = None
        self.io_lock = threading.Lock()  # a block write, a flush and a power cut exclude each other
        self.dead: PowerCut | None = None  # the power was cut: no block reaches a disk any more
        #: the write cache: (disk, disk block) -> its content at the last flush (None: past the disk's end then)
        self.unflushed: dict[tuple[int, int], bytes | None] = {}
        self.flushed_size: dict[int, int] = {}  # disk -> its size at the last flush (disks written since)
        self.fds: list[int | None] = []
        for i in range(self.ndata + 1):
            if i == self.failed:
                self.fds.append(None)
            else:
                self.fds.append(os.open(self.disk_path(i), os.O_RDONLY if readonly else os.O_RDWR))

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
        if self.lock is not None:
            self.lock.release()
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
        if self.readonly:
            raise BackendError(f"sim volume {self.path} is open for reading only", hint="open it for writing")
        with self.io_lock:
            if self.dead is not None:
                raise PowerCut(str(self.dead))
            if self.crash_after_writes is not None:
                if self.crash_after_writes <= 0:
                    raise SimCrash("injected crash: the writer died between two block writes")
                self.crash_after_writes -= 1
            self.stats["writes"] += 1
            fd = self.fds[disk]
            if fd is None:  # failed disk: degraded write, parity covers it
                return
            if (disk, stripe) not in self.unflushed:
                size = self.flushed_size.get(disk)
                if size is None:
                    size = self.flushed_size[disk] = os.fstat(fd).st_size
                self.unflushed[disk, stripe] = (
                    os.pread(fd, BS, stripe * BS).ljust(BS, b"\0") if stripe * BS < size else None
                )
            os.pwrite(fd, data, stripe * BS)

    def write_stripe(self, stripe: int, blocks: list[bytes]) -> None:
        """Full-stripe write: N data blocks then parity."""
        assert len(blocks) == self.ndata
        for d, b in enumerate(blocks):
            self._write(d, stripe, b)
        self._write(self.ndata, stripe, xor_blocks(blocks))

    def sync(self) -> None:
        """Flush: every block written so far is on the media (fdatasync of every disk, unless
        ``fsync=0``; the simulated write cache is emptied either way)."""
        with self.io_lock:
            if self.dead is not None:
                raise PowerCut(str(self.dead))
            if self.fsync_enabled:
                for fd in self.fds:
                    if fd is not None:
                        os.fdatasync(fd)
            self.unflushed.clear()
            self.flushed_size.clear()

    def power_cut(self, rng: random.Random | None = None) -> dict[str, int]:
        """Cut the power: no block reaches a disk after this, and the writes not yet flushed are
        lost: all of them, or with ``rng`` each one lost, kept or torn (its first k sectors new,
        the rest as flushed) at random.  Returns how many blocks met each fate.  Idempotent."""
        fates = {"lost": 0, "kept": 0, "torn": 0}
        with self.io_lock:
            if self.dead is None:
                self.dead = PowerCut(f"the power of {self.path} was cut: writes not yet flushed were lost")
            by_disk: dict[int, list[tuple[int, bytes | None]]] = {}
            for (disk, stripe), old in self.unflushed.items():
                by_disk.setdefault(disk, []).append((stripe, old))
            for disk, blocks in sorted(by_disk.items()):
                if disk == self.failed or not os.path.exists(self.disk_path(disk)):
                    continue  # a disk failed since: its image is set aside, never read again
                fd = os.open(self.disk_path(disk), os.O_RDWR)
                try:
                    final = []
                    for stripe, old in sorted(blocks):
                        fate = "lost" if rng is None else rng.choice(("lost", "kept", "torn"))
                        fates[fate] += 1
                        if fate == "lost":
                            final.append((stripe, old))
                            continue
                        new = os.pread(fd, BS, stripe * BS).ljust(BS, b"\0")
                        if fate == "torn":
                            assert rng is not None
                            cut = rng.randrange(1, BS // SECTOR) * SECTOR
                            new = new[:cut] + (old or ZERO)[cut:]
                        final.append((stripe, new))
                    os.ftruncate(fd, self.flushed_size[disk])  # blocks past the flushed end become holes again
                    for stripe, blk in final:
                        if blk is not None:
                            os.pwrite(fd, blk, stripe * BS)
                    if self.fsync_enabled:
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
            self.unflushed.clear()
            self.flushed_size.clear()
        return fates

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
        self.sync()  # rebuilt from what is on the media, so a power cut cannot tear the two apart
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
