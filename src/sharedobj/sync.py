"""Cross-process locks and waits that live inside shared memory.

Why a robust pthread mutex and not a SysV semaphore (SYSV-NOTES.md): a mutex
placed in the segment is about 2x faster uncontended and an order of magnitude
faster under contention, and when its holder dies the *next acquirer is told*
(``EOWNERDEAD``), which ``SEM_UNDO`` cannot do: it silently releases the lock
and leaves half-modified data behind.  The PyPI wheel of ``sysv_ipc`` also has
no ``semtimedop``, so its timed acquires block forever; here every wait has a
working timeout.

Three rules shape the code:

* **Signals.**  glibc retries a futex wait interrupted by a signal, and
  Python runs its signal handlers only between bytecodes, so one long blocking
  call would make Ctrl-C wait for the lock.  Every blocking wait is therefore
  cut into slices of :data:`WAIT_SLICE` seconds against an *absolute*
  deadline: a slice, a signal or a spurious wake-up never restarts the full
  timeout, and never returns early.
* **Owner death is recovered under the lock.**  ``pthread_mutex_consistent``
  is called at once (an unlock without it would make the mutex permanently
  ``ENOTRECOVERABLE`` for every process), and a flag *in shared memory* says
  "recovery still pending" until a recovery has completed.  If the recoverer
  dies or fails too, the next acquirer sees the flag and recovers again.
* **Ownership lives in the lock word, not in Python.**  glibc records the
  holder's thread id in the mutex itself; nothing per-process is cached, so
  after ``fork`` the child (another thread id) can never believe it holds a
  lock its parent held: its try-acquire fails and its release raises.

Layouts (all little-endian native words, offsets relative to the slot)::

    RobustMutex slot, 64 bytes, offset a multiple of 8 (64 recommended)
      [0, 48)   pthread_mutex_t (40 bytes on x86-64, 48 on aarch64)
      [48, 52)  magic (u32) written last by initialize()
      [52, 56)  needs-recovery flag (u32), shared by every process
      [56, 64)  reserved, zero

    SharedCondition slot, 16 bytes, offset a multiple of 4 (8 recommended)
      [0, 4)    sequence (u32): bumped by every notify; the futex word
      [4, 8)    waiter count (u32): lets notify skip the wake syscall
      [8, 12)   magic (u32)
      [12, 16)  reserved, zero
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from . import _libc

__all__ = [
    "CONDITION_SLOT_SIZE",
    "MUTEX_SLOT_SIZE",
    "WAIT_SLICE",
    "RobustMutex",
    "SharedCondition",
    "implementation",
]

MUTEX_SLOT_SIZE = 64
CONDITION_SLOT_SIZE = 16
#: Longest single blocking call, in seconds: bounds how late Ctrl-C is noticed.
WAIT_SLICE = 0.05

_MUTEX_ALIGN = 8
_COND_ALIGN = 4
_MUTEX_MAGIC = 0x784D_6F53  # b"SoMx" little-endian
_COND_MAGIC = 0x7843_6F53  # b"SoCx"
_MAGIC_AT = 48
_FLAG_AT = 52
_PTHREAD_MUTEX_ERRORCHECK = 2
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_FUTEX_TID_MASK = 0x3FFF_FFFF
_INT_MAX = 2**31 - 1

_T = TypeVar("_T")


def _glibc_version() -> str | None:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return None


# glibc keeps the holder's thread id in the first int of pthread_mutex_t (the
# futex word); other C libraries lay the struct out differently, so the cheap
# holder_tid() diagnostic and the ownership checks built on it are glibc-only.
_IS_GLIBC = (_glibc_version() or "").startswith("glibc")


# PYFUNCTYPE: called with the GIL held.  trylock and unlock never block, so
# releasing and re-taking the GIL around them (what CFUNCTYPE does) is pure
# cost: ~0.12 us of a ~0.5 us pair.
_FAST_PROTO = ctypes.PYFUNCTYPE(ctypes.c_int)


def _fast(fn: Any) -> Any:
    """A lean alias of a declared libc function, for the uncontended hot path.

    With declared argtypes ctypes calls ``c_void_p.from_param`` per argument,
    and with ``use_errno`` it swaps errno around every call; the pthread calls
    return their error number and we pass a ready c_void_p, so neither is
    needed.  Together that is ~0.1 us of a ~0.5 us acquire+release pair.
    """
    address = ctypes.cast(fn, ctypes.c_void_p).value
    if address is None:  # pragma: no cover - a resolved symbol is never NULL
        raise _libc.oserror(errno.ENOSYS, "resolving a libc function")
    return _FAST_PROTO(address)


def _as_bytes_view(buf: object, what: str) -> memoryview:
    if isinstance(buf, (str, int, float)) or buf is None:
        raise TypeError(
            f"{what} needs a writable buffer (e.g. Segment.buf), not {type(buf).__name__}"
        )
    try:
        mv = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{what} needs a writable buffer (e.g. Segment.buf), not {type(buf).__name__}"
        ) from None
    if mv.readonly:
        raise TypeError(f"{what} needs a writable buffer; this {type(buf).__name__} is read-only")
    if not mv.c_contiguous:
        raise ValueError(f"{what} needs a contiguous buffer")
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def _check_offset(mv: memoryview, offset: object, size: int, align: int, what: str) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"{what} offset must be an int, not {type(offset).__name__}")
    if offset < 0 or offset + size > mv.nbytes:
        raise ValueError(
            f"{what} slot [{offset}, {offset + size}) does not fit in a buffer of {mv.nbytes} bytes"
        )
    if offset % align:
        raise ValueError(f"{what} offset {offset} is not a multiple of {align}")
    return offset


def _timespec(t: float) -> _libc.Timespec:
    sec = int(t)
    nsec = min(int((t - sec) * 1e9), 999_999_999)
    return _libc.Timespec(sec, nsec)


def _check_timeout(blocking: bool, timeout: object) -> float | None:
    """Validate like threading.Lock.acquire; return the timeout in seconds, None = forever."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
    if timeout == -1:
        return None
    if not blocking:
        raise ValueError("can't specify a timeout for a non-blocking call")
    if timeout < 0:
        raise ValueError(f"timeout value must be a non-negative number (or -1), got {timeout}")
    if timeout != timeout:
        raise ValueError("timeout must not be NaN")
    return float(timeout)


