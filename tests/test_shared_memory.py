"""SharedMemory: the stdlib's ``multiprocessing.shared_memory.SharedMemory`` is the oracle.

Every scenario below is a plain function ``scenario(cls, prefix)`` that takes
the SharedMemory class under test and a name prefix unique to the test, runs
one use case and returns what it observed.  ``test_same_observations`` runs
each scenario on the stdlib's class and on ``sharedobj.SharedMemory`` and the
two results must be equal.  Where the two differ on purpose, a test of its
own asserts each side's behaviour, marked ``# difference: <reason>``.

Isolation: each test gets a random ``SHAREDOBJ_DEFAULT_KEY`` (children inherit
it through ``os.environ``), so it has a default heap of its own; every name it
made is unlinked at teardown even when the test fails, and the teardown then
checks that the default heap retired itself (its System V key is no longer
listed by ``ipcs -m``) and that nothing with the test's prefix is left in
/dev/shm.
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing as mp
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing import shared_memory as std_shm
from typing import Any

import numpy as np
import pytest

import sharedobj
from sharedobj import segment
from sharedobj import shared_memory as so_shm
from sharedobj.heap import Heap

ShmClass = Callable[..., Any]
IMPLS: dict[str, ShmClass] = {"stdlib": std_shm.SharedMemory, "ours": sharedobj.SharedMemory}
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20


# ---------------------------------------------------------------------------
# isolation


def _key_listed(key: int) -> bool:
    """Whether ``ipcs -m`` (or /proc/sysvipc/shm without it) lists a segment with ``key``."""
    if shutil.which("ipcs"):
        out = subprocess.run(["ipcs", "-m"], capture_output=True, text=True, check=True).stdout
        return any(line.split()[:1] == [f"0x{key:08x}"] for line in out.splitlines())
    with open("/proc/sysvipc/shm") as f:
        return any(line.split()[:1] == [str(key)] for line in f.readlines()[1:])


def _reset_default_heap() -> None:
    heap = so_shm._default
    if heap is not None and not heap.closed:
        heap.close()
    so_shm._default = None


def _retire_default_heap() -> None:
    """What this process does for the default heap at exit: retire it if no name is left.

    The default heap is not retired on every unlink (a program that makes and
    unlinks one block at a time would rebuild it each time) but when the last
    process using it leaves; a test stands in for its worker's exit here.
    """
    heap = so_shm._default
    if heap is not None and not heap.closed:
        so_shm._retire_if_empty(heap)


def _use_key(key: int) -> None:
    """In a child: make sure this process uses the test's default heap."""
    if os.environ.get("SHAREDOBJ_DEFAULT_KEY") != str(key):
        os.environ["SHAREDOBJ_DEFAULT_KEY"] = str(key)
        _reset_default_heap()


def _std_forget(name: str) -> None:
    """Take a stdlib name off this process's resource tracker (it is gone, or not ours)."""
    with contextlib.suppress(Exception):
        resource_tracker.unregister("/" + name.lstrip("/"), "shared_memory")


@dataclass
class Iso:
    key: int
    prefix: str

    def name(self, tag: str = "") -> str:
        return f"{self.prefix}{tag}{secrets.token_hex(4)}"


@pytest.fixture
def iso(monkeypatch: pytest.MonkeyPatch) -> Iterator[Iso]:
    key = (1 << 30) + secrets.randbelow(1 << 30)
    _reset_default_heap()
    monkeypatch.setenv("SHAREDOBJ_DEFAULT_KEY", str(key))
    resource_tracker.ensure_running()  # forked children must share this tracker, not start their own
    env = Iso(key, f"t{os.getpid()}_{secrets.token_hex(3)}_")
    try:
        yield env
    finally:
        problems = _sweep(env)
        if problems:
            pytest.fail("; ".join(problems))


