"""Pools: handing a big numpy array to multiprocessing.Pool workers.

The workload is what people do with a Pool and a big array: ``Pool(2)``, a batch
of tasks that each read the whole float64 array (``arr.sum()``), the time from
submitting the batch to holding every result.  The pool is started (both
workers up and idle, checked with a barrier) before the clock starts; starting
it is measured on its own.  Every case runs its contestants interleaved (A B A B
..., see ``_harness``) and is judged by the ratio of medians, because the host
drifts between a fast and a 2x slower state.

Contestants (the ways to get the array to the workers):

* **pickled**: the array itself is the task argument, so each task copies it
  through the pool's pipe (the default and the slow way).
* **stdlib shm**: a ``multiprocessing.shared_memory.SharedMemory`` (POSIX shm)
  passed by name; each task attaches, wraps an ndarray, sums, closes.
* **fork global**: the array is a module global made before a fork-context pool
  starts; tasks read the inherited global (copy-on-write, nothing is sent).
  This is the fast path people use on Linux; it does not exist with spawn.
* **sharedobj**: ``SharedMemoryManager().empty(n)`` filled once; the
  ``SharedArray`` itself is the task argument and pickles as a small handle.
  A SharedArray of 1 MiB or more that arrives by pickle is pre-faulted with
  ``MADV_POPULATE_READ`` once per process.

Rows:

(a) 8 tasks x sum of a 512 MiB array (32 MiB with ``--quick``), for start
    methods fork and spawn, "warm pool" (one pool kept across rounds, so every
    worker has already read the array once) and "new pool per round" (cold:
    every worker's first read of the array pays the page faults of mapping it).
    Spawn rows compare sharedobj-spawn to the fork global under fork, the
    thing spawn users cannot have.  The pickled anchor (about 15 s a batch at
    512 MiB) gets its own row with fewer rounds and no warm-up; "pool start"
    (Pool() until both workers answered) and "start + tasks" (new pool, the
    end-to-end figure) complete the picture.  Target: sharedobj <= 1.2x the
    fork global, with spawn too.
(b) Scaling, fork: sharedobj vs the fork global at 1, 2, 4 and 8 GiB (64 and
    128 MiB with ``--quick``), 2 tasks (one per worker), a new pool per round;
    the first batch in that pool is "cold", a second one right after is "warm".
    No pickled or POSIX anchor here.  A size is skipped (with a note) when
    MemAvailable cannot hold two copies plus 2 GiB.
(c) First touch: a fresh worker's first read of a 256 MiB array (64 MiB with
    ``--quick``), timed inside the worker from receiving the handle to done:
    one float64 per page (page-fault cost), and the whole ``arr.sum()``
    (full mode only).  sharedobj (spawn worker, with MADV_POPULATE_READ) vs
    sharedobj with populate disabled (``sharedobj.arrays.POPULATE_MIN`` raised
    by the pool initializer, before anything is unpickled) vs stdlib POSIX shm
    (spawn worker, attach included) vs the fork global (fork worker; the fork
    copied its page tables, so this is the floor).  Target: sharedobj within
    1.5x of the POSIX mapping.

Nothing may outlive the run: pools are terminated, the manager shut down and
the POSIX segments unlinked in ``finally`` blocks (SIGTERM and SIGHUP raise,
so those run; workers ignore SIGINT and leave Ctrl-C to the parent).
``SHAREDOBJ_DEFAULT_KEY`` is set to a random key, although only a manager is
used.  A final sweep reports (and removes) any System V segment created by this
process and not marked for removal and any ``/dev/shm/sopool_<pid>_*`` file.
"""

from __future__ import annotations

import os
import pickle
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from multiprocessing import get_context, resource_tracker
from multiprocessing.pool import Pool
from multiprocessing.shared_memory import SharedMemory
from multiprocessing.synchronize import Barrier
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sharedobj.arrays
from _harness import (
    Row,
    human,
    parser,
    report,
    run_interleaved,
    stop_on_signals,
)
from sharedobj import SharedMemoryManager

MiB = 1 << 20
GiB = 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")
TASKS = 8  # tasks per batch in (a)
WORKERS = 2
READY_TIMEOUT = 120.0
NO_POPULATE = 1 << 62  # POPULATE_MIN that no array reaches

