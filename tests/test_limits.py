"""Kernel limits exhausted in a private IPC namespace: a clear error, nothing leaked.

Each test runs a fresh interpreter under ``unshare --ipc`` with one limit
lowered (SHMMNI, SHMALL or SEMMNI), fills it, and then asks sharedobj for more
at every level that makes segments: a new heap, a manager, a heap growing by an
arena, a huge block, the default heap of ``SharedMemory``.  Every refusal must
name the limit and the sysctl that raises it, leave no segment behind, and
leave the heaps already open working (allocation inside their arenas, reads,
writes, ``check()``).  Segments made in the namespace die with it, so a failing
test cannot leak either.
"""

from __future__ import annotations

from conftest import needs_unshare, run_python

# Shared by the SHMMNI and SHMALL scenarios: `fill()` is defined per test.
_SCENARIO = """
import json, os
from sharedobj import Heap, IPCLimitError, SharedMemory, SharedMemoryManager, limits, segment

def segs():
    return sorted(s.shmid for s in limits.list_segments())

h = Heap.create(1 << 20)                      # open before the limit is reached
smm = SharedMemoryManager(size=4 << 20)
smm.start()
d, q = smm.dict(), smm.Queue()
keep = [h.alloc(64) for _ in range(100)] + [h.alloc(200 << 10)]
for i, b in enumerate(keep):
    b.buf[0] = i % 256
filler = fill()
before = segs()
errors = {}
def attempt(what, fn):
    try:
        fn()
        errors[what] = None
    except IPCLimitError as e:
        errors[what] = {"type": "IPCLimitError", "limit": e.limit, "sysctl": e.sysctl, "msg": str(e)}
    except Exception as e:
        errors[what] = {"type": type(e).__name__, "msg": str(e)}
    assert segs() == before, (what, before, segs())   # nothing leaked by the refusal

attempt("new heap", lambda: Heap.create(1 << 20))
attempt("manager", lambda: SharedMemoryManager().start())
attempt("grow", lambda: h.alloc(3 << 20))          # more than the first arena holds
attempt("huge", lambda: h.alloc(64 << 20))
attempt("default heap", lambda: SharedMemory(create=True, size=10))
# the open heaps keep working, containers included
more = [h.alloc(64) for _ in range(500)]
ok = all(b.buf[0] == i % 256 for i, b in enumerate(keep))
for i in range(300):
    d[i] = str(i) * 3
    q.put(("msg", i))
lst = smm.list(range(50))
lock = smm.Lock()
with lock:
    lst.append(50)
ok = ok and d[299] == "299299299" and [q.get(timeout=5) for _ in range(300)][-1] == ("msg", 299)
ok = ok and list(lst) == list(range(51))
smm.shutdown()
for b in more + keep:
    h.free(b)
print(json.dumps({"errors": errors, "ok": ok, "check": h.check()}))
h.destroy()
"""


def _assert_named(out: dict, limit: str, sysctl: str) -> None:
    assert out["ok"] and out["check"] == []
    for what, err in out["errors"].items():
        assert err is not None, f"{what} succeeded although {limit} was exhausted"
        assert err["type"] == "IPCLimitError", (what, err)
        assert err["limit"] == limit and err["sysctl"] == sysctl, (what, err)
        assert sysctl in err["msg"], (what, err)


@needs_unshare
def test_shmmni_exhausted() -> None:
    fill = """
def fill():
    held = []
    while True:
        try:
            held.append(segment.create(4096))
        except IPCLimitError:
            return held
"""
    out = run_python(fill + _SCENARIO, sysctl={"shmmni": 12})
    _assert_named(out, "SHMMNI", "kernel.shmmni")


@needs_unshare
def test_shmall_exhausted() -> None:
    fill = """
def fill():
    held = []
    size = 1 << 20
    while size >= 4096:
        try:
            held.append(segment.create(size))
        except IPCLimitError:
            size //= 2
    return held
"""
    # 2048 pages = 8 MiB for the whole namespace
    out = run_python(fill + _SCENARIO, sysctl={"shmall": 2048})
    _assert_named(out, "SHMALL", "kernel.shmall")


@needs_unshare
def test_semmni_exhausted_changes_nothing_for_sharedobj() -> None:
    # sharedobj's locks are robust mutexes inside the segments: with no
    # semaphore set left to create (SEMMNI reached), everything still works.
    out = run_python(
        """
        import json
        import sysv_ipc
        from sharedobj import SharedMemory, SharedMemoryManager
        held = []
        while True:
            try:
                held.append(sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX))
            except Exception as e:
                full = type(e).__name__
                break
        with SharedMemoryManager() as smm:
            arr = smm.zeros(1000)
            arr += 2
            shm = smm.SharedMemory(100)
            shm.buf[:3] = b"abc"
            d, q, lock, sem = smm.dict(), smm.Queue(), smm.Lock(), smm.Semaphore(2)
            with lock, sem:
                d["x"] = 1
            q.put(d["x"])
            total = float(arr.sum()) + q.get(timeout=5)
        plain = SharedMemory(create=True, size=10)
        plain.close()
        plain.unlink()
        for s in held:
            s.remove()
        print(json.dumps({"sems": len(held), "full": full, "total": total}))
        """,
        sysctl={"sem": "250 32000 32 8"},  # SEMMSL SEMMNS SEMOPM SEMMNI
    )
    assert out["sems"] == 8 and out["total"] == 2001.0