class RobustMutex:
    """A process-shared robust mutex in a 64-byte slot of shared memory.

    ``acquire``/``release``/``with`` behave like :class:`threading.Lock`, except
    that ownership belongs to the acquiring *thread* (a pthread mutex cannot be
    released by anyone else: that raises :class:`RuntimeError`), and that an
    untimed blocking acquire by the thread that already holds it raises
    RuntimeError instead of deadlocking forever.

    **Owner death.**  If a holder dies inside the critical section, the shared
    data may be half-modified.  The next acquirer gets the lock and is told:

    * with ``on_owner_dead=callback``, the callback is called with this mutex,
      while the lock is held, before ``acquire`` returns.  Only when it returns
      normally is the shared "needs recovery" flag cleared.  If it raises, the
      lock is *released* (so a ``with`` block, whose ``__exit__`` would not
      run, cannot leave it held forever) and the exception propagates; the
      flag stays set, so the next acquirer, in any process, runs the callback
      again.  The same happens if the recoverer dies.
    * without a callback, ``acquire`` returns True and sets ``owner_died``;
      the caller repairs the data and calls :meth:`mark_recovered`.  Releasing
      without it leaves the flag set, and the next acquirer is told again.

    ``owner_died`` describes the latest acquire made through this object (True
    when it found a dead owner or a pending recovery); read it right after
    acquiring, before another thread sharing the object acquires.

    **Keep the memory mapped while holding it.**  glibc links a held robust
    mutex into its thread's robust list and writes through that list on the
    thread's next lock, unlock or exit; a segment unmapped under a held mutex
    turns those writes into a crash or into corruption of whatever is mapped
    there next.  This object's own reference keeps the mapping, so do not drop
    it while held.  (A finaliser cannot check it for you: in a garbage cycle
    the mapping may already be gone when it runs.)  sharedobj's containers keep
    their held locks referenced.
    """

    __slots__ = (
        "_clocklock",
        "_cobj",
        "_consistent",
        "_flag",
        "_lib",
        "_mv",
        "_ptr",
        "_timedlock",
        "_trylock",
        "_unlock",
        "_word",
        "offset",
        "on_owner_dead",
        "owner_died",
    )

    def __init__(
        self,
        buf: memoryview | bytearray,
        offset: int,
        *,
        on_owner_dead: Callable[[RobustMutex], object] | None = None,
    ) -> None:
        mv = _as_bytes_view(buf, "RobustMutex")
        _check_offset(mv, offset, MUTEX_SLOT_SIZE, _MUTEX_ALIGN, "RobustMutex")
        if on_owner_dead is not None and not callable(on_owner_dead):
            raise TypeError(f"on_owner_dead must be callable, not {type(on_owner_dead).__name__}")
        magic = int.from_bytes(mv[offset + _MAGIC_AT : offset + _MAGIC_AT + 4], sys.byteorder)
        if magic != _MUTEX_MAGIC:
            raise ValueError(
                f"no initialised RobustMutex at offset {offset} (magic {magic:#010x}, expected "
                f"{_MUTEX_MAGIC:#010x}); call RobustMutex.initialize(buf, {offset}) once first"
            )
        self._setup(mv, offset, on_owner_dead)

    def _setup(
        self, mv: memoryview, offset: int, on_owner_dead: Callable[[RobustMutex], object] | None
    ) -> None:
        lib = _libc.libc()
        self._lib = lib
        self._mv = mv
        self.offset = offset
        self.on_owner_dead = on_owner_dead
        self.owner_died = False
        # from_buffer holds an export on the memoryview, which holds the
        # segment's mapping: the address below stays valid while we exist.
        self._cobj = ctypes.c_char.from_buffer(mv, offset)
        self._ptr = ctypes.c_void_p(ctypes.addressof(self._cobj))
        self._trylock = _fast(lib.pthread_mutex_trylock)
        self._unlock = _fast(lib.pthread_mutex_unlock)
        self._consistent = lib.pthread_mutex_consistent
        self._clocklock = getattr(lib, "pthread_mutex_clocklock", None)
        self._timedlock = lib.pthread_mutex_timedlock
        self._flag = mv[offset + _FLAG_AT : offset + _FLAG_AT + 4].cast("I")
        self._word = mv[offset : offset + 4].cast("i")

    @classmethod
    def initialize(
        cls,
        buf: memoryview | bytearray,
        offset: int,
        *,
        on_owner_dead: Callable[[RobustMutex], object] | None = None,
    ) -> RobustMutex:
        """Make a fresh unlocked mutex in the slot and return a handle on it.

        Call it once, before any other process can use the slot: initialising
        a mutex that someone holds or waits on is undefined behaviour in
        POSIX.  The magic is written last, so a process that attaches while
        this runs (or after it crashed half-way) gets a clear ValueError.
        """
        mv = _as_bytes_view(buf, "RobustMutex")
        _check_offset(mv, offset, MUTEX_SLOT_SIZE, _MUTEX_ALIGN, "RobustMutex")
        msize = _libc.PTHREAD_MUTEX_SIZE.get(_libc.machine(), 48)
        if msize > _MAGIC_AT:
            raise _libc.oserror(errno.ENOSYS, f"pthread_mutex_t of {msize} bytes does not fit")
        lib = _libc.libc()
        mv[offset : offset + MUTEX_SLOT_SIZE] = bytes(MUTEX_SLOT_SIZE)
        attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t is 4-8 bytes
        _call(lib.pthread_mutexattr_init, "pthread_mutexattr_init", attr)
        try:
            _call(
                lib.pthread_mutexattr_setpshared,
                "pthread_mutexattr_setpshared",
                attr,
                _PTHREAD_PROCESS_SHARED,
            )
            _call(
                lib.pthread_mutexattr_setrobust,
                "pthread_mutexattr_setrobust",
                attr,
                _PTHREAD_MUTEX_ROBUST,
            )
            # ERRORCHECK: a relock by the holding thread returns EDEADLK instead
            # of hanging, so we can raise a clear error.
            _call(
                lib.pthread_mutexattr_settype,
                "pthread_mutexattr_settype",
                attr,
                _PTHREAD_MUTEX_ERRORCHECK,
            )
            cobj = ctypes.c_char.from_buffer(mv, offset)
            try:
                _call(lib.pthread_mutex_init, "pthread_mutex_init", ctypes.addressof(cobj), attr)
            finally:
                del cobj
        finally:
            lib.pthread_mutexattr_destroy(attr)
        mv[offset + _MAGIC_AT : offset + _MAGIC_AT + 4] = _MUTEX_MAGIC.to_bytes(4, sys.byteorder)
        self = cls.__new__(cls)
        self._setup(mv, offset, on_owner_dead)
        return self

    # -- the hot path ------------------------------------------------------
    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Acquire; True on success, False when non-blocking or timed out.

        ``timeout=None`` or ``-1`` waits forever (still interruptible by
        signals); ``blocking=False`` tries once; a timeout ``>= 0`` gives up
        after that many seconds, measured on CLOCK_MONOTONIC.
        """
        if timeout is None:
            rc = self._trylock(self._ptr)
            if rc == 0 and not self._flag[0]:
                self.owner_died = False
                return True
            return self._acquire_slow(rc, blocking, None)
        return self._acquire_slow(None, blocking, timeout)

    __enter__ = acquire

    def inline_parts(self) -> tuple[Any, Any, ctypes.c_void_p, memoryview]:
        """(trylock, unlock, the mutex pointer, the recovery flag): :meth:`acquire`'s fast path.

        For the hottest callers (queue put/get, dict set/get, name reopen),
        which inline the uncontended case: ``rc = trylock(ptr)``; it is theirs
        when ``rc == 0 and not flag[0]``, else ``_acquire_slow(rc, ...)``
        finishes (waits, or repairs after a dead holder); ``unlock(ptr)``
        releases, a non-zero result meaning :meth:`release` would raise.
        """
        return self._trylock, self._unlock, self._ptr, self._flag

    def release(self) -> None:
        """Release; RuntimeError when the calling thread does not hold the lock."""
        rc = self._unlock(self._ptr)
        if rc:
            self._raise_release(rc)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        rc = self._unlock(self._ptr)
        if rc:
            self._raise_release(rc)

    # -- slow paths ----------------------------------------------------------
    def _acquire_slow(self, rc: int | None, blocking: bool, timeout: object) -> bool:
        seconds = _check_timeout(blocking, timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        if rc is None:
            rc = self._trylock(self._ptr)
        if rc == errno.EBUSY:
            self.owner_died = False
            if not blocking or seconds == 0:
                return False
            rc = self._wait(deadline)
            if rc == errno.ETIMEDOUT:
                return False
        if rc == 0:
            if self._flag[0]:
                self._recover()
            else:
                self.owner_died = False
            return True
        if rc == errno.EOWNERDEAD:
            # Consistent first: if we died or raised before it, an unlock would
            # make the mutex ENOTRECOVERABLE for everyone.  The shared flag then
            # carries "recovery pending" until a recovery completes.
            self._consistent(self._ptr)
            self._flag[0] = 1
            self._recover()
            return True
        if rc == errno.EDEADLK:
            # The calling thread holds it, and nobody else can release it.  A
            # try or a timed wait fails as with threading.Lock (after waiting
            # out the timeout); waiting forever would be a silent deadlock.
            self.owner_died = False
            if deadline is None and blocking:
                raise RuntimeError(
                    f"this thread already holds {self!r}; acquiring it again would deadlock"
                )
            while deadline is not None and (left := deadline - time.monotonic()) > 0:
                time.sleep(left)
            return False
        if rc == errno.ENOTRECOVERABLE:
            raise RuntimeError(
                f"{self!r} is not recoverable: a holder released it after its owner died "
                f"without pthread_mutex_consistent; re-initialise the slot"
            )
        raise _libc.oserror(rc, f"locking RobustMutex at offset {self.offset}")

    def _wait(self, deadline: float | None) -> int:
        """Block in WAIT_SLICE slices until locked, or ETIMEDOUT at ``deadline``.

        Each slice ends at an absolute time on CLOCK_MONOTONIC, so however many
        slices or signals happen, the wait ends at ``deadline`` and not before.
        """
        clocklock = self._clocklock
        ptr = self._ptr
        monotonic = time.monotonic
        while True:
            now = monotonic()
            end = now + WAIT_SLICE
            if deadline is not None and deadline < end:
                end = deadline
            if clocklock is not None:
                rc: int = clocklock(ptr, _libc.CLOCK_MONOTONIC, ctypes.byref(_timespec(end)))
            else:
                # CLOCK_REALTIME fallback (glibc < 2.30): convert per slice so a
                # wall-clock jump costs at most one slice of accuracy.
                real_end = time.time() + (end - monotonic())
                rc = self._timedlock(ptr, ctypes.byref(_timespec(real_end)))
            if rc != errno.ETIMEDOUT and rc != errno.EINTR:
                return rc
            if deadline is not None and monotonic() >= deadline:
                return errno.ETIMEDOUT

    def _recover(self) -> None:
        self.owner_died = True
        callback = self.on_owner_dead
        if callback is None:
            return
        try:
            callback(self)
        except BaseException as exc:
            # Leave the flag set, so the next acquirer recovers again, and do
            # not keep the lock: the caller's `with` block never started.
            self._unlock(self._ptr)
            if sys.version_info >= (3, 11):
                exc.add_note(
                    f"raised by on_owner_dead of RobustMutex at offset {self.offset}; the lock "
                    f"was released and recovery is still pending for the next acquirer"
                )
            raise
        self._flag[0] = 0

    def _raise_release(self, rc: int) -> None:
        if rc == errno.EPERM:
            raise RuntimeError(
                f"cannot release un-acquired lock: {self!r} is not held by this thread"
            )
        raise _libc.oserror(rc, f"unlocking RobustMutex at offset {self.offset}")

    # -- recovery and diagnostics ----------------------------------------------
    def mark_recovered(self) -> None:
        """Clear the shared "needs recovery" flag after repairing the data.

        Only the holder may do this (it is what makes the repair final);
        RuntimeError otherwise, where ownership can be checked (glibc).
        """
        if _IS_GLIBC and self.holder_tid() != threading.get_native_id():
            raise RuntimeError(f"mark_recovered() needs the lock held by this thread: {self!r}")
        self._flag[0] = 0

    @property
    def recovery_pending(self) -> bool:
        """True while a dead holder's mess has not been declared repaired."""
        return bool(self._flag[0])

    def holder_tid(self) -> int | None:
        """Thread id (as in threading.get_native_id) of the holder; None if free or unknown.

        A racy snapshot for diagnostics; only available with glibc.
        """
        if not _IS_GLIBC:
            return None
        tid = self._word[0] & _FUTEX_TID_MASK
        return tid or None

    def locked(self) -> bool:
        """Whether anyone holds the lock right now (a racy snapshot, like threading)."""
        if _IS_GLIBC:
            return bool(self._word[0] & _FUTEX_TID_MASK)
        rc = self._trylock(self._ptr)
        if rc == 0:
            self._unlock(self._ptr)
            return False
        if rc == errno.EOWNERDEAD:
            self._consistent(self._ptr)
            self._flag[0] = 1
            self._unlock(self._ptr)
            return False
        return True

    def __reduce__(self) -> Any:
        raise TypeError(
            "a RobustMutex cannot be pickled (it points into this process's mapping); "
            "pass the Segment and the offset and attach with RobustMutex(seg.buf, offset)"
        )

    def __repr__(self) -> str:
        tid = self.holder_tid()
        state = "unlocked" if tid is None else f"held by tid {tid}"
        if not _IS_GLIBC:
            state = "state unknown"
        pending = ", recovery pending" if self._flag[0] else ""
        return f"<sharedobj.sync.RobustMutex offset={self.offset} {state}{pending}>"