OURS = "sharedobj"
GLOBAL = "fork global"
POSIX = "stdlib shm"
PICKLED = "pickled"

_GLOBAL: np.ndarray[Any, np.dtype[np.float64]] | None = None  # the fork-inherited anchor
_BARRIER: Barrier | None = None  # per worker: set by the pool initializer
_prefix = ""  # /dev/shm names of this run: sopool_<pid>_<n>
_counter = 0
_pools: set[Pool] = set()  # every pool alive, terminated on the way out


def progress(msg: str) -> None:
    print(f"[pools] {msg}", file=sys.stderr, flush=True)


def label(kind: str, method: str) -> str:
    return kind if kind == GLOBAL else f"{kind} {method}"


# --------------------------------------------------------------------------
# Signals and cleanup


def _our_sysv_segments() -> list[tuple[int, int, int]]:
    """(shmid, perms, nattch) of every System V segment this process created."""
    me = os.getpid()
    out: list[tuple[int, int, int]] = []
    with open("/proc/sysvipc/shm") as f:
        next(f)
        for line in f:
            cols = line.split()  # key shmid perms size cpid lpid nattch ...
            if len(cols) >= 7 and int(cols[4]) == me:
                out.append((int(cols[1]), int(cols[2], 8), int(cols[6])))
    return out


def sweep() -> str:
    """Remove whatever this run left behind, and say what that was."""
    found: list[str] = []
    for shmid, perms, nattch in _our_sysv_segments():
        if perms & 0o1000:  # SHM_DEST: goes at its last detach
            found.append(f"shmid {shmid} marked for removal, still attached {nattch}x")
            continue
        found.append(f"shmid {shmid} NOT marked for removal (removed now)")
        with suppress(OSError):
            import sysv_ipc

            sysv_ipc.remove_shared_memory(shmid)
    try:
        names = sorted(n for n in os.listdir("/dev/shm") if n.startswith(_prefix))
    except FileNotFoundError:
        names = []
    for name in names:
        found.append(f"/dev/shm/{name} (unlinked now)")
        with suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{name}")
        with suppress(Exception):
            resource_tracker.unregister(f"/{name}", "shared_memory")
    return "clean: no segment and no /dev/shm file left" if not found else "; ".join(found)


@contextmanager
def posix_array(n: int) -> Iterator[SharedMemory]:
    """A stdlib POSIX segment holding n float64 ones, unlinked on the way out."""
    global _counter
    _counter += 1
    shm = SharedMemory(name=f"{_prefix}{_counter}", create=True, size=n * 8)
    try:
        buf = shm.buf
        assert buf is not None
        arr = np.ndarray((n,), np.float64, buffer=buf)
        arr.fill(1.0)
        del arr, buf
        yield shm
    finally:
        try:
            shm.close()
        finally:
            shm.unlink()


@contextmanager
def fork_global(n: int) -> Iterator[None]:
    """Set the module global that fork workers inherit (n float64 ones)."""
    global _GLOBAL
    _GLOBAL = np.ones(n)
    try:
        yield
    finally:
        _GLOBAL = None


# --------------------------------------------------------------------------
# Pools and tasks (the functions below run in the workers)


def _init_worker(barrier: Barrier, populate_min: int | None) -> None:
    global _BARRIER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # terminate() must just kill
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    _BARRIER = barrier
    if populate_min is not None:
        sharedobj.arrays.POPULATE_MIN = populate_min


def _ready(_: int) -> int:
    assert _BARRIER is not None
    _BARRIER.wait(READY_TIMEOUT)
    return os.getpid()


def _sum_array(arr: np.ndarray[Any, np.dtype[np.float64]]) -> float:
    return float(arr.sum())


def _sum_global(n: int) -> float:
    arr = _GLOBAL
    if arr is None or arr.size != n:
        raise RuntimeError("no fork-inherited global of that size in this worker")
    return float(arr.sum())


def _sum_posix(args: tuple[str, int]) -> float:
    name, n = args
    shm = SharedMemory(name=name)
    try:
        buf = shm.buf
        assert buf is not None
        arr = np.ndarray((n,), np.float64, buffer=buf)
        total = float(arr.sum())
        del arr, buf  # before close(): exported pointers would refuse it
    finally:
        shm.close()
    return total


