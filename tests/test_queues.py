"""Queue, JoinableQueue and SimpleQueue: the stdlib's semantics, across processes, crash-safe.

Where a scenario makes sense on both, it runs on ``multiprocessing``'s queues
and on ours and the observations must be equal (the stdlib's ``put`` hands the
message to a feeder thread, so the stdlib side waits for it to land before it
looks).  Crash tests kill a forked child at every shared-memory write step of
each operation and check that the queue is consistent, holds exactly the
messages from before or from after the operation, and keeps working.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from conftest import crash_points, run_killed_at
from sharedobj import SharedMemoryManager
from sharedobj.arrays import SharedArray
from sharedobj.containers import queues
from sharedobj.containers.queues import JoinableQueue, Queue
from sharedobj.heap import Block

METHODS = ["fork", "spawn", "forkserver"]


def observe(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except Exception as exc:
        return ("raised", type(exc).__name__)


def settle_stdlib(q: Any, n: int) -> None:
    """Wait until the stdlib feeder thread has pushed everything (``n`` items expected)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if n == 0 or not q.empty():
            time.sleep(0.05)
            return
        time.sleep(0.01)


# --------------------------------------------------------------------------
# differential: the same scenario on the stdlib and on ours


def queue_scenario(q: Any, settle: Callable[[Any, int], None]) -> list[Any]:
    seen: list[Any] = []
    seen.append(observe(q.empty))
    seen.append(observe(q.qsize))
    for item in (1, "two", (3, [4.0]), None):
        q.put(item)
    settle(q, 4)
    seen.append(observe(q.full))
    seen.append(observe(q.qsize))
    seen.append(observe(lambda: q.put_nowait("x")))
    seen.append(observe(lambda: q.put("x", True, 0.05)))
    seen.append(observe(lambda: q.put("x", False, 10)))  # timeout ignored when not blocking
    seen.append(observe(lambda: q.put("x", True, -1)))  # negative timeout: try once
    seen.append(observe(q.get))
    seen.append(observe(q.full))
    q.put({"five": 5})
    settle(q, 4)
    seen.extend(observe(q.get_nowait) for _ in range(4))
    seen.append(observe(q.empty))
    seen.append(observe(q.get_nowait))
    seen.append(observe(lambda: q.get(True, 0.05)))
    seen.append(observe(lambda: q.get(False, 10)))
    seen.append(observe(lambda: q.get(True, -3)))
    seen.append(observe(lambda: q.get(timeout="soon")))
    seen.append(observe(q.join_thread))  # not closed yet
    q.close()
    seen.append(observe(lambda: q.put(1)))
    seen.append(observe(q.get))
    seen.append(observe(q.get_nowait))
    seen.append(observe(q.join_thread))
    seen.append(observe(q.cancel_join_thread))
    return seen


def test_queue_semantics_match_the_stdlib(smm: SharedMemoryManager) -> None:
    ctx = mp.get_context("fork")
    theirs = queue_scenario(ctx.Queue(4), settle_stdlib)
    ours = queue_scenario(smm.Queue(4), lambda q, n: None)
    assert ours == theirs
    assert ("raised", "Full") in ours and ("raised", "Empty") in ours


