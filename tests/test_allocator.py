"""The allocator as pure logic over bytearrays: classes, slabs, runs, coalescing, rollback."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from sharedobj import StaleHandleError
from sharedobj.allocator import undo
from sharedobj.allocator.classes import CLASS_SIZES, MAX_SMALL, SLAB_GEOMETRY, class_of
from sharedobj.allocator.core import BATCH, DISCARD_MIN, MAG_LIMIT, MAG_MAX, REFILL, Allocator
from sharedobj.allocator.layout import (
    LEN_MASK,
    LOG_END,
    LOG_OFFSET,
    MAGIC_ARENA,
    ROOT_SIZE,
    TAG_RUN,
    TAG_SHIFT,
    TAG_SLAB,
)
from sharedobj.allocator.memory import MemoryBackend, memory_allocator, process_view
from sharedobj.allocator.pages import ArenaView
from sharedobj.limits import PAGE_SIZE


def snapshot(alloc: Allocator) -> dict[tuple[int, ...], bytes]:
    """What a rollback must restore exactly: all metadata, and the data of live blocks.

    The undo log's scratch area and the contents of free pages may differ.
    """
    backend = alloc.backend
    assert isinstance(backend, MemoryBackend)
    out = {}
    for ids, region in backend.regions.items():
        data = bytearray(region)
        if ids == (alloc.root_id,):
            data[LOG_OFFSET:LOG_END] = bytes(LOG_END - LOG_OFFSET)
        elif bytes(data[:8]) == MAGIC_ARENA:
            av = ArenaView(int.from_bytes(data[8:12], "little"), memoryview(region))
            live = np.zeros(av.npages, dtype=bool)
            live[: av.meta_pages] = True
            pm = av.pages_array(av.pm)
            for p in np.flatnonzero(pm):
                tag, n = int(pm[p]) >> TAG_SHIFT, int(pm[p]) & LEN_MASK
                if tag in (TAG_RUN, TAG_SLAB):
                    live[p : p + n] = True
            for p in np.flatnonzero(~live):
                data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
        out[ids] = bytes(data)
    return out


# --------------------------------------------------------------------------
# size classes


def test_size_classes_waste_at_most_an_eighth() -> None:
    assert CLASS_SIZES[0] == 16 and CLASS_SIZES[-1] == MAX_SMALL == 32768
    assert all(s % 16 == 0 for s in CLASS_SIZES)
    for n in range(1, MAX_SMALL + 1):
        size = CLASS_SIZES[class_of(n)]
        assert size >= n
        if n >= 128:
            assert (size - n) / n <= 0.125, n
        else:
            assert size - n < 16


def test_slab_geometry_fits_and_wastes_little() -> None:
    for size, (pages, nslots, first) in zip(CLASS_SIZES, SLAB_GEOMETRY, strict=True):
        assert nslots >= 8
        assert 16 + nslots <= first < PAGE_SIZE  # state bytes fit in the first page
        assert first + nslots * size <= pages * PAGE_SIZE
        assert 1 - nslots * size / (pages * PAGE_SIZE) < 0.07  # header, state bytes, tail


# --------------------------------------------------------------------------
# basic operations


def test_small_blocks_distinct_aligned_and_reused() -> None:
    a = memory_allocator(4 << 20)
    got = [a.alloc_small(n) for n in (1, 16, 17, 100, 1000, 32768) for _ in range(50)]
    spans = sorted(
        (arena, off, off + CLASS_SIZES[class_of(n)])
        for (arena, off, _t, _p), n in zip(
            got, [n for n in (1, 16, 17, 100, 1000, 32768) for _ in range(50)], strict=True
        )
    )
    for (a1, _s1, e1), (a2, s2, _e2) in itertools.pairwise(spans):
        assert a1 != a2 or e1 <= s2, "blocks overlap"
    assert all(off % 16 == 0 for _a, off, _t, _p in got)
    assert a.check() == []
    arena, off, tag, pos = got[0]
    a.free_small(arena, off, 1, tag, pos)
    again = a.alloc_small(1)
    assert again[1] == off and again[2] != tag  # reused, with a new generation tag
    assert a.check() == []


def test_small_alloc_takes_the_lock_once_per_refill() -> None:
    a = memory_allocator(4 << 20)
    blocks = [a.alloc_small(64) for _ in range(10 * REFILL)]
    assert a.lock_count <= 10 + 2  # one refill per REFILL blocks (+ registration)
    before = a.lock_count
    for arena, off, tag, pos in blocks:
        a.free_small(arena, off, 64, tag, pos)
    flushes = a.lock_count - before
    assert flushes <= (10 * REFILL) // REFILL
    assert len(a.mags[class_of(64)]) <= MAG_MAX
    assert all(b * size <= 256 * 1024 or b == 4 for b, size in zip(BATCH, CLASS_SIZES, strict=True))
    assert BATCH[class_of(32768)] == 8 and MAG_LIMIT[class_of(32768)] == 16


def test_double_free_and_stale_tags_are_refused() -> None:
    a = memory_allocator(1 << 20)
    arena, off, tag, pos = a.alloc_small(100)
    a.free_small(arena, off, 100, tag, pos)
    with pytest.raises(StaleHandleError, match="already freed"):
        a.free_small(arena, off, 100, tag, pos)
    arena, off, gen = a.alloc_run(100_000)
    a.free_run(arena, off, gen)
    with pytest.raises(StaleHandleError):
        a.free_run(arena, off, gen)
    assert a.check() == []


def test_slot_position_validates_handles() -> None:
    a = memory_allocator(1 << 20)
    arena, off, _tag, pos = a.alloc_small(100)
    assert a.slot_position(arena, off, 100) == pos
    with pytest.raises(StaleHandleError, match="not the start"):
        a.slot_position(arena, off + 16, 100)
    with pytest.raises(StaleHandleError, match="holds 112-byte blocks"):
        a.slot_position(arena, off, 2000)
    with pytest.raises(StaleHandleError, match="outside"):
        a.slot_position(arena, 10**9, 100)
    with pytest.raises(StaleHandleError, match="not in a slab"):
        a.slot_position(arena, a.alloc_run(50_000)[1], 100)


def test_runs_split_and_coalesce_back_to_empty() -> None:
    a = memory_allocator(8 << 20)
    av = a._arena(0)
    empty_frontier = av.frontier()
    runs = [a.alloc_run(n * PAGE_SIZE) for n in (9, 10, 11, 12, 13, 200)]
    rnd = random.Random(5)
    order = runs[:]
    rnd.shuffle(order)
    for i, (arena, off, gen) in enumerate(order):
        a.free_run(arena, off, gen)
        assert a.check() == [], f"after freeing {i + 1}"
    assert av.frontier() == empty_frontier  # everything merged and gave the frontier back
    assert all(av.w[av.pm + p] == 0 for p in range(av.meta_pages, av.npages))


def test_freed_run_is_reused_best_fit() -> None:
    a = memory_allocator(8 << 20)
    r1 = a.alloc_run(20 * PAGE_SIZE)
    keep = a.alloc_run(PAGE_SIZE)
    r2 = a.alloc_run(5 * PAGE_SIZE)
    keep2 = a.alloc_run(PAGE_SIZE)
    a.free_run(*r1)
    a.free_run(*r2)
    small = a.alloc_run(4 * PAGE_SIZE)
    assert small[1] == r2[1]  # the 5-page hole fits best
    mid = a.alloc_run(16 * PAGE_SIZE)
    assert mid[1] == r1[1]
    assert a.check() == []
    del keep, keep2


def test_freed_pages_are_discarded_from_a_megabyte_on_without_a_dirty_budget() -> None:
    a = memory_allocator(8 << 20, dirty_max=0)
    big = DISCARD_MIN // PAGE_SIZE
    arena, off, gen = a.alloc_run(big * PAGE_SIZE)
    small = a.alloc_run(16 * PAGE_SIZE)
    other = a.alloc_run(PAGE_SIZE)  # keeps the runs away from the frontier
    buf = a.arena_buf(arena)
    buf[off : off + (big + 16) * PAGE_SIZE] = b"\xab" * ((big + 16) * PAGE_SIZE)
    a.free_run(arena, off, gen)
    a.free_run(*small)
    assert bytes(buf[off : off + big * PAGE_SIZE]) == bytes(big * PAGE_SIZE)  # back to the kernel
    assert buf[small[1]] == 0xAB  # small runs stay resident for reuse
    assert a.stats()["kept_resident_bytes"] == 0
    assert a.check() == []
    del other


def _fill(a: Allocator, run: tuple[int, int, int], byte: int) -> None:
    arena, off, _gen = run
    n = a.run_pages(arena, off) * PAGE_SIZE
    a.arena_buf(arena)[off : off + n] = bytes([byte]) * n


def _resident(a: Allocator, run: tuple[int, int, int]) -> bool:
    """Whether a freed run still holds what was written (MemoryBackend zeroes discarded pages)."""
    arena, off, _gen = run
    return a.arena_buf(arena)[off] != 0


def test_freed_big_runs_stay_resident_within_the_dirty_budget() -> None:
    """A freed run of a megabyte or more is kept resident (reused without page faults)."""
    mib = DISCARD_MIN
    a = memory_allocator(64 << 20, dirty_max=3 * mib)
    runs, sep = [], []
    for _ in range(5):
        runs.append(a.alloc_run(mib))
        sep.append(a.alloc_run(PAGE_SIZE))  # no two freed runs merge
    for r in runs:
        _fill(a, r, 0xAB)
    for r in runs[:3]:
        a.free_run(*r)
        assert _resident(a, r)
    assert a.stats()["kept_resident_bytes"] == 3 * mib
    a.free_run(*runs[3])  # over the budget: back to the kernel
    assert not _resident(a, runs[3])
    assert a.stats()["kept_resident_bytes"] == 3 * mib
    assert a.check() == []
    a.free_run(*sep[2])  # joins runs[2] and runs[3]: 2 MiB more than the budget allows
    assert not _resident(a, runs[2])
    assert a.stats()["kept_resident_bytes"] == 2 * mib
    assert a.check() == []
    runs[2] = runs[3] = a.alloc_run(2 * mib + PAGE_SIZE)  # the merged hole, taken back whole
    # the next big allocations take kept pages, which leaves room in the budget
    again = a.alloc_run(mib)
    assert (again[0], again[1]) in {(r[0], r[1]) for r in runs[:2]}
    assert a.stats()["kept_resident_bytes"] == mib
    assert a.check() == []
    # release_dirty gives everything kept back, and says how much
    kept = a.stats()["kept_resident_bytes"]
    assert a.release_dirty() == kept
    assert a.stats()["kept_resident_bytes"] == 0
    assert not any(_resident(a, r) for r in runs[:2] if (r[0], r[1]) != (again[0], again[1]))
    assert a.check() == []
    del sep


def test_a_kept_run_at_the_frontier_holds_it_until_released() -> None:
    a = memory_allocator(64 << 20)
    first = a.alloc_run(PAGE_SIZE)
    av = a._arena(first[0])
    front = av.frontier()
    run = a.alloc_run(4 * DISCARD_MIN)
    _fill(a, run, 0xCD)
    a.free_run(*run)
    assert _resident(a, run)
    assert av.frontier() == front + 4 * DISCARD_MIN // PAGE_SIZE  # not moved back over it
    assert a.check() == []
    again = a.alloc_run(4 * DISCARD_MIN)  # the same pages, still written
    assert (again[0], again[1]) == (run[0], run[1]) and _resident(a, again)
    a.free_run(*again)
    assert a.release_dirty() == 4 * DISCARD_MIN
    assert av.frontier() == front  # the heap is back where it was
    assert a.check() == []


def test_kept_runs_merge_and_split_with_exact_counts() -> None:
    """Dirty runs coalesce with their neighbours and split on reuse; the count stays exact."""
    mib = DISCARD_MIN
    a = memory_allocator(64 << 20, dirty_max=16 * mib)
    runs = [a.alloc_run(mib) for _ in range(4)]
    tail = a.alloc_run(PAGE_SIZE)
    small = a.alloc_run(PAGE_SIZE)  # below the megabyte: freed as before, but merges
    for r in (runs[1], runs[3], runs[0], runs[2]):
        a.free_run(*r)
        assert a.check() == []
    assert a.stats()["kept_resident_bytes"] == 4 * mib  # one run of four megabytes
    a.free_run(*tail)  # a small run next to a kept one joins it
    assert a.stats()["kept_resident_bytes"] == 4 * mib + PAGE_SIZE
    assert a.check() == []
    part = a.alloc_run(mib // 2)  # split: the rest stays kept
    assert a.stats()["kept_resident_bytes"] == 4 * mib + PAGE_SIZE - mib // 2
    assert a.check() == []
    a.free_run(*part)
    a.free_run(*small)
    assert a.check() == []
    a.release_dirty()
    assert a.stats()["kept_resident_bytes"] == 0
    assert a.check() == []


def test_check_reports_a_wrong_kept_page_count() -> None:
    from sharedobj.allocator.layout import A_DIRTY

    a = memory_allocator(16 << 20)
    run = a.alloc_run(DISCARD_MIN)
    keep = a.alloc_run(PAGE_SIZE)
    a.free_run(*run)
    av = a._arena(run[0])
    av.w[A_DIRTY] += 1
    assert any("kept-resident pages" in p for p in a.check())
    av.w[A_DIRTY] -= 1
    assert a.check() == []
    del keep


def test_empty_slabs_are_released_but_one_is_kept() -> None:
    a = memory_allocator(8 << 20)
    cls = class_of(4096)
    nslots = SLAB_GEOMETRY[cls][1]
    blocks = [a.alloc_small(4096) for _ in range(3 * nslots)]
    av = a._arena(0)
    slabs_before = len(a._slab_heads(av))
    assert slabs_before >= 3
    for b in blocks:
        a.free_small(b[0], b[1], 4096, b[2], b[3])
    a._flush(cls, len(a.mags[cls]))
    assert a.check() == []
    assert 1 <= len(a._slab_heads(av)) < slabs_before


def test_growth_adds_arenas_up_to_max_size() -> None:
    a = memory_allocator(1 << 20, max_size=4 << 20)
    runs = []
    with pytest.raises(MemoryError, match=r"heap is full.*max_size"):
        for _ in range(100):
            runs.append(a.alloc_run(256 * 1024))
    assert a.stats()["general_arenas"] >= 3
    assert a.total_bytes() <= 4 << 20 + 4 * PAGE_SIZE
    assert a.check() == []
    for r in runs:
        a.free_run(*r)
    assert a.check() == []


def test_huge_blocks_get_their_own_region() -> None:
    a = memory_allocator(1 << 20)
    index, gen = a.alloc_huge(3 << 20)
    assert len(a.arena_buf(index)) >= 3 << 20
    assert a.huge_generation(index) == gen
    a.free_huge(index, gen)
    assert a.huge_generation(index) == 0
    with pytest.raises(StaleHandleError):
        a.free_huge(index, gen)
    with pytest.raises(StaleHandleError):
        a.arena_buf(index)
    index2, gen2 = a.alloc_huge(2 << 20)  # the table entry is reused
    assert index2 == index and gen2 != gen
    assert a.check() == []


def test_cross_process_free_and_dead_cache_reclaim() -> None:
    a = memory_allocator(4 << 20)
    b = process_view(a, pid=2)
    blocks = [b.alloc_small(200) for _ in range(10)]
    for arena, off, tag, pos in blocks[:5]:
        a.free_small(arena, off, 200, tag, pos)  # freed by another process
    before = a.stats()
    assert a.check() == []
    a.backend.dead.add(2)  # type: ignore[attr-defined]
    reclaimed = a.reclaim_dead()
    assert reclaimed >= REFILL - 10  # b's magazine went back
    after = a.stats()
    cls_after = {c["size"]: c for c in after["classes"]}[208]
    assert cls_after["cached_blocks"] == len(a.mags[class_of(200)])
    assert cls_after["used_blocks"] == 5  # b's live blocks stay allocated
    assert after["processes"] == before["processes"] - 1
    assert a.check() == []


def test_stats_account_for_everything() -> None:
    a = memory_allocator(4 << 20)
    smalls = [a.alloc_small(100) for _ in range(100)]
    run = a.alloc_run(100_000)
    s = a.stats()
    assert s["small_used_bytes"] == 100 * 112
    assert s["run_used_bytes"] == 25 * PAGE_SIZE
    assert s["used_bytes"] == s["small_used_bytes"] + s["run_used_bytes"]
    assert s["metadata_ratio"] < 0.01
    assert 0 <= s["fragmentation"] <= 1
    del smalls, run


def test_metadata_overhead_of_a_large_heap() -> None:
    a = memory_allocator(256 << 20)
    s = a.stats()
    assert s["metadata_bytes"] / s["total_bytes"] < 0.01
    assert ROOT_SIZE / s["total_bytes"] < 0.01


# --------------------------------------------------------------------------
# interruption: every step of every operation rolls back exactly


def _interrupt_at(k: int) -> None:
    count = [0]

    def hook() -> None:
        count[0] += 1
        if count[0] == k:
            raise KeyboardInterrupt

    undo.fault_hook = hook


OPS = {
    "refill": lambda a: a.alloc_small(48),
    "new slabs": lambda a: a.alloc_small(3000),  # one refill that needs two fresh slabs
    "alloc run": lambda a: a.alloc_run(5 * PAGE_SIZE),
    "free run (coalesce)": lambda a: a.free_run(*a._test_run),
    "alloc huge": lambda a: a.alloc_huge(2 << 20),
    "grow": lambda a: a.alloc_run(3 << 20),
    "flush": lambda a: a._flush(class_of(64), REFILL),
}


@pytest.mark.parametrize("op", list(OPS))
def test_keyboard_interrupt_at_every_step_rolls_back_exactly(op: str) -> None:
    k = 1
    while True:
        a = memory_allocator(2 << 20)
        # a heap with some history: holes to coalesce, cached blocks to flush
        keep = [a.alloc_run(3 * PAGE_SIZE) for _ in range(3)]
        a.free_run(*keep[0])
        a._test_run = keep[1]  # type: ignore[attr-defined]
        for _ in range(2 * REFILL):
            blk = a.alloc_small(64)
            a.free_small(blk[0], blk[1], 64, blk[2], blk[3])
        mags_before = [list(m) for m in a.mags]
        before = snapshot(a)
        _interrupt_at(k)
        try:
            OPS[op](a)
        except KeyboardInterrupt:
            undo.fault_hook = None
            after = snapshot(a)
            assert set(after) >= set(before)
            for ids, data in before.items():
                assert after[ids] == data, f"step {k}: region {ids} differs after rollback"
            assert a.mags == mags_before, f"step {k}: magazines changed"
            assert a.check() == []
            k += 1
            continue
        finally:
            undo.fault_hook = None
        assert a.check() == []
        break
    assert k > 2, "the operation wrote nothing?"


def test_owner_death_rolls_back_a_half_done_operation() -> None:
    backend = MemoryBackend()
    a = memory_allocator(2 << 20, backend=backend)
    before = snapshot(a)

    # simulate a holder that died after step 5: the log is left behind
    def crash() -> None:
        crash.n += 1  # type: ignore[attr-defined]
        if crash.n == 6:  # type: ignore[attr-defined]
            raise SystemExit

    crash.n = 0  # type: ignore[attr-defined]
    av = a._arena(0)
    backend.lock()  # the holder-to-be-killed takes the lock and starts writing
    txn = undo.Txn(a.root32, a.blob16, a.regions)
    undo.fault_hook = crash
    try:
        with pytest.raises(SystemExit):
            for _ in range(10):
                av.alloc(txn, 2, 1)
    finally:
        undo.fault_hook = None
    backend.unlock()  # the kernel releases a dead holder's robust mutex
    assert undo.pending(a.root32) > 0
    backend.owner_died = True
    assert a.check() == []  # check() takes the lock, which recovers first
    assert backend.recoveries == 1
    after = snapshot(a)
    for ids, data in before.items():
        assert after[ids] == data
