"""The segment layer: lifecycle, attach cache, views, auto-remove, spans, errors."""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import maps_for, needs_unshare, run_python, shm_exists
from sharedobj import IPCLimitError, UnsupportedPlatformError, _libc, limits, segment

PAGE = limits.PAGE_SIZE


# --------------------------------------------------------------------------
# lifecycle


def test_create_is_zeroed_page_rounded_and_private() -> None:
    seg = segment.create(10_000)
    try:
        assert seg.size == 3 * PAGE
        assert len(seg.buf) == seg.size
        assert bytes(seg.buf[:16]) == b"\0" * 16  # the kernel zero-fills; no memset to spaces
        info = seg.stat()[0]
        assert info.mode & 0o777 == 0o600
        assert info.marked_for_removal  # auto_remove is the default
        assert info.key == 0  # IPC_PRIVATE
        assert info.cpid == os.getpid()
    finally:
        seg.close()


def test_owners_agree_with_the_kernel_listing() -> None:
    seg = segment.create(PAGE)
    try:
        info = seg.stat()[0]
        assert segment.owners(seg.shmid) == (info.uid, info.cuid) == (os.geteuid(),) * 2
    finally:
        seg.close()
    with pytest.raises(OSError):
        segment.owners(0x7FFF_FFF0)  # no such segment


def test_mode_is_applied(shm_ids: list[int]) -> None:
    seg = segment.create(PAGE, mode=0o640, auto_remove=False)
    shm_ids.extend(seg.ids)
    assert seg.stat()[0].mode & 0o777 == 0o640
    assert not seg.stat()[0].marked_for_removal
    seg.close()


def test_close_remove_and_reattach(shm_ids: list[int]) -> None:
    seg = segment.create(PAGE, auto_remove=False)
    shm_ids.extend(seg.ids)
    seg.buf[:5] = b"hello"
    shmid = seg.shmid
    seg.close()
    assert seg.closed
    with pytest.raises(ValueError, match="closed"):
        _ = seg.buf
    gc.collect()
    assert maps_for(shmid) == 0  # detached: nothing referred to the mapping
    assert shm_exists(shmid)  # but not removed
    again = segment.attach(shmid)
    assert bytes(again.buf[:5]) == b"hello"
    again.remove()
    assert limits.segment_info(shmid).marked_for_removal  # type: ignore[union-attr]
    again.remove()  # idempotent
    again.close()
    gc.collect()
    assert not shm_exists(shmid)


def test_noreserve_huge_heap_is_lazy() -> None:
    t0 = time.perf_counter()
    seg = segment.create(64 << 30, noreserve=True)
    elapsed = time.perf_counter() - t0
    try:
        assert seg.size == 64 << 30
        assert seg.stat()[0].rss == 0
        seg.buf[5 << 30] = 1  # one page becomes resident, nothing else
        assert seg.stat()[0].rss == PAGE
    finally:
        seg.close()
    assert elapsed < 1.0, "creating a reserved-only segment must not touch its pages"


def test_context_manager_and_repr() -> None:
    with segment.create(PAGE) as seg:
        assert "shmid" in repr(seg)
    assert seg.closed
    assert "closed" in repr(seg)


def test_discard_returns_pages_and_zeroes() -> None:
    with segment.create(16 * PAGE) as seg:
        seg.buf[:] = b"\x01" * seg.size
        assert seg.stat()[0].rss == 16 * PAGE
        seg.discard(PAGE + 1, 8 * PAGE)  # only whole pages inside the range go
        assert seg.stat()[0].rss == 9 * PAGE  # pages 2..8 went back to the kernel
        assert seg.buf[PAGE + 1] == 1
        assert seg.buf[2 * PAGE] == 0 and seg.buf[8 * PAGE] == 0  # (reading re-faults them)
        assert seg.buf[9 * PAGE] == 1
        with pytest.raises(ValueError, match="outside"):
            seg.discard(0, 17 * PAGE)


