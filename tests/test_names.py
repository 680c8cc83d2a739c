"""The name directory behind SharedMemory(name=...): lifetime rules across processes."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator

import pytest

from conftest import remove_default_heap
from sharedobj import SharedMemory, StaleHandleError, shared_memory
from sharedobj.limits import list_segments


@pytest.fixture
def default_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A default heap of this test's own (another key), gone at the end."""
    key = 0x6000_0000 | secrets.randbelow(0x0FFF_FFFF)
    monkeypatch.setenv("SHAREDOBJ_DEFAULT_KEY", str(key))
    saved = shared_memory._default
    shared_memory._default = None
    try:
        yield key
    finally:
        heap = shared_memory._default
        shared_memory._default = saved
        if heap is not None and not heap.closed:
            heap.destroy()
        remove_default_heap(key)


def _key_exists(key: int) -> bool:
    return any(s.key == key for s in list_segments())


def _run(code: str, *, wait: bool = True) -> subprocess.Popen[str] | str:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if not wait:
        return proc
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip()


def _name() -> str:
    return f"t{os.getpid()}_{secrets.token_hex(4)}"


def test_unlinked_block_lives_until_the_last_close(default_key: int) -> None:
    name = _name()
    a = SharedMemory(name, create=True, size=1000)
    b = SharedMemory(name)
    heap = shared_memory.default_heap()
    assert heap is not None
    a.buf[:3] = b"abc"
    a.unlink()
    with pytest.raises(FileNotFoundError):
        SharedMemory(name)
    a.close()
    assert bytes(b.buf[:3]) == b"abc"  # still open here: not freed
    live = heap.stats()["live_blocks"]
    b.close()
    assert heap.stats()["live_blocks"] == live - 1  # the last close freed it


def test_name_can_be_reused_after_unlink(default_key: int) -> None:
    name = _name()
    a = SharedMemory(name, create=True, size=10)
    a.buf[0] = 1
    a.unlink()
    b = SharedMemory(name, create=True, size=20)  # same name, a new block
    assert b.size == 20 and b.buf[0] == 0
    assert a.buf[0] == 1  # the old one is still ours until closed
    a.close()
    assert SharedMemory(name).size == 20
    b.close()
    b.unlink()


def test_opened_in_another_process_survives_unlink_and_creator_exit(default_key: int) -> None:
    name = _name()
    a = SharedMemory(name, create=True, size=64, track=False)
    a.buf[:4] = b"data"
    reader = _run(
        f"""
        import sys, time
        from sharedobj import SharedMemory
        s = SharedMemory({name!r})
        print("opened", flush=True)
        time.sleep(1.0)
        print(bytes(s.buf[:4]).decode(), flush=True)
        s.close()
        """,
        wait=False,
    )
    assert isinstance(reader, subprocess.Popen)
    assert reader.stdout is not None and reader.stdout.readline().strip() == "opened"
    a.unlink()
    a.close()  # the creator is done; the reader still has it
    out, err = reader.communicate(timeout=60)
    assert out.strip() == "data", err


def test_untracked_name_outlives_its_creator(default_key: int) -> None:
    name = _name()
    _run(
        f"""
        from sharedobj import SharedMemory
        s = SharedMemory({name!r}, create=True, size=8, track=False)
        s.buf[:2] = b"ok"
        s.close()
        """
    )
    s = SharedMemory(name)
    assert bytes(s.buf[:2]) == b"ok"
    s.close()
    s.unlink()


def test_tracked_name_goes_with_its_creator(default_key: int) -> None:
    name = _name()
    keeper = SharedMemory(_name(), create=True, size=8, track=False)  # keeps the heap alive
    try:
        _run(
            f"""
            from sharedobj import SharedMemory
            s = SharedMemory({name!r}, create=True, size=8)   # track=True, the default
            s.close()
            """
        )
        with pytest.raises(FileNotFoundError):
            SharedMemory(name)
    finally:
        keeper.close()
        keeper.unlink()