def _first_touch(kind: str, payload: Any, n: int, whole: bool) -> float:
    """A fresh worker's first read of the array, in ms, from handle to done."""
    t0 = time.perf_counter()
    shm: SharedMemory | None = None
    if kind == POSIX:
        shm = SharedMemory(name=payload)
        assert shm.buf is not None
        arr = np.ndarray((n,), np.float64, buffer=shm.buf)
    elif kind == GLOBAL:
        assert _GLOBAL is not None
        arr = _GLOBAL
    else:
        arr = pickle.loads(payload)
    part = arr if whole else arr[:: PAGE // 8]
    total = float(part.sum())
    elapsed = (time.perf_counter() - t0) * 1e3
    del arr, part
    if shm is not None:
        shm.close()
    if total != (n if whole else -(-n // (PAGE // 8))):
        raise RuntimeError(f"{kind}: read {total}, which is wrong")
    return elapsed


def start_pool(method: str, workers: int = WORKERS, populate_min: int | None = None) -> Pool:
    """A started pool: returns once every worker has answered."""
    ctx = get_context(method)
    barrier = ctx.Barrier(workers)
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(barrier, populate_min))
    _pools.add(pool)
    try:
        pids = pool.map(_ready, range(workers), chunksize=1)
        if len(set(pids)) != workers:
            raise RuntimeError(f"expected {workers} distinct workers, got pids {pids}")
    except BaseException:
        stop_pool(pool)
        raise
    return pool


def stop_pool(pool: Pool) -> None:
    _pools.discard(pool)
    pool.terminate()
    pool.join()


def stop_all_pools() -> None:
    for pool in list(_pools):
        with suppress(Exception):
            stop_pool(pool)


@contextmanager
def new_pool(method: str, starts: list[float] | None = None, **kw: Any) -> Iterator[Pool]:
    t0 = time.perf_counter()
    pool = start_pool(method, **kw)
    if starts is not None:
        starts.append(time.perf_counter() - t0)
    try:
        yield pool
    finally:
        stop_pool(pool)


# --------------------------------------------------------------------------
# (a) 8 tasks x sum, fork and spawn, warm and cold


class Batch:
    """One batch of tasks summing the array, for each contestant."""

    def __init__(self, n: int, shared: np.ndarray[Any, Any], posix_name: str, tasks: int):
        self.n = n
        self.tasks = tasks
        self.work: dict[str, tuple[Callable[[Any], float], list[Any]]] = {
            OURS: (_sum_array, [shared] * tasks),
            POSIX: (_sum_posix, [(posix_name, n)] * tasks),
            GLOBAL: (_sum_global, [n] * tasks),
            PICKLED: (_sum_array, [_GLOBAL] * tasks),
        }

    def run(self, pool: Pool, kind: str) -> float:
        """Seconds from submitting the batch to holding all results."""
        fn, args = self.work[kind]
        t0 = time.perf_counter()
        results = pool.map(fn, args, chunksize=1)
        elapsed = time.perf_counter() - t0
        if results != [float(self.n)] * self.tasks:
            raise RuntimeError(f"{kind}: wrong sums {results[:3]}...")
        return elapsed


def bench_pools(n: int, rounds: int, quick: bool) -> list[Row]:
    size = human(n * 8)
    rows: list[Row] = []
    with (
        fork_global(n),
        posix_array(n) as shm,
        SharedMemoryManager() as smm,
    ):
        shared = smm.empty(n)
        shared.fill(1.0)
        batch = Batch(n, shared, shm.name, TASKS)
        methods = ("fork", "spawn")
        cases = [
            (k, m) for m in methods for k in (OURS, POSIX, GLOBAL) if (k, m) != (GLOBAL, "spawn")
        ]

        # warm: one pool per start method, kept across rounds
        progress(f"(a) {TASKS} x sum {size}, warm pools")
        warm = {m: start_pool(m) for m in methods}

        def in_warm(kind: str, method: str) -> Callable[[], float]:
            return lambda: batch.run(warm[method], kind)

        try:
            samples = run_interleaved({label(k, m): in_warm(k, m) for k, m in cases}, rounds)
            for m in methods:
                ours = label(OURS, m)
                rows.append(
                    Row(
                        f"{TASKS} x sum {size}, {m}, warm pool",
                        "s",
                        False,
                        ours,
                        {
                            ours: samples[ours],
                            GLOBAL: samples[GLOBAL],
                            label(POSIX, m): samples[label(POSIX, m)],
                        },
                        note=""
                        if m == "fork"
                        else "fork global = the fork pool's figure (no such thing with spawn)",
                    )
                )

            # the pickled anchor: slow, so fewer rounds and no warm-up
            p_rounds = min(rounds, 2 if quick else 3)
            progress(f"(a) pickled argument, {p_rounds} rounds (slow)")
            p_cases = [
                (PICKLED, "fork"),
                (PICKLED, "spawn"),
                (OURS, "fork"),
                (OURS, "spawn"),
                (GLOBAL, "fork"),
            ]
            pick = run_interleaved(
                {label(k, m): in_warm(k, m) for k, m in p_cases},
                p_rounds,
                warmup=0,
            )
            rows.append(
                Row(
                    f"{TASKS} x sum {size}, pickled arg, warm pool",
                    "s",
                    False,
                    label(OURS, "spawn"),
                    pick,
                    note=f"{p_rounds} rounds, no warm-up; the array is copied through the pipe per task",
                )
            )
        finally:
            for pool in warm.values():
                stop_pool(pool)

        # cold: a new pool per sample; its start is timed separately
        progress(f"(a) {TASKS} x sum {size}, new pool per round")
        starts: dict[str, list[float]] = {m: [] for m in methods}
        totals: dict[str, list[float]] = {label(k, m): [] for k, m in cases}
        calls: dict[str, int] = dict.fromkeys(totals, 0)
        c_warmup = 0 if quick else 1  # spawning is slow: --quick skips the warm-up

        def cold(kind: str, method: str) -> Callable[[], float]:
            name = label(kind, method)

            def sample() -> float:
                t_started: list[float] = []
                with new_pool(method, t_started) as pool:
                    elapsed = batch.run(pool, kind)
                calls[name] += 1
                if calls[name] > c_warmup:  # skip interleave's warm-up call
                    starts[method] += t_started
                    totals[name].append(t_started[0] + elapsed)
                return elapsed

            return sample

        c_samples = run_interleaved(
            {label(k, m): cold(k, m) for k, m in cases}, rounds, warmup=c_warmup
        )
        for m in methods:
            ours = label(OURS, m)
            rows.append(
                Row(
                    f"{TASKS} x sum {size}, {m}, new pool per round",
                    "s",
                    False,
                    ours,
                    {
                        ours: c_samples[ours],
                        GLOBAL: c_samples[GLOBAL],
                        label(POSIX, m): c_samples[label(POSIX, m)],
                    },
                    note="cold: every worker's first read maps the pages; pool start not included",
                )
            )
        rows.append(
            Row(
                f"new pool: start + {TASKS} x sum {size}",
                "s",
                False,
                label(OURS, "spawn"),
                totals,
                note="end to end: Pool() until both workers answered, then the batch",
            )
        )
        rows.append(
            Row(
                f"Pool({WORKERS}) start, parent holding {human(3 * n * 8)}",
                "s",
                False,
                "spawn",
                dict(starts),
                note="until both workers answered; not a sharedobj figure (ratio = fork vs spawn)",
            )
        )
    return rows


# --------------------------------------------------------------------------
# (b) scaling with the array size, fork


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_scaling(sizes: list[int], rounds: int) -> list[Row]:
    rows: list[Row] = []
    for nbytes in sizes:
        need, avail = 2 * nbytes + 2 * GiB, mem_available()
        if avail < need:
            size = human(nbytes)
            rows.append(
                Row(
                    f"{WORKERS} x sum {size}, fork, new pool",
                    "s",
                    False,
                    OURS,
                    {},
                    note=f"{size} skipped: MemAvailable {avail / GiB:.1f} GiB < {need / GiB:.1f} GiB",
                )
            )
        else:
            rows += scale_one(nbytes, rounds)
    return rows


def scale_one(nbytes: int, rounds: int) -> list[Row]:
    size = human(nbytes)
    progress(f"(b) scaling: {WORKERS} x sum {size}, new fork pool per round")
    n = nbytes // 8
    warm: dict[str, list[float]] = {OURS: [], GLOBAL: []}
    with fork_global(n), SharedMemoryManager() as smm:
        shared = smm.empty(n)
        shared.fill(1.0)
        batch = Batch(n, shared, "", WORKERS)
        del shared

        def sample(kind: str) -> Callable[[], float]:
            def run() -> float:
                with new_pool("fork") as pool:
                    first = batch.run(pool, kind)
                    warm[kind].append(batch.run(pool, kind))
                return first

            return run

        cold = run_interleaved({k: sample(k) for k in warm}, rounds, warmup=0)
    note = f"one task per worker, {rounds} rounds, no warm-up"
    return [
        Row(
            f"{WORKERS} x sum {size}, fork, new pool",
            "s",
            False,
            OURS,
            cold,
            note=note + "; first batch in a new pool (pool start not included)",
        ),
        Row(
            f"{WORKERS} x sum {size}, fork, warm pool",
            "s",
            False,
            OURS,
            warm,
            note=note + "; second batch in the same pool",
        ),
    ]


# --------------------------------------------------------------------------
# (c) first touch in a fresh worker


def bench_first_touch(n: int, rounds: int, quick: bool) -> list[Row]:
    size = human(n * 8)
    progress(f"(c) first touch of {size} in a fresh worker")
    ours, nopop, posix = f"{OURS} spawn", f"{OURS} spawn, no populate", f"{POSIX} spawn"
    modes = [False] if quick else [False, True]
    with fork_global(n), posix_array(n) as shm, SharedMemoryManager() as smm:
        shared = smm.empty(n)
        shared.fill(1.0)
        handle = pickle.dumps(shared)
        kinds: dict[str, tuple[str, str, Any, int | None]] = {
            ours: ("spawn", OURS, handle, None),
            nopop: ("spawn", OURS, handle, NO_POPULATE),
            posix: ("spawn", POSIX, shm.name, None),
            GLOBAL: ("fork", GLOBAL, None, None),
        }

        def sample(name: str, whole: bool) -> Callable[[], float]:
            method, kind, payload, populate_min = kinds[name]

            def run() -> float:
                with new_pool(method, workers=1, populate_min=populate_min) as pool:
                    ms: float = pool.apply(_first_touch, (kind, payload, n, whole))
                return ms

            return run

        samples = run_interleaved(
            {f"{name}|{whole}": sample(name, whole) for whole in modes for name in kinds},
            rounds,
            warmup=0 if quick else 1,
        )
        del shared
    rows = []
    for whole in modes:
        what = "arr.sum()" if whole else "one float64 per page"
        rows.append(
            Row(
                f"first touch {size}: {what}",
                "ms",
                False,
                ours,
                {name: samples[f"{name}|{whole}"] for name in kinds},
                note="new worker per sample; handle/name to done, attach and populate included",
            )
        )
    return rows


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    global _prefix
    p = parser(__doc__.splitlines()[0] if __doc__ else "pools")
    p.set_defaults(rounds=None)
    args = p.parse_args(argv)
    quick: bool = args.quick
    rounds: int = args.rounds or (3 if quick else 7)
    _prefix = f"sopool_{os.getpid()}_"
    # Only a manager is used, but never touch the user's default heap anyway.
    os.environ["SHAREDOBJ_DEFAULT_KEY"] = str(secrets.randbelow(2**31 - 2) + 1)

    stop_on_signals()
    # Start the resource tracker now, so every worker shares it.
    resource_tracker.ensure_running()

    pool_n = (32 if quick else 512) * MiB // 8
    scaling = [64 * MiB, 128 * MiB] if quick else [GiB, 2 * GiB, 4 * GiB, 8 * GiB]
    touch_n = (64 if quick else 256) * MiB // 8
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        rows += bench_pools(pool_n, rounds, quick)
        rows += bench_scaling(scaling, min(rounds, 3))
        rows += bench_first_touch(touch_n, rounds, quick)
    except BaseException:
        stop_all_pools()
        progress(f"interrupted; cleanup check: {sweep()}")
        raise
    finally:
        stop_all_pools()
    leftovers = sweep()
    elapsed = time.perf_counter() - started
    report(
        f"pools ({'quick, ' if quick else ''}{rounds} rounds, {elapsed:.0f} s)",
        rows,
        args.json,
    )
    print(f"cleanup check: {leftovers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
