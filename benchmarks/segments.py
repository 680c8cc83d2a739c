"""Segments: what creating, attaching, spanning and first-touching a segment costs.

Five cases, each run interleaved with its anchors (A B A B ..., see ``_harness``)
and judged by the ratio of medians, because the host drifts between a fast and
a 2x slower state:

(a) **create + write one byte + destroy**, for 4 KiB, 1 MiB, 64 MiB and 1 GiB.
    ``segment.create(size)`` then ``close()`` (``auto_remove`` frees it).
    Anchors: the stdlib ``multiprocessing.shared_memory.SharedMemory`` (POSIX
    shm: the API we replace; close + unlink), and ``sysv_ipc.SharedMemory`` with
    ``IPC_PRIVATE, IPC_CREX`` (remove + detach), the obvious System V route.
    sysv_ipc memsets the whole segment on ``IPC_CREX`` (about 1.5 s per GiB,
    every page made resident): that anchor is there to show the cost sharedobj
    avoids by calling ``shmget`` itself.  It runs once per round at 1 GiB.
(b) **attach + detach of an existing segment, same process.**  "cold": no
    other handle is alive, so every attach really ``shmat``s (plus an IPC_STAT
    for the size); "cached": one handle is kept alive, so attach is a lookup in
    the per-process cache.  Anchors: stdlib ``SharedMemory(name=...)`` open +
    close (shm_open + mmap; on 3.11 it also registers with the resource tracker)
    and ``sysv_ipc.attach(shmid)`` + ``detach()``, the raw-syscall floor.
(c) **attach by id from another process.**  Each round, a forked child per
    contestant attaches an existing 64 MiB segment N times cold (after a short
    warm-up), timing inside the child and sending the figures back through a
    Pipe; ours vs the stdlib by name (sysv_ipc as the floor).  Also the very
    first attach in that fresh child, which pays the copy-on-write faults the
    fork left on every interpreter page it writes.
(d) **spans.**  Creating (and destroying) 1 GiB as one segment vs as a span of
    16 x 64 MiB and 128 x 8 MiB (``max_segment_size``), then the throughput of
    the first full write pass (first-touch allocation) and of a second pass over
    the span vs the single segment: once built, a span should cost nothing.
(e) **first-touch read of 256 MiB in a fresh process** (one byte per page with
    numpy): a plain SysV attach vs attach + ``populate()`` (MADV_POPULATE_READ)
    vs the stdlib POSIX shm mapping, which gets fault-around and SysV does not.
    Attach/open time is included; one forked child per measurement.

``--quick`` shrinks sizes, rounds and sample lengths to a few seconds in all.

Nothing may outlive the run: every object is removed in a ``finally``; SIGINT,
SIGTERM and SIGHUP raise (and, should a finalizer swallow that, raise again at
the next sample) so those run; and a final sweep
removes any System V segment whose creator is this process and any
``/dev/shm/sobench_<pid>_*`` file, then prints what it found.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from multiprocessing import get_context, resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import sysv_ipc

from _harness import (
    Row,
    Sampler,
    human,
    parser,
    report,
    run_interleaved,
    stop_on_signals,
)
from sharedobj import segment

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE = segment.PAGE_SIZE
CHILD_TIMEOUT = 120.0

OURS = "sharedobj"
STDLIB = "stdlib SharedMemory"
SYSV = "sysv_ipc"

_name_prefix = ""
_name_counter = 0


def shm_name() -> str:
    """A fresh POSIX shm name that the final sweep recognises as ours."""
    global _name_counter
    _name_counter += 1
    return f"{_name_prefix}{_name_counter}"


def posix_buf(shm: SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:  # only after close(); typeshed says it may be None
        raise ValueError(f"{shm.name} is closed")
    return buf


def progress(msg: str) -> None:
    print(f"[segments] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Cleanup


def _our_sysv_segments() -> list[tuple[int, int, int]]:
    """(shmid, perms, nattch) of every System V segment this process created."""
    me = os.getpid()
    out: list[tuple[int, int, int]] = []
    with open("/proc/sysvipc/shm") as f:
        next(f)
        for line in f:
            cols = line.split()
            # key shmid perms size cpid lpid nattch ...
            if len(cols) >= 7 and int(cols[4]) == me:
                out.append((int(cols[1]), int(cols[2], 8), int(cols[6])))
    return out


def _our_shm_files() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(_name_prefix))
    except FileNotFoundError:
        return []


def sweep() -> str:
    """Remove whatever this run left behind, and say what that was."""
    found: list[str] = []
    for shmid, perms, nattch in _our_sysv_segments():
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
        resource_tracker.unregister(f"/{name}", "shared_memory")
    return "clean: no segment and no /dev/shm file left" if not found else "; ".join(found)


@contextmanager
def sysv_segment(size: int) -> Iterator[int]:
    """A persistent (not auto-removed) segment made by sharedobj, detached here."""
    seg = segment.create(size, auto_remove=False)
    shmid = seg.shmid
    try:
        seg.close()
        yield shmid
    finally:
        with suppress(sysv_ipc.Error):
            sysv_ipc.remove_shared_memory(shmid)


@contextmanager
def posix_segment(size: int) -> Iterator[SharedMemory]:
    shm = SharedMemory(name=shm_name(), create=True, size=size)
    try:
        yield shm
    finally:
        try:
            shm.close()
        finally:
            shm.unlink()


# --------------------------------------------------------------------------
# Sampling


def _child_main(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a forked child and return its result."""
    ctx = get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, fn, args), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(CHILD_TIMEOUT):
            raise RuntimeError(f"child {fn.__name__} gave no answer in {CHILD_TIMEOUT} s")
        status, value = recv.recv()
    except EOFError:
        raise RuntimeError(f"child {fn.__name__} died (exit code {proc.exitcode})") from None
    finally:
        recv.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise RuntimeError(f"child {fn.__name__} failed:\n{value}")
    return value