def test_tracked_name_stays_while_another_process_has_it_open(default_key: int) -> None:
    name = _name()
    keeper = SharedMemory(_name(), create=True, size=8, track=False)
    try:
        creator = _run(
            f"""
            import time
            from sharedobj import SharedMemory
            s = SharedMemory({name!r}, create=True, size=8)
            s.buf[:3] = b"abc"
            print("made", flush=True)
            time.sleep(600)
            """,
            wait=False,
        )
        assert isinstance(creator, subprocess.Popen) and creator.stdout is not None
        assert creator.stdout.readline().strip() == "made"
        mine = SharedMemory(name)
        creator.kill()  # SIGKILL: no atexit, no close
        creator.wait()
        heap = shared_memory.default_heap()
        assert heap is not None
        heap.recover()  # notices the dead creator: its tracked name is unlinked
        with pytest.raises(FileNotFoundError):
            SharedMemory(name)
        assert bytes(mine.buf[:3]) == b"abc"  # but not freed while open here
        mine.close()
    finally:
        keeper.close()
        keeper.unlink()


def test_killed_opener_does_not_pin_the_block(default_key: int) -> None:
    name = _name()
    s = SharedMemory(name, create=True, size=100_000, track=False)
    opener = _run(
        f"""
        import time
        from sharedobj import SharedMemory
        s = SharedMemory({name!r})
        print("open", flush=True)
        time.sleep(600)
        """,
        wait=False,
    )
    assert isinstance(opener, subprocess.Popen) and opener.stdout is not None
    assert opener.stdout.readline().strip() == "open"
    os.kill(opener.pid, signal.SIGKILL)
    opener.wait()
    heap = shared_memory.default_heap()
    assert heap is not None
    block = s._block
    assert block is not None
    s.unlink()
    s.close()  # the dead opener still counts until reclaimed
    heap.recover()
    with pytest.raises(StaleHandleError):
        heap._validate(block)  # freed once the dead process's open was dropped
    assert heap.check() == []


def test_names_listing_and_errors(default_key: int) -> None:
    names = [_name() for _ in range(3)]
    objs = [SharedMemory(n, create=True, size=16) for n in names]
    heap = shared_memory.default_heap()
    assert heap is not None
    assert set(names) <= set(heap.names.names())
    with pytest.raises(OSError, match="longer than 255"):
        SharedMemory("x" * 256, create=True, size=1)
    with pytest.raises(ValueError, match="empty"):
        SharedMemory("", create=True, size=1)
    with pytest.raises(TypeError):
        SharedMemory(42, create=True, size=1)  # type: ignore[arg-type]
    for o in objs:
        o.close()
        o.unlink()


def test_many_names_grow_the_table(default_key: int) -> None:
    from sharedobj.names import MIN_CAP

    objs = [SharedMemory(create=True, size=8) for _ in range(MIN_CAP + 50)]
    for i, o in enumerate(objs):
        o.buf[:4] = i.to_bytes(4, "little")
    for i, o in enumerate(objs):
        again = SharedMemory(o.name)
        assert int.from_bytes(again.buf[:4], "little") == i
        again.close()
    heap = shared_memory.default_heap()
    assert heap is not None and heap.check() == []
    table = heap.names._table
    assert table is not None and table.cap > MIN_CAP  # it grew
    for o in objs:
        o.close()
        o.unlink()
    assert heap.names.count() == 0 and heap.check() == []


def test_default_heap_goes_with_the_last_process(default_key: int) -> None:
    name = _name()
    _run(
        f"""
        from sharedobj import SharedMemory
        a = SharedMemory({name!r}, create=True, size=64, track=False)
        b = SharedMemory(create=True, size=64)
        b.close(); b.unlink()
        """
    )
    assert _key_exists(default_key)  # a name is left: the heap stays for later processes
    _run(
        f"""
        from sharedobj import SharedMemory
        s = SharedMemory({name!r}); s.close(); s.unlink()
        """
    )
    assert not _key_exists(default_key)  # its last user left with no name in it


def test_manager_names_route_to_their_heap(default_key: int) -> None:
    from sharedobj import SharedMemoryManager

    with SharedMemoryManager() as smm:
        s = smm.SharedMemory(32)
        assert s.name.startswith(f"so{smm.heap.id}_")
        s.buf[:2] = b"hi"
        out = _run(
            f"from sharedobj import SharedMemory; print(bytes(SharedMemory({s.name!r}).buf[:2]).decode())"
        )
        assert out == "hi"
        assert not _key_exists(default_key)  # the default heap was never involved
    with pytest.raises(FileNotFoundError):
        SharedMemory(s.name)


