"""SharedMemoryManager: lifecycle, children of every start method, Pool, a killed owner.

Managed names carry their heap's id, so none of this touches the default heap.
Every manager a test starts is shut down in a finally, and the tests that
check freeing look the heap's segments up in /proc/sysvipc/shm by shmid.
Where it makes sense the same scenario also runs on the stdlib's
``multiprocessing.managers.SharedMemoryManager`` and must observe the same.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import managers as std_managers
from multiprocessing import shared_memory as std_shm
from typing import Any

import pytest

import sharedobj
from sharedobj import SharedMemoryManager

METHODS = ["fork", "spawn", "forkserver"]
ManagerClass = Callable[..., Any]
MANAGERS: dict[str, ManagerClass] = {
    "stdlib": std_managers.SharedMemoryManager,
    "ours": SharedMemoryManager,
}


def _shareable_list_available() -> bool:
    try:
        import sharedobj.shareable_list  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


needs_shareable_list = pytest.mark.skipif(
    not _shareable_list_available(), reason="sharedobj.shareable_list is not written yet"
)


def live_shmids() -> set[int]:
    with open("/proc/sysvipc/shm") as f:
        return {int(line.split()[1]) for line in f.readlines()[1:] if line.strip()}


def heap_shmids(manager: SharedMemoryManager) -> set[int]:
    heap = manager.heap
    ids = {heap.id}
    for _index, _kind, seg_ids, _size in heap._a().arena_ids():
        ids.update(seg_ids)
    return ids


def wait_gone(ids: set[int], timeout: float = 10.0) -> set[int]:
    """The ids still listed after waiting up to ``timeout`` seconds for them to go."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()  # views in reference cycles hold their mapping until collected
        left = ids & live_shmids()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.fixture
def smm() -> Iterator[SharedMemoryManager]:
    manager = SharedMemoryManager()
    manager.start()
    ids = heap_shmids(manager)
    try:
        yield manager
    finally:
        manager.shutdown()
        assert not wait_gone(ids), "the manager's segments outlived shutdown"


# ---------------------------------------------------------------------------
# children (module level, so spawn and forkserver children can import them)


def _child_uses_manager(
    manager: Any, shm: Any, sl: Any, name: str, n: int, make_list: bool
) -> list[str]:
    """Write into objects received, open one by name, and make new ones through the manager."""
    shm.buf[0] = shm.buf[0] + 1
    by_name = type(shm)(name)
    by_name.buf[1] = 7
    by_name.close()
    if sl is not None:
        sl[0] = sl[0] + 1
        sl[1] = "child"
    made = []
    for i in range(n):
        new = manager.SharedMemory(32 + i)
        new.buf[:3] = bytes([i, i + 1, i + 2])
        made.append(new.name)
        new.close()
    if sl is not None and make_list:
        extra = manager.ShareableList([n, "from child"])
        made.append(extra.shm.name)
        extra.shm.close()
    shm.close()
    return made


def _child_entry(
    queue: Any, manager: Any, shm: Any, sl: Any, name: str, n: int, make_list: bool = False
) -> None:
    try:
        queue.put(("ok", _child_uses_manager(manager, shm, sl, name, n, make_list)))
    except BaseException as exc:
        queue.put(("error", repr(exc)))


def _pool_job(args: tuple[Any, Any, str, int]) -> Any:
    manager, shm, name, i = args
    shm.buf[i] = i + 1
    opened = type(shm)(name)
    opened.buf[8 + i] = 100 + i
    opened.close()
    fresh = manager.SharedMemory(16 + i)
    fresh.buf[:2] = bytes([i, 255 - i])
    return fresh


def _stdlib_child(shm: Any, sl: Any) -> None:
    shm.buf[0] = shm.buf[0] + 1
    sl[0] = sl[0] + 1
    sl[1] = "child"
    shm.close()
    sl.shm.close()


# ---------------------------------------------------------------------------
# lifecycle


