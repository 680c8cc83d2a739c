"""SharedMemory API: sharedobj against the stdlib's ``multiprocessing.shared_memory``.

    python benchmarks/shared_memory.py [--quick] [--rounds N] [--json FILE]

Every case runs ours and its anchors interleaved (A B A B ..., reversed every
other round) and is judged by the ratio of medians (see ``_harness``): the host
drifts between a fast state and one about 2x slower, which hits both sides of a
round alike.  The anchor is always the stdlib, because sharedobj's
``SharedMemory``, ``SharedMemoryManager`` and ``ShareableList`` are drop-in
replacements for it: the stdlib is what a user switching imports compares to.

(a) **create + close + unlink** (``create=True``, 64 B, 4 KiB, 1 MiB), us/op.
    Anchor: the stdlib ``SharedMemory`` (``shm_open`` + ``ftruncate`` + ``mmap``,
    then ``munmap`` + ``shm_unlink``, plus a resource-tracker message each way;
    36-65 us on this host).  Target: ours >= 20x faster, since ours is a slab
    allocation in an already-mapped heap plus a name-table insert.  Two rows
    per size, sharing the stdlib samples:

    * *heap in use*: another block of the default heap stays alive during the
      sample, the steady state of a program that keeps any shared memory;
    * *sole block*: nothing else lives in the default heap, so every create
      makes the heap (a System V segment) and every unlink retires it again:
      the cost of a program whose only block comes and goes.

    Plus a **manager** row: ``smm.SharedMemory(size)`` + close + unlink, ours
    (blocks of the manager's own heap, no server) against the stdlib's
    ``SharedMemoryManager`` (a server process: one RPC per segment to track it).
    The stdlib server is told to forget each unlinked name after the sample
    (untimed), so its shutdown does not trip over names that are gone.
(b) **open by name + close from another process.**  One long-lived forked
    child opens an existing 4 KiB segment by name and closes it, n times per
    request, timing inside the child and sending us/op back through a Pipe;
    the parent alternates the requests (ours, stdlib, stdlib, ours, ...).
    Anchor: the stdlib's ``SharedMemory(name)`` (``shm_open`` + ``fstat`` +
    ``mmap``, and on 3.11 a resource-tracker registration; 13-19 us here).
    Target: ours >= 3x faster.  The *first* open in a process also attaches
    the default heap (a one-time cost), so it is reported on its own row:
    one fresh forked child per round times its very first open of each.
(c) **ShareableList item read and write** of int, float, str and bytes on a
    100-item list (25 of each kind), us/op.  Anchor: the stdlib
    ``ShareableList``, which re-parses its format string on every access.
    If ``sharedobj.shareable_list`` is missing or broken, these rows are
    skipped with a note instead of failing the run.

``--quick`` runs in well under 20 s; full mode in under 3 minutes.

Nothing may outlive the run.  ``SHAREDOBJ_DEFAULT_KEY`` is set to a random,
unused key first (and inherited by the children), so the user's real default
heap is never touched; every object is removed in a ``finally`` (SIGTERM and
SIGHUP raise, so those run); the default heap for that key must retire itself
once its last block is gone.  A final sweep looks for a System V segment with
that key or created by this process and not marked for removal, and for
``/dev/shm`` files of this run: any such thing is reported as a bug and
removed (``IPC_RMID`` through ``sharedobj.segment``, ``shm_unlink``).
"""

from __future__ import annotations

import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from multiprocessing import get_context, resource_tracker
from multiprocessing import shared_memory as std_shm
from multiprocessing.connection import Connection
from multiprocessing.managers import RemoteError, dispatch
from multiprocessing.managers import SharedMemoryManager as StdManager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Row, human, interleave, parser, report, stop_on_signals
from _harness import Sampler as _Sampler

KiB = 1 << 10
MiB = 1 << 20
CHILD_TIMEOUT = 60.0
EACH = 200  # names opened once each per sample in the "names once each" row

OURS = "sharedobj"
STDLIB = "stdlib"

_prefix = ""  # /dev/shm names of this run: sobsm_<pid>_<n>
_counter = 0
_key = 0  # SHAREDOBJ_DEFAULT_KEY of this run