# --------------------------------------------------------------------------
# (a) create + write one byte + destroy


def ours_create(size: int) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            seg = segment.create(size)
            seg.buf[0] = 1
            seg.close()

    return run


def stdlib_create(size: int) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            shm = SharedMemory(name=shm_name(), create=True, size=size)
            try:
                posix_buf(shm)[0] = 1
                shm.close()
            finally:
                shm.unlink()

    return run


def sysv_create(size: int) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            mem = sysv_ipc.SharedMemory(sysv_ipc.IPC_PRIVATE, sysv_ipc.IPC_CREX, size=size)
            try:
                mem.write(b"\x01")
                mem.detach()
            finally:
                mem.remove()

    return run


def bench_create(sizes: list[int], rounds: int, target: float) -> list[Row]:
    rows = []
    for size in sizes:
        progress(f"(a) create+write+destroy {human(size)}")
        samplers: dict[str, Sampler] = {
            OURS: Sampler(ours_create(size), target),
            STDLIB: Sampler(stdlib_create(size), target),
            f"{SYSV} IPC_CREX": Sampler(sysv_create(size), target),
        }
        samples = run_interleaved(dict(samplers), rounds)
        counts = ", ".join(f"{k} {s.n}" for k, s in samplers.items())
        rows.append(
            Row(
                f"create+write 1B+destroy {human(size)}",
                "us/op",
                False,
                OURS,
                samples,
                note=f"ops per sample: {counts}",
            )
        )
    return rows


# --------------------------------------------------------------------------
# (b) attach + detach in the same process


def bench_attach_same_process(size: int, rounds: int, target: float) -> list[Row]:
    progress(f"(b) attach+detach {human(size)}, same process")
    with sysv_segment(size) as shmid, posix_segment(size) as shm:
        name = shm.name

        def ours(n: int) -> None:
            for _ in range(n):
                segment.attach(shmid).close()

        @contextmanager
        def keep_one() -> Iterator[None]:
            keeper = segment.attach(shmid)
            try:
                yield
            finally:
                keeper.close()

        def stdlib(n: int) -> None:
            for _ in range(n):
                SharedMemory(name=name).close()

        def sysv(n: int) -> None:
            for _ in range(n):
                sysv_ipc.attach(shmid).detach()

        cold, cached = f"{OURS} (cold)", f"{OURS} (cached)"
        std, raw = f"{STDLIB}(name)", f"{SYSV}.attach"
        samples = run_interleaved(
            {
                cold: Sampler(ours, target),
                cached: Sampler(ours, target, around=keep_one),
                std: Sampler(stdlib, target),
                raw: Sampler(sysv, target),
            },
            rounds,
        )
    anchors = {std: samples[std], raw: samples[raw]}
    return [
        Row(
            f"attach+detach {human(size)}, same proc, cold",
            "us/op",
            False,
            cold,
            {cold: samples[cold], **anchors},
            note="cold: no handle alive, every attach is IPC_STAT + shmat, close is shmdt",
        ),
        Row(
            f"attach+close {human(size)}, same proc, cached",
            "us/op",
            False,
            cached,
            {cached: samples[cached], **anchors},
            note="cached: one handle kept alive, attach hits the per-process cache",
        ),
    ]


