#!/usr/bin/env python3
"""Real file systems for tests and demos: a btrfs loop file system and a zfs-fuse pool.

    python tools/realfs.py up [--no-zfs] [--no-btrfs] [--json]
    python tools/realfs.py down
    python tools/realfs.py status [--json]

Everything lives under ``$COALESCE_REALFS_DIR`` (default
``/var/tmp/coalesce-realfs``):

* ``btrfs.img`` (1 GiB sparse) on a loop device, mounted at ``btrfs/``;
* ``btrfs-small.img`` (256 MiB, mixed block groups) mounted at ``btrfs-small/``,
  for ENOSPC tests;
* ``zfs.img`` (1 GiB sparse), the file vdev of pool ``$COALESCE_REALFS_POOL``
  (default ``coalescert``), mounted at ``zfs/``;
* ``zfs-fuse.pid`` when this tool started the zfs-fuse daemon (none was
  running): ``down`` stops exactly that PID and no other process.

Missing tools are installed with apt-get (``apt-get update`` first), only
when missing.  ``down`` is safe to run twice and after a partial ``up``.
Needs root.  Importable: :func:`up`, :func:`down`, :func:`status`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

STATE = os.environ.get("COALESCE_REALFS_DIR", "/var/tmp/coalesce-realfs")
POOL = os.environ.get("COALESCE_REALFS_POOL", "coalescert")
BTRFS_SIZE = 1 << 30
SMALL_SIZE = 256 << 20
ZFS_SIZE = 1 << 30
ZFS_PREALLOCATE = False  # allocate the vdev file's blocks up front (benchmarks), else a sparse file
TOOLS = {
    "mkfs.btrfs": "btrfs-progs",
    "btrfs": "btrfs-progs",
    "zfs-fuse": "zfs-fuse",
    "zpool": "zfs-fuse",
    "zfs": "zfs-fuse",
    "setfattr": "attr",
    "losetup": "mount",
}
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RealFSError(RuntimeError):
    pass


def _p(*parts: str) -> str:
    return os.path.join(STATE, *parts)


def _run(argv: list[str], *, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":" + SBIN_PATH)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise RealFSError(
            f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def ensure_tools(btrfs: bool = True, zfs: bool = True) -> list[str]:
    """apt-get install the packages of missing tools; returns what was installed."""
    want = [t for t in TOOLS if (btrfs or TOOLS[t] != "btrfs-progs") and (zfs or TOOLS[t] != "zfs-fuse")]
    missing = sorted({TOOLS[t] for t in want if _which(t) is None})
    if not missing:
        return []
    if os.geteuid() != 0:
        raise RealFSError(
            f"missing packages {missing} and not root: install them (apt-get install {' '.join(missing)})"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        check=True,
        env=env,
        capture_output=True,
        timeout=900,
    )
    return missing


def _mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1 and parts[1].replace("\\040", " ") == path:
                return True
    return False


def _loops_of(img: str) -> list[str]:
    if not os.path.exists(img):
        return []
    out = _run(["losetup", "-j", img], check=False).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# btrfs
# ---------------------------------------------------------------------------
def btrfs_up(name: str = "btrfs", size: int = BTRFS_SIZE, mixed: bool = False) -> str:
    img, mnt = _p(f"{name}.img"), _p(name)
    os.makedirs(mnt, exist_ok=True)
    if _mounted(mnt):
        return mnt
    fresh = not os.path.exists(img)
    if fresh:
        with open(img, "wb") as f:
            f.truncate(size)
    loops = _loops_of(img)
    loop = loops[0] if loops else _run(["losetup", "-f", "--show", img]).stdout.strip()
    if fresh or _run(["blkid", "-o", "value", "-s", "TYPE", loop], check=False).stdout.strip() != "btrfs":
        argv = ["mkfs.btrfs", "-q", "-f"] + (["-M"] if mixed else []) + [loop]
        _run(argv)
    _run(["mount", "-t", "btrfs", loop, mnt])
    return mnt


def btrfs_down(name: str = "btrfs") -> None:
    img, mnt = _p(f"{name}.img"), _p(name)
    if os.path.isdir(mnt) and _mounted(mnt):
        if _run(["umount", mnt], check=False).returncode != 0:
            _run(["umount", "-l", mnt], check=False)
    for loop in _loops_of(img):
        _run(["losetup", "-d", loop], check=False)
    for p in (img,):
        if os.path.exists(p):
            os.unlink(p)
    if os.path.isdir(mnt) and not _mounted(mnt):
        try:
            os.rmdir(mnt)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# zfs-fuse
# ---------------------------------------------------------------------------
def _zfs_fuse_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == "zfs-fuse":
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def _zfs_ready() -> bool:
    try:
        return _run(["zpool", "list", "-H"], check=False, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


ZFS_LOCK = "/var/lock/zfs/zfs_lock"
ZFS_LOCK_WAIT = float(os.environ.get("COALESCE_ZFS_LOCK_WAIT", "180"))


def _zfs_lock_held() -> bool:
    """True when a zfs-fuse daemon holds its lock file (possibly one in another PID namespace)."""
    import fcntl

    try:
        fd = os.open(ZFS_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _wait_for_zfs_lock() -> None:
    # zfs-fuse exits 1 without a word when another daemon holds its lock; a daemon we cannot see
    # (another PID namespace sharing /var/lock) is waited for, then named in the error.
    deadline = time.time() + ZFS_LOCK_WAIT
    while _zfs_lock_held():
        if time.time() >= deadline:
            raise RealFSError(
                f"another zfs-fuse daemon holds {ZFS_LOCK} (not visible in /proc: another PID "
                f"namespace?); stop it, or wait for it, then run again"
            )
        time.sleep(1)


def zfs_daemon_up() -> int | None:
    """Start zfs-fuse when none runs; returns the PID we started (recorded) or None."""
    if _zfs_fuse_pids():
        deadline = time.time() + 20
        while not _zfs_ready() and time.time() < deadline:
            time.sleep(0.3)
        return None
    os.makedirs(STATE, exist_ok=True)
    pidfile = _p("zfs-fuse.pid")
    _wait_for_zfs_lock()
    _run(["zfs-fuse", "--pidfile", pidfile, "--no-kstat-mount", "--enable-xattr"])
    deadline = time.time() + 30
    while time.time() < deadline:
        if os.path.exists(pidfile) and _zfs_ready():
            break
        time.sleep(0.3)
    else:
        raise RealFSError(
            "zfs-fuse started but `zpool list` does not answer within 30s (is /dev/fuse usable? see syslog)"
        )
    with open(pidfile) as f:
        return int(f.read().strip())


def zfs_daemon_down() -> bool:
    """Stop the daemon this tool started (by its recorded PID only)."""
    pidfile = _p("zfs-fuse.pid")
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return False
    try:
        with open(f"/proc/{pid}/comm") as f:
            ours = f.read().strip() == "zfs-fuse"
    except OSError:
        ours = False
    if ours:
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 30
        while time.time() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.2)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 10
            while time.time() < deadline and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.1)
    os.unlink(pidfile)
    return ours


def zfs_up(pool: str = POOL) -> dict:
    zfs_daemon_up()
    img, mnt = _p("zfs.img"), _p("zfs")
    names = _run(["zpool", "list", "-H", "-o", "name"]).stdout.split()
    if pool in names:
        health = _run(["zpool", "list", "-H", "-o", "health", pool], check=False).stdout.strip()
        if health != "ONLINE" or not os.path.exists(img):
            # a stale pool from the daemon's cache (its file is gone, e.g. after a crash): forget it
            _run(["zpool", "destroy", "-f", pool], check=False, timeout=60)
            if pool in _run(["zpool", "list", "-H", "-o", "name"]).stdout.split():
                _run(["zpool", "export", "-f", pool], check=False, timeout=60)
            names = _run(["zpool", "list", "-H", "-o", "name"]).stdout.split()
    if pool not in names:
        if os.path.exists(img):
            if _run(["zpool", "import", "-d", STATE, pool], check=False).returncode != 0:
                os.unlink(img)
        if pool not in _run(["zpool", "list", "-H", "-o", "name"]).stdout.split():
            with open(img, "wb") as f:
                if ZFS_PREALLOCATE:
                    os.posix_fallocate(f.fileno(), 0, ZFS_SIZE)
                else:
                    f.truncate(ZFS_SIZE)
            os.makedirs(mnt, exist_ok=True)
            _run(["zpool", "create", "-f", "-m", mnt, pool, img])
    mp = _run(["zfs", "get", "-H", "-o", "value", "mountpoint", pool]).stdout.strip()
    return {"pool": pool, "mountpoint": mp, "vdev": img}


def _zfs_mounts_under(prefix: str) -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2].startswith("fuse") and parts[1].startswith(prefix.rstrip("/") + "/"):
                out.append(parts[1])
    return sorted(out, key=len, reverse=True)


def zfs_down(pool: str = POOL) -> None:
    for mp in _zfs_mounts_under(STATE):  # the read-only bind mounts of exports hold their clones
        if "/views/" in mp and "/views/.rw/" not in mp:
            _run(["umount", "-l", mp], check=False)
    if _which("zpool") and _zfs_fuse_pids():
        try:
            if (
                _zfs_ready()
                and pool in _run(["zpool", "list", "-H", "-o", "name"], check=False, timeout=30).stdout.split()
            ):
                if _run(["zpool", "destroy", "-f", pool], check=False, timeout=60).returncode != 0:
                    time.sleep(1)
                    _run(["zpool", "destroy", "-f", pool], check=False, timeout=60)
        except subprocess.TimeoutExpired:
            pass  # a wedged zfs-fuse: stopping our daemon below releases everything
    zfs_daemon_down()
    if not os.path.exists(_p("zfs-fuse.pid")) and not _zfs_fuse_pids():
        for mp in _zfs_mounts_under(STATE):  # FUSE mounts left by a daemon that died
            _run(["umount", "-l", mp], check=False)
    img, mnt = _p("zfs.img"), _p("zfs")
    if os.path.exists(img) and not _zfs_fuse_pids():
        os.unlink(img)
    elif os.path.exists(img):
        # another zfs-fuse (not ours) still runs: the pool is gone, the file is free
        if pool not in _run(["zpool", "list", "-H", "-o", "name"], check=False, timeout=30).stdout.split():
            os.unlink(img)
    if os.path.isdir(mnt) and not _mounted(mnt):
        shutil.rmtree(mnt, ignore_errors=True)
    shutil.rmtree(_p("zfs-state"), ignore_errors=True)


# ---------------------------------------------------------------------------
# all
# ---------------------------------------------------------------------------
def up(btrfs: bool = True, zfs: bool = True, small: bool = True) -> dict:
    if os.geteuid() != 0:
        raise RealFSError("tools/realfs.py needs root (loop devices, mounts, zfs-fuse)")
    ensure_tools(btrfs=btrfs, zfs=zfs)
    os.makedirs(STATE, exist_ok=True)
    info: dict = {"state": STATE}
    if btrfs:
        info["btrfs"] = btrfs_up()
        if small:
            info["btrfs_small"] = btrfs_up("btrfs-small", SMALL_SIZE, mixed=True)
    if zfs:
        info["zfs"] = zfs_up()
    with open(_p("info.json"), "w") as f:
        json.dump(info, f)
    return info


def down() -> None:
    errors = []
    for fn in (lambda: zfs_down(), lambda: btrfs_down("btrfs-small"), lambda: btrfs_down("btrfs")):
        try:
            fn()
        except Exception as exc:  # keep tearing down the rest
            errors.append(str(exc))
    if os.path.isdir(STATE):
        for n in ("info.json",):
            try:
                os.unlink(_p(n))
            except FileNotFoundError:
                pass
        for n in os.listdir(STATE):
            p = _p(n)
            if os.path.isdir(p) and not os.path.islink(p) and not _mounted(p):
                shutil.rmtree(p, ignore_errors=True)
        try:
            os.rmdir(STATE)
        except OSError:
            pass
    if errors:
        raise RealFSError("; ".join(errors))


def status() -> dict:
    st = {
        "state": STATE,
        "btrfs": _mounted(_p("btrfs")),
        "btrfs_small": _mounted(_p("btrfs-small")),
        "zfs_fuse_pids": _zfs_fuse_pids(),
        "zfs_fuse_started_by_us": os.path.exists(_p("zfs-fuse.pid")),
        "pool": None,
    }
    if _which("zpool") and st["zfs_fuse_pids"]:
        names = _run(["zpool", "list", "-H", "-o", "name"], check=False).stdout.split()
        st["pool"] = POOL if POOL in names else None
    return st


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="realfs", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--no-btrfs", action="store_true")
    ap.add_argument("--no-zfs", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.command == "up":
            res = up(btrfs=not a.no_btrfs, zfs=not a.no_zfs)
        elif a.command == "down":
            down()
            res = {"down": True}
        else:
            res = status()
    except (RealFSError, subprocess.CalledProcessError) as exc:
        print(f"realfs {a.command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=None if a.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