def test_start_shutdown_frees_every_segment() -> None:
    manager = SharedMemoryManager()
    assert "not started" in repr(manager)
    manager.start()
    try:
        blocks = [manager.SharedMemory(size) for size in (1, 4096, 100_000, 3 << 20)]
        for block in blocks:
            block.buf[-1] = 1
        ids = heap_shmids(manager)
        assert ids <= live_shmids()
        assert f"heap={manager.heap.id}" in repr(manager)
    finally:
        manager.shutdown()
    assert "shut down" in repr(manager)
    # shutdown() removed the segments; our own views keep them mapped until dropped
    assert blocks[0].buf[-1] == 1
    for block in blocks:
        block.close()
    del blocks, block
    assert not wait_gone(ids)


def test_context_manager_frees_at_exit() -> None:
    with SharedMemoryManager() as manager:
        shm = manager.SharedMemory(64)
        shm.buf[:2] = b"ok"
        ids = heap_shmids(manager)
        name = shm.name
        assert name.startswith(f"so{manager.heap.id}_")
        again = sharedobj.SharedMemory(name)
        assert bytes(again.buf[:2]) == b"ok"
        again.close()
        shm.close()
    del shm, again  # see test_closed_object_does_not_pin_the_heap for why
    assert not wait_gone(ids)
    with pytest.raises(FileNotFoundError):
        sharedobj.SharedMemory(name)


def test_closed_object_does_not_pin_the_heap() -> None:
    manager = SharedMemoryManager()
    manager.start()
    shm = manager.SharedMemory(64)
    ids = heap_shmids(manager)
    shm.close()
    manager.shutdown()
    pinned = wait_gone(ids, timeout=2)
    del shm
    assert not wait_gone(ids), "dropping the closed object must unpin it"
    assert not pinned


def test_context_manager_on_a_started_manager_and_on_error() -> None:
    manager = SharedMemoryManager()
    manager.start()
    ids = heap_shmids(manager)
    with pytest.raises(KeyError), manager as same:
        assert same is manager
        raise KeyError("boom")
    assert not wait_gone(ids)


def test_double_start_is_an_error(smm: SharedMemoryManager) -> None:
    with pytest.raises(RuntimeError, match="already started"):
        smm.start()
    # the stdlib also refuses, with a ProcessError
    std = std_managers.SharedMemoryManager()
    std.start()
    try:
        with pytest.raises(mp.ProcessError):
            std.start()
    finally:
        std.shutdown()


def test_use_after_shutdown_is_a_clear_error() -> None:
    manager = SharedMemoryManager()
    manager.start()
    manager.shutdown()
    with pytest.raises(RuntimeError, match="not started"):
        manager.SharedMemory(10)
    with pytest.raises(RuntimeError, match="not started"):
        manager.ShareableList([1])
    with pytest.raises(RuntimeError, match="shut down"):
        manager.start()
    manager.shutdown()  # twice is fine
    with pytest.raises(RuntimeError, match="not started"):
        SharedMemoryManager().SharedMemory(10)


