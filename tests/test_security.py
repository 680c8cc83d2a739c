"""Permissions and trust: another user can neither use nor clean our heaps.

The other user is played by a forked child that drops to uid/gid 65534
(``nobody``) before anything is created, so it inherits no mapping: every
heap, name and handle it gets afterwards must be reached through the kernel's
permission checks, as an unrelated process of another user would.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import numpy as np
import pytest

import sharedobj
from conftest import give_away, needs_unshare, run_python
from sharedobj import Heap, SharedMemory, SharedMemoryManager, cli, limits, segment, trust
from sharedobj.shared_memory import default_heap

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")


def _modes(heap: Heap) -> dict[int, int]:
    ids = {heap.id}
    for pieces in heap._a()._ids.values():  # every arena and huge block, each piece of a span
        ids.update(pieces)
    out = {}
    for shmid in ids:
        info = limits.segment_info(shmid)
        assert info is not None, shmid
        out[shmid] = info.mode & 0o777
    return out


def test_every_segment_of_a_heap_is_0600_by_default() -> None:
    h = Heap.create(1 << 20, max_segment_size=4 << 20, huge_threshold=2 << 20)
    try:
        blocks = [h.alloc(3 << 20), h.alloc(600 << 10), h.alloc(900 << 10), h.alloc(64)]
        modes = _modes(h)
        assert len(modes) >= 3  # root, arenas, a huge block
        assert set(modes.values()) == {0o600}, modes
        for b in blocks:
            h.free(b)
    finally:
        h.destroy()


def test_manager_and_default_heaps_are_0600() -> None:
    with SharedMemoryManager() as smm:
        smm.SharedMemory(100)
        assert set(_modes(smm.heap).values()) == {0o600}
    shm = SharedMemory(create=True, size=100)
    try:
        heap = default_heap()
        assert heap is not None and set(_modes(heap).values()) == {0o600}
    finally:
        shm.close()
        shm.unlink()


def test_a_wider_mode_is_applied_to_every_segment_when_asked() -> None:
    h = Heap.create(1 << 20, mode=0o640, huge_threshold=2 << 20)
    try:
        b = h.alloc(3 << 20)
        assert set(_modes(h).values()) == {0o640}
        h.free(b)
    finally:
        h.destroy()


@needs_unshare
def test_sharedobj_creates_no_semaphores() -> None:
    # Locks live in the segments (robust pthread mutexes): nothing for SEMMNI
    # to run out of, and no semaphore set to leak.  A private IPC namespace
    # shows exactly what this workload made.
    out = run_python(
        """
        import json
        from sharedobj import SharedMemory, SharedMemoryManager
        with SharedMemoryManager() as smm:
            arr = smm.zeros(1000)
            arr[:] = 1
            shm = smm.SharedMemory(64)
            shm.close()
            plain = SharedMemory(create=True, size=10)
            with open("/proc/sysvipc/sem") as f:
                sems = f.read().splitlines()[1:]
            with open("/proc/sysvipc/shm") as f:
                modes = sorted({int(line.split()[2], 8) & 0o777 for line in f.readlines()[1:]})
            plain.close()
            plain.unlink()
        print(json.dumps({"sems": sems, "modes": modes}))
        """,
        sysctl={},
    )
    assert out == {"sems": [], "modes": [0o600]}


# ----------------------------------------------------------------------------
# another user


def _nobody(jobs: Any, results: Any) -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    # Forget heaps attached before the fork (say, the default heap of an earlier
    # test): this process must reach everything through the kernel's checks.
    from sharedobj import heap as heap_mod
    from sharedobj import shared_memory

    shared_memory._default = None
    heap_mod._kept.clear()
    heap_mod._heaps.clear()
    segment._cache.clear()
    while True:
        job = jobs.get(timeout=60)
        if job is None:
            return
        name, payload = job
        try:
            results.put((name, "ok", repr(_ATTEMPTS[name](payload))[:200]))
        except Exception as e:
            results.put((name, type(e).__name__, str(e)))


def _read_block(data: bytes) -> bytes:
    block = pickle.loads(data)
    return bytes(block.buf[:8])


def _read_array(data: bytes) -> float:
    return float(pickle.loads(data).sum())


def _write_array(data: bytes) -> None:
    pickle.loads(data)[:] = 666


def _clean(_: object) -> Any:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["clean", "--json"])
    return code, json.loads(out.getvalue())


_ATTEMPTS: dict[str, Callable[[Any], Any]] = {
    "open default-heap name": lambda name: SharedMemory(name),
    "open manager name": lambda name: SharedMemory(name),
    "attach heap": lambda heap_id: Heap.attach(heap_id),
    "attach segment": lambda shmid: segment.attach(shmid),
    "unpickle block": _read_block,
    "read array": _read_array,
    "write array": _write_array,
    "unpickle manager": lambda data: pickle.loads(data).heap,
    "read dict": lambda data: dict(pickle.loads(data)),
    "write dict": lambda data: pickle.loads(data).update(evil=1),
    "get from queue": lambda data: pickle.loads(data).get(timeout=1),
    "put in queue": lambda data: pickle.loads(data).put("evil"),
    "read list": lambda data: list(pickle.loads(data)),
    "take lock": lambda data: pickle.loads(data).acquire(timeout=1),
    "clean": _clean,
}


@contextlib.contextmanager
def _other_user() -> Iterator[Callable[[str, Any], tuple[str, str]]]:
    # The child may be unable to read the interpreter's own files (/root is
    # 0700): import now, by a dry run, whatever `clean` imports lazily.
    with contextlib.redirect_stdout(io.StringIO()):
        cli.main(["clean", "--dry-run", "--json"])
    ctx = mp.get_context("fork")
    jobs, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_nobody, args=(jobs, results))
    child.start()  # before anything below exists: it inherits no mapping

    def attempt(name: str, payload: Any) -> tuple[str, str]:
        jobs.put((name, payload))
        got, kind, msg = results.get(timeout=60)
        assert got == name
        return kind, msg

    try:
        yield attempt
    finally:
        jobs.put(None)
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()


@needs_root
def test_another_user_cannot_open_attach_read_write_or_clean_our_heaps() -> None:
    with _other_user() as attempt, SharedMemoryManager() as smm:
        plain = SharedMemory(create=True, size=64)
        try:
            plain.buf[:5] = b"ours!"
            managed = smm.SharedMemory(64)
            arr = smm.zeros(100)
            arr[:] = 7
            block = smm.heap.alloc(64)
            block.buf[:8] = b"secret!!"
            heap = default_heap()
            assert heap is not None
            d, q, lst, lock = smm.dict(secret=1), smm.Queue(), smm.list([1, 2]), smm.Lock()
            q.put("ours")
            cases = {
                "open default-heap name": plain.name,
                "open manager name": managed.name,
                "attach heap": smm.heap.id,
                "attach segment": smm.heap.id,
                "unpickle block": pickle.dumps(block),
                "read array": pickle.dumps(arr),
                "write array": pickle.dumps(arr),
                "unpickle manager": pickle.dumps(smm),
                "read dict": pickle.dumps(d),
                "write dict": pickle.dumps(d),
                "get from queue": pickle.dumps(q),
                "put in queue": pickle.dumps(q),
                "read list": pickle.dumps(lst),
                "take lock": pickle.dumps(lock),
            }
            for name, payload in cases.items():
                kind, msg = attempt(name, payload)
                assert kind == "PermissionError", (name, kind, msg)
            kind, msg = attempt("clean", None)
            assert kind == "ok", msg
            # nothing of ours was touched, or even reported as removable
            assert limits.segment_info(smm.heap.id) is not None
            assert limits.segment_info(heap.id) is not None
            assert str(smm.heap.id) not in msg and str(heap.id) not in msg
            assert bytes(plain.buf[:5]) == b"ours!" and float(arr.sum()) == 700.0
            assert bytes(block.buf[:8]) == b"secret!!"
            assert dict(d) == {"secret": 1} and q.get(timeout=5) == "ours" and q.empty()
            assert list(lst) == [1, 2] and lock.acquire(timeout=5)
            lock.release()
        finally:
            plain.close()
            plain.unlink()


def _attach_fresh(jobs: Any, results: Any) -> None:
    heap_id, register = jobs.get(timeout=60)
    try:
        Heap.attach(heap_id, register=register)
        results.put("attached")
    except Exception as e:
        results.put(f"{type(e).__name__}: {e}")


@needs_root
@pytest.mark.parametrize("register", [True, False])
def test_a_heap_owned_by_another_user_is_not_trusted(register: bool) -> None:
    # Whoever owns the segment can write it, so it could plant pickles that run
    # code in our processes: attaching refuses before reading anything, even
    # as root; root may still *inspect* it (register=False), as the CLI does.
    ctx = mp.get_context("fork")
    jobs, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_attach_fresh, args=(jobs, results))
    child.start()
    h = Heap.create(1 << 20)
    try:
        give_away(h.id, NOBODY)
        jobs.put((h.id, register))
        got = results.get(timeout=60)
        if register:
            assert got.startswith("PermissionError") and "uid 65534" in got, got
        else:
            assert got == "attached"
    finally:
        child.join(30)
        give_away(h.id, 0)
        h.destroy()


# ----------------------------------------------------------------------------
# the unpickle policy


class _Evil:
    def __reduce__(self) -> Any:
        return (os.system, ("true",))


@pytest.fixture
def plain_policy() -> Iterator[None]:
    trust.set_unpickle_policy("plain")
    try:
        yield
    finally:
        trust.set_unpickle_policy("any")


def test_plain_policy_accepts_plain_data_and_numpy(plain_policy: None) -> None:
    value = (
        1,
        2.5,
        3 + 4j,
        "s",
        b"b",
        bytearray(b"x"),
        None,
        True,
        [1, {"k": (1, 2)}],
        {1, 2},
        frozenset({3}),
        np.arange(5.0),
        np.float32(1.5),
        np.dtype("i4"),
    )
    for protocol in (2, 4, 5):
        got = trust.loads(pickle.dumps(value, protocol=protocol))
        assert got[:11] == value[:11]
        assert np.array_equal(got[11], value[11]) and got[12:] == value[12:]


def test_plain_policy_accepts_shared_handles(plain_policy: None) -> None:
    with SharedMemoryManager() as smm:
        arr = smm.zeros(10)
        arr[3] = 3
        back = trust.loads(pickle.dumps(arr))
        assert isinstance(back, sharedobj.SharedArray) and back[3] == 3
        block = smm.heap.alloc(16)
        assert trust.loads(pickle.dumps(block)).offset == block.offset


@pytest.mark.parametrize(
    "value",
    [_Evil(), print, lambda: 1, object(), Exception("x")],
    ids=["reduce to os.system", "builtin function", "lambda", "object", "exception"],
)
def test_plain_policy_refuses_everything_else(plain_policy: None, value: object) -> None:

    data = cloudpickle.dumps(value)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle .* policy is 'plain'"):
        trust.loads(data)


def test_default_policy_is_plain_pickle() -> None:
    assert trust.get_unpickle_policy() == "any"
    assert trust.loads(pickle.dumps(Exception("x"))).args == ("x",)


def test_policy_names_are_checked() -> None:
    with pytest.raises(ValueError, match="one of"):
        trust.set_unpickle_policy("none")


def test_policy_from_the_environment() -> None:
    code = """
    import json, os, pickle
    from sharedobj import trust
    try:
        trust.loads(pickle.dumps(Exception("x")))
        out = "loaded"
    except pickle.UnpicklingError as e:
        out = str(e)
    print(json.dumps([trust.get_unpickle_policy(), out]))
    """
    os.environ["SHAREDOBJ_UNPICKLE"] = "plain"
    try:
        policy, out = run_python(code)
    finally:
        del os.environ["SHAREDOBJ_UNPICKLE"]
    assert policy == "plain" and "builtins.Exception" in out


class _Point:
    def __init__(self, x: int) -> None:
        self.x = x


def test_plain_policy_guards_what_containers_unpickle(plain_policy: None) -> None:
    with SharedMemoryManager() as smm:
        d = smm.dict()
        d["plain"] = (1, "two", b"3", None, [4.0])
        d["array"] = np.arange(4)
        trust.set_unpickle_policy("any")
        d["object"] = _Point(1)  # written by a process that trusts everything
        trust.set_unpickle_policy("plain")
        assert d["plain"] == (1, "two", b"3", None, [4.0])
        assert list(d["array"]) == [0, 1, 2, 3]
        with pytest.raises(pickle.UnpicklingError, match="_Point"):
            d["object"]
        lst = smm.list([1, "x"])
        trust.set_unpickle_policy("any")
        lst.append(_Point(2))
        trust.set_unpickle_policy("plain")
        assert lst[:2] == [1, "x"]
        with pytest.raises(pickle.UnpicklingError, match="_Point"):
            lst[2]


def test_plain_policy_guards_queue_messages(plain_policy: None) -> None:
    with SharedMemoryManager() as smm:
        q = smm.Queue()
        trust.set_unpickle_policy("any")
        q.put(_Point(1))
        q.put_many([(1, "plain"), _Point(2)])
        q.put(b"x" * 100_000)  # a big message travels as a block
        trust.set_unpickle_policy("plain")
        with pytest.raises(pickle.UnpicklingError, match="_Point"):
            q.get(timeout=5)
        assert q.get(timeout=5) == (1, "plain")
        with pytest.raises(pickle.UnpicklingError, match="_Point"):
            q.get(timeout=5)
        assert q.get(timeout=5) == b"x" * 100_000
