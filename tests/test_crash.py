"""A process SIGKILLed at every step of every allocator operation leaves a repairable heap.

For each operation a child process runs it with a fault hook that kills the
child at metadata-writing step k, for k = 1, 2, ... until the operation runs to
its end.  After each kill the parent takes the heap lock (which rolls the
half-done operation back and reclaims the dead child's cached blocks), and
checks that the heap is consistent, that its own live blocks kept their
contents and generations (no live block lost), and that nothing is handed out
twice (fresh allocations never overlap its live blocks).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator

import pytest

from conftest import crash_points, run_killed_at
from sharedobj import Heap, StaleHandleError
from sharedobj.allocator import undo
from sharedobj.limits import PAGE_SIZE, list_segments

Op = Callable[[Heap], object]
_PREPARED: dict[int, object] = {}


def _fill(block: object, value: int) -> None:
    buf = block.buf  # type: ignore[attr-defined]
    buf[0] = value
    buf[len(buf) - 1] = value


def _prepare_free_run(h: Heap) -> None:
    keep = [h.alloc(5 * PAGE_SIZE) for _ in range(3)]
    h.free(keep[0])
    h.free(keep[2])
    _PREPARED[h.id] = keep[1]


def _op_refill(h: Heap) -> None:
    h.alloc(200)


def _op_flush_and_release(h: Heap) -> None:
    blocks = [h.alloc(2000) for _ in range(100)]
    for b in blocks:
        h.free(b)  # magazines overflow: flushes, and empty slabs are released


def _op_run(h: Heap) -> None:
    h.free(h.alloc(9 * PAGE_SIZE))


def _op_free_run(h: Heap) -> None:
    h.free(_PREPARED[h.id])  # coalesces with both neighbours


def _op_grow(h: Heap) -> None:
    h.alloc(3 << 20)  # more than the first arena holds: adds an arena


def _op_huge(h: Heap) -> None:
    h.free(h.alloc(5 << 20))


def _prepare_kept_neighbour(h: Heap) -> None:
    prev = _PREPARED.pop(h.id, None)
    if prev is not None:  # the killed round left it allocated: free it, its place is reused
        with contextlib.suppress(StaleHandleError):
            h.free(prev)  # type: ignore[arg-type]
    for _ in range(10):  # holes left by earlier rounds may part them: those stay allocated
        first, second = h.alloc(1 << 20), h.alloc(37 * PAGE_SIZE)
        if (second.arena, second.offset) == (first.arena, first.offset + first.size):
            break
    else:
        raise AssertionError("no two adjacent runs in 10 tries")
    _fill(first, 5)
    h.free(first)  # kept resident: a dirty run
    _PREPARED[h.id] = second


def _prepare_kept_run(h: Heap) -> None:
    big = h.alloc(3 << 20)
    _fill(big, 6)
    h.free(big)  # kept resident: a dirty run to reuse or release


def _op_reuse_kept(h: Heap) -> None:
    h.alloc(1 << 20)  # split off a kept run: the rest stays kept


def _op_release_kept(h: Heap) -> None:
    h.release_memory()


def _prepare_dead_cache(h: Heap) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: fills its magazines, then dies
        for n in (40, 300, 3000):
            for _ in range(20):
                h.alloc(n)
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)


def _op_reclaim(h: Heap) -> None:
    h.recover()  # returns the dead process's cached blocks, slab by slab


OPS: dict[str, tuple[Op, Callable[[Heap], None] | None]] = {
    "register+refill": (_op_refill, None),
    "flush+slab release": (_op_flush_and_release, None),
    "alloc+free run": (_op_run, None),
    "free run (coalesce)": (_op_free_run, _prepare_free_run),
    "grow": (_op_grow, None),
    "huge alloc+free": (_op_huge, None),
    "free next to a kept run": (_op_free_run, _prepare_kept_neighbour),
    "reuse a kept run": (_op_reuse_kept, _prepare_kept_run),
    "release kept runs": (_op_release_kept, _prepare_kept_run),
    "reclaim a dead cache": (_op_reclaim, _prepare_dead_cache),
}


@pytest.fixture
def heap() -> Iterator[Heap]:
    h = Heap.create(2 << 20, huge_threshold=4 << 20, noreserve=True)
    try:
        yield h
    finally:
        ids = [seg_ids for _i, _k, seg_ids, _s in h._alloc.arena_ids()] if h._alloc else []
        h.destroy() if not h.closed else None
        for seg_ids in ids:
            h._backend.remove_region(seg_ids)


def _run_killed_at(h: Heap, op: Op, k: int) -> bool:
    """Run ``op`` in a forked child killed at step k; True if it ran to the end."""
    return run_killed_at(undo, lambda: op(h), k)


@pytest.mark.parametrize("name", list(OPS))
def test_sigkill_at_every_step(heap: Heap, name: str) -> None:
    op, prepare = OPS[name]
    mine = [heap.alloc(n) for n in (24, 200, 3000, 40_000, 9 * PAGE_SIZE)]
    for i, b in enumerate(mine):
        _fill(b, 17 + i)
    k = 1
    while True:
        if prepare is not None:
            prepare(heap)  # afresh for each k: the last recovery may have finished the job
        finished = _run_killed_at(heap, op, k)
        heap.recover()
        problems = heap.check()
        assert problems == [], f"{name}, killed at step {k}: {problems}"
        for i, b in enumerate(mine):
            heap._validate(b)  # generation intact: not freed by the recovery
            assert b.buf[0] == 17 + i and b.buf[len(b.buf) - 1] == 17 + i
        fresh = [heap.alloc(n) for n in (24, 200, 3000, 40_000)]
        for f in fresh:
            for b in mine:
                assert (
                    f.arena != b.arena
                    or f.offset + f.size <= b.offset
                    or b.offset + b.size <= f.offset
                )
        for f in fresh:
            heap.free(f)
        if finished:
            crash_points(f"allocator {name}", k - 1)
            break
        k += 1
    assert k > 3, f"{name}: the operation wrote nothing?"
    for b in mine:
        heap.free(b)
    assert heap.check() == []


def test_killed_creator_of_a_region_leaks_no_segment(heap: Heap) -> None:
    """A child killed while growing the heap leaves no segment behind, committed or not."""
    before = {s.shmid for s in list_segments()}
    k = 1
    while not _run_killed_at(heap, _op_grow, k):
        heap.recover()
        k += 1
    heap.recover()
    assert heap.check() == []
    ours = {shmid for _i, _k, ids, _s in heap._alloc.arena_ids() for shmid in ids}  # type: ignore[union-attr]
    stray = {s.shmid for s in list_segments()} - before - ours - {heap.id}
    # other tests run in parallel: only count segments made by our children
    mine = {s.shmid for s in list_segments() if s.shmid in stray and s.cpid not in (os.getpid(),)}
    children_made = {s.shmid for s in list_segments() if s.shmid in mine and s.nattch == 0}
    assert not children_made, f"segments left by killed children: {children_made}"
