"""Page runs inside one arena: best-fit from size bins, split, coalesce, and a frontier.

An arena starts as header + metadata + untouched pages.  Pages past the
*frontier* have never been handed out, are still zero (or were given back to
the kernel) and cost nothing; runs are cut from free runs first, then from the
frontier.  A freed run merges with free neighbours on both sides (the page map
tags the first and last page of every free run), and a free run that reaches
the frontier moves the frontier back instead, so a heap that empties returns
to its initial state.

Freed pages: a run of a megabyte or more used to go back to the kernel at
once (MADV_REMOVE), and the next big allocation paid a page fault per page,
which made copying into fresh memory ten times slower than into resident
memory (1 GB/s against 10 GB/s here).  So a freed big run is now kept
resident, tagged TAG_DIRTY, while the arena's dirty pages stay within a budget
(``H_DIRTY_MAX``, per arena), as jemalloc keeps dirty pages for reuse.  A
dirty run stays where it is even at the frontier (moving the frontier back
over resident pages would hide them from the count).  Past the budget, the
freed pages and every dirty run they merge with go back to the kernel, and
the merged run is an ordinary TAG_FREE one.  ``A_DIRTY`` counts the pages of
the arena's dirty runs, so it may over-count: a dirty run that absorbed a
clean neighbour counts all of its pages.

Every write goes through a :class:`~sharedobj.allocator.undo.Txn`, so any
operation here can be rolled back after a crash.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptHeapError
from ..limits import PAGE_SIZE
from .layout import (
    A_BINS,
    A_DIRTY,
    A_FRONTIER,
    A_INDEX,
    A_META_PAGES,
    A_NPAGES,
    A_PARTIAL,
    FREE_TAGS,
    LEN_MASK,
    MAGIC_ARENA,
    NBINS,
    NIL,
    TAG_DIRTY,
    TAG_FREE,
    TAG_SHIFT,
    arena_meta_pages,
    bin_of,
)
from .undo import Txn

_FREE_BITS = TAG_FREE << TAG_SHIFT
_DIRTY_BITS = TAG_DIRTY << TAG_SHIFT
_MAX_FIT_WALK = 256  # first-fit steps in a range bin before trying the next bin


class ArenaView:
    """This process's typed views of one general arena's metadata."""

    __slots__ = ("buf", "index", "meta_pages", "npages", "nxt", "pm", "prv", "w")

    def __init__(self, index: int, buf: memoryview) -> None:
        if bytes(buf[:8]) != MAGIC_ARENA:
            raise CorruptHeapError(f"arena {index} has no arena magic")
        self.index = index
        self.buf = buf
        self.w = buf.cast("I") if len(buf) % 4 == 0 else buf[: len(buf) // 4 * 4].cast("I")
        npages = self.w[A_NPAGES]
        if npages * PAGE_SIZE > len(buf) or self.w[A_INDEX] != index:
            raise CorruptHeapError(
                f"arena {index} header disagrees with its mapping ({npages} pages)"
            )
        self.npages = npages
        self.meta_pages = self.w[A_META_PAGES]
        if self.meta_pages != arena_meta_pages(npages):
            raise CorruptHeapError(f"arena {index} header has {self.meta_pages} metadata pages")
        self.pm = PAGE_SIZE // 4  # word index of pm[0]
        self.nxt = self.pm + npages
        self.prv = self.nxt + npages

    # -- reads ------------------------------------------------------------
    def frontier(self) -> int:
        return int(self.w[A_FRONTIER])

    def pages_array(self, which: int) -> np.ndarray:
        """pm / nxt / prv as a numpy array (for scans in check() and stats())."""
        return np.frombuffer(self.buf, dtype=np.uint32, count=self.npages, offset=which * 4)

    def corrupt(self, what: str) -> CorruptHeapError:
        return CorruptHeapError(f"arena {self.index}: {what}")

    def _links(self, head: int) -> tuple[int, int]:
        """(next, previous) of a listed run, checked: a wild link must not become a wild write."""
        w = self.w
        nx, pv = w[self.nxt + head], w[self.prv + head]
        if (nx >= self.npages and nx != NIL) or (pv >= self.npages and pv != NIL):
            raise self.corrupt(f"page {head} links to pages {nx}/{pv} outside the arena")
        return nx, pv

    def _free_run(self, head: int) -> int:
        """The length of the free run at ``head``, validated (a bin may hold a wild entry)."""
        if not self.meta_pages <= head < self.npages:
            raise self.corrupt(f"a free list names page {head}, outside the data pages")
        v = self.w[self.pm + head]
        n = v & LEN_MASK
        tag = v >> TAG_SHIFT
        if tag not in FREE_TAGS or not n or head + n > self.w[A_FRONTIER]:
            raise self.corrupt(f"a free list names page {head}, which is no free run ({v:#x})")
        return int(n)

    # -- free lists -------------------------------------------------------
    def _unlink(self, txn: Txn, head: int, npages: int) -> None:
        w, r = self.w, self.index
        nx, pv = self._links(head)
        if pv == NIL:
            txn.set(r, w, A_BINS + bin_of(npages), nx)
        else:
            txn.set(r, w, self.nxt + pv, nx)
        if nx != NIL:
            txn.set(r, w, self.prv + nx, pv)

    def _link(self, txn: Txn, head: int, npages: int) -> None:
        w, r = self.w, self.index
        b = A_BINS + bin_of(npages)
        first = w[b]
        if first >= self.npages and first != NIL:
            raise self.corrupt(f"free bin {b - A_BINS} names page {first}, outside the arena")
        txn.set(r, w, self.nxt + head, first)
        txn.set(r, w, self.prv + head, NIL)
        if first != NIL:
            txn.set(r, w, self.prv + first, head)
        txn.set(r, w, b, head)

    def _mark_free(self, txn: Txn, head: int, npages: int, bits: int = _FREE_BITS) -> None:
        w, r = self.w, self.index
        txn.set(r, w, self.pm + head, bits | npages)
        if npages > 1:
            txn.set(r, w, self.pm + head + npages - 1, bits | npages)
        self._link(txn, head, npages)

    # -- allocation -------------------------------------------------------
    def find_fit(self, npages: int) -> int:
        """The head of a free run of at least ``npages``, or NIL."""
        w = self.w
        start_bin = bin_of(npages)
        for b in range(start_bin, NBINS):
            head = w[A_BINS + b]
            steps = 0
            while head != NIL and steps < _MAX_FIT_WALK:
                if self._free_run(head) >= npages:
                    return int(head)
                head = w[self.nxt + head]
                steps += 1
        return NIL

    def alloc(self, txn: Txn, npages: int, tag: int) -> int:
        """Take a run of ``npages`` tagged ``tag``; returns its head page or NIL."""
        w, r = self.w, self.index
        head = self.find_fit(npages)
        if head != NIL:
            v = w[self.pm + head]
            size = v & LEN_MASK
            bits = v & ~LEN_MASK
            self._unlink(txn, head, size)
            if bits == _DIRTY_BITS:  # the pages taken are no longer counted as kept
                txn.set(r, w, A_DIRTY, max(0, w[A_DIRTY] - npages))
            if size > npages:  # the rest stays free; its tags overwrite the old tail
                self._mark_free(txn, head + npages, size - npages, bits)
            elif size > 1:
                txn.set(r, w, self.pm + head + size - 1, 0)
        else:
            frontier = w[A_FRONTIER]
            if frontier < self.meta_pages:
                raise self.corrupt(f"frontier {frontier} is inside the metadata pages")
            if frontier + npages > self.npages:
                return NIL
            head = frontier
            txn.set(r, w, A_FRONTIER, frontier + npages)
        txn.set(r, w, self.pm + head, (tag << TAG_SHIFT) | npages)
        return int(head)

    def free(self, txn: Txn, head: int, keep: int, budget: int) -> list[tuple[int, int]]:
        """Free the run at ``head``; returns the (start, npages) ranges to give back to the kernel.

        ``keep``: a freed run of at least this many pages is worth keeping
        resident; ``budget``: the most pages the arena's dirty runs may hold.
        The caller has checked that ``head`` is a used run.
        """
        w, r, pm = self.w, self.index, self.pm
        npages = w[pm + head] & LEN_MASK
        start, end = head, head + npages
        frontier = w[A_FRONTIER]
        if not npages or head < self.meta_pages or end > frontier or frontier > self.npages:
            raise self.corrupt(f"run at page {head} has length {npages} (frontier {frontier})")
        resident = [(start, npages)] if npages >= keep else []
        absorbed = 0  # pages of dirty neighbours merged in
        txn.set(r, w, pm + head, 0)
        # merge with the run on the right
        if end < frontier:
            right = w[pm + end]
            rtag = right >> TAG_SHIFT
            if rtag in FREE_TAGS:
                rlen = self._free_run(end)
                if rlen > 1 and w[pm + end + rlen - 1] != right:
                    raise self.corrupt(f"free-run tags disagree at page {end}")
                self._unlink(txn, end, rlen)
                txn.set(r, w, pm + end, 0)
                if rlen > 1:
                    txn.set(r, w, pm + end + rlen - 1, 0)
                if rtag == TAG_DIRTY:
                    resident.append((end, rlen))
                    absorbed += rlen
                end += rlen
        # merge with the run on the left
        if start > self.meta_pages:
            left = w[pm + start - 1]
            ltag = left >> TAG_SHIFT
            if ltag in FREE_TAGS:
                llen = left & LEN_MASK
                lstart = start - llen
                if not llen or lstart < self.meta_pages or w[pm + lstart] != left:
                    raise CorruptHeapError(f"arena {r}: free-run tags disagree at page {start - 1}")
                self._unlink(txn, lstart, llen)
                txn.set(r, w, pm + lstart, 0)
                if llen > 1:
                    txn.set(r, w, pm + start - 1, 0)
                if ltag == TAG_DIRTY:
                    resident.append((lstart, llen))
                    absorbed += llen
                start = lstart
        dirty = max(0, w[A_DIRTY] - absorbed)
        if resident and dirty + (end - start) <= budget:
            txn.set(r, w, A_DIRTY, dirty + (end - start))
            self._mark_free(txn, start, end - start, _DIRTY_BITS)
            return []
        if absorbed:
            txn.set(r, w, A_DIRTY, dirty)
        if end >= frontier:
            txn.set(r, w, A_FRONTIER, start)
        else:
            self._mark_free(txn, start, end - start)
        return resident

    def release_dirty(self, txn: Txn) -> list[tuple[int, int]]:
        """Turn every dirty run into a clean one; returns the ranges to give back to the kernel."""
        w, r, pm = self.w, self.index, self.pm
        out: list[tuple[int, int]] = []
        frontier = w[A_FRONTIER]
        p = self.meta_pages
        while p < frontier:
            v = w[pm + p]
            n = v & LEN_MASK
            if not n:
                raise self.corrupt(f"page {p} starts no run")
            if v >> TAG_SHIFT == TAG_DIRTY:
                out.append((p, n))
            p += n
        for start, n in reversed(out):  # the last first: one at the frontier moves it back
            self._unlink(txn, start, n)
            txn.set(r, w, pm + start, 0)
            if n > 1:
                txn.set(r, w, pm + start + n - 1, 0)
            if start + n >= w[A_FRONTIER]:
                txn.set(r, w, A_FRONTIER, start)
            else:
                self._mark_free(txn, start, n)
        if w[A_DIRTY]:
            txn.set(r, w, A_DIRTY, 0)
        return out

    # -- slab partial lists ----------------------------------------------
    def partial_head(self, cls: int) -> int:
        return int(self.w[A_PARTIAL + cls])

    def push_partial(self, txn: Txn, cls: int, head: int) -> None:
        w, r = self.w, self.index
        first = w[A_PARTIAL + cls]
        if first >= self.npages and first != NIL:
            raise self.corrupt(f"partial list of class {cls} names page {first}")
        txn.set(r, w, self.nxt + head, first)
        txn.set(r, w, self.prv + head, NIL)
        if first != NIL:
            txn.set(r, w, self.prv + first, head)
        txn.set(r, w, A_PARTIAL + cls, head)

    def drop_partial(self, txn: Txn, cls: int, head: int) -> None:
        w, r = self.w, self.index
        nx, pv = self._links(head)
        if pv == NIL:
            txn.set(r, w, A_PARTIAL + cls, nx)
        else:
            txn.set(r, w, self.nxt + pv, nx)
        if nx != NIL:
            txn.set(r, w, self.prv + nx, pv)
        txn.set(r, w, self.nxt + head, NIL)
        txn.set(r, w, self.prv + head, NIL)

    def in_partial(self, cls: int, head: int) -> bool:
        return self.w[self.prv + head] != NIL or self.w[A_PARTIAL + cls] == head


def init_arena(buf: memoryview, index: int, root_id: int, root_ctime: int) -> int:
    """Write a fresh arena header into ``buf`` (zero-filled); returns its page count.

    Not logged: an arena that is not yet in the table does not exist for
    anyone, so a crash here leaves nothing to repair.
    """
    from .layout import A_HEADER_END, A_ROOT_CTIME, A_ROOT_ID

    npages = len(buf) // PAGE_SIZE
    meta = arena_meta_pages(npages)
    if meta >= npages:
        raise ValueError(f"an arena of {len(buf)} bytes is too small for its own metadata")
    w = buf[:PAGE_SIZE].cast("I")
    buf[:8] = MAGIC_ARENA
    w[A_INDEX] = index
    w[A_NPAGES] = npages
    w[A_ROOT_ID] = root_id & 0xFFFFFFFF
    w[A_FRONTIER] = meta
    w[A_META_PAGES] = meta
    w[A_ROOT_CTIME] = root_ctime & 0xFFFFFFFF
    w[A_ROOT_CTIME + 1] = root_ctime >> 32
    for i in range(A_BINS, A_HEADER_END):
        w[i] = NIL
    return npages
