"""Walking a heap: statistics, and check() that reports every inconsistency it finds.

Kept apart from the allocator's hot paths: these walks read every page-map
entry and every slab header, which is fine for a diagnostic and a test oracle
but never done by alloc or free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CorruptHeapError
from ..limits import PAGE_SIZE
from .classes import CLASS_SIZES, NCLASSES, SLAB_GEOMETRY, SLAB_HEADER
from .layout import (
    A_BINS,
    A_DIRTY,
    A_INDEX,
    A_META_PAGES,
    A_NPAGES,
    A_PARTIAL,
    ARENA_LIVE,
    FREE_TAGS,
    H_LOG_COUNT,
    KIND_GENERAL,
    KIND_HUGE,
    LEN_MASK,
    MAGIC_ARENA,
    MAX_PROCS,
    NBINS,
    NIL,
    T_KIND,
    T_NBYTES,
    T_STATE,
    TAG_BASE,
    TAG_DIRTY,
    TAG_FREE,
    TAG_RUN,
    TAG_SHIFT,
    TAG_SLAB,
    bin_of,
)
from .pages import ArenaView

if TYPE_CHECKING:
    from .core import Allocator


def _runs(av: ArenaView) -> list[tuple[int, int, int]]:
    """(head, tag, npages) of every run below the frontier, in address order."""
    front = av.frontier()
    pm = av.pages_array(av.pm)
    out = []
    p = av.meta_pages
    while p < front:
        v = int(pm[p])
        tag, n = v >> TAG_SHIFT, v & LEN_MASK
        out.append((p, tag, n))
        if n == 0:
            break
        p += n
    return out


def collect_stats(alloc: Allocator) -> dict[str, Any]:
    w = alloc.root32
    classes: list[dict[str, int]] = []
    per_class = np.zeros((NCLASSES, 4), dtype=np.int64)  # slabs, used, cached, free
    run_used_pages = run_free_pages = untouched_pages = meta_bytes = run_blocks = 0
    dirty_pages = 0
    largest_free = 0
    general = huge = 0
    huge_bytes = huge_requested = 0
    total = 0
    for index, kind, _ids, size in alloc.arena_ids():
        total += size
        if kind == KIND_HUGE:
            huge += 1
            huge_bytes += size
            e = alloc._entry(index)
            huge_requested += int(w[e + T_NBYTES]) | (int(w[e + T_NBYTES + 1]) << 32)
            continue
        general += 1
        try:
            av = alloc._arena(index)
        except (OSError, ValueError):
            continue
        meta_bytes += av.meta_pages * PAGE_SIZE
        untouched = av.npages - av.frontier()
        untouched_pages += untouched
        largest_free = max(largest_free, untouched)
        for head, tag, n in _runs(av):
            if tag in FREE_TAGS:
                run_free_pages += n
                largest_free = max(largest_free, n)
                if tag == TAG_DIRTY:
                    dirty_pages += n
            elif tag == TAG_RUN:
                run_used_pages += n
                run_blocks += 1
            elif tag == TAG_SLAB:
                base = head * PAGE_SIZE
                cls, nslots = int(av.w[base // 4]), int(av.w[base // 4 + 1])
                if cls >= NCLASSES or nslots != SLAB_GEOMETRY[cls][1]:
                    continue
                # A copy: other processes turn their cached slots into allocated
                # ones (and back) without the heap lock, so the live bytes can
                # change between two reads of them.
                state = np.frombuffer(
                    av.buf, dtype=np.uint8, count=nslots, offset=base + SLAB_HEADER
                ).copy()
                used = int(np.count_nonzero(state >= TAG_BASE))
                free = int(np.count_nonzero(state == 0))
                per_class[cls] += (1, used, nslots - used - free, free)
                meta_bytes += SLAB_GEOMETRY[cls][2]
    used_small = 0
    reserved_small = 0
    for cls in range(NCLASSES):
        slabs, used, cached, free = (int(x) for x in per_class[cls])
        if not slabs:
            continue
        size = CLASS_SIZES[cls]
        pages = SLAB_GEOMETRY[cls][0]
        classes.append(
            {
                "size": size,
                "slabs": slabs,
                "used_blocks": used,
                "cached_blocks": cached,
                "free_blocks": free,
                "used_bytes": used * size,
                "free_bytes": (free + cached) * size,
                "slab_bytes": slabs * pages * PAGE_SIZE,
            }
        )
        used_small += used * size
        reserved_small += slabs * pages * PAGE_SIZE
    free_bytes = (run_free_pages + untouched_pages) * PAGE_SIZE
    used_bytes = used_small + run_used_pages * PAGE_SIZE + huge_bytes
    return {
        "total_bytes": total,
        "max_size": alloc.config.max_size,
        "segments": general + huge,
        "general_arenas": general,
        "huge_blocks": huge,
        "huge_bytes": huge_bytes,
        "huge_requested_bytes": huge_requested,
        "used_bytes": used_bytes,
        "small_used_bytes": used_small,
        "small_reserved_bytes": reserved_small,
        "run_used_bytes": run_used_pages * PAGE_SIZE,
        "run_free_bytes": run_free_pages * PAGE_SIZE,
        "kept_resident_bytes": dirty_pages * PAGE_SIZE,
        "untouched_bytes": untouched_pages * PAGE_SIZE,
        "free_bytes": free_bytes,
        "largest_free_run": largest_free * PAGE_SIZE,
        # share of free page memory that is not in the largest free run
        "fragmentation": (1 - largest_free * PAGE_SIZE / free_bytes) if free_bytes else 0.0,
        "metadata_bytes": meta_bytes,
        "metadata_ratio": meta_bytes / total if total else 0.0,
        "classes": classes,
        "processes": len(alloc.registry()),
        "live_blocks": int(per_class[:, 1].sum()) + run_blocks + huge,
    }


def check_heap(alloc: Allocator) -> list[str]:
    """Every inconsistency in the heap's metadata, as readable sentences (empty = healthy)."""
    problems: list[str] = []
    w = alloc.root32
    try:
        alloc.validate_root(alloc.root)
    except CorruptHeapError as exc:
        problems.append(str(exc))
    if w[H_LOG_COUNT]:
        problems.append(
            f"an operation is half done ({w[H_LOG_COUNT]} undo-log entries not rolled back)"
        )
    registered = {e["cache_id"] for e in alloc.registry()}
    for i in range(alloc._arena_count()):
        e = alloc._entry(i)
        if w[e + T_STATE] != ARENA_LIVE:
            continue
        try:
            ids = alloc._entry_ids(i)
        except CorruptHeapError as exc:
            problems.append(str(exc))
            continue
        mapped = alloc._ids.get(i)
        if mapped is not None and mapped != ids:
            problems.append(f"arena table entry {i} names segments {ids}, not {mapped}")
            continue
        if w[e + T_KIND] == KIND_GENERAL:
            try:
                av = alloc._arena(i)
            except Exception as exc:
                problems.append(f"arena {i}: cannot be attached ({exc})")
                continue
            if not alloc.owns(av):
                problems.append(f"arena {i}: its header names another heap")
            problems.extend(_check_arena(av, registered))
        elif w[e + T_KIND] == KIND_HUGE:
            try:
                alloc.arena_buf(i)
            except Exception as exc:
                problems.append(f"huge block {i}: cannot be attached ({exc})")
        else:
            problems.append(f"arena table entry {i} has unknown kind {w[e + T_KIND]}")
    return problems