# --------------------------------------------------------------------------
# (c) attach by id from another process


def _child_attach(who: str, shmid: int, name: str, n: int) -> tuple[float, float]:
    """Runs in a forked child: (first attach+detach in µs, then µs/op over n cold ones)."""
    op: Callable[[], None]
    if who == OURS:

        def op() -> None:
            segment.attach(shmid).close()

    elif who == STDLIB:

        def op() -> None:
            SharedMemory(name=name).close()

    else:

        def op() -> None:
            sysv_ipc.attach(shmid).detach()

    t0 = time.perf_counter()
    op()
    first = (time.perf_counter() - t0) * 1e6
    for _ in range(max(10, n // 10)):  # absorb the copy-on-write faults fork left behind
        op()
    t0 = time.perf_counter()
    for _ in range(n):
        op()
    return first, (time.perf_counter() - t0) / n * 1e6


def bench_attach_child(size: int, n: int, rounds: int) -> list[Row]:
    progress(f"(c) attach {human(size)} from a child, {n} times per round")
    first: dict[str, list[float]] = {OURS: [], STDLIB: [], SYSV: []}
    with sysv_segment(size) as shmid, posix_segment(size) as shm:
        # The parent holds no sharedobj handle: the forked child inherits no
        # cached attachment, so every attach there is a real shmat.
        assert segment.attached_count() == 0
        name = shm.name

        def child(who: str) -> Callable[[], float]:
            def sample() -> float:
                one, steady = in_child(_child_attach, who, shmid, name, n)
                first[who].append(one)
                return float(steady)

            return sample

        steady = run_interleaved({k: child(k) for k in first}, rounds)
    first = {k: v[1:] for k, v in first.items()}  # drop the warm-up round
    return [
        Row(
            f"attach+detach {human(size)} in child, cold",
            "us/op",
            False,
            OURS,
            steady,
            note=f"one forked child per contestant and round, {n} attaches timed in the child",
        ),
        Row(
            f"first attach+detach in a new child ({human(size)})",
            "us",
            False,
            OURS,
            first,
            note="single shot, includes the copy-on-write faults the fork left behind",
        ),
    ]


# --------------------------------------------------------------------------
# (d) spans


def bench_spans(total: int, pieces: list[int], rounds: int, target: float) -> list[Row]:
    single = f"single {human(total)}"
    labels = {f"span {total // p}x{human(p)}".replace(" MiB", "MiB"): p for p in pieces}
    configs: dict[str, int | None] = {single: None, **labels}

    def make(max_segment_size: int | None) -> segment.Segment:
        seg = segment.create(total, max_segment_size=max_segment_size)
        expected = 1 if max_segment_size is None else total // max_segment_size
        if len(seg.ids) != expected:
            seg.close()
            raise RuntimeError(f"expected {expected} pieces, got {len(seg.ids)}")
        return seg

    progress(f"(d) span create+destroy {human(total)}")

    def creator(max_segment_size: int | None) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                make(max_segment_size).close()

        return run

    created = run_interleaved({k: Sampler(creator(v), target) for k, v in configs.items()}, rounds)

    progress(f"(d) first and second write pass over {human(total)}")
    second: dict[str, list[float]] = {k: [] for k in configs}

    def writer(label: str, max_segment_size: int | None) -> Callable[[], float]:
        def sample() -> float:
            seg = make(max_segment_size)
            try:
                arr = np.frombuffer(seg.buf, dtype=np.uint8)
                t0 = time.perf_counter()
                arr.fill(1)
                t1 = time.perf_counter()
                arr.fill(2)
                t2 = time.perf_counter()
                del arr
            finally:
                seg.close()
            second[label].append(total / (t2 - t1) / 1e9)
            return total / (t1 - t0) / 1e9

        return sample

    first = run_interleaved({k: writer(k, v) for k, v in configs.items()}, rounds)
    second = {k: v[1:] for k, v in second.items()}  # drop the warm-up sample

    rows = []
    for label in labels:
        rows.append(
            Row(
                f"create+destroy {human(total)}: {label}",
                "us/op",
                False,
                label,
                {label: created[label], single: created[single]},
            )
        )
    for what, data in (("1st", first), ("2nd", second)):
        for label in labels:
            rows.append(
                Row(
                    f"{what} write pass {human(total)}: {label}",
                    "GB/s",
                    True,
                    label,
                    {label: data[label], single: data[single]},
                    note="1st pass = first-touch allocation of every page" if what == "1st" else "",
                )
            )
    return rows


# --------------------------------------------------------------------------
# (e) first-touch read in a fresh process


def _child_first_touch(kind: str, shmid: int, name: str, size: int) -> float:
    """Runs in a forked child: open/attach, read one byte per page, return ms."""
    t0 = time.perf_counter()
    if kind == "stdlib":
        shm = SharedMemory(name=name)
        try:
            arr = np.frombuffer(posix_buf(shm), dtype=np.uint8)
            total = int(arr[::PAGE].sum())
            del arr
        finally:
            shm.close()
    else:
        seg = segment.attach(shmid)
        try:
            if kind == "populate" and not seg.populate():
                raise RuntimeError("populate() returned False: no MADV_POPULATE_READ here")
            arr = np.frombuffer(seg.buf, dtype=np.uint8)
            total = int(arr[::PAGE].sum())
            del arr
        finally:
            seg.close()
    elapsed = (time.perf_counter() - t0) * 1e3
    if total != 7 * (size // PAGE):
        raise RuntimeError(f"read {total}, expected {7 * (size // PAGE)}")
    return elapsed


def bench_first_touch(size: int, rounds: int) -> list[Row]:
    progress(f"(e) first-touch read of {human(size)} in a fresh process")
    with sysv_segment(size) as shmid, posix_segment(size) as shm:
        seg = segment.attach(shmid)
        try:
            np.frombuffer(seg.buf, dtype=np.uint8).fill(7)
        finally:
            seg.close()
        np.frombuffer(posix_buf(shm), dtype=np.uint8).fill(7)
        # The parent keeps no mapping of either: each child maps them fresh.
        assert segment.attached_count() == 0
        name = shm.name

        def child(kind: str) -> Callable[[], float]:
            return lambda: float(in_child(_child_first_touch, kind, shmid, name, size))

        plain, pop, std = f"{OURS} plain", f"{OURS} populate()", "stdlib POSIX shm"
        samples = run_interleaved(
            {plain: child("plain"), pop: child("populate"), std: child("stdlib")}, rounds
        )
    note = "attach/open + one byte per page (numpy arr[::4096].sum()), one new child per sample"
    return [
        Row(
            f"first-touch read {human(size)}: plain",
            "ms",
            False,
            plain,
            {plain: samples[plain], std: samples[std]},
            note=note,
        ),
        Row(
            f"first-touch read {human(size)}: populate()",
            "ms",
            False,
            pop,
            {pop: samples[pop], plain: samples[plain], std: samples[std]},
            note="MADV_POPULATE_READ right after attach, included in the time",
        ),
    ]


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    global _name_prefix
    p = parser(__doc__.splitlines()[0] if __doc__ else "segments")
    p.set_defaults(rounds=None)
    args = p.parse_args(argv)
    quick: bool = args.quick
    rounds: int = args.rounds or (3 if quick else 7)
    target = 0.005 if quick else 0.03
    _name_prefix = f"sobench_{os.getpid()}_"

    stop_on_signals()
    # Start the stdlib's resource tracker now, so forked children share it
    # instead of starting their own (which would unlink our files at their exit).
    resource_tracker.ensure_running()

    sizes = [4 * KiB, MiB, 64 * MiB] + ([] if quick else [GiB])
    span_total = 256 * MiB if quick else GiB
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        rows += bench_create(sizes, rounds, target)
        rows += bench_attach_same_process(64 * MiB, rounds, target)
        rows += bench_attach_child(64 * MiB, 50 if quick else 500, rounds)
        rows += bench_spans(span_total, [64 * MiB, 8 * MiB], rounds, target)
        rows += bench_first_touch(32 * MiB if quick else 256 * MiB, rounds)
    except BaseException:
        progress(f"interrupted; cleanup check: {sweep()}")
        raise
    leftovers = sweep()
    elapsed = time.perf_counter() - started
    report(
        f"segments ({'quick, ' if quick else ''}{rounds} rounds, {elapsed:.0f} s)",
        rows,
        args.json,
    )
    print(f"cleanup check: {leftovers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
