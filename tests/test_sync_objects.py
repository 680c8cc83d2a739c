"""Locks, waits, Value and Array from the manager: the stdlib as oracle, processes, deaths.

The same scenario runs on the :mod:`threading` objects, on the proxies of a
``multiprocessing.Manager()`` and on ours, and must record the same results
and exceptions.  Value and Array are compared with ``multiprocessing.Value``
and ``Array`` (the typed sharedctypes objects).  Then: every start method and
``Pool`` arguments, holders and parties SIGKILLed, timeouts, Ctrl-C, and a
process killed (or interrupted) at every shared write of every operation.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import os
import pickle
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable
from multiprocessing.managers import RemoteError
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import crash_points, run_killed_at
from sharedobj import SharedMemoryManager
from sharedobj.containers import sync_objects as so

METHODS = ["fork", "spawn", "forkserver"]


def outcome(fn: Callable[[], Any]) -> Any:
    """A call's result, or the name of the exception it raised."""
    try:
        return ("ok", fn())
    except RemoteError as exc:  # a Manager() failing to make an object: the server's error
        names = re.findall(r"^(\w+(?:Error|Exception)):", str(exc), re.MULTILINE)
        return ("raise", names[-1] if names else "RemoteError")
    except Exception as exc:
        return ("raise", type(exc).__name__)


def probe(lock: Any, *args: Any, **kwargs: Any) -> Any:
    """Try ``lock`` from another thread, and give it back if that worked.

    A thread must not exit holding one of our locks: it is a robust mutex,
    so the next acquirer would get it, where a stdlib lock stays held.
    """

    def attempt() -> bool:
        got = bool(lock.acquire(*args, **kwargs))
        if got:
            lock.release()
        return got

    return in_thread(attempt)


def in_thread(fn: Callable[[], Any]) -> Any:
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(outcome(fn)))
    t.start()
    t.join(30)
    return box[0]


# ---------------------------------------------------------------------------
# differential: threading, Manager() proxies and ours run the same scenario


def sc_lock(ns: Any) -> list[Any]:
    lock = ns.Lock()
    out = [
        outcome(lock.acquire),
        probe(lock, False),
        probe(lock, timeout=0.05),
        outcome(lock.release),
        outcome(lock.release),
        outcome(lambda: lock.acquire(False, 1)),
        outcome(lambda: lock.acquire(True, -2)),
        probe(lock, timeout=0.05),
        outcome(lambda: lock.acquire(False)),
    ]
    lock.release() if out[-1] == ("ok", True) else None
    return out


def sc_rlock(ns: Any) -> list[Any]:
    lock = ns.RLock()
    out = [outcome(lock.release), outcome(lock.acquire), outcome(lock.acquire)]
    out += [probe(lock, timeout=0.05), in_thread(lock.release)]
    out += [outcome(lock.release), probe(lock, False)]
    out += [outcome(lock.release), probe(lock, False), outcome(lock.release)]
    with lock, lock:
        out.append(probe(lock, False))
    out.append(probe(lock, timeout=0.05))
    return out


def sc_semaphore(ns: Any) -> list[Any]:
    out = [outcome(lambda: ns.Semaphore(-1))]
    sem = ns.Semaphore(2)
    out += [outcome(sem.acquire), outcome(sem.acquire), outcome(lambda: sem.acquire(False))]
    out += [outcome(lambda: sem.acquire(timeout=0.05)), outcome(lambda: sem.acquire(False, 1))]
    out += [outcome(sem.release), in_thread(lambda: sem.acquire(timeout=1))]
    out += [outcome(sem.release), outcome(sem.release), outcome(sem.release)]
    bounded = ns.BoundedSemaphore(1)
    out += [outcome(bounded.release), outcome(bounded.acquire), outcome(bounded.release)]
    out += [outcome(bounded.release)]
    with bounded:
        out.append(outcome(lambda: bounded.acquire(False)))
    out.append(outcome(lambda: bounded.acquire(False)))
    return out


def sc_event(ns: Any) -> list[Any]:
    ev = ns.Event()
    out = [ev.is_set(), ev.wait(0.05), ev.wait(0), ev.wait(-1), outcome(lambda: ev.wait("x"))]
    waiter = threading.Thread(target=lambda: out.append(("woken", ev.wait(30))))
    waiter.start()
    time.sleep(0.05)
    ev.set()
    waiter.join(30)
    out += [ev.is_set(), ev.wait(), ev.wait(0.05)]
    ev.clear()
    ev.clear()
    out += [ev.is_set(), ev.wait(0.02)]
    return out