def progress(msg: str) -> None:
    print(f"[shared_memory] {msg}", file=sys.stderr, flush=True)


def posix_name() -> str:
    """A fresh POSIX shm name that the final sweep recognises as this run's."""
    global _counter
    _counter += 1
    return f"{_prefix}{_counter}"


# --------------------------------------------------------------------------
# Signals and cleanup


def _sysv_segments() -> list[tuple[int, int, int, int, int]]:
    """(key, shmid, perms, cpid, nattch) of every System V segment on the host."""
    out: list[tuple[int, int, int, int, int]] = []
    with open("/proc/sysvipc/shm") as f:
        next(f)
        for line in f:
            c = line.split()
            if len(c) >= 7:
                out.append((int(c[0]), int(c[1]), int(c[2], 8), int(c[4]), int(c[6])))
    return out


def pick_key() -> int:
    """A random System V key that no segment uses now."""
    used = {seg[0] for seg in _sysv_segments()}
    while True:
        key = random.randrange(0x10000000, 0x7FFFFFFF)
        if key not in used:
            return key


def sweep() -> list[str]:
    """Remove whatever this run left behind; return a description of each leftover."""
    from sharedobj import segment

    found: list[str] = []
    me = os.getpid()
    for key, shmid, perms, cpid, nattch in _sysv_segments():
        if key != _key and cpid != me:
            continue
        if perms & 0o1000 and key != _key:  # SHM_DEST: goes at its last detach (our exit)
            continue
        what = "the default heap of this run's key" if key == _key else "a segment of this run"
        found.append(
            f"BUG: {what} survived (key {key:#x}, shmid {shmid}, nattch {nattch}); removed now"
        )
        with suppress(OSError):
            segment._mark_removed(shmid)
    with suppress(FileNotFoundError):
        for name in sorted(os.listdir("/dev/shm")):
            if name.startswith(_prefix):
                found.append(f"/dev/shm/{name} left behind (unlinked now)")
                with suppress(FileNotFoundError):
                    os.unlink(f"/dev/shm/{name}")
                resource_tracker.unregister(f"/{name}", "shared_memory")
    return found


# --------------------------------------------------------------------------
# Sampling


