"""The allocator: small blocks from slabs through per-process magazines, page runs, huge blocks.

Pure logic over buffers.  It reaches memory and the operating system only
through a :class:`Backend` (the heap supplies System V segments and a robust
mutex; the tests supply bytearrays and a thread lock), so every rule here can
be tested without SysV.

Concurrency.  Shared metadata changes only under the heap lock, inside a
:class:`~sharedobj.allocator.undo.Txn`.  The one exception is the state byte of
a slab slot that a process holds in its magazine: it moves between "cached by
me" and "allocated, tag g" without the lock, because only the holder touches
it and the lock holder only ever looks for free (zero) bytes.  So a small
alloc or free is a list pop/append plus one byte store, and the lock is taken
once per batch of allocations (a refill or a flush moves up to 64 slots).

Crash consistency.  Every locked write is undo-logged; the next lock holder
rolls a half-done operation back (see undo.py).  Blocks cached by a process
that died carry its cache id in their state byte and are reclaimed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import CorruptHeapError, StaleHandleError
from ..limits import PAGE_SIZE
from . import undo
from .classes import CLASS_BY_GRANULE, CLASS_SIZES, NCLASSES, SLAB_GEOMETRY, SLAB_HEADER
from .layout import (
    A_FRONTIER,
    A_ROOT_CTIME,
    A_ROOT_ID,
    ARENA_DEAD,
    ARENA_LIVE,
    FLAG_AUTO_REMOVE,
    FLAG_NORESERVE,
    H_ARENA_COUNT,
    H_ARENA_SIZE,
    H_CREATED_NS,
    H_CREATOR_PID,
    H_DIRTY_MAX,
    H_EPOCH,
    H_FLAGS,
    H_GEN,
    H_HUGE_THRESHOLD,
    H_IDS_USED,
    H_INFLIGHT,
    H_LOG_COUNT,
    H_MAX_SEGMENT,
    H_MAX_SIZE,
    H_MODE,
    H_OWNER_UID,
    H_PAGE_SIZE,
    H_ROOT_SIZE,
    H_VERSION,
    IDS_OFFSET,
    KIND_GENERAL,
    KIND_HUGE,
    LAYOUT_VERSION,
    LEN_MASK,
    LOG_MAX,
    MAGIC_ROOT,
    MAX_ARENAS,
    MAX_IDS,
    MAX_PROCS,
    NIL,
    R_PID,
    R_SEEN,
    R_START,
    R_STATE,
    REGISTRY_ENTRY_WORDS,
    REGISTRY_OFFSET,
    ROOT_SIZE,
    T_EPOCH,
    T_GEN,
    T_IDS_OFF,
    T_KIND,
    T_NBYTES,
    T_NIDS,
    T_PENDING,
    T_SIZE,
    T_STATE,
    TABLE_ENTRY_WORDS,
    TABLE_OFFSET,
    TAG_BASE,
    TAG_RUN,
    TAG_SHIFT,
    TAG_SLAB,
    arena_meta_pages,
)
from .pages import ArenaView, init_arena

ROOT_REGION = 0xFFFFFFFF
# Slots moved per refill or flush, per class: 64 for small classes, fewer for
# big ones so a process never hoards more than ~256 KiB of one class.
BATCH: tuple[int, ...] = tuple(max(4, min(64, (256 * 1024) // size)) for size in CLASS_SIZES)
REFILL = BATCH[0]  # the batch of the smallest classes (tests use it)
# A magazine holding more than twice its batch flushes one batch back.
MAG_LIMIT: tuple[int, ...] = tuple(2 * b for b in BATCH)
MAG_MAX = MAG_LIMIT[0]
DISCARD_MIN = 1 << 20  # freed runs at least this big are kept resident or go back to the kernel
DIRTY_MAX = 64 << 20  # default: freed pages an arena keeps resident for reuse (Config.dirty_max)
_KEEP_PAGES = DISCARD_MIN // PAGE_SIZE
_TABLE_W = TABLE_OFFSET // 4
_REG_W = REGISTRY_OFFSET // 4
_IDS_W = IDS_OFFSET // 4


class Backend(Protocol):
    """What the allocator needs from the world around it."""

    def lock(self) -> bool:
        """Acquire the heap lock; True if the previous holder died holding it."""
        ...

    def unlock(self) -> None: ...

    def recovered(self) -> None:
        """The half-done operation of a dead holder has been rolled back."""
        ...

    def create_region(
        self, nbytes: int, stage: Callable[[int], None]
    ) -> tuple[tuple[int, ...], memoryview]:
        """A new zero-filled region of at least ``nbytes`` and the ids naming it.

        ``stage(shmid)`` must be called the moment each id exists: it records
        the id in the heap, so a creator that dies before the region is in
        the arena table does not leak it.
        """
        ...

    def attach_region(self, ids: tuple[int, ...]) -> memoryview: ...

    def release_region(self, ids: tuple[int, ...]) -> None:
        """Drop this process's mapping (others keep theirs)."""
        ...

    def remove_region(self, ids: tuple[int, ...]) -> None:
        """Mark the region for removal: it goes when the last process lets go."""
        ...

    def discard(self, ids: tuple[int, ...], offset: int, length: int) -> None:
        """Give the pages of a freed range of region ``ids`` back to the kernel."""
        ...

    def process_alive(self, pid: int, start: int) -> bool: ...

    def process_identity(self) -> tuple[int, int]:
        """(pid, start time) of this process: a pid alone is reused."""
        ...


@dataclass(frozen=True)
class Config:
    arena_size: int
    max_size: int  # 0 = no limit but the kernel's
    huge_threshold: int
    auto_remove: bool
    max_segment_size: int = 0
    mode: int = 0o600
    noreserve: bool = False
    dirty_max: int = DIRTY_MAX  # bytes; rounded down to pages


def _u64(w: memoryview, i: int) -> int:
    return int(w[i]) | (int(w[i + 1]) << 32)


def _set_u64(w: memoryview, i: int, v: int) -> None:
    w[i] = v & 0xFFFFFFFF
    w[i + 1] = v >> 32


class _Locked:
    """``with alloc.locked():`` - the heap lock plus repair, without the undo log."""

    __slots__ = ("alloc",)

    def __init__(self, alloc: Allocator) -> None:
        self.alloc = alloc

    def __enter__(self) -> None:
        self.alloc._lock_and_repair()

    def __exit__(self, *exc: object) -> None:
        self.alloc.backend.unlock()


