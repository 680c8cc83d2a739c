"""A heap: System V segments plus the allocator, handing out blocks to any process.

The heap id is the shmid of its *root* segment, a small fixed-size segment
holding the allocator's header, undo log, arena table and the heap lock.  The
memory itself lives in *arenas*: one segment (or span) made with the heap,
more added when it fills up, and one per huge block.  Every process attaches
them once, through the per-process attach cache of :mod:`sharedobj.segment`.

A :class:`Block` is ``(heap, arena, offset, size, generation)``; it pickles to
a few dozen bytes and attaches lazily in the process that unpickles it, so
passing blocks between processes moves no data.  The generation turns a stale
handle (its block freed, maybe reused) into :class:`StaleHandleError` instead
of someone else's bytes.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import _libc, segment
from .allocator.classes import CLASS_BY_GRANULE, MAX_SMALL
from .allocator.core import DIRTY_MAX, DISCARD_MIN, Allocator, Config, pid_start_time, process_alive
from .allocator.layout import (
    H_CREATOR_PID,
    H_DESTROYED,
    H_NAMES_COUNT,
    H_OWNER_UID,
    H_RETIRED,
    H_ROLE,
    LOCK_OFFSET,
    MAX_IDS,
    ROLE_DEFAULT,
    ROLE_PLAIN,
    ROOT_SIZE,
    TAG_BASE,
)
from .errors import CorruptHeapError, StaleHandleError
from .limits import PAGE_SIZE, list_segments
from .names import Directory
from .sync import RobustMutex

__all__ = ["Block", "BlockHandle", "Heap"]

SMALL, RUN, HUGE = 0, 1, 2
_ROLES = {0: "plain", 1: "default", 2: "manager"}
_KINDS = {0: "general", 1: "huge"}  # arena table kinds (header() reads them without a lock)
_DEFAULT_HUGE = 64 << 20


def _check_nbytes(nbytes: object, what: str = "nbytes") -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"{what} must be an int, not {type(nbytes).__name__}")
    if nbytes <= 0:
        raise ValueError(f"{what} must be positive, got {nbytes}")
    return nbytes


def _check_pieces(nbytes: int, max_segment_size: int | None) -> None:
    """Refuse a region that would take more segments than a heap's id table holds.

    Checked before any segment exists: a tiny max_segment_size and a huge
    request would otherwise create (and then remove) thousands of segments.
    """
    limit, name = segment.segment_limit(max_segment_size)
    pieces = -(-nbytes // limit)
    if pieces > MAX_IDS:
        raise MemoryError(
            f"{nbytes} bytes would take {pieces} segments of at most {limit} bytes ({name}); "
            f"a heap holds at most {MAX_IDS}"
        )


class _SysVBackend:
    """The allocator's window on segments, the heap lock and processes."""

    def __init__(
        self, mutex: RobustMutex, *, mode: int, noreserve: bool, max_segment_size: int | None
    ) -> None:
        self.mutex = mutex
        self.mode = mode
        self.noreserve = noreserve
        self.max_segment_size = max_segment_size
        self.segments: dict[tuple[int, ...], segment.Segment] = {}

    def lock(self) -> bool:
        self.mutex.acquire()
        return self.mutex.owner_died

    def unlock(self) -> None:
        self.mutex.release()

    def recovered(self) -> None:
        self.mutex.mark_recovered()

    def create_region(
        self, nbytes: int, stage: Callable[[int], None]
    ) -> tuple[tuple[int, ...], memoryview]:
        _check_pieces(nbytes, self.max_segment_size)
        seg = segment.create(
            nbytes,
            on_create=stage,
            mode=self.mode,
            noreserve=self.noreserve,
            auto_remove=False,  # the allocator marks it once every process has it
            max_segment_size=self.max_segment_size,
        )
        self.segments[seg.ids] = seg
        return seg.ids, seg.buf

    def attach_region(self, ids: tuple[int, ...]) -> memoryview:
        seg = self.segments.get(ids)
        if seg is None:
            seg = segment.attach(ids)
            self.segments[ids] = seg
        return seg.buf

    def release_region(self, ids: tuple[int, ...]) -> None:
        seg = self.segments.pop(ids, None)
        if seg is not None:
            seg.close()

    def remove_region(self, ids: tuple[int, ...]) -> None:
        lib = _libc.libc()
        for shmid in ids:
            lib.shmctl(shmid, _libc.IPC_RMID, None)

    def discard(self, ids: tuple[int, ...], offset: int, length: int) -> None:
        seg = self.segments.get(ids)
        if seg is not None and length:
            seg.discard(offset, length)

    def process_alive(self, pid: int, start: int) -> bool:
        return process_alive(pid, start)

    def process_identity(self) -> tuple[int, int]:
        pid = os.getpid()
        return pid, pid_start_time(pid) or 0

    def close(self) -> None:
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()
        self.mutex = None  # type: ignore[assignment]  # it holds the root mapping


