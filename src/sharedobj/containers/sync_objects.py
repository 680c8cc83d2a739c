"""What multiprocessing code takes from ``Manager()``: locks, waits, Value and Array.

``smm.Lock()``, ``smm.RLock()``, ``smm.Semaphore()``, ``smm.BoundedSemaphore()``,
``smm.Event()``, ``smm.Condition()``, ``smm.Barrier()``, ``smm.Value()`` and
``smm.Array()`` behave like the :mod:`threading` objects a manager serves
(names, arguments, return values, exceptions), but live in a heap block
instead of a server process: an operation is a few memory accesses and a
robust mutex, not a round trip.  Every object pickles as its block handle
(plus a few bytes: a ctypes type, a timeout), so unlike ``multiprocessing.Lock``
it can be passed in ``Pool`` arguments and results and to ``Process`` under
fork, spawn and forkserver.  A process keeps one object per handle (a weak
cache), so a worker that receives the same lock for every task builds it once.

**Differences from the stdlib, on purpose.**

* ``Lock`` and ``RLock`` belong to the *thread* that acquired them (they are
  robust pthread mutexes): releasing from another thread or process raises
  RuntimeError, where ``threading.Lock`` allows it.  An untimed acquire of a
  ``Lock`` the calling thread already holds raises RuntimeError instead of
  deadlocking.
* ``Value``/``Array`` are typed like ``multiprocessing.Value``/``Array``
  (ctypes, with their truncation rules), not like a manager's ``ValueProxy``,
  which stores any object.  ``lock=True`` (or None) gives them a new RLock,
  ``lock=<our Lock or RLock>`` shares that one, ``lock=False`` returns a
  :class:`RawValue`/:class:`RawArray` with no lock and no ``get_lock``
  (``multiprocessing`` returns the bare ctypes object there).
* Timeouts: ``None`` or ``-1`` wait forever in ``acquire``; ``wait`` methods
  treat a timeout <= 0 as "poll", as :mod:`threading` does.

**Processes that die.**

* ``Lock``/``RLock``: the kernel releases a dead holder's mutex.  The next
  acquirer gets it, ``lock.owner_died`` is True after that acquire, and an
  :class:`OwnerDiedWarning` is issued (a warning, not an exception, so code
  written for the stdlib keeps running; ``-W error::...OwnerDiedWarning``
  turns it into one, and the lock then stays free for the next acquirer).
  A *thread* that exits holding one is a dead holder too (the kernel frees
  robust mutexes on thread exit), where a ``threading.Lock`` stays held.
* ``Semaphore``: each process's outstanding acquires are counted in the
  block (up to :data:`HOLD_SLOTS` processes; more are not tracked).  A
  release by a process that holds none discharges another process's count (a
  hand-over).  Units still counted for a process that died are given back,
  found by waiters every :data:`SCAN_INTERVAL` seconds and by the next user
  after a death inside the semaphore's own lock, **but never beyond the
  initial value**: a semaphore used as a signal (initial 0, released by
  producers, acquired by consumers) is never refilled by a consumer's death.
* ``Barrier``: a party that dies while waiting, or inside the barrier's lock,
  breaks the barrier: the others get ``BrokenBarrierError`` (within
  :data:`SCAN_INTERVAL`), as if it had timed out.  A party that dies after
  being released is just counted out.
* ``Event``, ``Condition``: nothing is owned; a waiter that dies is forgotten.

**Crash safety.**  Every shared write of Semaphore, BoundedSemaphore, Event
and Barrier happens under the object's robust mutex through a small undo log
in the block (old values written first, then a count that commits the log,
then the new values, then the count cleared).  A process killed (or
interrupted by Ctrl-C) half-way leaves a committed log that the next holder
rolls back, so the state is the one before the operation.  An Array keeps a
copy of the bytes a multi-element write replaces, used the same way.  Value
writes and single small Array elements are one aligned store.  The RLock's
recursion count is only written by its holder and reset by every first
acquire.  :data:`fault_hook`, when set, is called before each of these
writes (the crash tests kill the process there).

Block layout of Semaphore, Event and Barrier (offsets in bytes)::

    [0, 64)    RobustMutex
    [64, 80)   SharedCondition (waiters sleep on it)
    [80, 84)   magic (u32, per class), written last
    [88, ...)  int64 words: [0] undo-log count, [1, 17) 8 (index, old value)
               pairs, then the state (see each class)
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

import cloudpickle

from .. import trust
from ..allocator.core import pid_start_time, process_alive
from ..heap import Block, Heap, _open_handle
from ..sync import CONDITION_SLOT_SIZE, MUTEX_SLOT_SIZE, RobustMutex, SharedCondition, wait_for

__all__ = [
    "HOLD_SLOTS",
    "SCAN_INTERVAL",
    "Array",
    "Barrier",
    "BoundedSemaphore",
    "BrokenBarrierError",
    "CharArray",
    "Condition",
    "Event",
    "Lock",
    "OwnerDiedWarning",
    "RLock",
    "RawArray",
    "RawValue",
    "Semaphore",
    "Value",
    "fault_hook",
]

#: Called before every shared-memory write step of a mutating operation (crash tests).
fault_hook: Callable[[], None] | None = None

#: How often a blocked Semaphore/Barrier waiter looks for dead processes, in seconds.
SCAN_INTERVAL = 0.2
#: Processes whose Semaphore holds are tracked (their units come back if they die).
HOLD_SLOTS = 64
MAX_PARTIES = 1 << 16

BrokenBarrierError = threading.BrokenBarrierError
_T = TypeVar("_T")


class OwnerDiedWarning(RuntimeWarning):
    """The previous holder of a lock died holding it; the lock was released to you."""


def _step() -> None:
    hook = fault_hook
    if hook is not None:
        hook()


# -- per-process state -------------------------------------------------------------

_me: tuple[int, int] | None = None
_cache: weakref.WeakValueDictionary[tuple[str, bytes], Any] = weakref.WeakValueDictionary()
# The last few objects unpickled stay alive even when the task that got them
# is over, so a pool worker given the same lock with every task builds it once.
_recent: dict[tuple[str, bytes], Any] = {}
_RECENT_MAX = 128
# Lock/RLock mutexes held by a thread of this process.  glibc links every
# robust mutex a thread holds into that thread's robust list *through the mutex
# memory*, and rewrites those links at each later lock and unlock by the
# thread.  Were the mapping to go (its last view dropped) while the lock is
# held, that thread's next lock operation would write into whatever is mapped
# there next: so a held lock keeps its object, hence its mapping, alive.
_held: set[RobustMutex] = set()


def _identity() -> tuple[int, int]:
    """(pid, start time): a pid alone is reused, so holds record both."""
    global _me
    me = _me
    if me is None:
        pid = os.getpid()
        me = _me = (pid, pid_start_time(pid) or 0)
    return me


def _after_fork_in_child() -> None:
    global _me
    _me = None
    _held.clear()  # a child holds none of its parent's locks


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _rebuild(tag: str, data: bytes, *extra: Any) -> Any:
    """Unpickle any object of this module: one Python object per handle and process."""
    key = (tag, data)
    obj = _cache.get(key)
    if obj is None:
        cls = _CLASSES.get(tag)
        if cls is None:
            raise ValueError(f"unknown sharedobj synchronisation object {tag!r}")
        obj = cls._attach(_open_handle(data), *extra)
        _cache[key] = obj
        _recent[key] = obj
        if len(_recent) > _RECENT_MAX:
            del _recent[next(iter(_recent))]
    return obj


def _alloc(heap: Heap, nbytes: int) -> Block:
    if not isinstance(heap, Heap):
        raise TypeError(f"needs a sharedobj Heap, not {type(heap).__name__}")
    return heap.alloc_zeroed(max(nbytes, 16))


def _wait_seconds(timeout: object) -> float | None:
    """A ``wait`` timeout as threading reads it: None forever, <= 0 a poll."""
    if timeout is None:
        return None
    try:
        seconds = float(timeout)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}") from None
    if seconds != seconds:
        raise ValueError("timeout must not be NaN")
    return max(seconds, 0.0)


def _acquire_seconds(blocking: bool, timeout: object) -> float | None:
    """A Semaphore ``acquire`` timeout: None or -1 forever, other negatives a poll."""
    if timeout is None:
        return None
    if not blocking:
        raise ValueError("can't specify timeout for non-blocking acquire")
    if not isinstance(timeout, bool) and isinstance(timeout, (int, float)) and timeout == -1:
        return None
    return _wait_seconds(timeout)


def _deadline(seconds: float | None) -> float | None:
    return None if seconds is None else time.monotonic() + seconds


class _Base:
    """A handle on one heap block; pickles as ``(_rebuild, (tag, handle, *extra))``."""

    __slots__ = ("__weakref__", "_block")
    _TAG: ClassVar[str] = ""

    _block: Block

    def _extra(self) -> tuple[Any, ...]:
        return ()

    def _remember(self) -> None:
        _cache[(self._TAG, self._block.handle.data)] = self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._TAG, self._block.handle.data, *self._extra()))


def _owner_died_callback(obj: _Base, what: str) -> Callable[[RobustMutex], None]:
    """An on_owner_dead that calls ``obj._owner_dead`` without keeping ``obj`` alive."""
    ref = weakref.ref(obj)

    def callback(mutex: RobustMutex) -> None:
        target = ref()
        if target is not None:
            target._owner_dead(mutex)  # type: ignore[attr-defined]
        else:  # pragma: no cover - the object holding this mutex is gone
            _warn_owner_died(what)

    return callback


def _warn_owner_died(what: str) -> None:
    warnings.warn(
        OwnerDiedWarning(
            f"the previous holder of this {what} died holding it; "
            f"the lock was released to this acquire (lock.owner_died is True)"
        ),
        stacklevel=4,
    )


# -- Lock and RLock ------------------------------------------------------------------


class Lock(_Base):
    """``threading.Lock`` for processes: a robust mutex in 64 bytes of shared memory.

    ``owner_died`` is True after an acquire that found the previous holder
    dead (an :class:`OwnerDiedWarning` is issued too).  Read it right after
    acquiring: the object is shared by the process's threads.
    """

    __slots__ = ("_mutex",)
    _TAG = "Lock"

    _mutex: RobustMutex

    @classmethod
    def create(cls, heap: Heap) -> Lock:
        block = _alloc(heap, MUTEX_SLOT_SIZE)
        self = cls.__new__(cls)
        self._block = block
        self._mutex = RobustMutex.initialize(
            block.buf, 0, on_owner_dead=_owner_died_callback(self, "Lock")
        )
        self._remember()
        return self

    @classmethod
    def _attach(cls, block: Block) -> Lock:
        self = cls.__new__(cls)
        self._block = block
        self._mutex = RobustMutex(block.buf, 0, on_owner_dead=_owner_died_callback(self, "Lock"))
        return self

    def _owner_dead(self, mutex: RobustMutex) -> None:
        _warn_owner_died(type(self).__name__)

    def acquire(self, blocking: bool = True, timeout: float | None = -1) -> bool:
        """Like threading.Lock.acquire; ``timeout`` None or -1 waits forever."""
        mutex = self._mutex
        if timeout is None or timeout == -1:
            got = mutex.acquire(blocking, None)
        else:
            got = mutex.acquire(blocking, timeout)
        if got:
            _held.add(mutex)
        return got

    def release(self) -> None:
        mutex = self._mutex
        mutex.release()
        _held.discard(mutex)

    def __enter__(self) -> bool:
        mutex = self._mutex
        mutex.acquire()
        _held.add(mutex)
        return True

    def __exit__(self, *exc: object) -> None:
        mutex = self._mutex
        mutex.release()
        _held.discard(mutex)

    def locked(self) -> bool:
        return self._mutex.locked()

    @property
    def owner_died(self) -> bool:
        return self._mutex.owner_died

    def _is_owned(self) -> bool:
        return self._mutex.holder_tid() == threading.get_native_id()

    def _check(self) -> list[str]:
        return []

    def __repr__(self) -> str:
        state = "locked" if self.locked() else "unlocked"
        return f"<sharedobj {type(self).__name__} {state}>"


class RLock(Lock):
    """``threading.RLock`` for processes: the mutex plus a recursion count beside it.

    Ownership is the mutex's (the holding thread id lives in the lock word),
    so a forked child never believes it holds its parent's lock.
    """

    __slots__ = ("_count",)
    _TAG = "RLock"

    _count: memoryview

    @classmethod
    def create(cls, heap: Heap) -> RLock:
        block = _alloc(heap, MUTEX_SLOT_SIZE + 8)
        self = cls.__new__(cls)
        self._block = block
        buf = block.buf
        self._mutex = RobustMutex.initialize(
            buf, 0, on_owner_dead=_owner_died_callback(self, "RLock")
        )
        self._count = buf[MUTEX_SLOT_SIZE : MUTEX_SLOT_SIZE + 8].cast("q")
        self._remember()
        return self

    @classmethod
    def _attach(cls, block: Block) -> RLock:
        self = cls.__new__(cls)
        self._block = block
        buf = block.buf
        self._mutex = RobustMutex(buf, 0, on_owner_dead=_owner_died_callback(self, "RLock"))
        self._count = buf[MUTEX_SLOT_SIZE : MUTEX_SLOT_SIZE + 8].cast("q")
        return self

    def acquire(self, blocking: bool = True, timeout: float | None = -1) -> bool:
        mutex = self._mutex
        if mutex.holder_tid() == threading.get_native_id():
            _step()
            self._count[0] += 1
            return True
        if timeout is None or timeout == -1:
            got = mutex.acquire(blocking, None)
        else:
            got = mutex.acquire(blocking, timeout)
        if got:
            # a first acquire resets whatever count a dead holder left
            try:
                _step()
            except BaseException:
                mutex.release()
                raise
            self._count[0] = 1
            _held.add(mutex)
        return got

    def release(self) -> None:
        if not self._is_owned():
            raise RuntimeError("cannot release un-acquired lock")
        count = self._count[0] - 1
        try:
            _step()
        finally:  # a release is never abandoned half-way (Ctrl-C)
            self._count[0] = max(count, 0)
            if count <= 0:
                self._mutex.release()
                _held.discard(self._mutex)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # what threading.Condition uses to wait on an RLock held several times
    def _release_save(self) -> int:
        if not self._is_owned():
            raise RuntimeError("cannot release un-acquired lock")
        count = int(self._count[0])
        return count

    def _acquire_restore(self, count: int) -> None:
        try:
            _step()
        finally:
            self._count[0] = count

    def _check(self) -> list[str]:
        count = int(self._count[0])
        problems = [] if count >= 0 else [f"negative recursion count {count}"]
        if self.locked() and count == 0:
            problems.append("held with a recursion count of 0")
        return problems

    def __repr__(self) -> str:
        tid = self._mutex.holder_tid()
        state = "unlocked" if tid is None else f"locked by tid {tid} count={self._count[0]}"
        return f"<sharedobj RLock {state}>"


def _lock_arg(heap: Heap, lock: object, what: str) -> Lock | None:
    if lock is False:
        return None
    if lock is True or lock is None:
        return RLock.create(heap)
    if isinstance(lock, Lock):
        return lock
    raise TypeError(
        f"{what} lock must be True, False or a sharedobj Lock/RLock, not {type(lock).__name__} "
        f"(a threading or multiprocessing lock cannot be shared through the heap)"
    )


# -- objects with a mutex, a condition and an undo log --------------------------------

_COND_AT = MUTEX_SLOT_SIZE
_MAGIC_AT = _COND_AT + CONDITION_SLOT_SIZE
_WORDS_AT = _MAGIC_AT + 8
_LOG_CAP = 8
_STATE = 1 + 2 * _LOG_CAP  # first state word


class _Logged(_Base):
    """Shared state in int64 words, changed only through :meth:`_commit` under the mutex."""

    __slots__ = ("_cond", "_mutex", "_w")
    _MAGIC: ClassVar[int] = 0
    _NWORDS: ClassVar[int] = 0

    _mutex: RobustMutex
    _cond: SharedCondition
    _w: memoryview

    def _init_block(self, heap: Heap, nwords: int) -> memoryview:
        block = _alloc(heap, _WORDS_AT + 8 * (_STATE + nwords))
        self._block = block
        buf = block.buf
        self._mutex = RobustMutex.initialize(
            buf, 0, on_owner_dead=_owner_died_callback(self, type(self).__name__)
        )
        self._cond = SharedCondition.initialize(buf, _COND_AT, self._mutex)
        self._w = buf[_WORDS_AT:].cast("q")
        return self._w

    def _publish(self) -> None:
        buf = self._block.buf
        buf[_MAGIC_AT : _MAGIC_AT + 4] = self._MAGIC.to_bytes(4, sys.byteorder)
        self._remember()

    def _attach_block(self, block: Block) -> None:
        buf = block.buf
        magic = int.from_bytes(buf[_MAGIC_AT : _MAGIC_AT + 4], sys.byteorder)
        if magic != self._MAGIC:
            raise ValueError(f"block {block!r} holds no sharedobj {type(self).__name__}")
        self._block = block
        self._mutex = RobustMutex(
            buf, 0, on_owner_dead=_owner_died_callback(self, type(self).__name__)
        )
        self._cond = SharedCondition(buf, _COND_AT, self._mutex)
        self._w = buf[_WORDS_AT:].cast("q")

    # -- the undo log ------------------------------------------------------------
    def _commit(self, changes: list[tuple[int, int]], finish: bool = False) -> None:
        """Apply ``(word, new value)`` changes so that a crash anywhere undoes all of them.

        An exception in this process (Ctrl-C at a step) rolls back too, or,
        with ``finish``, completes the change: what a release or a barrier
        exit must do, since its caller cannot retry it.
        """
        w = self._w
        hook = fault_hook
        try:
            if len(changes) == 1:  # one aligned store is atomic: no log needed
                index, new = changes[0]
                if hook is not None:
                    hook()
                w[index] = new
                return
            at = 1
            for index, _new in changes:
                if hook is not None:
                    hook()
                w[at] = index
                if hook is not None:
                    hook()
                w[at + 1] = w[index]
                at += 2
            if hook is not None:
                hook()
            w[0] = len(changes)  # the log is live from here
            for index, new in changes:
                if hook is not None:
                    hook()
                w[index] = new
            if hook is not None:
                hook()
            w[0] = 0
        except BaseException:
            if finish:
                for index, new in changes:
                    w[index] = new
                w[0] = 0
            else:
                self._rollback()
            raise

    def _rollback(self) -> bool:
        """Undo a half-applied commit (a dead or interrupted writer's); True if there was one."""
        w = self._w
        n = w[0]
        if not n:
            return False
        n = min(max(n, 0), _LOG_CAP)
        for i in range(n - 1, -1, -1):
            index = w[1 + 2 * i]
            if _STATE <= index < len(w):
                w[index] = w[2 + 2 * i]
        w[0] = 0
        return True

    def _owner_dead(self, mutex: RobustMutex) -> None:
        self._after_death(self._rollback())
        self._cond.notify_all()

    def _after_death(self, rolled_back: bool) -> None:
        pass

    def _fix(self) -> None:
        # A writer interrupted between commit and rollback (an async
        # KeyboardInterrupt) may have released the mutex with a live log.
        if self._w[0]:
            self._rollback()

    def _wait_until(
        self, predicate: Callable[[], bool], deadline: float | None, scan: bool = False
    ) -> bool:
        """Under the mutex: sleep on the condition until ``predicate()`` or ``deadline``.

        With ``scan``, every SCAN_INTERVAL the waiter looks for dead processes
        (:meth:`_reap`), which is how a death outside the lock is noticed.
        """
        monotonic = time.monotonic
        next_scan = monotonic() + SCAN_INTERVAL
        while not predicate():
            now = monotonic()
            if deadline is not None and now >= deadline:
                return False
            if scan and now >= next_scan:
                self._reap()
                next_scan = now + SCAN_INTERVAL
                continue
            slice_ = next_scan - now if scan else None
            if deadline is not None:
                left = deadline - now
                slice_ = left if slice_ is None else min(slice_, left)
            self._cond.wait(slice_)
            self._fix()
        return True

    def _reap(self) -> None:
        pass

    def _check(self) -> list[str]:
        w = self._w
        return [f"undo log still holds {w[0]} entries"] if w[0] else []


class Semaphore(_Logged):
    """``threading.Semaphore`` for processes, with units of dead holders given back.

    State words: value, initial value, bounded flag, then HOLD_SLOTS slots of
    (pid, start time, units held).
    """

    __slots__ = ("_slot",)
    _TAG = "Semaphore"
    _MAGIC = 0x6D65_536F  # b"oSem"
    _VALUE = _STATE
    _INITIAL = _STATE + 1
    _BOUNDED = _STATE + 2
    _SLOTS = _STATE + 4

    _slot: int

    @classmethod
    def create(cls, heap: Heap, value: int = 1) -> Semaphore:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"semaphore value must be an int, not {type(value).__name__}")
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        if value >= 2**62:
            raise ValueError(f"semaphore initial value {value} is too large")
        self = cls.__new__(cls)
        self._slot = -1
        w = self._init_block(heap, 4 + 3 * HOLD_SLOTS)
        w[cls._VALUE] = value
        w[cls._INITIAL] = value
        w[cls._BOUNDED] = int(cls is BoundedSemaphore)
        self._publish()
        return self

    @classmethod
    def _attach(cls, block: Block) -> Semaphore:
        self = cls.__new__(cls)
        self._slot = -1
        self._attach_block(block)
        return self

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Like threading.Semaphore.acquire; ``timeout`` None or -1 waits forever."""
        seconds = _acquire_seconds(blocking, timeout)
        w = self._w
        with self._mutex:
            self._fix()
            if w[self._VALUE] <= 0:
                if not blocking or seconds == 0:
                    return False
                if not self._wait_until(lambda: w[self._VALUE] > 0, _deadline(seconds), True):
                    return False
            changes = [(self._VALUE, w[self._VALUE] - 1)]
            slot = self._my_slot()
            if slot >= 0:
                pid, start = _identity()
                if w[slot] != pid or w[slot + 1] != start:
                    changes += [(slot, pid), (slot + 1, start)]
                changes.append((slot + 2, max(w[slot + 2], 0) + 1))
            self._commit(changes)
            return True

    __enter__ = acquire

    def release(self, n: int = 1) -> None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if n < 1:
            raise ValueError("n must be one or more")
        w = self._w
        with self._mutex:
            self._fix()
            value = w[self._VALUE]
            if w[self._BOUNDED] and value + n > w[self._INITIAL]:
                raise ValueError("Semaphore released too many times")
            if value + n >= 2**62:
                raise ValueError("semaphore value would overflow")
            changes = [(self._VALUE, value + n)]
            left = n
            mine = self._my_slot(create=False)
            if mine >= 0 and w[mine + 2] > 0:
                take = min(int(w[mine + 2]), left)
                changes.append((mine + 2, w[mine + 2] - take))
                left -= take
            if left:  # a hand-over: discharge other processes' holds
                for slot in self._slot_indices():
                    held = w[slot + 2]
                    if held > 0 and slot != mine:
                        take = min(held, left)
                        changes.append((slot + 2, held - take))
                        left -= take
                        if left == 0 or len(changes) == _LOG_CAP:
                            break
            self._commit(changes, finish=True)
            self._cond.notify(n)

    def __exit__(self, *exc: object) -> None:
        self.release()

    def get_value(self) -> int:
        """The current value (a racy snapshot, like multiprocessing's)."""
        return int(self._w[self._VALUE])

    # -- hold slots ------------------------------------------------------------
    def _slot_indices(self) -> range:
        return range(self._SLOTS, self._SLOTS + 3 * HOLD_SLOTS, 3)

    def _my_slot(self, create: bool = True) -> int:
        """This process's slot (found once and remembered); -1 if none (or table full)."""
        w = self._w
        pid, start = _identity()
        slot = self._slot
        if slot >= 0 and w[slot] == pid and w[slot + 1] == start:
            return slot
        free = -1
        for s in self._slot_indices():
            if w[s] == pid and w[s + 1] == start:
                self._slot = s
                return s
            if free < 0 and (w[s] == 0 or w[s + 2] <= 0):
                free = s
        if not create:
            return -1
        if free < 0:
            self._reap()
            free = next((s for s in self._slot_indices() if w[s] == 0), -1)
        self._slot = free
        return free

    def _reap(self) -> None:
        """Give back the units of dead holders, never above the initial value."""
        w = self._w
        me = _identity()
        given = 0
        for s in self._slot_indices():
            held = w[s + 2]
            pid = w[s]
            if held <= 0 or pid <= 0 or (pid, w[s + 1]) == me:
                continue
            if process_alive(pid, w[s + 1]):
                continue
            value = w[self._VALUE]
            give = max(0, min(held, w[self._INITIAL] - value))
            self._commit([(self._VALUE, value + give), (s + 2, 0), (s, 0), (s + 1, 0)])
            given += give
        if given:
            self._cond.notify(given)

    def _after_death(self, rolled_back: bool) -> None:
        self._reap()

    def _check(self) -> list[str]:
        w = self._w
        problems = super()._check()
        value, initial = w[self._VALUE], w[self._INITIAL]
        if value < 0:
            problems.append(f"negative value {value}")
        if w[self._BOUNDED] and value > initial:
            problems.append(f"value {value} above the bound {initial}")
        for s in self._slot_indices():
            if w[s + 2] < 0:
                problems.append(f"slot {s}: negative hold {w[s + 2]}")
            if w[s + 2] > 0 and w[s] <= 0:
                problems.append(f"slot {s}: {w[s + 2]} units held by no process")
        return problems

    def __repr__(self) -> str:
        return f"<sharedobj {type(self).__name__} value={self.get_value()}>"


class BoundedSemaphore(Semaphore):
    """``threading.BoundedSemaphore``: releasing above the initial value raises ValueError."""

    __slots__ = ()
    _TAG = "BoundedSemaphore"
    _MAGIC = 0x6D65_5342  # b"BSem"

    @classmethod
    def create(cls, heap: Heap, value: int = 1) -> BoundedSemaphore:
        self = super().create(heap, value)
        assert isinstance(self, BoundedSemaphore)
        return self


class Event(_Logged):
    """``threading.Event`` for processes.  State word: the flag."""

    __slots__ = ()
    _TAG = "Event"
    _MAGIC = 0x7645_456F  # b"oEEv"
    _FLAG = _STATE

    @classmethod
    def create(cls, heap: Heap) -> Event:
        self = cls.__new__(cls)
        self._init_block(heap, 1)
        self._publish()
        return self

    @classmethod
    def _attach(cls, block: Block) -> Event:
        self = cls.__new__(cls)
        self._attach_block(block)
        return self

    def is_set(self) -> bool:
        return bool(self._w[self._FLAG])

    isSet = is_set

    def set(self) -> None:
        with self._mutex:
            self._fix()
            if not self._w[self._FLAG]:
                self._commit([(self._FLAG, 1)])
            self._cond.notify_all()

    def clear(self) -> None:
        with self._mutex:
            self._fix()
            if self._w[self._FLAG]:
                self._commit([(self._FLAG, 0)])

    def wait(self, timeout: float | None = None) -> bool:
        seconds = _wait_seconds(timeout)
        w = self._w
        with self._mutex:
            self._fix()
            if not w[self._FLAG] and seconds != 0:
                self._wait_until(lambda: bool(w[self._FLAG]), _deadline(seconds))
            return bool(w[self._FLAG])

    def __repr__(self) -> str:
        return f"<sharedobj Event {'set' if self.is_set() else 'unset'}>"


class _WithLock:
    """``acquire``, ``release`` and ``with obj:`` passed on to the object's lock."""

    __slots__ = ()
    _lock: Lock

    def acquire(self, blocking: bool = True, timeout: float | None = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class Condition(_WithLock, _Base):
    """``threading.Condition`` over one of our Lock/RLock (a new RLock by default).

    The block holds only the futex word; the lock is its own object, so a
    Value and a Condition (or several Conditions) can share one lock.
    """

    __slots__ = ("_cond", "_lock")
    _TAG = "Condition"

    _lock: Lock
    _cond: SharedCondition

    @classmethod
    def create(cls, heap: Heap, lock: Lock | RLock | None = None) -> Condition:
        if lock is None:
            lock = RLock.create(heap)
        elif not isinstance(lock, Lock):
            raise TypeError(
                f"Condition needs a sharedobj Lock or RLock (e.g. smm.RLock()), not "
                f"{type(lock).__name__}"
            )
        block = _alloc(heap, CONDITION_SLOT_SIZE)
        self = cls.__new__(cls)
        self._block = block
        self._lock = lock
        self._cond = SharedCondition.initialize(block.buf, 0, lock._mutex)
        self._remember()
        return self

    @classmethod
    def _attach(cls, block: Block, lock: Lock) -> Condition:
        self = cls.__new__(cls)
        self._block = block
        self._lock = lock
        self._cond = SharedCondition(block.buf, 0, lock._mutex)
        return self

    def _extra(self) -> tuple[Any, ...]:
        return (self._lock,)

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock (all levels of an RLock), sleep, re-acquire; False on timeout."""
        seconds = _wait_seconds(timeout)
        lock = self._lock
        if not lock._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        if not isinstance(lock, RLock):
            return self._cond.wait(seconds)
        count = lock._release_save()
        try:
            return self._cond.wait(seconds)
        finally:
            lock._acquire_restore(count)

    def wait_for(self, predicate: Callable[[], _T], timeout: float | None = None) -> _T:
        return wait_for(self.wait, predicate, timeout)

    def notify(self, n: int = 1) -> None:
        if not self._lock._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        self._cond.notify(n)

    def notify_all(self) -> None:
        self.notify(2**31 - 1)

    notifyAll = notify_all

    def __repr__(self) -> str:
        return f"<sharedobj Condition({self._lock!r})>"


class Barrier(_Logged):
    """``threading.Barrier`` for processes (CPython's algorithm, state in shared words).

    State words: count (parties inside wait), state (0 filling, 1 draining,
    -1 resetting, -2 broken), parties, then ``parties`` slots of (pid, start)
    naming the processes inside ``wait``, so that a dead one is noticed.
    ``action`` runs in the process of the last party to arrive, under the
    barrier's lock; it travels with the handle (cloudpickled once).
    """

    __slots__ = ("_action", "_blob", "_timeout")
    _TAG = "Barrier"
    _MAGIC = 0x7261_426F  # b"oBar"
    _COUNT = _STATE
    _STATE_W = _STATE + 1
    _PARTIES = _STATE + 2
    _SLOTS = _STATE + 4

    _action: Callable[[], object] | None
    _blob: bytes | None
    _timeout: float | None

    @classmethod
    def create(
        cls,
        heap: Heap,
        parties: int,
        action: Callable[[], object] | None = None,
        timeout: float | None = None,
    ) -> Barrier:
        if isinstance(parties, bool) or not isinstance(parties, int):
            raise TypeError(f"parties must be an int, not {type(parties).__name__}")
        if not 1 <= parties <= MAX_PARTIES:
            raise ValueError(f"parties must be between 1 and {MAX_PARTIES}, got {parties}")
        if action is not None and not callable(action):
            raise TypeError(f"action must be callable, not {type(action).__name__}")
        blob = None if action is None else cloudpickle.dumps(action)
        if timeout is not None:
            timeout = _wait_seconds(timeout)
        self = cls.__new__(cls)
        self._action, self._blob, self._timeout = action, blob, timeout
        w = self._init_block(heap, 4 + 2 * parties)
        w[cls._PARTIES] = parties
        self._publish()
        return self

    @classmethod
    def _attach(cls, block: Block, blob: bytes | None, timeout: float | None) -> Barrier:
        self = cls.__new__(cls)
        self._action, self._blob, self._timeout = None, blob, timeout
        self._attach_block(block)
        return self

    def _extra(self) -> tuple[Any, ...]:
        return (self._blob, self._timeout)

    @property
    def parties(self) -> int:
        return int(self._w[self._PARTIES])

    @property
    def n_waiting(self) -> int:
        w = self._w
        return int(w[self._COUNT]) if w[self._STATE_W] == 0 else 0

    @property
    def broken(self) -> bool:
        return bool(self._w[self._STATE_W] == -2)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for all parties; return this party's arrival index (0 .. parties-1)."""
        seconds = _wait_seconds(self._timeout if timeout is None else timeout)
        deadline = _deadline(seconds)
        w = self._w
        S = self._STATE_W
        with self._mutex:
            self._fix()
            # block while the previous phase drains or resets
            self._wait_until(lambda: w[S] not in (-1, 1), None, True)
            if w[S] < 0:
                raise BrokenBarrierError
            index = int(w[self._COUNT])
            slot = next((s for s in self._slot_indices() if w[s] == 0), -1)
            if slot < 0:  # pragma: no cover - count < parties leaves a slot free
                raise RuntimeError(f"{self!r} has no free slot: run _check()")
            pid, start = _identity()
            self._commit([(self._COUNT, index + 1), (slot, pid), (slot + 1, start)])
            try:
                if index + 1 == w[self._PARTIES]:
                    self._release()
                else:
                    if not self._wait_until(lambda: w[S] != 0, deadline, True):
                        self._break()
                        raise BrokenBarrierError
                    if w[S] < 0:
                        raise BrokenBarrierError
                return index
            finally:
                self._leave([(slot, 0), (slot + 1, 0)])

    def _release(self) -> None:
        try:
            action = self._load_action()
            if action is not None:
                action()
            self._commit([(self._STATE_W, 1)])
            self._cond.notify_all()
        except BaseException:
            self._break()
            raise

    def _load_action(self) -> Callable[[], object] | None:
        if self._action is None and self._blob is not None:
            self._action = trust.loads(self._blob)
        return self._action

    def _leave(self, changes: list[tuple[int, int]]) -> None:
        """Count a party out; the last one out of a draining/resetting phase reopens it."""
        w = self._w
        count = w[self._COUNT] - 1
        changes = [(self._COUNT, count), *changes]
        if count == 0 and w[self._STATE_W] in (-1, 1):
            changes.append((self._STATE_W, 0))
        self._commit(changes, finish=True)
        self._cond.notify_all()

    def _break(self) -> None:
        self._commit([(self._STATE_W, -2)])
        self._cond.notify_all()

    def reset(self) -> None:
        w = self._w
        with self._mutex:
            self._fix()
            if w[self._COUNT] > 0:
                if w[self._STATE_W] in (0, -2):
                    self._commit([(self._STATE_W, -1)])
            elif w[self._STATE_W] != 0:
                self._commit([(self._STATE_W, 0)])
            self._cond.notify_all()

    def abort(self) -> None:
        with self._mutex:
            self._fix()
            self._break()

    def _slot_indices(self) -> range:
        return range(self._SLOTS, self._SLOTS + 2 * int(self._w[self._PARTIES]), 2)

    def _reap(self) -> None:
        """Count dead parties out; one that died waiting for the others breaks the barrier."""
        w = self._w
        me = _identity()
        for s in self._slot_indices():
            pid = w[s]
            if pid <= 0 or (pid, w[s + 1]) == me or process_alive(pid, w[s + 1]):
                continue
            changes = [(s, 0), (s + 1, 0)]
            if w[self._STATE_W] == 0:
                changes.append((self._STATE_W, -2))
            self._leave(changes)

    def _after_death(self, rolled_back: bool) -> None:
        if rolled_back and self._w[self._STATE_W] == 0:
            self._commit([(self._STATE_W, -2)])  # a party died half-way through wait()
        self._reap()

    def _check(self) -> list[str]:
        w = self._w
        problems = super()._check()
        count, state = w[self._COUNT], w[self._STATE_W]
        used = sum(1 for s in self._slot_indices() if w[s] != 0)
        if state not in (0, 1, -1, -2):
            problems.append(f"unknown state {state}")
        if not 0 <= count <= w[self._PARTIES]:
            problems.append(f"count {count} outside [0, {w[self._PARTIES]}]")
        if used != count:
            problems.append(f"{used} slots in use for a count of {count}")
        return problems

    def __repr__(self) -> str:
        w = self._w
        state = {0: "filling", 1: "draining", -1: "resetting", -2: "broken"}.get(
            int(w[self._STATE_W]), "?"
        )
        return f"<sharedobj Barrier parties={self.parties} waiting={int(w[self._COUNT])} {state}>"


# -- Value and Array ---------------------------------------------------------------

# multiprocessing.sharedctypes._TYPECODES (not in typeshed)
_TYPECODES: dict[str, Any] = {
    "c": ctypes.c_char,
    "u": ctypes.c_wchar,
    "b": ctypes.c_byte,
    "B": ctypes.c_ubyte,
    "h": ctypes.c_short,
    "H": ctypes.c_ushort,
    "i": ctypes.c_int,
    "I": ctypes.c_uint,
    "l": ctypes.c_long,
    "L": ctypes.c_ulong,
    "q": ctypes.c_longlong,
    "Q": ctypes.c_ulonglong,
    "f": ctypes.c_float,
    "d": ctypes.c_double,
}
_NO_POINTERS = (ctypes.c_char_p, ctypes.c_wchar_p, ctypes.c_void_p, ctypes.py_object)


def _ctype(typecode: object) -> Any:
    """The ctypes type for a multiprocessing typecode or a ctypes type."""
    if isinstance(typecode, str):
        t = _TYPECODES.get(typecode)
        if t is None:
            raise TypeError(
                f"unknown typecode {typecode!r}; use one of {''.join(_TYPECODES)} or a ctypes type"
            )
        return t
    ok = (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)
    if not isinstance(typecode, type) or not issubclass(typecode, ok):
        raise TypeError(f"typecode must be a typecode string or a ctypes type, not {typecode!r}")
    if issubclass(typecode, _NO_POINTERS) or issubclass(typecode, ctypes._Pointer):
        raise TypeError(f"{typecode.__name__} holds a pointer, meaningless in another process")
    return typecode


def _instance(t: Any, value: object) -> Any:
    if isinstance(value, t):
        return value
    if isinstance(value, tuple) and issubclass(t, (ctypes.Structure, ctypes.Union)):
        return t(*value)
    return t(value)


class _Locked(_WithLock):
    """What ``multiprocessing``'s synchronized wrappers add: the lock, and ``with obj:``."""

    __slots__ = ()

    def get_lock(self) -> Lock:
        return self._lock


class RawValue(_Base):
    """A ctypes value in shared memory with no lock (``Value(..., lock=False)``)."""

    __slots__ = ("_obj", "_type")
    _TAG = "RawValue"

    _obj: Any
    _type: Any

    @classmethod
    def _make(cls, heap: Heap, t: Any, value: object) -> Any:
        tmp = _instance(t, value)  # bad input fails before anything is allocated
        size = ctypes.sizeof(t)
        block = _alloc(heap, size)
        block.buf[:size] = bytes(memoryview(tmp).cast("B"))
        self = cls.__new__(cls)
        self._block, self._type = block, t
        self._obj = t.from_buffer(block.buf)
        return self

    @classmethod
    def _attach(cls, block: Block, t: Any, *extra: Any) -> Any:
        self = cls.__new__(cls)
        self._block, self._type = block, t
        self._obj = t.from_buffer(block.buf)
        return self

    def _extra(self) -> tuple[Any, ...]:
        return (self._type,)

    @property
    def value(self) -> Any:
        return self._obj.value

    @value.setter
    def value(self, value: Any) -> None:
        _step()
        self._obj.value = value

    def get(self) -> Any:
        return self.value

    def set(self, value: Any) -> None:
        self.value = value

    def get_obj(self) -> Any:
        """The ctypes object itself (in shared memory)."""
        return self._obj

    def _check(self) -> list[str]:
        return []

    def __repr__(self) -> str:
        return f"<sharedobj {type(self).__name__} {self._obj!r}>"


class Value(_Locked, RawValue):
    """``multiprocessing.Value`` from the heap: ``.value`` reads and writes under ``get_lock()``.

    A write is one aligned store (types up to 8 bytes), so a writer killed
    at any point leaves the old or the new value.
    """

    __slots__ = ("_lock",)
    _TAG = "Value"

    _lock: Lock

    @classmethod
    def create(cls, heap: Heap, typecode: object, value: object, lock: object = True) -> Any:
        t = _ctype(typecode)
        _instance(t, value)
        lk = _lock_arg(heap, lock, "Value")
        if lk is None:
            raw = RawValue._make(heap, t, value)
            raw._remember()
            return raw
        self = cls._make(heap, t, value)
        self._lock = lk
        self._remember()
        return self

    @classmethod
    def _attach(cls, block: Block, t: Any, *extra: Any) -> Any:
        self = super()._attach(block, t)
        self._lock = extra[0]
        return self

    def _extra(self) -> tuple[Any, ...]:
        return (self._type, self._lock)

    @property
    def value(self) -> Any:
        with self._lock:
            return self._obj.value

    @value.setter
    def value(self, value: Any) -> None:
        with self._lock:
            _step()
            self._obj.value = value

    def _check(self) -> list[str]:
        return self._lock._check()


class RawArray(_Base):
    """A ctypes array in shared memory with no lock (``Array(..., lock=False)``)."""

    __slots__ = ("_len", "_obj", "_type")
    _TAG = "RawArray"
    _DATA_AT: ClassVar[int] = 0

    _obj: Any
    _type: Any
    _len: int

    @classmethod
    def _make(cls, heap: Heap, t: Any, sequence: object, extra_bytes: int = 0) -> Any:
        if isinstance(sequence, int):
            tmp = (t * sequence)()
        else:
            seq = list(sequence)  # type: ignore[call-overload]
            tmp = (t * len(seq))(*seq)
        n = len(tmp)
        nbytes = ctypes.sizeof(tmp)
        block = _alloc(heap, cls._DATA_AT + nbytes + extra_bytes * ((nbytes + 7) & ~7))
        at = cls._DATA_AT
        block.buf[at : at + nbytes] = bytes(memoryview(tmp).cast("B"))
        return cls._attach(block, t, n)

    @classmethod
    def _attach(cls, block: Block, t: Any, n: int, *extra: Any) -> Any:
        self = cls.__new__(cls)
        self._block, self._type, self._len = block, t, n
        self._obj = (t * n).from_buffer(block.buf, cls._DATA_AT)
        return self

    def _extra(self) -> tuple[Any, ...]:
        return (self._type, self._len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key: Any) -> Any:
        return self._obj[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        _step()
        self._obj[key] = value

    def __iter__(self) -> Iterator[Any]:
        return iter(self[:])

    def get_obj(self) -> Any:
        return self._obj

    def __repr__(self) -> str:
        return f"<sharedobj {type(self).__name__} {self._type.__name__}*{self._len} {self[:]!r}>"


_A_VALID, _A_START, _A_LEN = 0, 1, 2


class Array(_Locked, RawArray):
    """``multiprocessing.Array`` from the heap: indexing and slicing under ``get_lock()``.

    A write of several elements (a slice, ``.value``, ``.raw``) first copies
    the bytes it replaces into an undo area of the block (as large as the
    data) and marks the range; a writer killed half-way is rolled back by the
    next access under the lock, so readers never see a torn slice.

    Layout: [0, 24) undo header (valid, start, length as int64), data at 64,
    the undo area after the data.
    """

    __slots__ = ("_hdr", "_lock", "_nbytes")
    _TAG = "Array"
    _DATA_AT = 64

    _lock: Lock
    _hdr: memoryview
    _nbytes: int

    @classmethod
    def create(cls, heap: Heap, typecode: object, sequence: object, lock: object = True) -> Any:
        t = _ctype(typecode)
        target: type[RawArray] = cls
        if cls is Array and t is ctypes.c_char:
            target = CharArray
        if isinstance(sequence, int):
            (t * sequence)()  # bad sizes fail before anything is allocated
        else:
            items: list[Any] = list(sequence)  # type: ignore[call-overload]
            (t * len(items))(*items)
            sequence = items
        lk = _lock_arg(heap, lock, "Array")
        if lk is None:
            raw = RawArray._make(heap, t, sequence)
            raw._remember()
            return raw
        self = target._make(heap, t, sequence, extra_bytes=1)
        self._lock = lk
        self._remember()
        return self

    @classmethod
    def _attach(cls, block: Block, t: Any, n: int, *extra: Any) -> Any:
        self = super()._attach(block, t, n)
        self._hdr = block.buf[:24].cast("q")
        self._nbytes = ctypes.sizeof(self._obj)
        if extra:
            self._lock = extra[0]
        return self

    def _extra(self) -> tuple[Any, ...]:
        return (self._type, self._len, self._lock)

    def _data(self) -> memoryview:
        return self._block.buf[self._DATA_AT : self._DATA_AT + self._nbytes]

    def _undo(self) -> memoryview:
        start = self._DATA_AT + ((self._nbytes + 7) & ~7)
        return self._block.buf[start : start + self._nbytes]

    def _fix(self) -> None:
        if self._hdr[_A_VALID]:
            self._rollback()

    def _rollback(self) -> None:
        hdr = self._hdr
        start, length = hdr[_A_START], hdr[_A_LEN]
        if start >= 0 and length >= 0 and start + length <= self._nbytes:
            self._data()[start : start + length] = self._undo()[start : start + length]
        hdr[_A_VALID] = 0

    def _write(self, start: int, new: bytes) -> None:
        """Replace data[start : start+len(new)] so that a crash leaves old or new bytes."""
        end = start + len(new)
        hdr = self._hdr
        try:
            _step()
            self._undo()[start:end] = self._data()[start:end]
            _step()
            hdr[_A_START] = start
            _step()
            hdr[_A_LEN] = end - start
            _step()
            hdr[_A_VALID] = 1
            _step()
            self._data()[start:end] = new
            _step()
            hdr[_A_VALID] = 0
        except BaseException:
            if hdr[_A_VALID]:
                self._rollback()
            raise

    def _modify(self, edit: Callable[[Any], object], span: tuple[int, int] | None) -> None:
        """Apply ``edit`` to a private copy, then write the changed byte span back."""
        tmp = type(self._obj).from_buffer_copy(self._data())
        edit(tmp)  # ctypes checks types and sizes here, before any shared write
        lo, hi = span if span is not None else (0, self._nbytes)
        if hi > lo:
            self._write(lo, bytes(memoryview(tmp).cast("B")[lo:hi]))

    def _span(self, key: Any) -> tuple[int, int] | None:
        size = ctypes.sizeof(self._type)
        if isinstance(key, slice):
            idx = range(*key.indices(self._len))
            if not idx:
                return (0, 0)
            return (min(idx[0], idx[-1]) * size, (max(idx[0], idx[-1]) + 1) * size)
        return None

    def __getitem__(self, key: Any) -> Any:
        with self._lock:
            self._fix()
            return self._obj[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        with self._lock:
            self._fix()
            if isinstance(key, int) and ctypes.sizeof(self._type) <= 8:
                _step()
                self._obj[key] = value  # one aligned store
                return

            def edit(tmp: Any) -> None:
                tmp[key] = value

            self._modify(edit, self._span(key))

    def _check(self) -> list[str]:
        problems = self._lock._check()
        return problems + (["undo record still valid"] if self._hdr[_A_VALID] else [])


class CharArray(Array):
    """An Array of ``'c'``: adds ``.value`` and ``.raw`` as sharedctypes' SynchronizedString."""

    __slots__ = ()
    _TAG = "CharArray"

    def _get_attr(self, name: str) -> bytes:
        with self._lock:
            self._fix()
            return bytes(getattr(self._obj, name))

    def _set_attr(self, name: str, value: bytes) -> None:
        """Assign ``value`` or ``raw`` through the undo-logged whole-array write."""
        with self._lock:
            self._fix()
            self._modify(lambda tmp: setattr(tmp, name, value), None)

    @property
    def value(self) -> bytes:
        return self._get_attr("value")

    @value.setter
    def value(self, value: bytes) -> None:
        self._set_attr("value", value)

    @property
    def raw(self) -> bytes:
        return self._get_attr("raw")

    @raw.setter
    def raw(self, value: bytes) -> None:
        self._set_attr("raw", value)


_CLASSES: dict[str, Any] = {
    cls._TAG: cls
    for cls in (
        Lock,
        RLock,
        Semaphore,
        BoundedSemaphore,
        Event,
        Condition,
        Barrier,
        RawValue,
        Value,
        RawArray,
        Array,
        CharArray,
    )
}
