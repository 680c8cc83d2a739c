"""Bad input: every public entry point that takes outside data, fuzzed.

Names, sizes, shapes, dtypes, tampered pickles of block handles and shared
arrays, command lines, and heap metadata damaged by a buggy writer (random
byte flips in the root header, undo log, arena table, registry, arena
headers, free-run bins and links, slab headers and state bytes).  Every case
must end in a clear exception - :class:`CorruptHeapError` for a damaged heap -
or a valid result; never a segfault, a hang, an unrelated exception leaking
out of the library's internals (IndexError, struct.error, ...), or memory
handed out outside a block.

Cases that could crash or hang run in a forked child with a timeout, so a
segfault is a test failure, not a dead pytest worker.  Where the kernel allows
it (root, or an unprivileged user namespace) that child also gets an IPC
namespace of its own: a corrupted id table then names segments of that
namespace only, and every segment goes with the child.

``SHAREDOBJ_FUZZ_EXAMPLES`` scales the number of examples (default 1: the CI
budget; 10 runs ten times as many).  The cases tried per target are printed
at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharedobj
from sharedobj import (
    BlockHandle,
    CorruptHeapError,
    Heap,
    ShareableList,
    SharedMemory,
    SharedMemoryManager,
    StaleHandleError,
)
from sharedobj import heap as heap_mod
from sharedobj.allocator import layout as L
from sharedobj.allocator.classes import CLASS_BY_GRANULE, CLASS_SIZES, MAX_SMALL, SLAB_GEOMETRY
from sharedobj.limits import PAGE_SIZE

SCALE = max(1, int(os.environ.get("SHAREDOBJ_FUZZ_EXAMPLES", "1") or 1))
CASES: Counter[str] = Counter()


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=n * SCALE,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )


@pytest.fixture(scope="module", autouse=True)
def _report_cases() -> Iterator[None]:
    yield
    total = sum(CASES.values())
    lines = [f"  {name}: {n}" for name, n in sorted(CASES.items())]
    print(f"\nfuzz cases tried (scale {SCALE}): {total}\n" + "\n".join(lines))
    path = os.environ.get("SHAREDOBJ_FUZZ_REPORT")
    if path:
        with open(path, "a") as f:
            for name, n in sorted(CASES.items()):
                f.write(f"{os.getpid()} {name} {n}\n")


# --------------------------------------------------------------------------
# running a case in a child


_CLONE_NEWIPC = 0x08000000


def _new_ipc_namespace() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare(_CLONE_NEWIPC) == 0


def in_child(fn: Callable[[bool], str | None], timeout: float = 20.0) -> str | None:
    """Run ``fn(isolated)`` in a forked child; its return value, or raise on crash/hang/error.

    ``isolated`` says whether the child has an IPC namespace of its own.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            isolated = _new_ipc_namespace()
            out = "ok\n" + (fn(isolated) or "")
        except BaseException:
            out = "fail\n" + traceback.format_exc()
            code = 1
        try:
            data = out.encode("utf-8", "backslashreplace")
            while data:
                data = data[os.write(w, data) :]
        finally:
            os._exit(code)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    status = None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = "hang"
                break
            ready, _, _ = select.select([r], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(r, 65536)
                if chunk:
                    chunks.append(chunk)
                    continue
                _, st_ = os.waitpid(pid, 0)
                status = st_
                break
    finally:
        os.close(r)
    text = b"".join(chunks).decode("utf-8", "replace")
    if status == "hang":
        raise AssertionError(f"case hung (killed after {timeout} s); output so far:\n{text}")
    assert isinstance(status, int)
    if os.WIFSIGNALED(status):
        raise AssertionError(f"case crashed with signal {os.WTERMSIG(status)}:\n{text}")
    head, _, rest = text.partition("\n")
    if head != "ok":
        raise AssertionError(f"case failed:\n{rest}")
    return rest


# --------------------------------------------------------------------------
# heap metadata corrupted by a buggy process

ALLOWED = (CorruptHeapError, StaleHandleError, MemoryError)
_ROOT_HEADER_END = 35 * 4  # bytes of root header fields in use


def _addr(view: memoryview) -> int:
    return int(np.frombuffer(view, np.uint8).ctypes.data) if len(view) else 0


def _regions(h: Heap, blocks: list[Any]) -> dict[str, list[tuple[memoryview, int, int]]]:
    """Byte ranges worth damaging, by name: (buffer, start, end)."""
    a = h._alloc
    assert a is not None
    root = a.root
    av = a._arena(0)
    front = av.frontier()
    npages = av.npages
    pm = PAGE_SIZE
    pages = (av.meta_pages, min(front + 2, npages))
    out: dict[str, list[tuple[memoryview, int, int]]] = {
        "magic": [(root, 0, 8)],
        "root_header": [(root, 8, _ROOT_HEADER_END)],
        "undo": [
            (root, L.H_LOG_COUNT * 4, L.H_LOG_BLOB * 4 + 4),
            (root, L.LOG_OFFSET, L.LOG_OFFSET + 64 * L.LOG_ENTRY_WORDS * 4),
            (root, L.LOG_BLOB_OFFSET, L.LOG_BLOB_OFFSET + 256),
        ],
        "table": [(root, L.TABLE_OFFSET, L.TABLE_OFFSET + 4 * L.TABLE_ENTRY_WORDS * 4)],
        "registry": [(root, L.REGISTRY_OFFSET, L.REGISTRY_OFFSET + 3 * L.REGISTRY_ENTRY_WORDS * 4)],
        "ids": [(root, L.IDS_OFFSET, L.IDS_OFFSET + 16 * 4)],
        "arena_header": [(av.buf, 0, L.A_HEADER_END * 4)],
        "page_map": [(av.buf, pm + 4 * pages[0], pm + 4 * pages[1])],
        "links": [
            (av.buf, pm + 4 * (npages + pages[0]), pm + 4 * (npages + pages[1])),
            (av.buf, pm + 4 * (2 * npages + pages[0]), pm + 4 * (2 * npages + pages[1])),
        ],
    }
    slabs = []
    for head in a._slab_heads(av):
        base = int(head) * PAGE_SIZE
        cls = int(av.w[base // 4])
        nslots = SLAB_GEOMETRY[cls][1] if cls < len(SLAB_GEOMETRY) else 16
        slabs.append((av.buf, base, base + 16 + nslots))
    out["slab"] = slabs or [(av.buf, pm, pm + 4)]
    return out


def _damage(h: Heap, blocks: list[Any], flips: list[tuple[str, int, int, int]]) -> list[str]:
    """Apply byte flips / word stores; returns a description of each."""
    regions = _regions(h, blocks)
    done = []
    for name, which, pos, value in flips:
        ranges = regions[name]
        buf, start, end = ranges[which % len(ranges)]
        off = start + pos % max(1, end - start)
        if value < 256:  # xor one byte
            buf[off] ^= value or 0xFF
            done.append(f"{name}: byte {off} ^= {value or 0xFF:#x}")
        else:  # store a word (aligned), from a set of interesting values
            off -= off % 4
            word = value & 0xFFFFFFFF
            buf[off : off + 4] = struct.pack("<I", word)
            done.append(f"{name}: word at byte {off} = {word:#x}")
    return done


def _arena_bounds(h: Heap, arena: int) -> tuple[int, int, int] | None:
    """(base address, first data byte, end) of a general arena's mapping, None for huge."""
    a = h._alloc
    assert a is not None
    view = a._views.get(arena)
    if view is None:
        return None
    return _addr(view.buf), view.meta_pages * PAGE_SIZE, view.npages * PAGE_SIZE


def _extent(block: Any) -> tuple[int, int]:
    """Address range a block may be written through: its slot or run, rounded up."""
    start = _addr(block.buf)
    if block.kind == heap_mod.SMALL:
        return start, start + CLASS_SIZES[CLASS_BY_GRANULE[(block.size + 15) >> 4]]
    return start, start + -(-block.size // PAGE_SIZE) * PAGE_SIZE


class Tracker:
    """The blocks a scenario holds, and checks on every block handed out."""

    def __init__(self, heap: Heap) -> None:
        self.heap = heap
        self.live: list[Any] = []

    def add(self, block: Any) -> None:
        lo, hi = _extent(block)
        if block.kind != heap_mod.HUGE:
            bounds = _arena_bounds(self.heap, block.arena)
            if bounds is not None:
                base, first, end = bounds
                assert base + first <= lo and hi <= base + end, (
                    f"{block!r} lies outside its arena's data pages"
                )
        for other in self.live:
            olo, ohi = _extent(other)
            assert hi <= olo or ohi <= lo, f"{block!r} overlaps live {other!r}"
        block.buf[:] = b"\xa5" * len(block.buf)  # what a user does: write all of it
        self.live.append(block)


OPS = st.one_of(
    st.tuples(st.just("alloc"), st.integers(1, MAX_SMALL)),
    st.tuples(st.just("alloc"), st.integers(MAX_SMALL + 1, 300_000)),
    st.tuples(st.just("alloc"), st.sampled_from([16, 64, 2000, 5 * PAGE_SIZE, 600_000])),
    st.tuples(st.just("churn"), st.sampled_from([16, 200, 2000, 30_000])),
    st.tuples(st.just("free"), st.integers(0, 63)),
    st.tuples(st.just("read"), st.integers(0, 63)),
    st.tuples(st.sampled_from(["check", "stats", "recover", "attach", "header"]), st.just(0)),
)
REGION_NAMES = [
    "magic",
    "root_header",
    "undo",
    "table",
    "registry",
    "ids",
    "arena_header",
    "page_map",
    "links",
    "slab",
]
FLIP = st.tuples(
    st.sampled_from(REGION_NAMES),
    st.integers(0, 1000),
    st.integers(0, 1 << 20),
    st.one_of(
        st.integers(1, 255),
        st.sampled_from([0, 1, 2, 3, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 28, 3 << 28, 2 << 28]).map(
            lambda v: v | (1 << 40)
        ),
        st.integers(0, 0xFFFFFFFF).map(lambda v: v | (1 << 40)),
    ),
)
SETUP = st.lists(
    st.tuples(
        st.sampled_from([16, 48, 200, 1000, 5000, 40_000, 3 * PAGE_SIZE, 400_000]), st.booleans()
    ),
    min_size=1,
    max_size=30,
)


def corruption_case(
    setup: list[tuple[int, bool]],
    flips: list[tuple[str, int, int, int]],
    ops: list[tuple[str, int]],
    isolated: bool,
) -> str:
    """Runs in a child: build a heap, damage it, operate on it; raises on a bad outcome."""
    h = Heap.create(2 << 20, huge_threshold=256 * 1024)
    created: set[int] = {h.id}
    foreign: list[tuple[tuple[int, ...], str]] = []

    def watch(heap: Heap) -> None:
        """Record the segments the heap makes; refuse (and report) removing any other."""
        assert heap._alloc is not None
        backend = heap._alloc.backend
        real_create, real_remove = backend.create_region, backend.remove_region

        def create_region(nbytes: int, stage: Callable[[int], None]) -> Any:
            def staged(shmid: int) -> None:
                created.add(shmid)
                stage(shmid)

            return real_create(nbytes, staged)

        def remove_region(ids: tuple[int, ...]) -> None:
            if not set(ids) <= created:
                foreign.append((ids, "".join(traceback.format_stack(limit=6))))
                return
            real_remove(ids)

        backend.create_region = create_region  # type: ignore[method-assign]
        backend.remove_region = remove_region  # type: ignore[method-assign]

    watch(h)
    log: list[str] = []
    try:
        assert h._alloc is not None
        for ids in h._alloc._ids.values():
            created.update(ids)
        tr = Tracker(h)
        held = []
        for size, keep in setup:
            b = h.alloc(size)
            tr.add(b)
            if keep:
                held.append(b)
            else:
                tr.live.remove(b)
                h.free(b)
        assert h.check() == []
        log += _damage(h, held, flips)
        first = h.check()
        log.append(f"check: {first}")
        heaps = [h]
        for op, arg in ops:
            cur = heaps[-1]
            try:
                if op == "alloc":
                    tr.add(cur.alloc(arg) if arg % 2 else cur.alloc_zeroed(arg))
                elif op == "churn":
                    bs = [cur.alloc(arg) for _ in range(150)]
                    for b in bs:
                        cur.free(b)
                elif op == "free" and tr.live:
                    b = tr.live.pop(arg % len(tr.live))
                    cur.free(b) if arg % 2 else b.free()
                elif op == "read" and tr.live:
                    b = tr.live[arg % len(tr.live)]
                    again = pickle.loads(pickle.dumps(b))
                    lo, hi = _extent(b)
                    view = again.buf
                    assert lo <= _addr(view) and _addr(view) + len(view) <= hi
                elif op == "check":
                    problems = cur.check()
                    assert isinstance(problems, list)
                elif op == "stats":
                    cur.stats()
                elif op == "header":
                    cur.header()
                elif op == "recover":
                    cur.recover()
                elif op == "attach":
                    with heap_mod._heaps_lock:
                        heap_mod._heaps.pop(cur.id, None)
                        heap_mod._kept.pop(cur.id, None)
                    try:
                        fresh = Heap.attach(cur.id)
                    except FileNotFoundError as exc:  # a damaged "destroyed" flag says so
                        assert "destroyed" in str(exc), exc
                        log.append(f"attach: {exc}")
                        continue
                    watch(fresh)
                    fresh.check()
                    heaps.append(fresh)
                    tr.heap = fresh
                log.append(f"{op}({arg}): ok")
            except ALLOWED as exc:
                log.append(f"{op}({arg}): {type(exc).__name__}: {exc}")
            except ValueError as exc:  # a damaged max_size is still a limit
                assert op == "alloc" and "max_size" in str(exc), exc
                log.append(f"{op}({arg}): {type(exc).__name__}: {exc}")
            except FileNotFoundError as exc:  # a damaged "destroyed" flag is believed
                assert "destroyed" in str(exc), exc
                log.append(f"{op}({arg}): {exc}")
                break
        assert not foreign, f"the damaged heap tried to remove segments it never made: {foreign}"
        return "\n".join(log)
    except BaseException as exc:
        raise AssertionError(
            f"setup={setup!r}\nflips={flips!r}\nops={ops!r}\nlog:\n  " + "\n  ".join(log)
        ) from exc
    finally:
        if not isolated:  # the namespace takes everything with it otherwise
            from sharedobj import _libc

            lib = _libc.libc()
            for shmid in created:
                lib.shmctl(shmid, _libc.IPC_RMID, None)


@settings(
    max_examples=60 * SCALE,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(SETUP, st.lists(FLIP, min_size=1, max_size=3), st.lists(OPS, min_size=1, max_size=12))
def test_damaged_heap_fails_cleanly(
    setup: list[tuple[int, bool]],
    flips: list[tuple[str, int, int, int]],
    ops: list[tuple[str, int]],
) -> None:
    CASES["heap corruption"] += 1
    in_child(lambda isolated: corruption_case(setup, flips, ops, isolated))


@pytest.mark.parametrize(
    ("region", "word", "value"),
    [
        ("magic", 0, 0x58585858),
        ("root_header", L.H_VERSION, 7),
        ("root_header", L.H_ARENA_COUNT, 5000),
        ("root_header", L.H_IDS_USED, 1 << 30),
        ("root_header", L.H_INFLIGHT, 1 << 30),
        ("undo", L.H_LOG_COUNT, 3),  # stale entries of committed operations
        ("undo", L.H_LOG_COUNT, 1 << 20),
        ("arena_header", L.A_FRONTIER, 1),
        ("arena_header", L.A_BINS + 80, 3),  # a bin naming a used page
        ("arena_header", L.A_PARTIAL + 3, 0x7FFF),
        ("table", L.T_IDS_OFF, 0x6A8),
        ("table", L.T_NIDS, 0),
    ],
)
def test_check_reports_damage(region: str, word: int, value: int) -> None:
    """A damaged field that matters is reported by check(), and never crashes it."""

    def case(isolated: bool) -> str:
        h = Heap.create(2 << 20, huge_threshold=256 * 1024)
        try:
            keep = [h.alloc(n) for n in (16, 200, 5000, 40_000, 3 * PAGE_SIZE)]
            for b in keep[::2]:
                h.free(b)
            h.alloc(300_000)
            assert h.check() == []
            a = h._alloc
            assert a is not None
            buf = {"arena_header": a._arena(0).buf, "table": a.root}.get(region, a.root)
            base = L.TABLE_OFFSET if region == "table" else 0
            buf[base + 4 * word : base + 4 * word + 4] = struct.pack("<I", value)
            problems = h.check()
            assert problems, f"check() found nothing wrong after {region} word {word} = {value}"
            return "\n".join(problems)
        finally:
            if not isolated:
                with contextlib.suppress(Exception):
                    h.destroy()

    CASES["check reports damage"] += 1
    in_child(case)


# --------------------------------------------------------------------------
# tampered block handles and shared-array pickles


def _live_extents(blocks: list[Any]) -> list[tuple[int, int]]:
    return [_extent(b) for b in blocks]


def _inside(lo: int, hi: int, extents: list[tuple[int, int]]) -> bool:
    return any(a <= lo and hi <= b for a, b in extents)


OPEN_ERRORS = (
    StaleHandleError,
    CorruptHeapError,
    ValueError,
    TypeError,
    FileNotFoundError,
    PermissionError,
)


def _tamper(data: bytes, edits: list[tuple[int, int]], lo: int = 0, hi: int | None = None) -> bytes:
    out = bytearray(data)
    hi = len(out) if hi is None else hi
    for pos, value in edits:
        i = lo + pos % max(1, hi - lo)
        if value < 256:
            out[i] ^= value or 0xFF
        else:
            out[i] = value & 0xFF
    return bytes(out)


def handle_case(
    sizes: list[int],
    edits: list[tuple[int, int]],
    target: str,
    isolated: bool,
) -> str:
    """Tamper with a pickled block or array; what comes back must stay inside a live block."""
    h = Heap.create(2 << 20, huge_threshold=256 * 1024)
    try:
        blocks = [h.alloc(n) for n in sizes]
        freed = blocks[len(blocks) // 2]
        h.free(freed)
        blocks.remove(freed)
        extents = _live_extents(blocks)
        arr = sharedobj.arrays.new_array(h, (7, 5), np.float64)
        view = arr[1::2, ::-2]
        blocks.append(arr.block)
        extents.append((_addr(arr.block.buf), _addr(arr.block.buf) + arr.block.size))
        pick = blocks[edits[0][0] % len(blocks)]
        if target == "raw":  # the 23 handle bytes alone, through BlockHandle
            payload = pick.handle.data
        elif target == "handle":
            payload = pickle.dumps(pick)
        else:  # "array", "field": a view's pickle, anywhere or in its handle bytes
            payload = pickle.dumps(view if edits[0][1] % 2 else pick)
        heap_id = struct.pack("<i", h.id)
        lo = payload.find(pick.handle.data)
        if target == "field":
            tampered = _tamper(payload, edits, lo + 4, lo + 23)  # all but the heap id
            tampered = _tamper(tampered, edits[:1], lo, lo + 23) if isolated else tampered
        else:
            tampered = _tamper(payload, edits)
            if not isolated and lo >= 0:  # never name another heap on this machine
                tampered = tampered[:lo] + heap_id + tampered[lo + 4 :]
        try:
            if target == "raw":
                obj: Any = BlockHandle(tampered).open()
            else:
                obj = pickle.loads(tampered)
        except Exception as exc:  # a damaged pickle may fail in pickle itself
            return f"loads: {type(exc).__name__}"
        if isinstance(obj, heap_mod.Block):
            try:
                buf = obj.buf
            except OPEN_ERRORS as exc:
                return f"buf: {type(exc).__name__}: {exc}"
            start = _addr(buf)
            assert _inside(start, start + len(buf), extents), f"{obj!r} reaches outside live blocks"
            buf[:] = bytes(len(buf))  # writing all of it must be harmless
            return f"block {obj!r}"
        if isinstance(obj, sharedobj.SharedArray) and obj._block is not None:
            ptr = obj.__array_interface__["data"][0]
            a_lo, a_hi = sharedobj.arrays._extent(obj)
            assert not obj.dtype.hasobject
            assert _inside(ptr + a_lo, ptr + a_hi, extents), "array reaches outside live blocks"
            if obj.flags.writeable:
                obj[...] = 0
            return f"array {obj.shape} {obj.dtype}"
        return f"other: {type(obj).__name__}"
    finally:
        if not isolated:
            with contextlib.suppress(Exception):
                h.destroy()


EDITS = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 511)), min_size=1, max_size=4)


@fuzz_settings(120)
@given(
    st.lists(st.sampled_from([16, 100, 2000, 32768, 40_000, 300_000]), min_size=2, max_size=6),
    EDITS,
    st.sampled_from(["array", "handle", "field", "raw"]),
)
def test_tampered_handles_and_array_pickles(
    sizes: list[int], edits: list[tuple[int, int]], target: str
) -> None:
    CASES[f"tampered pickle ({target})"] += 1
    in_child(lambda isolated: handle_case(sizes, edits, target, isolated))


def test_tampered_array_dtype_object_is_refused() -> None:
    """A pickle whose dtype was changed to object must not read pointers from shared memory."""

    def case(isolated: bool) -> str:
        h = Heap.create(1 << 20)
        try:
            arr = sharedobj.arrays.new_array(h, 4, np.float64)
            arr[:] = 1e300
            fn, args = arr.__reduce__()
            with pytest.raises(TypeError, match="Python objects"):
                fn(*args[:4], np.dtype(object), args[5])
            with pytest.raises(TypeError, match="Python objects"):
                fn(*args[:4], np.dtype([("a", "O"), ("b", "f8")]), args[5])
            return "refused"
        finally:
            if not isolated:
                h.destroy()

    CASES["object dtype pickle"] += 1
    in_child(case)


@fuzz_settings(60)
@given(st.one_of(st.binary(max_size=40), st.text(max_size=30), st.integers(), st.none()))
def test_block_handle_constructor(data: Any) -> None:
    CASES["BlockHandle(data)"] += 1
    try:
        handle = BlockHandle(data)
    except (ValueError, TypeError):
        return
    assert isinstance(data, bytes) and len(data) == 23
    try:
        heap_mod._unpack(handle.data)
        block = handle.open()
    except (ValueError, TypeError):
        return
    assert isinstance(block, heap_mod.Block)  # not opened: attaching happens on first use


# --------------------------------------------------------------------------
# arguments of the public API

ANY_NAME = st.one_of(
    st.text(st.characters(codec=None), max_size=40),  # surrogates, NUL, everything
    st.text(max_size=5).map(lambda t: "x" * 250 + t),  # around the 255-byte limit
    st.integers(100, 100_000).map(lambda n: "n" * n),
    st.none(),
    st.integers(),
    st.binary(max_size=10),
    st.floats(),
    st.lists(st.integers(), max_size=2),
)
ANY_SIZE = st.one_of(
    st.integers(-(2**70), 1 << 20),
    st.sampled_from([0, 1, 4095, 4096, 32768, 32769, 1 << 21, 2**62, 2**63, 2**64, 2**200]),
    st.booleans(),
    st.floats(allow_nan=True),
    st.none(),
    st.text(max_size=3),
    st.just(np.int64(64)),
)
API_ERRORS = (TypeError, ValueError, OverflowError, OSError, MemoryError)


@pytest.fixture(scope="module")
def not_a_heap() -> Iterator[int]:
    """A segment that is not a heap, for names and ids that point at one."""
    from sharedobj import segment

    seg = segment.create(1 << 20, auto_remove=False)
    try:
        yield seg.shmid
    finally:
        seg.remove()
        seg.close()


@pytest.fixture(scope="module")
def manager() -> Iterator[SharedMemoryManager]:
    smm = SharedMemoryManager()
    smm.start()
    try:
        yield smm
    finally:
        smm.shutdown()


def _managed_names(manager: SharedMemoryManager, not_a_heap: int) -> st.SearchStrategy[str]:
    """Names in a manager's format, naming only ids this test owns (or none at all)."""
    assert manager._heap is not None
    ids = st.sampled_from([manager._heap.id, not_a_heap, 2**31 + 5, 10**30])
    return st.builds(lambda i, x: f"so{i}_{x:x}", ids, st.integers(0, 2**40))


def test_shared_memory_arguments(manager: SharedMemoryManager, not_a_heap: int) -> None:
    names = st.one_of(ANY_NAME, _managed_names(manager, not_a_heap))
    creates = st.one_of(st.booleans(), st.none(), st.integers(-1, 2), st.text(max_size=1))

    @fuzz_settings(150)
    @given(names, creates, ANY_SIZE)
    def run(name: Any, create: Any, size: Any) -> None:
        CASES["SharedMemory(name, create, size)"] += 1
        try:
            shm = SharedMemory(name=name, create=create, size=size)
        except API_ERRORS as exc:
            assert str(exc), f"{type(exc).__name__} without a message"
            return
        try:
            assert isinstance(shm.buf, memoryview)
            if create:
                assert len(shm.buf) == size and not any(shm.buf[:4096])
        finally:
            shm.close()
            if create:
                shm.unlink()

    run()


ITEMS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(st.characters(codec=None), max_size=20),
    st.binary(max_size=20).map(lambda b: b.rstrip(b"\0")),
    st.none(),
    st.booleans(),
    st.just(object()),
    st.just(1j),
    st.lists(st.integers(), max_size=2),
)


@fuzz_settings(100)
@given(
    st.one_of(st.lists(ITEMS, max_size=8), st.none(), st.integers(), st.text(max_size=3)),
    st.one_of(st.none(), ANY_NAME),
)
def test_shareable_list_arguments(sequence: Any, name: Any) -> None:
    CASES["ShareableList(sequence, name)"] += 1
    try:
        sl = ShareableList(sequence, name=name)
    except API_ERRORS as exc:
        assert str(exc)
        return
    try:
        assert list(sl) == list(sequence or ())  # the stdlib's `sequence or ()` too
    finally:
        sl.shm.close()
        with contextlib.suppress(FileNotFoundError):
            sl.shm.unlink()


@fuzz_settings(40)
@given(
    st.one_of(st.none(), st.integers(-5, 1 << 22), st.sampled_from([2**62, 2**64]), st.floats()),
    st.one_of(st.none(), st.integers(-5, 1 << 21), st.sampled_from([0, 4096, 2**64]), st.text()),
    st.one_of(st.integers(-1, 0o7777), st.sampled_from([0o600, 0, 0o777, 2**40]), st.text()),
)
def test_manager_arguments(size: Any, max_segment_size: Any, mode: Any) -> None:
    CASES["SharedMemoryManager(size, max_segment_size, mode)"] += 1
    try:
        smm = SharedMemoryManager(size=size, max_segment_size=max_segment_size, mode=mode)
        smm.start()
    except API_ERRORS as exc:
        assert str(exc)
        return
    try:
        shm = smm.SharedMemory(100)
        assert len(shm.buf) == 100
        assert smm._heap is not None and smm._heap.check() == []
    finally:
        smm.shutdown()


@fuzz_settings(60)
@given(
    ANY_SIZE,
    st.one_of(st.none(), ANY_SIZE),
    st.one_of(st.none(), ANY_SIZE),
    st.one_of(st.integers(-1, 0o17777), st.text(max_size=2)),
    st.one_of(st.none(), ANY_SIZE),
    st.booleans(),
)
def test_heap_create_arguments(
    size: Any, max_size: Any, max_segment_size: Any, mode: Any, huge: Any, noreserve: bool
) -> None:
    CASES["Heap.create(...)"] += 1
    if type(size) is int and size > 1 << 20:  # a big first arena costs RAM: it is no news
        size = 1 << 20
    try:
        h = Heap.create(
            size,
            max_size=max_size,
            max_segment_size=max_segment_size,
            mode=mode,
            huge_threshold=huge,
            noreserve=noreserve,
        )
    except API_ERRORS as exc:
        assert str(exc)
        return
    try:
        h.free(h.alloc(100))
        assert h.check() == []
    finally:
        h.destroy()


def test_heap_attach_arguments(manager: SharedMemoryManager, not_a_heap: int) -> None:
    assert manager._heap is not None
    own = manager._heap.id

    @fuzz_settings(40)
    @given(
        st.one_of(
            st.sampled_from([own, not_a_heap, -1, 2**31, 2**32 + own, 2**64, 10**30]),
            st.none(),
            st.text(max_size=3),
            st.floats(),
            st.booleans(),
        )
    )
    def run(heap_id: Any) -> None:
        CASES["Heap.attach(id)"] += 1
        try:
            h = Heap.attach(heap_id)
        except (*API_ERRORS, CorruptHeapError) as exc:
            assert str(exc)
            return
        assert h.id == own

    run()


def test_alloc_and_free_arguments() -> None:
    h = Heap.create(1 << 20, max_size=64 << 20)
    other = Heap.create(1 << 20)
    try:

        @fuzz_settings(150)
        @given(ANY_SIZE, st.booleans())
        def run(nbytes: Any, zeroed: bool) -> None:
            CASES["Heap.alloc/alloc_zeroed(n)"] += 1
            try:
                b = h.alloc_zeroed(nbytes) if zeroed else h.alloc(nbytes)
            except (TypeError, ValueError, MemoryError) as exc:
                assert str(exc)
                return
            assert type(nbytes) is int and len(b.buf) == nbytes
            h.free(b)
            with pytest.raises(StaleHandleError):
                h.free(b)  # double free
            with pytest.raises(StaleHandleError):
                h.free(pickle.loads(pickle.dumps(b)))  # double free through a handle

        run()
        foreign = other.alloc(64)
        for bad in (None, 64, foreign.handle, "block", foreign):
            CASES["Heap.free(x)"] += 1
            with pytest.raises((TypeError, ValueError)):
                h.free(bad)  # type: ignore[arg-type]
        assert h.check() == [] and other.check() == []
    finally:
        h.destroy()
        other.destroy()


SHAPES = st.one_of(
    st.integers(-3, 40),
    st.lists(st.integers(-2, 12), max_size=4),
    st.lists(st.integers(0, 12), max_size=4).map(tuple),
    st.sampled_from([(2**40, 2**40), (2**62,), (2**63,), (1 << 40,), (True, 2), (2.0,), "3"]),
    st.none(),
    st.floats(),
    st.just(np.int32(3)),
)
DTYPES = st.sampled_from(
    [
        float,
        int,
        bool,
        complex,
        "f4",
        ">i2",
        "u1",
        "U5",
        "S3",
        "V8",
        "V0",
        "S0",
        "datetime64[s]",
        [("a", "i4"), ("b", "f8")],
        object,
        "O",
        [("a", "O")],
        "nope",
        123,
        None,
        np.dtype("f8,i4"),
    ]
)
ORDERS = st.sampled_from(["C", "F", "A", "K", "x", None, 1])


def _numpy_would(shape: Any, dtype: Any, order: Any, func: str) -> np.ndarray | None:
    """numpy's own function with the same arguments, if it accepts them and the result is small."""
    try:
        dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if any(isinstance(d, int) and d > 10**6 for d in dims):
            return None
        if func == "full":
            return np.full(shape, 7, dtype=dtype, order=order)
        return np.zeros(shape, dtype=dtype, order=order)
    except Exception:
        return None


@fuzz_settings(150)
@given(SHAPES, DTYPES, ORDERS, st.sampled_from(["ndarray", "zeros", "empty", "full"]))
def test_array_constructors(shape: Any, dtype: Any, order: Any, func: str) -> None:
    CASES[f"sharedobj.{func}(shape, dtype, order)"] += 1
    with contextlib.suppress(Exception):  # full() writes every byte: keep it in RAM
        dims = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        if func == "full" and np.prod(dims, dtype=object) * np.dtype(dtype).itemsize > 1 << 26:
            return
    try:
        if func == "full":
            arr = sharedobj.full(shape, 7, dtype=dtype, order=order)
        else:
            arr = getattr(sharedobj, func)(shape, dtype, order)
    except (TypeError, ValueError, OverflowError, MemoryError) as exc:
        assert str(exc)
        return
    try:
        ref = _numpy_would(shape, dtype, order, func)
        assert not arr.dtype.hasobject, "an object array in shared memory"
        assert arr.block is not None
        if ref is not None:
            assert arr.shape == ref.shape and arr.dtype == ref.dtype
        if func in ("ndarray", "zeros"):  # first and last page (a huge one stays untouched)
            raw = np.frombuffer(arr.block.buf, np.uint8)
            assert not raw[:4096].any() and not raw[-4096:].any()
    finally:
        arr.free()


ARRAY_LIKES = st.one_of(
    st.lists(st.integers(-(2**70), 2**70), max_size=5),
    st.lists(st.floats(), max_size=5),
    st.lists(st.lists(st.integers(0, 9), min_size=2, max_size=2), max_size=4),
    st.lists(st.integers(0, 5), max_size=3).map(lambda v: [v, [1]]),  # ragged
    st.text(max_size=5),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.none(),
    st.just(np.array([object(), 1], dtype=object)),
    st.just(np.arange(6.0).reshape(2, 3).T),
)


@fuzz_settings(100)
@given(ARRAY_LIKES, st.sampled_from([None, float, "i1", object, "U2", "nope"]))
def test_asarray(value: Any, dtype: Any) -> None:
    CASES["sharedobj.asarray(value, dtype)"] += 1
    try:
        arr = sharedobj.asarray(value, dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        assert str(exc)
        return
    try:
        assert not arr.dtype.hasobject
        with np.errstate(all="ignore"):
            np.testing.assert_array_equal(arr, np.asarray(value, dtype=dtype))
    finally:
        arr.free()


# --------------------------------------------------------------------------
# the command line

CLI_WORDS = st.sampled_from(
    ["ls", "stat", "check", "info", "clean", "--json", "--all", "--dry-run", "--idle", "-h", "--x"]
)
CLI_ARGS = st.lists(
    st.one_of(CLI_WORDS, st.integers(-5, 10**12).map(str), st.text(max_size=6)), max_size=4
)


def cli_case(argvs: list[list[str]], isolated: bool) -> str:
    import io

    from sharedobj import cli

    h = Heap.create(1 << 20)
    out = []
    try:
        for argv in argvs:
            if "demo" in argv or "bench" in argv:
                continue
            if "clean" in argv and not isolated:
                argv = [*argv, "--dry-run"]  # never remove another test's segments
            if not isolated:  # only ids this test owns
                argv = [a if not a.lstrip("-").isdigit() else str(h.id) for a in argv]
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    code = cli.main(argv)
                except SystemExit as exc:
                    code = exc.code
            err = stderr.getvalue()
            assert "Traceback" not in err, f"{argv}: {err}"
            assert code in (0, 1, 2), f"{argv}: exit {code!r}"
            if code == 2:
                assert "usage:" in err, f"{argv}: {err}"
            out.append(f"{argv}: {code}")
        return "\n".join(out)
    finally:
        if not isolated:
            h.destroy()


@fuzz_settings(30)
@given(st.lists(CLI_ARGS, min_size=1, max_size=5))
def test_cli_arguments(argvs: list[list[str]]) -> None:
    CASES["python -m sharedobj ARGS"] += len(argvs)
    in_child(lambda isolated: cli_case(argvs, isolated), timeout=60)


@pytest.mark.parametrize("argv", [["stat"], ["check", "x"], ["nope"], ["stat", "1", "2"], []])
def test_cli_usage_errors_exit_2(argv: list[str]) -> None:
    CASES["python -m sharedobj (subprocess)"] += 1
    proc = subprocess.run(
        [sys.executable, "-m", "sharedobj", *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------
# atheris (coverage-guided), optional


def atheris_main(argv: list[str]) -> None:  # pragma: no cover - run as a script
    """Coverage-guided fuzzing of handle bytes and array pickles (``python tests/test_fuzz.py``)."""
    import atheris

    isolated = _new_ipc_namespace()
    h = Heap.create(2 << 20, huge_threshold=256 * 1024)
    blocks = [h.alloc(n) for n in (16, 100, 2000, 40_000, 300_000)]
    arr = sharedobj.arrays.new_array(h, (6, 4), np.float64)
    blocks.append(arr.block)
    extents = [(_addr(b.buf), _addr(b.buf) + b.size) for b in blocks]
    extents += [_extent(b) for b in blocks[:-1]]
    base_pickle = pickle.dumps(arr[::2, 1:])
    heap_id = struct.pack("<i", h.id)

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        if fdp.ConsumeBool():
            raw = fdp.ConsumeBytes(23)
            if not isolated:
                raw = heap_id + raw[4:]
            try:
                obj: Any = BlockHandle(raw).open()
            except (ValueError, TypeError):
                return
        else:
            payload = bytearray(base_pickle)
            for _ in range(fdp.ConsumeIntInRange(1, 4)):
                payload[fdp.ConsumeIntInRange(0, len(payload) - 1)] = fdp.ConsumeIntInRange(0, 255)
            try:
                obj = pickle.loads(bytes(payload))
            except Exception:
                return
        if isinstance(obj, heap_mod.Block):
            try:
                buf = obj.buf
            except OPEN_ERRORS:
                return
            start = _addr(buf)
            if not _inside(start, start + len(buf), extents):
                raise AssertionError(f"{obj!r} reaches outside live blocks")
        elif isinstance(obj, sharedobj.SharedArray) and obj._block is not None:
            ptr = obj.__array_interface__["data"][0]
            lo, hi = sharedobj.arrays._extent(obj)
            if obj.dtype.hasobject or not _inside(ptr + lo, ptr + hi, extents):
                raise AssertionError("array reaches outside live blocks")

    atheris.Setup(argv, one_input)
    try:
        atheris.Fuzz()
    finally:
        if not isolated:
            h.destroy()


def test_atheris_harness() -> None:
    pytest.importorskip("atheris")
    runs = 2000 * SCALE
    CASES["atheris (handles, array pickles)"] += runs
    proc = subprocess.run(
        [sys.executable, __file__, f"-runs={runs}", "-max_len=256"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(__file__),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Done {runs} runs" in proc.stderr, proc.stderr[-3000:]


if __name__ == "__main__":  # pragma: no cover
    atheris_main(sys.argv)
