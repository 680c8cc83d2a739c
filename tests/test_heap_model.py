"""The heap against a model: random alloc/free/write/read across 1 to 4 processes.

A hypothesis state machine runs in the pytest process (the *driver*), which
owns the heap and K worker processes forked from it.  Each worker serves a
tiny command loop over a pipe; blocks travel between processes as pickled
handles, so a block is routinely allocated by one process, written by a
second, read by a third and freed by a fourth.  The driver itself takes part
as one more process (index K), running the same commands in-process.

The model keeps every live block's ``(arena, offset, size, kind)`` and the
seed of the pattern it was last filled with, and checks:

1. blocks never overlap: the byte ranges each live small slot or page run
   reserves in an arena are disjoint, and a huge block is alone in its arena;
2. contents are preserved: reading a live block from any process returns the
   pattern of its seed;
3. ``check()`` stays clean;
4. freeing twice raises StaleHandleError and leaves ``check()`` clean; so do
   stale handles whose generation cannot have come back;
5. at teardown, once everything is freed, ``check()`` is clean and
   ``stats()['used_bytes']`` is 0 (cached small blocks count as free).

The machine runs one command at a time, so a failing sequence replays
exactly and shrinks well; concurrency is the business of the deterministic
stress test at the end: 4 forked processes doing random alloc/free at once,
with frees across processes through a shared queue.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import queue as queue_mod
import random
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from sharedobj import Heap, StaleHandleError, limits
from sharedobj.allocator.classes import CLASS_SIZES, MAX_SMALL, class_of
from sharedobj.limits import PAGE_SIZE

CTX = multiprocessing.get_context("fork")
REPLY_TIMEOUT = 60.0  # seconds a worker may take for one command before we call it a hang

HEAP_SIZE = 4 << 20
HUGE_THRESHOLD = 1 << 20
MAX_HUGE = 3 << 20
SMALL, RUN, HUGE = 0, 1, 2

# pattern bytes: a 251-periodic ramp, shifted and xored by the block's seed
_RAMP = (np.arange(MAX_HUGE + 256, dtype=np.int64) % 251).astype(np.uint8)


def pattern(n: int, seed: int) -> np.ndarray:
    start = seed % 251
    return _RAMP[start : start + n] ^ np.uint8((seed // 251) & 0xFF)


def fill(buf: memoryview, seed: int) -> None:
    np.frombuffer(buf, dtype=np.uint8)[:] = pattern(len(buf), seed)


def mismatch(buf: memoryview, seed: int) -> str | None:
    """None when ``buf`` holds the pattern of ``seed``, else where it differs."""
    got = np.frombuffer(buf, dtype=np.uint8)
    want = pattern(len(buf), seed)
    if np.array_equal(got, want):
        return None
    bad = np.flatnonzero(got != want)
    i = int(bad[0])
    return (
        f"{len(bad)} of {len(buf)} bytes differ, first at {i}: "
        f"got {int(got[i]):#04x}, expected {int(want[i]):#04x}"
    )


def reserved(kind: int, size: int) -> int:
    """Bytes a live block really owns in its arena (its slot, or its whole pages)."""
    if kind == SMALL:
        return CLASS_SIZES[class_of(size)]
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def expected_kind(size: int) -> int:
    if size <= MAX_SMALL:
        return SMALL
    return HUGE if size > HUGE_THRESHOLD else RUN


# --------------------------------------------------------------------------
# commands, run in a worker or in the driver


class Ctx:
    """One process's view: the heap object it uses (replaced by reattach)."""

    def __init__(self, heap: Heap) -> None:
        self.heap = heap


