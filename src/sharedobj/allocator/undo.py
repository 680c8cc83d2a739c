"""The undo log that makes every metadata change of the allocator crash-consistent.

Every write to shared metadata made under the heap lock goes through
:class:`Txn`.  Before a word changes, its old value is appended to a log in the
root region and the log's length is bumped (the entry's commit point); only
then is the word written.  Committing an operation is one store: the log length
goes back to 0.  A process that dies (or is interrupted) anywhere in between
leaves a non-empty log; the next lock holder replays it backwards, restoring
every old value, which puts the heap back exactly as it was before the
operation.  Replaying is idempotent, so a recoverer that dies while recovering
is itself recovered by the next one.

Slot state bytes of slabs are logged in bulk (one SLOTS entry for a set of
slots that all had the same old value), because refills and flushes move dozens
of slots at once.

``fault_hook`` is the fault-injection point: it is called before every step
that writes shared memory, so a test can kill the process (or raise
KeyboardInterrupt) at step k, for every k, and check the recovery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .layout import (
    H_LOG_BLOB,
    H_LOG_COUNT,
    H_LOG_SEQ,
    LOG_BLOB_MAX,
    LOG_BLOB_OFFSET,
    LOG_ENTRY_WORDS,
    LOG_MAX,
    LOG_OFFSET,
)

fault_hook: Callable[[], None] | None = None

WORD = 1
SLOTS = 2

_E0 = LOG_OFFSET // 4


class LogFullError(RuntimeError):
    """An operation tried to log more than the log holds (a bug: operations are bounded)."""


class Regions:
    """How the log reaches a region by number: views the owner keeps per process."""

    def words(self, region: int) -> memoryview:  # pragma: no cover - interface
        raise NotImplementedError

    def bytes_(self, region: int) -> memoryview:  # pragma: no cover - interface
        raise NotImplementedError


class Txn:
    """One operation's logged writes.  Use only while holding the heap lock."""

    __slots__ = ("after_commit", "blob16", "on_rollback", "regions", "root32")

    def __init__(self, root32: memoryview, blob16: memoryview, regions: Regions) -> None:
        self.root32 = root32
        self.blob16 = blob16
        self.regions = regions
        self.after_commit: list[Callable[[], Any]] = []  # run under the lock, once committed
        self.on_rollback: list[Callable[[], Any]] = []  # undo what the log cannot (new segments)

    def set(self, region: int, view: memoryview, index: int, value: int) -> None:
        """view[index] = value, logged; ``view`` is ``regions.words(region)``."""
        old = view[index]
        if old == value:
            return
        hook = fault_hook
        if hook is not None:
            hook()
        root = self.root32
        n = root[H_LOG_COUNT]
        if n >= LOG_MAX:
            raise LogFullError(f"undo log full ({LOG_MAX} entries)")
        e = _E0 + n * LOG_ENTRY_WORDS
        root[e + 7] = _seq(root, n)
        root[e] = WORD
        root[e + 1] = region
        root[e + 2] = index & 0xFFFFFFFF
        root[e + 3] = index >> 32
        root[e + 4] = old
        if hook is not None:
            hook()
        root[H_LOG_COUNT] = n + 1
        if hook is not None:
            hook()
        view[index] = value

    def slots(
        self,
        region: int,
        state_offset: int,
        indices: Sequence[int] | np.ndarray,
        old: int,
        new: int,
    ) -> None:
        """Set the state bytes at ``state_offset + i`` (each currently ``old``) to ``new``."""
        count = len(indices)
        if count == 0:
            return
        hook = fault_hook
        if hook is not None:
            hook()
        root = self.root32
        n = root[H_LOG_COUNT]
        if n >= LOG_MAX:
            raise LogFullError("undo log full")
        seq = _seq(root, n)
        used = root[H_LOG_BLOB]
        if used + count > LOG_BLOB_MAX:
            raise LogFullError("undo log full")
        idx = np.asarray(indices, dtype=np.uint16)
        blob = np.frombuffer(self.blob16, dtype=np.uint16)
        blob[used : used + count] = idx
        e = _E0 + n * LOG_ENTRY_WORDS
        root[e + 7] = seq
        root[e] = SLOTS
        root[e + 1] = region
        root[e + 2] = state_offset & 0xFFFFFFFF
        root[e + 3] = state_offset >> 32
        root[e + 4] = old
        root[e + 5] = used
        root[e + 6] = count
        root[H_LOG_BLOB] = used + count
        if hook is not None:
            hook()
        root[H_LOG_COUNT] = n + 1
        if hook is not None:
            hook()
        state = np.frombuffer(
            self.regions.bytes_(region),
            dtype=np.uint8,
            count=int(idx.max()) + 1,
            offset=state_offset,
        )
        state[idx] = new

    def commit(self) -> None:
        if not self.root32[H_LOG_COUNT]:
            return  # nothing was written: nothing to commit
        hook = fault_hook
        if hook is not None:
            hook()
        self.root32[H_LOG_COUNT] = 0
        _retire_entries(self.root32)


