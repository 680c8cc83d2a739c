"""Parallel copies of big arrays (sharedobj.copying): same result as np.copyto, always."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from sharedobj import copying

MIN = copying.PARALLEL_MIN
_real_copyto = np.copyto


def _replace_copyto(monkeypatch: pytest.MonkeyPatch, fake: Callable[[Any, Any], None]) -> None:
    """Make copying's np.copyto ``fake`` (everything else in np stays)."""

    class FakeNumpy:
        def __getattr__(self, name: str) -> Any:
            return getattr(np, name)

        copyto = staticmethod(fake)

    monkeypatch.setattr(copying, "np", FakeNumpy())


@pytest.fixture(autouse=True)
def two_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHAREDOBJ_COPY_THREADS", "2")


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(MIN // 8, dtype=np.float64),  # exactly the threshold
        lambda: np.arange(MIN + 12_345, dtype=np.uint8),  # not a whole number of pages
        lambda: np.arange(3 * MIN // 16, dtype=np.complex128).reshape(-1, 3),
        lambda: np.asfortranarray(np.arange(MIN // 4, dtype=np.int32).reshape(1024, -1)),
        lambda: np.arange(MIN // 2) % 3 == 0,
        lambda: np.zeros(MIN // 12 + 1, dtype=[("a", "<i4"), ("b", "<f8")]),
        lambda: np.arange(MIN // 4, dtype=np.float64)[::2],  # strided: one np.copyto
        lambda: np.arange(1000.0),  # small: one np.copyto
    ],
)
def test_copyto_matches_numpy(make: Any) -> None:
    src = make()
    src.flags.writeable = False  # a read-only source is fine
    ours = np.empty_like(src, order="K")
    theirs = np.empty_like(src, order="K")
    copying.copyto(ours, src)
    np.copyto(theirs, src)
    assert ours.tobytes() == theirs.tobytes() == src.tobytes()


def test_copyto_uses_helper_threads_and_as_many_as_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: set[str] = set()

    def spy(dest: Any, src: Any) -> None:
        seen.add(threading.current_thread().name)
        _real_copyto(dest, src)

    _replace_copyto(monkeypatch, spy)
    src = np.ones(4 * MIN // 8)
    dest = np.empty_like(src)
    copying.copyto(dest, src)
    assert seen == {threading.current_thread().name, "sharedobj-copy"}
    assert np.array_equal(dest, src)
    seen.clear()
    monkeypatch.setenv("SHAREDOBJ_COPY_THREADS", "1")
    copying.copyto(dest, src)
    assert seen == {threading.current_thread().name}


@pytest.mark.parametrize("raw", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_count_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("SHAREDOBJ_COPY_THREADS", raw)
    with pytest.raises(ValueError, match="SHAREDOBJ_COPY_THREADS"):
        copying.copy_threads()


def test_the_default_is_the_usable_cpus_at_most_four(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHAREDOBJ_COPY_THREADS")
    assert copying.copy_threads() == max(1, min(4, len(os.sched_getaffinity(0))))


def test_an_interrupted_copy_still_waits_for_its_other_parts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the caller's own part raises at once (as Ctrl-C would); a helper's part
    # is still being written: copyto must not return before it is done, or the
    # caller would free a block that is still being written into
    helper_done = threading.Event()
    main = threading.current_thread()

    def slow(dest: Any, src: Any) -> None:
        if threading.current_thread() is main:
            raise KeyboardInterrupt
        time.sleep(0.3)
        _real_copyto(dest, src)
        helper_done.set()

    _replace_copyto(monkeypatch, slow)
    src = np.ones(MIN // 8)
    with pytest.raises(KeyboardInterrupt):
        copying.copyto(np.empty_like(src), src)
    assert helper_done.is_set()


def test_an_error_in_a_helper_part_is_raised_by_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    main = threading.current_thread()

    def failing(dest: Any, src: Any) -> None:
        if threading.current_thread() is not main:
            raise MemoryError("helper part failed")
        _real_copyto(dest, src)

    _replace_copyto(monkeypatch, failing)
    src = np.ones(MIN // 8)
    with pytest.raises(MemoryError, match="helper part failed"):
        copying.copyto(np.empty_like(src), src)
    monkeypatch.undo()
    monkeypatch.setenv("SHAREDOBJ_COPY_THREADS", "2")
    dest = np.empty_like(src)
    copying.copyto(dest, src)  # the helpers are still serving
    assert np.array_equal(dest, src)


def test_a_forked_child_starts_helpers_of_its_own() -> None:
    src = np.arange(MIN // 8, dtype=np.float64)
    copying.copyto(np.empty_like(src), src)  # the parent's helpers are running
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            signal_alarm = 20  # a child that hangs on the parent's helpers dies
            import signal

            signal.alarm(signal_alarm)
            dest = np.empty_like(src)
            copying.copyto(dest, src)
            code = 0 if np.array_equal(dest, src) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
