"""Tests of sharedobj.sync: robust cross-process mutexes and futex conditions.

Timing assertions are only timeout-accuracy bounds.  The design target is that
a timed wait returns within 10 ms of its timeout (measured by
``benchmarks/locks.py``); here the upper slack is 150 ms so the suite stays
reliable under ``pytest -n 2`` on a 2-core machine, and the lower bound is
strict: a wait must never return early.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sharedobj import segment
from sharedobj.segment import Segment
from sharedobj.sync import (
    CONDITION_SLOT_SIZE,
    MUTEX_SLOT_SIZE,
    WAIT_SLICE,
    RobustMutex,
    SharedCondition,
    implementation,
)

pytestmark = pytest.mark.timeout(60)

FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")
UPPER_SLACK = 0.15  # seconds: catches a hang or a restarted timeout; the 10 ms target is measured in benchmarks/locks.py
EPS = 0.0005  # float rounding of monotonic() differences

M_OFF = 0  # mutex slot
C_OFF = 64  # condition slot
CNT_OFF = 128  # a u64 counter guarded by the mutex
M2_OFF = 192  # a second mutex slot (left uninitialised unless a test needs it)


@pytest.fixture
def seg() -> Iterator[Segment]:
    s = segment.create(4096)
    try:
        yield s
    finally:
        s.close()
        s.remove()  # already IPC_RMID (auto_remove); harmless, and sure


@pytest.fixture
def mutex(seg: Segment) -> RobustMutex:
    return RobustMutex.initialize(seg.buf, M_OFF)


@contextlib.contextmanager
def running(ctx: Any, target: Callable[..., object], *args: object) -> Iterator[Any]:
    """Start a process; whatever happens, it is gone when the block ends."""
    p = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    try:
        yield p
    finally:
        if p.is_alive():
            p.kill()
        p.join(10)


def counter(seg: Segment) -> memoryview:
    return seg.buf[CNT_OFF : CNT_OFF + 8].cast("Q")


# --------------------------------------------------------------------------
# children (module level so that spawn can find them)


def _increment(m: RobustMutex, cnt: memoryview, n: int) -> None:
    for _ in range(n):
        with m:
            v = cnt[0]
            if v % 7 == 0:
                time.sleep(0)  # give the scheduler a chance to interleave inside
            cnt[0] = v + 1


def _child_increment(m: RobustMutex, seg: Segment, n: int) -> None:
    _increment(m, counter(seg), n)


def _spawned_increment(seg: Segment, n: int) -> None:
    m = RobustMutex(seg.buf, M_OFF)
    _increment(m, counter(seg), n)


def _die_holding(m: RobustMutex, how: str) -> None:
    m.acquire()
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


def _hold(m: RobustMutex, ready: Any, stop: Any) -> None:
    m.acquire()
    ready.set()
    stop.wait(30)
    m.release()


def _block_on(m: RobustMutex, ready: Any) -> None:
    ready.set()
    m.acquire()
    m.release()


def _fork_probe(m: RobustMutex) -> None:
    # The parent holds m: we must neither get it nor be able to release it.
    if m.acquire(blocking=False):
        os._exit(10)
    try:
        m.release()
    except RuntimeError:
        os._exit(0)
    os._exit(11)


def _release_not_owner(m: RobustMutex) -> None:
    try:
        m.release()
    except RuntimeError:
        os._exit(0)
    os._exit(1)


def _cond_waiter(c: SharedCondition, ready: Any, results: Any, timeout: float) -> None:
    with c:
        ready.release()
        results.put(c.wait(timeout))


def _cond_wait_for_counter(c: SharedCondition, seg: Segment, target: int, results: Any) -> None:
    cnt = counter(seg)
    with c:
        results.put(c.wait_for(lambda: cnt[0] >= target, timeout=10))


def _cond_bump(c: SharedCondition, seg: Segment, times: int) -> None:
    cnt = counter(seg)
    for _ in range(times):
        with c:
            cnt[0] += 1
            c.notify_all()
        time.sleep(0.005)


def _cond_waiter_forever(c: SharedCondition, ready: Any) -> None:
    with c:
        ready.release()
        c.wait()


# --------------------------------------------------------------------------
# basics and bad input


def test_threading_lock_semantics(mutex: RobustMutex) -> None:
    assert not mutex.locked()
    assert mutex.acquire() is True
    assert mutex.owner_died is False
    assert mutex.locked()
    assert mutex.holder_tid() == threading.get_native_id()
    assert mutex.acquire(blocking=False) is False  # the holder's own try fails
    assert mutex.acquire(timeout=0) is False
    t0 = time.monotonic()
    assert mutex.acquire(timeout=0.05) is False  # waits it out, like threading.Lock
    assert 0.05 - EPS <= time.monotonic() - t0 <= 0.05 + UPPER_SLACK
    with pytest.raises(RuntimeError, match="already holds"):
        mutex.acquire()
    mutex.release()
    assert not mutex.locked()
    with pytest.raises(RuntimeError, match="un-acquired"):
        mutex.release()
    with mutex as got:
        assert got is True
        assert mutex.locked()
    assert not mutex.locked()
    assert mutex.acquire(True, -1)
    mutex.release()
    assert "RobustMutex offset=0" in repr(mutex)


def test_attach_second_handle_shares_state(seg: Segment, mutex: RobustMutex) -> None:
    other = RobustMutex(seg.buf, M_OFF)
    again = pickle.loads(pickle.dumps(seg))
    try:
        third = RobustMutex(again.buf, M_OFF)
        with other:
            assert mutex.locked() and third.locked()
            got: list[bool] = []
            t = threading.Thread(target=lambda: got.append(third.acquire(blocking=False)))
            t.start()
            t.join()
            assert got == [False]
        assert not third.locked()
    finally:
        again.close()


def test_release_from_other_thread_raises(mutex: RobustMutex) -> None:
    errors: list[BaseException] = []

    def rel() -> None:
        try:
            mutex.release()
        except RuntimeError as e:
            errors.append(e)

    with mutex:
        t = threading.Thread(target=rel)
        t.start()
        t.join()
    assert len(errors) == 1


def test_threads_mutual_exclusion(seg: Segment, mutex: RobustMutex) -> None:
    cnt = counter(seg)
    threads = [threading.Thread(target=_increment, args=(mutex, cnt, 2000)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cnt[0] == 8000


def test_bad_input(seg: Segment, mutex: RobustMutex) -> None:
    buf = seg.buf
    for bad_buf in (12, "abc", None, 1.5):
        with pytest.raises(TypeError, match="writable buffer"):
            RobustMutex(bad_buf, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="read-only"):
        RobustMutex(bytes(128), 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="read-only"):
        RobustMutex.initialize(buf.toreadonly(), 0)
    for bad_off in (1.0, "0", True, None):
        with pytest.raises(TypeError, match="offset must be an int"):
            RobustMutex(buf, bad_off)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a multiple of 8"):
        RobustMutex.initialize(buf, 12)
    with pytest.raises(ValueError, match="does not fit"):
        RobustMutex.initialize(buf, -64)
    with pytest.raises(ValueError, match="does not fit"):
        RobustMutex.initialize(buf, len(buf) - 32)
    with pytest.raises(ValueError, match="offset 192"):
        RobustMutex(buf, M2_OFF)  # never initialised
    with pytest.raises(TypeError, match="callable"):
        RobustMutex(buf, M_OFF, on_owner_dead=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-blocking"):
        mutex.acquire(False, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        mutex.acquire(timeout=-2)
    with pytest.raises(TypeError, match="timeout"):
        mutex.acquire(timeout="1")  # type: ignore[arg-type]
    assert not mutex.locked()  # no failed call left it held
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(mutex)
    # a bytearray works (tests, single process): same API
    ba = bytearray(MUTEX_SLOT_SIZE + CONDITION_SLOT_SIZE)
    local = RobustMutex.initialize(ba, 0)
    with local:
        pass
    # conditions
    with pytest.raises(TypeError, match="RobustMutex"):
        SharedCondition.initialize(buf, C_OFF, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a multiple of 4"):
        SharedCondition.initialize(buf, C_OFF + 2, mutex)
    with pytest.raises(ValueError, match="does not fit"):
        SharedCondition.initialize(buf, len(buf) - 8, mutex)
    with pytest.raises(ValueError, match=f"offset {C_OFF}"):
        SharedCondition(buf, C_OFF, mutex)  # never initialised
    c = SharedCondition.initialize(buf, C_OFF, mutex)
    with pytest.raises(RuntimeError, match="un-acquired"):
        c.wait(0.01)
    with pytest.raises(RuntimeError, match="un-acquired"):
        c.notify()
    with c, pytest.raises(TypeError):
        c.notify("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(c)


def test_implementation_describes_this_machine() -> None:
    impl = implementation()
    assert set(impl) >= {"lock", "wait"}
    assert all(isinstance(v, str) and v for v in impl.values())
    assert "robust" in impl["lock"]
    assert "futex" in impl["wait"]
    libc = os.confstr("CS_GNU_LIBC_VERSION")
    if libc:
        assert libc in impl["lock"]


# --------------------------------------------------------------------------
# across processes


@pytest.mark.parametrize("nproc", [2, 4])
def test_mutual_exclusion_fork(seg: Segment, mutex: RobustMutex, nproc: int) -> None:
    n = 2000
    procs = [FORK.Process(target=_child_increment, args=(mutex, seg, n)) for _ in range(nproc)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    assert counter(seg)[0] == nproc * n


def test_mutual_exclusion_spawn(seg: Segment, mutex: RobustMutex) -> None:
    n = 1000
    procs = [SPAWN.Process(target=_spawned_increment, args=(seg, n)) for _ in range(2)]
    try:
        for p in procs:
            p.start()
        _increment(mutex, counter(seg), n)
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    assert counter(seg)[0] == 3 * n


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_owner_death_runs_callback_once(seg: Segment, how: str) -> None:
    calls: list[int] = []
    m = RobustMutex.initialize(seg.buf, M_OFF, on_owner_dead=lambda mm: calls.append(mm.offset))
    with running(FORK, _die_holding, m, how) as p:
        p.join(10)
        assert p.exitcode == (-signal.SIGKILL if how == "sigkill" else 3)
    assert m.acquire(timeout=5) is True
    assert m.owner_died is True
    assert calls == [M_OFF]
    assert not m.recovery_pending
    m.release()
    assert m.acquire(timeout=5) is True
    assert m.owner_died is False
    assert calls == [M_OFF]
    m.release()


def test_owner_death_without_callback(seg: Segment, mutex: RobustMutex) -> None:
    with running(FORK, _die_holding, mutex, "sigkill") as p:
        p.join(10)
    assert mutex.acquire(blocking=False) is True  # EOWNERDEAD on the fast path too
    assert mutex.owner_died and mutex.recovery_pending
    mutex.release()  # not repaired: the next acquirer is told again
    other = RobustMutex(seg.buf, M_OFF)
    assert other.acquire() is True
    assert other.owner_died
    other.mark_recovered()
    assert not other.recovery_pending
    other.release()
    with pytest.raises(RuntimeError, match="mark_recovered"):
        other.mark_recovered()  # not held
    assert mutex.acquire() and not mutex.owner_died
    mutex.release()


def test_failing_recovery_is_retried(seg: Segment) -> None:
    attempts: list[str] = []

    def flaky(mm: RobustMutex) -> None:
        attempts.append("x")
        if len(attempts) == 1:
            raise OSError("repair failed")

    m = RobustMutex.initialize(seg.buf, M_OFF, on_owner_dead=flaky)
    with running(FORK, _die_holding, m, "sigkill") as p:
        p.join(10)
    with pytest.raises(OSError, match="repair failed"), m:
        pytest.fail("the with-body must not run when recovery failed")
    assert not m.locked()  # released, so nobody deadlocks
    assert m.recovery_pending
    with m:
        assert m.owner_died  # told again
    assert attempts == ["x", "x"]
    assert not m.recovery_pending
    with m:
        assert not m.owner_died


def _die_in_recovery(seg: Segment) -> None:
    m = RobustMutex(seg.buf, M_OFF, on_owner_dead=lambda mm: os.kill(os.getpid(), signal.SIGKILL))
    m.acquire()
    os._exit(5)  # not reached


def test_recoverer_dies_too(seg: Segment) -> None:
    calls: list[int] = []
    m = RobustMutex.initialize(seg.buf, M_OFF, on_owner_dead=lambda mm: calls.append(1))
    with running(FORK, _die_holding, m, "sigkill") as p:
        p.join(10)
    with running(FORK, _die_in_recovery, seg) as p:
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
    assert m.acquire(timeout=5)
    assert m.owner_died and calls == [1]
    m.release()


def test_dead_waiter_disturbs_nothing(seg: Segment, mutex: RobustMutex) -> None:
    mutex.acquire()
    ready = FORK.Event()
    with running(FORK, _block_on, mutex, ready) as p:
        assert ready.wait(10)
        time.sleep(0.1)  # let it block inside the lock call
        p.kill()
        p.join(10)
    mutex.release()
    assert mutex.acquire(timeout=1) and not mutex.owner_died
    mutex.release()
    with running(FORK, _child_increment, mutex, seg, 100) as p:
        p.join(10)
        assert p.exitcode == 0
    assert counter(seg)[0] == 100


def test_non_owner_process_release_raises(mutex: RobustMutex) -> None:
    with running(FORK, _release_not_owner, mutex) as p:
        p.join(10)
        assert p.exitcode == 0
    mutex.acquire()
    try:
        with running(FORK, _release_not_owner, mutex) as p:
            p.join(10)
            assert p.exitcode == 0
        assert mutex.locked()
    finally:
        mutex.release()


def test_fork_child_does_not_inherit_ownership(mutex: RobustMutex) -> None:
    with mutex:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _fork_probe(mutex)
            finally:
                os._exit(12)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@contextlib.contextmanager
def held_elsewhere(m: RobustMutex) -> Iterator[None]:
    ready, stop = FORK.Event(), FORK.Event()
    with running(FORK, _hold, m, ready, stop) as p:
        assert ready.wait(10)
        try:
            yield
        finally:
            stop.set()
            p.join(10)


@pytest.mark.parametrize("timeout", [0.01, 0.05, 0.2])
def test_timed_acquire_accuracy(mutex: RobustMutex, timeout: float) -> None:
    with held_elsewhere(mutex):
        for _ in range(3):
            t0 = time.monotonic()
            assert mutex.acquire(timeout=timeout) is False
            elapsed = time.monotonic() - t0
            assert timeout - EPS <= elapsed <= timeout + UPPER_SLACK, elapsed
        t0 = time.monotonic()
        assert mutex.acquire(blocking=False) is False
        assert mutex.acquire(timeout=0) is False
        assert time.monotonic() - t0 <= UPPER_SLACK
    assert mutex.acquire(timeout=5)  # and it is free again once the holder left
    mutex.release()


def test_our_timeout_works_regardless_of_sysv_ipc(mutex: RobustMutex) -> None:
    sysv_ipc = pytest.importorskip("sysv_ipc")
    if sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED:
        # Informational only: this wheel has semtimedop.  Our timeout does not
        # depend on it either way.
        warnings.warn("sysv_ipc now supports semaphore timeouts", stacklevel=1)
    else:
        assert sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED is False
    with held_elsewhere(mutex):
        t0 = time.monotonic()
        assert mutex.acquire(timeout=0.1) is False
        assert 0.1 - EPS <= time.monotonic() - t0 <= 0.1 + UPPER_SLACK


@contextlib.contextmanager
def ticking_signal(interval: float, handler: Callable[[int, Any], None]) -> Iterator[None]:
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)


def test_signals_do_not_shorten_or_extend_a_timed_acquire(mutex: RobustMutex) -> None:
    ticks: list[int] = []
    with held_elsewhere(mutex), ticking_signal(0.007, lambda s, f: ticks.append(s)):
        t0 = time.monotonic()
        assert mutex.acquire(timeout=0.2) is False
        elapsed = time.monotonic() - t0
    assert ticks, "the signal handler never ran"
    assert 0.2 - EPS <= elapsed <= 0.2 + UPPER_SLACK, elapsed


class _Interrupt(Exception):
    pass


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise _Interrupt


def test_untimed_acquire_is_interruptible(mutex: RobustMutex) -> None:
    with held_elsewhere(mutex), ticking_signal(0.1, _raise_interrupt):
        t0 = time.monotonic()
        with pytest.raises(_Interrupt):
            mutex.acquire()
        elapsed = time.monotonic() - t0
    # the handler runs at the end of the current wait slice at the latest
    assert 0.1 - EPS <= elapsed <= 0.1 + WAIT_SLICE + UPPER_SLACK, elapsed
    assert not mutex.locked()


# --------------------------------------------------------------------------
# conditions


@pytest.fixture
def cond(seg: Segment, mutex: RobustMutex) -> SharedCondition:
    return SharedCondition.initialize(seg.buf, C_OFF, mutex)


def test_condition_notify_wakes_other_process(cond: SharedCondition) -> None:
    ready, results = FORK.Semaphore(0), FORK.Queue()
    with running(FORK, _cond_waiter, cond, ready, results, 10.0) as p:
        assert ready.acquire(timeout=10)
        with cond:  # the waiter released the mutex: it is inside wait()
            cond.notify()
        assert results.get(timeout=10) is True
        p.join(10)
        assert p.exitcode == 0


@pytest.mark.parametrize("timeout", [0.01, 0.05, 0.2])
def test_condition_wait_timeout(cond: SharedCondition, timeout: float) -> None:
    with cond:
        t0 = time.monotonic()
        assert cond.wait(timeout) is False
        elapsed = time.monotonic() - t0
        assert cond.mutex.holder_tid() == threading.get_native_id()  # re-acquired
    assert timeout - EPS <= elapsed <= timeout + UPPER_SLACK, elapsed


def test_condition_wait_survives_signals(cond: SharedCondition) -> None:
    ticks: list[int] = []
    with cond, ticking_signal(0.007, lambda s, f: ticks.append(s)):
        t0 = time.monotonic()
        assert cond.wait(0.2) is False
        elapsed = time.monotonic() - t0
    assert ticks
    assert 0.2 - EPS <= elapsed <= 0.2 + UPPER_SLACK, elapsed


def test_condition_notify_all_wakes_several(cond: SharedCondition) -> None:
    ready, results = FORK.Semaphore(0), FORK.Queue()
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(running(FORK, _cond_waiter, cond, ready, results, 10.0))
            for _ in range(3)
        ]
        for _ in procs:
            assert ready.acquire(timeout=10)
        with cond:
            cond.notify_all()
        assert sorted(results.get(timeout=10) for _ in procs) == [True] * 3
        for p in procs:
            p.join(10)
            assert p.exitcode == 0


def test_condition_wait_for_predicate(seg: Segment, cond: SharedCondition) -> None:
    results = FORK.Queue()
    with running(FORK, _cond_wait_for_counter, cond, seg, 5, results) as waiter:
        with running(FORK, _cond_bump, cond, seg, 5) as bumper:
            bumper.join(10)
        assert results.get(timeout=10) is True
        waiter.join(10)
    cnt = counter(seg)
    with cond:
        assert cond.wait_for(lambda: cnt[0] >= 5, timeout=0) is True
        t0 = time.monotonic()
        assert cond.wait_for(lambda: cnt[0] >= 6, timeout=0.05) is False
        assert 0.05 - EPS <= time.monotonic() - t0 <= 0.05 + UPPER_SLACK


def test_condition_killed_waiter_breaks_nothing(cond: SharedCondition) -> None:
    ready, results = FORK.Semaphore(0), FORK.Queue()
    with running(FORK, _cond_waiter_forever, cond, ready) as p:
        assert ready.acquire(timeout=10)
        with cond:  # it is asleep in the futex now (or about to be)
            pass
        p.kill()
        p.join(10)
    with cond:
        cond.notify()  # the inflated waiter count only costs a wake syscall
        t0 = time.monotonic()
        assert cond.wait(0.05) is False
        assert 0.05 - EPS <= time.monotonic() - t0 <= 0.05 + UPPER_SLACK
        assert not cond.mutex.owner_died
    with running(FORK, _cond_waiter, cond, ready, results, 10.0) as p:
        assert ready.acquire(timeout=10)
        with cond:
            cond.notify()
        assert results.get(timeout=10) is True
        p.join(10)


def _die_later(m: RobustMutex, ready: Any, delay: float) -> None:
    m.acquire()
    ready.set()
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_owner_dies_while_we_wait(seg: Segment, timeout: float | None) -> None:
    calls: list[int] = []
    m = RobustMutex.initialize(seg.buf, M_OFF, on_owner_dead=lambda mm: calls.append(1))
    ready = FORK.Event()
    with running(FORK, _die_later, m, ready, 0.15) as p:
        assert ready.wait(10)
        assert m.acquire(timeout=timeout) is True  # EOWNERDEAD from the blocking call
        try:
            assert m.owner_died and calls == [1] and not m.recovery_pending
        finally:
            m.release()
        p.join(10)


def test_timedlock_fallback_accuracy(mutex: RobustMutex) -> None:
    # What happens on a libc without pthread_mutex_clocklock (glibc < 2.30).
    mutex._clocklock = None
    with held_elsewhere(mutex):
        for timeout in (0.05, 0.12):
            t0 = time.monotonic()
            assert mutex.acquire(timeout=timeout) is False
            elapsed = time.monotonic() - t0
            assert timeout - EPS <= elapsed <= timeout + UPPER_SLACK, elapsed
    assert mutex.acquire(timeout=5)
    mutex.release()
