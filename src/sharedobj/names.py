"""A heap's name directory: ``str`` name -> block, shared by every process of the heap.

This is what makes ``SharedMemory(name=...)`` work without a segment per
object.  The table is an open-addressing hash table in a page run of the
heap; the root header points at it.

Lifetime rules, chosen to fix the stdlib's known problems rather than copy them:

* ``unlink`` removes the *name* at once (later opens fail), but the block is
  freed only when no process has it open any more.  A process that has it
  open can never see it destroyed under its feet.
* Each entry has one "open" byte per registered process, written only by that
  process, so opening and closing need no atomic instructions; a process that
  dies has its bytes cleared when the heap reclaims its registry slot.
* A *tracked* entry (the stdlib's ``track=True``) is unlinked automatically
  when the process that created it has gone (exited, or was killed) - and
  then, as above, freed once nobody has it open.  No warnings, no segment
  destroyed while in use.

Crash safety comes from the order of stores: an entry is filled while it is
still EMPTY or a tombstone and becomes visible with one store of its state;
an entry being freed is marked FREEING with the freer's id before the block
is freed, and the block's generation makes finishing that free idempotent.
The one window left: a creator killed between allocating the block and
publishing the entry leaks that block until the heap goes.
"""

from __future__ import annotations

import contextlib
import errno
import struct
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

from .allocator.layout import (
    H_LOG_COUNT,
    H_NAMES_ARENA,
    H_NAMES_COUNT,
    H_NAMES_GEN,
    H_NAMES_OFF,
)
from .errors import CorruptHeapError, StaleHandleError

if TYPE_CHECKING:
    from .allocator.core import Allocator
    from .allocator.undo import Txn
    from .heap import Block, Heap

MAX_NAME = 255  # bytes of UTF-8, like NAME_MAX for POSIX shared memory names
ENTRY = 512
HEADER = 512
MIN_CAP = 256  # 128 KiB: a create/unlink churn rebuilds it (for its tombstones) 4x less than at 64
_MAGIC = 0x544E_4F53  # "SONT"

# entry words
E_STATE, E_NAMELEN, E_HASH, E_ARENA, E_KIND, E_GEN = 0, 1, 2, 3, 4, 5
E_OFF, E_SIZE = 6, 8  # u64 each
E_FLAGS, E_CREATOR, E_FREER, E_POS = 10, 11, 12, 13  # E_POS: small block's state byte + 1
OPENERS = 64  # byte offset: one byte per registry slot (cache id 1..126)
NAME = 192  # byte offset of the name

EMPTY, LIVE, TOMB, UNLINKED, FREEING = 0, 1, 2, 3, 4
FLAG_TRACKED = 1

# table header words
T_MAGIC, T_CAP, T_USED, T_TOMBS = 0, 1, 2, 3


def encode_name(name: object) -> bytes:
    """The UTF-8 bytes of a valid name (the stdlib's rules: a str of at most 255 bytes)."""
    if not isinstance(name, str):
        raise TypeError(f"a shared memory name must be a str, not {type(name).__name__}")
    data = name.encode("utf-8", "surrogatepass")
    if not data:
        raise ValueError("a shared memory name cannot be empty")
    if len(data) > MAX_NAME:
        raise OSError(
            errno.ENAMETOOLONG,
            f"shared memory name of {len(data)} bytes is longer than {MAX_NAME}",
            name,
        )
    if b"\0" in data:
        raise ValueError("a shared memory name cannot contain NUL characters")
    return data


#: Where an open found its entry, enough for close() to be one store:
#: (name, generation, table key, slot).  A plain tuple: it is made on every open.
Ticket = tuple[bytes, int, tuple[int, int, int], int]
_LIVE = (LIVE,)
_SMALL = 0  # heap.SMALL (a block kind); heap imports this module