def _call(fn: Any, name: str, *args: Any) -> None:
    rc = fn(*args)
    if rc:
        raise _libc.oserror(rc, name)


class SharedCondition:
    """A condition variable for processes: a futex word next to a RobustMutex.

    Why not a pthread condition variable: a process-shared ``pthread_cond_t``
    whose waiter is SIGKILLed can leave internal state that blocks later
    waiters; a bare futex keeps nothing but a sequence number and a hint.

    ``notify`` bumps the sequence; a waiter sleeps only while the sequence
    still has the value it saw under the mutex, so a notify between releasing
    the mutex and sleeping is never lost.  Both updates are plain read-modify-
    writes: **the mutex must be held** by the caller of ``wait``, ``notify``
    and ``notify_all`` (RuntimeError otherwise, like threading).

    The waiter count only lets ``notify`` skip the wake syscall when nobody
    sleeps.  A waiter SIGKILLed while sleeping leaves it one too high: harmless,
    it costs each later notify a wake syscall until the next initialize.

    As with every condition variable, wake-ups may be spurious and ``notify(n)``
    may wake more than ``n`` (a waiter not yet asleep sees the new sequence):
    re-check the predicate, or use :meth:`wait_for`.
    """

    __slots__ = ("_addr", "_cobj", "_mv", "_syscall", "_words", "mutex", "offset")

    def __init__(self, buf: memoryview | bytearray, offset: int, mutex: RobustMutex) -> None:
        mv = _as_bytes_view(buf, "SharedCondition")
        _check_offset(mv, offset, CONDITION_SLOT_SIZE, _COND_ALIGN, "SharedCondition")
        if not isinstance(mutex, RobustMutex):
            raise TypeError(f"SharedCondition needs a RobustMutex, not {type(mutex).__name__}")
        magic = int.from_bytes(mv[offset + 8 : offset + 12], sys.byteorder)
        if magic != _COND_MAGIC:
            raise ValueError(
                f"no initialised SharedCondition at offset {offset} (magic {magic:#010x}, "
                f"expected {_COND_MAGIC:#010x}); call SharedCondition.initialize first"
            )
        self._setup(mv, offset, mutex)

    def _setup(self, mv: memoryview, offset: int, mutex: RobustMutex) -> None:
        lib = _libc.libc()
        self._mv = mv
        self.offset = offset
        self.mutex = mutex
        self._cobj = ctypes.c_uint32.from_buffer(mv, offset)  # keeps the mapping alive
        self._addr = ctypes.c_void_p(ctypes.addressof(self._cobj))
        self._words = mv[offset : offset + 8].cast("I")
        self._syscall = lib.syscall

    @classmethod
    def initialize(
        cls, buf: memoryview | bytearray, offset: int, mutex: RobustMutex
    ) -> SharedCondition:
        """Zero the slot and stamp it; once, before other processes use it."""
        mv = _as_bytes_view(buf, "SharedCondition")
        _check_offset(mv, offset, CONDITION_SLOT_SIZE, _COND_ALIGN, "SharedCondition")
        if not isinstance(mutex, RobustMutex):
            raise TypeError(f"SharedCondition needs a RobustMutex, not {type(mutex).__name__}")
        _libc.libc()  # UnsupportedPlatformError before touching anything
        mv[offset : offset + CONDITION_SLOT_SIZE] = bytes(CONDITION_SLOT_SIZE)
        mv[offset + 8 : offset + 12] = _COND_MAGIC.to_bytes(4, sys.byteorder)
        self = cls.__new__(cls)
        self._setup(mv, offset, mutex)
        return self

    def _check_held(self, what: str) -> None:
        if _IS_GLIBC and self.mutex.holder_tid() != threading.get_native_id():
            raise RuntimeError(f"cannot {what} un-acquired lock ({self.mutex!r})")

    def wait(self, timeout: float | None = None) -> bool:
        """Release the mutex, sleep until notified or ``timeout``, re-acquire.

        Returns False on timeout.  The mutex is re-acquired in every case
        (through ``acquire``, so a dead holder's recovery runs here too: check
        ``mutex.owner_died`` afterwards if you use no callback).
        """
        seconds = _check_timeout(True, timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        self._check_held("wait on")
        words = self._words
        seq = words[0]
        words[1] = (words[1] + 1) & 0xFFFF_FFFF
        self.mutex.release()
        try:
            woken = self._sleep(seq, deadline)
        finally:
            self.mutex.acquire()
            if words[1]:
                words[1] -= 1
        return woken

    def _sleep(self, seq: int, deadline: float | None) -> bool:
        """FUTEX_WAIT while the sequence is ``seq``; True once it changed.

        The relative timeout is recomputed from the absolute deadline before
        every call, so EINTR, spurious wake-ups and slicing never extend or
        shorten the total wait.
        """
        words = self._words
        syscall = self._syscall
        addr = self._addr
        nr = _libc.SYS_FUTEX[_libc.machine()]
        val = seq - 2**32 if seq > _INT_MAX else seq  # the kernel compares the raw 32 bits
        ts = _libc.Timespec()
        monotonic = time.monotonic
        while True:
            if words[0] != seq:
                return True
            if deadline is None:
                rel = WAIT_SLICE
            else:
                rel = deadline - monotonic()
                if rel <= 0:
                    return False
                if rel > WAIT_SLICE:
                    rel = WAIT_SLICE
            ts.tv_sec = int(rel)
            ts.tv_nsec = int((rel - ts.tv_sec) * 1e9)
            if syscall(nr, addr, _libc.FUTEX_WAIT, val, ctypes.byref(ts), None, 0) != 0:
                err = _libc.get_errno()
                if err not in (errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT):
                    raise _libc.oserror(err, f"futex wait on SharedCondition at {self.offset}")

    def wait_for(self, predicate: Callable[[], _T], timeout: float | None = None) -> _T:
        """Wait until ``predicate()`` is true (or timeout); return its last value."""
        return wait_for(self.wait, predicate, timeout)

    def notify(self, n: int = 1) -> None:
        """Wake up to ``n`` waiters (maybe more, see the class docstring)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        self._check_held("notify on")
        words = self._words
        words[0] = (words[0] + 1) & 0xFFFF_FFFF
        if words[1] and n:
            nr = _libc.SYS_FUTEX[_libc.machine()]
            self._syscall(nr, self._addr, _libc.FUTEX_WAKE, min(n, _INT_MAX), None, None, 0)

    def notify_all(self) -> None:
        """Wake every waiter."""
        self.notify(_INT_MAX)

    def __enter__(self) -> bool:
        return self.mutex.acquire()

    def __exit__(self, *exc: object) -> None:
        self.mutex.release()

    def __reduce__(self) -> Any:
        raise TypeError(
            "a SharedCondition cannot be pickled; pass the Segment and offsets and re-attach"
        )

    def __repr__(self) -> str:
        seq, waiters = self._words[0], self._words[1]
        return f"<sharedobj.sync.SharedCondition offset={self.offset} seq={seq} waiters~{waiters}>"


def wait_for(
    wait: Callable[[float | None], object], predicate: Callable[[], _T], timeout: float | None
) -> _T:
    """``threading.Condition.wait_for`` over any ``wait(timeout)``: one deadline for all waits."""
    endtime: float | None = None
    waittime = timeout
    result = predicate()
    while not result:
        if waittime is not None:
            if endtime is None:
                endtime = time.monotonic() + waittime
            else:
                waittime = endtime - time.monotonic()
                if waittime <= 0:
                    break
        wait(waittime)
        result = predicate()
    return result


def implementation() -> dict[str, str]:
    """What this machine uses for locks and waits (for ``python -m sharedobj info``)."""
    reason = _libc.supported()
    if reason is not None:
        return {"lock": f"unsupported: {reason}", "wait": f"unsupported: {reason}"}
    libc_name = _glibc_version() or "non-glibc C library"
    if _libc.has_clocklock():
        timed = "pthread_mutex_clocklock CLOCK_MONOTONIC"
    else:
        timed = "pthread_mutex_timedlock CLOCK_REALTIME (no clocklock in this libc)"
    slice_ms = f"{WAIT_SLICE * 1000:.0f} ms"
    return {
        "lock": f"robust process-shared pthread mutex ({libc_name}, {timed}, "
        f"waits sliced every {slice_ms} for signals)",
        "wait": "futex FUTEX_WAIT/FUTEX_WAKE (shared, not FUTEX_PRIVATE) on shared memory, "
        f"SYS_futex={_libc.SYS_FUTEX[_libc.machine()]}",
    }