def sc_condition(ns: Any) -> list[Any]:
    cond = ns.Condition()
    out = [outcome(cond.wait), outcome(cond.notify), outcome(cond.notify_all)]
    with cond:
        out += [cond.wait(0.05), cond.wait_for(lambda: False, 0.05), cond.wait(0)]
        with cond:  # RLock by default: wait releases every level
            out.append(probe(cond, timeout=0.02))

            def notifier() -> None:
                with cond:
                    cond.notify()

            t = threading.Thread(target=notifier)
            t.start()
            out.append(cond.wait(30))
            t.join(30)
    items: list[int] = []
    got: list[int] = []

    def consumer() -> None:
        for _ in range(5):
            with cond:
                cond.wait_for(lambda: len(items) > len(got), 30)
                got.append(items[len(got)])
                cond.notify_all()

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(5):
        with cond:
            items.append(i * i)
            cond.notify()
            cond.wait_for(lambda i=i: len(got) > i, 30)
    t.join(30)
    out.append(got)
    plain = ns.Condition(ns.Lock())
    with plain:
        out.append(plain.wait(0.01))
    out.append(outcome(plain.wait))
    return out


def sc_barrier(ns: Any) -> list[Any]:
    bar = ns.Barrier(3)
    out: list[Any] = [bar.parties, bar.n_waiting, bar.broken]
    for _ in range(2):  # two phases
        results: list[Any] = []

        def party(results: list[Any] = results) -> None:
            results.append(outcome(lambda: bar.wait(30)))

        threads = [threading.Thread(target=party) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        out.append(sorted(results))
    late: list[Any] = []
    t = threading.Thread(target=lambda: late.append(outcome(lambda: bar.wait(30))))
    t.start()
    while bar.n_waiting != 1:
        time.sleep(0.01)
    out.append(bar.n_waiting)
    bar.abort()
    t.join(30)
    out += [late, bar.broken, outcome(bar.wait)]
    bar.reset()
    out += [bar.broken, outcome(lambda: bar.wait(0.05)), bar.broken]
    bar.reset()
    out.append(bar.broken)
    return out


SCENARIOS = [sc_lock, sc_rlock, sc_semaphore, sc_event, sc_condition, sc_barrier]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_same_as_threading_and_manager(
    smm: SharedMemoryManager, std_manager: Any, scenario: Callable[[Any], Any]
) -> None:
    expected = scenario(threading)
    assert scenario(smm) == expected
    assert scenario(std_manager) == expected


def test_lock_differences_from_threading_are_the_documented_ones(smm: SharedMemoryManager) -> None:
    lock = smm.Lock()
    lock.acquire()
    # threading.Lock may be released by another thread; ours belongs to its holder
    assert in_thread(lock.release) == ("raise", "RuntimeError")
    # an untimed re-acquire by the holder raises instead of deadlocking
    with pytest.raises(RuntimeError, match="deadlock"):
        lock.acquire()
    assert lock.acquire(timeout=0.01) is False
    lock.release()


def test_a_thread_that_exits_holding_a_lock_is_a_dead_holder(smm: SharedMemoryManager) -> None:
    # threading.Lock would stay held forever; a robust mutex goes to the next acquirer
    lock = smm.Lock()
    assert in_thread(lock.acquire) == ("ok", True)
    with pytest.warns(so.OwnerDiedWarning):
        # the kernel frees it when the thread is really gone, just after join() returns
        assert lock.acquire(timeout=5)
    assert lock.owner_died
    lock.release()


def test_release_n_and_wait_for_like_threading(smm: SharedMemoryManager) -> None:
    for ns in (threading, smm):
        sem = ns.Semaphore(0)
        sem.release(3)
        results = [sem.acquire(False) for _ in range(4)]
        assert results == [True, True, True, False]
        with pytest.raises(ValueError, match="one or more"):
            sem.release(0)
        bounded = ns.BoundedSemaphore(2)
        bounded.acquire()
        with pytest.raises(ValueError):
            bounded.release(2)
    assert smm.Semaphore(5).get_value() == 5


def test_barrier_action_runs_once_per_phase_like_threading(smm: SharedMemoryManager) -> None:
    def run(ns: Any) -> list[Any]:
        calls: list[str] = []
        bar = ns.Barrier(2, action=lambda: calls.append(threading.current_thread().name))
        names: dict[str, int] = {}

        def party() -> None:
            names[threading.current_thread().name] = bar.wait(30)

        threads = [threading.Thread(target=party, name=f"p{i}") for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # the action ran in the party that arrived last (index parties-1)
        assert names[calls[0]] == 1
        failing = ns.Barrier(1, action=lambda: 1 / 0)
        return [len(calls), outcome(failing.wait), failing.broken, outcome(failing.wait)]

    assert run(smm) == run(threading)


# ---------------------------------------------------------------------------
# Value and Array: the same as multiprocessing.Value / Array


def sc_values(ns: Any) -> list[Any]:
    out: list[Any] = []
    v = ns.Value("i", 5)
    out.append(v.value)
    v.value = 7
    v.value += 1
    with v.get_lock():
        v.value += 1  # the default lock is reentrant
        out.append(v.value)
    out.append(v.get_lock().acquire(False))
    v.get_lock().release()
    out.append(v.get_obj().value)
    for code, val in [("d", 1.5), ("c", b"x"), ("u", "\u00e9"), ("b", -3), ("Q", 2**64 - 1)]:
        out.append(ns.Value(code, val).value)
    out.append(ns.Value(ctypes.c_bool, True).value)
    out.append(ns.Value("i", 2**40).value)  # ctypes truncation, as multiprocessing
    out.append(ns.Value(ctypes.c_double, 3).value)
    out.append(outcome(lambda: ns.Value("i", "abc")))
    out.append(outcome(lambda: ns.Value("z", 1)))
    raw = ns.Value("h", 3, lock=False)
    out += [raw.value, hasattr(raw, "get_lock")]
    raw.value = 4
    out.append(raw.value)
    return out


def sc_arrays(ns: Any) -> list[Any]:
    a = ns.Array("i", range(6))
    out: list[Any] = [len(a), a[0], a[-1], a[1:4], a[::2], a[::-1], list(a), a[:]]
    a[1:3] = [10, 20]
    a[::2] = [7, 8, 9]
    a[5] = -1
    a[-2] = 33
    out.append(a[:])
    out.append(outcome(lambda: a.__setitem__(slice(0, 2), [1])))
    out.append(outcome(lambda: a[10]))
    out.append(outcome(lambda: a["x"]))
    out.append(outcome(lambda: a.__setitem__(0, "x")))
    out.append(outcome(lambda: a.__setitem__(slice(0, 2), ["a", "b"])))
    out.append(a[:])
    with a.get_lock():
        a[0] = 99
        out.append(a[0])
    s = ns.Array("c", b"hello world")
    out += [s.value, s.raw, s[0], s[1:3], len(s)]
    s.value = b"hi"
    out += [s.value, s.raw]
    s.raw = b"0123456789A"
    out += [s.value, s[:]]
    out.append(outcome(lambda: setattr(s, "raw", b"x" * 20)))
    out.append(s.raw)
    z = ns.Array("d", 3)
    out += [z[:], ns.Array("u", "abc")[:]]
    out.append(outcome(lambda: ns.Array("i", [1.5])))
    out.append(outcome(lambda: ns.Array("i", -1)))
    raw = ns.Array("b", [1, 2], lock=False)
    out += [raw[:], hasattr(raw, "get_lock"), len(raw)]
    return out


@pytest.mark.parametrize("scenario", [sc_values, sc_arrays], ids=lambda f: f.__name__)
def test_value_and_array_same_as_multiprocessing(
    smm: SharedMemoryManager, scenario: Callable[[Any], Any]
) -> None:
    ctx = mp.get_context("fork")
    assert scenario(smm) == scenario(ctx)


def test_value_get_set_like_a_manager_valueproxy(
    smm: SharedMemoryManager, std_manager: Any
) -> None:
    for ns in (std_manager, smm):
        v = ns.Value("d", 1.0)
        v.set(2.5)
        assert v.get() == 2.5
        assert v.value == 2.5


def test_value_and_array_share_a_given_lock(smm: SharedMemoryManager) -> None:
    lock = smm.RLock()
    v = smm.Value("i", 0, lock=lock)
    a = smm.Array("i", 2, lock=lock)
    assert v.get_lock() is lock and a.get_lock() is lock
    with lock:
        v.value = 1
        a[0] = 2
        assert probe(lock, False) == ("ok", False)
    plain = smm.Lock()
    w = smm.Value("i", 0, lock=plain)
    w.value = 5  # a non-reentrant lock works as long as the caller does not hold it
    assert w.value == 5
    cond = smm.Condition(lock)
    with cond:
        assert cond.wait(0.01) is False


# ---------------------------------------------------------------------------
# bad input


def test_bad_input_raises_clear_errors(smm: SharedMemoryManager) -> None:
    with pytest.raises(TypeError, match="typecode"):
        smm.Value(3.5, 1)
    with pytest.raises(TypeError, match="pointer"):
        smm.Value(ctypes.c_char_p, b"x")
    with pytest.raises(TypeError, match="lock"):
        smm.Value("i", 1, lock=threading.Lock())
    with pytest.raises(TypeError, match="lock"):
        smm.Array("i", 1, lock="yes")
    with pytest.raises(TypeError, match="Lock or RLock"):
        smm.Condition(threading.RLock())
    with pytest.raises(TypeError):
        smm.Semaphore(1.5)
    with pytest.raises(ValueError):
        smm.Semaphore(2**63)
    with pytest.raises(ValueError, match="parties"):
        smm.Barrier(0)
    with pytest.raises(TypeError, match="callable"):
        smm.Barrier(2, action=5)
    with pytest.raises(TypeError, match="timeout"):
        smm.Event().wait("soon")
    with pytest.raises(ValueError, match="NaN"):
        smm.Event().wait(float("nan"))
    with pytest.raises(TypeError):
        smm.Semaphore(1).release(1.0)
    with pytest.raises(ValueError, match="no sharedobj"):
        so._rebuild("Event", smm.Semaphore(1)._block.handle.data)
    with pytest.raises(ValueError, match="unknown"):
        so._rebuild("Nope", smm.Lock()._block.handle.data)


# ---------------------------------------------------------------------------
# pickling, processes, pools


def test_pickles_as_small_handles_and_one_object_per_process(smm: SharedMemoryManager) -> None:
    lock = smm.RLock()
    objects = [
        smm.Lock(),
        lock,
        smm.Semaphore(2),
        smm.BoundedSemaphore(2),
        smm.Event(),
        smm.Condition(lock),
        smm.Barrier(2, timeout=3.0),
        smm.Value("d", 1.0, lock=lock),
        smm.Array("c", b"abc", lock=lock),
        smm.Value("i", 1, lock=False),
        smm.Array("i", 2, lock=False),
    ]
    for obj in objects:
        data = pickle.dumps(obj)
        assert len(data) < 250, (obj, len(data))
        assert pickle.loads(data) is obj
    assert len(pickle.dumps(smm.Value("d", 1.0))) < 250


def _counter_child(lock: Any, value: Any, raw: Any, sem: Any, n: int) -> None:
    for _ in range(n):
        with value.get_lock():
            value.value += 1
        with lock:
            raw.value += 1
        with sem:
            pass


def _barrier_child(bar: Any, arr: Any, i: int, phases: int, errors: Any) -> None:
    for phase in range(phases):
        arr[i] = phase
        bar.wait(30)
        if any(x != phase for x in arr[:]):
            with errors.get_lock():
                errors.value += 1
        bar.wait(30)


def _producer(cond: Any, slot: Any, n: int) -> None:
    for i in range(1, n + 1):
        with cond:
            cond.wait_for(lambda: slot[0] == 0, 30)
            slot[0] = i
            cond.notify_all()


def _consumer(cond: Any, slot: Any, total: Any, n: int) -> None:
    for _ in range(n):
        with cond:
            cond.wait_for(lambda: slot[0] != 0, 30)
            total.value += slot[0]
            slot[0] = 0
            cond.notify_all()


def _run(ctx: Any, target: Callable[..., None], args_list: list[tuple[Any, ...]]) -> None:
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(procs)


@pytest.mark.parametrize("method", METHODS)
def test_processes_of_every_start_method(smm: SharedMemoryManager, method: str) -> None:
    ctx = mp.get_context(method)
    lock, sem = smm.Lock(), smm.BoundedSemaphore(2)
    value, raw = smm.Value("q", 0), smm.Value("q", 0, lock=False)
    _run(ctx, _counter_child, [(lock, value, raw, sem, 300)] * 2)
    assert (value.value, raw.value, sem.get_value()) == (600, 600, 2)  # no lost update

    arr, errors, actions = smm.Array("i", 3), smm.Value("i", 0), smm.Value("i", 0)
    bar = smm.Barrier(3, action=lambda: setattr(actions, "value", actions.value + 1))
    _run(ctx, _barrier_child, [(bar, arr, i, 5, errors) for i in range(3)])
    assert (errors.value, arr[:], bar.broken, bar._check()) == (0, [4, 4, 4], False, [])
    assert actions.value == 10  # the (cloudpickled) action ran once per phase, in a child

    cond, slot, total = smm.Condition(), smm.Array("q", 1), smm.Value("q", 0)
    procs = [
        ctx.Process(target=_producer, args=(cond, slot, 50)),
        ctx.Process(target=_consumer, args=(cond, slot, total, 50)),
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert total.value == sum(range(1, 51))


def _pool_task(args: tuple[Any, Any, Any, Any]) -> tuple[Any, int, int]:
    lock, value, event, sem = args
    with lock:
        value.value += 1
    with sem:
        pass
    event.set()
    return lock, id(lock), os.getpid()


def _noop(*args: Any) -> None:
    return None


@pytest.mark.parametrize("method", METHODS)
def test_pool_arguments_and_results(smm: SharedMemoryManager, method: str) -> None:
    ctx = mp.get_context(method)
    lock, value, event, sem = smm.Lock(), smm.Value("i", 0), smm.Event(), smm.Semaphore(1)
    with ctx.Pool(2) as pool:
        results = pool.map(_pool_task, [(lock, value, event, sem)] * 20, chunksize=1)
        # the stdlib's lock refuses to travel in a Pool's arguments; ours does
        with pytest.raises(RuntimeError, match="inheritance"):
            pool.apply(_noop, (ctx.Lock(),))
        pool.close()
        pool.join()
    assert value.value == 20 and event.is_set() and sem.get_value() == 1
    assert all(returned is lock for returned, _, _ in results)  # back in the parent: the same one
    ids_per_pid: dict[int, set[int]] = {}
    for _, ident, pid in results:
        ids_per_pid.setdefault(pid, set()).add(ident)
    assert all(len(ids) == 1 for ids in ids_per_pid.values())  # rebuilt once per worker


# ---------------------------------------------------------------------------
# timeouts and Ctrl-C


def _held_elsewhere(lock: Any) -> Callable[[], None]:
    """Hold ``lock`` in another thread; return a function that lets it go."""
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(30)

    def let_go() -> None:
        done.set()
        t.join(30)

    return let_go


def _blockers(smm: SharedMemoryManager) -> dict[str, tuple[Callable[..., Any], Callable[[], None]]]:
    """name -> (a call that blocks until its timeout, cleanup)."""
    lock, rlock = smm.Lock(), smm.RLock()
    free_lock, free_rlock = _held_elsewhere(lock), _held_elsewhere(rlock)
    cond = smm.Condition()

    def cond_wait(timeout: float | None) -> Any:
        with cond:
            return cond.wait(timeout)

    sem, ev, bar = smm.Semaphore(0), smm.Event(), smm.Barrier(2)
    return {
        "Lock": (lambda t: lock.acquire(timeout=t), free_lock),
        "RLock": (lambda t: rlock.acquire(timeout=t), free_rlock),
        "Semaphore": (lambda t: sem.acquire(timeout=t), lambda: None),
        "Event": (lambda t: ev.wait(t), lambda: None),
        "Condition": (cond_wait, lambda: None),
        "Barrier": (lambda t: outcome(lambda: bar.wait(t)), lambda: None),
    }


def test_timeouts_really_time_out(smm: SharedMemoryManager) -> None:
    blockers = _blockers(smm)
    try:
        for name, (call, _) in blockers.items():
            start = time.monotonic()
            result = call(0.2)
            elapsed = time.monotonic() - start
            assert result in (False, ("raise", "BrokenBarrierError")), name
            assert 0.2 <= elapsed <= 1.5, (name, elapsed)
    finally:
        for _, cleanup in blockers.values():
            cleanup()


class _Interrupted(BaseException):  # like KeyboardInterrupt
    pass


def test_blocking_waits_are_interruptible(smm: SharedMemoryManager) -> None:
    def handler(signum: int, frame: Any) -> None:
        raise _Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    blockers = _blockers(smm)
    main = threading.get_ident()
    try:
        for name, (call, _) in blockers.items():
            timer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGUSR1))
            start = time.monotonic()
            timer.start()
            with pytest.raises(_Interrupted):
                call(None)
                pytest.fail(f"{name} returned")
            assert time.monotonic() - start < 1.5, name
            timer.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
        for _, cleanup in blockers.values():
            cleanup()


# ---------------------------------------------------------------------------
# holders and parties that die


def _die_holding(fn: Callable[[], object]) -> None:
    """Run ``fn`` in a forked child that then SIGKILLs itself."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            fn()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.mark.parametrize("kind", ["Lock", "RLock"])
def test_lock_of_a_dead_holder_is_released_and_the_next_told(
    smm: SharedMemoryManager, kind: str
) -> None:
    lock = getattr(smm, kind)()
    _die_holding(lambda: (lock.acquire(), lock.acquire(timeout=0.01)))
    with pytest.warns(so.OwnerDiedWarning, match="died"):
        assert lock.acquire(timeout=5)
    assert lock.owner_died
    assert probe(lock, False) == ("ok", False)
    if kind == "RLock":
        assert lock._count[0] == 1  # the dead holder's count of 2 was reset
    lock.release()
    assert probe(lock, False) == ("ok", True)  # one release freed it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lock.acquire(timeout=5) and not lock.owner_died
    assert lock._check() == []
    lock.release()


def test_a_lock_dropped_while_held_keeps_its_memory_mapped() -> None:
    # glibc rewrites links stored in every mutex the thread holds: that memory must stay
    manager = SharedMemoryManager()
    manager.start()
    lock = manager.Lock()
    lock.acquire()
    mutex = lock._mutex
    manager.shutdown()
    del lock
    gc.collect()
    assert mutex in so._held
    assert mutex.holder_tid() == threading.get_native_id()  # still mapped: readable
    mutex.release()
    so._held.discard(mutex)


def test_lock_owner_died_can_be_made_an_error(smm: SharedMemoryManager) -> None:
    lock = smm.Lock()
    _die_holding(lock.acquire)
    with warnings.catch_warnings():
        warnings.simplefilter("error", so.OwnerDiedWarning)
        with pytest.raises(so.OwnerDiedWarning):
            lock.acquire(timeout=5)
    with pytest.warns(so.OwnerDiedWarning):  # recovery was not completed: told again
        assert probe(lock, False) == ("ok", True)  # not left held


def test_semaphore_units_of_a_dead_holder_come_back(smm: SharedMemoryManager) -> None:
    sem = smm.BoundedSemaphore(2)
    assert sem.acquire()
    _die_holding(lambda: sem.acquire(timeout=1))
    assert sem.get_value() == 0
    start = time.monotonic()
    assert sem.acquire(timeout=10)  # a waiter finds the dead holder within SCAN_INTERVAL
    assert time.monotonic() - start < 5
    sem.release()
    sem.release()
    assert sem.get_value() == 2 and sem._check() == []


def test_semaphore_used_as_a_signal_is_not_refilled(smm: SharedMemoryManager) -> None:
    sem = smm.Semaphore(0)
    sem.release()
    _die_holding(lambda: sem.acquire(timeout=1))  # the consumer took the signal, then died
    assert sem.acquire(timeout=3 * so.SCAN_INTERVAL) is False
    # a hand-over (released by a process that did not acquire) discharges the acquirer
    handed = smm.Semaphore(1)
    handed.acquire()
    assert in_thread(handed.release) == ("ok", None)
    slot = handed._my_slot(create=False)
    assert slot >= 0 and handed._w[slot + 2] == 0


def test_barrier_breaks_when_a_waiting_party_dies(smm: SharedMemoryManager) -> None:
    bar = smm.Barrier(3)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child waits until killed
        bar.wait(60)
        os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while bar.n_waiting != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(outcome(lambda: bar.wait(60))))
        t.start()
        while bar.n_waiting != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    start = time.monotonic()
    t.join(30)
    assert result == [("raise", "BrokenBarrierError")]
    assert time.monotonic() - start < 5
    assert bar.broken and bar._check() == []
    bar.reset()
    indices: list[Any] = []
    threads = [threading.Thread(target=lambda: indices.append(bar.wait(30))) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sorted(indices) == [0, 1, 2]


# ---------------------------------------------------------------------------
# crash tests: a process killed at every shared write of every operation


def _settle(obj: Any) -> None:
    """Take the object's lock once: the repair of a dead holder's mess runs there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", so.OwnerDiedWarning)
        if isinstance(obj, so._Logged):
            with obj._mutex:
                obj._fix()
        elif isinstance(obj, so.Lock):
            assert obj.acquire(timeout=5)
            obj.release()
        else:
            lock = obj.get_lock()
            assert lock.acquire(timeout=5)
            if isinstance(obj, so.Array):
                obj._fix()
            lock.release()


def _hold(sem: Any) -> int:
    slot = sem._my_slot(create=False)
    return int(sem._w[slot + 2]) if slot >= 0 else 0


def _handover_sem(smm: SharedMemoryManager) -> Any:
    sem = smm.Semaphore(1)
    sem.acquire()
    return sem


def _dead_holder_sem(smm: SharedMemoryManager) -> Any:
    sem = smm.Semaphore(1)
    _die_holding(sem.acquire)
    return sem


def _barrier_state(bar: Any) -> tuple[int, int]:
    return int(bar._w[bar._COUNT]), int(bar._w[bar._STATE_W])


def _rlock_op(r: Any) -> None:
    with r, r:
        pass


def _settled_rlock(r: Any) -> tuple[int, bool]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", so.OwnerDiedWarning)
        assert r.acquire(timeout=5)
    count = int(r._count[0])
    r.release()
    return count, r.locked()


OLD8 = list(range(8))
NEW8 = [0, 100, 101, 102, 103, 104, 105, 7]

# name: (make, op, state, states allowed after a kill, state after the op, further use)
CASES: dict[str, tuple[Any, ...]] = {
    "Semaphore.acquire": (
        lambda m: m.Semaphore(2),
        lambda s: s.acquire(),
        lambda s: s.get_value(),
        {2},
        1,
        lambda s: [s.acquire(timeout=5), s.release()],
    ),
    "Semaphore.release (hand-over)": (
        _handover_sem,
        lambda s: s.release(),
        lambda s: (s.get_value(), _hold(s)),
        {(0, 1)},
        (1, 0),
        lambda s: [s.release(), s.acquire(False)],
    ),
    "BoundedSemaphore.acquire+release": (
        lambda m: m.BoundedSemaphore(2),
        lambda s: (s.acquire(), s.release()),
        lambda s: s.get_value(),
        {2},
        2,
        lambda s: [s.acquire(False), s.release()],
    ),
    "Semaphore reclaim": (
        _dead_holder_sem,
        lambda s: s.acquire(timeout=10),
        lambda s: s.get_value(),
        {1},
        0,
        lambda s: None,
    ),
    "Event.set": (
        lambda m: m.Event(),
        lambda e: e.set(),
        lambda e: e.is_set(),
        {False},
        True,
        lambda e: [e.set(), e.wait(1)],
    ),
    "Event.clear": (
        lambda m: (lambda e: (e.set(), e)[1])(m.Event()),
        lambda e: e.clear(),
        lambda e: e.is_set(),
        {True},
        False,
        lambda e: [e.clear(), e.set()],
    ),
    "Barrier.wait": (
        lambda m: m.Barrier(1),
        lambda b: b.wait(5),
        _barrier_state,
        {(0, 0), (0, -2)},  # untouched, or broken by a party that died inside
        (0, 0),
        lambda b: [b.reset(), b.wait(5)],
    ),
    "Barrier.abort": (
        lambda m: m.Barrier(2),
        lambda b: b.abort(),
        _barrier_state,
        {(0, 0), (0, -2)},
        (0, -2),
        lambda b: [b.reset()],
    ),
    "Value.value=": (
        lambda m: m.Value("q", 1),
        lambda v: setattr(v, "value", 2**40),
        lambda v: v.value,
        {1, 2**40},  # one aligned store
        2**40,
        lambda v: [setattr(v, "value", v.value + 1), v.get_lock()._check()],
    ),
    "Array[1:7]=": (
        lambda m: m.Array("i", range(8)),
        lambda a: a.__setitem__(slice(1, 7), NEW8[1:7]),
        lambda a: a[:],
        {tuple(OLD8), tuple(NEW8)},  # new: killed releasing the lock
        tuple(NEW8),
        lambda a: [a.__setitem__(slice(0, 2), [5, 6])],
    ),
    "CharArray.value=": (
        lambda m: m.Array("c", b"abcdefgh"),
        lambda a: setattr(a, "value", b"XYZ"),
        lambda a: a.raw,
        {b"abcdefgh", b"XYZ\0efgh"},
        b"XYZ\0efgh",
        lambda a: [setattr(a, "raw", b"12345678")],
    ),
    "RLock nested": (
        lambda m: m.RLock(),
        _rlock_op,
        _settled_rlock,
        {(1, False)},
        (1, False),
        lambda r: [r.acquire(timeout=1), r.release()],
    ),
}


def _state(case: tuple[Any, ...], obj: Any) -> Any:
    s = case[2](obj)
    return tuple(s) if isinstance(s, list) else s


def _run_killed_at(obj: Any, op: Callable[[Any], object], k: int) -> bool:
    """Run ``op`` in a forked child killed at step k; True if it ran to the end."""
    return run_killed_at(so, lambda: op(obj), k)


@pytest.mark.parametrize("name", list(CASES))
def test_killed_at_every_step(smm: SharedMemoryManager, name: str) -> None:
    case = CASES[name]
    make, op, _, killed_states, after, more = case
    for k in range(1, 100):
        obj = make(smm)
        done = _run_killed_at(obj, op, k)
        _settle(obj)
        assert obj._check() == [], (name, k)
        state = _state(case, obj)
        if done:
            assert state == after, (name, k)
            assert k > 1, "the operation wrote nothing: the test would not test"
            crash_points(f"sync {name}", k - 1)
            break
        assert state in killed_states, (name, k, state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", so.OwnerDiedWarning)
            more(obj)
        assert obj._check() == [], (name, k)
    else:
        pytest.fail(f"{name} never completed")


@pytest.mark.parametrize("name", [n for n in CASES if n != "Semaphore reclaim"])
def test_ctrl_c_at_every_step(
    smm: SharedMemoryManager, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]
    make, op, _, killed_states, after, more = case
    for k in range(1, 100):
        obj = make(smm)
        before = _state(case, obj)

        def hook(count: list[int] = [0], k: int = k) -> None:  # noqa: B006 - one per k
            count[0] += 1
            if count[0] == k:
                raise KeyboardInterrupt

        monkeypatch.setattr(so, "fault_hook", hook)
        try:
            op(obj)
            done = True
        except KeyboardInterrupt:
            done = False
        monkeypatch.setattr(so, "fault_hook", None)
        # nothing is left held: another thread gets every lock at once
        lock = obj._mutex if hasattr(obj, "_mutex") else obj.get_lock()._mutex
        assert probe(lock, False) == ("ok", True)
        assert obj._check() == [], (name, k)
        state = _state(case, obj)
        if done:
            assert state == after
            break
        assert state in {before, after} | killed_states, (name, k, state)
        more(obj)
    else:
        pytest.fail(f"{name} never completed")


# ---------------------------------------------------------------------------
# after the manager is gone


def test_use_after_shutdown_never_crashes() -> None:
    manager = SharedMemoryManager()
    manager.start()
    lock, ev, v = manager.Lock(), manager.Event(), manager.Value("i", 3)
    data = pickle.dumps(ev)
    manager.shutdown()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: a segfault would show as a signal
        code = 0
        for fn in (lock.acquire, lock.release, ev.set, lambda: v.value):
            try:
                fn()
            except Exception:
                code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    so._cache.clear()
    so._recent.clear()
    with pytest.raises(FileNotFoundError):
        pickle.loads(data)  # a process that did not have it yet is told clearly


def test_objects_are_usable_in_a_namespace(smm: SharedMemoryManager) -> None:
    # the objects behave when stored inside other picklable structures
    ns = SimpleNamespace(lock=smm.Lock(), sem=smm.Semaphore(3))
    back = pickle.loads(pickle.dumps(ns))
    assert back.lock is ns.lock and back.sem is ns.sem