def _walk_list(av: ArenaView, first: int, limit: int) -> tuple[list[int], str | None]:
    seen: list[int] = []
    visited: set[int] = set()
    prev = NIL
    node = first
    while node != NIL:
        if node >= av.npages:
            return seen, f"link to page {node} beyond the arena"
        if node in visited or len(seen) > limit:
            return seen, f"cycle through page {node}"
        if av.w[av.prv + node] != prev:
            return seen, f"page {node}: back link {av.w[av.prv + node]} should be {prev}"
        visited.add(node)
        seen.append(node)
        prev = node
        node = int(av.w[av.nxt + node])
    return seen, None


def _check_arena(av: ArenaView, registered: set[int]) -> list[str]:
    out: list[str] = []
    name = f"arena {av.index}"
    w = av.w
    if bytes(av.buf[:8]) != MAGIC_ARENA or (w[A_INDEX], w[A_NPAGES], w[A_META_PAGES]) != (
        av.index,
        av.npages,
        av.meta_pages,
    ):
        # this process checked them when it attached; a process attaching now would refuse
        out.append(f"{name}: header (magic, index, size) damaged")
    front = av.frontier()
    if not av.meta_pages <= front <= av.npages:
        return [f"{name}: frontier {front} outside [{av.meta_pages}, {av.npages}]"]
    pm = av.pages_array(av.pm)
    prv = av.pages_array(av.prv)
    if np.any(pm[front:]):
        out.append(f"{name}: pages past the frontier ({front}) carry page-map tags")
    free_runs: set[int] = set()
    slabs: dict[int, set[int]] = {}
    p = av.meta_pages
    prev_tag = dirty = 0
    while p < front:
        v = int(pm[p])
        tag, n = v >> TAG_SHIFT, v & LEN_MASK
        if tag == 0 or n == 0 or p + n > front:
            out.append(
                f"{name}: page {p} starts no valid run (tag {tag}, length {n}, frontier {front})"
            )
            break
        free = tag in FREE_TAGS
        interior = pm[p + 1 : p + n - 1] if free else pm[p + 1 : p + n]
        if np.any(interior):
            out.append(f"{name}: run at page {p} ({n} pages) has tags inside it")
        if free:
            if tag == TAG_DIRTY:
                dirty += n
            if prev_tag in FREE_TAGS:
                out.append(f"{name}: free run at page {p} follows another free run (not coalesced)")
            if n > 1 and int(pm[p + n - 1]) != v:
                out.append(
                    f"{name}: free run at page {p} has tail tag {int(pm[p + n - 1]):#x}, expected {v:#x}"
                )
            free_runs.add(p)
        elif tag == TAG_RUN:
            if av.w[av.nxt + p] == 0:
                out.append(f"{name}: used run at page {p} has generation 0")
        elif tag == TAG_SLAB:
            base = p * PAGE_SIZE
            cls, nslots, nfree = (
                int(av.w[base // 4]),
                int(av.w[base // 4 + 1]),
                int(av.w[base // 4 + 2]),
            )
            if cls >= NCLASSES or SLAB_GEOMETRY[cls][1] != nslots or SLAB_GEOMETRY[cls][0] != n:
                out.append(
                    f"{name}: slab at page {p} has a damaged header (class {cls}, {nslots} slots, {n} pages)"
                )
            else:
                # A copy: other processes turn their cached slots into allocated
                # ones (and back) without the heap lock, so the live bytes can
                # change between two reads of them.
                state = np.frombuffer(
                    av.buf, dtype=np.uint8, count=nslots, offset=base + SLAB_HEADER
                ).copy()
                zeros = int(np.count_nonzero(state == 0))
                if zeros != nfree:
                    out.append(
                        f"{name}: slab at page {p} counts {nfree} free slots but has {zeros}"
                    )
                cached = np.unique(state[(state > 0) & (state < TAG_BASE)])
                for c in cached:
                    if int(c) > MAX_PROCS or int(c) not in registered:
                        out.append(
                            f"{name}: slab at page {p} has slots cached by unregistered process {int(c)}"
                        )
                if n > 1 and np.any(prv[p + 1 : p + n] != p):
                    out.append(f"{name}: slab at page {p} has wrong back-pointers")
                if nfree:
                    slabs.setdefault(cls, set()).add(p)
        else:
            out.append(f"{name}: page {p} has unknown tag {tag}")
        prev_tag = tag
        p += n
    if prev_tag == TAG_FREE:  # a kept-resident (TAG_DIRTY) run may end there
        out.append(f"{name}: a free run touches the frontier (should have moved it)")
    if dirty != av.w[A_DIRTY]:
        out.append(
            f"{name}: counts {int(av.w[A_DIRTY])} kept-resident pages, its runs hold {dirty}"
        )
    in_bins: set[int] = set()
    for b in range(NBINS):
        nodes, err = _walk_list(av, int(av.w[A_BINS + b]), av.npages)
        if err:
            out.append(f"{name}: free bin {b}: {err}")
        for node in nodes:
            v = int(pm[node])
            if v >> TAG_SHIFT not in FREE_TAGS or bin_of(v & LEN_MASK) != b:
                out.append(
                    f"{name}: free bin {b} lists page {node}, which is not a free run of that size"
                )
        in_bins.update(nodes)
    if in_bins != free_runs:
        missing, extra = sorted(free_runs - in_bins)[:5], sorted(in_bins - free_runs)[:5]
        out.append(
            f"{name}: free runs not in any bin {missing}, bin entries that are not free runs {extra}"
        )
    for cls in range(NCLASSES):
        nodes, err = _walk_list(av, int(av.w[A_PARTIAL + cls]), av.npages)
        if err:
            out.append(f"{name}: partial list of class {CLASS_SIZES[cls]}: {err}")
        if set(nodes) != slabs.get(cls, set()):
            out.append(
                f"{name}: partial list of class {CLASS_SIZES[cls]} holds {sorted(nodes)[:5]}, "
                f"slabs with free slots are {sorted(slabs.get(cls, set()))[:5]}"
            )
    return out