def _sweep(env: Iso) -> list[str]:
    """Unlink whatever the test left; report leaks (a failing test's leftovers are not reported)."""
    problems: list[str] = []
    gc.collect()  # SharedMemory objects a failed test dropped close in __del__
    for entry in os.listdir("/dev/shm"):
        if entry.startswith(env.prefix):
            problems.append(f"/dev/shm/{entry} left behind")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{entry}")
            _std_forget(entry)
    heap = so_shm.default_heap(create=False)
    if heap is not None:
        for name in heap.names.names():
            if name.startswith(env.prefix):
                problems.append(f"sharedobj name {name!r} left behind")
                with contextlib.suppress(FileNotFoundError):
                    sharedobj.SharedMemory(name).unlink()
        _retire_default_heap()
    _reset_default_heap()
    if _key_listed(env.key):
        problems.append(f"the default heap (key {env.key:#x}) did not retire")
        with contextlib.suppress(Exception):
            seg = segment.attach_key(env.key)
            shmid = seg.shmid
            seg.close()
            Heap.attach(shmid).destroy()
    return problems


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", value) or ("raises", exception type): what a call observably did."""
    try:
        return ("ok", fn())
    except Exception as exc:
        return ("raises", type(exc))


@contextlib.contextmanager
def made(cls: ShmClass, *args: Any, **kwargs: Any) -> Iterator[Any]:
    """A created segment, closed and unlinked on the way out whatever happens."""
    shm = cls(*args, create=True, **kwargs)
    try:
        yield shm
    finally:
        with contextlib.suppress(BufferError):
            shm.close()
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()


def opener(cls: ShmClass, name: str) -> Callable[[], Any]:
    def open_and_close() -> bool:
        shm = cls(name)
        shm.close()
        return True

    return open_and_close


# ---------------------------------------------------------------------------
# children (module level: spawn children import this module to find them)


def _child_read_write(cls: ShmClass, key: int, name: str, n: int) -> None:
    _use_key(key)
    shm = cls(name)
    try:
        data = bytes(shm.buf[:n])
        shm.buf[:n] = bytes(b ^ 0xFF for b in data)
    finally:
        shm.close()


def _child_with_object(key: int, shm: Any, n: int) -> None:
    _use_key(key)
    try:
        shm.buf[:n] = bytes(shm.buf[:n])[::-1]
    finally:
        shm.close()


def _pool_job(args: tuple[ShmClass, int, Any, int, str]) -> tuple[int, Any]:
    cls, key, shm, i, new_name = args
    _use_key(key)
    try:
        shm.buf[i] = i + 1
        fresh = cls(new_name, create=True, size=16)
        fresh.buf[:4] = bytes([i, i, i, i])
        return (bytes(shm.buf[: i + 1]).count(0), fresh)
    finally:
        shm.close()


# ---------------------------------------------------------------------------
# scenarios: (cls, prefix) -> observations


def sc_named_create_write_read(cls: ShmClass, prefix: str) -> Any:
    name = prefix + "named"
    with made(cls, name, size=100) as shm:
        shm.buf[:5] = b"hello"
        other = cls(name)
        try:
            seen = bytes(other.buf[:5])
            other.buf[5:10] = b"world"
        finally:
            other.close()
        return (shm.name == name, shm.size, len(shm.buf), seen, bytes(shm.buf[:10]))


def sc_anonymous_names(cls: ShmClass, prefix: str) -> Any:
    del prefix
    with made(cls, None, size=64) as a, made(cls, size=64) as b:
        a.buf[0] = 42
        again = cls(a.name)
        try:
            round_trip = again.buf[0]
        finally:
            again.close()
        return (
            type(a.name),
            a.name != b.name,
            a.name.startswith("/"),
            a.name.startswith("psm_"),
            round_trip,
        )


def sc_odd_sizes(cls: ShmClass, prefix: str) -> Any:
    seen = []
    for size in (1, 4095, 4096, 4097, MiB + 1, 3 * MiB):
        with made(cls, f"{prefix}s{size}", size=size) as shm:
            zeroed = bytes(shm.buf) == bytes(size)
            shm.buf[0] = 1
            shm.buf[size - 1] = 2
            other = cls(shm.name)
            try:
                ends = (other.buf[0], other.buf[size - 1])
            finally:
                other.close()
            seen.append((size, shm.size, len(shm.buf), zeroed, ends))
    return seen


