"""Allocator: a mimalloc-bench-style suite for sharedobj's heap, against the obvious alternatives.

    python benchmarks/allocator.py [--quick] [--rounds N] [--json FILE] [--only a,b,...]

Every case runs its contestants in the same run, interleaved (A B A B ..., see
``_harness``), and is judged by the ratio of medians over the rounds: the host
drifts between a fast state and one about 2x slower every few tens of seconds,
so only ratios taken within a round mean much.

The anchors, and why each is there:

* **stdlib** ``multiprocessing.shared_memory.SharedMemory``, one object per
  block (create + close + unlink; a receiver opens by name).  This is what a
  Python program shares memory with today, and what sharedobj replaces: the
  ratio against it is the headline.
* **sysv_ipc**, one System V segment per block (``IPC_PRIVATE, IPC_CREX``,
  then detach + remove; never ``key=None``, whose keys collide): the naive
  System V route.  Note that sysv_ipc memsets every new segment (it writes
  spaces over it), so its cost grows with the size.
* **numpy private** ``np.empty(n, np.uint8)`` plus a one-byte touch: process
  private malloc/mmap, the floor that no shared allocator can beat.

Sections (``--only`` takes the letters or the names):

(a) ``latency``: alloc + write one byte + free, in a loop in one process, for
    16 B .. 64 MiB.  Up to 32 KiB a block comes from a slab through the
    per-process magazine; 256 KiB and 4 MiB are page runs; 64 MiB is over the
    heap's huge threshold and gets a segment of its own.  For the small sizes a
    second sharedobj contestant allocates 1000 blocks and then frees them, which
    drains and refills the magazines; rows "heap locks per alloc" give how many
    times the heap lock was taken per alloc+free in both patterns (from
    ``Allocator.lock_count``; target: far below 1).  Then alloc + fill every
    byte + free of 16 MiB, where page faults decide: ours as it is (freed runs
    stay resident up to ``dirty_max``) and with ``dirty_max=0``.
(b) ``larson``: after Larson & Krishnan, as in mimalloc-bench.  N = 1, 2, 4
    processes each keep ~1000 live blocks (16 B..4 KiB log-uniform, 1% 64 KiB),
    replace a random one per op, and hand ~10% of the blocks they retire to
    their neighbour in a ring (pickled handles, 100 per Pipe message), which
    frees them: cross-process frees are the hard case for a per-process cache.
    One op = one alloc + one free.  Aggregate ops/s; the stdlib anchor runs the
    same program with far fewer ops; the numpy anchor runs it with private
    arrays (hand-offs pickle a copy of the array), which says how far this
    host's CPUs let any Python program scale right now (others may be busy on
    it).  A scaling row gives 2proc/1proc (target >= 1.6x on this 2-core
    machine; 4 processes on 2 cores cannot scale beyond 2).
(c) ``prodcons``: one producer allocates 64 B / 4 KiB blocks, fills them and
    sends the handles in batches of 100 through a Pipe to a consumer that
    reads and frees them.  Blocks/s, end to end.  Anchors: stdlib SharedMemory
    (producer creates + writes + closes, sends the name; consumer opens, reads,
    closes, unlinks), and sending the bytes themselves through the Pipe (the
    usual multiprocessing way: a copy per block, no shared memory at all).
(d) ``frag``: a seeded synthetic trace (four phases of small short-lived,
    medium long-lived and occasional large / huge blocks, with phase changes
    in the size mix) replayed on a heap, touching one byte per page.  Sampled
    every 256 events and at the event of peak live bytes, it reports, over the
    peak of live requested bytes (ideal = 1.0, the "requested" anchor):
    *held* = total_bytes - free_bytes (slabs, used runs, huge blocks and
    metadata: what the heap holds; free runs are MADV_REMOVE'd and untouched
    pages were never touched), target <= 1.2; *touched high-water* =
    total_bytes - untouched_bytes (every page ever handed out); *used + metadata*
    (class-rounded live bytes plus metadata); *resident* (what the kernel
    reports for the heap's segments).  The numpy anchor replays the same trace
    with private arrays in a fresh child and reports its peak RSS growth
    (VmHWM after resetting it; approximate: it includes Python objects).
    Also metadata_ratio at the peak (target <= 1%).
(e) ``growth``: creating a 1 GiB heap and a 64 GiB ``noreserve`` heap (time,
    target <= 1 ms, and resident bytes right after, target 0) against stdlib
    SharedMemory of the same size; 256 MiB of 1 MiB runs in a heap that starts
    at 8 MiB and must add arenas vs one created big enough (and vs 256 stdlib
    segments); a 256 MiB huge block as a span of 16 MiB segments vs one
    segment (vs stdlib); resident bytes before and after freeing a written
    64 MiB run, and after ``release_memory()`` (a freed run stays resident
    within the heap's ``dirty_max``; released, it should drop by 64 MiB).

``--quick`` (what CI runs) keeps the whole suite well under a minute; the full
run stays within a few minutes.

Nothing may outlive the run, even when interrupted: every heap is destroyed
and every stdlib/sysv object removed in a ``finally``; children close their
heap and clean up on SIGTERM/SIGINT; SIGINT, SIGTERM and SIGHUP raise in the
parent so those ``finally`` blocks run; and a final sweep removes any System V
segment created by this process tree that is not marked for removal and any
``/dev/shm/soalloc_<pid>_*`` file, then says what it found.
"""

from __future__ import annotations

import gc
import heapq
import os
import pickle
import queue
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing import get_context, resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import sysv_ipc

from _harness import (
    Row,
    Sampler,
    check_stop,
    human,
    parser,
    report,
    run_interleaved,
    stop_on_signals,
)
from sharedobj import Heap

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")
CHILD_TIMEOUT = 180.0
BATCH = 100  # handles per Pipe message
FORK = get_context("fork")

OURS = "sharedobj"
STDLIB = "stdlib SharedMemory"
SYSV = "sysv_ipc segment"
NUMPY = "numpy private"

