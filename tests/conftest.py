"""Fixtures shared by the test suite.

Tests run in parallel under pytest-xdist, so nothing here uses fixed IPC keys,
and everything a test creates is removed in a finalizer even when it fails.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from sharedobj import _libc, limits


@pytest.fixture(autouse=True, scope="session")
def _private_default_heap() -> Iterator[None]:
    """Each test process gets its own default heap (a random SysV key), removed at the end.

    Tests run in parallel and must not share, or leave behind, the user's
    real default heap.
    """
    key = 0x5000_0000 | secrets.randbelow(0x0FFF_FFFF)
    os.environ["SHAREDOBJ_DEFAULT_KEY"] = str(key)
    yield
    from sharedobj import shared_memory

    heap = shared_memory._default
    if heap is not None and not heap.closed:
        heap.destroy()
    shared_memory._default = None
    remove_default_heap(key)


def remove_default_heap(key: int) -> None:
    """Remove the default heap of SysV key ``key`` if a test (or its subprocess) left one."""
    from sharedobj import Heap, segment

    try:
        seg = segment.attach_key(key)
    except FileNotFoundError:
        return
    try:
        Heap.attach(seg.shmid, register=False).destroy()
    except Exception:
        seg.remove()
    finally:
        seg.close()


@pytest.fixture
def shm_ids() -> Iterator[list[int]]:
    """Shmids a test made without auto_remove: all are IPC_RMID'd at teardown."""
    ids: list[int] = []
    yield ids
    lib = _libc.libc()
    for shmid in ids:
        lib.shmctl(shmid, _libc.IPC_RMID, None)


def maps_for(shmid: int) -> int:
    """How many mappings of ``shmid`` /proc/self/maps lists."""
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/SYSV") and int(parts[4]) == shmid:
                n += 1
    return n


def shm_exists(shmid: int) -> bool:
    return limits.segment_info(shmid) is not None


@functools.cache
def _unshare_works() -> bool:
    if not limits.can_unshare_ipc() or shutil.which("unshare") is None:
        return False
    try:
        return (
            subprocess.run(["unshare", "--ipc", "true"], capture_output=True, timeout=10).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


needs_unshare = pytest.mark.skipif(
    not _unshare_works(),
    reason="needs root and `unshare --ipc` for a private IPC namespace",
)


def run_python(code: str, *, sysctl: dict[str, int] | None = None, timeout: float = 60) -> Any:
    """Run ``code`` in a fresh interpreter and return the JSON it prints last.

    With ``sysctl`` the interpreter runs in a private IPC namespace
    (``unshare --ipc``) whose kernel.shm*/sem limits are set first; every
    segment made there dies with the namespace, so nothing can leak.
    """
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    if sysctl is not None:
        writes = " && ".join(f"echo {v} > /proc/sys/kernel/{k}" for k, v in sysctl.items())
        script = f'{writes} && exec "$@"' if writes else 'exec "$@"'
        cmd = ["unshare", "--ipc", "sh", "-c", script, "sh", *cmd]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def crash_points(label: str, n: int) -> None:
    """Record that a SIGKILL enumeration covered ``n`` crash points of ``label``.

    With ``SHAREDOBJ_CRASH_REPORT=FILE`` every crash test appends a JSON line
    there, which is how docs/reliability.md counts the crash points enumerated.
    """
    path = os.environ.get("SHAREDOBJ_CRASH_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"op": label, "points": n}) + "\n")


def run_killed_at(module: Any, op: Any, k: int) -> bool:
    """Run ``op()`` in a forked child that SIGKILLs itself at step ``k``; True if it ran to the end.

    The steps are the calls of ``module.fault_hook``, which every crash-safe
    layer calls before each write to shared memory.  An exception in the child
    fails the test; a kill leaves the shared state for the caller to check.
    """
    import signal

    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        count = [0]

        def hook() -> None:
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)

        module.fault_hook = hook
        try:
            op()
        except BaseException:
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, f"the operation failed in the child (step {k})"
        return True
    assert os.WTERMSIG(status) == signal.SIGKILL, f"the child died of signal {os.WTERMSIG(status)}"
    return False


def give_away(shmid: int, uid: int) -> None:
    """IPC_SET the owner of a segment to another user (root only)."""
    import ctypes

    buf = ctypes.create_string_buffer(_libc.SHMID_DS_SIZE)
    lib = _libc.libc()
    assert lib.shmctl(shmid, _libc.IPC_STAT, buf) == 0
    ctypes.c_uint32.from_buffer(buf, _libc.SHMID_DS_UID).value = uid
    assert lib.shmctl(shmid, 1, buf) == 0  # IPC_SET


@pytest.fixture
def smm() -> Iterator[Any]:
    """A started SharedMemoryManager, shut down after the test even when it fails."""
    from sharedobj import SharedMemoryManager

    manager = SharedMemoryManager()
    manager.start()
    try:
        yield manager
    finally:
        manager.shutdown()


@pytest.fixture(scope="module")
def std_manager() -> Iterator[Any]:
    """The stdlib's ``multiprocessing.Manager()``: the oracle of the differential tests."""
    import multiprocessing as mp

    manager = mp.get_context("fork").Manager()
    try:
        yield manager
    finally:
        manager.shutdown()
