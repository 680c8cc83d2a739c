"""Kernel limits and current usage of System V IPC, read from /proc.

The limits are per IPC namespace, and so is /proc/sysvipc: reading both from
the calling process gives the numbers that apply to it, also inside
``unshare --ipc``.  sysv_ipc and shmget(2) report ENOSPC alike for SHMMNI and
SHMALL exhaustion; comparing the usage below with the limits tells them apart.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

PAGE_SIZE = mmap.PAGESIZE
_PROC = "/proc/sys/kernel"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def shmmax() -> int | None:
    """Just SHMMAX: what every create() needs, without reading the other limits."""
    return _read_int(f"{_PROC}/shmmax")


@dataclass(frozen=True)
class Limits:
    """The SysV limits of this IPC namespace (None where /proc does not say)."""

    shmmax: int | None  # bytes per segment
    shmall: int | None  # pages in all segments together
    shmmni: int | None  # number of segments
    semmsl: int | None  # semaphores per set
    semmns: int | None  # semaphores in all sets
    semopm: int | None  # operations per semop call
    semmni: int | None  # number of semaphore sets
    shm_rmid_forced: int | None
    page_size: int
    hugepage_size: int | None
    hugepages_total: int | None
    hugepages_free: int | None
    thp_shmem: str | None  # /sys/kernel/mm/transparent_hugepage/shmem_enabled


def read_limits() -> Limits:
    sem: list[int | None] = [None, None, None, None]
    try:
        with open(f"{_PROC}/sem") as f:
            values: list[int | None] = [int(x) for x in f.read().split()[:4]]
            sem[: len(values)] = values
    except (OSError, ValueError):
        pass
    meminfo: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    meminfo[key] = int(parts[0])
    except (OSError, ValueError):
        pass
    thp: str | None = None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            text = f.read()
        thp = next((w.strip("[]") for w in text.split() if w.startswith("[")), text.strip())
    except OSError:
        pass
    huge_kb = meminfo.get("Hugepagesize")
    return Limits(
        shmmax=_read_int(f"{_PROC}/shmmax"),
        shmall=_read_int(f"{_PROC}/shmall"),
        shmmni=_read_int(f"{_PROC}/shmmni"),
        semmsl=sem[0],
        semmns=sem[1],
        semopm=sem[2],
        semmni=sem[3],
        shm_rmid_forced=_read_int(f"{_PROC}/shm_rmid_forced"),
        page_size=PAGE_SIZE,
        hugepage_size=huge_kb * 1024 if huge_kb is not None else None,
        hugepages_total=meminfo.get("HugePages_Total"),
        hugepages_free=meminfo.get("HugePages_Free"),
        thp_shmem=thp,
    )


@dataclass(frozen=True)
class SegmentInfo:
    """One line of /proc/sysvipc/shm."""

    key: int
    shmid: int
    mode: int
    size: int
    cpid: int
    lpid: int
    nattch: int
    uid: int
    gid: int
    cuid: int
    cgid: int
    atime: int
    dtime: int
    ctime: int
    rss: int | None
    swap: int | None

    @property
    def marked_for_removal(self) -> bool:
        return bool(self.mode & 0o1000)  # SHM_DEST


def list_segments() -> list[SegmentInfo]:
    """Every segment of this IPC namespace that /proc/sysvipc/shm shows."""
    out: list[SegmentInfo] = []
    try:
        with open("/proc/sysvipc/shm") as f:
            header = f.readline().split()
            for line in f:
                row = dict(zip(header, line.split(), strict=False))
                out.append(
                    SegmentInfo(
                        key=int(row["key"]),
                        shmid=int(row["shmid"]),
                        mode=int(row["perms"], 8) if "perms" in row else 0,
                        size=int(row["size"]),
                        cpid=int(row["cpid"]),
                        lpid=int(row["lpid"]),
                        nattch=int(row["nattch"]),
                        uid=int(row["uid"]),
                        gid=int(row["gid"]),
                        cuid=int(row["cuid"]),
                        cgid=int(row["cgid"]),
                        atime=int(row["atime"]),
                        dtime=int(row["dtime"]),
                        ctime=int(row["ctime"]),
                        rss=int(row["rss"]) if "rss" in row else None,
                        swap=int(row["swap"]) if "swap" in row else None,
                    )
                )
    except OSError:
        pass
    return out


def segment_info(shmid: int) -> SegmentInfo | None:
    for seg in list_segments():
        if seg.shmid == shmid:
            return seg
    return None


def semaphore_set_count() -> int:
    try:
        with open("/proc/sysvipc/sem") as f:
            return max(0, sum(1 for _ in f) - 1)
    except OSError:
        return 0


def shm_pages_in_use() -> int:
    return sum(-(-seg.size // PAGE_SIZE) for seg in list_segments())


def can_unshare_ipc() -> bool:
    """Root can enter a private IPC namespace and set its own SHMMAX there."""
    return os.geteuid() == 0 and os.path.exists("/proc/self/ns/ipc")