SECTIONS = {"a": "latency", "b": "larson", "c": "prodcons", "d": "frag", "e": "growth"}

_name_prefix = ""
_name_counter = 0
_child_pids: set[int] = set()
_anomalies: list[str] = []


def progress(msg: str) -> None:
    print(f"[allocator] {msg}", file=sys.stderr, flush=True)


def anomaly(msg: str) -> None:
    _anomalies.append(msg)
    progress(f"ANOMALY: {msg}")


def shm_name(tag: str = "") -> str:
    """A fresh POSIX shm name that the final sweep recognises as this run's."""
    global _name_counter
    _name_counter += 1
    return f"{_name_prefix}{tag}{_name_counter}"


def posix_buf(shm: SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:  # only after close(); typeshed says it may be None
        raise ValueError(f"{shm.name} is closed")
    return buf


def drop_posix(shm: SharedMemory) -> None:
    try:
        shm.close()
    finally:
        shm.unlink()


def touch(buf: memoryview, nbytes: int) -> None:
    """Write one byte per page (just one byte for a block within a page)."""
    if nbytes <= PAGE:
        buf[0] = 1
    else:
        np.frombuffer(buf, dtype=np.uint8)[::PAGE] = 1


# --------------------------------------------------------------------------
# Signals and cleanup


def _sysv_segments_of(pids: set[int]) -> list[tuple[int, int, int]]:
    """(shmid, perms, nattch) of every System V segment one of ``pids`` created."""
    out: list[tuple[int, int, int]] = []
    with open("/proc/sysvipc/shm") as f:
        next(f)
        for line in f:
            cols = line.split()
            # key shmid perms size cpid lpid nattch ...
            if len(cols) >= 7 and int(cols[4]) in pids:
                out.append((int(cols[1]), int(cols[2], 8), int(cols[6])))
    return out


def _our_shm_files() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(_name_prefix))
    except FileNotFoundError:
        return []


def sweep() -> str:
    """Remove whatever this run left behind, and say what that was."""
    gc.collect()  # a closed heap's mappings go with its objects, some of them in cycles
    found: list[str] = []
    for shmid, perms, nattch in _sysv_segments_of({os.getpid(), *_child_pids}):
        if perms & 0o1000:  # SHM_DEST: already marked, goes at its last detach
            found.append(f"shmid {shmid} marked for removal, still attached {nattch}x")
            continue
        found.append(f"shmid {shmid} NOT marked for removal (removed now)")
        with suppress(sysv_ipc.Error):
            sysv_ipc.remove_shared_memory(shmid)
    for name in _our_shm_files():
        found.append(f"/dev/shm/{name} (unlinked now)")
        with suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{name}")
        with suppress(Exception):
            resource_tracker.unregister(f"/{name}", "shared_memory")
    return "clean: no segment and no /dev/shm file left" if not found else "; ".join(found)


@contextmanager
def new_heap(size: int, **kwargs: Any) -> Iterator[Heap]:
    """A heap destroyed on the way out, whatever happens."""
    h = Heap.create(size, **kwargs)
    try:
        yield h
    finally:
        if not h.closed:
            h.destroy()


def heap_health(h: Heap, where: str, expect_empty: bool = True) -> None:
    """Record a check() failure, or live bytes where everything was freed."""
    problems = h.check()
    if problems:
        anomaly(f"{where}: check() found {len(problems)} problem(s): {problems[:3]}")
    if expect_empty:
        used = h.stats()["used_bytes"]
        if used:
            anomaly(f"{where}: {used} bytes still used after every block was freed")


# --------------------------------------------------------------------------
# Children


def _child_main(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        value = fn(*args)
        conn.send(("ok", value))
    except BaseException:
        with suppress(Exception):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Children:
    """Forked children running ``fn(*args)``, each answering once through a Pipe."""

    def __init__(self) -> None:
        self.procs: list[tuple[BaseProcess, Connection, str]] = []

    def start(self, fn: Callable[..., Any], *args: Any) -> None:
        recv, send = FORK.Pipe(duplex=False)
        proc = FORK.Process(target=_child_main, args=(send, fn, args), daemon=True)
        proc.start()
        send.close()
        if proc.pid is not None:
            _child_pids.add(proc.pid)
        self.procs.append((proc, recv, fn.__name__))

    def results(self) -> list[Any]:
        out = []
        deadline = time.monotonic() + CHILD_TIMEOUT
        for proc, recv, name in self.procs:
            if not recv.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"child {name} gave no answer in {CHILD_TIMEOUT} s")
            try:
                status, value = recv.recv()
            except EOFError:
                proc.join(5)
                raise RuntimeError(f"child {name} died (exit code {proc.exitcode})") from None
            if status != "ok":
                raise RuntimeError(f"child {name} failed:\n{value}")
            out.append(value)
        return out

    def close(self) -> None:
        deadline = time.monotonic() + 10  # for all of them together
        for proc, recv, _ in self.procs:
            recv.close()
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc, _, _ in self.procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: its finally blocks close what it holds
        for proc, _, _ in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs.clear()


@contextmanager
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------
# Sampling


# --------------------------------------------------------------------------
# (a) alloc + free latency


def ours_pair(h: Heap, size: int) -> Callable[[int], None]:
    alloc, free = h.alloc, h.free

    def run(n: int) -> None:
        for _ in range(n):
            b = alloc(size)
            b.buf[0] = 1
            free(b)

    return run


def ours_batch(h: Heap, size: int, live: int) -> Callable[[int], None]:
    """Allocate ``live`` blocks, then free them all: n counts pairs."""
    alloc, free = h.alloc, h.free

    def run(n: int) -> None:
        done = 0
        while done < n:
            k = min(live, n - done)
            blocks = []
            for _ in range(k):
                b = alloc(size)
                b.buf[0] = 1
                blocks.append(b)
            for b in blocks:
                free(b)
            done += k

    return run


def stdlib_pair(size: int) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            shm = SharedMemory(name=shm_name(), create=True, size=size)
            try:
                posix_buf(shm)[0] = 1
            finally:
                drop_posix(shm)

    return run


