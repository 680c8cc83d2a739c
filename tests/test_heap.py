"""sharedobj.Heap on System V segments: blocks across processes, handles, growth, errors."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import numpy as np
import pytest

from conftest import shm_exists
from sharedobj import Block, BlockHandle, CorruptHeapError, Heap, StaleHandleError, segment
from sharedobj.limits import PAGE_SIZE, list_segments


@pytest.fixture
def heap() -> Iterator[Heap]:
    h = Heap.create(4 << 20)
    try:
        yield h
    finally:
        if not h.closed:
            h.destroy()


def _segments_of(h: Heap) -> set[int]:
    return {h.id} | {shmid for _i, _k, ids, _s in h._a().arena_ids() for shmid in ids}


# --------------------------------------------------------------------------
# blocks and handles


def test_block_buf_is_exactly_nbytes_and_writable(heap: Heap) -> None:
    for n in (1, 15, 16, 17, 4096, 32768, 32769, 100_000, 2 << 20):
        b = heap.alloc(n)
        assert len(b.buf) == n and not b.buf.readonly
        b.buf[:] = bytes([n % 251]) * n
        assert bytes(b.buf[-1:]) == bytes([n % 251])
    assert heap.check() == []


@pytest.mark.parametrize("n", [10, 50_000, 3 << 20])
def test_handles_pickle_small_and_attach_lazily(heap: Heap, n: int) -> None:
    b = heap.alloc(n)
    assert len(pickle.dumps(b)) <= 64
    assert len(pickle.dumps(b.handle)) <= 64
    copy = pickle.loads(pickle.dumps(b))
    assert isinstance(copy, Block) and copy._heap is None  # nothing attached yet
    b.buf[0] = 42
    assert copy.buf[0] == 42
    assert b.handle.open().buf[0] == 42
    assert BlockHandle(b.handle.data) == b.handle


def _child_reads_and_writes(handles: list[bytes], q: mp.Queue) -> None:  # type: ignore[type-arg]
    blocks = [pickle.loads(h) for h in handles]
    out = [bytes(b.buf[:4]) for b in blocks]
    for b in blocks:
        b.buf[:4] = b"kid!"
    q.put(out)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_blocks_cross_processes(heap: Heap, method: str) -> None:
    blocks = [heap.alloc(n) for n in (8, 5000, 70_000, 3 << 20)]
    for i, b in enumerate(blocks):
        b.buf[:4] = f"pa{i:02d}".encode()
    ctx = mp.get_context(method)
    q = ctx.Queue()
    p = ctx.Process(target=_child_reads_and_writes, args=([pickle.dumps(b) for b in blocks], q))
    p.start()
    seen = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    assert seen == [f"pa{i:02d}".encode() for i in range(4)]
    assert all(bytes(b.buf[:4]) == b"kid!" for b in blocks)
    assert heap.check() == []


def _child_frees(handles: list[bytes]) -> None:
    for h in handles:
        pickle.loads(h).free()


def test_block_freed_by_another_process(heap: Heap) -> None:
    blocks = [heap.alloc(n) for n in (64,) * 100 + (40_000, 3 << 20)]
    p = mp.get_context("spawn").Process(
        target=_child_frees, args=([pickle.dumps(b) for b in blocks],)
    )
    p.start()
    p.join(60)
    assert p.exitcode == 0
    heap.recover()
    assert heap.check() == []
    for b in blocks:
        with pytest.raises(StaleHandleError):
            heap._validate(b)
    assert heap.stats()["used_bytes"] == 0


def test_stale_handles_raise(heap: Heap) -> None:
    for n in (100, 50_000, 3 << 20):
        b = heap.alloc(n)
        data = pickle.dumps(b)
        heap.free(b)
        with pytest.raises(StaleHandleError):
            heap.free(b)
        with pytest.raises(StaleHandleError):
            _ = b.buf
        stale = pickle.loads(data)
        reused = heap.alloc(n)  # probably the same place
        with pytest.raises(StaleHandleError):
            _ = stale.buf
        heap.free(reused)
    assert heap.check() == []


def test_tampered_handles_are_refused(heap: Heap) -> None:
    b = heap.alloc(100)
    data = bytearray(b.handle.data)
    with pytest.raises(ValueError):
        BlockHandle(bytes(data[:-1]))
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        try:
            blk = BlockHandle(bytes(bad)).open()
            _ = blk.buf
        except (StaleHandleError, ValueError, FileNotFoundError, PermissionError, CorruptHeapError):
            continue
        # a flip that still names a valid live block must name *this* one
        assert (blk.arena, blk.offset, blk.gen) == (b.arena, b.offset, b.gen)
    assert heap.check() == []


# --------------------------------------------------------------------------
# growth, spans, huge blocks, memory return


def test_heap_grows_by_adding_arenas_then_reports_full() -> None:
    h = Heap.create(1 << 20, max_size=4 << 20)
    try:
        runs = []
        with pytest.raises(MemoryError, match=r"heap is full.*in use \d+ of \d+ bytes"):
            for _ in range(100):
                runs.append(h.alloc(256 << 10))
        assert h.stats()["general_arenas"] >= 3
        with pytest.raises(ValueError, match="max_size"):
            h.alloc(5 << 20)
        for r in runs:
            h.free(r)
        assert h.check() == []
    finally:
        h.destroy()


def test_spans_for_arenas_and_huge_blocks() -> None:
    h = Heap.create(3 << 20, max_segment_size=1 << 20, huge_threshold=1 << 20)
    try:
        ids = h._a().arena_ids()
        assert len(ids[0][2]) >= 3  # the first arena is a span of 1 MiB segments
        big = h.alloc(5 << 20)
        arr = np.frombuffer(big.buf, dtype=np.uint64)
        arr[:] = np.arange(arr.size, dtype=np.uint64)
        assert int(arr[(1 << 20) // 8 - 1]) + 1 == int(arr[(1 << 20) // 8])  # across a boundary
        assert big.kind == 2 and len(h._a()._ids[big.arena]) == 5
        del arr
        h.free(big)
        assert h.check() == []
    finally:
        h.destroy()


@pytest.mark.parametrize("dirty_max", [0, 8 << 20])
def test_dirty_max_decides_whether_a_freed_run_stays_resident(dirty_max: int) -> None:
    h = Heap.create(32 << 20, huge_threshold=16 << 20, dirty_max=dirty_max)
    try:
        assert h.header()["dirty_max"] == dirty_max
        b = h.alloc(4 << 20)
        b.buf[:] = b"\x01" * len(b.buf)
        keep = h.alloc(PAGE_SIZE)  # so the run is not merged into the frontier
        h.free(b)
        assert h.stats()["kept_resident_bytes"] == (0 if dirty_max == 0 else 4 << 20)
        assert h.release_memory() == (0 if dirty_max == 0 else 4 << 20)
        assert h.stats()["kept_resident_bytes"] == 0 and h.check() == []
        h.free(keep)
    finally:
        h.destroy()


def test_dirty_max_must_be_a_non_negative_int() -> None:
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="dirty_max"):
            Heap.create(1 << 20, dirty_max=bad)  # type: ignore[arg-type]


def test_freed_runs_return_memory_to_the_kernel(heap: Heap) -> None:
    b = heap.alloc(3 << 20)
    b.buf[:] = b"\x01" * len(b.buf)
    keep = heap.alloc(PAGE_SIZE)  # so the run is not merged into the frontier
    before = heap.stats()["resident_bytes"]
    heap.free(b)
    after = heap.stats()["resident_bytes"]
    assert before - after >= (3 << 20) - PAGE_SIZE
    heap.free(keep)


def test_huge_lazy_heap_costs_nothing_until_used() -> None:
    t0 = time.perf_counter()
    h = Heap.create(64 << 30, noreserve=True)
    elapsed = time.perf_counter() - t0
    try:
        s = h.stats()
        assert s["total_bytes"] >= 64 << 30
        assert s["resident_bytes"] < 2 << 20  # header pages only
        b = h.alloc(1000)
        b.buf[0] = 1
        assert h.check() == []
    finally:
        h.destroy()
    assert elapsed < 1.0  # the benchmark measures it properly; this only catches a memset


# --------------------------------------------------------------------------
# lifetime


_HOLDER = """
import sys, time
from sharedobj import Heap
if sys.argv[1] == "create":
    h = Heap.create(1 << 20, huge_threshold=1 << 20)
    keep = [h.alloc(2 << 20), h.alloc(3 << 20)]       # huge blocks: their own segments
    keep += [h.alloc(600 << 10) for _ in range(4)]     # forces a second arena