def _seq(root: memoryview, n: int) -> int:
    """The operation number for log entry ``n``: a new one for an operation's first entry.

    Entries are never erased (committing only zeroes the length), so a length
    damaged by a stray write would make recovery replay old entries, undoing
    operations that committed long ago.  Each entry carries its operation's
    number; recovery replays only entries of the current one.  The number
    moves on after every commit or rollback, and again before an operation's
    first entry (a commit cut short before its bump leaves no current entry).
    """
    if n:
        return int(root[H_LOG_SEQ])
    _retire_entries(root)
    return int(root[H_LOG_SEQ])


def _retire_entries(root: memoryview) -> None:
    """Make every entry in the log stale (the length is 0 already)."""
    root[H_LOG_BLOB] = 0
    root[H_LOG_SEQ] = (root[H_LOG_SEQ] + 1) & 0xFFFFFFFF


def pending(root32: memoryview) -> int:
    return int(root32[H_LOG_COUNT])


def _corrupt(message: str) -> Exception:
    from ..errors import CorruptHeapError

    return CorruptHeapError(message)


def rollback(root32: memoryview, blob16: memoryview, regions: Regions) -> int:
    """Undo a half-done operation; returns how many entries were replayed.

    Every entry is validated before any is replayed, so a damaged log is
    reported (CorruptHeapError) without writing anything, never replayed into
    a wrong place.
    """
    n = int(root32[H_LOG_COUNT])
    if n > LOG_MAX:
        raise _corrupt(f"undo log length {n} exceeds its capacity {LOG_MAX}")
    seq = root32[H_LOG_SEQ]
    blob = np.frombuffer(blob16, dtype=np.uint16)
    steps: list[tuple[memoryview, int, int, np.ndarray | None]] = []
    for k in range(n):
        e = _E0 + k * LOG_ENTRY_WORDS
        kind, region = root32[e], root32[e + 1]
        index = root32[e + 2] | (root32[e + 3] << 32)
        old = root32[e + 4]
        if root32[e + 7] != seq:
            raise _corrupt(
                f"undo log entry {k} of {n} belongs to another operation (damaged log length?)"
            )
        if kind == WORD:
            view = regions.words(region)
            if index >= len(view):
                raise _corrupt(f"undo log entry {k} points past its region ({index})")
            steps.append((view, index, old, None))
        elif kind == SLOTS:
            start, count = root32[e + 5], root32[e + 6]
            if start + count > LOG_BLOB_MAX or old > 0xFF:
                raise _corrupt(f"undo log entry {k} has a damaged slot list")
            idx = blob[start : start + count]
            if count:
                buf = regions.bytes_(region)
                if index + int(idx.max()) >= len(buf):
                    raise _corrupt(f"undo log entry {k} points past its region ({index})")
                steps.append((buf, index, old, idx))
        else:
            raise _corrupt(f"undo log entry {k} has unknown type {kind}")
    for view, index, old, idx in reversed(steps):
        if idx is None:
            view[index] = old
        else:
            state = np.frombuffer(view, dtype=np.uint8, count=int(idx.max()) + 1, offset=index)
            state[idx] = old
    root32[H_LOG_COUNT] = 0
    _retire_entries(root32)
    return n


def blob_view(root: memoryview) -> memoryview:
    return root[LOG_BLOB_OFFSET : LOG_BLOB_OFFSET + 2 * LOG_BLOB_MAX].cast("H")