def execute(ctx: Ctx, cmd: tuple[Any, ...]) -> Any:
    op = cmd[0]
    if op == "alloc":
        _op, nbytes, seed = cmd
        b = ctx.heap.alloc(nbytes)
        buf = b.buf
        if len(buf) != nbytes or buf.readonly:
            raise AssertionError(f"alloc({nbytes}) gave a buffer of {len(buf)} bytes")
        fill(buf, seed)
        return pickle.dumps(b), (b.arena, b.offset, b.size, b.gen, b.kind)
    if op == "write":
        _op, hb, seed = cmd
        fill(pickle.loads(hb).buf, seed)
        return None
    if op == "read":
        _op, hb, seed = cmd
        return mismatch(pickle.loads(hb).buf, seed)
    if op == "free":
        ctx.heap.free(pickle.loads(cmd[1]))
        return None
    if op == "stale":
        # a handle the model knows is stale: every use must raise StaleHandleError
        out = []
        for use in ("read", "free"):
            try:
                b = pickle.loads(cmd[1])
                if use == "read":
                    bytes(b.buf[:1])
                else:
                    ctx.heap.free(b)
            except StaleHandleError:
                out.append("stale")
            except Exception as exc:
                out.append(f"{type(exc).__name__}: {exc}")
            else:
                out.append("no error")
        return out
    if op == "check":
        return ctx.heap.check()
    if op == "stats":
        s = ctx.heap.stats()
        s.pop("classes", None)
        return s
    if op == "reattach":
        heap_id = ctx.heap.id
        ctx.heap.close()
        ctx.heap = Heap.attach(heap_id)
        return None
    if op == "pid":
        return os.getpid()
    raise ValueError(f"unknown command {op!r}")


def worker_main(conn: Any, heap: Heap) -> None:
    ctx = Ctx(Heap.attach(heap.id))  # a fork child: the parent's heap, reset for this process
    try:
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            if cmd[0] == "stop":
                ctx.heap.close()
                conn.send(("ok", None))
                return
            try:
                reply: tuple[Any, ...] = ("ok", execute(ctx, cmd))
            except BaseException as exc:
                reply = ("err", type(exc).__name__, str(exc), traceback.format_exc())
            conn.send(reply)
    finally:
        with contextlib.suppress(Exception):
            ctx.heap.close()


class WorkerError(Exception):
    def __init__(self, name: str, message: str, tb: str) -> None:
        super().__init__(f"{name}: {message}\n--- in the worker:\n{tb}")
        self.name = name


class Worker:
    def __init__(self, heap: Heap) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=worker_main, args=(child, heap), daemon=True)
        self.proc.start()
        child.close()

    def call(self, *cmd: Any) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(REPLY_TIMEOUT):
            self.kill()
            raise AssertionError(f"worker {self.proc.pid} hung on {cmd[0]!r}")
        try:
            reply = self.conn.recv()
        except EOFError:
            raise AssertionError(
                f"worker {self.proc.pid} died on {cmd[0]!r} (exit code {self.proc.exitcode})"
            ) from None
        if reply[0] == "ok":
            return reply[1]
        raise WorkerError(*reply[1:])

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.call("stop")
            self.proc.join(10)
        self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join(10)
        self.conn.close()


class Local:
    """The driver, as one more participant (in-process, same interface as a Worker)."""

    def __init__(self, heap: Heap) -> None:
        self.ctx = Ctx(heap)

    def call(self, *cmd: Any) -> Any:
        try:
            return execute(self.ctx, cmd)
        except Exception as exc:
            raise WorkerError(type(exc).__name__, str(exc), traceback.format_exc()) from exc


# everything a test made, cleaned up by the fixture even when the machine could not
_resources: list[tuple[Heap, list[Worker]]] = []
_segments: set[int] = set()  # shmids of every heap's root, arenas and huge blocks


def destroy(heap: Heap) -> None:
    """Remove the heap's segments now (they vanish once no process maps them)."""
    if heap.closed:
        return
    _segments.add(heap.id)
    with contextlib.suppress(Exception):
        for _i, _kind, ids, _size in heap._a().arena_ids():
            _segments.update(ids)
    with contextlib.suppress(Exception):
        heap.destroy()


def leftover_segments() -> list[int]:
    """Segments of this test's heaps that still exist (once nothing refers to them)."""
    for w in [w for entry in _resources for w in entry[1]]:
        w.kill()
    _resources.clear()  # a closed Heap object keeps its root mapped until it is collected
    gc.collect()
    return sorted(i for i in _segments if limits.segment_info(i) is not None)