class _TxnScope:
    """``with alloc.txn() as txn:`` - one logged operation under the heap lock.

    A class rather than a generator-based context manager: every page-run
    allocation and free goes through it, and a generator costs microseconds.
    """

    __slots__ = ("alloc", "t")

    def __init__(self, alloc: Allocator) -> None:
        self.alloc = alloc
        self.t: undo.Txn | None = None

    def __enter__(self) -> undo.Txn:
        alloc = self.alloc
        alloc._lock_and_repair()
        try:
            t = self.t = undo.Txn(alloc.root32, alloc.blob16, alloc.regions)
        except BaseException:
            alloc.backend.unlock()
            raise
        return t

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        alloc, t = self.alloc, self.t
        assert t is not None
        try:
            if exc_type is not None:
                # an exception (KeyboardInterrupt included) anywhere before the
                # commit store is handled like a crash: undo everything
                alloc._roll_back(t)
                return
            try:
                t.commit()
            except BaseException:
                alloc._roll_back(t)
                raise
            for action in t.after_commit:
                action()
            if alloc._pending_check:
                alloc._pending_check = False
                alloc._remove_pending()
        finally:
            alloc.backend.unlock()


class _Regions(undo.Regions):
    __slots__ = ("alloc",)

    def __init__(self, alloc: Allocator) -> None:
        self.alloc = alloc

    def words(self, region: int) -> memoryview:
        if region == ROOT_REGION:
            return self.alloc.root32
        return self.alloc._arena(region).w

    def bytes_(self, region: int) -> memoryview:
        return self.alloc._arena(region).buf