def test_populate() -> None:
    with segment.create(64 * PAGE) as seg:
        assert seg.populate(write=True) in (True, False)
        if seg.populate():
            assert seg.stat()[0].rss == 64 * PAGE


def test_readonly_attach() -> None:
    with segment.create(PAGE) as seg:
        seg.buf[0] = 42
        ro = segment.attach(seg.shmid, readonly=True)
        assert ro.buf.readonly
        assert ro.buf[0] == 42
        with pytest.raises(TypeError):
            ro.buf[0] = 1
        ro.close()


# --------------------------------------------------------------------------
# the attach cache and views


def test_ten_thousand_attaches_leave_one_mapping() -> None:
    with segment.create(PAGE) as seg:
        handles = [segment.attach(seg.shmid) for _ in range(10_000)]
        assert maps_for(seg.shmid) == 1
        assert {h.address for h in handles} == {seg.address}
        for h in handles:
            h.close()
        handles.clear()
        assert maps_for(seg.shmid) == 1  # seg still holds it
    gc.collect()
    assert maps_for(seg.shmid) == 0


def test_views_outlive_close() -> None:
    seg = segment.create(4 * PAGE)
    shmid = seg.shmid
    arr = np.frombuffer(seg.buf, dtype=np.uint64)
    sub = seg.buf[PAGE : 2 * PAGE]
    arr[:] = 7
    seg.close()
    del seg
    gc.collect()
    assert maps_for(shmid) == 1  # views keep the mapping
    assert int(arr.sum()) == 7 * arr.size
    arr[0] = 9
    assert sub[0] == 7
    del arr
    gc.collect()
    assert maps_for(shmid) == 1  # the memoryview slice still holds it
    assert bytes(sub[:1]) == b"\x07"
    del sub
    gc.collect()
    assert maps_for(shmid) == 0
    assert not shm_exists(shmid)  # auto_remove: freed at the last detach


def test_reattach_while_views_alive_reuses_mapping() -> None:
    seg = segment.create(PAGE)
    view = np.frombuffer(seg.buf, dtype=np.uint8)
    shmid = seg.shmid
    seg.close()
    again = segment.attach(shmid)
    assert maps_for(shmid) == 1
    view[3] = 5
    assert again.buf[3] == 5
    again.close()
    del view


def _child_writes(seg: segment.Segment, offset: int, value: int) -> None:
    seg.buf[offset : offset + 8] = struct.pack("<Q", value)
    seg.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pickled_handle_reattaches_in_child(method: str) -> None:
    with segment.create(2 * PAGE) as seg:
        ctx = mp.get_context(method)
        p = ctx.Process(target=_child_writes, args=(seg, 100, 0xDEADBEEF))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        assert struct.unpack_from("<Q", seg.buf, 100)[0] == 0xDEADBEEF
        assert len(pickle.dumps(seg)) < 128


# --------------------------------------------------------------------------
# auto-remove and crashes


_HOLDER = """
import os, sys, time
from sharedobj import segment
if sys.argv[1] == "create":
    seg = segment.create(1 << 20, auto_remove=sys.argv[2] == "1")
    seg.buf[0] = 1
else:
    seg = segment.attach(int(sys.argv[1]))
print(seg.shmid, flush=True)
time.sleep(600)
"""


def _start_holder(*args: str) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, *args], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, int(p.stdout.readline())