else:
    h = Heap.attach(int(sys.argv[1]))
    h.alloc(100)
ids = sorted({h.id} | {s for _i, _k, ids, _s in h._a().arena_ids() for s in ids})
print(",".join(map(str, ids)), flush=True)
time.sleep(600)
"""


def test_auto_remove_heap_vanishes_after_sigkill_of_all() -> None:
    creator = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, "create"], stdout=subprocess.PIPE, text=True
    )
    other = None
    try:
        assert creator.stdout is not None
        ids = [int(x) for x in creator.stdout.readline().split(",")]
        assert len(ids) >= 5
        other = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(ids[0])], stdout=subprocess.PIPE, text=True
        )
        assert other.stdout is not None
        assert sorted(int(x) for x in other.stdout.readline().split(",")) == ids
        creator.kill()
        creator.wait()
        time.sleep(0.1)
        assert all(shm_exists(i) for i in ids), "the other process still uses the heap"
        other.kill()
        other.wait()
        deadline = time.monotonic() + 10
        while any(shm_exists(i) for i in ids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(shm_exists(i) for i in ids)
    finally:
        for p in (creator, other):
            if p is not None:
                p.kill()
                p.wait()


def test_close_keeps_views_valid_and_destroy_removes_everything() -> None:
    h = Heap.create(1 << 20, auto_remove=False)
    ids = _segments_of(h)
    b = h.alloc(1000)
    view = np.frombuffer(b.buf, dtype=np.uint8)
    view[:] = 3
    h.close()
    assert h.closed
    with pytest.raises(ValueError, match="closed"):
        h.alloc(10)
    assert int(view.sum()) == 3000  # still mapped
    again = Heap.attach(h.id)
    again.destroy()
    del view, b
    gc.collect()
    deadline = time.monotonic() + 5
    while any(shm_exists(i) for i in ids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(shm_exists(i) for i in ids)


def _child_allocates_and_dies(heap_id: int) -> None:
    h = Heap.attach(heap_id)
    for _ in range(50):
        h.alloc(300)
    os.kill(os.getpid(), signal.SIGKILL)


def test_dead_process_cache_is_reclaimed(heap: Heap) -> None:
    p = mp.get_context("spawn").Process(target=_child_allocates_and_dies, args=(heap.id,))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    cls = next(c for c in heap.stats()["classes"] if c["size"] == 320)
    assert cls["cached_blocks"] > 0  # the dead child's magazine
    assert heap.recover() == cls["cached_blocks"]
    cls = next(c for c in heap.stats()["classes"] if c["size"] == 320)
    assert cls["cached_blocks"] == 0 and cls["used_blocks"] == 50
    assert len(heap._a().registry()) == 1
    assert heap.check() == []


def test_attach_validates_the_segment() -> None:
    with segment.create(1 << 20) as seg, pytest.raises(CorruptHeapError, match="magic"):
        Heap.attach(seg.shmid)
    with (
        segment.create(PAGE_SIZE) as small,
        pytest.raises(CorruptHeapError, match="not a sharedobj heap"),
    ):
        Heap.attach(small.shmid)
    with pytest.raises(FileNotFoundError):
        Heap.attach(2**31 - 2)
    with pytest.raises(TypeError):
        Heap.attach("1")  # type: ignore[arg-type]


def test_attach_from_an_unrelated_process(heap: Heap) -> None:
    b = heap.alloc(64)
    b.buf[:5] = b"howdy"
    code = f"""
    import pickle, sys
    from sharedobj import Heap
    h = Heap.attach({heap.id})
    blk = pickle.loads({pickle.dumps(b)!r})
    print(bytes(blk.buf[:5]).decode())
    h.free(blk)
    h.close()
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "howdy", out.stderr
    with pytest.raises(StaleHandleError):
        heap.free(b)
    assert heap.check() == []