@pytest.fixture
def heap_resources() -> Iterator[list[tuple[Heap, list[Worker]]]]:
    _resources.clear()
    _segments.clear()
    try:
        yield _resources
    finally:
        for heap, workers in _resources:
            for w in workers:
                with contextlib.suppress(Exception):
                    w.kill()
            destroy(heap)
        _resources.clear()
        _segments.clear()


# --------------------------------------------------------------------------
# the state machine


@dataclass
class Live:
    handle: bytes
    arena: int
    offset: int
    size: int
    kind: int
    gen: int
    seed: int


small_sizes = st.one_of(
    st.integers(1, 64),
    st.sampled_from([1, 15, 16, 17, 128, 129, 4096, 4097, MAX_SMALL - 1, MAX_SMALL]),
    st.integers(1, 4096),
    st.integers(1, MAX_SMALL),
)
medium_sizes = st.one_of(
    st.sampled_from([MAX_SMALL + 1, 9 * PAGE_SIZE, 256 << 10, HUGE_THRESHOLD]),
    st.integers(MAX_SMALL + 1, HUGE_THRESHOLD),
)
huge_sizes = st.integers(HUGE_THRESHOLD + 1, MAX_HUGE)
sizes = st.one_of(small_sizes, small_sizes, small_sizes, medium_sizes, medium_sizes, huge_sizes)
seeds = st.integers(0, 251 * 256 - 1)
picks = st.integers(0, 1 << 16)