def _wait_gone(shmid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not shm_exists(shmid):
            return True
        time.sleep(0.01)
    return False


def test_auto_remove_after_sigkill_of_every_process() -> None:
    creator, shmid = _start_holder("create", "1")
    other, same = _start_holder(str(shmid))
    try:
        assert same == shmid
        info = limits.segment_info(shmid)
        assert info is not None and info.nattch == 2 and info.marked_for_removal
        creator.kill()
        creator.wait()
        time.sleep(0.05)
        assert shm_exists(shmid), "still attached by the other process"
        other.kill()
        other.wait()
        assert _wait_gone(shmid)
    finally:
        for p in (creator, other):
            p.kill()
            p.wait()


def test_without_auto_remove_survives_sigkill(shm_ids: list[int]) -> None:
    creator, shmid = _start_holder("create", "0")
    shm_ids.append(shmid)
    creator.kill()
    creator.wait()
    time.sleep(0.05)
    assert shm_exists(shmid)
    seg = segment.attach(shmid)
    assert seg.buf[0] == 1
    seg.remove()
    seg.close()
    gc.collect()
    assert _wait_gone(shmid)


# --------------------------------------------------------------------------
# spans


def test_span_through_max_segment_size() -> None:
    size = 5 * PAGE + 1
    with segment.create(size, max_segment_size=2 * PAGE) as span:
        assert span.is_span
        assert span.sizes == (2 * PAGE, 2 * PAGE, 2 * PAGE)
        assert span.size == 6 * PAGE
        span.buf[:] = bytes(range(256)) * (span.size // 256)
        assert bytes(span.buf[2 * PAGE - 2 : 2 * PAGE + 2]) == bytes([254, 255, 0, 1])
        for shmid in span.ids:
            assert maps_for(shmid) == 1
    gc.collect()
    for shmid in span.ids:
        assert maps_for(shmid) == 0
        assert not shm_exists(shmid)


def test_span_with_uneven_last_piece() -> None:
    with segment.create(5 * PAGE, max_segment_size=2 * PAGE + 100) as span:
        assert span.sizes == (2 * PAGE, 2 * PAGE, PAGE)


def _child_u64_across_boundary(span: segment.Segment, offset: int) -> None:
    struct.pack_into("<Q", span.buf, offset, 0x0102030405060708)
    # and read back the parent's value across the next boundary
    got = struct.unpack_from("<Q", span.buf, 2 * PAGE - 4)[0]
    struct.pack_into("<Q", span.buf, 0, got)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_u64_across_segment_boundary_between_processes(method: str) -> None:
    with segment.create(3 * PAGE, max_segment_size=PAGE) as span:
        struct.pack_into("<Q", span.buf, 2 * PAGE - 4, 0xA1A2A3A4B1B2B3B4)
        p = mp.get_context(method).Process(target=_child_u64_across_boundary, args=(span, PAGE - 4))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        assert struct.unpack_from("<Q", span.buf, PAGE - 4)[0] == 0x0102030405060708
        assert struct.unpack_from("<Q", span.buf, 0)[0] == 0xA1A2A3A4B1B2B3B4


def test_span_numpy_view_is_contiguous() -> None:
    with segment.create(8 * PAGE, max_segment_size=PAGE) as span:
        arr = np.frombuffer(span.buf, dtype=np.float64)
        arr[:] = np.arange(arr.size)
        assert arr.sum() == arr.size * (arr.size - 1) / 2
        del arr


def test_split_disabled_names_the_limit() -> None:
    with pytest.raises(ValueError, match=r"max_segment_size = 8192 bytes.*split=False"):
        segment.create(3 * PAGE, max_segment_size=2 * PAGE, split=False)


def test_max_segment_size_below_a_page() -> None:
    with pytest.raises(ValueError, match="below one page"):
        segment.create(PAGE, max_segment_size=100)


@needs_unshare
def test_span_under_small_shmmax_in_private_namespace() -> None:
    out = run_python(
        """
        import json, struct
        from sharedobj import segment
        span = segment.create(5 << 20)
        struct.pack_into("<Q", span.buf, (1 << 20) - 4, 2**63 + 5)
        back = segment.attach(span.ids)          # cached: same mapping
        try:
            segment.create(2 << 20, split=False)
            err = None
        except ValueError as e:
            err = str(e)
        print(json.dumps({"sizes": list(span.sizes), "same": back.address == span.address,
                          "u64": struct.unpack_from("<Q", span.buf, (1 << 20) - 4)[0], "err": err}))
        """,
        sysctl={"shmmax": 1 << 20},
    )
    assert out["sizes"] == [1 << 20] * 5
    assert out["same"]
    assert out["u64"] == 2**63 + 5
    assert "SHMMAX" in out["err"] and "1048576" in out["err"] and "kernel.shmmax" in out["err"]


# --------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("size", "exc"),
    [
        (0, ValueError),
        (-1, ValueError),
        (1.5, TypeError),
        ("10", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_create_bad_size(size: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="size"):
        segment.create(size)  # type: ignore[arg-type]


def test_create_bad_mode_and_key() -> None:
    with pytest.raises(ValueError, match="mode"):
        segment.create(PAGE, mode=0o1777)
    with pytest.raises(ValueError, match="key"):
        segment.create(PAGE, key=-5)


def test_attach_missing_and_bad_ids() -> None:
    with segment.create(PAGE) as seg:
        gone = seg.shmid
    gc.collect()
    assert not shm_exists(gone)
    with pytest.raises(FileNotFoundError, match=str(gone)):
        segment.attach(gone)
    with pytest.raises(FileNotFoundError):
        segment.attach(-1)
    with pytest.raises(FileNotFoundError):
        segment.attach(2**31 - 1)
    with pytest.raises(TypeError):
        segment.attach("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        segment.attach(True)
    with pytest.raises(ValueError):
        segment.attach([])
    with pytest.raises(FileNotFoundError):
        segment.attach_key(0x7FFFFFF0 - os.getpid())  # nobody uses keys this way


def test_random_key_and_exclusive_create() -> None:
    seg = segment.create(PAGE, random_key=True, auto_remove=False)
    try:
        key = seg.stat()[0].key
        assert key != 0
        other = segment.attach_key(key)
        assert other.address == seg.address
        other.close()
        with pytest.raises(FileExistsError, match="already exists"):
            segment.create(PAGE, key=key)
    finally:
        seg.remove()
        seg.close()


def test_over_ram_without_noreserve_is_memoryerror() -> None:
    # 64 GiB of swap-backed reservation on a machine with less RAM + swap.
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with open("/proc/sys/vm/overcommit_memory") as f:
        if f.read().strip() == "1":
            pytest.skip("vm.overcommit_memory=1 accepts any reservation")
    with pytest.raises(MemoryError, match="noreserve"):
        segment.create(total * 4)


def _attach_as_nobody(ids: mp.Queue, q: mp.Queue) -> None:  # type: ignore[type-arg]
    os.setgid(65534)
    os.setuid(65534)
    shmid = ids.get(timeout=30)  # made after this child forked: not in its attach cache
    try:
        segment.attach(shmid)
        q.put("attached")
    except PermissionError as e:
        q.put(f"PermissionError: {e}")
    except Exception as e:  # pragma: no cover - reported to the parent
        q.put(f"{type(e).__name__}: {e}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_other_user_gets_permission_error() -> None:
    ctx = mp.get_context("fork")
    ids, q = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_attach_as_nobody, args=(ids, q))
    p.start()
    try:
        with segment.create(PAGE) as seg:
            ids.put(seg.shmid)
            result = q.get(timeout=30)
        assert result.startswith("PermissionError") and str(seg.shmid) in result
    finally:
        p.join(30)


def test_address_space_exhaustion_is_memoryerror() -> None:
    code = """
    import json, resource
    from sharedobj import segment
    seg = segment.create(256 << 20, noreserve=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), hard))
    try:
        segment.attach(seg.shmid, readonly=True)   # a second, distinct mapping
        print(json.dumps("attached"))
    except MemoryError as e:
        print(json.dumps("MemoryError: " + str(e)))
    """
    out = run_python(code)
    assert out.startswith("MemoryError") and "address space" in out


@needs_unshare
def test_shmmni_exhausted_names_limit_and_leaks_nothing() -> None:
    out = run_python(
        """
        import json
        from sharedobj import segment, limits, IPCLimitError
        held = [segment.create(4096) for _ in range(3)]
        try:
            segment.create(5 * 4096, max_segment_size=4096)   # a span needs 5 more ids
            res = None
        except IPCLimitError as e:
            res = {"limit": e.limit, "value": e.value, "sysctl": e.sysctl, "msg": str(e)}
        left = len(limits.list_segments())
        held[0].buf[0] = 1                                       # open ones keep working
        print(json.dumps({"err": res, "left": left, "ok": held[0].buf[0] == 1}))
        """,
        sysctl={"shmmni": 5},
    )
    err = out["err"]
    assert err is not None and err["limit"] == "SHMMNI" and err["value"] == 5
    assert err["sysctl"] == "kernel.shmmni" and "kernel.shmmni" in err["msg"] and "5" in err["msg"]
    assert out["left"] == 3, "the partly built span must be removed"
    assert out["ok"]


@needs_unshare
def test_shmall_exhausted_names_limit() -> None:
    out = run_python(
        """
        import json
        from sharedobj import segment, IPCLimitError
        a = segment.create(64 * 4096)
        try:
            segment.create(128 * 4096)
            res = None
        except IPCLimitError as e:
            res = {"limit": e.limit, "value": e.value, "msg": str(e), "errno": e.errno}
        print(json.dumps(res))
        """,
        sysctl={"shmall": 100},
    )
    assert out["limit"] == "SHMALL" and out["value"] == 100
    assert "kernel.shmall" in out["msg"] and "100 pages" in out["msg"]
    assert out["errno"] == 28  # ENOSPC, still an OSError


def test_ipclimiterror_is_oserror() -> None:
    assert issubclass(IPCLimitError, OSError)


def test_unsupported_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    _libc.libc.cache_clear()
    monkeypatch.setattr(sys, "platform", "darwin")
    try:
        with pytest.raises(UnsupportedPlatformError, match="needs Linux"):
            segment.create(PAGE)
    finally:
        monkeypatch.undo()
        _libc.libc.cache_clear()
    with segment.create(PAGE):
        pass


def test_import_works_without_linux() -> None:
    code = textwrap.dedent(
        """
        import sys, json
        sys.platform = "darwin"
        import sharedobj, sharedobj.segment
        try:
            sharedobj.segment.create(4096)
        except sharedobj.UnsupportedPlatformError as e:
            print(json.dumps(str(e)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "needs Linux" in json.loads(out.stdout.strip().splitlines()[-1])


def test_fork_child_shares_attachment() -> None:
    with segment.create(PAGE) as seg:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                again = segment.attach(seg.shmid)
                ok = again.address == seg.address and maps_for(seg.shmid) == 1
                os.write(w, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        os.waitpid(pid, 0)


def test_auto_removed_span_vanishes_after_sigkill() -> None:
    # Every piece is marked IPC_RMID as soon as it is attached, so a killed
    # creator leaves none of its 64 segments behind.
    code = """
    import sys, time
    from sharedobj import segment
    span = segment.create(64 * 4096, max_segment_size=4096)
    print(",".join(map(str, span.ids)), flush=True)
    time.sleep(600)
    """
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None
        ids = [int(x) for x in p.stdout.readline().split(",")]
        assert len(ids) == 64
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        for shmid in ids:
            assert _wait_gone(shmid)
    finally:
        p.kill()
        p.wait()


def test_ids_the_kernel_would_truncate_are_refused() -> None:
    with segment.create(PAGE) as seg, pytest.raises(FileNotFoundError):
        segment.attach(seg.shmid + 2**32)  # would be the same segment once truncated


def test_a_span_of_more_pieces_than_a_heap_could_hold_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="pieces"):
        segment.create(2**62, max_segment_size=1 << 20, noreserve=True)
