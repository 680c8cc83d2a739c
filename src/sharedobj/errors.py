"""Exceptions of sharedobj, and the translation of System V errnos into them.

The kernel answers a failed shmget/shmat with one errno for several causes
(ENOSPC for both SHMMNI and SHMALL, EINVAL for both "over SHMMAX" and "no such
id").  A user can only act on the cause, so every message here names the limit,
its current value, and the sysctl that raises it.
"""

from __future__ import annotations

import errno as _errno
import os

from . import limits as _limits


class SharedObjError(Exception):
    """Base class of the errors that only sharedobj raises."""


class UnsupportedPlatformError(SharedObjError, OSError):
    """sharedobj needs Linux; importing works elsewhere, creating anything does not."""


class IPCLimitError(SharedObjError, OSError):
    """A system-wide System V limit (SHMMNI, SHMALL, SEMMNI, ...) is exhausted."""

    def __init__(self, err: int, message: str, *, limit: str, value: int | None, sysctl: str):
        super().__init__(err, message)
        self.limit = limit
        self.value = value
        self.sysctl = sysctl


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n} bytes ({n / size:.1f} {unit})"
    return f"{n} bytes"


def shmget_error(err: int, size: int, *, hugetlb: bool = False) -> Exception:
    """Translate a failed shmget(IPC_CREAT) of ``size`` bytes."""
    lim = _limits.read_limits()
    if err == _errno.EINVAL:
        if lim.shmmax is not None and size > lim.shmmax:
            return ValueError(
                f"a segment of {_fmt_bytes(size)} exceeds SHMMAX, the per-segment limit "
                f"(kernel.shmmax = {_fmt_bytes(lim.shmmax)}); let sharedobj split it across "
                f"segments (split=True) or raise the limit with "
                f"`sysctl -w kernel.shmmax={size}`"
            )
        if hugetlb and lim.hugepage_size and size % lim.hugepage_size:
            return ValueError(
                f"a huge-page segment must be a multiple of the huge page size "
                f"({_fmt_bytes(lim.hugepage_size)}); asked for {_fmt_bytes(size)}"
            )
        return ValueError(f"the kernel refused a segment of {_fmt_bytes(size)} (EINVAL)")
    if err == _errno.ENOSPC:
        segs = _limits.list_segments()
        if lim.shmmni is not None and len(segs) >= lim.shmmni:
            return IPCLimitError(
                err,
                f"cannot create a segment: all {lim.shmmni} System V segment ids are in use "
                f"(SHMMNI, kernel.shmmni = {lim.shmmni}); remove unused segments "
                f"(`python -m sharedobj clean`, `ipcs -m`) or raise the limit with "
                f"`sysctl -w kernel.shmmni={lim.shmmni * 2}`",
                limit="SHMMNI",
                value=lim.shmmni,
                sysctl="kernel.shmmni",
            )
        used = sum(-(-s.size // lim.page_size) for s in segs)
        want = -(-size // lim.page_size)
        shmall = lim.shmall
        return IPCLimitError(
            err,
            f"cannot create a segment of {_fmt_bytes(size)} ({want} pages): the system-wide "
            f"shared memory limit SHMALL is exhausted (kernel.shmall = {shmall} pages of "
            f"{lim.page_size} bytes, {used} pages in use); free segments or raise it with "
            f"`sysctl -w kernel.shmall={(used + want) * 2}`",
            limit="SHMALL",
            value=shmall,
            sysctl="kernel.shmall",
        )
    if err == _errno.ENOMEM:
        return MemoryError(
            f"the kernel has no memory for a segment of {_fmt_bytes(size)} (ENOMEM); "
            f"pass noreserve=True to reserve no swap for it"
        )
    if err in (_errno.EPERM, _errno.EACCES):
        what = "huge-page segments need CAP_IPC_LOCK" if hugetlb else "shmget was refused"
        return PermissionError(err, f"{what}: {os.strerror(err)}")
    return OSError(err, f"shmget of {_fmt_bytes(size)} failed: {os.strerror(err)}")


def shmat_error(err: int, shmid: int) -> Exception:
    """Translate a failed shmat(shmid)."""
    if err in (_errno.EINVAL, _errno.EIDRM):
        return FileNotFoundError(
            _errno.ENOENT,
            f"no System V segment with shmid {shmid} (removed, or never existed in this IPC namespace)",
        )
    if err == _errno.EACCES:
        return PermissionError(err, f"no permission to attach segment shmid {shmid}")
    if err == _errno.ENOMEM:
        return MemoryError(f"no address space left to attach segment shmid {shmid} (ENOMEM)")
    return OSError(err, f"shmat of shmid {shmid} failed: {os.strerror(err)}")


def shmctl_error(err: int, shmid: int, what: str) -> Exception:
    if err in (_errno.EINVAL, _errno.EIDRM):
        return FileNotFoundError(_errno.ENOENT, f"cannot {what} shmid {shmid}: no such segment")
    if err in (_errno.EPERM, _errno.EACCES):
        return PermissionError(err, f"cannot {what} shmid {shmid}: not its owner")
    return OSError(err, f"cannot {what} shmid {shmid}: {os.strerror(err)}")


class CorruptHeapError(SharedObjError, RuntimeError):
    """Heap metadata is damaged beyond what the undo log can repair (a buggy writer)."""


class StaleHandleError(SharedObjError, LookupError):
    """A block handle whose block was freed (and maybe reused): its generation no longer matches."""