class HeapModel(RuleBasedStateMachine):
    nworkers = 2
    max_segment_size: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.heap = Heap.create(
            HEAP_SIZE,
            huge_threshold=HUGE_THRESHOLD,
            max_segment_size=self.max_segment_size,
        )
        self.workers: list[Worker] = []
        _resources.append((self.heap, self.workers))
        for _ in range(self.nworkers):
            self.workers.append(Worker(self.heap))
        self.local = Local(self.heap)
        self.live: list[Live] = []
        self.freed: list[Live] = []  # handles whose blocks are gone

    def proc(self, i: int) -> Worker | Local:
        """Process ``i``: a worker, or the driver for the last index."""
        i %= self.nworkers + 1
        return self.local if i == self.nworkers else self.workers[i]

    # ---------------------------------------------------------------- rules

    @rule(p=picks, nbytes=sizes, seed=seeds)
    def alloc(self, p: int, nbytes: int, seed: int) -> None:
        self.record(nbytes, seed, self.proc(p).call("alloc", nbytes, seed))

    def record(self, nbytes: int, seed: int, reply: Any) -> None:
        hb, (arena, offset, size, gen, kind) = reply
        assert size == nbytes
        assert kind == expected_kind(nbytes), (nbytes, kind)
        new = Live(hb, arena, offset, size, kind, gen, seed)
        if kind == HUGE:
            assert offset == 0
        else:
            assert offset % (16 if kind == SMALL else PAGE_SIZE) == 0, new
        lo, hi = offset, offset + reserved(kind, size)
        for old in self.live:
            if old.arena != arena:
                continue
            assert kind != HUGE and old.kind != HUGE, f"{new} shares an arena with {old}"
            olo, ohi = old.offset, old.offset + reserved(old.kind, old.size)
            assert hi <= olo or ohi <= lo, f"{new} overlaps {old}"
        self.live.append(new)

    @precondition(lambda self: self.live)
    @rule(p=picks, i=picks)
    def free(self, p: int, i: int) -> None:
        blk = self.live.pop(i % len(self.live))
        self.proc(p).call("free", blk.handle)
        self.freed.append(blk)

    @precondition(lambda self: self.live)
    @rule(p=picks, q=picks, i=picks)
    def free_twice(self, p: int, q: int, i: int) -> None:
        blk = self.live.pop(i % len(self.live))
        self.proc(p).call("free", blk.handle)
        self.freed.append(blk)
        with pytest.raises(WorkerError) as info:
            self.proc(q).call("free", blk.handle)
        assert info.value.name == "StaleHandleError", info.value
        assert self.proc(q).call("check") == []

    @precondition(lambda self: self.live)
    @rule(p=picks, i=picks, seed=seeds)
    def write(self, p: int, i: int, seed: int) -> None:
        blk = self.live[i % len(self.live)]
        self.proc(p).call("write", blk.handle, seed)
        blk.seed = seed

    @precondition(lambda self: self.live)
    @rule(p=picks, i=picks)
    def read(self, p: int, i: int) -> None:
        blk = self.live[i % len(self.live)]
        bad = self.proc(p).call("read", blk.handle, blk.seed)
        assert bad is None, f"{blk} read by process {p % (self.nworkers + 1)}: {bad}"

    @rule(p=picks)
    def read_all(self, p: int) -> None:
        w = self.proc(p)
        for blk in self.live:
            bad = w.call("read", blk.handle, blk.seed)
            assert bad is None, f"{blk} read by process {p % (self.nworkers + 1)}: {bad}"

    def _surely_stale(self, blk: Live) -> bool:
        """Whether no live block can carry this freed handle's generation.

        Runs and huge blocks have heap-wide 32-bit generations that never come
        back.  A small block's generation is a 7-bit tag in its slot's state
        byte: a live block reusing the slot with the *same* tag makes the old
        handle indistinguishable from the new one (see
        test_small_tag_collision_after_cross_process_free), so those are left
        out here; a different tag must be caught.
        """
        if blk.kind != SMALL:
            return True
        return not any(
            b.kind == SMALL and b.arena == blk.arena and b.offset == blk.offset and b.gen == blk.gen
            for b in self.live
        )

    @precondition(lambda self: self.freed)
    @rule(p=picks, i=picks)
    def use_stale_handle(self, p: int, i: int) -> None:
        blk = self.freed[i % len(self.freed)]
        if not self._surely_stale(blk):
            return
        assert self.proc(p).call("stale", blk.handle) == ["stale", "stale"], blk
        assert self.proc(p).call("check") == []

    @rule(p=picks)
    def check(self, p: int) -> None:
        assert self.proc(p).call("check") == []

    @rule(p=picks)
    def reattach(self, p: int) -> None:
        """A worker closes the heap (flushing its magazines) and attaches it again."""
        if p % (self.nworkers + 1) == self.nworkers:
            return  # the driver keeps its heap: it owns it
        self.proc(p).call("reattach")

    @rule(p=picks)
    def kill_and_replace(self, p: int) -> None:
        """SIGKILL an idle worker (its cached slots must be reclaimed) and fork a new one."""
        k = p % self.nworkers
        self.workers[k].kill()
        self.workers[k] = Worker(self.heap)

    # ------------------------------------------------------------ teardown

    def teardown(self) -> None:
        failing = sys.exc_info()[1] is not None
        try:
            if not failing:
                self.final_checks()
        finally:
            for w in self.workers:
                w.stop()
            destroy(self.heap)
            # forget the heap: a closed Heap object keeps its root mapped until collected
            _resources[:] = [r for r in _resources if r[0] is not self.heap]
            self.local = self.heap = None  # type: ignore[assignment]

    def final_checks(self) -> None:
        everyone = list(range(self.nworkers + 1))
        for n, blk in enumerate(self.live):
            w = self.proc(n)
            assert w.call("read", blk.handle, blk.seed) is None, blk
            w.call("free", blk.handle)
        self.live.clear()
        for p in everyone:
            assert self.proc(p).call("check") == [], f"process {p}"
        assert self.local.call("stats")["used_bytes"] == 0
        # workers leave: their magazines go back, the heap stays healthy and empty
        for w in self.workers:
            w.stop()
        self.heap.recover()
        assert self.heap.check() == []
        s = self.heap.stats()
        assert s["used_bytes"] == 0, s
        assert s["processes"] == 1, s