def sysv_pair(size: int) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            mem = sysv_ipc.SharedMemory(sysv_ipc.IPC_PRIVATE, sysv_ipc.IPC_CREX, size=size)
            try:
                mem.write(b"\x01")
                mem.detach()
            finally:
                mem.remove()

    return run


def numpy_pair(size: int) -> Callable[[int], None]:
    empty, u8 = np.empty, np.uint8

    def run(n: int) -> None:
        for _ in range(n):
            a = empty(size, u8)
            a[0] = 1
            del a

    return run


def bench_refill(rounds: int, target: float) -> list[Row]:
    """alloc + fill every byte + free of a 16 MiB block, again and again.

    A pipeline's big buffers: each new one is written whole.  Whether its pages
    are resident decides the cost, so ours runs twice: as it is (freed runs are
    kept resident up to ``dirty_max``) and with ``dirty_max=0`` (every freed
    megabyte-plus run goes back to the kernel, so the next fill page-faults).
    """
    size = 16 * MiB
    progress(f"(a) alloc+fill+free {human(size)}")
    u8 = np.uint8

    def ours(h: Heap) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                b = h.alloc(size)
                np.frombuffer(b.buf, dtype=u8).fill(3)
                h.free(b)

        return run

    def stdlib(n: int) -> None:
        for _ in range(n):
            shm = SharedMemory(name=shm_name(), create=True, size=size)
            try:
                np.frombuffer(posix_buf(shm), dtype=u8).fill(3)
            finally:
                drop_posix(shm)

    def private(n: int) -> None:
        for _ in range(n):
            a = np.empty(size, u8)
            a.fill(3)
            del a

    given = f"{OURS} dirty_max=0"
    # 256 MiB: the huge threshold is 64 MiB, so 16 MiB is a page run
    with new_heap(256 * MiB) as kept, new_heap(256 * MiB, dirty_max=0) as cold:
        contestants: dict[str, Callable[[], float]] = {
            OURS: Sampler(ours(kept), target),
            given: Sampler(ours(cold), target),
            STDLIB: Sampler(stdlib, target),
            NUMPY: Sampler(private, target),
        }
        samples = run_interleaved(contestants, rounds)
        heap_health(kept, "(a) refill heap", expect_empty=False)
        heap_health(cold, "(a) refill heap, dirty_max=0")
    return [
        Row(
            f"alloc+fill+free {human(size)} (page run)",
            "us/op",
            False,
            OURS,
            samples,
            note="every byte written; ours keeps freed runs resident up to dirty_max "
            "(64 MiB per arena), 'dirty_max=0' gives them back to the kernel at once",
        )
    ]


class LockCounting:
    """Wraps a sharedobj sampler; remembers heap-lock acquisitions per op over the samples."""

    def __init__(self, h: Heap, sampler: Sampler) -> None:
        self.h = h
        self.sampler = sampler
        self.locks = 0
        self.ops = 0

    def _count(self) -> int:
        alloc = self.h._alloc
        return alloc.lock_count if alloc is not None else 0

    def __call__(self) -> float:
        before = self._count()
        first = self.sampler.n == 0
        value = self.sampler()
        if not first:  # the calibration call runs an unknown number of ops
            self.locks += self._count() - before
            self.ops += self.sampler.n
        return value

    def per_op(self) -> float:
        return self.locks / self.ops if self.ops else float("nan")


def bench_latency(sizes: list[int], rounds: int, target: float, quick: bool) -> list[Row]:
    rows: list[Row] = []
    live = 1000
    # 128 MiB: the huge threshold is min(64 MiB, size/4) = 32 MiB, so 4 MiB is
    # a page run and 64 MiB a huge block with a segment of its own.
    with new_heap(128 * MiB) as h:
        for size in sizes:
            b = h.alloc(size)
            kind = ("slab", "page run", "huge block")[b.kind]
            h.free(b)
            progress(f"(a) alloc+free {human(size)} ({kind})")
            pair = LockCounting(h, Sampler(ours_pair(h, size), target))
            contestants: dict[str, Callable[[], float]] = {OURS: pair}
            batch: LockCounting | None = None
            if size <= 32 * KiB:
                batch = LockCounting(h, Sampler(ours_batch(h, size, live), target))
                contestants[f"{OURS} {live} live"] = batch
            contestants[STDLIB] = Sampler(stdlib_pair(size), target)
            contestants[SYSV] = Sampler(sysv_pair(size), target, max_n=50 if quick else 200_000)
            contestants[NUMPY] = Sampler(numpy_pair(size), target)
            samples = run_interleaved(contestants, rounds)
            counts = ", ".join(
                f"{k.replace(OURS, 'ours')} {getattr(s, 'sampler', s).n}"
                for k, s in contestants.items()
            )
            rows.append(
                Row(
                    f"alloc+free {human(size)} ({kind})",
                    "us/pair",
                    False,
                    OURS,
                    samples,
                    note=f"one byte written per block; ops/sample: {counts}",
                )
            )
            if batch is not None:
                rows.append(
                    Row(
                        f"  heap locks per alloc+free {human(size)}",
                        "locks/op",
                        False,
                        OURS,
                        {OURS: [pair.per_op()], f"{OURS} {live} live": [batch.per_op()]},
                        note="target far below 1 (magazines: one refill/flush per 32 ops)",
                    )
                )
            heap_health(h, f"(a) {human(size)}")
    return rows


# --------------------------------------------------------------------------
# (b) larson


class Sender:
    """Sends from a thread, so that a ring of processes never blocks on a full pipe."""

    _STOP = object()

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is self._STOP:
                return
            self.conn.send(item)

    def send(self, item: Any) -> None:
        self.q.put(item)

    def close(self) -> None:
        self.q.put(self._STOP)
        self.thread.join()


@dataclass
class LarsonPlan:
    ops: int  # per process
    working_set: int
    seed: int


