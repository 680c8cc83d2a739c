"""ctypes bindings to the few libc calls sharedobj needs.

Why ctypes and not sysv_ipc for segments: sysv_ipc 1.2.0 memsets every segment
it creates with ``IPC_CREX`` (1.5 s per GiB, every page made resident), cannot
pass ``SHM_NORESERVE`` or ``SHM_REMAP``, and turns every errno into an exception
that no longer says which limit was hit.  Calling libc directly keeps errno, so
the error layer can name the limit.

Everything here is loaded lazily: importing sharedobj on a platform without
these symbols works, and only the first real use raises
:class:`~sharedobj.errors.UnsupportedPlatformError`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from functools import cache
from typing import Any

# sys/ipc.h and sys/shm.h (identical on every Linux architecture).
IPC_PRIVATE = 0
IPC_CREAT = 0o1000
IPC_EXCL = 0o2000
IPC_RMID = 0
IPC_STAT = 2
SHM_HUGETLB = 0o4000
SHM_NORESERVE = 0o10000
SHM_RDONLY = 0o10000
SHM_REMAP = 0o40000

# sys/mman.h
PROT_NONE = 0
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_REMOVE = 9
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

# struct shmid_ds, generic Linux layout (x86-64, aarch64, riscv64, ...):
# checked against offsetof() with glibc 2.36 on x86-64.
SHMID_DS_SIZE = 256  # generous: the real struct is 112 bytes
SHMID_DS_UID = 4
SHMID_DS_CUID = 12
SHMID_DS_MODE = 20
SHMID_DS_SEGSZ = 48
SHMID_DS_ATIME = 56
SHMID_DS_DTIME = 64
SHMID_DS_CTIME = 72
SHMID_DS_CPID = 80
SHMID_DS_LPID = 84
SHMID_DS_NATTCH = 88

# futex(2)
FUTEX_WAIT = 0
FUTEX_WAKE = 1
SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "ppc64le": 221, "s390x": 238}

# sizeof(pthread_mutex_t) per architecture (glibc and musl agree on these).
PTHREAD_MUTEX_SIZE = {"x86_64": 40, "aarch64": 48, "riscv64": 40, "ppc64le": 40, "s390x": 40}
CLOCK_MONOTONIC = 1


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def machine() -> str:
    return platform.machine().lower()


def supported() -> str | None:
    """Return None when this platform can run sharedobj, else the reason it cannot."""
    if not sys.platform.startswith("linux"):
        return (
            f"sharedobj needs Linux (System V shared memory with SHM_REMAP); this is {sys.platform}"
        )
    if machine() not in SYS_FUTEX:
        return f"sharedobj has no futex/pthread layout for the {machine()} architecture"
    return None


@cache
def libc() -> Any:
    """The C library, with argument and return types declared for every call we use."""
    reason = supported()
    if reason is not None:
        from .errors import UnsupportedPlatformError

        raise UnsupportedPlatformError(reason)
    lib = ctypes.CDLL(None, use_errno=True)
    c_int, c_void_p, c_size_t, c_long = (
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_long,
    )
    sigs: dict[str, tuple[list[Any], Any]] = {
        "shmget": ([c_int, c_size_t, c_int], c_int),
        "shmat": ([c_int, c_void_p, c_int], c_void_p),
        "shmdt": ([c_void_p], c_int),
        "shmctl": ([c_int, c_int, c_void_p], c_int),
        "mmap": ([c_void_p, c_size_t, c_int, c_int, c_int, ctypes.c_long], c_void_p),
        "munmap": ([c_void_p, c_size_t], c_int),
        "madvise": ([c_void_p, c_size_t, c_int], c_int),
        "syscall": ([c_long, c_void_p, c_int, c_int, c_void_p, c_void_p, c_int], c_long),
        "pthread_mutexattr_init": ([c_void_p], c_int),
        "pthread_mutexattr_destroy": ([c_void_p], c_int),
        "pthread_mutexattr_setpshared": ([c_void_p, c_int], c_int),
        "pthread_mutexattr_setrobust": ([c_void_p, c_int], c_int),
        "pthread_mutexattr_settype": ([c_void_p, c_int], c_int),
        "pthread_mutex_init": ([c_void_p, c_void_p], c_int),
        "pthread_mutex_lock": ([c_void_p], c_int),
        "pthread_mutex_trylock": ([c_void_p], c_int),
        "pthread_mutex_unlock": ([c_void_p], c_int),
        "pthread_mutex_consistent": ([c_void_p], c_int),
        "pthread_mutex_timedlock": ([c_void_p, c_void_p], c_int),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    if hasattr(lib, "pthread_mutex_clocklock"):
        lib.pthread_mutex_clocklock.argtypes = [c_void_p, c_int, c_void_p]
        lib.pthread_mutex_clocklock.restype = c_int
    return lib


def has_clocklock() -> bool:
    """glibc >= 2.30 can wait on CLOCK_MONOTONIC, immune to wall-clock jumps."""
    return hasattr(libc(), "pthread_mutex_clocklock")


def get_errno() -> int:
    return ctypes.get_errno()


def oserror(err: int, what: str) -> OSError:
    """A plain OSError for errnos that have no better translation."""
    return OSError(err, f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")