def test_closed_queue_says_so(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    q.close()
    with pytest.raises(ValueError, match=r"Queue .* is closed"):
        q.put(1)
    other = pickle.loads(pickle.dumps(q))  # another handle on the same queue stays open
    other.put(1)
    assert other.get() == 1


def unbounded_scenario(q: Any, settle: Callable[[Any, int], None]) -> list[Any]:
    for i in range(3000):
        q.put(i)
    settle(q, 3000)
    seen: list[Any] = [q.qsize(), q.full(), q.empty()]
    seen.append([q.get() for _ in range(3000)])
    seen.append(observe(q.get_nowait))
    return seen


def test_unbounded_queue_matches_the_stdlib(smm: SharedMemoryManager) -> None:
    theirs = unbounded_scenario(mp.get_context("fork").Queue(), settle_stdlib)
    ours = unbounded_scenario(smm.Queue(0), lambda q, n: None)
    assert ours == theirs
    assert smm.Queue(-5).full() is False


def joinable_scenario(q: Any, settle: Callable[[Any, int], None]) -> list[Any]:
    seen: list[Any] = [observe(q.task_done)]
    q.join()  # nothing unfinished: returns at once
    for i in range(3):
        q.put(i)
    settle(q, 3)
    seen.append([q.get() for _ in range(3)])
    done = threading.Event()

    def joiner() -> None:
        q.join()
        done.set()

    t = threading.Thread(target=joiner)
    t.start()
    for _ in range(3):
        seen.append(done.is_set())
        q.task_done()
    t.join(5)
    seen.append(done.is_set())
    seen.append(observe(q.task_done))
    return seen


def test_joinable_queue_matches_the_stdlib(smm: SharedMemoryManager) -> None:
    theirs = joinable_scenario(mp.get_context("fork").JoinableQueue(), settle_stdlib)
    ours = joinable_scenario(smm.JoinableQueue(), lambda q, n: None)
    assert ours == theirs
    assert ours[0] == ("raised", "ValueError") and ours[-1] == ("raised", "ValueError")


def test_task_done_too_often_message(smm: SharedMemoryManager) -> None:
    q = smm.JoinableQueue()
    with pytest.raises(ValueError, match=r"task_done\(\) called too many times"):
        q.task_done()


def simple_scenario(q: Any, settle: Callable[[Any, int], None]) -> list[Any]:
    seen: list[Any] = [observe(q.empty)]
    q.put("a")
    q.put(["b"])
    settle(q, 2)
    seen += [observe(q.empty), observe(q.get), observe(q.get), observe(q.empty)]
    seen.append(sorted(n for n in dir(q) if not n.startswith("_") and n != "create"))
    q.close()
    seen += [observe(lambda: q.put(1)), observe(q.get), observe(q.empty)]
    return seen


def test_simple_queue_matches_the_stdlib(smm: SharedMemoryManager) -> None:
    theirs = simple_scenario(mp.get_context("fork").SimpleQueue(), lambda q, n: None)
    ours = simple_scenario(smm.SimpleQueue(), lambda q, n: None)
    assert ours == theirs


def test_bad_arguments(smm: SharedMemoryManager) -> None:
    with pytest.raises(TypeError):
        smm.Queue(2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        smm.Queue("3")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Queue()
    with pytest.raises(TypeError):
        Queue.create("not a heap", 0)  # type: ignore[arg-type]
    q = smm.Queue(2)
    with pytest.raises(TypeError):
        q.put(1, True, "1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        q.put_many([1, 2, 3])
    with pytest.raises(ValueError):
        q.get_many(0)
    with pytest.raises(TypeError):
        q.get_many(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        q.put(threading.Lock())  # neither pickle nor cloudpickle can
    q.put("still fine")
    assert q.get() == "still fine"
    assert q._check() == []


# --------------------------------------------------------------------------
# messages


def test_any_message_round_trips(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    items: list[Any] = [
        0,
        -(2**80),
        1.5,
        "é" * 10,
        b"",
        None,
        True,
        (1, (2, [3, {"x": {4}}])),
        frozenset({1, 2}),
        bytearray(b"abc"),
        ValueError("boom"),
        b"x" * (queues.INLINE_MAX - 30),
        b"y" * (queues.INLINE_MAX + 1),  # goes as a block
        "z" * 3_000_000,  # larger than the ring
    ]
    for item in items:
        q.put(item)
    got = [q.get() for _ in items]
    assert [type(g) for g in got] == [type(i) for i in items]
    assert repr(got) == repr(items)
    f = lambda x: x * 3  # noqa: E731  cloudpickle's job
    q.put(f)
    assert q.get()(5) == 15
    assert q._check() == []


def test_big_messages_free_their_blocks(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    q.put(0)
    q.get()
    before = smm.heap.stats()["live_blocks"]
    for size in (100_000, 1 << 20, 5 << 20):
        q.put(b"a" * size)
        assert smm.heap.stats()["live_blocks"] == before + 1
        assert len(q.get()) == size
        assert smm.heap.stats()["live_blocks"] == before
    assert smm.heap.check() == []


def test_ring_grows_and_keeps_fifo_across_wraps(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    expect: list[Any] = []
    got: list[Any] = []
    size = q._core.ring_size
    for rnd in range(30):
        for i in range(200):
            item = (rnd, i, "p" * ((i * 37 + rnd) % 3000))
            q.put(item)
            expect.append(item)
        for _ in range(150):
            got.append(q.get())
        assert q._check() == []
    got += q.get_many(10**6)
    assert got == expect
    assert q._core.ring_size > size
    assert q.empty()


def test_numpy_arrays_travel_by_handle(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    private = np.arange(100_000, dtype=np.float64)
    shared = smm.asarray(np.arange(50_000, dtype=np.int32))
    small = np.arange(10)
    strided = np.arange(40_000.0)[::2]
    q.put({"private": private, "shared": shared, "small": small, "strided": strided})
    private[0] = -1.0  # the queue holds its own copy
    msg = q.get()
    assert isinstance(msg["private"], SharedArray) and msg["private"].block is not None
    assert msg["private"][0] == 0.0 and np.array_equal(msg["private"][1:], private[1:])
    assert np.array_equal(msg["strided"], strided)
    assert type(msg["small"]) is np.ndarray and np.array_equal(msg["small"], small)
    # an already shared array is not copied: the receiver sees the same memory
    assert msg["shared"].block.handle == shared.block.handle
    msg["shared"][7] = 777
    assert shared[7] == 777


def test_received_copy_is_kept_for_reuse_or_freed_when_collected(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    q.put(0)
    q.get()
    gc.collect()
    used = lambda: smm.heap.stats()["run_used_bytes"]  # noqa: E731
    spares = lambda: [q._core.w[queues.W_SPARE + 4 * i] for i in range(queues.N_SPARE)]  # noqa: E731
    base = used()
    q.put(np.ones(1 << 16))  # 512 KiB: the receiver owns the copy
    assert used() >= base + (512 << 10)
    arr = q.get()
    view = arr[10:20]
    del arr
    gc.collect()
    assert used() >= base + (512 << 10)  # a view keeps it
    assert spares() == [0] * queues.N_SPARE
    assert view.sum() == 10
    del view
    gc.collect()
    # the last view gone: the queue keeps the block for the next copy of that size
    assert sorted(spares()) == [0] * (queues.N_SPARE - 1) + [512 << 10]
    kept = used()
    assert kept >= base + (512 << 10)
    for _ in range(3):
        q.put(np.full(1 << 16, 3.0))
        assert used() == kept and spares() == [0] * queues.N_SPARE  # reused, not allocated
        got = q.get()
        assert got.sum() == 3 << 16
        del got
        gc.collect()
    assert used() == kept
    # 8 MiB: kept by the queue for the next copy (its pages are resident), not freed
    q.put(np.ones(1 << 20))
    got = q.get()
    del got
    gc.collect()
    kept = used()
    assert kept >= base + (8 << 20)
    for _ in range(3):
        q.put(np.full(1 << 20, 2.0))
        assert used() == kept  # the kept block was reused
        got = q.get()
        assert got.sum() == 2 << 20
        del got
        gc.collect()
    assert used() == kept
    # every slot taken (512 KiB, 8 MiB and two of these): the third one is freed
    held = [q.get() for _ in [q.put(np.ones(n // 8)) for n in (96 << 10, 200 << 10, 3 << 20)]]
    before = used()
    assert before >= kept + (96 << 10) + (200 << 10) + (3 << 20)
    del held
    gc.collect()
    assert all(spares()) and kept < used() < before
    assert q._check() == [] and smm.heap.check() == []
    # a put that fails after copying frees the copy
    full = smm.Queue(1)
    full.put(1)
    base = used()
    with pytest.raises(queue.Full):
        full.put(np.ones(1 << 16), timeout=0.01)
    assert used() == base
    assert smm.heap.check() == []


# --------------------------------------------------------------------------
# batches


def test_put_many_get_many(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    q.put_many(range(10))
    q.put_many([])
    q.put_many(["big" * 10_000, np.zeros(5000)])
    assert q.qsize() == 12
    assert q.get_many(3) == [0, 1, 2]
    assert q.get_many(7) == list(range(3, 10))
    rest = q.get_many()
    assert len(rest[0]) == 30_000 and np.array_equal(rest[1], np.zeros(5000))
    with pytest.raises(queue.Empty):
        q.get_many(block=False)
    with pytest.raises(queue.Empty):
        q.get_many(timeout=0.05)


def test_put_many_is_all_or_nothing_with_maxsize(smm: SharedMemoryManager) -> None:
    q = smm.Queue(5)
    q.put_many([1, 2, 3])
    with pytest.raises(queue.Full):
        q.put_many([4, 5, 6], block=False)
    with pytest.raises(queue.Full):
        q.put_many([4, 5, 6], timeout=0.05)
    assert q.qsize() == 3
    q.put_many([4, 5])
    assert q.full()
    assert q.get_many(10) == [1, 2, 3, 4, 5]


def _batch_producer(q: Queue, tag: int, n: int) -> None:
    for i in range(0, n, 50):
        q.put_many([(tag, j) for j in range(i, i + 50)])
    q.put(None)


def test_batches_from_several_producers_stay_contiguous(smm: SharedMemoryManager) -> None:
    q = smm.Queue(200)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_batch_producer, args=(q, t, 1000)) for t in range(3)]
    for p in procs:
        p.start()
    got: list[Any] = []
    ends = 0
    while ends < 3:
        for item in q.get_many(64, timeout=30):
            if item is None:
                ends += 1
            else:
                got.append(item)
    for p in procs:
        p.join(10)
    assert sorted(got) == sorted((t, j) for t in range(3) for j in range(1000))
    for start in range(0, len(got), 50):  # each batch of 50 arrived in one piece
        chunk = got[start : start + 50]
        assert len({t for t, _ in chunk}) == 1
        assert [j for _, j in chunk] == list(range(chunk[0][1], chunk[0][1] + 50))


# --------------------------------------------------------------------------
# processes


def _producer(q: Any, tag: int, n: int, consumers: int, done: Any) -> None:
    for i in range(n):
        q.put((tag, i, "x" * (i % 50)))
    # The stdlib's put is asynchronous (a feeder thread): flush before saying
    # done, or the sentinels can overtake the last items.  Ours is synchronous.
    q.close()
    q.join_thread()
    done.put(tag)


def _consumer(q: Any, results: Any) -> None:
    got = []
    while True:
        item = q.get()
        if item is None:
            break
        got.append(item[:2])
    results.put(got)


def run_many_to_many(ctx: Any, q: Any, results: Any, done: Any) -> list[Any]:
    n_prod, n_cons, n = 3, 2, 400
    prods = [ctx.Process(target=_producer, args=(q, t, n, n_cons, done)) for t in range(n_prod)]
    conss = [ctx.Process(target=_consumer, args=(q, results)) for _ in range(n_cons)]
    for p in prods + conss:
        p.start()
    for _ in range(n_prod):
        done.get()
    for _ in range(n_cons):
        q.put(None)
    streams = [results.get(timeout=60) for _ in range(n_cons)]
    for p in prods + conss:
        p.join(30)
        assert p.exitcode == 0
    for stream in streams:  # FIFO per producer, as each consumer saw it
        for t in range(n_prod):
            seq = [i for tag, i in stream if tag == t]
            assert seq == sorted(seq)
    return sorted(item for s in streams for item in s)


@pytest.mark.parametrize("method", METHODS)
def test_many_producers_many_consumers(smm: SharedMemoryManager, method: str) -> None:
    ctx = mp.get_context(method)
    ours = run_many_to_many(ctx, smm.Queue(50), smm.Queue(), smm.SimpleQueue())
    assert ours == sorted((t, i) for t in range(3) for i in range(400))
    if method == "fork":
        theirs = run_many_to_many(ctx, ctx.Queue(50), ctx.Queue(), ctx.SimpleQueue())
        assert theirs == ours


def _pool_put(args: tuple[Queue, int]) -> tuple[Queue, int]:
    q, i = args
    q.put(i * i)
    q.put_many([np.full(2000, i, dtype=np.int64)])  # 16 KB: copied into the heap
    return q, i


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_queues_pass_through_pool_arguments_and_results(
    smm: SharedMemoryManager, method: str
) -> None:
    q = smm.Queue()
    with mp.get_context(method).Pool(2) as pool:
        back = pool.map(_pool_put, [(q, i) for i in range(8)])
    items = q.get_many(100)
    squares = sorted(x for x in items if isinstance(x, int))
    arrays = sorted(int(a[0]) for a in items if isinstance(a, np.ndarray))
    assert squares == [i * i for i in range(8)] and arrays == list(range(8))
    assert all(isinstance(a, SharedArray) for a in items if isinstance(a, np.ndarray))
    q2, _ = back[0]
    q2.put("through a result")
    assert q.get() == "through a result"
    assert len(pickle.dumps(q)) < 200


def _joinable_worker(q: JoinableQueue, out: Queue) -> None:
    while True:
        item = q.get()
        if item is None:
            q.task_done()
            return
        out.put(item * 2)
        q.task_done()


def test_join_waits_for_task_done_in_other_processes(smm: SharedMemoryManager) -> None:
    q = smm.JoinableQueue()
    out = smm.Queue()
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_joinable_worker, args=(q, out)) for _ in range(2)]
    for w in workers:
        w.start()
    q.put_many(range(100))
    q.join()  # every task_done happened, so every result is in
    assert out.qsize() == 100
    assert sorted(out.get_many(1000)) == [2 * i for i in range(100)]
    q.put_many([None, None])
    q.join()
    for w in workers:
        w.join(10)
        assert w.exitcode == 0


def _array_echo(q: Queue, back: Queue) -> None:
    arr = q.get()
    back.put((type(arr).__name__, float(arr.sum()), arr * 2))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_arrays_between_processes(smm: SharedMemoryManager, method: str) -> None:
    q, back = smm.Queue(), smm.Queue()
    p = mp.get_context(method).Process(target=_array_echo, args=(q, back))
    p.start()
    q.put(np.arange(1 << 16, dtype=np.float64))
    name, total, doubled = back.get(timeout=60)
    p.join(30)
    assert name == "SharedArray" and total == float(np.arange(1 << 16).sum())
    assert np.array_equal(doubled, np.arange(1 << 16) * 2)


# --------------------------------------------------------------------------
# timeouts, wake-ups, signals


def test_timeouts_really_time_out(smm: SharedMemoryManager) -> None:
    q = smm.Queue(1)
    t = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    assert 0.2 <= time.monotonic() - t <= 1.5
    q.put(1)
    t = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(2, timeout=0.2)
    assert 0.2 <= time.monotonic() - t <= 1.5


def _late_put(q: Queue, delay: float) -> None:
    time.sleep(delay)
    q.put("late")


def _late_get(q: Queue, delay: float) -> None:
    time.sleep(delay)
    q.get()


def test_blocked_get_wakes_on_put_from_another_process(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    p = mp.get_context("fork").Process(target=_late_put, args=(q, 0.3))
    p.start()
    assert q.get() == "late"
    p.join(10)
    full = smm.Queue(1)
    full.put(0)
    p = mp.get_context("fork").Process(target=_late_get, args=(full, 0.3))
    p.start()
    full.put(1, timeout=20)  # room made by the child
    p.join(10)
    assert full.get() == 1


def _interrupted_get(q: Queue, ready: Any, out: Any) -> None:
    ready.put(1)
    t = time.monotonic()
    try:
        q.get()
    except KeyboardInterrupt:
        out.put(("interrupted", time.monotonic() - t))
    q.put("from the child")  # the lock is not held, the queue works
    out.put(("got", q.get(timeout=5)))


def test_ctrl_c_interrupts_a_blocked_get(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    ready, out = smm.Queue(), smm.Queue()
    p = mp.get_context("fork").Process(target=_interrupted_get, args=(q, ready, out))
    p.start()
    ready.get(timeout=30)
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGINT)  # type: ignore[arg-type]
    what, elapsed = out.get(timeout=10)
    assert what == "interrupted" and elapsed < 5
    assert out.get(timeout=10) == ("got", "from the child")
    p.join(10)
    assert q._check() == []


def _waiter(q: Queue, ready: Any) -> None:
    ready.put(1)
    q.get()


def test_a_killed_waiter_breaks_nothing(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    ready = smm.Queue()
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_waiter, args=(q, ready))
    p.start()
    ready.get(timeout=30)
    time.sleep(0.2)  # asleep in get by now
    os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
    p.join(10)
    assert q._check() == []
    q2 = smm.Queue()
    p = ctx.Process(target=_late_put, args=(q, 0.2))
    p.start()
    assert q.get(timeout=20) == "late"
    p.join(10)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.1)
    q2.put(3)
    assert q2.get() == 3


def test_threads_share_a_queue(smm: SharedMemoryManager) -> None:
    q = smm.Queue(10)
    got: list[int] = []

    def consume() -> None:
        while (item := q.get()) is not None:
            got.append(item)

    threads = [threading.Thread(target=consume) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(2000):
        q.put(i)
    for _ in threads:
        q.put(None)
    for t in threads:
        t.join(30)
    assert sorted(got) == list(range(2000))


# --------------------------------------------------------------------------
# crash safety: SIGKILL (and Ctrl-C) at every write step


def contents(q: Queue) -> list[Any]:
    out: list[Any] = []
    while True:
        try:
            out += q.get_many(block=False)
        except queue.Empty:
            return [o.tolist() if isinstance(o, np.ndarray) else o for o in out]


def _advance(q: Queue, room_below: int) -> None:
    """Put and get fillers until fewer than ``room_below`` bytes are left before the ring's end."""
    core = q._core
    while core.ring_size - (core.w[queues.W_TAIL] & core.mask) >= room_below:
        q.put(b"f" * 200)
        q.get()


BEFORE = [1, "two", (3, 3)]
BIG = b"B" * 100_000
ARR = np.arange(3000.0)  # 24 KB: copied into the heap


def prep_plain(q: Queue) -> list[Any]:
    q.put_many(BEFORE)
    return list(BEFORE)


def prep_wrap(q: Queue) -> list[Any]:
    _advance(q, 3000)  # a 5 KB message will need a padding record
    return prep_plain(q)


def prep_big_first(q: Queue) -> list[Any]:
    q.put(BIG)
    q.put_many(BEFORE)
    return [BIG, *BEFORE]


def prep_pad_first(q: Queue) -> list[Any]:
    _advance(q, 3000)
    q.put("p" * 5000)  # leaves a padding record before it
    q.put_many(BEFORE)
    return ["p" * 5000, *BEFORE]


def prep_batch(q: Queue) -> list[Any]:
    q.put_many([10, "eleven", (12, 12), 13.0])
    return [10, "eleven", (12, 12), 13.0]


def prep_batch_taken(q: Queue) -> list[Any]:
    q.put_many(list(range(6)))
    assert q.get_many(2) == [0, 1]  # the head batch is now partly taken
    q.put("after")
    return [2, 3, 4, 5, "after"]


def prep_nearly_full_ring(q: Queue) -> list[Any]:
    # ~61 KB of the 64 KB ring.  Distinct strings: 60 copies of one would be
    # pickled once (the memo) into a single small batch record
    items = [f"{i:02d}" + "r" * 998 for i in range(60)]
    q.put_many(items)
    assert q._core.ring_size - (q._core.w[queues.W_TAIL] & queues._M32) < 5000
    return items


BIGARR = np.arange(1 << 17, dtype=np.float64)  # 1 MiB: its block is kept for reuse
_SHARED: list[Any] = []


def prep_shared(q: Queue) -> list[Any]:
    from sharedobj.arrays import new_array

    arr = new_array(q._core.heap, 5000)  # travels as a K_SHARED record
    arr[:] = np.arange(5000)
    _SHARED[:] = [arr]
    return prep_plain(q)


_RECEIVED: list[Any] = []


def prep_spare(q: Queue) -> list[Any]:
    q.put(BIGARR)
    del _RECEIVED[:]
    gc.collect()
    q.get()  # dropped at once: its block becomes the queue's spare
    gc.collect()
    assert any(q._core.w[queues.W_SPARE + 4 * i] for i in range(queues.N_SPARE))
    return prep_plain(q)


def prep_received(q: Queue) -> list[Any]:
    q.put(BIGARR)
    _RECEIVED[:] = [q.get()]
    return prep_plain(q)


def _drop_received(q: Queue) -> None:
    del _RECEIVED[:]
    gc.collect()  # the finalizer gives the block to the queue


def prep_array_first(q: Queue) -> list[Any]:
    q.put(ARR)
    return [ARR, *prep_plain(q)]


def prep_waiter_hint(q: Queue) -> list[Any]:
    q._core.w[queues.W_GETW] = 1  # as if a consumer slept: put must notify
    q._core.w[queues.W_PUTW] = 1
    return prep_plain(q)


# name: (prepare, operation, expected contents after the operation from the prepared ones)
CRASH_OPS: dict[str, tuple[Callable[[Queue], list[Any]], Callable[[Queue], Any], Any]] = {
    "put": (prep_plain, lambda q: q.put("new"), lambda b: [*b, "new"]),
    "put with padding": (prep_wrap, lambda q: q.put("w" * 5000), lambda b: [*b, "w" * 5000]),
    "put that grows the ring": (
        prep_nearly_full_ring,
        lambda q: q.put("g" * 9000),
        lambda b: [*b, "g" * 9000],
    ),
    "put big": (prep_plain, lambda q: q.put(BIG), lambda b: [*b, BIG]),
    "put array": (prep_plain, lambda q: q.put(ARR), lambda b: [*b, ARR.tolist()]),
    "put shared array": (
        prep_shared,
        lambda q: q.put(_SHARED[0]),
        lambda b: [*b, list(range(5000))],
    ),
    "put array into a kept block": (
        prep_spare,
        lambda q: q.put(BIGARR),
        lambda b: [*b, BIGARR.tolist()],
    ),
    "a received array given back": (prep_received, _drop_received, lambda b: b),
    "get array": (prep_array_first, lambda q: q.get(), lambda b: b[1:]),
    "put notifying": (prep_waiter_hint, lambda q: q.put("n"), lambda b: [*b, "n"]),
    "put_many": (
        prep_wrap,
        lambda q: q.put_many(["m1", "m" * 5000, BIG]),
        lambda b: [*b, "m1", "m" * 5000, BIG],
    ),
    "put_many that grows": (
        prep_nearly_full_ring,
        lambda q: q.put_many([c * 3000 for c in "xyz"]),  # distinct: one record each
        lambda b: [*b, *(c * 3000 for c in "xyz")],
    ),
    "get": (prep_plain, lambda q: q.get(), lambda b: b[1:]),
    "get notifying": (prep_waiter_hint, lambda q: q.get(), lambda b: b[1:]),
    "get after padding": (prep_pad_first, lambda q: q.get(), lambda b: b[1:]),
    "get big": (prep_big_first, lambda q: q.get(), lambda b: b[1:]),
    # put_many of plain items stores them as one batch record: get_many takes
    # whole records, or part of the first one, under one commit each
    "get_many": (prep_pad_first, lambda q: q.get_many(4), lambda b: b[4:]),
    "put_many batch": (
        prep_plain,
        lambda q: q.put_many(list(range(300))),
        lambda b: [*b, *range(300)],
    ),
    "get from a batch": (prep_batch, lambda q: q.get(), lambda b: b[1:]),
    "get_many part of a batch": (prep_batch, lambda q: q.get_many(2), lambda b: b[2:]),
    "get_many rest of a batch": (prep_batch_taken, lambda q: q.get_many(10), lambda b: b[10:]),
}


def _kill_at(k: int) -> Callable[[], None]:
    count = [0]

    def hook() -> None:
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _run_killed_at(op: Callable[[], Any], k: int) -> bool:
    return run_killed_at(queues, op, k)


@pytest.mark.parametrize("name", list(CRASH_OPS))
def test_sigkill_at_every_step(smm: SharedMemoryManager, name: str) -> None:
    prepare, op, after = CRASH_OPS[name]
    k = 1
    outcomes = set()
    while True:
        q = smm.Queue()
        before = [o.tolist() if isinstance(o, np.ndarray) else o for o in prepare(q)]
        finished = _run_killed_at(lambda q=q: op(q), k)  # type: ignore[misc]
        assert q._check() == [], f"{name}, killed at step {k}"
        q._core.w[queues.W_GETW] = q._core.w[queues.W_PUTW] = 0
        now = contents(q)
        assert now in (before, after(before)), f"{name}, killed at step {k}: {now!r:.200}"
        outcomes.add("after" if now == after(before) else "before")
        q.put("still works")
        assert q.get() == "still works"
        assert q._check() == []
        assert smm.heap.check() == []
        if finished:
            crash_points(f"queue {name}", k - 1)
            break
        k += 1
    assert k > 1, f"{name}: the operation wrote nothing?"
    if after(before) != before:
        assert outcomes == {"before", "after"}


def test_sigkill_during_task_done(smm: SharedMemoryManager) -> None:
    k = 1
    while True:
        q = smm.JoinableQueue()
        q.put_many([1, 2])
        q.get()
        finished = _run_killed_at(q.task_done, k)
        assert q._check() == []
        q.task_done()  # the one left (or the second, if the child's was lost)
        if finished:
            with pytest.raises(ValueError):
                q.task_done()
        else:
            q.task_done()
        q.get()
        q.join()
        if finished:
            break
        k += 1
    assert k > 1


def _raise_at(k: int) -> Callable[[], None]:
    count = [0]

    def hook() -> None:
        count[0] += 1
        if count[0] == k:
            raise KeyboardInterrupt

    return hook


@pytest.mark.parametrize("name", ["put", "put that grows the ring", "put big", "put_many", "get"])
def test_ctrl_c_at_every_step(smm: SharedMemoryManager, name: str) -> None:
    prepare, op, after = CRASH_OPS[name]
    k = 1
    while True:
        q = smm.Queue()
        before = prepare(q)
        queues.fault_hook = _raise_at(k)
        try:
            op(q)
            finished = True
        except KeyboardInterrupt:
            finished = False
        finally:
            queues.fault_hook = None
        assert not q._core.mutex.locked(), f"{name}: put lock left held at step {k}"
        assert not q._core.gmutex.locked(), f"{name}: get lock left held at step {k}"
        assert q._check() == []
        assert contents(q) in (before, after(before))
        q.put(1)
        assert q.get() == 1
        if finished:
            break
        k += 1
    assert smm.heap.check() == []


def test_batches_mixed_with_single_messages_keep_fifo_and_counts(smm: SharedMemoryManager) -> None:
    # put_many of plain items becomes batch records that get and get_many take
    # whole or in part: against a deque, every order, qsize and empty must agree
    import collections
    import random

    rng = random.Random(7)
    q = smm.Queue()
    model: collections.deque[Any] = collections.deque()
    seq = 0
    for _ in range(600):
        r = rng.random()
        if r < 0.3:
            n = rng.choice((1, 2, 5, 40, 300))
            items = [(seq + i, "x" * rng.randrange(3)) if i % 3 else seq + i for i in range(n)]
            seq += n
            q.put_many(items)
            model.extend(items)
        elif r < 0.45:
            q.put(("single", seq))
            model.append(("single", seq))
            seq += 1
        elif r < 0.7 and model:
            assert q.get(timeout=5) == model.popleft()
        elif model:
            got = q.get_many(rng.choice((1, 2, 3, 50, 1000)), timeout=5)
            assert len(got) >= 1 and got == [model.popleft() for _ in got]
        assert q.qsize() == len(model) and q.empty() == (not model)
        assert q._check() == []
    rest = []
    while not q.empty():
        rest += q.get_many(1000)
    assert rest == list(model)


def test_a_partly_taken_batch_counts_against_maxsize_until_it_is_gone(
    smm: SharedMemoryManager,
) -> None:
    q = smm.Queue(4)
    q.put_many([1, 2, 3, 4])
    assert q.get() == 1 and q.qsize() == 3
    with pytest.raises(queue.Full):  # documented: the record holds its 4 slots until drained
        q.put_nowait(5)
    assert q.get_many(10) == [2, 3, 4]
    q.put_nowait(5)
    assert q.get() == 5


# --------------------------------------------------------------------------
# two locks, and the wake-up protocol


@pytest.fixture
def one_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queues made in this test use one lock for putters and getters (what non-x86 does)."""
    monkeypatch.setattr(queues, "_SPLIT", False)


def test_putters_do_not_wait_for_getters(smm: SharedMemoryManager) -> None:
    if not queues._SPLIT:
        pytest.skip("one lock for both sides on this CPU")
    q = smm.Queue()
    core = q._core
    assert core.gmutex is not core.mutex and core.w[queues.W_LOCKS] == 2
    got: list[Any] = []
    with core.gmutex:  # a getter holds its lock: puts go on
        q.put("a")
        q.put_many([("b", 1), np.zeros(3)])
        t = threading.Thread(target=lambda: got.append(q.get(timeout=20)))
        t.start()
        t.join(0.2)
        assert t.is_alive() and not got  # getters wait for it
    t.join(20)
    assert got == ["a"] and q.qsize() == 2
    with core.mutex:  # a putter holds its lock: gets go on
        assert q.get(timeout=5) == ("b", 1)
    assert q._check() == []


def test_one_lock_mode_works_across_processes(smm: SharedMemoryManager, one_lock: None) -> None:
    q = smm.Queue(50)
    assert q._core.gmutex is q._core.mutex and q._core.w[queues.W_LOCKS] == 1
    # a spawned child knows nothing of the monkeypatch: it reads the mode from the header
    ours = run_many_to_many(mp.get_context("spawn"), q, smm.Queue(), smm.SimpleQueue())
    assert ours == sorted((t, i) for t in range(3) for i in range(400))
    assert ours == run_many_to_many(mp.get_context("fork"), q, smm.Queue(), smm.SimpleQueue())
    assert q._check() == []


@pytest.mark.parametrize("name", ["put", "put that grows the ring", "get", "put_many", "get_many"])
def test_sigkill_at_every_step_with_one_lock(
    smm: SharedMemoryManager, one_lock: None, name: str
) -> None:
    test_sigkill_at_every_step(smm, name)


def test_growth_measures_the_room_again(smm: SharedMemoryManager) -> None:
    # a putter saw too little room through a stale HEAD: with getters locked
    # out, growth looks again and leaves a ring with room as it is
    q = smm.Queue()
    core = q._core
    size = core.ring_size
    with core.mutex:
        core.grow(size // 2)
        assert core.ring_size == size
        core.grow(2 * size + 8)
        assert core.ring_size == 4 * size  # double, and again until it fits
    q.put("still fine")
    assert q.get() == "still fine" and q._check() == []


def _one_get(q: Queue, out: Queue) -> None:
    out.put((os.getpid(), q.get(timeout=60)))


def _one_put(q: Queue, item: Any) -> None:
    q.put(item, timeout=60)


def _wait_for_hint(q: Queue, word: int, n: int) -> None:
    deadline = time.monotonic() + 30
    while q._core.w[word] < n:
        assert time.monotonic() < deadline, "the waiters never went to sleep"
        time.sleep(0.01)


@pytest.mark.parametrize("split", [True, False])
def test_sleeping_getters_are_woken_one_after_another(
    smm: SharedMemoryManager, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    # With a 60 s slice, a getter not woken would sit out the timeout: only the
    # first put finds the queue empty and wakes one getter; each getter that
    # leaves messages behind must wake the next.
    monkeypatch.setattr(queues, "WAIT_SLICE", 60.0)
    monkeypatch.setattr(queues, "_SPLIT", split and queues._SPLIT)
    q, out = smm.Queue(), smm.Queue()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_one_get, args=(q, out)) for _ in range(3)]
    for p in procs:
        p.start()
    _wait_for_hint(q, queues.W_GETW, 3)
    for i in range(3):
        q.put(i)
    t = time.monotonic()
    got = sorted(out.get(timeout=60)[1] for _ in procs)
    assert got == [0, 1, 2] and time.monotonic() - t < 30
    for p in procs:
        p.join(10)
        assert p.exitcode == 0


@pytest.mark.parametrize("split", [True, False])
def test_sleeping_putters_are_woken(
    smm: SharedMemoryManager, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    monkeypatch.setattr(queues, "WAIT_SLICE", 60.0)
    monkeypatch.setattr(queues, "_SPLIT", split and queues._SPLIT)
    q = smm.Queue(1)
    q.put("first")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_one_put, args=(q, i)) for i in range(3)]
    for p in procs:
        p.start()
    _wait_for_hint(q, queues.W_PUTW, 3)
    t = time.monotonic()
    got = [q.get(timeout=60) for _ in range(4)]
    assert got[0] == "first" and sorted(got[1:]) == [0, 1, 2]
    assert time.monotonic() - t < 30
    for p in procs:
        p.join(10)
        assert p.exitcode == 0


def _jittery_producer(q: Queue, tag: int, n: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    for i in range(n):
        if rng.random() < 0.05:
            time.sleep(rng.random() / 500)  # let the getters run dry and go to sleep
        if rng.random() < 0.1:
            q.put_many([(tag, i, "batch")])
        else:
            q.put((tag, i))


def _jittery_consumer(q: Queue, out: Queue, seed: int) -> None:
    import random

    rng = random.Random(seed)
    got = []
    while (item := q.get(timeout=60)) is not None:
        got.append(item[:2])
        if rng.random() < 0.02:
            time.sleep(rng.random() / 500)  # and the putters fill a bounded queue
    out.put(got)


@pytest.mark.parametrize("maxsize", [0, 3])
def test_no_wake_up_is_lost(
    smm: SharedMemoryManager, monkeypatch: pytest.MonkeyPatch, maxsize: int
) -> None:
    # Sleepers that are never woken would sit out a 60 s slice (and the test's
    # bound): putters and getters fall asleep and wake each other thousands of times.
    monkeypatch.setattr(queues, "WAIT_SLICE", 60.0)
    q, out = smm.Queue(maxsize), smm.Queue()
    ctx = mp.get_context("fork")
    n = 1500
    prods = [ctx.Process(target=_jittery_producer, args=(q, t, n, t)) for t in range(2)]
    conss = [ctx.Process(target=_jittery_consumer, args=(q, out, 10 + c)) for c in range(2)]
    t = time.monotonic()
    for p in prods + conss:
        p.start()
    for p in prods:
        p.join(60)
        assert p.exitcode == 0
    for _ in conss:
        q.put(None)
    streams = [out.get(timeout=60) for _ in conss]
    assert time.monotonic() - t < 50
    for p in conss:
        p.join(10)
    assert sorted(x for s in streams for x in s) == sorted(
        (t, i) for t in range(2) for i in range(n)
    )
    assert q._check() == []


# --------------------------------------------------------------------------
# SharedArrays: a record of their own


def test_shared_arrays_travel_as_their_handle(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    base = smm.zeros((60, 40))
    base[:] = np.arange(2400).reshape(60, 40)
    readonly = base[5:10]
    readonly.flags.writeable = False
    sent = [
        base,
        base[10:20, ::3],  # a strided view
        base.T,  # F-ordered
        readonly,
        smm.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]),  # structured: the dtype goes whole
        smm.zeros(2, dtype=np.int8),  # small: still by handle, it is shared
    ]
    for arr in sent:
        q.put(arr)
    q.put_many(sent[:2])
    word = q._core.ring_q[(q._core.w[queues.W_HEAD] & q._core.mask) >> 3]
    assert word >> 32 == queues.K_SHARED
    got = [q.get() for _ in sent] + q.get_many(10)
    for mine, theirs in zip(sent + sent[:2], got, strict=True):
        assert type(theirs) is SharedArray and theirs.block.handle == mine.block.handle
        assert (theirs.shape, theirs.strides, theirs.dtype) == (
            mine.shape,
            mine.strides,
            mine.dtype,
        )
        assert theirs.flags.writeable == mine.flags.writeable
        assert np.array_equal(theirs, mine)
    got[1][0, 0] = -7.0  # the same memory
    assert base[10, 0] == -7.0
    private = base.copy()  # a SharedArray type, but private memory: by value
    q.put(private)
    back = q.get()
    assert np.array_equal(back, private) and back.block is not base.block
    assert q._check() == []


def _plain_arrays() -> list[np.ndarray]:
    grid = np.arange(60_000, dtype=np.float64).reshape(200, 300)
    return [
        np.arange(2000, dtype=np.float64),  # 16 KB: a small (slab) block
        grid,
        np.asfortranarray(grid),  # F-ordered: stays F-ordered
        grid[::3, 10:250:7],  # strided: arrives contiguous
        np.arange(5000, dtype=">i4"),  # big-endian
        np.arange(3000).astype("datetime64[ns]"),
        np.array([f"s{i}" for i in range(2000)], dtype="<U7"),
        np.arange(10_000) % 3 == 0,  # bool
        (np.arange(1000) * 1j).astype(np.complex128),
        np.zeros((), dtype="V10000"),  # 0-d, 10 KB
        np.ones((4, 5, 6, 7, 8), dtype=np.int16),
        np.zeros(1000, dtype=[("a", "<i4"), ("b", "<f8")]),  # structured: by pickle
    ]


def _echo_arrays(q: Any, back: Any) -> None:
    for _ in range(len(_plain_arrays())):
        arr = q.get(timeout=30)
        # numpy's pickle below protocol 5 (mp.Queue's) turns a non-native byte
        # order into the native one, values kept; ours keeps it, as protocol 5
        # does: compare in native order, the exact dtype is checked below
        native = arr.astype(arr.dtype.newbyteorder("="))
        back.put((arr.shape, native.dtype.str, native.tobytes(), arr.flags.f_contiguous))


def test_plain_arrays_arrive_as_mp_queue_delivers_them(smm: SharedMemoryManager) -> None:
    # differential: the same arrays through multiprocessing.Queue and through
    # ours, to another process, must arrive with the same shape, dtype, bytes
    # and memory order (numpy's pickle keeps F order, so must we)
    ctx = mp.get_context("fork")
    results = []
    for q, back in ((ctx.Queue(), ctx.Queue()), (smm.Queue(), smm.Queue())):
        p = ctx.Process(target=_echo_arrays, args=(q, back))
        p.start()
        try:
            for arr in _plain_arrays():
                q.put(arr)
            results.append([back.get(timeout=30) for _ in _plain_arrays()])
        finally:
            p.join(30)
    assert results[0] == results[1]


def test_plain_arrays_skip_the_pickler(smm: SharedMemoryManager) -> None:
    q = smm.Queue()
    arrays = _plain_arrays()
    kinds = []
    for arr in arrays:
        q.put(arr)
        core = q._core
        kinds.append(core.ring_q[(core.w[queues.W_HEAD] & core.mask) >> 3] >> 32)
        got = q.get()
        assert type(got) is SharedArray and got._in_block()
        assert got.dtype == arr.dtype and got.shape == arr.shape
        if arr.flags.f_contiguous and not arr.flags.c_contiguous:
            assert got.flags.f_contiguous and not got.flags.c_contiguous
        else:
            assert got.flags.c_contiguous
        assert np.array_equal(got, arr) if arr.dtype.kind != "V" else got.tobytes() == arr.tobytes()
        got[()] = got[()]  # the receiver owns a writable copy
    assert kinds == [queues.K_ARRAY] * (len(arrays) - 1) + [queues.K_PICKLE]
    # batches too, and an array inside another message still goes by handle
    q.put_many([*arrays[:3], ("tuple", arrays[1])])
    got = q.get_many(10)
    assert all(np.array_equal(a, b) for a, b in zip(got[:3], arrays[:3], strict=True))
    assert got[3][0] == "tuple" and type(got[3][1]) is SharedArray
    assert np.array_equal(got[3][1], arrays[1])
    assert q._check() == [] and smm.heap.check() == []


def _record_at_head(q: Queue) -> memoryview:
    core = q._core
    off = core.w[queues.W_HEAD] & core.mask
    n = core.ring_q[off >> 3] & queues._M32
    return core.ring[off + 8 : off + 8 + n]


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda rec: rec.__setitem__(slice(26, 29), b"|O8"), TypeError),  # an object dtype
        (lambda rec: rec.__setitem__(24, 9), ValueError),  # ndim past the record's end
        (lambda rec: rec.__setitem__(23, 7), ValueError),  # no such order
        (lambda rec: rec.__setitem__(slice(26, 29), b"<zz"), ValueError),  # no such dtype
        (lambda rec: rec.__setitem__(slice(29, 37), (1 << 40).to_bytes(8, "little")), ValueError),
    ],
)
def test_a_damaged_array_record_raises_and_the_queue_goes_on(
    smm: SharedMemoryManager, damage: Callable[[memoryview], None], error: type[Exception]
) -> None:
    q = smm.Queue()
    q.put(np.arange(5000, dtype=np.float64))
    q.put("next")
    rec = _record_at_head(q)
    assert bytes(rec[26:29]) == b"<f8"
    damage(rec)
    with pytest.raises(error):
        q.get()
    assert q.get() == "next"
    assert q._check() == []


def test_a_shared_array_changed_in_place_is_sent_as_it_is_now(smm: SharedMemoryManager) -> None:
    # an array put again and again is encoded once; any change of what its
    # handle says must show
    q = smm.Queue()
    arr = smm.zeros(12)
    arr[:] = np.arange(12)
    q.put(arr)
    assert q.get().shape == (12,)
    arr.shape = (3, 4)
    q.put(arr)
    assert q.get().shape == (3, 4)
    arr.flags.writeable = False
    q.put(arr)
    assert q.get().flags.writeable is False
    arr.dtype = np.int64  # reinterpreted in place
    q.put(arr)
    got = q.get()
    assert got.dtype == np.int64 and np.array_equal(got, arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2.4 deprecates it
        arr.strides = (8, 24)
    q.put(arr)
    assert q.get().strides == (8, 24)
    view = arr[1:]  # another object over the same block
    q.put(view)
    assert np.array_equal(q.get(), view)
    # what is remembered holds no Block: it would keep a shut-down heap mapped
    assert not any(isinstance(x, Block) for _, key, _ in queues._sent.values() for x in key)


def test_a_freed_shared_array_fails_at_the_receiver(smm: SharedMemoryManager) -> None:
    from sharedobj.errors import StaleHandleError

    q = smm.Queue()
    arr = smm.zeros(100)
    q.put(arr)
    q.get()
    arr.free()
    q.put(arr)  # as pickling it would: the handle goes, the receiver finds it stale
    with pytest.raises(StaleHandleError):
        q.get()
    q.put("next")
    assert q.get() == "next" and q._check() == []


def test_shared_arrays_pass_the_plain_unpickle_policy(smm: SharedMemoryManager) -> None:
    from sharedobj import trust

    q = smm.Queue()
    arr = smm.zeros(4, dtype=[("a", "<i4")])
    trust.set_unpickle_policy("plain")
    try:
        q.put(arr)
        assert q.get().dtype == arr.dtype
    finally:
        trust.set_unpickle_policy("any")


@pytest.mark.parametrize(
    ("items", "batched"),
    [
        ([1, 2.5, "s", b"b", True, None, 1j], True),
        ([(1, "a"), (2, "b"), 3, ()], True),
        ([(1, "a"), (2, [3])], False),  # a list inside a tuple: mutable, no shared batch
        ([1, [2]], False),
        (
            [
                (1, np.arange(3)),
            ],
            False,
        ),  # an array to hand over
        ([((1, 2), 3)], False),  # nested tuples: only one level is checked
        ([1, object()], False),
    ],
)
def test_put_many_batches_only_plain_items(
    smm: SharedMemoryManager, items: list[Any], batched: bool
) -> None:
    # one batch record shares one pickle (and its memo) among its messages, so
    # only immutable plain data may go there; the rest goes message by message
    q = smm.Queue()
    q.put_many(items)
    core = q._core
    word = core.ring_q[(core.w[queues.W_HEAD] & core.mask) >> 3]
    assert (word >> 48 == queues._BATCH_TAG) == batched
    got = q.get_many(100)
    assert len(got) == len(items)
    for mine, theirs in zip(items, got, strict=True):
        if type(mine) is object:
            assert type(theirs) is object
        elif isinstance(mine, tuple) and mine and isinstance(mine[-1], np.ndarray):
            assert mine[0] == theirs[0] and np.array_equal(mine[1], theirs[1])
        else:
            assert theirs == mine


def test_a_received_array_freed_by_hand_is_not_reused(smm: SharedMemoryManager) -> None:
    # SharedArray.free() on a received copy gives its block back at once; when
    # the array is then collected, the queue is offered a handle of a freed
    # block: the next put must notice and copy into a new one
    q = smm.Queue()
    for size in (2000, 1 << 17):  # a small block and a page run
        q.put(np.arange(size, dtype=np.float64))
        got = q.get()
        got.free()
        del got
        gc.collect()
        other = smm.heap.alloc(size * 8)  # may take the freed memory
        q.put(np.full(size, 5.0))
        again = q.get()
        assert np.array_equal(again, np.full(size, 5.0))
        other.buf[:8] = b"x" * 8
        assert again[0] == 5.0  # not the same memory as someone else's block
        del again
        other.free()
        gc.collect()
    assert q._check() == [] and smm.heap.check() == []