class Allocator:
    """One process's handle on a heap's allocator state."""

    def __init__(self, backend: Backend, root: memoryview, root_id: int) -> None:
        self.backend = backend
        self.root = root
        self.root_id = root_id
        self._config: Config | None = None
        self.root32 = root.cast("I")
        self.blob16 = undo.blob_view(root)
        self.regions = _Regions(self)
        self._views: dict[int, ArenaView] = {}
        self.bufs: dict[int, memoryview] = {}  # arena -> its mapping, for the hot paths
        self._huge: dict[int, memoryview] = {}
        self._ids: dict[int, tuple[int, ...]] = {}
        self._epoch = -1
        self._pending_check = False
        self._locked = _Locked(self)
        # Called with (cache id, died) when a process leaves the heap, before its
        # registry slot is freed: the name directory drops what it held.
        self.departure_hooks: list[Callable[[int, bool], None]] = []
        # serialises refills, flushes and registration between threads
        self.local = threading.RLock()
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        """Forget what belongs to this process alone (also in a fork child)."""
        self.cache_id = 0
        self.local = threading.RLock()
        # per class: (arena, offset, state position, tag it was freed with or 0)
        self.mags: list[list[tuple[int, int, int, int]]] = [[] for _ in range(NCLASSES)]
        # last generation tag handed out (129..255); a random start per process
        # makes two processes unlikely to hand out the same slot under one tag
        self.tag = TAG_BASE + 1 + secrets.randbelow(127)
        self.refills = 0
        self.lock_count = 0
        # blocks whose pages this process has pre-faulted (sharedobj.arrays)
        self.populated: set[tuple[int, int, int]] = set()
        # block ranges (arena, offset, size) this process mapped for writing
        self.written: set[tuple[int, int, int]] = set()

    # ------------------------------------------------------------------
    # creation and validation

    @staticmethod
    def format_root(root: memoryview, cfg: Config, pid: int, uid: int, now_ns: int) -> None:
        """Write a fresh root header (the region is zero-filled), all but the magic.

        The magic is written by :meth:`publish_root` once the heap is complete,
        so a process that finds a half-made heap (by its key) waits instead of
        trusting it.
        """
        w = root.cast("I")
        w[H_VERSION] = LAYOUT_VERSION
        w[H_PAGE_SIZE] = PAGE_SIZE
        w[H_ROOT_SIZE] = ROOT_SIZE
        w[H_FLAGS] = (FLAG_AUTO_REMOVE if cfg.auto_remove else 0) | (
            FLAG_NORESERVE if cfg.noreserve else 0
        )
        w[H_CREATOR_PID] = pid
        w[H_OWNER_UID] = uid
        w[H_MODE] = cfg.mode
        w[H_GEN] = 1
        _set_u64(w, H_MAX_SIZE, cfg.max_size)
        _set_u64(w, H_ARENA_SIZE, cfg.arena_size)
        _set_u64(w, H_HUGE_THRESHOLD, cfg.huge_threshold)
        _set_u64(w, H_CREATED_NS, now_ns)
        _set_u64(w, H_MAX_SEGMENT, cfg.max_segment_size)
        w[H_DIRTY_MAX] = min(cfg.dirty_max // PAGE_SIZE, 0xFFFFFFFF)

    @staticmethod
    def publish_root(root: memoryview) -> None:
        root[:8] = MAGIC_ROOT

    @staticmethod
    def validate_root(root: memoryview, versions: tuple[int, ...] = (LAYOUT_VERSION,)) -> None:
        """Refuse what is not a heap this code can use (``versions``: the layouts accepted)."""
        if len(root) < ROOT_SIZE:
            raise CorruptHeapError(f"heap root is {len(root)} bytes, expected {ROOT_SIZE}")
        if bytes(root[:8]) != MAGIC_ROOT:
            raise CorruptHeapError("not a sharedobj heap: root magic missing")
        w = root.cast("I")
        if w[H_VERSION] not in versions:
            raise CorruptHeapError(
                f"heap layout version {w[H_VERSION]}, this sharedobj reads {LAYOUT_VERSION}"
            )
        if w[H_PAGE_SIZE] != PAGE_SIZE:
            raise CorruptHeapError(
                f"heap made with page size {w[H_PAGE_SIZE]}, this machine has {PAGE_SIZE}"
            )
        if w[H_ARENA_COUNT] > MAX_ARENAS or w[H_IDS_USED] > MAX_IDS or w[H_LOG_COUNT] > LOG_MAX:
            raise CorruptHeapError("heap root header has out-of-range counters")

    @property
    def config(self) -> Config:
        """The settings the heap was created with (read once: they never change)."""
        cfg = self._config
        if cfg is None:
            cfg = self._config = self.read_config(self.root32)
        return cfg

    @staticmethod
    def read_config(w: memoryview) -> Config:
        """The settings the heap was created with, from the root header's words."""
        return Config(
            arena_size=_u64(w, H_ARENA_SIZE),
            max_size=_u64(w, H_MAX_SIZE),
            huge_threshold=_u64(w, H_HUGE_THRESHOLD),
            auto_remove=bool(w[H_FLAGS] & FLAG_AUTO_REMOVE),
            noreserve=bool(w[H_FLAGS] & FLAG_NORESERVE),
            max_segment_size=_u64(w, H_MAX_SEGMENT),
            mode=int(w[H_MODE]),
            dirty_max=int(w[H_DIRTY_MAX]) * PAGE_SIZE,
        )

    @property
    def created_ns(self) -> int:
        return _u64(self.root32, H_CREATED_NS)

    # ------------------------------------------------------------------
    # the lock and transactions

    def _lock_and_repair(self) -> None:
        """Take the heap lock; undo what a dead or interrupted holder left half done."""
        died = self.backend.lock()
        self.lock_count += 1
        try:
            root32 = self.root32
            if died or root32[H_LOG_COUNT]:
                undo.rollback(root32, self.blob16, self.regions)
                self._epoch = -1  # the table may have changed under us: resynchronise
                if died:
                    self.backend.recovered()
            self._check_counters()
            if root32[H_INFLIGHT]:
                self._recover_inflight()
            if root32[H_EPOCH] != self._epoch:
                self._sync_arenas()
        except BaseException:
            self.backend.unlock()
            raise

    def _check_counters(self) -> None:
        """The root's counters bound every table walk: a damaged one must not send it astray."""
        w = self.root32
        used = w[H_IDS_USED]
        if w[H_ARENA_COUNT] > MAX_ARENAS or used > MAX_IDS or w[H_INFLIGHT] > MAX_IDS - used:
            raise CorruptHeapError(
                f"heap root header has out-of-range counters ({w[H_ARENA_COUNT]} arenas, "
                f"{used} ids, {w[H_INFLIGHT]} staged)"
            )

    def _arena_count(self) -> int:
        """Entries in the arena table, validated (readers without the lock use it too)."""
        count = int(self.root32[H_ARENA_COUNT])
        if count > MAX_ARENAS:
            raise CorruptHeapError(f"heap root header counts {count} arenas (at most {MAX_ARENAS})")
        return count

    def locked(self) -> _Locked:
        """Hold the heap lock for work that is crash-safe by its order of stores.

        The name directory uses it: each of its changes commits with a single
        store, so it needs the lock's mutual exclusion and owner-death repair,
        but not the undo log.  (A class, not a generator: it is on the
        SharedMemory create/unlink path.)
        """
        return self._locked

    def txn(self) -> _TxnScope:
        """Hold the heap lock for one logged operation; recover first if needed."""
        return _TxnScope(self)

    def _roll_back(self, t: undo.Txn) -> None:
        """Undo an operation that did not commit (the caller still holds the lock)."""
        undo.rollback(self.root32, self.blob16, self.regions)
        self._epoch = -1  # resynchronise with the restored arena table next time
        for action in t.on_rollback:
            with contextlib.suppress(Exception):
                action()

    def recover(self) -> int:
        """Take the lock, roll back any half-done operation, reclaim dead processes' caches."""
        with self.txn():
            pass
        return self.reclaim_dead()

    # ------------------------------------------------------------------
    # arenas

    def _entry(self, i: int) -> int:
        return _TABLE_W + i * TABLE_ENTRY_WORDS

    def _entry_ids(self, i: int) -> tuple[int, ...]:
        e = self._entry(i)
        off, n = self.root32[e + T_IDS_OFF], self.root32[e + T_NIDS]
        if off + n > MAX_IDS or n == 0:
            raise CorruptHeapError(f"arena table entry {i} points outside the id table")
        return tuple(self.root32[_IDS_W + off : _IDS_W + off + n])

    def _arena(self, i: int) -> ArenaView:
        view = self._views.get(i)
        if view is None:
            if i >= self._arena_count():
                raise CorruptHeapError(f"arena {i} is not in the heap's table")
            e = self._entry(i)
            if self.root32[e + T_KIND] != KIND_GENERAL:
                raise CorruptHeapError(f"arena {i} is not a general arena")
            ids = self._entry_ids(i)
            try:
                buf = self.backend.attach_region(ids)
            except FileNotFoundError as exc:
                raise CorruptHeapError(f"arena {i}: its segment is gone ({exc})") from None
            view = ArenaView(i, buf)
            if not self.owns(view):
                # a damaged id table names a segment of another heap: never write to it
                raise CorruptHeapError(f"arena {i}: segments {ids} belong to another heap")
            self._views[i] = view
            self.bufs[i] = view.buf
            self._ids[i] = ids
        return view

    def owns(self, view: ArenaView) -> bool:
        """Does the arena's header name this heap (its root's shmid and creation time)?"""
        w = view.w
        return (
            w[A_ROOT_ID] == self.root_id & 0xFFFFFFFF and _u64(w, A_ROOT_CTIME) == self.created_ns
        )

    def arena_buf(self, i: int) -> memoryview:
        """The mapping of arena or huge block ``i`` in this process (attached on first use)."""
        view = self._views.get(i)
        if view is not None:
            return view.buf
        buf = self._huge.get(i)
        if buf is not None:
            # A freed huge block's table entry can be reused by another block
            # (in another process): trust the cached mapping only if the entry
            # still names the same segments.
            e = self._entry(i)
            w = self.root32
            if (
                w[e + T_STATE] == ARENA_LIVE
                and w[e + T_KIND] == KIND_HUGE
                and self._ids.get(i) == self._entry_ids(i)
            ):
                return buf
            self._release_local(i)
        count = self._arena_count()
        if not 0 <= i < count:
            raise StaleHandleError(f"heap has no arena {i} (it has {count})")
        e = self._entry(i)
        if self.root32[e + T_STATE] != ARENA_LIVE:
            raise StaleHandleError(f"arena {i} of this heap was freed")
        if self.root32[e + T_KIND] == KIND_GENERAL:
            return self._arena(i).buf
        ids = self._entry_ids(i)
        self._check_huge_ids(i, ids)
        try:
            buf = self.backend.attach_region(ids)
        except FileNotFoundError as exc:
            if self.root32[e + T_STATE] != ARENA_LIVE or self._entry_ids(i) != ids:
                raise StaleHandleError(f"huge block {i} was freed") from None  # just now
            raise CorruptHeapError(f"huge block {i}: its segment is gone ({exc})") from None
        if len(buf) != _u64(self.root32, e + T_SIZE):
            raise CorruptHeapError(
                f"huge block {i}: segments {ids} hold {len(buf)} bytes, its table entry says "
                f"{_u64(self.root32, e + T_SIZE)}"
            )
        self._huge[i] = buf
        self._ids[i] = ids
        return buf

    def _check_huge_ids(self, i: int, ids: tuple[int, ...]) -> None:
        """A huge block has no header to vouch for its segments: at least they must not be
        the root or a region this process maps as another part of the heap."""
        others = {self.root_id}
        for j, known in self._ids.items():
            if j != i:
                others.update(known)
        if others.intersection(ids):
            raise CorruptHeapError(f"huge block {i}: its segments {ids} belong to another region")

    def _live_general(self) -> Iterator[ArenaView]:
        w = self.root32
        for i in range(self._arena_count()):
            e = self._entry(i)
            if w[e + T_STATE] == ARENA_LIVE and w[e + T_KIND] == KIND_GENERAL:
                yield self._arena(i)

    def _sync_arenas(self) -> None:
        """Attach arenas other processes added, drop freed ones; called under the lock.

        A table index can come back naming another segment (an entry rolled
        back after a crash, or a freed entry reused), so local views are
        checked against the table's ids, not just by index.
        """
        w = self.root32
        count = self._arena_count()
        for i in list(self._ids):
            if i >= count:
                self._release_local(i)
        for i in range(count):
            e = self._entry(i)
            if w[e + T_STATE] == ARENA_LIVE:
                if i in self._ids and self._ids[i] != self._entry_ids(i):
                    self._release_local(i)
                # Attach every live region, huge blocks included: R_SEEN below
                # promises the pending-removal rule that this process maps
                # everything up to this epoch.
                if i not in self._ids:
                    with contextlib.suppress(FileNotFoundError, CorruptHeapError):
                        self.arena_buf(i)  # a vanished or damaged arena is reported by check()
            elif i in self._ids:
                self._release_local(i)
        self._epoch = int(w[H_EPOCH])
        if self.cache_id:
            w[_REG_W + (self.cache_id - 1) * REGISTRY_ENTRY_WORDS + R_SEEN] = self._epoch
        self._remove_pending()

    def _release_local(self, index: int) -> None:
        ids = self._ids.get(index)
        self._forget_local(index)
        if ids:
            self.backend.release_region(ids)

    def _remove_pending(self) -> None:
        """IPC_RMID arenas that every live process has attached (auto_remove heaps).

        A new arena is not marked for removal at once: a process that has not
        attached it yet could otherwise lose it when its creator exits.
        """
        w = self.root32
        pending = [
            i
            for i in range(self._arena_count())
            if w[self._entry(i) + T_PENDING] and w[self._entry(i) + T_STATE] == ARENA_LIVE
        ]
        if not pending:
            return
        seen = []
        for slot in range(MAX_PROCS):
            r = _REG_W + slot * REGISTRY_ENTRY_WORDS
            if w[r + R_STATE] == 1 and self.backend.process_alive(
                int(w[r + R_PID]), _u64(w, r + R_START)
            ):
                seen.append(int(w[r + R_SEEN]))
        floor = min(seen) if seen else 1 << 32
        for i in pending:
            e = self._entry(i)
            ids = self._entry_ids(i)
            # only regions this process attached and checked: a damaged id
            # table must not make the heap remove someone else's segment
            if floor >= w[e + T_EPOCH] and self._ids.get(i) == ids:
                self.backend.remove_region(ids)
                w[e + T_PENDING] = 0  # idempotent: removing twice is harmless

    def _new_entry(
        self, txn: undo.Txn, index: int, kind: int, nbytes: int, ids: tuple[int, ...]
    ) -> None:
        w = self.root32
        count = w[H_ARENA_COUNT]
        if index == count:
            used = w[H_IDS_USED]
            e = self._entry(index)
            txn.set(ROOT_REGION, w, e + T_IDS_OFF, used)
            txn.set(ROOT_REGION, w, H_IDS_USED, used + len(ids))
            txn.set(ROOT_REGION, w, H_ARENA_COUNT, count + 1)
        e = self._entry(index)
        off = w[e + T_IDS_OFF]
        for k, shmid in enumerate(ids):
            txn.set(ROOT_REGION, w, _IDS_W + off + k, shmid)
        txn.set(ROOT_REGION, w, e + T_NIDS, len(ids))
        txn.set(ROOT_REGION, w, e + T_KIND, kind)
        txn.set(ROOT_REGION, w, e + T_SIZE, nbytes & 0xFFFFFFFF)
        txn.set(ROOT_REGION, w, e + T_SIZE + 1, nbytes >> 32)
        epoch = (w[H_EPOCH] + 1) & 0xFFFFFFFF
        txn.set(ROOT_REGION, w, e + T_EPOCH, epoch)
        txn.set(ROOT_REGION, w, e + T_PENDING, 0)
        txn.set(ROOT_REGION, w, e + T_STATE, ARENA_LIVE)
        txn.set(ROOT_REGION, w, H_EPOCH, epoch)
        self._epoch = epoch

    def total_bytes(self) -> int:
        w = self.root32
        total = 0
        for i in range(self._arena_count()):
            e = self._entry(i)
            if w[e + T_STATE] == ARENA_LIVE:
                total += _u64(w, e + T_SIZE)
        return total

    def _grow(
        self, txn: undo.Txn, min_bytes: int, kind: int
    ) -> tuple[int, tuple[int, ...], memoryview]:
        cfg = self.config
        if cfg.max_size and self.total_bytes() + min_bytes > cfg.max_size:
            raise MemoryError(self._full_message(min_bytes))
        ids, buf = self.backend.create_region(min_bytes, self._stage)
        txn.on_rollback.append(lambda: self._drop_inflight(ids))
        txn.after_commit.append(self._clear_inflight)
        index = self._choose_entry(len(ids))
        if kind == KIND_GENERAL:
            init_arena(buf, index, self.root_id, self.created_ns)
        self._new_entry(txn, index, kind, len(buf), ids)
        if cfg.auto_remove:
            txn.set(ROOT_REGION, self.root32, self._entry(index) + T_PENDING, 1)
            self._pending_check = True
        self._ids[index] = ids
        if kind == KIND_GENERAL:
            self._views[index] = ArenaView(index, buf)
            self.bufs[index] = buf
        else:
            self._huge[index] = buf
        txn.on_rollback.append(lambda: self._forget_local(index))
        if self.cache_id:
            txn.set(
                ROOT_REGION,
                self.root32,
                _REG_W + (self.cache_id - 1) * REGISTRY_ENTRY_WORDS + R_SEEN,
                self._epoch,
            )
        return index, ids, buf

    def _stage(self, shmid: int) -> None:
        """Record a just-created shmid past the used part of the id table (under the lock)."""
        w = self.root32
        n = w[H_INFLIGHT]
        slot = w[H_IDS_USED] + n
        if slot >= MAX_IDS:
            self.backend.remove_region((shmid,))
            raise MemoryError(f"heap id table is full ({MAX_IDS} shmids)")
        w[_IDS_W + slot] = shmid
        w[H_INFLIGHT] = n + 1

    def _clear_inflight(self) -> None:
        self.root32[H_INFLIGHT] = 0

    def _drop_inflight(self, ids: tuple[int, ...]) -> None:
        self.backend.remove_region(ids)
        self._unstage()

    def _unstage(self) -> None:
        w = self.root32
        start = int(w[H_IDS_USED])
        for k in range(min(int(w[H_INFLIGHT]), MAX_IDS - start)):
            w[_IDS_W + start + k] = 0
        w[H_INFLIGHT] = 0

    def _recover_inflight(self) -> None:
        """Remove segments a dead process created for a growth that never committed."""
        w = self.root32
        n = int(w[H_INFLIGHT])
        if not n:
            return
        start = int(w[H_IDS_USED])
        staged = [int(w[_IDS_W + start + k]) for k in range(n) if start + k < MAX_IDS]
        committed: set[int] = set()
        for i in range(self._arena_count()):
            e = self._entry(i)
            if w[e + T_STATE] == ARENA_LIVE:
                committed.update(self._entry_ids(i))
        committed.add(self.root_id)
        for shmid in staged:
            if shmid not in committed:
                self.backend.remove_region((shmid,))
        self._unstage()

    def forget_mappings(self) -> None:
        """Drop every reference to shared memory (the heap was closed in this process)."""
        self._views.clear()
        self.bufs.clear()
        self._huge.clear()
        self._ids.clear()
        self.mags = [[] for _ in range(NCLASSES)]
        empty = memoryview(bytearray(ROOT_SIZE))
        self.root, self.root32, self.blob16 = empty, empty.cast("I"), undo.blob_view(empty)

    def _forget_local(self, index: int) -> None:
        self._views.pop(index, None)
        self.bufs.pop(index, None)
        self._huge.pop(index, None)
        self._ids.pop(index, None)

    def _choose_entry(self, nids: int) -> int:
        """A freed table entry whose id space fits ``nids``, else the next new one."""
        w = self.root32
        count = self._arena_count()
        for i in range(count):
            e = self._entry(i)
            if (
                w[e + T_STATE] == ARENA_DEAD
                and w[e + T_NIDS] >= nids
                and i not in self._views
                and i not in self._huge
            ):
                return i
        if count >= MAX_ARENAS:
            raise MemoryError(f"heap arena table is full ({MAX_ARENAS} segments and huge blocks)")
        if w[H_IDS_USED] + nids > MAX_IDS:
            raise MemoryError(f"heap id table is full ({MAX_IDS} shmids)")
        return count

    def add_first_arena(self, ids: tuple[int, ...], buf: memoryview) -> None:
        """Put the arena made together with the root into the table (heap creation)."""
        init_arena(buf, 0, self.root_id, self.created_ns)
        with self.txn() as txn:
            self._new_entry(txn, 0, KIND_GENERAL, len(buf), ids)
            self._ids[0] = ids
            self._views[0] = ArenaView(0, buf)
            self.bufs[0] = buf

    def _full_message(self, nbytes: int) -> str:
        s = self.stats_summary()
        return (
            f"heap is full: cannot allocate {nbytes} bytes "
            f"(in use {s['used_bytes']} of {s['total_bytes']} bytes in {s['arenas']} segments, "
            f"largest free run {s['largest_free_run']} bytes, max_size {s['max_size'] or 'unlimited'})"
        )

    # ------------------------------------------------------------------
    # the process registry

    def ensure_registered(self) -> int:
        if self.cache_id:
            return self.cache_id
        with self.local:
            return self._register_locked()

    def _register_locked(self) -> int:
        if self.cache_id:
            return self.cache_id
        pid, start = self.backend.process_identity()
        for attempt in range(2):
            with self.txn() as txn:
                w = self.root32
                for slot in range(MAX_PROCS):
                    r = _REG_W + slot * REGISTRY_ENTRY_WORDS
                    if w[r + R_STATE] == 0:
                        txn.set(ROOT_REGION, w, r + R_PID, pid)
                        txn.set(ROOT_REGION, w, r + R_START, start & 0xFFFFFFFF)
                        txn.set(ROOT_REGION, w, r + R_START + 1, start >> 32)
                        txn.set(ROOT_REGION, w, r + R_SEEN, self._epoch & 0xFFFFFFFF)
                        txn.set(ROOT_REGION, w, r + R_STATE, 1)
                        self.cache_id = slot + 1
                        return self.cache_id
            if attempt == 0:
                self.reclaim_dead()
        raise MemoryError(
            f"heap registry is full: {MAX_PROCS} live processes already use this heap"
        )

    def unregister(self) -> None:
        """Give back every cached block and the registry slot (process exit, heap close)."""
        if not self.cache_id:
            return
        for hook in self.departure_hooks:  # may free blocks into the magazines: flush after
            hook(self.cache_id, False)
        for cls in range(NCLASSES):
            while self.mags[cls]:  # in batches: one operation's undo log is bounded
                self._flush(cls, BATCH[cls])
        with self.txn() as txn:
            r = _REG_W + (self.cache_id - 1) * REGISTRY_ENTRY_WORDS
            txn.set(ROOT_REGION, self.root32, r + R_STATE, 0)
        self.cache_id = 0

    def registry(self) -> list[dict[str, int]]:
        w = self.root32
        out = []
        for slot in range(MAX_PROCS):
            r = _REG_W + slot * REGISTRY_ENTRY_WORDS
            if w[r + R_STATE]:
                out.append(
                    {
                        "cache_id": slot + 1,
                        "pid": int(w[r + R_PID]),
                        "start": _u64(w, r + R_START),
                        "state": int(w[r + R_STATE]),
                        "seen": int(w[r + R_SEEN]),
                    }
                )
        return out

    def reclaim_dead(self) -> int:
        """Return the cached blocks of processes that died to the heap; returns how many."""
        reclaimed = 0
        for entry in self.registry():
            if entry["cache_id"] == self.cache_id:
                continue
            if entry["state"] == 1 and self.backend.process_alive(entry["pid"], entry["start"]):
                continue
            reclaimed += self._reclaim_slot(entry["cache_id"])
        return reclaimed

    def _reclaim_slot(self, cache_id: int) -> int:
        w = self.root32
        r = _REG_W + (cache_id - 1) * REGISTRY_ENTRY_WORDS
        with self.txn() as txn:  # step 1: nobody may take this slot while we sweep
            if w[r + R_STATE] == 1 and self.backend.process_alive(
                int(w[r + R_PID]), _u64(w, r + R_START)
            ):
                return 0
            txn.set(ROOT_REGION, w, r + R_STATE, 2)
        total = 0
        for av in list(self._live_general()):
            # Only the dead cache's slots are touched, and nobody else writes
            # them: finding them before taking the lock is safe.
            heads = [int(h) for h in self._slab_heads(av) if self._holds(av, int(h), cache_id)]
            for head in heads:
                with self.txn() as txn:  # one slab per operation keeps the log small
                    total += self._return_slots(txn, av, head, cache_id, None)
        for hook in self.departure_hooks:
            hook(cache_id, True)
        with self.txn() as txn:
            txn.set(ROOT_REGION, w, r + R_STATE, 0)
        return total

    # ------------------------------------------------------------------
    # slabs

    def _slab_heads(self, av: ArenaView) -> np.ndarray:
        front = av.frontier()
        pm = av.pages_array(av.pm)[:front]
        return np.flatnonzero((pm >> TAG_SHIFT) == TAG_SLAB)

    @staticmethod
    def _holds(av: ArenaView, head: int, cache_id: int) -> bool:
        """Does cache ``cache_id`` hold any slot of the slab at ``head``?"""
        nslots = av.w[head * PAGE_SIZE // 4 + 1]
        if nslots > PAGE_SIZE - SLAB_HEADER:
            return True  # damaged header: let _return_slots report it
        state = np.frombuffer(
            av.buf, dtype=np.uint8, count=nslots, offset=head * PAGE_SIZE + SLAB_HEADER
        )
        return bool(np.any(state == cache_id))

    def _slab_info(self, av: ArenaView, head: int) -> tuple[int, int, int]:
        """(class, nslots, nfree) of the slab at ``head``, validated."""
        w = av.w
        if head >= av.npages:
            raise av.corrupt(f"slab page {head} is outside the arena")
        base = head * PAGE_SIZE // 4
        cls, nslots, nfree = w[base], w[base + 1], w[base + 2]
        if (
            cls >= NCLASSES
            or nslots != SLAB_GEOMETRY[cls][1]
            or nfree > nslots
            or w[av.pm + head] != (TAG_SLAB << TAG_SHIFT) | SLAB_GEOMETRY[cls][0]
            or head + SLAB_GEOMETRY[cls][0] > w[A_FRONTIER]
        ):
            raise av.corrupt(f"slab at page {head} has a damaged header")
        return int(cls), int(nslots), int(nfree)

    def _new_slab(self, txn: undo.Txn, cls: int) -> tuple[ArenaView, int] | None:
        pages, nslots, _first = SLAB_GEOMETRY[cls]
        for av in self._live_general():
            head = av.alloc(txn, pages, TAG_SLAB)
            if head != NIL:
                break
        else:
            try:
                index, _ids, _buf = self._grow(txn, self._arena_bytes_for(pages), KIND_GENERAL)
            except MemoryError:
                return None
            av = self._views[index]
            head = av.alloc(txn, pages, TAG_SLAB)
            if head == NIL:  # pragma: no cover - a fresh arena always fits a slab
                return None
        # The slab header and state bytes sit in the slab's own pages, which
        # are free again if this is rolled back: they need no undo.  The
        # back-pointers are page metadata and are logged like the rest.
        w = av.w
        base = head * PAGE_SIZE // 4
        w[base], w[base + 1], w[base + 2], w[base + 3] = cls, nslots, nslots, 0
        state = np.frombuffer(
            av.buf, dtype=np.uint8, count=nslots, offset=head * PAGE_SIZE + SLAB_HEADER
        )
        state[:] = 0
        for page in range(head + 1, head + pages):
            txn.set(av.index, w, av.prv + page, head)
        av.push_partial(txn, cls, head)
        return av, head

    def _arena_bytes_for(self, pages: int) -> int:
        """Size of the next general arena: the heap roughly doubles each time it grows.

        Growing by the initial size only would turn a heap that starts small
        and ends big into dozens of segments; doubling (up to 1 GiB per arena)
        keeps the count logarithmic.  max_size caps it, but never below what
        the request needs.
        """
        cfg = self.config
        need = (pages + arena_meta_pages(pages * 2) + 1) * PAGE_SIZE
        general = sum(size for _i, kind, _ids, size in self.arena_ids() if kind == KIND_GENERAL)
        want = max(need, cfg.arena_size, min(general, 1 << 30))
        if cfg.max_size:
            want = max(need, min(want, cfg.max_size - self.total_bytes()))
        return -(-want // PAGE_SIZE) * PAGE_SIZE

    def _take_slots(
        self, txn: undo.Txn, av: ArenaView, head: int, cls: int, want: int
    ) -> list[tuple[int, int, int, int]]:
        slab_cls, nslots, nfree = self._slab_info(av, head)
        if slab_cls != cls or not nfree:
            raise av.corrupt(f"slab at page {head} is on the wrong partial list")
        size = CLASS_SIZES[cls]
        first = SLAB_GEOMETRY[cls][2]
        base = head * PAGE_SIZE
        state_off = base + SLAB_HEADER
        state = np.frombuffer(av.buf, dtype=np.uint8, count=nslots, offset=state_off)
        free = np.flatnonzero(state == 0)
        if len(free) != nfree:
            raise CorruptHeapError(
                f"arena {av.index}: slab at page {head} counts {nfree} free slots, its state bytes {len(free)}"
            )
        take = free[:want]
        txn.slots(av.index, state_off, take, 0, self.cache_id)
        left = nfree - len(take)
        txn.set(av.index, av.w, base // 4 + 2, left)
        if left == 0:
            av.drop_partial(txn, cls, head)
        data = base + first
        arena = av.index
        return [(arena, data + i * size, state_off + i, 0) for i in take.tolist()]

    def _return_slots(
        self, txn: undo.Txn, av: ArenaView, head: int, owner: int, only: list[int] | None
    ) -> int:
        """Mark slots held by cache ``owner`` free (all of them, or the slot indices in ``only``)."""
        cls, nslots, nfree = self._slab_info(av, head)
        base = head * PAGE_SIZE
        state_off = base + SLAB_HEADER
        state = np.frombuffer(av.buf, dtype=np.uint8, count=nslots, offset=state_off)
        if only is None:
            idx = np.flatnonzero(state == owner)
        else:
            idx = np.asarray(only, dtype=np.int64)
            if np.any(state[idx] != owner):
                raise CorruptHeapError(
                    f"arena {av.index}: slab at page {head}: a cached slot changed owner"
                )
        if len(idx) == 0:
            return 0
        txn.slots(av.index, state_off, idx, owner, 0)
        now_free = nfree + len(idx)
        txn.set(av.index, av.w, base // 4 + 2, now_free)
        if nfree == 0:
            av.push_partial(txn, cls, head)
        if now_free == nslots and self._has_other_partial(av, cls, head):
            av.drop_partial(txn, cls, head)
            self._discard_later(txn, av, av.free(txn, head, _KEEP_PAGES, self.root32[H_DIRTY_MAX]))
        return len(idx)

    @staticmethod
    def _has_other_partial(av: ArenaView, cls: int, head: int) -> bool:
        first = av.partial_head(cls)
        return first != head or av.w[av.nxt + head] != NIL

    def _refill(self, cls: int) -> None:
        with self.local:
            self._refill_locked(cls)

    def _refill_locked(self, cls: int) -> None:
        self.ensure_registered()
        self.refills += 1
        if self.refills % 64 == 0:
            self._maybe_reclaim_one()
        got: list[tuple[int, int, int, int]] = []
        want = BATCH[cls]
        with self.txn() as txn:
            for av in self._live_general():
                head = av.partial_head(cls)
                steps = 0
                while head != NIL and len(got) < want:
                    steps += 1
                    if head >= av.npages or steps > av.npages:
                        raise av.corrupt(f"partial list of class {cls} is broken at page {head}")
                    nxt = av.w[av.nxt + head]
                    got += self._take_slots(txn, av, head, cls, want - len(got))
                    head = nxt
                if len(got) >= want:
                    break
            while len(got) < want:
                made = self._new_slab(txn, cls)
                if made is None:
                    break
                av, head = made
                got += self._take_slots(txn, av, head, cls, want - len(got))
        if not got:
            if self.reclaim_dead():
                return self._refill_locked(cls)
            raise MemoryError(self._full_message(CLASS_SIZES[cls]))
        got.reverse()  # pop() hands out the lowest addresses first
        self.mags[cls].extend(got)

    def _maybe_reclaim_one(self) -> None:
        """Now and then, look for one dead process's cache (cheap: one liveness check)."""
        for entry in self.registry():
            if entry["cache_id"] != self.cache_id and not self.backend.process_alive(
                entry["pid"], entry["start"]
            ):
                self._reclaim_slot(entry["cache_id"])
                return

    def _flush(self, cls: int, count: int) -> None:
        """Give ``count`` cached slots of class ``cls`` back to their slabs.

        Entries leave the magazine one atomic pop(0) at a time before they are
        freed, so another thread of this process can never hand out a slot
        that is being flushed.
        """
        with self.local:
            mag = self.mags[cls]
            batch: list[tuple[int, int, int, int]] = []
            for _ in range(count):
                try:
                    batch.append(mag.pop(0))
                except IndexError:
                    break
            if not batch:
                return
            groups: dict[tuple[int, int], list[int]] = {}
            for arena, _off, pos, _tag in batch:
                head = pos // PAGE_SIZE  # a slab's state bytes all sit in its first page
                groups.setdefault((arena, head), []).append(pos - head * PAGE_SIZE - SLAB_HEADER)
            try:
                with self.txn() as txn:
                    for (arena, head), slots in groups.items():
                        self._return_slots(txn, self._arena(arena), head, self.cache_id, slots)
            except BaseException:
                mag[:0] = batch  # rolled back: the slots are still ours
                raise

    # ------------------------------------------------------------------
    # the public operations

    def alloc_small(self, nbytes: int) -> tuple[int, int, int, int]:
        """(arena, offset, tag, state position) of a block of ``nbytes`` <= MAX_SMALL.

        No process-local lock: list.pop is atomic under the GIL, so two threads
        never get the same entry; a thread that finds the magazine empty
        refills it (under ``local``) and tries again.
        """
        mag = self.mags[CLASS_BY_GRANULE[(nbytes + 15) >> 4]]
        while True:
            try:
                arena, off, pos, old = mag.pop()
                break
            except IndexError:
                self._refill(CLASS_BY_GRANULE[(nbytes + 15) >> 4])
        tag = self.tag + 1
        if tag > 255:
            tag = TAG_BASE + 1
        if tag == old:  # never hand a slot out again under the tag it was freed with
            tag = tag + 1 if tag < 255 else TAG_BASE + 1
        self.tag = tag
        try:
            self.bufs[arena][pos] = tag
        except KeyError:  # the arena table changed under a cached slot
            raise CorruptHeapError(f"arena {arena} left the heap's table") from None
        return arena, off, tag, pos

    def slot_position(self, arena: int, off: int, nbytes: int) -> int:
        """The state-byte position of a small block, validating the handle."""
        av = self._arena(arena)
        cls = CLASS_BY_GRANULE[(nbytes + 15) >> 4]
        page = off // PAGE_SIZE
        if not av.meta_pages <= page < av.npages:
            raise StaleHandleError(f"offset {off} is outside arena {arena}'s data pages")
        pm = av.w[av.pm + page]
        head = page if pm >> TAG_SHIFT == TAG_SLAB else int(av.w[av.prv + page])
        if head >= av.npages or av.w[av.pm + head] >> TAG_SHIFT != TAG_SLAB:
            raise StaleHandleError(f"offset {off} of arena {arena} is not in a slab (block freed?)")
        slab_cls, nslots, _ = self._slab_info(av, head)
        if slab_cls != cls:
            raise StaleHandleError(
                f"offset {off} of arena {arena} holds {CLASS_SIZES[slab_cls]}-byte blocks, not {nbytes}"
            )
        rel = off - head * PAGE_SIZE - SLAB_GEOMETRY[cls][2]
        size = CLASS_SIZES[cls]
        if rel < 0 or rel % size or rel // size >= nslots:
            raise StaleHandleError(f"offset {off} of arena {arena} is not the start of a block")
        return head * PAGE_SIZE + SLAB_HEADER + rel // size

    def free_small(
        self, arena: int, off: int, nbytes: int, tag: int, pos: int, flush: bool = True
    ) -> None:
        """Put a small block into this process's magazine (``flush=False`` under the heap lock)."""
        buf = self.bufs.get(arena)
        if buf is None:
            buf = self._arena(arena).buf
        if buf[pos] != tag:
            raise StaleHandleError(
                f"block at arena {arena} offset {off} was already freed (generation {tag} is gone)"
            )
        buf[pos] = self.cache_id or self.ensure_registered()
        cls = CLASS_BY_GRANULE[(nbytes + 15) >> 4]
        mag = self.mags[cls]
        mag.append((arena, off, pos, tag))
        if flush and len(mag) > MAG_LIMIT[cls]:
            self._flush(cls, BATCH[cls])

    def trim(self, nbytes: int) -> None:
        """Flush the magazine of ``nbytes``'s class if frees under the lock overfilled it.

        ``free_small(flush=False)`` (used while holding the heap lock) never
        flushes; its caller calls this once the lock is released.
        """
        cls = CLASS_BY_GRANULE[(nbytes + 15) >> 4]
        if len(self.mags[cls]) > MAG_LIMIT[cls]:
            self._flush(cls, BATCH[cls])

    def small_tag(self, arena: int, pos: int) -> int:
        return int(self.arena_buf(arena)[pos])

    def alloc_run(self, nbytes: int) -> tuple[int, int, int]:
        """(arena, offset, generation) of a page run of at least ``nbytes``."""
        with self.txn() as txn:
            return self.alloc_run_in(txn, nbytes)

    def alloc_run_in(self, txn: undo.Txn, nbytes: int) -> tuple[int, int, int]:
        """alloc_run inside an operation the caller holds (its rollback frees the run too)."""
        npages = -(-nbytes // PAGE_SIZE)
        for av in self._live_general():
            head = av.alloc(txn, npages, TAG_RUN)
            if head != NIL:
                break
        else:
            index, _ids, _buf = self._grow(txn, self._arena_bytes_for(npages), KIND_GENERAL)
            av = self._views[index]
            head = av.alloc(txn, npages, TAG_RUN)
            if head == NIL:  # pragma: no cover
                raise MemoryError(self._full_message(nbytes))
        gen = self._next_gen(txn)
        txn.set(av.index, av.w, av.nxt + head, gen)
        return av.index, head * PAGE_SIZE, gen

    def _next_gen(self, txn: undo.Txn) -> int:
        w = self.root32
        gen = int(w[H_GEN]) or 1
        txn.set(ROOT_REGION, w, H_GEN, (gen % 0xFFFFFFFF) + 1)
        return gen

    def run_generation(self, arena: int, off: int) -> int:
        """The generation of the used run at ``off``, or 0 if there is none."""
        av = self._arena(arena)
        if off % PAGE_SIZE:
            return 0
        head = off // PAGE_SIZE
        if not av.meta_pages <= head < av.npages or av.w[av.pm + head] >> TAG_SHIFT != TAG_RUN:
            return 0
        return int(av.w[av.nxt + head])

    def is_live_run(self, arena: int, off: int, gen: int, size: int) -> bool:
        """Whether a used run of generation ``gen`` and at least ``size`` bytes starts at ``off``.

        run_generation and run_pages in one arena lookup: every handle that a
        process unpickles (a SharedArray through a queue or a Pool) is checked
        this way.
        """
        av = self._arena(arena)
        head, rest = divmod(off, PAGE_SIZE)
        if rest or not av.meta_pages <= head < av.npages:
            return False
        v = av.w[av.pm + head]
        return bool(
            v >> TAG_SHIFT == TAG_RUN
            and av.w[av.nxt + head] == gen
            and (v & LEN_MASK) * PAGE_SIZE >= size
        )

    def run_pages(self, arena: int, off: int) -> int:
        av = self._arena(arena)
        return int(av.w[av.pm + off // PAGE_SIZE] & LEN_MASK)

    def free_run(self, arena: int, off: int, gen: int) -> None:
        with self.txn() as txn:
            self.free_run_in(txn, arena, off, gen)

    def free_run_in(self, txn: undo.Txn, arena: int, off: int, gen: int) -> None:
        if self.run_generation(arena, off) != gen or gen == 0:
            raise StaleHandleError(
                f"block at arena {arena} offset {off} was already freed (generation {gen} is gone)"
            )
        av = self._arena(arena)
        head = off // PAGE_SIZE
        txn.set(av.index, av.w, av.nxt + head, 0)
        self._discard_later(txn, av, av.free(txn, head, _KEEP_PAGES, self.root32[H_DIRTY_MAX]))

    def free_slot_in(self, txn: undo.Txn, arena: int, pos: int, tag: int) -> None:
        """Free an allocated small block (state byte ``tag``) inside the caller's operation."""
        av = self._arena(arena)
        head = pos // PAGE_SIZE
        if av.w[av.pm + head] >> TAG_SHIFT != TAG_SLAB or av.buf[pos] != tag:
            raise StaleHandleError(
                f"small block at arena {arena} was already freed (generation {tag} is gone)"
            )
        cls, _nslots, nfree = self._slab_info(av, head)
        base = head * PAGE_SIZE
        txn.slots(arena, base + SLAB_HEADER, [pos - base - SLAB_HEADER], tag, 0)
        txn.set(arena, av.w, base // 4 + 2, nfree + 1)
        if nfree == 0:
            av.push_partial(txn, cls, head)

    def _discard_later(self, txn: undo.Txn, av: ArenaView, ranges: list[tuple[int, int]]) -> None:
        """Give freed pages back to the kernel once the free has committed.

        Not before: a rolled-back free must not have zeroed live data.  Which
        pages go back is the arena's choice (:meth:`ArenaView.free`): runs
        under DISCARD_MIN, and big ones within the dirty budget, stay resident
        for reuse.
        """
        if ranges:
            ids = self._ids[av.index]
            discard = self.backend.discard
            for start, npages in ranges:
                txn.after_commit.append(
                    functools.partial(discard, ids, start * PAGE_SIZE, npages * PAGE_SIZE)
                )

    def release_dirty(self) -> int:
        """Give every kept-resident free page back to the kernel; returns how many bytes."""
        total = 0
        with self.txn() as txn:
            for av in self._live_general():
                ranges = av.release_dirty(txn)
                total += sum(n for _s, n in ranges) * PAGE_SIZE
                self._discard_later(txn, av, ranges)
        return total

    def alloc_huge(self, nbytes: int) -> tuple[int, int]:
        """(arena index, generation) of a block with a segment or span of its own."""
        with self.txn() as txn:
            index, _ids, _buf = self._grow(txn, nbytes, KIND_HUGE)
            gen = self._next_gen(txn)
            e = self._entry(index)
            txn.set(ROOT_REGION, self.root32, e + T_GEN, gen)
            txn.set(ROOT_REGION, self.root32, e + T_NBYTES, nbytes & 0xFFFFFFFF)
            txn.set(ROOT_REGION, self.root32, e + T_NBYTES + 1, nbytes >> 32)
            return index, gen

    def huge_generation(self, index: int) -> int:
        w = self.root32
        if not 0 <= index < self._arena_count():
            return 0
        e = self._entry(index)
        if w[e + T_STATE] != ARENA_LIVE or w[e + T_KIND] != KIND_HUGE:
            return 0
        return int(w[e + T_GEN])

    def free_huge(self, index: int, gen: int) -> None:
        with self.txn() as txn:
            self.free_huge_in(txn, index, gen)

    def free_huge_in(self, txn: undo.Txn, index: int, gen: int) -> None:
        if gen == 0 or self.huge_generation(index) != gen:
            raise StaleHandleError(
                f"huge block {index} was already freed (generation {gen} is gone)"
            )
        w = self.root32
        e = self._entry(index)
        self.arena_buf(index)  # checks the table's ids before they are removed
        ids = self._ids[index]
        txn.set(ROOT_REGION, w, e + T_STATE, ARENA_DEAD)
        txn.set(ROOT_REGION, w, e + T_PENDING, 0)
        epoch = (w[H_EPOCH] + 1) & 0xFFFFFFFF
        txn.set(ROOT_REGION, w, H_EPOCH, epoch)

        def drop() -> None:
            self._huge.pop(index, None)
            self._ids.pop(index, None)
            self.backend.remove_region(ids)
            self.backend.release_region(ids)

        txn.after_commit.append(drop)

    # ------------------------------------------------------------------
    # inspection

    def arena_ids(self) -> list[tuple[int, int, tuple[int, ...], int]]:
        """(index, kind, ids, size) of every live arena and huge block."""
        w = self.root32
        out = []
        for i in range(self._arena_count()):
            e = self._entry(i)
            if w[e + T_STATE] == ARENA_LIVE:
                out.append((i, int(w[e + T_KIND]), self._entry_ids(i), _u64(w, e + T_SIZE)))
        return out

    def stats_summary(self) -> dict[str, Any]:
        """Cheap totals (no lock): used for error messages."""
        s = self.stats(lock=False)
        return {
            "total_bytes": s["total_bytes"],
            "used_bytes": s["used_bytes"],
            "arenas": s["segments"],
            "largest_free_run": s["largest_free_run"],
            "max_size": s["max_size"],
        }

    def stats(self, lock: bool = True) -> dict[str, Any]:
        from .inspect import collect_stats

        if lock:
            with self.txn():
                return collect_stats(self)
        return collect_stats(self)

    def check(self) -> list[str]:
        from .inspect import check_heap

        try:
            with self.txn():
                return check_heap(self)
        except CorruptHeapError as exc:  # damage that stops even the lock's repair
            return [str(exc)]


def pid_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (from /proc), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[19])


def process_alive(pid: int, start: int) -> bool:
    if not 0 < pid <= 0x7FFFFFFF:  # no such pid (a damaged registry entry): gone
        return False
    seen = pid_start_time(pid)
    if seen is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return seen == start or start == 0