def _larson_script(plan: LarsonPlan, idx: int) -> tuple[list[int], list[int], list[bool]]:
    """Sizes (working set first), victims and hand-off decisions of one process."""
    rnd = random.Random(plan.seed * 1000 + idx)
    n = plan.working_set + plan.ops
    sizes = [64 * KiB if rnd.random() < 0.01 else int(16 * 256 ** rnd.random()) for _ in range(n)]
    victims = [rnd.randrange(plan.working_set) for _ in range(plan.ops)]
    hand = [rnd.random() < 0.1 for _ in range(plan.ops)]
    return sizes, victims, hand


def _larson_child(
    kind: str,
    h: Heap | None,
    plan: LarsonPlan,
    idx: int,
    nproc: int,
    inbox: Connection | None,
    out_conn: Connection | None,
    barrier: Any,
) -> tuple[int, float, float, int]:
    """One larson process: (ops done, start, end, heap locks taken)."""
    sizes, victims, hand = _larson_script(plan, idx)
    ws = plan.working_set
    ours = kind == OURS
    counter = 0
    tag = f"{os.getpid()}_"

    def new(size: int) -> Any:
        nonlocal counter
        if ours:
            assert h is not None
            b = h.alloc(size)
            b.buf[0] = 1
            return b
        if kind == NUMPY:
            a = np.empty(size, np.uint8)
            a[0] = 1
            return a
        counter += 1
        shm = SharedMemory(name=f"{_name_prefix}{tag}{counter}", create=True, size=size)
        posix_buf(shm)[0] = 1
        return shm

    def free_local(obj: Any) -> None:
        if ours:
            assert h is not None
            h.free(obj)
        elif kind == STDLIB:
            drop_posix(obj)

    def retire_remote(obj: Any) -> Any:
        """What goes to the neighbour: the block itself, or the stdlib name."""
        if kind != STDLIB:
            return obj  # a block pickles as its handle; an array pickles as a copy
        obj.close()
        return obj.name

    def free_received(items: list[Any]) -> None:
        if ours:
            assert h is not None
            for b in items:
                h.free(b)
        elif kind == NUMPY:
            for a in items:
                a[0] += 1
        else:
            for name in items:
                shm = SharedMemory(name=name)
                posix_buf(shm)[0] += 1
                drop_posix(shm)

    neighbour_done = False

    def drain(inbox: Connection, block: bool) -> None:
        nonlocal neighbour_done
        while not neighbour_done and (block or inbox.poll()):
            got = inbox.recv()
            if got is None:
                neighbour_done = True
            else:
                free_received(got)

    live: list[Any] = []
    pending: list[Any] = []  # handed off but not yet sent: still ours to clean up
    outbox = Sender(out_conn) if out_conn is not None else None
    locks0 = h._alloc.lock_count if ours and h is not None and h._alloc is not None else 0
    try:
        try:
            for i in range(ws):
                live.append(new(sizes[i]))
        except BaseException:
            barrier.abort()  # the others would wait for us in vain
            raise
        barrier.wait(CHILD_TIMEOUT)
        t0 = time.perf_counter()
        for i in range(plan.ops):
            j = victims[i]
            if hand[i]:
                pending.append(retire_remote(live[j]))
                if len(pending) >= BATCH:
                    if outbox is None:  # alone: the pickled batch comes back to us
                        free_received(pickle.loads(pickle.dumps(pending)))
                    else:
                        outbox.send(pending)
                    pending = []
            else:
                free_local(live[j])
            live[j] = None
            live[j] = new(sizes[ws + i])
            if inbox is not None and not i & 31:
                drain(inbox, block=False)
        if outbox is None:
            free_received(pickle.loads(pickle.dumps(pending)))
        else:
            outbox.send(pending)
            outbox.send(None)
        pending = []
        if inbox is not None:
            drain(inbox, block=True)  # until the neighbour says it is done
        if outbox is not None:  # only now: joining first would deadlock the ring
            outbox.close()
            outbox = None
        t1 = time.perf_counter()
        locks = (
            h._alloc.lock_count if ours and h is not None and h._alloc is not None else 0
        ) - locks0
        return plan.ops, t0, t1, locks
    finally:
        # An unfinished sender thread is left alone: it may be stuck on a full
        # pipe, and the process exits with os._exit, which does not wait for it.
        for obj in live:
            if obj is not None:
                with suppress(Exception):
                    free_local(obj)
        if kind == STDLIB:
            for name in pending:  # never sent: unlink them ourselves
                with suppress(Exception):
                    drop_posix(SharedMemory(name=name))
        if h is not None:
            h.close()


def larson_sample(kind: str, nproc: int, plan: LarsonPlan, stats: dict[str, list[float]]) -> float:
    """Aggregate alloc+free pairs per second of one larson run with ``nproc`` processes."""
    label = f"{kind} {nproc}p"
    pipes = [FORK.Pipe(duplex=False) for _ in range(nproc)] if nproc > 1 else []
    barrier = FORK.Barrier(nproc)
    heap_cm = new_heap(64 * MiB) if kind == OURS else None
    h = heap_cm.__enter__() if heap_cm is not None else None
    try:
        with children() as kids:
            for i in range(nproc):
                inbox = pipes[i][0] if pipes else None
                outbox = pipes[(i + 1) % nproc][1] if pipes else None
                kids.start(_larson_child, kind, h, plan, i, nproc, inbox, outbox, barrier)
            results = kids.results()
        ops = sum(r[0] for r in results)
        start = min(r[1] for r in results)
        end = max(r[2] for r in results)
        stats.setdefault(label, []).append(sum(r[3] for r in results) / ops)
        if h is not None:
            heap_health(h, f"(b) larson {nproc}p")
        return ops / (end - start)
    finally:
        for r, s in pipes:
            r.close()
            s.close()
        if heap_cm is not None:
            heap_cm.__exit__(None, None, None)