# --------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("nbytes", "exc", "match"),
    [
        (0, ValueError, "nbytes must be positive, got 0"),
        (-5, ValueError, "got -5"),
        (1.5, TypeError, "float"),
        ("10", TypeError, "str"),
        (None, TypeError, "NoneType"),
        (True, TypeError, "bool"),
    ],
)
def test_alloc_rejects_bad_sizes(
    heap: Heap, nbytes: object, exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        heap.alloc(nbytes)  # type: ignore[arg-type]


def test_create_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        Heap.create(0)
    with pytest.raises(TypeError):
        Heap.create("big")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_size"):
        Heap.create(4 << 20, max_size=1 << 20)
    with pytest.raises(ValueError, match="below the heap root"):
        Heap.create(4 << 20, max_segment_size=64 << 10)


def test_free_rejects_foreign_objects(heap: Heap) -> None:
    with pytest.raises(TypeError, match="Block"):
        heap.free("x")  # type: ignore[arg-type]
    other = Heap.create(1 << 20)
    try:
        b = other.alloc(10)
        with pytest.raises(ValueError, match="belongs to heap"):
            heap.free(b)
    finally:
        other.destroy()


def test_no_segment_leaks_across_the_module() -> None:
    """Heaps made and destroyed here leave nothing marked-but-attached by this process."""
    gc.collect()
    mine = [
        s for s in list_segments() if s.cpid == os.getpid() and s.nattch > 0 and s.size == 524288
    ]
    live = {
        ref().id
        for ref in __import__("sharedobj.heap", fromlist=["_heaps"])._heaps.values()
        if ref()
    }
    assert {s.shmid for s in mine} <= live | {s.shmid for s in mine if not s.marked_for_removal}


def test_attached_process_grows_the_heap_with_the_creators_settings() -> None:
    h = Heap.create(1 << 20, mode=0o640, noreserve=True, max_segment_size=1 << 20)
    try:
        code = f"""
        import json
        from sharedobj import Heap
        b = Heap.attach({h.id})._backend
        print(json.dumps([b.noreserve, b.mode, b.max_segment_size]))
        """
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout.strip() == "[true, 416, 1048576]", out.stderr
    finally:
        h.destroy()