def sc_zero_filled_after_reuse(cls: ShmClass, prefix: str) -> Any:
    """A segment made where another was just freed is zero-filled all the same."""
    out = []
    for round_ in range(3):
        with made(cls, f"{prefix}z{round_}", size=8192) as shm:
            out.append(bytes(shm.buf) == bytes(8192))
            shm.buf[:] = b"\xaa" * 8192
    return out


def sc_buf_writable(cls: ShmClass, prefix: str) -> Any:
    with made(cls, prefix + "w", size=32) as shm:
        mv = shm.buf
        shm.buf[3:6] = b"abc"
        result = (type(mv), mv.readonly, mv.format, mv.itemsize, mv.nbytes, bytes(mv[3:6]))
        mv.release()
        return result


def sc_repr(cls: ShmClass, prefix: str) -> Any:
    with made(cls, prefix + "r", size=10) as shm:
        return repr(shm) == f"SharedMemory({shm.name!r}, size=10)"


def sc_pickle_by_name(cls: ShmClass, prefix: str) -> Any:
    with made(cls, prefix + "p", size=10) as shm:
        data = pickle.dumps(shm)
        reduced = shm.__reduce__()
        copy = pickle.loads(data)
        try:
            copy.buf[0] = 77
            return (
                shm.name.encode() in data,
                len(data) < 200,
                reduced[0] is cls,
                reduced[1][0] == shm.name,
                reduced[1][1:],
                copy.name == shm.name,
                shm.buf[0],
            )
        finally:
            copy.close()


def sc_close_twice_and_buf_none(cls: ShmClass, prefix: str) -> Any:
    with made(cls, prefix + "c", size=10) as shm:
        shm.buf[0] = 1
        shm.close()
        shm.close()
        after_close = shm.buf
        name_after = shm.name
        reopened = cls(name_after)
        try:
            value = reopened.buf[0]
        finally:
            reopened.close()
        return (after_close, name_after == prefix + "c", value)


def sc_unlink_then_reopen(cls: ShmClass, prefix: str) -> Any:
    name = prefix + "u"
    shm = cls(name, create=True, size=10)
    shm.close()
    shm.unlink()
    return (outcome(opener(cls, name)), outcome(shm.unlink))


def sc_reopen_cycle(cls: ShmClass, prefix: str) -> Any:
    """The same name opened again and again while it is unlinked and made anew.

    sharedobj remembers the names a process opened (Directory.reopen); every
    step here must still see what the stdlib sees.
    """
    name = prefix + "rc"
    seen: list[Any] = []
    first = cls(name, create=True, size=64)
    first.buf[:3] = b"one"
    for _ in range(3):  # opened again and again: the remembered entry
        other = cls(name)
        seen.append((bytes(other.buf[:3]), other.size >= 64))
        other.buf[3] = 7
        other.close()
    seen.append(first.buf[3])
    first.close()
    first.unlink()
    seen.append(outcome(opener(cls, name)))  # remembered, but unlinked
    second = cls(name, create=True, size=5000)  # the name again, another block
    second.buf[:3] = b"two"
    try:
        for _ in range(2):
            again = cls(name)
            seen.append((bytes(again.buf[:3]), again.size >= 5000))
            again.close()
    finally:
        second.close()
        second.unlink()
    seen.append(outcome(opener(cls, name)))
    return seen


def sc_unlink_while_open(cls: ShmClass, prefix: str) -> Any:
    """unlink() with handles still open: the name goes, the open handles keep working."""
    name = prefix + "uo"
    shm = cls(name, create=True, size=4096)
    other = cls(name)
    try:
        shm.unlink()
        gone = outcome(opener(cls, name))
        other.buf[:3] = b"xyz"
        seen = bytes(shm.buf[:3])
        recreated = outcome(lambda: made_and_closed(cls, name))
        return (gone, seen, recreated)
    finally:
        other.close()
        shm.close()