class Sampler(_Sampler):
    """The harness's Sampler, with the very first operation run untimed."""

    def __init__(
        self,
        fn: Callable[[int], None],
        target: float,
        *,
        max_n: int = 100_000,
        around: Callable[[], AbstractContextManager[Any]] = nullcontext,
        after: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(fn, target, max_n, around, after, untimed_first=True)


def counts(samplers: dict[str, Sampler]) -> str:
    return "ops per sample: " + ", ".join(f"{k} {s.n}" for k, s in samplers.items())


# --------------------------------------------------------------------------
# (a) create + close + unlink


def ours_create(size: int) -> Callable[[int], None]:
    from sharedobj import SharedMemory

    def run(n: int) -> None:
        for _ in range(n):
            shm = SharedMemory(create=True, size=size)
            shm.close()
            shm.unlink()

    return run


def stdlib_create(size: int) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            shm = std_shm.SharedMemory(name=posix_name(), create=True, size=size)
            try:
                shm.close()
            finally:
                shm.unlink()

    return run


@contextmanager
def default_heap_in_use() -> Iterator[None]:
    """Keep one block of the default heap alive, so the heap is not retired."""
    from sharedobj import SharedMemory

    keeper = SharedMemory(create=True, size=64)
    try:
        yield
    finally:
        try:
            keeper.close()
        finally:
            keeper.unlink()


def bench_create(sizes: list[int], rounds: int, target: float) -> list[Row]:
    rows: list[Row] = []
    for size in sizes:
        progress(f"(a) create+close+unlink {human(size)}")
        in_use, sole = f"{OURS} (heap in use)", f"{OURS} (sole block)"
        samplers = {
            in_use: Sampler(ours_create(size), target, around=default_heap_in_use),
            STDLIB: Sampler(stdlib_create(size), target),
            sole: Sampler(ours_create(size), target, max_n=2_000),
        }
        samples = interleave(dict(samplers), rounds)
        rows.append(
            Row(
                f"create+close+unlink {human(size)}, heap in use",
                "us/op",
                False,
                in_use,
                {in_use: samples[in_use], STDLIB: samples[STDLIB]},
                note="another default-heap block stays alive; " + counts(samplers),
            )
        )
        rows.append(
            Row(
                f"create+close+unlink {human(size)}, sole block",
                "us/op",
                False,
                sole,
                {sole: samples[sole], STDLIB: samples[STDLIB]},
                note="the default heap is created and retired by every op",
            )
        )
    return rows


def _stdlib_forget(smm: StdManager, names: list[str]) -> None:
    """Tell the stdlib manager's server to stop tracking names we already unlinked."""
    if not names:
        return
    client = smm._Client  # type: ignore[attr-defined]
    while names:
        name = names.pop()
        # One request per connection (the server's handle_request).  It drops
        # the name from its list, then fails to unlink the file we already
        # unlinked: that error is expected.
        with client(smm._address, authkey=smm._authkey) as conn, suppress(RemoteError):  # type: ignore[attr-defined]
            dispatch(conn, None, "release_segment", (name,))


def bench_manager(size: int, rounds: int, target: float) -> list[Row]:
    from sharedobj import SharedMemoryManager

    progress(f"(a) manager SharedMemory({size}) + close + unlink")
    ours_mgr = SharedMemoryManager()
    std_mgr = StdManager()
    made: list[str] = []
    ours_mgr.start()
    try:
        std_mgr.start()
        try:

            def ours(n: int) -> None:
                for _ in range(n):
                    shm = ours_mgr.SharedMemory(size)
                    shm.close()
                    shm.unlink()

            def stdlib(n: int) -> None:
                for _ in range(n):
                    shm = std_mgr.SharedMemory(size)
                    made.append(shm.name)
                    try:
                        shm.close()
                    finally:
                        shm.unlink()

            samplers = {
                OURS: Sampler(ours, target),
                STDLIB: Sampler(stdlib, target, after=lambda: _stdlib_forget(std_mgr, made)),
            }
            samples = interleave(dict(samplers), rounds)
        finally:
            try:
                _stdlib_forget(std_mgr, made)
            finally:
                std_mgr.shutdown()
    finally:
        ours_mgr.shutdown()
    return [
        Row(
            f"manager SharedMemory({human(size)})+close+unlink",
            "us/op",
            False,
            OURS,
            samples,
            note="stdlib: one RPC to its server per segment; " + counts(samplers),
        )
    ]


# --------------------------------------------------------------------------
# (b) open by name from another process


def _open_loop(who: str, name: str, n: int) -> float:
    """us per open-by-name + close, over n of them."""
    if who == OURS:
        from sharedobj import SharedMemory

        t0 = time.perf_counter()
        for _ in range(n):
            SharedMemory(name).close()
    else:
        t0 = time.perf_counter()
        for _ in range(n):
            std_shm.SharedMemory(name).close()
    return (time.perf_counter() - t0) / n * 1e6


def _open_each(who: str, names: list[str]) -> float:
    """us per open-by-name + close of names this process has not opened (each once)."""
    if who == OURS:
        from sharedobj import SharedMemory
        from sharedobj import shared_memory as so_shm

        # forget which names this process opened: every open looks its name up
        so_shm._reopen.clear()
        heap = so_shm.default_heap(create=False)
        if heap is not None:
            heap.names._hints.clear()
        t0 = time.perf_counter()
        for name in names:
            SharedMemory(name).close()
    else:
        t0 = time.perf_counter()
        for name in names:
            std_shm.SharedMemory(name).close()
    return (time.perf_counter() - t0) / len(names) * 1e6


def _child_server(conn: Connection, names: dict[str, Any]) -> None:
    """Long-lived child: answers (who, n) or (who, "each") with us/op; None ends it."""
    try:
        while True:
            request = conn.recv()
            if request is None:
                return
            who, n = request
            try:
                if n == "each":
                    conn.send(("ok", _open_each(who, names[who + " each"])))
                else:
                    conn.send(("ok", _open_loop(who, names[who], n)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _child_first(conn: Connection, names: dict[str, str], order: list[str]) -> None:
    """One-shot child: the very first open (+close) of each, in ``order``, in us."""
    try:
        conn.send(("ok", {who: _open_loop(who, names[who], 1) for who in order}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _answer(conn: Connection, what: str) -> Any:
    if not conn.poll(CHILD_TIMEOUT):
        raise RuntimeError(f"{what}: no answer from the child in {CHILD_TIMEOUT} s")
    status, value = conn.recv()
    if status != "ok":
        raise RuntimeError(f"{what} failed in the child:\n{value}")
    return value


def _stop_child(proc: Any) -> None:
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()


def bench_open(size: int, n: int, rounds: int) -> list[Row]:
    from sharedobj import SharedMemory

    progress(f"(b) open {human(size)} by name in another process, {n} per sample")
    ctx = get_context("fork")
    ours_shm = SharedMemory(create=True, size=size)
    ours_each: list[Any] = []
    std_each: list[Any] = []
    try:
        std = std_shm.SharedMemory(name=posix_name(), create=True, size=size)
        try:
            for _ in range(EACH):
                ours_each.append(SharedMemory(create=True, size=size))
                std_each.append(std_shm.SharedMemory(name=posix_name(), create=True, size=size))
            names: dict[str, Any] = {
                OURS: ours_shm.name,
                STDLIB: std.name,
                OURS + " each": [x.name for x in ours_each],
                STDLIB + " each": [x.name for x in std_each],
            }
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child_server, args=(child, names), daemon=True)
            proc.start()
            child.close()
            try:

                def remote(who: str) -> Callable[[], float]:
                    def sample() -> float:
                        parent.send((who, n))
                        return float(_answer(parent, f"open {who}"))

                    return sample

                steady = interleave({OURS: remote(OURS), STDLIB: remote(STDLIB)}, rounds)

                def remote_each(who: str) -> Callable[[], float]:
                    def sample() -> float:
                        parent.send((who, "each"))
                        return float(_answer(parent, f"open each {who}"))

                    return sample

                each = interleave({OURS: remote_each(OURS), STDLIB: remote_each(STDLIB)}, rounds)
                parent.send(None)
            finally:
                parent.close()
                _stop_child(proc)

            progress("(b) first open in a fresh process")
            first: dict[str, list[float]] = {OURS: [], STDLIB: []}
            for r in range(rounds):
                order = [OURS, STDLIB] if r % 2 == 0 else [STDLIB, OURS]
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child_first, args=(send, names, order), daemon=True)
                proc.start()
                send.close()
                try:
                    got = _answer(recv, "first open")
                finally:
                    recv.close()
                    _stop_child(proc)
                for who in order:
                    first[who].append(float(got[who]))
        finally:
            for x in [std, *std_each]:
                try:
                    x.close()
                finally:
                    x.unlink()
    finally:
        for x in [ours_shm, *ours_each]:
            x.close()
            x.unlink()
    return [
        Row(
            f"open by name+close {human(size)}, other process",
            "us/op",
            False,
            OURS,
            steady,
            note=f"one long-lived forked child, {n} opens per sample timed in the child; "
            "ours remembers where it found the name (checked under the lock at each open)",
        ),
        Row(
            f"open by name+close {human(size)}, other process, {EACH} names once each",
            "us/op",
            False,
            OURS,
            each,
            note="the same child; ours forgets the names it opened before each sample, "
            "so every open looks its name up",
        ),
        Row(
            "first open by name+close in a new process",
            "us",
            False,
            OURS,
            first,
            note="single shot in a fresh fork; ours includes attaching the default heap",
        ),
    ]


# --------------------------------------------------------------------------
# (c) ShareableList item read and write

VALUES: dict[str, Any] = {
    "int": 123456789,
    "float": 2.718281828,
    "str": "hello world",
    "bytes": b"\x01bytes\x02",
}
NEW_VALUES: dict[str, Any] = {
    "int": -42,
    "float": 0.5,
    "str": "dlrow olleh",
    "bytes": b"\x03setyb\x04",
}


def _items() -> list[Any]:
    return [VALUES[kind] for _ in range(25) for kind in VALUES]  # 100 items, kinds cycled


def _sl_reader(sl: Any, i: int) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            sl[i]

    return run


def _sl_writer(sl: Any, i: int, value: Any) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            sl[i] = value

    return run


def bench_shareable_list(rounds: int, target: float) -> list[Row]:
    progress("(c) ShareableList item read/write")
    kinds = list(VALUES)
    try:
        from sharedobj.shareable_list import ShareableList

        ours = ShareableList(_items())
    except Exception as exc:
        why = f"skipped: sharedobj.shareable_list unusable ({type(exc).__name__}: {exc})"
        progress(why)
        return [
            Row(f"ShareableList {op} {kind}", "us/op", False, OURS, {}, note=why)
            for op in ("read", "write")
            for kind in kinds
        ]
    rows: list[Row] = []
    try:
        std = std_shm.ShareableList(_items(), name=posix_name())
        try:
            for kind in kinds:
                i = 40 + kinds.index(kind)  # an item of that kind in the middle of the list
                if ours[i] != VALUES[kind] or std[i] != VALUES[kind]:
                    raise RuntimeError(f"item {i}: {ours[i]!r} / {std[i]!r}, not {VALUES[kind]!r}")
                for op in ("read", "write"):
                    make = (
                        (lambda sl, i=i: _sl_reader(sl, i))
                        if op == "read"
                        else (lambda sl, i=i, kind=kind: _sl_writer(sl, i, NEW_VALUES[kind]))
                    )
                    samples = interleave(
                        {OURS: Sampler(make(ours), target), STDLIB: Sampler(make(std), target)},
                        rounds,
                    )
                    rows.append(
                        Row(
                            f"ShareableList {op} {kind} (100 items)",
                            "us/op",
                            False,
                            OURS,
                            samples,
                            note=f"item {i}: {NEW_VALUES[kind]!r}" if op == "write" else "",
                        )
                    )
                if ours[i] != NEW_VALUES[kind] or std[i] != NEW_VALUES[kind]:
                    raise RuntimeError(f"item {i} after writes: {ours[i]!r} / {std[i]!r}")
        finally:
            try:
                std.shm.close()
            finally:
                std.shm.unlink()
    finally:
        try:
            ours.shm.close()
        finally:
            ours.shm.unlink()
    return rows


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    global _prefix, _key
    p = parser(__doc__.splitlines()[0] if __doc__ else "shared_memory")
    p.set_defaults(rounds=None)
    args = p.parse_args(argv)
    quick: bool = args.quick
    rounds: int = args.rounds or (3 if quick else 9)
    target = 0.015 if quick else 0.08

    _prefix = f"sobsm_{os.getpid()}_"
    _key = pick_key()
    os.environ["SHAREDOBJ_DEFAULT_KEY"] = str(_key)  # before sharedobj looks at it
    stop_on_signals()
    # Start the resource tracker now, so forked children share it instead of
    # starting their own (which would unlink the stdlib segments at their exit).
    resource_tracker.ensure_running()

    started = time.perf_counter()
    rows: list[Row] = []
    leftovers: list[str] = []
    try:
        rows += bench_create([64, 4 * KiB, MiB], rounds, target)
        rows += bench_manager(4 * KiB, rounds, target)
        rows += bench_open(4 * KiB, 500 if quick else 5_000, rounds)
        rows += bench_shareable_list(rounds, target)
    finally:
        from sharedobj import shared_memory as so_shm

        heap = so_shm._default
        if heap is not None and not heap.closed:  # ours is retired; a leftover is closed here
            with suppress(Exception):
                heap.close()
        leftovers = sweep()
        for line in leftovers:
            progress(line)
    elapsed = time.perf_counter() - started
    report(
        f"shared_memory ({'quick, ' if quick else ''}{rounds} rounds, {elapsed:.0f} s)",
        rows,
        args.json,
    )
    print(
        f"cleanup check (key {_key:#x}): "
        + ("; ".join(leftovers) if leftovers else "clean: no segment and no /dev/shm file left")
    )
    return 1 if any(line.startswith("BUG") for line in leftovers) else 0


if __name__ == "__main__":
    sys.exit(main())
