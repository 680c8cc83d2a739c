"""Copying a big array into shared memory with more than one core.

Why: the one copy sharedobj makes of a private array (a queue's copy-in,
``smm.asarray``) is most of the cost of handing it over, and one core moves
only part of what the memory can take: on the 2-core development machine one
thread copied 16 MiB at 8-11 GB/s, two threads copying halves at 17-19 GB/s.

How: an array of :data:`PARALLEL_MIN` bytes or more, contiguous on both
sides, is cut into byte ranges; helper threads (started on first use, and
again in a forked child, which inherits none) copy all but the first, which
the calling thread copies itself.  numpy lets go of the GIL while it copies
plain data, so the parts run at once.  The caller always waits for every part,
even when interrupted: a part still being written into a block that an
exception then frees would land in whatever gets that memory next.

``SHAREDOBJ_COPY_THREADS`` sets the number of threads per copy, the caller
included (default: the CPUs this process may run on, at most 4; 1 turns
helpers off).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from typing import Any

import numpy as np

__all__ = ["PARALLEL_MIN", "copy_threads", "copyto"]

#: Smaller copies go in one call: handing a part to a thread costs tens of microseconds.
PARALLEL_MIN = 8 << 20
_PART_MIN = 2 << 20  # no part smaller than this
_MAX_THREADS = 4

_lock = threading.Lock()
_tasks: queue.SimpleQueue[tuple[Any, Any, _Part]] | None = None
_started = 0  # helper threads running in this process


class _Part:
    """One part handed to a helper: its outcome, and a lock released when it is done."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.error: BaseException | None = None


def copy_threads() -> int:
    """Threads a big copy uses, the caller included (``SHAREDOBJ_COPY_THREADS`` or the CPUs)."""
    raw = os.environ.get("SHAREDOBJ_COPY_THREADS", "")
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(
                f"SHAREDOBJ_COPY_THREADS must be a whole number of threads, not {raw!r}"
            ) from None
        if n < 1:
            raise ValueError(f"SHAREDOBJ_COPY_THREADS must be at least 1, not {n}")
        return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(_MAX_THREADS, cpus))


def _helper(tasks: queue.SimpleQueue[tuple[Any, Any, _Part]]) -> None:
    while True:
        dest, src, part = tasks.get()
        try:
            np.copyto(dest, src)
        except BaseException as exc:  # reported to the caller, never lost
            part.error = exc
        finally:
            part.done.release()


def _queue_for(helpers: int) -> queue.SimpleQueue[tuple[Any, Any, _Part]]:
    global _tasks, _started
    with _lock:
        if _tasks is None:
            _tasks = queue.SimpleQueue()
        while _started < helpers:
            threading.Thread(
                target=_helper, args=(_tasks,), name="sharedobj-copy", daemon=True
            ).start()
            _started += 1
        return _tasks


def _after_fork() -> None:
    global _tasks, _started, _lock
    _lock = threading.Lock()
    _tasks = None  # the parent's helpers do not exist here
    _started = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def copyto(dest: np.ndarray, src: np.ndarray) -> None:
    """``np.copyto(dest, src)``, in parallel parts when both are big and laid out alike."""
    n = src.nbytes
    if n < PARALLEL_MIN or dest.shape != src.shape or dest.dtype != src.dtype:
        np.copyto(dest, src)
        return
    if dest.flags.c_contiguous and src.flags.c_contiguous:
        flat_dest, flat_src = dest.reshape(-1), src.reshape(-1)
    elif dest.flags.f_contiguous and src.flags.f_contiguous:
        flat_dest, flat_src = dest.T.reshape(-1), src.T.reshape(-1)
    else:
        np.copyto(dest, src)
        return
    parts = min(copy_threads(), n // _PART_MIN)
    if parts < 2 or src.dtype.hasobject:
        np.copyto(dest, src)
        return
    d = flat_dest.view(np.uint8)
    s = flat_src.view(np.uint8)
    per = -(-n // parts)
    step = -(-per // 4096) * 4096  # parts start on page boundaries of the block
    bounds = [*range(0, n, step), n]
    tasks = _queue_for(len(bounds) - 2)
    handed = []
    for lo, hi in itertools.pairwise(bounds[1:]):
        part = _Part()
        tasks.put((d[lo:hi], s[lo:hi], part))
        handed.append(part)
    error: BaseException | None = None
    try:
        np.copyto(d[: bounds[1]], s[: bounds[1]])
    except BaseException as exc:
        error = exc
    for part in handed:
        while True:
            try:
                part.done.acquire()
                break
            except BaseException as exc:  # Ctrl-C: still wait, then raise it
                error = error or exc
        error = error or part.error
    if error is not None:
        raise error