_heaps: dict[int, weakref.ref[Heap]] = {}
# Heaps this process has opened stay open until closed or destroyed, or the
# process exits: a pool worker that receives one array per task must attach
# the heap once and keep one registry slot, not one per task.
_kept: dict[int, Heap] = {}
_heaps_lock = threading.Lock()
# Called with a heap's id when this process closes it, so per-process caches
# of its blocks (arrays, containers) let go of its mappings at once.
close_hooks: list[Callable[[int], None]] = []


class Heap:
    """A shared heap.  Create it once, attach it by id from any process of the same user."""

    __slots__ = (
        "__weakref__",
        "_alloc",
        "_backend",
        "_max_size",
        "_names",
        "_root",
        "_threshold",
        "id",
    )

    def __init__(
        self, heap_id: int, root: segment.Segment, backend: _SysVBackend, alloc: Allocator
    ) -> None:
        self.id = heap_id
        self._root = root
        self._backend = backend
        self._alloc: Allocator | None = alloc
        cfg = alloc.config  # fixed at creation: read once, not per allocation
        self._threshold = cfg.huge_threshold
        self._max_size = cfg.max_size
        self._names: Directory | None = None

    @property
    def names(self) -> Directory:
        """The heap's name directory (what SharedMemory(name=...) looks names up in)."""
        names = self._names
        if names is None:
            names = self._names = Directory(self)
        return names

    # ------------------------------------------------------------------
    # creation and attachment

    @classmethod
    def create(
        cls,
        size: int,
        *,
        max_size: int | None = None,
        max_segment_size: int | None = None,
        mode: int = 0o600,
        auto_remove: bool = True,
        noreserve: bool = False,
        huge_threshold: int | None = None,
        key: int | None = None,
        role: int = ROLE_PLAIN,
        dirty_max: int = DIRTY_MAX,
    ) -> Heap:
        """A new heap whose first arena holds ``size`` bytes.

        It grows by adding arenas of the same size when full, up to
        ``max_size`` bytes in all (None: as far as the kernel allows).  Blocks
        over ``huge_threshold`` (default: min(64 MiB, size/4), at least 1 MiB)
        get a segment or span of their own.  With ``auto_remove`` every
        segment goes away when the last process using the heap exits, SIGKILL
        included; otherwise the heap lives until :meth:`destroy`.
        ``noreserve`` reserves no swap, so a heap may be larger than RAM
        (pages are only taken when touched).  ``key`` gives the root segment
        that System V key, so unrelated processes can find the heap
        (FileExistsError if the key is taken); the default heap uses it.
        ``dirty_max``: how many bytes of freed page runs each arena keeps
        resident, so the next big allocation reuses them without a page
        fault per page (:meth:`release_memory` gives them back now; 0 gives
        every freed run of a megabyte or more back at once).
        """
        _check_nbytes(size, "size")
        if isinstance(dirty_max, bool) or not isinstance(dirty_max, int) or dirty_max < 0:
            raise ValueError(f"dirty_max must be an int >= 0, got {dirty_max!r}")
        if max_size is not None:
            _check_nbytes(max_size, "max_size")
            if max_size < size:
                raise ValueError(f"max_size ({max_size}) is smaller than size ({size})")
        if huge_threshold is None:
            huge_threshold = max(1 << 20, min(_DEFAULT_HUGE, size // 4))
        else:
            _check_nbytes(huge_threshold, "huge_threshold")
        limit, limit_name = segment.segment_limit(max_segment_size)
        if limit < ROOT_SIZE:
            raise ValueError(
                f"the per-segment limit {limit_name} = {limit} bytes is below the heap root's "
                f"{ROOT_SIZE} bytes"
            )
        arena_bytes = -(-size // PAGE_SIZE) * PAGE_SIZE + PAGE_SIZE  # room for its header
        _check_pieces(arena_bytes, max_segment_size)
        root = segment.create(ROOT_SIZE, mode=mode, auto_remove=auto_remove, key=key)
        try:
            first = segment.create(
                arena_bytes,
                mode=mode,
                noreserve=noreserve,
                auto_remove=auto_remove,
                max_segment_size=max_segment_size,
            )
        except BaseException:
            root.remove()
            root.close()
            raise
        cfg = Config(
            arena_size=arena_bytes,
            max_size=max_size or 0,
            huge_threshold=huge_threshold,
            auto_remove=auto_remove,
            max_segment_size=max_segment_size or 0,
            mode=mode,
            noreserve=noreserve,
            dirty_max=dirty_max,
        )
        try:
            mutex = RobustMutex.initialize(root.buf, LOCK_OFFSET)
            Allocator.format_root(root.buf, cfg, os.getpid(), os.geteuid(), time.time_ns())
            root.buf.cast("I")[H_ROLE] = role
            backend = _SysVBackend(
                mutex, mode=mode, noreserve=noreserve, max_segment_size=max_segment_size
            )
            backend.segments[first.ids] = first
            alloc = Allocator(backend, root.buf, root.shmid)
            alloc.add_first_arena(first.ids, first.buf)
            alloc.ensure_registered()
            Allocator.publish_root(root.buf)  # last: the heap is complete
        except BaseException:
            for seg in (root, first):
                seg.remove()
                seg.close()
            raise
        heap = cls(root.shmid, root, backend, alloc)
        with _heaps_lock:
            _heaps[heap.id] = weakref.ref(heap)
            _kept[heap.id] = heap
        return heap

    @classmethod
    def attach(cls, heap_id: int, *, register: bool = True) -> Heap:
        """The heap with this id, attached once per process.

        ``register=False`` is for inspection (the CLI): the process does not
        enter the heap's registry until it allocates or frees.
        """
        if isinstance(heap_id, bool) or not isinstance(heap_id, int):
            raise TypeError(f"heap id must be an int, not {type(heap_id).__name__}")
        if not 0 <= heap_id <= 0x7FFFFFFF:  # a shmid: the kernel would truncate a bigger one
            raise FileNotFoundError(errno.ENOENT, f"no heap has id {heap_id} (not a shmid)")
        with _heaps_lock:
            ref = _heaps.get(heap_id)
            heap = ref() if ref is not None else None
        if heap is not None and heap._alloc is not None:
            if not heap._alloc.root32[H_DESTROYED]:
                return heap
            heap.close()  # destroyed by its owner: let go of the mapping
            raise FileNotFoundError(errno.ENOENT, f"heap {heap_id} was destroyed")
        root = segment.attach(heap_id)
        try:
            if root.size < ROOT_SIZE:
                raise CorruptHeapError(
                    f"segment {heap_id} is not a sharedobj heap (only {root.size} bytes)"
                )
            Allocator.validate_root(root.buf)
            if root.buf.cast("I")[H_DESTROYED]:
                raise FileNotFoundError(errno.ENOENT, f"heap {heap_id} was destroyed")
            _check_owner(heap_id, segment.owners(heap_id), inspect=not register)
            # segments this process adds follow the creator's settings
            cfg = Allocator.read_config(root.buf.cast("I"))
            backend = _SysVBackend(
                RobustMutex(root.buf, LOCK_OFFSET),
                mode=cfg.mode,
                noreserve=cfg.noreserve,
                max_segment_size=cfg.max_segment_size or None,
            )
            alloc = Allocator(backend, root.buf, heap_id)
            if register:
                alloc.ensure_registered()
        except BaseException:
            root.close()
            raise
        heap = cls(heap_id, root, backend, alloc)
        with _heaps_lock:
            _heaps[heap_id] = weakref.ref(heap)
            _kept[heap_id] = heap
        return heap

    def _a(self) -> Allocator:
        alloc = self._alloc
        if alloc is None:
            raise ValueError(f"heap {self.id} is closed in this process")
        return alloc

    # ------------------------------------------------------------------
    # blocks

    def alloc_zeroed(self, nbytes: int) -> Block:
        """A block of ``nbytes`` that reads as zeros (what a new SharedMemory promises).

        Small blocks and small runs are cleared with a store; a run of a megabyte
        or more gets its pages punched out (MADV_REMOVE), which zeroes them
        without making them resident; a huge block is a fresh segment already.
        """
        block = self.alloc(nbytes)
        if block.kind == RUN and nbytes >= DISCARD_MIN:
            pages = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
            self._backend.discard(self._a()._ids[block.arena], block.offset, pages)
        elif block.kind != HUGE:
            buf = block.buf
            buf[:] = bytes(nbytes) if nbytes <= 65536 else b"\0" * nbytes
        return block

    def alloc(self, nbytes: int) -> Block:
        """A block of ``nbytes``.  Its contents are not zeroed (small blocks are reused)."""
        alloc = self._alloc
        if alloc is None:
            raise ValueError(f"heap {self.id} is closed in this process")
        if type(nbytes) is int and 0 < nbytes <= MAX_SMALL:
            # The hot path, inlined from Allocator.alloc_small: a magazine pop
            # and one state-byte store; refills go through the allocator.
            try:
                arena, off, pos, old = alloc.mags[CLASS_BY_GRANULE[(nbytes + 15) >> 4]].pop()
            except IndexError:
                arena, off, tag, pos = alloc.alloc_small(nbytes)
            else:
                tag = alloc.tag + 1
                if tag > 255:
                    tag = TAG_BASE + 1
                if tag == old:  # a slot never comes back under the tag it was freed with
                    tag = tag + 1 if tag < 255 else TAG_BASE + 1
                alloc.tag = tag
                try:
                    alloc.bufs[arena][pos] = tag
                except KeyError:  # the arena table changed under a cached slot
                    raise CorruptHeapError(
                        f"heap {self.id}: arena {arena} left the table"
                    ) from None
            b = _new(Block)
            b._heap = self
            b._heap_id = self.id
            b.arena = arena
            b.offset = off
            b.size = nbytes
            b.gen = tag
            b.kind = SMALL
            b._pos = pos
            b._buf = None
            return b
        _check_nbytes(nbytes)
        max_size = self._max_size
        if max_size and nbytes > max_size:
            raise ValueError(
                f"cannot allocate {nbytes} bytes: more than the heap's max_size ({max_size})"
            )
        if nbytes > self._threshold:
            arena, gen = alloc.alloc_huge(nbytes)
            return Block(self, arena, 0, nbytes, gen, HUGE, -1)
        arena, off, gen = alloc.alloc_run(nbytes)
        return Block(self, arena, off, nbytes, gen, RUN, -1)

    def free(self, block: Block) -> None:
        """Give ``block`` back.  Freeing twice, or a stale handle, raises StaleHandleError."""
        if type(block) is not Block:
            raise TypeError(f"free() takes a Block, not {type(block).__name__}")
        if block._heap_id != self.id:
            raise ValueError(f"{block!r} belongs to heap {block._heap_id}, not {self.id}")
        alloc = self._alloc
        if alloc is None:
            raise ValueError(f"heap {self.id} is closed in this process")
        kind = block.kind
        if kind == SMALL:
            pos = block._pos
            if pos < 0:
                if pos == _FREED:
                    raise StaleHandleError(f"{block!r} was already freed")
                pos = alloc.slot_position(block.arena, block.offset, block.size)
            alloc.free_small(block.arena, block.offset, block.size, block.gen, pos)
        elif kind == RUN:
            alloc.free_run(block.arena, block.offset, block.gen)
        else:
            alloc.free_huge(block.arena, block.gen)
        block._buf = None
        block._pos = _FREED

    def _validate(self, block: Block) -> None:
        alloc = self._a()
        if block.kind == SMALL:
            pos = (
                block._pos
                if block._pos >= 0
                else alloc.slot_position(block.arena, block.offset, block.size)
            )
            if alloc.small_tag(block.arena, pos) != block.gen:
                raise StaleHandleError(
                    f"{block!r} is stale: its block was freed (and maybe reused)"
                )
            block._pos = pos
        elif block.kind == RUN:
            if alloc.is_live_run(block.arena, block.offset, block.gen, block.size):
                return
            if alloc.run_generation(block.arena, block.offset) != block.gen:
                raise StaleHandleError(
                    f"{block!r} is stale: its block was freed (and maybe reused)"
                )
            if alloc.run_pages(block.arena, block.offset) * PAGE_SIZE < block.size:
                raise StaleHandleError(f"{block!r} is larger than the run it names")
        else:
            if alloc.huge_generation(block.arena) != block.gen:
                raise StaleHandleError(f"{block!r} is stale: its huge block was freed")

    def _buf(self, block: Block) -> memoryview:
        region = self._a().arena_buf(block.arena)
        end = block.offset + block.size
        if end > len(region):
            raise StaleHandleError(f"{block!r} reaches past its segment ({len(region)} bytes)")
        return region[block.offset : end]

    # ------------------------------------------------------------------
    # the heap as a whole

    def stats(self) -> dict[str, Any]:
        """Bytes used and free per size class, fragmentation, segments, resident bytes."""
        alloc = self._a()
        s = alloc.stats()
        resident = 0
        ids = {self.id}
        for _i, _k, seg_ids, _size in alloc.arena_ids():
            ids.update(seg_ids)
        for info in list_segments():
            if info.shmid in ids:
                resident += info.rss or 0
        s["resident_bytes"] = resident
        s["heap_id"] = self.id
        return s

    def release_memory(self) -> int:
        """Give the freed pages the heap keeps resident for reuse back to the kernel now.

        Freed page runs of a megabyte or more stay resident up to the heap's
        ``dirty_max`` per arena (copying into them is about ten times faster
        than into pages that fault in fresh); call this when the memory is
        wanted elsewhere.  Returns the bytes given back.
        """
        return self._a().release_dirty()

    def header(self) -> dict[str, Any]:
        """Who made the heap, when, how it is configured, who uses it (no lock taken)."""
        alloc = self._a()
        cfg = alloc.config
        w = alloc.root32
        return {
            "heap_id": self.id,
            "creator_pid": int(w[H_CREATOR_PID]),
            "owner_uid": int(w[H_OWNER_UID]),
            "created_ns": alloc.created_ns,
            "auto_remove": cfg.auto_remove,
            "max_size": cfg.max_size,
            "arena_size": cfg.arena_size,
            "huge_threshold": cfg.huge_threshold,
            "dirty_max": cfg.dirty_max,
            "mode": cfg.mode,
            "role": _ROLES.get(int(w[H_ROLE]), "unknown"),
            "names": int(w[H_NAMES_COUNT]),
            "processes": alloc.registry(),
            "segments": [
                {"index": i, "kind": _KINDS.get(k, "unknown"), "ids": list(ids), "size": size}
                for i, k, ids, size in alloc.arena_ids()
            ],
        }

    def check(self) -> list[str]:
        """Every inconsistency in the heap's metadata (an empty list when healthy)."""
        return self._a().check()

    def recover(self) -> int:
        """Roll back a half-done operation and reclaim dead processes' cached blocks."""
        return self._a().recover()

    def close(self) -> None:
        """Leave the heap in this process: cached blocks go back, mappings are dropped.

        Views and memoryviews obtained from blocks stay valid.  With
        auto_remove, the heap disappears when every process has closed it or
        exited.
        """
        alloc = self._alloc
        if alloc is None:
            return
        retire = False
        try:
            alloc.unregister()
            retire = self._retire_if_unused(alloc)
        finally:
            self._alloc = None
            if self._names is not None:
                self._names.forget()
            ids = [seg_ids for _i, _k, seg_ids, _s in alloc.arena_ids()] if retire else []
            for hook in close_hooks:
                with contextlib.suppress(Exception):
                    hook(self.id)
            alloc.forget_mappings()
            self._backend.close()
            self._root.close()
            with _heaps_lock:
                if _heaps.get(self.id) is not None and _heaps[self.id]() is self:
                    del _heaps[self.id]
                if _kept.get(self.id) is self:
                    del _kept[self.id]
            for seg_ids in ids:
                self._backend.remove_region(seg_ids)
            if retire:
                self._backend.remove_region((self.id,))

    def retire_if_unused(self) -> bool:
        """Remove a *default* heap that holds no name and that no other live process uses.

        This is how the per-user default heap goes away: when the last process
        using it leaves (Heap.close at exit runs it), not on every unlink,
        which would rebuild the heap for each create.  Returns True if the
        heap was marked retired (its segments are removed by close/destroy).
        """
        alloc = self._a()
        if self._retire_if_unused(alloc):
            self.destroy()
            return True
        return False

    def _retire_if_unused(self, alloc: Allocator) -> bool:
        w = alloc.root32
        if w[H_ROLE] != ROLE_DEFAULT or w[H_NAMES_COUNT] or w[H_RETIRED]:
            return False
        with alloc.locked():
            if w[H_NAMES_COUNT] or w[H_RETIRED]:
                return False
            others = [p for p in alloc.registry() if p["cache_id"] != alloc.cache_id]
            if any(alloc.backend.process_alive(p["pid"], p["start"]) for p in others):
                return False  # someone else uses it: the last one to leave retires it
            w[H_RETIRED] = 1  # under the lock: an attacher that sees it looks again
        return True

    def destroy(self) -> None:
        """Remove every segment of the heap now (processes still attached keep their mappings)."""
        alloc = self._a()
        ids = [seg_ids for _i, _k, seg_ids, _s in alloc.arena_ids()]
        alloc.root32[H_DESTROYED] = 1  # other processes let go when they next attach
        self.close()
        for seg_ids in ids:
            self._backend.remove_region(seg_ids)
        self._backend.remove_region((self.id,))

    @property
    def closed(self) -> bool:
        return self._alloc is None

    def __enter__(self) -> Heap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Heap.attach, (self.id,))

    def __repr__(self) -> str:
        return f"<sharedobj.Heap id={self.id}{' closed' if self.closed else ''}>"


# heap id, arena, offset (48 bits), size (48 bits), generation, kind: 23 bytes,
# so a pickled handle stays under 64 bytes with the module path included.
_HANDLE = struct.Struct("<iH6s6sIB")


def _check_owner(heap_id: int, owners: tuple[int, int], *, inspect: bool) -> None:
    """Refuse a heap another user created or owns, before trusting anything in it.

    Whoever can write a heap can make its users unpickle anything (see
    :mod:`sharedobj.trust`), so the heap must be ours: created by this user
    (``cuid``, set by the kernel) and still owned by this user (``uid``).
    Root may *inspect* (``register=False``, as the CLI does) any heap, but uses
    only its own.
    """
    uid, cuid = owners
    euid = os.geteuid()
    if (cuid != euid or uid != euid) and not (inspect and euid == 0):
        who = cuid if cuid != euid else uid
        raise PermissionError(
            errno.EACCES,
            f"heap {heap_id} belongs to uid {who}, not to this process (uid {euid}); refusing to "
            f"trust it: whoever can write a heap can make its users unpickle anything",
        )


def _pack(heap_id: int, arena: int, offset: int, size: int, gen: int, kind: int) -> bytes:
    return _HANDLE.pack(
        heap_id, arena, offset.to_bytes(6, "little"), size.to_bytes(6, "little"), gen, kind
    )


def _unpack(data: bytes) -> tuple[int, int, int, int, int, int]:
    heap_id, arena, off, size, gen, kind = _HANDLE.unpack(data)
    return heap_id, arena, int.from_bytes(off, "little"), int.from_bytes(size, "little"), gen, kind


_FREED = -2  # Block._pos once freed through this object (-1: position not known yet)
_new = object.__new__


class Block:
    """A block of a heap: ``buf`` is a writable memoryview of exactly ``size`` bytes."""

    __slots__ = ("_buf", "_heap", "_heap_id", "_pos", "arena", "gen", "kind", "offset", "size")

    def __init__(
        self,
        heap: Heap | None,
        arena: int,
        offset: int,
        size: int,
        gen: int,
        kind: int,
        pos: int,
        heap_id: int = 0,
    ) -> None:
        self._heap = heap
        self._heap_id = heap.id if heap is not None else heap_id
        self.arena = arena
        self.offset = offset
        self.size = size
        self.gen = gen
        self.kind = kind
        self._pos = pos
        self._buf: memoryview | None = None

    @property
    def heap(self) -> Heap:
        """The heap, attached (and this handle validated) on first use in this process."""
        heap = self._heap
        if heap is None or heap._alloc is None:
            heap = Heap.attach(self._heap_id)
            heap._validate(self)
            self._heap = heap
        return heap

    @property
    def buf(self) -> memoryview:
        buf = self._buf
        if buf is None:
            if self._pos == _FREED:
                raise StaleHandleError(f"{self!r} was freed")
            heap = self._heap
            region = None
            if heap is not None and heap._alloc is not None:
                region = heap._alloc.bufs.get(self.arena)
            if region is None:  # unpickled, huge, or not attached yet: the careful way
                return self._buf_slow()
            buf = self._buf = region[self.offset : self.offset + self.size]
        return buf

    def _buf_slow(self) -> memoryview:
        buf = self._buf = self.heap._buf(self)
        return buf

    @property
    def handle(self) -> BlockHandle:
        return BlockHandle(
            _pack(self._heap_id, self.arena, self.offset, self.size, self.gen, self.kind)
        )

    def free(self) -> None:
        self.heap.free(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_h, (self.handle.data,))

    def __repr__(self) -> str:
        kind = ("small", "run", "huge")[self.kind]
        return f"<sharedobj.Block heap={self._heap_id} arena={self.arena} offset={self.offset} size={self.size} {kind} gen={self.gen}>"


class BlockHandle:
    """The few bytes that name a block; unpickles (or :meth:`open`\\ s) to a Block attached lazily."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, bytes) or len(data) != _HANDLE.size:
            raise ValueError(f"a block handle is {_HANDLE.size} bytes, got {data!r:.40}")
        self.data = data

    def open(self) -> Block:
        """The block this handle names (attached when first used)."""
        return _open_handle(self.data)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_h, (self.data,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockHandle) and other.data == self.data

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        heap_id, arena, offset, size, gen, kind = _unpack(self.data)
        return f"BlockHandle(heap={heap_id}, arena={arena}, offset={offset}, size={size}, gen={gen}, kind={kind})"


def _open_handle(data: bytes) -> Block:
    if not isinstance(data, bytes) or len(data) != _HANDLE.size:
        raise ValueError("damaged block handle")
    heap_id, arena, offset, size, gen, kind = _unpack(data)
    if (
        kind not in (SMALL, RUN, HUGE)
        or size <= 0
        or heap_id < 0
        or (kind == SMALL) != (size <= MAX_SMALL)
    ):
        raise ValueError(f"damaged block handle (kind {kind}, size {size}, heap {heap_id})")
    return Block(None, arena, offset, size, gen, kind, -1, heap_id)


def _h(data: bytes) -> Block:
    """Unpickle a block handle.  Published as ``sharedobj._h``: a short name keeps pickles small."""
    return _open_handle(data)


_h.__module__ = "sharedobj"


def _close_all() -> None:
    with _heaps_lock:
        heaps = [ref() for ref in _heaps.values()]
    for heap in heaps:
        if heap is not None:
            with contextlib.suppress(Exception):  # best effort at exit
                heap.close()


def _after_fork_in_child() -> None:
    global _heaps_lock
    _heaps_lock = threading.Lock()
    for ref in list(_heaps.values()):
        heap = ref()
        if heap is not None and heap._alloc is not None:
            heap._alloc._reset_process_state()
            if heap._names is not None:
                heap._names.reset_after_fork()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