# state, name length, hash, arena, kind, generation, offset, size, flags, creator, freer, pos+1
_ENTRY_HEAD = struct.Struct("<IIIIIIQQIIII")
_HEAD_LEN = _ENTRY_HEAD.size
_ZERO128 = bytes(128)
HINTS_MAX = 4096  # names remembered per process for a quick reopen (then forgotten all at once)

#: What an open remembers so that opening the same name again needs no lookup:
#: the table, the entry's offset in it, its head as it was (state LIVE), the
#: name, the block, the Ticket and the name's crc32.
Hint = tuple["_Table", int, bytes, bytes, "Block", Ticket, int, memoryview]


class _Table:
    """This process's view of the current table (re-read whenever the root points elsewhere)."""

    __slots__ = ("arena", "buf", "cap", "entries", "gen", "key", "offset", "words")

    def __init__(self, alloc: Allocator, arena: int, offset: int, gen: int) -> None:
        region = alloc.arena_buf(arena)
        self.arena, self.offset, self.gen = arena, offset, gen
        self.key = (arena, offset, gen)
        words = region[offset : offset + HEADER].cast("I")
        cap = int(words[T_CAP])
        if words[T_MAGIC] != _MAGIC or cap < MIN_CAP or cap & (cap - 1):
            raise CorruptHeapError(f"heap name table at arena {arena} offset {offset} is damaged")
        self.cap = cap
        self.buf = region[offset : offset + HEADER + cap * ENTRY]
        self.words = self.buf.cast("I")
        self.entries = np.frombuffer(
            self.buf, dtype=np.uint8, count=cap * ENTRY, offset=HEADER
        ).reshape(cap, ENTRY)

    def w(self, slot: int, field: int) -> int:
        return int(self.words[(HEADER + slot * ENTRY) // 4 + field])

    def set(self, slot: int, field: int, value: int) -> None:
        self.words[(HEADER + slot * ENTRY) // 4 + field] = value

    def u64(self, slot: int, field: int) -> int:
        base = (HEADER + slot * ENTRY) // 4 + field
        return int(self.words[base]) | (int(self.words[base + 1]) << 32)

    def set_u64(self, slot: int, field: int, value: int) -> None:
        base = (HEADER + slot * ENTRY) // 4 + field
        self.words[base] = value & 0xFFFFFFFF
        self.words[base + 1] = value >> 32

    def name(self, slot: int) -> bytes:
        n = self.w(slot, E_NAMELEN)
        start = HEADER + slot * ENTRY + NAME
        return bytes(self.buf[start : start + min(n, MAX_NAME)])

    def find(
        self, data: bytes, h: int, states: tuple[int, ...] = (LIVE,), gen: int | None = None
    ) -> int:
        """The slot holding ``data`` in one of ``states`` (and generation ``gen``), or -1."""
        words, mask, n = self.words, self.cap - 1, len(data)
        slot = h & mask
        for _ in range(self.cap):
            base = (HEADER + slot * ENTRY) >> 2
            state = words[base]
            if state == EMPTY:
                return -1
            if (
                state in states
                and words[base + E_HASH] == h
                and words[base + E_NAMELEN] == n
                and (gen is None or words[base + E_GEN] == gen)
            ):
                start = (base << 2) + NAME
                if self.buf[start : start + n] == data:
                    return slot
            slot = (slot + 1) & mask
        return -1

    def probe(self, data: bytes, h: int) -> tuple[int, int]:
        """(the LIVE slot holding ``data`` or -1, the first EMPTY or tombstone slot on its chain).

        One walk for what a create needs: whether the name is taken, and where
        it would go.
        """
        words, buf, mask, n = self.words, self.buf, self.cap - 1, len(data)
        slot = h & mask
        free = -1
        for _ in range(self.cap):
            base = (HEADER + slot * ENTRY) >> 2
            state = words[base]
            if state == EMPTY:
                return -1, slot if free < 0 else free
            if state == TOMB:
                if free < 0:
                    free = slot
            elif (
                state == LIVE
                and words[base + E_HASH] == h
                and words[base + E_NAMELEN] == n
                and buf[(base << 2) + NAME : (base << 2) + NAME + n] == data
            ):
                return slot, free
            slot = (slot + 1) & mask
        if free < 0:
            raise CorruptHeapError("heap name table has no free slot although it was grown")
        return -1, free

    def free_slot(self, h: int) -> int:
        words, mask = self.words, self.cap - 1
        slot = h & mask
        for _ in range(self.cap):
            if words[(HEADER + slot * ENTRY) >> 2] in (EMPTY, TOMB):
                return slot
            slot = (slot + 1) & mask
        raise CorruptHeapError("heap name table has no free slot although it was grown")

    def bury(self, slot: int) -> None:
        """Make ``slot`` a tombstone - or EMPTY when nothing probes past it.

        Repeated create/unlink would otherwise fill the table with tombstones
        that every lookup has to walk over.
        """
        words, mask = self.words, self.cap - 1
        nxt = (slot + 1) & mask
        if words[(HEADER + nxt * ENTRY) >> 2] != EMPTY:
            words[(HEADER + slot * ENTRY) >> 2] = TOMB
            words[T_USED] -= 1
            words[T_TOMBS] += 1
            return
        words[(HEADER + slot * ENTRY) >> 2] = EMPTY
        words[T_USED] -= 1
        prev = (slot - 1) & mask
        while words[(HEADER + prev * ENTRY) >> 2] == TOMB:  # tombstones now at a chain's end
            words[(HEADER + prev * ENTRY) >> 2] = EMPTY
            words[T_TOMBS] -= 1
            prev = (prev - 1) & mask

    def openers(self, slot: int) -> bool:
        start = HEADER + slot * ENTRY + OPENERS
        return self.buf[start : start + 128].tobytes() != _ZERO128


class Directory:
    """The name directory of one heap, as this process uses it."""

    def __init__(self, heap: Heap) -> None:
        self.heap = heap
        self._table: _Table | None = None
        self._opens: dict[
            tuple[bytes, int], int
        ] = {}  # (name, generation) -> opens in this process
        self._trim = 0  # size of a small block freed under the lock: its magazine may need a flush
        self._hints: dict[str, Hint] = {}
        alloc = heap._a()
        mutex = alloc.backend.mutex  # type: ignore[attr-defined]
        self._lockfns: tuple[Any, ...] | None = (*mutex.inline_parts(), alloc.root32)
        alloc.departure_hooks.append(self._departed)

    def forget(self) -> None:
        """Drop the cached table view (the heap is being closed: let its mapping go)."""
        self._table = None
        self._hints.clear()
        self._lockfns = None  # they hold views of the root: let its mapping go too

    def reset_after_fork(self) -> None:
        self._opens.clear()  # the child has opened nothing yet

    # ------------------------------------------------------------------
    def _alloc(self) -> Allocator:
        return self.heap._a()

    def _current(self, alloc: Allocator) -> _Table | None:
        """The table the root points at (each table is a run with a generation of its own)."""
        w = alloc.root32
        gen = w[H_NAMES_GEN]
        table = self._table
        if table is not None and table.gen == gen:
            return table
        if not gen:
            return None
        key = (
            int(w[H_NAMES_ARENA]),
            int(w[H_NAMES_OFF]) | (int(w[H_NAMES_OFF + 1]) << 32),
            int(gen),
        )
        table = self._table = _Table(alloc, *key)
        return table

    @staticmethod
    def _fits(table: _Table | None, extra: int) -> bool:
        if table is None:
            return False
        words = table.words
        return (words[T_USED] + words[T_TOMBS] + extra) * 10 <= table.cap * 7

    def _make_room(self, alloc: Allocator, extra: int) -> None:
        """Create or grow the table so ``extra`` more entries fit (takes the lock itself)."""
        with alloc.txn() as txn:
            table = self._current(alloc)
            if self._fits(table, extra):
                return
            cap = MIN_CAP
            if table is not None:
                used = int(table.words[T_USED])
                cap = table.cap * 2 if (used + extra) * 100 > table.cap * 35 else table.cap
            self._rebuild(alloc, txn, table, cap)

    def _rebuild(self, alloc: Allocator, txn: Txn, old: _Table | None, cap: int) -> _Table:
        """Copy live entries into a fresh table and swap it in, inside the caller's operation."""
        from .allocator.core import ROOT_REGION

        arena, offset, gen = alloc.alloc_run_in(txn, HEADER + cap * ENTRY)
        region = alloc.arena_buf(arena)
        fresh = region[offset : offset + HEADER + cap * ENTRY]
        np.frombuffer(fresh, dtype=np.uint8)[:] = 0  # a reused run may hold old bytes
        words = fresh.cast("I")
        words[T_MAGIC], words[T_CAP] = _MAGIC, cap
        new = _Table.__new__(_Table)
        new.arena, new.offset, new.gen, new.key = arena, offset, gen, (arena, offset, gen)
        new.cap, new.buf, new.words = cap, fresh, words
        new.entries = np.frombuffer(
            fresh, dtype=np.uint8, count=cap * ENTRY, offset=HEADER
        ).reshape(cap, ENTRY)
        used = 0
        if old is not None:
            for slot in range(old.cap):
                if old.w(slot, E_STATE) in (LIVE, UNLINKED, FREEING):
                    target = new.free_slot(old.w(slot, E_HASH))
                    new.entries[target] = old.entries[slot]
                    used += 1
        words[T_USED] = used
        w = alloc.root32
        txn.set(ROOT_REGION, w, H_NAMES_ARENA, arena)
        txn.set(ROOT_REGION, w, H_NAMES_OFF, offset & 0xFFFFFFFF)
        txn.set(ROOT_REGION, w, H_NAMES_OFF + 1, offset >> 32)
        txn.set(ROOT_REGION, w, H_NAMES_GEN, gen)
        if old is not None:
            alloc.free_run_in(txn, old.arena, old.offset, old.gen)
        self._table = new
        return new

    # ------------------------------------------------------------------
    # The operations.  Names arrive encoded (``data``) with their crc32 (``h``):
    # SharedMemory computes both once.  What an open returns, and close needs,
    # is a Ticket: the table and slot it was found in, so closing is one store.

    def create(self, data: bytes, h: int, block: Block, *, tracked: bool) -> Ticket:
        """Publish ``block`` under the name, opened by this process.  FileExistsError if taken.

        This and :meth:`unlink` are the SharedMemory create/unlink hot path:
        one lock round trip each, with the lock taken and released directly
        rather than through a context manager.
        """
        alloc = self.heap._a()
        me = alloc.cache_id or alloc.ensure_registered()
        pos = block._pos
        header = _ENTRY_HEAD.pack(
            0,
            len(data),
            h,
            block.arena,
            block.kind,
            block.gen,
            block.offset,
            block.size,
            FLAG_TRACKED if tracked else 0,
            me,
            0,
            pos + 1 if pos >= 0 else 0,
        )
        while True:
            alloc._lock_and_repair()
            try:
                table = self._current(alloc)
                if table is None or not self._fits(table, 1):
                    table = None
                else:
                    taken, slot = table.probe(data, h)
                    if taken >= 0:
                        raise FileExistsError(
                            errno.EEXIST, "File exists", data.decode("utf-8", "surrogatepass")
                        )
            except BaseException:
                alloc.backend.unlock()
                raise
            if table is None:  # no table yet, or too full: make room (it locks) and retry
                alloc.backend.unlock()
                self._make_room(alloc, 1)
                continue
            try:
                base = HEADER + slot * ENTRY
                words = table.words
                was_tomb = words[base >> 2] == TOMB
                buf = table.buf
                buf[base : base + _HEAD_LEN] = header  # state stays EMPTY/TOMB: invisible
                buf[base + OPENERS : base + OPENERS + 128] = _ZERO128
                buf[base + OPENERS + me] = 1
                buf[base + NAME : base + NAME + len(data)] = data
                words[base >> 2] = LIVE  # the commit point
                words[T_USED] += 1
                if was_tomb:
                    words[T_TOMBS] -= 1
                alloc.root32[H_NAMES_COUNT] += 1
            finally:
                alloc.backend.unlock()
            key = (data, block.gen)
            opens = self._opens
            opens[key] = opens.get(key, 0) + 1
            return (data, block.gen, table.key, slot)

    def open(self, data: bytes, h: int, name: str | None = None) -> tuple[Block, Ticket]:
        """The block published under the name, now opened by this process.  FileNotFoundError if none.

        With ``name``, the entry is remembered, so that opening that name
        again in this process is :meth:`reopen`.
        """
        from .heap import Block

        alloc = self.heap._a()
        me = alloc.cache_id or alloc.ensure_registered()
        alloc._lock_and_repair()
        try:
            table, slot = self._live(alloc, data, h)
            base = HEADER + slot * ENTRY
            table.buf[base + OPENERS + me] = 1
            head = table.buf[base : base + _HEAD_LEN].tobytes()
        finally:
            alloc.backend.unlock()
        _s, _n, _h, arena, kind, gen, off, size, _f, _c, _r, pos = _ENTRY_HEAD.unpack(head)
        key = (data, gen)
        opens = self._opens
        opens[key] = opens.get(key, 0) + 1
        block = Block(self.heap, arena, off, size, gen, kind, pos - 1 if pos else -1)
        ticket = (data, gen, table.key, slot)
        if name is not None:
            hints = self._hints
            if len(hints) >= HINTS_MAX:
                hints.clear()
            hints[name] = (table, base, head, data, block, ticket, h, block.buf)
        return block, ticket

    def reopen(self, name: str) -> tuple[Block, Ticket, int, memoryview] | None:
        """Open a name this process opened before, without looking it up; None if that fails.

        The entry remembered by :meth:`open` is still the name's if, under the
        lock, the table is the current one and the entry's head (state,
        hash, block, generation, ...) and name are byte for byte what they
        were: then the same block is still published under it, and marking
        our open byte is all an open does.  Anything else - a rebuilt table,
        an unlinked or re-created name, a recovery pending, a half-done
        operation of a dead process - returns None, and the caller takes the
        full path, which repairs and looks up.  Returns the block, the ticket,
        the name's crc32 and the block's memoryview.
        """
        hint = self._hints.get(name)
        if hint is None:
            return None
        table, base, head, data, block, ticket, h, view = hint
        alloc = self.heap._alloc
        me = alloc.cache_id if alloc is not None else 0
        fns = self._lockfns
        if not me or self._table is not table or fns is None:
            return None
        trylock, unlock, ptr, flag, root = fns
        rc = trylock(ptr)
        if rc:
            if rc == errno.EBUSY:
                return None  # contended: the full path waits for it
            # a holder died: take it properly (that makes the mutex consistent and
            # leaves recovery pending), let go, and leave the repair to the full path
            mutex = alloc.backend.mutex  # type: ignore[union-attr]
            mutex._acquire_slow(rc, True, None)
            mutex.release()
            return None
        try:
            buf = table.buf
            n = len(data)
            ok = (
                not flag[0]
                and not root[H_LOG_COUNT]
                and root[H_NAMES_GEN] == table.gen
                # as bytes: a memoryview compared with bytes costs twice as much
                and buf[base : base + _HEAD_LEN].tobytes() == head
                and buf[base + NAME : base + NAME + n].tobytes() == data
            )
            if ok:
                buf[base + OPENERS + me] = 1
        finally:
            unlock(ptr)
        if not ok:
            self._hints.pop(name, None)
            return None
        key = (data, ticket[1])
        opens = self._opens
        opens[key] = opens.get(key, 0) + 1
        return block, ticket, h, view

    def _live(self, alloc: Allocator, data: bytes, h: int) -> tuple[_Table, int]:
        """The table and slot of the LIVE entry named ``data`` (lock held); FileNotFoundError if none."""
        table = self._current(alloc)
        slot = table.find(data, h, _LIVE) if table is not None else -1
        if table is None or slot < 0:
            raise FileNotFoundError(
                errno.ENOENT, "No such file or directory", data.decode("utf-8", "surrogatepass")
            )
        return table, slot

    def close(self, ticket: Ticket) -> None:
        """This process is done with the block; free it if it was unlinked and nobody else has it.

        The common case is one store (our own open byte) and one load, without
        the lock; only an unlinked entry takes the slow path.
        """
        name, gen, table_key, slot = ticket
        key = (name, gen)
        opens = self._opens
        left = opens.get(key, 0) - 1
        if left > 0:  # another object of this process still has it open
            opens[key] = left
            return
        opens.pop(key, None)
        if left < 0:
            return  # never opened here (e.g. an object inherited through fork)
        alloc = self.heap._alloc
        if alloc is None:
            return  # the heap was closed in this process: nothing of ours is left to clear
        me = alloc.cache_id
        if not me:
            return
        table = self._table
        if table is not None and table.key == table_key:
            base = HEADER + slot * ENTRY
            words = table.words
            if words[(base >> 2) + E_GEN] == gen and words[base >> 2] in (LIVE, UNLINKED):
                table.buf[base + OPENERS + me] = 0
                if words[base >> 2] == LIVE:
                    return
        victim = None
        with alloc.locked():
            table = self._current(alloc)
            if table is None:
                return
            slot = table.find(name, zlib.crc32(name), (LIVE, UNLINKED), gen)
            if slot < 0:
                return
            table.entries[slot, OPENERS + me] = 0
            if table.w(slot, E_STATE) == UNLINKED and not table.openers(slot):
                victim = self._free_or_begin(alloc, table, slot, me)
        if self._trim:
            self._trim_now(alloc)
        if victim is not None:
            self._finish_free(victim)

    def unlink(self, data: bytes, h: int, ticket: Ticket | None = None) -> None:
        """Remove the name now; the block goes once no process has it open.

        ``ticket``: where an open of this process found the entry; if it is
        still there, the lookup is skipped.
        """
        alloc = self.heap._a()
        me = alloc.cache_id or alloc.ensure_registered()
        alloc._lock_and_repair()
        try:
            table = self._current(alloc)
            slot = -1
            if ticket is not None and table is not None and table.key == ticket[2]:
                slot = ticket[3]
                base = HEADER + slot * ENTRY
                words, n = table.words, len(data)
                if not (
                    words[base >> 2] == LIVE
                    and words[(base >> 2) + E_GEN] == ticket[1]
                    and words[(base >> 2) + E_HASH] == h
                    and words[(base >> 2) + E_NAMELEN] == n
                    and table.buf[base + NAME : base + NAME + n] == data
                ):
                    slot = -1
            if slot < 0:
                table, slot = self._live(alloc, data, h)
            assert table is not None
            victim = self._unlink_slot(alloc, table, slot, me)
        finally:
            alloc.backend.unlock()
        if self._trim:
            self._trim_now(alloc)
        if victim is not None:
            self._finish_free(victim)

    def _trim_now(self, alloc: Allocator) -> None:
        size, self._trim = self._trim, 0
        alloc.trim(size)

    def names(self) -> list[str]:
        alloc = self._alloc()
        with alloc.locked():
            table = self._current(alloc)
            if table is None:
                return []
            return [
                table.name(slot).decode("utf-8", "surrogatepass")
                for slot in range(table.cap)
                if table.w(slot, E_STATE) == LIVE
            ]

    def count(self) -> int:
        return int(self._alloc().root32[H_NAMES_COUNT])

    # ------------------------------------------------------------------
    def _unlink_slot(
        self, alloc: Allocator, table: _Table, slot: int, me: int
    ) -> tuple[int, ...] | None:
        table.set(slot, E_STATE, UNLINKED)
        alloc.root32[H_NAMES_COUNT] -= 1
        if not table.openers(slot):
            return self._free_or_begin(alloc, table, slot, me)
        return None

    def _free_or_begin(
        self, alloc: Allocator, table: _Table, slot: int, me: int
    ) -> tuple[int, ...] | None:
        """Free an unreferenced entry's block: at once for a small block, else in two steps.

        Both ways the entry is FREEING, with the freer's id, until the block
        is free, so a freer that dies is finished by whoever reclaims it.
        """
        table.set(slot, E_FREER, me)
        table.set(slot, E_STATE, FREEING)
        if table.w(slot, E_KIND) == _SMALL:
            base = HEADER + slot * ENTRY
            _s, _n, _h, arena, _k, gen, off, size, _f, _c, _r, pos = _ENTRY_HEAD.unpack_from(
                table.buf, base
            )
            try:
                # the stored position is checked like any handle: the state
                # byte there must carry this generation, or nothing is freed
                pos = pos - 1 if pos else alloc.slot_position(arena, off, size)
                alloc.free_small(arena, off, size, gen, pos, flush=False)
                self._trim = size  # flushed by the caller once the lock is released
            except (StaleHandleError, IndexError):
                pass  # already free (a recoverer got there first), or a damaged position
            table.bury(slot)
            return None
        return self._victim(table, slot)

    @staticmethod
    def _victim(table: _Table, slot: int) -> tuple[int, ...]:
        base = HEADER + slot * ENTRY
        _s, _n, _h, arena, kind, gen, off, size, _f, _c, _r, _p = _ENTRY_HEAD.unpack_from(
            table.buf, base
        )
        return (*table.key, slot, arena, off, size, gen, kind)

    def _finish_free(self, victim: tuple[int, ...]) -> None:
        """Free the block of a FREEING entry (a page run or huge block), then bury the entry."""
        from .heap import Block

        t_arena, t_off, t_gen, slot, arena, off, size, gen, kind = victim
        block = Block(self.heap, arena, off, size, gen, kind, -1)
        with contextlib.suppress(
            StaleHandleError
        ):  # already freed: the generation makes this idempotent
            self.heap.free(block)
        alloc = self._alloc()
        with alloc.locked():
            table = self._current(alloc)
            if table is None:
                return
            if table.key != (t_arena, t_off, t_gen):  # rebuilt meanwhile: look the entry up again
                slot = next(
                    (
                        s
                        for s in range(table.cap)
                        if table.w(s, E_STATE) == FREEING
                        and table.w(s, E_GEN) == gen
                        and table.w(s, E_ARENA) == arena
                    ),
                    -1,
                )
            if slot >= 0 and table.w(slot, E_STATE) == FREEING and table.w(slot, E_GEN) == gen:
                table.bury(slot)

    def _departed(self, cache_id: int, died: bool) -> None:
        """A process left the heap: drop its opens, retire its tracked names, finish its frees."""
        alloc = self._alloc()
        victims = []
        with alloc.locked():
            table = self._current(alloc)
            if table is None:
                return
            me = alloc.cache_id or cache_id
            table.entries[:, OPENERS + cache_id] = 0
            for slot in range(table.cap):
                state = table.w(slot, E_STATE)
                victim = None
                if (
                    state == LIVE
                    and table.w(slot, E_FLAGS) & FLAG_TRACKED
                    and table.w(slot, E_CREATOR) == cache_id
                ):
                    victim = self._unlink_slot(alloc, table, slot, me)
                elif (state == UNLINKED and not table.openers(slot)) or (
                    state == FREEING and table.w(slot, E_FREER) == cache_id and died
                ):
                    victim = self._free_or_begin(alloc, table, slot, me)
                if victim is not None:
                    victims.append(victim)
        if self._trim:
            self._trim_now(alloc)
        for victim in victims:
            self._finish_free(victim)