def test_bad_sizes(smm: SharedMemoryManager) -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError):
            smm.SharedMemory(bad)
    with pytest.raises(TypeError):
        smm.SharedMemory(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SharedMemoryManager(size=0)


def test_objects_zero_filled_and_sized(smm: SharedMemoryManager) -> None:
    for size in (1, 4095, 4096, 4097, (1 << 20) + 1, 3 << 20):
        shm = smm.SharedMemory(size)
        assert (shm.size, len(shm.buf)) == (size, size)
        assert bytes(shm.buf) == bytes(size)
        shm.buf[:] = b"\xff" * size  # dirty it: a later block reusing it must be zeroed
        shm.close()


@needs_shareable_list
def test_shareable_list(smm: SharedMemoryManager) -> None:
    sl = smm.ShareableList([1, 2.5, "text", b"bytes", None, True])
    assert list(sl) == [1, 2.5, "text", b"bytes", None, True]
    sl[0] = 42
    copy = pickle.loads(pickle.dumps(sl))
    assert copy[0] == 42
    assert copy.shm.name == sl.shm.name
    assert sl.shm.name.startswith(f"so{smm.heap.id}_")
    empty = smm.ShareableList([])
    assert len(empty) == 0
    copy.shm.close()
    sl.shm.close()
    empty.shm.close()


# ---------------------------------------------------------------------------
# children of every start method


@pytest.mark.parametrize("method", METHODS)
def test_children_use_the_manager(smm: SharedMemoryManager, method: str) -> None:
    ctx = mp.get_context(method)
    shm = smm.SharedMemory(4096)
    shm.buf[0] = 10
    sl = smm.ShareableList([5, "parent"]) if _shareable_list_available() else None
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_child_entry, args=(queue, smm, shm, sl, shm.name, 2)) for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert all(status == "ok" for status, _ in results), results
    assert shm.buf[0] == 12 and shm.buf[1] == 7
    if sl is not None:
        assert (sl[0], sl[1]) == (7, "child")
    # what the children made outlives them (it lives in the manager's heap) and the
    # parent reads it by name
    for _, names in results:
        for i, name in enumerate(names[:2]):
            made = sharedobj.SharedMemory(name)
            assert (made.size, bytes(made.buf[:3])) == (32 + i, bytes([i, i + 1, i + 2]))
            made.close()
    shm.close()
    if sl is not None:
        sl.shm.close()


@needs_shareable_list
@pytest.mark.parametrize(
    "method",
    [
        "fork",
        "spawn",
        "forkserver",
    ],
)
def test_list_made_in_child_outlives_child(smm: SharedMemoryManager, method: str) -> None:
    # fork and forkserver children leave with os._exit: their departure is only noticed
    # lazily, which is why the tracked name survives there (see the report)
    from sharedobj.shareable_list import ShareableList

    ctx = mp.get_context(method)
    shm = smm.SharedMemory(8)
    sl = smm.ShareableList([0, "parent"])
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_entry, args=(queue, smm, shm, sl, shm.name, 0, True))
    proc.start()
    status, names = queue.get(timeout=60)
    proc.join(60)
    assert (status, proc.exitcode) == ("ok", 0), names
    try:
        extra = ShareableList(name=names[0])
        assert list(extra) == [0, "from child"]
        extra.shm.close()
    finally:
        shm.close()
        sl.shm.close()


@pytest.mark.parametrize("method", METHODS)
def test_pool_arguments_and_results(smm: SharedMemoryManager, method: str) -> None:
    shm = smm.SharedMemory(16)
    with mp.get_context(method).Pool(2) as pool:
        fresh = pool.map(_pool_job, [(smm, shm, shm.name, i) for i in range(6)])
        pool.close()
        pool.join()
    # the workers are gone; what they made through the manager is not
    assert bytes(shm.buf[:6]) == bytes(range(1, 7))
    assert bytes(shm.buf[8:14]) == bytes(range(100, 106))
    for i, made in enumerate(fresh):
        assert made.name.startswith(f"so{smm.heap.id}_")
        assert (made.size, bytes(made.buf[:2])) == (16 + i, bytes([i, 255 - i]))
        made.close()
    assert len({made.name for made in fresh}) == 6
    shm.close()


@needs_shareable_list
def test_empty_shareable_list_without_sequence() -> None:
    with SharedMemoryManager() as manager:
        empty = manager.ShareableList()  # the stdlib's makes an empty list
        assert len(empty) == 0
        empty.shm.close()


def test_children_after_shutdown_see_nothing(smm: SharedMemoryManager) -> None:
    """Once shut down, a name the manager made is gone for every process."""
    shm = smm.SharedMemory(8)
    name = shm.name
    shm.close()
    smm.shutdown()
    code = f"from sharedobj import SharedMemory\ntry:\n    SharedMemory({name!r})\nexcept FileNotFoundError:\n    print('gone')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "gone"), proc.stderr


# ---------------------------------------------------------------------------
# the owner dies