def made_and_closed(cls: ShmClass, name: str) -> bytes:
    """Create ``name`` anew (it must be zero-filled), then unlink it."""
    with made(cls, name, size=16) as shm:
        return bytes(shm.buf)


def sc_create_existing(cls: ShmClass, prefix: str) -> Any:
    name = prefix + "e"
    with made(cls, name, size=10) as shm:
        while_open = outcome(lambda: cls(name, create=True, size=10))
        shm.close()
        while_closed = outcome(lambda: cls(name, create=True, size=20))
        return (while_open, while_closed)


def sc_open_missing(cls: ShmClass, prefix: str) -> Any:
    return (outcome(opener(cls, prefix + "missing")), outcome(opener(cls, prefix + "m" * 200)))


def sc_bad_sizes(cls: ShmClass, prefix: str) -> Any:
    name = prefix + "bs"
    return [
        outcome(lambda: cls(name, create=True, size=0)),
        outcome(lambda: cls(name, create=True)),
        outcome(lambda: cls(name, create=True, size=-1)),
        outcome(lambda: cls(name, size=-1)),
        outcome(lambda: cls(None, create=True, size=-4096)),
        outcome(lambda: cls(None)),
        outcome(lambda: cls()),
        outcome(lambda: cls(None, create=False, size=10)),
        outcome(opener(cls, name)),  # nothing was left by the failures above
    ]


def sc_bad_name_types(cls: ShmClass, prefix: str) -> Any:
    del prefix
    out = []
    for bad in (5, 3.0, b"bytes", bytearray(b"x"), object(), ["x"]):
        out.append(outcome(lambda bad=bad: cls(bad)))
        out.append(outcome(lambda bad=bad: cls(bad, create=True, size=10)))
    return out


def sc_long_names(cls: ShmClass, prefix: str) -> Any:
    out = []
    for length in (200, 255):
        name = (prefix + "L" * length)[:length]
        with made(cls, name, size=8) as shm:
            out.append((length, shm.name == name, outcome(opener(cls, name))))
    for length in (256, 300, 4096):
        name = (prefix + "L" * length)[:length]
        out.append((length, outcome(lambda name=name: cls(name, create=True, size=8))))
        out.append((length, outcome(opener(cls, name))))
    return out


def sc_child_processes(cls: ShmClass, prefix: str) -> Any:
    key = int(os.environ["SHAREDOBJ_DEFAULT_KEY"])
    seen = []
    for method in ("fork", "spawn"):
        ctx = mp.get_context(method)
        with made(cls, f"{prefix}{method}", size=4097) as shm:
            shm.buf[:4] = b"\x01\x02\x03\x04"
            shm.buf[4096] = 9
            proc = ctx.Process(target=_child_read_write, args=(cls, key, shm.name, 4))
            proc.start()
            proc.join(60)
            after_name = bytes(shm.buf[:4])
            proc = ctx.Process(target=_child_with_object, args=(key, shm, 4))
            proc.start()
            proc.join(60)
            seen.append((method, after_name, bytes(shm.buf[:4]), shm.buf[4096]))
    return seen