def bench_larson(rounds: int, quick: bool) -> list[Row]:
    ours_plan = LarsonPlan(ops=4000 if quick else 30000, working_set=1000, seed=1)
    std_plan = LarsonPlan(ops=300 if quick else 1500, working_set=1000, seed=1)
    nprocs = [1, 2, 4]
    progress(f"(b) larson, {nprocs} processes, {ours_plan.ops} / {std_plan.ops} ops per process")
    locks: dict[str, list[float]] = {}
    contestants: dict[str, Callable[[], float]] = {}
    for n in nprocs:
        contestants[f"{OURS} {n}p"] = lambda n=n: larson_sample(OURS, n, ours_plan, locks)
        contestants[f"{STDLIB} {n}p"] = lambda n=n: larson_sample(STDLIB, n, std_plan, locks)
        contestants[f"{NUMPY} {n}p"] = lambda n=n: larson_sample(NUMPY, n, ours_plan, locks)
    samples = run_interleaved(contestants, rounds)
    rows = []
    for n in nprocs:
        o, s = f"{OURS} {n}p", f"{STDLIB} {n}p"
        lk = locks.get(o, [])
        rows.append(
            Row(
                f"larson {n} proc{'s' if n > 1 else ''}",
                "ops/s",
                True,
                o,
                {o: samples[o], s: samples[s], f"{NUMPY} {n}p": samples[f"{NUMPY} {n}p"]},
                note=(
                    f"aggregate alloc+free pairs/s; {ours_plan.ops} (ours) / {std_plan.ops} "
                    f"(stdlib) ops per process, 1000 live each, 10% freed by the neighbour; "
                    f"heap locks per op {sorted(lk)[len(lk) // 2]:.4f}"
                    if lk
                    else ""
                ),
            )
        )
    scale: dict[str, list[float]] = {}
    for who in (OURS, STDLIB, NUMPY):
        one = samples[f"{who} 1p"]
        for n in nprocs[1:]:
            many = samples[f"{who} {n}p"]
            scale[f"{who} {n}p/1p"] = [m / o for m, o in zip(many, one, strict=True)]
    cpus = os.cpu_count() or 0
    for n in nprocs[1:]:
        o, s = f"{OURS} {n}p/1p", f"{STDLIB} {n}p/1p"
        rows.append(
            Row(
                f"larson scaling {n}p/1p",
                "x",
                True,
                o,
                {o: scale[o], s: scale[s], f"{NUMPY} {n}p/1p": scale[f"{NUMPY} {n}p/1p"]},
                note=f"per-round ratio; numpy = what this machine's CPUs allow now; {cpus} cores"
                + ("; target >= 1.6x" if n == 2 else "; cannot exceed the core count"),
            )
        )
    return rows


# --------------------------------------------------------------------------
# (c) producer / consumer


def _producer(kind: str, h: Heap | None, n: int, size: int, out: Connection) -> tuple[float, int]:
    payload = bytes([7]) * size
    tag = f"p{os.getpid()}_"
    batch: list[Any] = []
    t0 = time.perf_counter()
    try:
        if kind == OURS:
            assert h is not None and h._alloc is not None
            locks0 = h._alloc.lock_count
            alloc = h.alloc
            for _ in range(n):
                b = alloc(size)
                b.buf[:] = payload
                batch.append(b)
                if len(batch) == BATCH:
                    out.send(batch)
                    batch = []
            out.send(batch)
            out.send(None)
            return t0, h._alloc.lock_count - locks0
        if kind == STDLIB:
            for i in range(n):
                shm = SharedMemory(name=f"{_name_prefix}{tag}{i}", create=True, size=size)
                try:
                    posix_buf(shm)[:size] = payload
                    shm.close()
                except BaseException:
                    drop_posix(shm)
                    raise
                batch.append(shm.name)
                if len(batch) == BATCH:
                    out.send(batch)
                    batch = []
        else:
            for _ in range(n):
                batch.append(bytearray(payload))
                if len(batch) == BATCH:
                    out.send(batch)
                    batch = []
        out.send(batch)
        out.send(None)
        return t0, 0
    finally:
        if h is not None:
            h.close()


def _consumer(kind: str, h: Heap | None, inbox: Connection, size: int) -> tuple[float, int, int]:
    count = 0
    bad = 0
    try:
        locks0 = h._alloc.lock_count if h is not None and h._alloc is not None else 0
        while True:
            batch = inbox.recv()
            if batch is None:
                break
            if kind == OURS:
                assert h is not None
                for b in batch:
                    data = bytes(b.buf)
                    bad += data[-1] != 7
                    h.free(b)
            elif kind == STDLIB:
                for name in batch:
                    shm = SharedMemory(name=name)
                    try:
                        data = bytes(posix_buf(shm)[:size])
                    finally:
                        drop_posix(shm)
                    bad += data[-1] != 7
            else:
                for item in batch:
                    data = bytes(item)
                    bad += data[-1] != 7
            count += len(batch)
        t1 = time.perf_counter()
        locks = (h._alloc.lock_count if h is not None and h._alloc is not None else 0) - locks0
        if bad:
            raise RuntimeError(f"{bad} of {count} blocks had the wrong contents")
        return t1, count, locks
    finally:
        if h is not None:
            h.close()


def prodcons_sample(kind: str, n: int, size: int, locks: list[float]) -> float:
    """Blocks per second from the producer's first alloc to the consumer's last free."""
    recv, send = FORK.Pipe(duplex=False)
    heap_cm = new_heap(64 * MiB) if kind == OURS else None
    h = heap_cm.__enter__() if heap_cm is not None else None
    try:
        with children() as kids:
            kids.start(_consumer, kind, h, recv, size)
            kids.start(_producer, kind, h, n, size, send)
            (t1, count, clocks), (t0, plocks) = kids.results()
        if count != n:
            raise RuntimeError(f"consumer got {count} blocks, expected {n}")
        if h is not None:
            locks.append((clocks + plocks) / n)
            heap_health(h, f"(c) producer/consumer {human(size)}")
        return n / (t1 - t0)
    finally:
        recv.close()
        send.close()
        if heap_cm is not None:
            heap_cm.__exit__(None, None, None)


