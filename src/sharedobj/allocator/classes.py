"""Size classes for small blocks, spaced like jemalloc's but twice as densely.

Below 128 bytes classes step by 16 (the alignment every block gets); from 128
bytes on, every power-of-two interval is cut into 8 equal steps, so rounding a
request up to its class wastes at most 1/8 (12.5%) of it.  The largest class is
32 KiB; anything bigger is a page run.

Each class is carved from slabs sized so that the slab holds at least 8 slots
and its rounding waste (the tail that fits no slot) stays under ~2%.
"""

from __future__ import annotations

from ..limits import PAGE_SIZE

ALIGN = 16
MAX_SMALL = 32 * 1024


def _build_classes() -> list[int]:
    sizes = list(range(ALIGN, 128 + 1, ALIGN))
    base = 128
    while base < MAX_SMALL:
        step = base // 8
        sizes.extend(range(base + step, 2 * base + 1, step))
        base *= 2
    return sizes


CLASS_SIZES: tuple[int, ...] = tuple(_build_classes())
NCLASSES = len(CLASS_SIZES)

# request size -> class index, by 16-byte granule (2049 entries for 32 KiB)
_BY_GRANULE: list[int] = []
for _g in range(MAX_SMALL // ALIGN + 1):
    _n = _g * ALIGN
    _BY_GRANULE.append(next(i for i, s in enumerate(CLASS_SIZES) if s >= max(_n, 1)))
CLASS_BY_GRANULE: tuple[int, ...] = tuple(_BY_GRANULE)


def class_of(nbytes: int) -> int:
    """The index of the smallest class that holds ``nbytes`` (1 <= nbytes <= MAX_SMALL)."""
    return CLASS_BY_GRANULE[(nbytes + ALIGN - 1) >> 4]


SLAB_HEADER = 16  # u32 class, u32 nslots, u32 nfree, u32 reserved; then u8 state[nslots]


def slab_geometry(size: int) -> tuple[int, int, int]:
    """(pages per slab, slots per slab, offset of the first slot) for a class size.

    Each slot costs its size plus one state byte (free / cached by process k /
    allocated with generation tag g), kept in the slab header.
    """
    best: tuple[float, int, int, int] | None = None
    for pages in (16, 32, 64, 128, 256):
        total = pages * PAGE_SIZE
        nslots = (total - SLAB_HEADER) // (size + 1)
        while nslots > 0:
            first = -(-(SLAB_HEADER + nslots) // ALIGN) * ALIGN
            if first + nslots * size <= total:
                break
            nslots -= 1
        if nslots < 8:
            continue
        waste = (total - nslots * size) / total
        if best is None or waste < best[0] - 0.005:
            best = (waste, pages, nslots, -(-(SLAB_HEADER + nslots) // ALIGN) * ALIGN)
        if waste < 0.02:
            break
    assert best is not None
    return best[1], best[2], best[3]


SLAB_GEOMETRY: tuple[tuple[int, int, int], ...] = tuple(slab_geometry(s) for s in CLASS_SIZES)