def test_many_unlinks_then_close_flush_the_freed_blocks_in_batches() -> None:
    # unlink frees small blocks while holding the heap lock, where the magazine
    # cannot be flushed; they are flushed after, and close() flushes in bounded
    # batches (it once tried one operation for all of them and overflowed the undo log)
    from sharedobj import Heap
    from sharedobj.allocator.classes import CLASS_BY_GRANULE
    from sharedobj.allocator.core import MAG_LIMIT

    heap = Heap.create(16 << 20)
    try:
        names = heap.names
        for i in range(5000):
            data = f"n{i}".encode()
            h = zlib.crc32(data)
            names.create(data, h, heap.alloc(64), tracked=False)
            names.unlink(data, h)
        cls = CLASS_BY_GRANULE[(64 + 15) >> 4]
        assert len(heap._a().mags[cls]) <= MAG_LIMIT[cls]
        assert heap.check() == []
    finally:
        heap.destroy()  # closes: flushes what this process still caches


def test_a_tombstone_on_the_chain_neither_hides_a_live_name_nor_is_wasted(
    default_key: int,
) -> None:
    """Names that collide share a probe chain; a create walks past tombstones to find dups."""
    from sharedobj.names import EMPTY, ENTRY, HEADER, LIVE, TOMB

    heap = shared_memory.default_heap()
    assert heap is not None
    d = heap.names
    keep = SharedMemory(create=True, size=8)  # makes the table
    try:
        table = d._table
        assert table is not None
        mask = table.cap - 1
        start = next(
            s
            for s in range(table.cap)
            if all(table.w((s + i) & mask, 0) == EMPTY for i in range(3))
        )
        h = start  # every name below hashes to ``start``: one chain

        def make(data: bytes) -> tuple[bytes, int, tuple[int, int, int], int]:
            return d.create(data, h, heap.alloc(8), tracked=False)

        a, b = make(b"collide-a"), make(b"collide-b")
        assert (a[3], b[3]) == (start, (start + 1) & mask)
        d.close(a)
        d.unlink(b"collide-a", h, a)  # slot ``start`` becomes a tombstone: b follows it
        assert table.w(start, 0) == TOMB
        with pytest.raises(FileExistsError):
            make(b"collide-b")  # found past the tombstone
        c = make(b"collide-c")
        assert c[3] == start  # the tombstone is reused
        assert table.w(start, 0) == LIVE
        for t, data in ((b, b"collide-b"), (c, b"collide-c")):
            d.close(t)
            d.unlink(data, h, t)
        assert table.w(start, 0) == EMPTY  # the chain is gone, not left as tombstones
        assert HEADER + table.cap * ENTRY <= len(table.buf)
        assert heap.check() == []
    finally:
        keep.close()
        keep.unlink()


def test_a_default_heap_of_another_layout_is_refused_at_once(default_key: int) -> None:
    """An older sharedobj's default heap: a clear error naming it, not a wait and a riddle."""
    from sharedobj.allocator.layout import H_VERSION, LAYOUT_VERSION

    keep = SharedMemory(create=True, size=8, track=False)
    heap = shared_memory.default_heap()
    assert heap is not None
    words = heap._a().root32
    try:
        words[H_VERSION] = LAYOUT_VERSION - 1  # as an older sharedobj would have made it
        out = _run(
            """
            import time
            from sharedobj import SharedMemory
            t = time.monotonic()
            try:
                SharedMemory(create=True, size=8)
            except Exception as exc:
                print(type(exc).__name__, round(time.monotonic() - t, 1), exc)
            """
        )
        assert isinstance(out, str)
        kind, seconds, message = out.split(" ", 2)
        assert kind == "CorruptHeapError" and float(seconds) < 2.0
        assert f"layout version {LAYOUT_VERSION - 1}" in message and str(heap.id) in message
    finally:
        words[H_VERSION] = LAYOUT_VERSION
        keep.close()
        keep.unlink()
