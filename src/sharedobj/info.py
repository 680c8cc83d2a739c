"""What this machine offers sharedobj: kernel limits and the implementations chosen.

Collected in one place so that ``python -m sharedobj info`` and bug reports show
the numbers that decide behaviour (SHMMAX decides when a request becomes a span,
SHMMNI/SHMALL when creation fails, huge pages how fast a first read is).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from dataclasses import asdict
from typing import Any

from . import _libc, limits


def _probe_populate_read() -> bool:
    """Does madvise(MADV_POPULATE_READ) (Linux 5.14+) work here?"""
    try:
        lib = _libc.libc()
    except OSError:
        return False
    size = limits.PAGE_SIZE
    addr = lib.mmap(None, size, 3, _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS, -1, 0)
    if addr is None or addr == _libc.MAP_FAILED:
        return False
    try:
        return bool(lib.madvise(addr, size, _libc.MADV_POPULATE_READ) == 0)
    finally:
        lib.munmap(addr, size)


def collect() -> dict[str, Any]:
    lim = limits.read_limits()
    segs = limits.list_segments()
    reason = _libc.supported()
    doc: dict[str, Any] = {
        "platform": {
            "system": platform.system(),
            "machine": platform.machine(),
            "kernel": platform.release(),
            "python": sys.version.split()[0],
            "libc": os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None,
            "supported": reason is None,
            "unsupported_reason": reason,
        },
        "limits": asdict(lim),
        "usage": {
            "segments": len(segs),
            "shm_pages": sum(-(-s.size // lim.page_size) for s in segs),
            "semaphore_sets": limits.semaphore_set_count(),
        },
        "implementation": {},
    }
    if lim.shmall is not None:
        doc["limits"]["shmall_bytes"] = lim.shmall * lim.page_size
    try:
        import sysv_ipc

        doc["sysv_ipc"] = {
            "version": sysv_ipc.VERSION,
            "semaphore_timeout_supported": bool(sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED),
        }
    except ImportError:  # pragma: no cover - a dependency
        doc["sysv_ipc"] = None
    if reason is None:
        from . import sync

        impl = doc["implementation"]
        impl["segments"] = "shmget/shmat through ctypes (no memset, SHM_NORESERVE available)"
        impl["spans"] = "mmap(PROT_NONE) reservation + shmat(SHM_REMAP) at adjacent addresses"
        impl.update(sync.implementation())
        from .arrays import first_touch_method

        impl["first_touch"] = first_touch_method()
        from .copying import PARALLEL_MIN, copy_threads

        try:
            threads = f"{copy_threads()} threads"
        except ValueError as exc:
            threads = f"one thread ({exc})"
        impl["copy_in"] = (
            f"arrays of {PARALLEL_MIN >> 20} MiB or more copied into shared memory by {threads} "
            "(SHAREDOBJ_COPY_THREADS)"
        )
        from .allocator.core import DIRTY_MAX, DISCARD_MIN

        impl["freed_pages"] = (
            f"freed runs under {DISCARD_MIN >> 20} MiB stay resident; bigger ones too, up to "
            f"{DIRTY_MAX >> 20} MiB per arena by default (Heap.create(dirty_max=...)), "
            "then madvise(MADV_REMOVE)"
        )
        impl["huge_pages"] = (
            f"{lim.hugepages_free} of {lim.hugepages_total} reserved huge pages free (SHM_HUGETLB: pass hugetlb=True)"
            if lim.hugepages_total
            else f"none reserved (vm.nr_hugepages = 0); transparent huge pages for shmem: {lim.thp_shmem}"
        )
        impl["pointer_size"] = ctypes.sizeof(ctypes.c_void_p)
    return doc


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    if n >= 1 << 60:
        return f"{n} (unlimited)"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n} ({n / size:.4g} {unit})"
    return str(n)


def render(doc: dict[str, Any]) -> str:
    p, lim, use, impl = doc["platform"], doc["limits"], doc["usage"], doc["implementation"]
    lines = [
        f"sharedobj on {p['system']} {p['kernel']} {p['machine']}, Python {p['python']}, {p['libc']}",
    ]
    if not p["supported"]:
        lines.append(f"  NOT SUPPORTED: {p['unsupported_reason']}")
    lines += [
        "",
        "Kernel limits (this IPC namespace):",
        f"  SHMMAX   bytes per segment      {_human(lim['shmmax'])}",
        f"  SHMALL   pages in all segments  {_human(lim['shmall'])} pages"
        + (f" = {_human(lim.get('shmall_bytes'))} bytes" if lim.get("shmall_bytes") else ""),
        f"  SHMMNI   segments               {lim['shmmni']}",
        f"  SEMMNI   semaphore sets         {lim['semmni']}   (SEMMSL {lim['semmsl']}, SEMMNS {lim['semmns']}, SEMOPM {lim['semopm']})",
        f"  page size                       {lim['page_size']}",
        f"  huge pages                      {lim['hugepages_total']} reserved, {lim['hugepages_free']} free, "
        f"{_human(lim['hugepage_size'])} each; THP for shmem: {lim['thp_shmem']}",
        f"  shm_rmid_forced                 {lim['shm_rmid_forced']}",
        "",
        f"In use: {use['segments']} segments ({use['shm_pages']} pages), {use['semaphore_sets']} semaphore sets",
    ]
    if impl:
        lines += ["", "Implementation in use:"]
        for k, v in impl.items():
            lines.append(f"  {k:<12} {v}")
    sv = doc.get("sysv_ipc")
    if sv:
        lines += [
            "",
            f"sysv_ipc {sv['version']}: semtimedop {'available' if sv['semaphore_timeout_supported'] else 'missing'}"
            + (
                ""
                if sv["semaphore_timeout_supported"]
                else " (its timed waits block forever; sharedobj does not use them)"
            ),
        ]
    return "\n".join(lines)