MODEL_SETTINGS = settings(
    max_examples=50,
    stateful_step_count=50,
    deadline=None,
    report_multiple_bugs=False,  # shrink one failure only: keeps a failing run short
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def make_machine(nworkers: int, max_segment_size: int | None) -> type[HeapModel]:
    return type(
        f"HeapModel{nworkers}{'Span' if max_segment_size else ''}",
        (HeapModel,),
        {"nworkers": nworkers, "max_segment_size": max_segment_size},
    )


@pytest.mark.parametrize(
    ("nworkers", "max_segment_size"),
    [(1, None), (2, 1 << 20), (4, None)],
    ids=["1-worker", "2-workers-spans", "4-workers"],
)
def test_heap_model(
    heap_resources: list[tuple[Heap, list[Worker]]], nworkers: int, max_segment_size: int | None
) -> None:
    run_state_machine_as_test(make_machine(nworkers, max_segment_size), settings=MODEL_SETTINGS)
    assert leftover_segments() == []


# --------------------------------------------------------------------------
# the minimal examples hypothesis found, as plain regression tests


def test_huge_block_index_reused_by_another_process(
    heap_resources: list[tuple[Heap, list[Worker]]],
) -> None:
    """A process must not reach a new huge block through its mapping of a freed one.

    P0 allocates huge block A (arena index i); P1 frees A and allocates huge
    block B, which reuses table entry i.  P0 still has A's segment cached for
    index i, and B's handle passes the generation check, so P0 reads and
    writes A's dead segment instead of B (or gets "reaches past its segment"
    when B is larger than A).
    """
    heap = Heap.create(HEAP_SIZE, huge_threshold=HUGE_THRESHOLD)
    workers: list[Worker] = []
    heap_resources.append((heap, workers))
    workers += [Worker(heap), Worker(heap)]
    p0, p1 = workers
    hb_a, a = p0.call("alloc", HUGE_THRESHOLD + 1, 1)
    p1.call("free", hb_a)
    hb_b, b = p1.call("alloc", HUGE_THRESHOLD + 1, 2)
    assert (a[0], a[4], b[0], b[4]) == (1, HUGE, 1, HUGE)  # same table entry, both huge
    assert p1.call("read", hb_b, 2) is None
    assert mismatch(pickle.loads(hb_b).buf, 2) is None  # the driver sees B
    assert p0.call("read", hb_b, 2) is None  # fails: P0 reads A's freed segment
    p0.call("write", hb_b, 3)
    assert p1.call("read", hb_b, 3) is None
    p0.call("free", hb_b)
    assert p0.call("check") == []


def test_small_tag_collision_after_cross_process_free(
    heap_resources: list[tuple[Heap, list[Worker]]],
) -> None:
    """Freeing a block twice must raise, even after another process reused its slot.

    Every process numbers its small-block tags from the same start (129 for
    its first allocation, reset at fork), and a freed slot goes to the freeing
    process's magazine, which hands it out next.  So: P0 allocates x (tag
    129), P1 frees x and allocates y, which gets x's slot *and* tag 129.  The
    stale handle x is now indistinguishable from y: freeing x again succeeds
    and silently frees P1's live block y.
    """
    heap = Heap.create(HEAP_SIZE, huge_threshold=HUGE_THRESHOLD)
    workers: list[Worker] = []
    heap_resources.append((heap, workers))
    workers += [Worker(heap), Worker(heap)]
    p0, p1 = workers
    hb_x, x = p0.call("alloc", 100, 1)
    p1.call("free", hb_x)
    hb_y, y = p1.call("alloc", 100, 2)
    assert (x[0], x[1]) == (y[0], y[1])  # the same slot, reused at once
    with pytest.raises(WorkerError) as info:
        p0.call("free", hb_x)  # fails: this frees y
    assert info.value.name == "StaleHandleError"
    assert p1.call("read", hb_y, 2) is None
    p1.call("free", hb_y)
    assert heap.check() == []


# --------------------------------------------------------------------------
# deterministic stress: 4 processes, cross-process frees through a queue

STRESS_PROCS = 4
STRESS_OPS = 5000


def stress_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.randint(1, 256)
    if r < 0.9:
        return rng.randint(1, MAX_SMALL)
    if r < 0.995:
        return rng.randint(MAX_SMALL + 1, 256 << 10)
    return rng.randint(HUGE_THRESHOLD + 1, 2 << 20)


def stress_worker(heap: Heap, rank: int, xfer: Any, done: Any) -> None:
    h = Heap.attach(heap.id)
    rng = random.Random(1000 + rank)
    errors: list[str] = []
    mine: list[tuple[Any, int]] = []  # (block, seed)
    counts = {"alloc": 0, "free": 0, "cross": 0, "double": 0}

    def verify(b: Any, seed: int, what: str) -> None:
        bad = mismatch(b.buf, seed)
        if bad is not None:
            errors.append(f"rank {rank}: {what} {b!r}: {bad}")

    def release(b: Any, seed: int, what: str) -> None:
        verify(b, seed, what)
        h.free(b)
        counts["free"] += 1
        if rng.random() < 0.02:
            try:
                h.free(pickle.loads(pickle.dumps(b)))
            except StaleHandleError:
                counts["double"] += 1
            else:
                errors.append(f"rank {rank}: double free of {b!r} did not raise")

    try:
        for _ in range(STRESS_OPS):
            r = rng.random()
            if r < 0.45 or not mine:
                seed = rng.randrange(251 * 256)
                b = h.alloc(stress_size(rng))
                counts["alloc"] += 1
                fill(b.buf, seed)
                if rng.random() < 0.5:
                    xfer.put((pickle.dumps(b), seed))
                else:
                    mine.append((b, seed))
            elif r < 0.75 or len(mine) > 200:
                b, seed = mine.pop(rng.randrange(len(mine)))
                release(b, seed, "own block")
            else:
                try:
                    hb, seed = xfer.get(timeout=0.01)
                except queue_mod.Empty:
                    continue
                b = pickle.loads(hb)
                counts["cross"] += 1
                if rng.random() < 0.7:
                    release(b, seed, "received block")
                else:
                    verify(b, seed, "received block")
                    seed = rng.randrange(251 * 256)
                    fill(b.buf, seed)  # rewritten by a process that did not allocate it
                    mine.append((b, seed))
        for b, seed in mine:
            verify(b, seed, "kept block")
            done.put(("block", pickle.dumps(b), seed))
        problems = h.check()
        if problems:
            errors.append(f"rank {rank}: check(): {problems}")
    except BaseException:
        errors.append(f"rank {rank}: {traceback.format_exc()}")
    finally:
        done.put(("report", rank, errors, counts))
        h.close()


def test_stress_cross_process_frees(heap_resources: list[tuple[Heap, list[Worker]]]) -> None:
    heap = Heap.create(HEAP_SIZE, huge_threshold=HUGE_THRESHOLD)
    heap_resources.append((heap, []))
    xfer, done = CTX.Queue(), CTX.Queue()
    procs = [
        CTX.Process(target=stress_worker, args=(heap, rank, xfer, done), daemon=True)
        for rank in range(STRESS_PROCS)
    ]
    for p in procs:
        p.start()
    pending: list[tuple[bytes, int]] = []
    reports: dict[int, tuple[list[str], dict[str, int]]] = {}
    deadline = time.monotonic() + 120
    try:
        # keep draining both queues: a child cannot exit while its queue feed is full
        while len(reports) < STRESS_PROCS and time.monotonic() < deadline:
            try:
                item = done.get(timeout=0.1)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if item[0] == "block":
                pending.append((item[1], item[2]))
            else:
                reports[item[1]] = (item[2], item[3])
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        while True:
            try:
                item = done.get(timeout=0.2)
            except queue_mod.Empty:
                break
            if item[0] == "block":
                pending.append((item[1], item[2]))
        while True:
            try:
                pending.append(xfer.get(timeout=0.2))
            except queue_mod.Empty:
                break
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(10)
    assert sorted(reports) == list(range(STRESS_PROCS)), f"workers hung or died: {reports}"
    errors = [e for errs, _ in reports.values() for e in errs]
    assert errors == [], "\n".join(errors)
    assert [p.exitcode for p in procs] == [0] * STRESS_PROCS
    cross = sum(c["cross"] for _, c in reports.values())
    assert cross > 1000, reports  # the test really moved blocks between processes
    # the driver verifies and frees everything still alive, made by processes now gone
    for hb, seed in pending:
        b = pickle.loads(hb)
        assert mismatch(b.buf, seed) is None, b
        heap.free(b)
    assert heap.check() == []
    heap.recover()
    assert heap.check() == []
    s = heap.stats()
    assert s["used_bytes"] == 0, s
    assert s["processes"] == 1, s
    destroy(heap)
    del heap, b
    assert leftover_segments() == []