def bench_prodcons(rounds: int, quick: bool) -> list[Row]:
    rows = []
    n_ours = 5000 if quick else 40000
    n_std = 300 if quick else 2000
    pipe = "Pipe (copy bytes)"
    for size in (64, 4 * KiB):
        progress(f"(c) producer/consumer {human(size)}: {n_ours} / {n_std} blocks")
        locks: list[float] = []
        samples = run_interleaved(
            {
                OURS: lambda size=size, lk=locks: prodcons_sample(OURS, n_ours, size, lk),
                STDLIB: lambda size=size, lk=locks: prodcons_sample(STDLIB, n_std, size, lk),
                pipe: lambda size=size, lk=locks: prodcons_sample(pipe, n_ours, size, lk),
            },
            rounds,
        )
        lk = sorted(locks)
        rows.append(
            Row(
                f"producer->consumer {human(size)}",
                "blocks/s",
                True,
                OURS,
                samples,
                note=(
                    f"fill, send handles {BATCH} per message, read, free; "
                    f"{n_ours} blocks (ours, pipe) / {n_std} (stdlib); "
                    f"heap locks per block (both sides) {lk[len(lk) // 2]:.4f}"
                ),
            )
        )
    return rows


# --------------------------------------------------------------------------
# (d) fragmentation replay


@dataclass
class Phase:
    name: str
    mix: list[tuple[float, int, int, float]]  # (weight, min size, max size, mean lifetime)


PHASES = [
    Phase(
        "small churn",
        [(0.90, 16, 256, 60), (0.09, 1 * KiB, 16 * KiB, 3000), (0.01, 64 * KiB, 1 * MiB, 400)],
    ),
    Phase(
        "build-up",
        [
            (0.60, 64, 2 * KiB, 150),
            (0.36, 4 * KiB, 64 * KiB, 30000),
            (0.04, 256 * KiB, 4 * MiB, 800),
        ],
    ),
    Phase(
        "size shift",
        [(0.80, 512, 4 * KiB, 200), (0.18, 16, 128, 60000), (0.02, 128 * KiB, 2 * MiB, 500)],
    ),
    Phase(
        "teardown + rebuild",
        [(0.70, 16, 32 * KiB, 100), (0.28, 48, 1 * KiB, 5000), (0.02, 8 * KiB, 512 * KiB, 2000)],
    ),
]
HUGE_CHANCE = 0.0004  # occasional 20-40 MiB blocks, above the heap's huge threshold
HUGE_SIZES = (20 * MiB, 40 * MiB)


@dataclass
class Trace:
    sizes: list[int]  # per object id
    events: list[int]  # id >= 0: allocate that object; ~id: free it
    peak_live: int
    peak_event: int