def sc_unrelated_process_started_later(cls: ShmClass, prefix: str) -> Any:
    with made(cls, prefix + "sub", size=MiB + 1) as shm:
        shm.buf[:5] = b"12345"
        shm.buf[MiB] = 7
        module = cls.__module__
        forget = (
            "from multiprocessing import resource_tracker\n"
            "resource_tracker.unregister(shm._name, 'shared_memory')\n"
            if module.startswith("multiprocessing")
            else ""
        )
        code = (
            f"import json\nfrom {module} import SharedMemory\n"
            f"shm = SharedMemory({shm.name!r})\n{forget}"
            "seen = [bytes(shm.buf[:5]).decode(), shm.buf[1 << 20]]\n"
            "shm.buf[:5] = b'abcde'\nshm.close()\nprint(json.dumps(seen))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return (json.loads(proc.stdout), bytes(shm.buf[:5]), proc.stderr)


def sc_pool_map(cls: ShmClass, prefix: str) -> Any:
    key = int(os.environ["SHAREDOBJ_DEFAULT_KEY"])
    seen = []
    for method in ("fork", "spawn"):
        with made(cls, f"{prefix}pool{method}", size=8) as shm:
            jobs = [(cls, key, shm, i, f"{prefix}w{method}{i}") for i in range(4)]
            with mp.get_context(method).Pool(2) as pool:
                results = pool.map(_pool_job, jobs)
                fresh = []
                try:
                    for _zeros, new in results:
                        fresh.append((new.name, new.size, bytes(new.buf[:4])))
                finally:
                    for _zeros, new in results:
                        new.close()
                        new.unlink()  # while the workers that made them are alive
                pool.close()
                pool.join()
            seen.append((method, bytes(shm.buf), sorted(fresh)))
    return [(m, data, [(n[len(prefix) :], s, b) for n, s, b in f]) for m, data, f in seen]


def sc_size_when_attaching(cls: ShmClass, prefix: str) -> Any:
    """On Linux the stdlib's attach size is exact too (tmpfs keeps the ftruncate size)."""
    seen = []
    for size in (1, 100, 4095, 4097, MiB + 1):
        with made(cls, f"{prefix}as{size}", size=size) as shm:
            other = cls(shm.name)
            try:
                seen.append((size, other.size, len(other.buf)))
            finally:
                other.close()
    return seen


SCENARIOS = [
    sc_size_when_attaching,
    sc_named_create_write_read,
    sc_anonymous_names,
    sc_odd_sizes,
    sc_zero_filled_after_reuse,
    sc_buf_writable,
    sc_repr,
    sc_pickle_by_name,
    sc_close_twice_and_buf_none,
    sc_unlink_then_reopen,
    sc_unlink_while_open,
    sc_create_existing,
    sc_open_missing,
    sc_bad_sizes,
    sc_bad_name_types,
    sc_long_names,
    sc_child_processes,
    sc_unrelated_process_started_later,
    sc_pool_map,
    sc_reopen_cycle,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__[3:])
def test_same_observations(scenario: Callable[[ShmClass, str], object], iso: Iso) -> None:
    results = {impl: scenario(cls, f"{iso.prefix}{impl[0]}") for impl, cls in IMPLS.items()}
    assert results["ours"] == results["stdlib"]


def test_scenarios_observe_something(iso: Iso) -> None:
    """Guard against a scenario that compares two empty results."""
    ours = IMPLS["ours"]
    gone = ("raises", FileNotFoundError)
    assert sc_reopen_cycle(ours, iso.prefix) == [
        *[(b"one", True)] * 3,
        7,
        gone,
        *[(b"two", True)] * 2,
        gone,
    ]
    assert sc_named_create_write_read(ours, iso.prefix) == (True, 100, 100, b"hello", b"helloworld")
    assert sc_unlink_then_reopen(ours, iso.prefix) == (
        ("raises", FileNotFoundError),
        ("raises", FileNotFoundError),
    )
    assert sc_create_existing(ours, iso.prefix) == (
        ("raises", FileExistsError),
        ("raises", FileExistsError),
    )
    assert [r[0] for r in sc_bad_sizes(ours, iso.prefix)] == ["raises"] * 9
    children = sc_child_processes(ours, iso.prefix)
    assert children == [(m, b"\xfe\xfd\xfc\xfb", b"\xfb\xfc\xfd\xfe", 9) for m in ("fork", "spawn")]
    sub, after, _stderr = sc_unrelated_process_started_later(ours, iso.prefix)
    assert (sub, after) == (["12345", 7], b"abcde")


# ---------------------------------------------------------------------------
# deliberate differences: each side's own behaviour


def test_size_of_wrong_type(iso: Iso) -> None:
    # difference: both raise TypeError for a size that is not an int, but for a float the
    # stdlib has already made the segment by then (shm_open before ftruncate) and leaves an empty
    # one behind under the name, which then cannot even be opened (mmap of 0 bytes:
    # ValueError); ours checks the arguments before touching anything
    for impl, cls in IMPLS.items():
        for bad in (1.5, "10"):
            name = iso.name(impl)
            assert outcome(lambda c=cls, n=name, b=bad: c(n, create=True, size=b)) == (
                "raises",
                TypeError,
            )
            if impl == "ours" or isinstance(bad, str):  # a str fails the stdlib's `size >= 0`
                assert outcome(opener(cls, name)) == ("raises", FileNotFoundError)
            else:
                assert os.path.exists(f"/dev/shm/{name}")
                assert outcome(opener(cls, name)) == ("raises", ValueError)
                os.unlink(f"/dev/shm/{name}")  # never registered with the resource tracker


def test_close_with_live_memoryview_export(iso: Iso) -> None:
    # difference: the stdlib's close() raises BufferError while a slice of buf is alive
    # (its mmap cannot be closed); ours never raises: the memory stays mapped for the slice
    with made(IMPLS["stdlib"], iso.name("s"), size=64) as shm:
        part = shm.buf[:8]
        with pytest.raises(BufferError):
            shm.close()
        part.release()
        shm.close()
        assert shm.buf is None
    with made(IMPLS["ours"], iso.name("o"), size=64) as shm:
        part = shm.buf[:8]
        shm.close()
        assert shm.buf is None
        part[:3] = b"abc"
        assert bytes(part[:3]) == b"abc"


def test_numpy_view_outlives_close_ours(iso: Iso) -> None:
    # difference: a numpy view of ours stays valid after close() and unlink() (and the
    # default heap retiring); the stdlib raises BufferError or crashes (tests below)
    cls = IMPLS["ours"]
    shm = cls(iso.name(), create=True, size=4096 * 3)
    a = np.ndarray((4096 * 3,), dtype=np.uint8, buffer=shm.buf)
    b = np.frombuffer(shm.buf, dtype=np.int64)
    a[:] = 3
    shm.close()
    a[1] = 4
    assert int(a.sum()) == 3 * 4096 * 3 + 1
    assert b[0] == int.from_bytes(bytes([3, 4, 3, 3, 3, 3, 3, 3]), sys.byteorder)
    shm.unlink()
    _retire_default_heap()
    assert not _key_listed(iso.key)  # the heap retired, and the views are still readable
    a[:] = 5
    assert int(a.sum()) == 5 * 4096 * 3
    del a, b


def test_numpy_frombuffer_blocks_close_stdlib(iso: Iso) -> None:
    # difference: the stdlib's documented behaviour: close() raises BufferError while a
    # numpy array made by np.frombuffer(buf) is alive; ours closes (test above)
    with made(IMPLS["stdlib"], iso.name(), size=4096) as shm:
        a = np.frombuffer(shm.buf, dtype=np.uint8)
        with pytest.raises(BufferError):
            shm.close()
        del a
        shm.close()


_NDARRAY_AFTER_CLOSE = """
import sys
import numpy as np
from {module} import SharedMemory
shm = SharedMemory({name!r}, create=True, size=4096)
try:
    a = np.ndarray((4096,), dtype=np.uint8, buffer=shm.buf)  # the stdlib docs' own pattern
    shm.close()
    print("closed", flush=True)
    a[:] = 1
    print(int(a.sum()), flush=True)
finally:
    shm.unlink()
"""


@pytest.mark.parametrize("impl", list(IMPLS))
def test_numpy_ndarray_view_after_close(iso: Iso, impl: str) -> None:
    # difference: np.ndarray(buffer=shm.buf) does not hold a buffer export (numpy releases
    # it at once), so the stdlib's close() succeeds, unmaps, and the next access through
    # the array is a SIGSEGV; ours keeps the memory mapped while any view lives
    module = IMPLS[impl].__module__
    name = iso.name()
    proc = subprocess.run(
        [sys.executable, "-c", _NDARRAY_AFTER_CLOSE.format(module=module, name=name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if impl == "ours":
        assert (proc.returncode, proc.stdout.split()) == (0, ["closed", "4096"]), proc.stderr
    else:
        assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)
        assert proc.stdout.split() == ["closed"]
        # the crashed child's resource tracker unlinked its segment before run() returned
        assert not os.path.exists(f"/dev/shm/{name}")


def test_unrelated_attacher_exits_without_unregistering(iso: Iso) -> None:
    # difference: in Python 3.11 a process that merely attaches registers the name with
    # its own resource tracker, which unlinks it (with a UserWarning) when that process
    # exits; ours has no resource tracker: the name stays until its owner unlinks it
    for impl, cls in IMPLS.items():
        name = iso.name(impl)
        shm = cls(name, create=True, size=16)
        try:
            code = (
                f"from {cls.__module__} import SharedMemory\n"
                f"s = SharedMemory({name!r})\ns.buf[0] = 5\ns.close()\n"
            )
            proc = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == 0, proc.stderr
            assert shm.buf[0] == 5
            if impl == "ours":
                assert proc.stderr == ""
                assert outcome(opener(cls, name)) == ("ok", True)
            else:
                assert "resource_tracker" in proc.stderr
                assert outcome(opener(cls, name)) == ("raises", FileNotFoundError)
        finally:
            shm.close()
            try:
                shm.unlink()
            except FileNotFoundError:
                assert impl == "stdlib"
                _std_forget(name)


def test_unrelated_creator_exits_without_unlinking(iso: Iso) -> None:
    """A process that creates a name and exits without unlink(): the name goes with it.

    Same observable result (the stdlib's resource tracker unlinks it, with a
    warning; ours unlinks tracked names whose creator has gone, silently).
    """
    for impl, cls in IMPLS.items():
        name = iso.name(impl)
        code = (
            f"from {cls.__module__} import SharedMemory\n"
            f"s = SharedMemory({name!r}, create=True, size=16)\ns.buf[0] = 5\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        # difference: only the stdlib warns about it
        assert ("resource_tracker" in proc.stderr) == (impl == "stdlib"), proc.stderr
        assert outcome(opener(cls, name)) == ("raises", FileNotFoundError)


def test_default_heap_retires_after_creator_exit(iso: Iso) -> None:
    code = (
        "from sharedobj import SharedMemory\n"
        f"s = SharedMemory({iso.name()!r}, create=True, size=16)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 3
    while _key_listed(iso.key) and time.monotonic() < deadline:
        time.sleep(0.05)
    listed = _key_listed(iso.key)
    if listed:  # leave nothing behind for the teardown's leak check to report twice
        seg = segment.attach_key(iso.key)
        shmid = seg.shmid
        seg.close()
        Heap.attach(shmid).destroy()
    assert not listed


def test_context_manager_ours(iso: Iso) -> None:
    # difference: ours is a context manager (close() on exit); Python 3.11's is not
    assert not hasattr(IMPLS["stdlib"], "__enter__")
    with sharedobj.SharedMemory(iso.name(), create=True, size=8) as shm:
        shm.buf[0] = 1
        name = shm.name
    assert shm.buf is None
    sharedobj.SharedMemory(name).unlink()


def test_names_the_stdlib_refuses(iso: Iso) -> None:
    # difference: ours has no POSIX name rules ("/" inside a name is fine), but refuses
    # names the stdlib mangles: "" (stdlib: OSError EINVAL) and NUL (the stdlib silently
    # truncates the name at the NUL)
    ours, std = IMPLS["ours"], IMPLS["stdlib"]
    slashed = iso.name() + "/x"
    with made(ours, slashed, size=8) as shm:
        assert shm.name == slashed
    assert outcome(lambda: std(slashed, create=True, size=8)) == ("raises", OSError)
    assert outcome(lambda: ours("", create=True, size=8)) == ("raises", ValueError)
    assert outcome(lambda: std("", create=True, size=8)) == ("raises", OSError)
    assert outcome(lambda: ours(iso.name() + "\0x", create=True, size=8)) == ("raises", ValueError)


def test_reopen_skips_the_lookup(iso: Iso, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name this process opened before is opened again without a table lookup."""
    from sharedobj import names

    with made(sharedobj.SharedMemory, iso.name(), size=100) as shm:
        shm.buf[:4] = b"abcd"
        sharedobj.SharedMemory(shm.name).close()  # remembered here

        def no_lookup(*_a: object, **_k: object) -> int:
            raise AssertionError("looked the name up")

        with monkeypatch.context() as m:
            m.setattr(names._Table, "find", no_lookup)
            again = sharedobj.SharedMemory(shm.name)
            assert bytes(again.buf[:4]) == b"abcd" and again.size == 100
            again.buf[0] = ord("z")
            again.buf.release()  # its own view: releasing it leaves the others alone
            assert shm.buf[0] == ord("z")
            third = sharedobj.SharedMemory(shm.name)
            assert third.buf[0] == ord("z")
            third.close()
            again.close()
        shm.unlink()
        with pytest.raises(FileNotFoundError):  # the remembered entry is checked
            sharedobj.SharedMemory(shm.name)


def test_reopen_after_the_table_was_rebuilt(iso: Iso) -> None:
    first = sharedobj.SharedMemory(iso.name(), create=True, size=10)
    first.buf[:2] = b"ok"
    sharedobj.SharedMemory(first.name).close()
    heap = so_shm.default_heap()
    assert heap is not None
    table_before = heap.names._table
    from sharedobj.names import MIN_CAP

    more = MIN_CAP * 3 // 4  # past the 70% load that makes a table grow
    others = [sharedobj.SharedMemory(iso.name(), create=True, size=8) for _ in range(more)]
    try:
        assert heap.names._table is not table_before  # grown: entries moved
        again = sharedobj.SharedMemory(first.name)
        assert bytes(again.buf[:2]) == b"ok"
        again.close()
        assert heap.check() == []
    finally:
        for o in [first, *others]:
            o.close()
            o.unlink()


def test_reopen_after_a_lock_holder_died(iso: Iso) -> None:
    """A reopen that finds the heap lock's holder dead leaves the repair to the full open."""
    with made(sharedobj.SharedMemory, iso.name(), size=10) as shm:
        shm.buf[:2] = b"hi"
        sharedobj.SharedMemory(shm.name).close()
        heap = so_shm.default_heap()
        assert heap is not None
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: dies holding the heap lock
            heap._a().backend.lock()
            os.kill(os.getpid(), signal.SIGKILL)
        os.waitpid(pid, 0)
        again = sharedobj.SharedMemory(shm.name)
        assert bytes(again.buf[:2]) == b"hi"
        again.close()
        assert heap.check() == []
        reopened = sharedobj.SharedMemory(shm.name)  # and the quick way works again
        reopened.close()


def test_leak_check_sees_the_default_heap(iso: Iso) -> None:
    """The teardown's leak check is real: the key is listed while a name lives."""
    shm = sharedobj.SharedMemory(iso.name(), create=True, size=10)
    try:
        assert _key_listed(iso.key)
    finally:
        shm.close()
        shm.unlink()
    assert _key_listed(iso.key)  # kept while this process uses it, for the next block
    _retire_default_heap()
    assert not _key_listed(iso.key)


def test_default_heap_retires_when_the_last_process_leaves(iso: Iso) -> None:
    """End to end, without the test's stand-in: processes that unlink what they made leave nothing."""
    name = iso.name()
    code = (
        "import sys\nfrom sharedobj import SharedMemory\n"
        f"s = SharedMemory({name!r}, create=True, size=16)\n"
        "s.buf[0] = 1\nsys.stdin.readline()\ns.close()\ns.unlink()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _key_listed(iso.key) and time.monotonic() < deadline:
            time.sleep(0.02)
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from sharedobj import SharedMemory\nprint(SharedMemory({name!r}).buf[0])",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (other.returncode, other.stdout.strip()) == (0, "1"), other.stderr
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(60)
    assert proc.returncode == 0
    assert not _key_listed(iso.key)