_KILLED_OWNER = """
import json, sys, time
from sharedobj import SharedMemoryManager
manager = SharedMemoryManager()
manager.start()
objs = [manager.SharedMemory(size) for size in (10, 5000, 2 << 20)]
for obj in objs:
    obj.buf[0] = 1
try:
    objs.append(manager.ShareableList([1, "two"]))
except ModuleNotFoundError:
    pass
heap = manager.heap
ids = [heap.id] + [i for _a, _k, seg_ids, _s in heap._a().arena_ids() for i in seg_ids]
print(json.dumps({"heap": heap.id, "ids": ids, "name": objs[0].name}), flush=True)
time.sleep(600)
"""


def test_killed_owner_frees_the_heap() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_OWNER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        ids = set(info["ids"])
        assert ids <= live_shmids()
        assert len(ids) >= 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not wait_gone(ids), "the kernel should free a dead owner's heap"
    with pytest.raises(FileNotFoundError):
        sharedobj.SharedMemory(info["name"])


# ---------------------------------------------------------------------------
# differential: the same scenario on the stdlib's manager


def scenario_objects_to_children(manager_cls: ManagerClass, method: str) -> Any:
    """Objects made by a manager, passed to a child that writes them; the parent reads."""
    with manager_cls() as manager:
        shm = manager.SharedMemory(64)
        sl = manager.ShareableList([1, "parent", 2.5])
        shm.buf[0] = 41
        ctx = mp.get_context(method)
        proc = ctx.Process(target=_stdlib_child, args=(shm, sl))
        proc.start()
        proc.join(60)
        by_name = type(shm)(shm.name)
        try:
            seen = (proc.exitcode, by_name.buf[0], list(sl), shm.size, len(shm.buf))
        finally:
            by_name.close()
            shm.close()
            sl.shm.close()
        names = (shm.name, sl.shm.name)
    after = []
    for name in names:
        try:
            (
                sharedobj.SharedMemory
                if manager_cls is SharedMemoryManager
                else std_shm.SharedMemory
            )(name).close()
            after.append("still there")
        except FileNotFoundError:
            after.append("gone")
    return (seen, after)


def scenario_many_objects(manager_cls: ManagerClass) -> Any:
    with manager_cls() as manager:
        blocks = [manager.SharedMemory(n) for n in range(1, 200, 7)]
        for i, block in enumerate(blocks):
            block.buf[:] = bytes([i % 256]) * block.size
        ok = all(bytes(b.buf) == bytes([i % 256]) * b.size for i, b in enumerate(blocks))
        names = {b.name for b in blocks}
        for block in blocks:
            block.close()
        return (ok, len(names), [b.size for b in blocks])


@needs_shareable_list
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_same_as_stdlib_objects_to_children(method: str) -> None:
    results = {impl: scenario_objects_to_children(cls, method) for impl, cls in MANAGERS.items()}
    assert results["ours"] == results["stdlib"]
    assert results["ours"] == ((0, 42, [2, "child", 2.5], 64, 64), ["gone", "gone"])


def test_same_as_stdlib_many_objects() -> None:
    results = {impl: scenario_many_objects(cls) for impl, cls in MANAGERS.items()}
    assert results["ours"] == results["stdlib"]
    assert results["ours"][0] is True


def test_manager_pickles_small_and_attaches() -> None:
    with SharedMemoryManager() as smm:  # segments are auto-removed: nothing can leak
        _manager_pickles_small_and_attaches(smm)


def _manager_pickles_small_and_attaches(smm: SharedMemoryManager) -> None:
    # difference: the stdlib's manager cannot be pickled (its authkey refuses); ours
    # pickles as its heap id, and the copy makes objects in the same heap
    data = pickle.dumps(smm)
    assert len(data) < 200
    with pytest.raises(TypeError):
        pickle.dumps(std_managers.SharedMemoryManager())
    copy = pickle.loads(data)
    shm = copy.SharedMemory(8)
    assert shm.name.startswith(f"so{smm.heap.id}_")
    shm.close()
    copy.shutdown()  # a copy only detaches: the original still works
    again = smm.SharedMemory(8)
    again.close()