def make_trace(n_allocs: int, seed: int) -> Trace:
    rnd = random.Random(seed)
    sizes: list[int] = []
    events: list[int] = []
    deaths: list[tuple[float, int]] = []
    live = peak = peak_event = 0
    per_phase = n_allocs // len(PHASES)
    for t in range(n_allocs):
        phase = PHASES[min(t // per_phase, len(PHASES) - 1)]
        while deaths and deaths[0][0] <= t:
            _, oid = heapq.heappop(deaths)
            events.append(~oid)
            live -= sizes[oid]
        if rnd.random() < HUGE_CHANCE:
            size = rnd.randint(*HUGE_SIZES)
            life = 200.0
        else:
            r = rnd.random()
            lo, hi, mean = phase.mix[-1][1:]
            for weight, lo_, hi_, mean_ in phase.mix:
                if r < weight:
                    lo, hi, mean = lo_, hi_, mean_
                    break
                r -= weight
            size = int(lo * (hi / lo) ** rnd.random())
            life = rnd.expovariate(1 / mean)
        oid = len(sizes)
        sizes.append(size)
        events.append(oid)
        heapq.heappush(deaths, (t + 1 + life, oid))
        live += size
        if live > peak:
            peak, peak_event = live, len(events) - 1
    while deaths:
        _, oid = heapq.heappop(deaths)
        events.append(~oid)
    return Trace(sizes, events, peak, peak_event)


FRAG_KEYS = ("held", "touched", "used+meta", "resident")


def replay_ours(trace: Trace, every: int) -> dict[str, float]:
    """Replay on a fresh heap: peaks of the footprint measures, and metadata_ratio at peak live."""
    peaks = dict.fromkeys(FRAG_KEYS, 0.0)
    meta_ratio = 0.0
    with new_heap(64 * MiB) as h:
        blocks: dict[int, Any] = {}
        alloc, free, sizes = h.alloc, h.free, trace.sizes

        def sample() -> dict[str, Any]:
            s = h.stats()
            peaks["held"] = max(peaks["held"], s["total_bytes"] - s["free_bytes"])
            peaks["touched"] = max(peaks["touched"], s["total_bytes"] - s["untouched_bytes"])
            peaks["used+meta"] = max(peaks["used+meta"], s["used_bytes"] + s["metadata_bytes"])
            peaks["resident"] = max(peaks["resident"], s["resident_bytes"])
            return s

        for i, ev in enumerate(trace.events):
            if ev >= 0:
                size = sizes[ev]
                b = alloc(size)
                touch(b.buf, size)
                blocks[ev] = b
            else:
                free(blocks.pop(~ev))
            if i == trace.peak_event:
                meta_ratio = sample()["metadata_ratio"]
            elif not i % every:
                sample()
        heap_health(h, "(d) fragmentation replay")
    out = {k: v / trace.peak_live for k, v in peaks.items()}
    out["metadata_ratio"] = meta_ratio
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _replay_numpy(trace: Trace) -> float:
    """In a fresh child: peak RSS growth while replaying with private numpy arrays."""
    sizes, events = list(trace.sizes), list(trace.events)  # private copies, touched now
    arrays: dict[int, Any] = {}
    empty, u8 = np.empty, np.uint8
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base = _status_kib("VmRSS")
    for ev in events:
        if ev >= 0:
            size = sizes[ev]
            a = empty(size, u8)
            if size <= PAGE:
                a[0] = 1
            else:
                a[::PAGE] = 1
            arrays[ev] = a
        else:
            del arrays[~ev]
    return (_status_kib("VmHWM") - base) * 1024 / trace.peak_live


def replay_numpy(trace: Trace) -> float:
    with children() as kids:
        kids.start(_replay_numpy, trace)
        (ratio,) = kids.results()
    return float(ratio)


def bench_frag(rounds: int, quick: bool) -> list[Row]:
    n_allocs = 30000 if quick else 60000
    trace = make_trace(n_allocs, seed=20240611)
    progress(
        f"(d) fragmentation replay: {n_allocs} allocs, {len(trace.events)} events, "
        f"peak live {trace.peak_live / MiB:.1f} MiB at event {trace.peak_event}"
    )
    detail: list[dict[str, float]] = []

    def ours() -> float:
        d = replay_ours(trace, every=256)
        detail.append(d)
        return d["held"]

    ideal = "requested (ideal)"
    samples = run_interleaved(
        {OURS: ours, NUMPY + " (RSS)": lambda: replay_numpy(trace)},
        max(1, min(rounds, 3)),
        warmup=0,
    )
    n = len(detail)
    notes = {
        "held": "total_bytes - free_bytes: slabs, used runs, huge blocks, metadata; target <= 1.2",
        "touched": "total_bytes - untouched_bytes: every page ever handed out",
        "used+meta": "used_bytes (class-rounded) + metadata_bytes",
        "resident": "RSS of the heap's segments as the kernel reports it",
    }
    rows = []
    for key in FRAG_KEYS:
        row_samples = {OURS: [d[key] for d in detail], ideal: [1.0] * n}
        if key == "held":
            row_samples[NUMPY + " (RSS)"] = samples[NUMPY + " (RSS)"]
        rows.append(
            Row(
                f"frag replay: peak {key} / peak live",
                "x live",
                False,
                OURS,
                row_samples,
                note=notes[key]
                + (f"; peak live {trace.peak_live / MiB:.1f} MiB" if key == "held" else ""),
            )
        )
    rows.append(
        Row(
            "frag replay: metadata_ratio at peak",
            "%",
            False,
            OURS,
            {OURS: [d["metadata_ratio"] * 100 for d in detail]},
            note="stats()['metadata_ratio']; target <= 1%",
        )
    )
    return rows


# --------------------------------------------------------------------------
# (e) growth and spans


def _time_create(make: Callable[[], Any], drop: Callable[[Any], None], reps: int) -> float:
    """ms per create (the drop is not timed)."""
    total = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        obj = make()
        total += time.perf_counter() - t0
        drop(obj)
    return total / reps * 1e3


def bench_create(size: int, rounds: int, reps: int, noreserve: bool) -> list[Row]:
    label = f"create {human(size)}{' noreserve' if noreserve else ''}"
    progress(f"(e) {label}")
    resident: list[float] = []

    def make_ours() -> Heap:
        return Heap.create(size, noreserve=noreserve)

    def drop_ours(h: Heap) -> None:
        try:
            resident.append(h.stats()["resident_bytes"] / KiB)
        finally:
            h.destroy()

    def make_std() -> SharedMemory:
        return SharedMemory(name=shm_name(), create=True, size=size)

    samples = run_interleaved(
        {
            OURS: lambda: _time_create(make_ours, drop_ours, reps),
            STDLIB: lambda: _time_create(make_std, drop_posix, reps),
        },
        rounds,
    )
    return [
        Row(
            label,
            "ms",
            False,
            OURS,
            samples,
            note=f"Heap.create vs SharedMemory(create=True); target <= 1 ms; {reps} per sample",
        ),
        Row(
            f"  resident right after {label}",
            "KiB",
            False,
            OURS,
            {OURS: resident},
            note="stats()['resident_bytes'] (root + arena segments); target 0",
        ),
    ]


def bench_grow(rounds: int, quick: bool) -> list[Row]:
    total = 64 * MiB if quick else 256 * MiB
    chunk = MiB
    count = total // chunk
    progress(f"(e) {count} x 1 MiB runs: growing heap vs presized")
    segs: dict[str, list[int]] = {}

    def ours(start: int, label: str) -> Callable[[], float]:
        def sample() -> float:
            t0 = time.perf_counter()
            with new_heap(start) as h:
                blocks = []
                for _ in range(count):
                    b = h.alloc(chunk)
                    b.buf[0] = 1
                    blocks.append(b)
                elapsed = time.perf_counter() - t0
                segs.setdefault(label, []).append(h.stats()["segments"])
                for b in blocks:
                    h.free(b)
                heap_health(h, f"(e) {label}")
            return elapsed * 1e3

        return sample

    def stdlib() -> float:
        shms: list[SharedMemory] = []
        try:
            t0 = time.perf_counter()
            for _ in range(count):
                shm = SharedMemory(name=shm_name(), create=True, size=chunk)
                shms.append(shm)
                posix_buf(shm)[0] = 1
            return (time.perf_counter() - t0) * 1e3
        finally:
            for shm in shms:
                drop_posix(shm)

    grow, big = f"{OURS} from 8 MiB", f"{OURS} presized"
    samples = run_interleaved(
        {
            grow: ours(8 * MiB, grow),
            big: ours(total + 16 * MiB, big),
            f"{STDLIB} x{count}": stdlib,
        },
        rounds,
    )
    nsegs = {k: sorted(v)[len(v) // 2] for k, v in segs.items()}
    return [
        Row(
            f"create + {count} x 1 MiB runs ({human(total)})",
            "ms",
            False,
            grow,
            samples,
            note=f"heap create included; segments at the end: growing {nsegs.get(grow)}, "
            f"presized {nsegs.get(big)}",
        )
    ]


def bench_span(rounds: int, target: float, quick: bool) -> list[Row]:
    size = 64 * MiB if quick else 256 * MiB
    piece = 16 * MiB
    progress(f"(e) {human(size)} huge block: span of {human(piece)} segments vs one segment")
    segs: list[int] = []
    with new_heap(8 * MiB, max_segment_size=piece) as hs, new_heap(8 * MiB) as h1:

        def ours(h: Heap, count_segments: bool) -> Callable[[int], None]:
            def run(n: int) -> None:
                for _ in range(n):
                    b = h.alloc(size)
                    buf = b.buf
                    buf[0] = 1
                    buf[size - 1] = 1
                    if count_segments:
                        segs.append(h.stats()["segments"])
                    del buf
                    h.free(b)

            return run

        def stdlib(n: int) -> None:
            for _ in range(n):
                shm = SharedMemory(name=shm_name(), create=True, size=size)
                try:
                    buf = posix_buf(shm)
                    buf[0] = 1
                    buf[size - 1] = 1
                    del buf
                finally:
                    drop_posix(shm)

        span = f"{OURS} span {size // piece}x{human(piece)}"
        one = f"{OURS} one segment"
        samples = run_interleaved(
            {
                span: Sampler(ours(hs, False), target),
                one: Sampler(ours(h1, False), target),
                STDLIB: Sampler(stdlib, target),
            },
            rounds,
        )
        ours(hs, True)(1)
        heap_health(hs, "(e) span heap")
        heap_health(h1, "(e) one-segment heap")
    return [
        Row(
            f"alloc+free {human(size)} huge block",
            "us/op",
            False,
            span,
            samples,
            note=f"first and last byte written; stats()['segments'] while the span is live: {segs[-1]} "
            f"(the arena + the huge block, which is {size // piece} SysV segments)",
        )
    ]


def bench_release(rounds: int, quick: bool) -> list[Row]:
    size = 64 * MiB
    progress(f"(e) resident bytes before/after freeing a written {human(size)} run")
    before: list[float] = []
    kept: list[float] = []
    after: list[float] = []
    free_ms: list[float] = []
    # 256 MiB: the huge threshold is 64 MiB, so a 64 MiB block is a page run.
    with new_heap(256 * MiB) as h:
        for _ in range(rounds + 1):
            check_stop()
            b = h.alloc(size)
            if b.kind != 1:
                anomaly(f"(e) a {human(size)} block in a 256 MiB heap is kind {b.kind}, not a run")
            np.frombuffer(b.buf, dtype=np.uint8).fill(3)
            before.append(h.stats()["resident_bytes"] / MiB)
            t0 = time.perf_counter()
            h.free(b)
            kept.append(h.stats()["resident_bytes"] / MiB)
            h.release_memory()
            free_ms.append((time.perf_counter() - t0) * 1e3)
            after.append(h.stats()["resident_bytes"] / MiB)
        heap_health(h, "(e) release heap")
    before, kept, after = before[1:], kept[1:], after[1:]  # drop the warm-up
    free_ms = free_ms[1:]
    fm = sorted(free_ms)[len(free_ms) // 2]
    return [
        Row(
            f"resident around free of a written {human(size)} run",
            "MiB",
            False,
            "after release_memory()",
            {"after release_memory()": after, "after free": kept, "before free": before},
            note="free() keeps the run resident (within dirty_max, 64 MiB), release_memory() "
            f"MADV_REMOVEs it: expect a drop of ~64 MiB; free() + release took {fm:.2f} ms",
        )
    ]


def bench_growth(rounds: int, target: float, quick: bool) -> list[Row]:
    rows: list[Row] = []
    rows += bench_create(GiB, rounds, 3, noreserve=False)
    rows += bench_create(64 * GiB, rounds, 3, noreserve=True)
    rows += bench_grow(rounds, quick)
    rows += bench_span(rounds, target, quick)
    rows += bench_release(rounds, quick)
    return rows


# --------------------------------------------------------------------------


def _raise_fd_limit() -> None:
    """The stdlib larson keeps ~1000 SharedMemory objects (one fd each) per process."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: list[str] | None = None) -> int:
    global _name_prefix
    p = parser(__doc__.splitlines()[0] if __doc__ else "allocator")
    p.set_defaults(rounds=None)
    p.add_argument(
        "--only",
        metavar="LIST",
        help="comma-separated sections: " + ", ".join(f"{k}/{v}" for k, v in SECTIONS.items()),
    )
    args = p.parse_args(argv)
    quick: bool = args.quick
    rounds: int = args.rounds or (3 if quick else 7)
    target = 0.004 if quick else 0.03
    only = set(SECTIONS)
    if args.only:
        names = {v: k for k, v in SECTIONS.items()}
        only = set()
        for item in args.only.split(","):
            item = item.strip().lower()
            if item in SECTIONS:
                only.add(item)
            elif item in names:
                only.add(names[item])
            else:
                p.error(f"unknown section {item!r}")
    _name_prefix = f"soalloc_{os.getpid()}_"

    stop_on_signals()
    # Start the stdlib's resource tracker now, so forked children share it
    # instead of starting their own (which would unlink our files at their exit).
    resource_tracker.ensure_running()
    _raise_fd_limit()

    sizes = [16, 64, 256, KiB, 4 * KiB, 32 * KiB, 256 * KiB, 4 * MiB, 64 * MiB]
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        if "a" in only:
            rows += bench_latency(sizes, rounds, target, quick)
            rows += bench_refill(rounds, target)
        if "b" in only:
            rows += bench_larson(rounds, quick)
        if "c" in only:
            rows += bench_prodcons(rounds, quick)
        if "d" in only:
            rows += bench_frag(rounds, quick)
        if "e" in only:
            rows += bench_growth(rounds, target, quick)
    except BaseException:
        progress(f"interrupted; cleanup check: {sweep()}")
        raise
    leftovers = sweep()
    elapsed = time.perf_counter() - started
    report(
        f"allocator ({'quick, ' if quick else ''}{rounds} rounds, {elapsed:.0f} s)",
        rows,
        args.json,
    )
    for msg in _anomalies:
        print(f"anomaly: {msg}")
    print(f"cleanup check: {leftovers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
