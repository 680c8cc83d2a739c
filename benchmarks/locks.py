"""Cross-process locks and waits: sharedobj.sync against sysv_ipc and multiprocessing.

    python benchmarks/locks.py [--quick] [--rounds N] [--json FILE]

Cases, all run interleaved in one process tree (see _harness.py for why):

(a) uncontended acquire+release pair latency (us);
(b) two processes hammering the same lock, aggregate pairs per second;
(c) how late a timed acquire returns (ms past a 50 ms timeout) while another
    process holds the lock: median, and the worst seen (target: within 10 ms).
    sysv_ipc cannot take part: its PyPI wheel has no semtimedop, so
    ``acquire(timeout=...)`` would block forever;
(d) notify -> wake latency across processes (us per hand-off, half a
    ping-pong round trip) against multiprocessing.Condition.

Every sysv_ipc semaphore is created with IPC_PRIVATE (``key=None`` picks keys
that collide between processes started in the same second) and removed in a
``finally``; the segment is auto-removed.  ``ipcs`` is clean afterwards.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sysv_ipc

from _harness import Row, interleave, parser, per_op_us, report
from sharedobj import segment
from sharedobj.sync import RobustMutex, SharedCondition

FORK = mp.get_context("fork")
TIMEOUT = 0.05
M_OFF, C_OFF, TURN_OFF = 0, 64, 128


class Contestant:
    """Something with acquire()/release(), and a way to rebuild it in a forked child."""

    def __init__(self, name: str, lock: Any, child_setup: Callable[[Any], None] | None = None):
        self.name = name
        self.lock = lock
        self.child_setup = child_setup


@contextmanager
def contestants() -> Iterator[tuple[list[Contestant], RobustMutex, SharedCondition, Any]]:
    seg = segment.create(4096)
    sems: list[Any] = []
    try:
        ours = RobustMutex.initialize(seg.buf, M_OFF)
        cond = SharedCondition.initialize(seg.buf, C_OFF, ours)
        sem = sysv_ipc.Semaphore(sysv_ipc.IPC_PRIVATE, sysv_ipc.IPC_CREX, initial_value=1)
        sems.append(sem)
        sem_undo = sysv_ipc.Semaphore(sysv_ipc.IPC_PRIVATE, sysv_ipc.IPC_CREX, initial_value=1)
        sems.append(sem_undo)
        sem_undo.undo = True

        def set_undo(s: Any) -> None:
            s.undo = True  # per process: undo state is not inherited across fork

        yield (
            [
                Contestant("sharedobj RobustMutex", ours),
                Contestant("sysv_ipc Semaphore", sem),
                Contestant("sysv_ipc Semaphore SEM_UNDO", sem_undo, set_undo),
                Contestant("multiprocessing.Lock", FORK.Lock()),
            ],
            ours,
            cond,
            seg,
        )
    finally:
        for s in sems:
            with suppress(sysv_ipc.ExistentialError):
                s.remove()
        seg.close()


# -- (a) uncontended ---------------------------------------------------------


def uncontended(lock: Any, n: int) -> Callable[[], float]:
    def loop(
        k: int, a: Callable[[], Any] = lock.acquire, r: Callable[[], Any] = lock.release
    ) -> None:
        for _ in range(k):
            a()
            r()

    return lambda: per_op_us(loop, n)


# -- (b) two processes contending --------------------------------------------


def _hammer(c: Contestant, start: Any, results: Any, n: int) -> None:
    if c.child_setup is not None:
        c.child_setup(c.lock)
    a, r = c.lock.acquire, c.lock.release
    start.wait()
    t0 = time.monotonic()
    for _ in range(n):
        a()
        r()
    results.put((t0, time.monotonic(), n))


def contended(c: Contestant, n: int, nproc: int = 2) -> Callable[[], float]:
    """Aggregate pairs/s while ``nproc`` processes each complete ``n`` pairs.

    A fixed count per process (not a fixed duration) so that an unfair lock
    cannot score by letting one process run alone while the other starves.
    """

    def run() -> float:
        start, results = FORK.Barrier(nproc), FORK.Queue()
        procs = [FORK.Process(target=_hammer, args=(c, start, results, n)) for _ in range(nproc)]
        try:
            for p in procs:
                p.start()
            got: list[tuple[float, float, int]] = [results.get(timeout=600) for _ in procs]
            for p in procs:
                p.join(30)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        t0 = min(g[0] for g in got)
        t1 = max(g[1] for g in got)
        return sum(g[2] for g in got) / (t1 - t0)

    return run


# -- (c) timed-acquire lateness ----------------------------------------------


def _hold(lock: Any, ready: Any, stop: Any) -> None:
    lock.acquire()
    ready.set()
    stop.wait(600)
    lock.release()


@contextmanager
def held_elsewhere(lock: Any) -> Iterator[None]:
    ready, stop = FORK.Event(), FORK.Event()
    p = FORK.Process(target=_hold, args=(lock, ready, stop))
    p.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("holder process did not start")
        yield
    finally:
        stop.set()
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()


def lateness(lock: Any, per_round: int, all_samples: list[float]) -> Callable[[], float]:
    def run() -> float:
        lates = []
        for _ in range(per_round):
            t0 = time.monotonic()
            if lock.acquire(timeout=TIMEOUT):
                raise RuntimeError("timed acquire succeeded while another process held the lock")
            lates.append((time.monotonic() - t0 - TIMEOUT) * 1000)
        all_samples.extend(lates)
        return sorted(lates)[len(lates) // 2]

    return run


# -- (d) notify -> wake ------------------------------------------------------


def _pong(cond: Any, turn: Any, n: int) -> None:
    with cond:
        for _ in range(n):
            cond.wait_for(lambda: turn[0] == 1)
            turn[0] = 0
            cond.notify()


def pingpong(cond: Any, turn: Any, n: int) -> Callable[[], float]:
    def run() -> float:
        turn[0] = 0
        p = FORK.Process(target=_pong, args=(cond, turn, n))
        p.start()
        try:
            with cond:
                t0 = time.perf_counter()
                for _ in range(n):
                    turn[0] = 1
                    cond.notify()
                    cond.wait_for(lambda: turn[0] == 0)
                t1 = time.perf_counter()
            p.join(30)
        finally:
            if p.is_alive():
                p.kill()
                p.join()
        return (t1 - t0) / (2 * n) * 1e6

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser(__doc__.splitlines()[0] if __doc__ else "locks").parse_args(argv)
    quick = args.quick
    rounds = 3 if quick else args.rounds
    n_pairs = 20_000 if quick else 200_000
    n_contended = 10_000 if quick else 50_000
    per_round = 3 if quick else 5
    n_pong = 300 if quick else 2000
    rows: list[Row] = []
    with contestants() as (cs, ours, cond, seg):
        ours_name = cs[0].name

        row = Row("uncontended acquire+release", "us/pair", False, ours_name)
        row.samples = interleave({c.name: uncontended(c.lock, n_pairs) for c in cs}, rounds)
        rows.append(row)

        row = Row("2 processes contending", "pairs/s", True, ours_name)
        row.samples = interleave({c.name: contended(c, n_contended) for c in cs}, rounds)
        row.note = f"aggregate: both processes complete {n_contended} pairs each"
        rows.append(row)

        mp_lock = cs[3].lock
        lates: dict[str, list[float]] = {ours_name: [], "multiprocessing.Lock": []}
        with held_elsewhere(ours), held_elsewhere(mp_lock):
            samples = interleave(
                {
                    ours_name: lateness(ours, per_round, lates[ours_name]),
                    "multiprocessing.Lock": lateness(
                        mp_lock, per_round, lates["multiprocessing.Lock"]
                    ),
                },
                rounds,
            )
        row = Row(f"timed acquire, {TIMEOUT * 1000:.0f} ms: late by", "ms", False, ours_name)
        row.samples = samples
        row.note = "sysv_ipc omitted: the PyPI wheel has no semtimedop (timeout blocks forever)"
        rows.append(row)
        row = Row(f"timed acquire, {TIMEOUT * 1000:.0f} ms: worst", "ms late", False, ours_name)
        row.samples = {k: [max(v)] for k, v in lates.items()}
        row.note = f"max over {rounds * per_round} timed acquires each (target <= 10 ms)"
        rows.append(row)

        turn = seg.buf[TURN_OFF : TURN_OFF + 8].cast("q")
        mp_cond = FORK.Condition()
        mp_turn = FORK.RawArray("q", 1)
        row = Row("notify -> wake across processes", "us", False, ours_name)
        row.samples = interleave(
            {
                "sharedobj SharedCondition": pingpong(cond, turn, n_pong),
                "multiprocessing.Condition": pingpong(mp_cond, mp_turn, n_pong),
            },
            rounds,
        )
        row.ours = "sharedobj SharedCondition"
        row.note = "half a ping-pong round trip (notify, wake, re-acquire)"
        rows.append(row)
        del turn, ours, cond
    return report("locks: sharedobj.sync vs sysv_ipc and multiprocessing", rows, args.json)


if __name__ == "__main__":
    main()
