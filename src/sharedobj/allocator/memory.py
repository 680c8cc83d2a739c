"""The allocator over plain bytearrays: no System V, no other process.

Used by the tests (every rule of the allocator can be checked here, fast and
deterministically) and by anyone who wants to study the allocator in one
process.  Regions are bytearrays, the heap lock is a thread lock, and
"discarding" pages zeroes them, as MADV_REMOVE does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..limits import PAGE_SIZE
from .core import DIRTY_MAX, Allocator, Config
from .layout import ROOT_SIZE


class MemoryBackend:
    """A Backend whose regions are bytearrays and whose processes are simulated."""

    def __init__(self) -> None:
        self.regions: dict[tuple[int, ...], bytearray] = {}
        self.removed: set[tuple[int, ...]] = set()
        self.mutex = threading.Lock()
        self.next_id = 1000
        self.pid = 1
        self.dead: set[int] = set()
        self.owner_died = False  # set by a test to simulate a holder that died
        self.recoveries = 0

    def lock(self) -> bool:
        self.mutex.acquire()
        died, self.owner_died = self.owner_died, False
        return died

    def unlock(self) -> None:
        self.mutex.release()

    def recovered(self) -> None:
        self.recoveries += 1

    def create_region(
        self, nbytes: int, stage: Callable[[int], None] | None = None
    ) -> tuple[tuple[int, ...], memoryview]:
        ids = (self.next_id,)
        self.next_id += 1
        if stage is not None:
            stage(ids[0])
        region = bytearray(-(-nbytes // PAGE_SIZE) * PAGE_SIZE)
        self.regions[ids] = region
        return ids, memoryview(region)

    def attach_region(self, ids: tuple[int, ...]) -> memoryview:
        try:
            return memoryview(self.regions[ids])
        except KeyError:
            raise FileNotFoundError(f"no region {ids}") from None

    def release_region(self, ids: tuple[int, ...]) -> None:
        pass

    def remove_region(self, ids: tuple[int, ...]) -> None:
        self.removed.add(ids)
        if ids in self.regions and ids not in self.live_ids():
            del self.regions[ids]

    def live_ids(self) -> set[tuple[int, ...]]:
        return set()  # regions are dropped only when a rollback removes them

    def discard(self, ids: tuple[int, ...], offset: int, length: int) -> None:
        region = self.regions[ids]
        start = -(-offset // PAGE_SIZE) * PAGE_SIZE
        end = (offset + length) // PAGE_SIZE * PAGE_SIZE
        if end > start:
            region[start:end] = bytes(end - start)

    def process_alive(self, pid: int, start: int) -> bool:
        return pid not in self.dead

    def process_identity(self) -> tuple[int, int]:
        return self.pid, 0


def memory_allocator(
    size: int,
    *,
    max_size: int = 0,
    huge_threshold: int = 1 << 20,
    backend: MemoryBackend | None = None,
    dirty_max: int = DIRTY_MAX,
) -> Allocator:
    """A fresh allocator whose first arena has ``size`` bytes, on bytearrays."""
    backend = backend or MemoryBackend()
    root_ids, root = backend.create_region(ROOT_SIZE)
    cfg = Config(
        arena_size=-(-size // PAGE_SIZE) * PAGE_SIZE + PAGE_SIZE,
        max_size=max_size,
        huge_threshold=huge_threshold,
        auto_remove=False,
        dirty_max=dirty_max,
    )
    Allocator.format_root(root, cfg, backend.pid, 0, 0)
    alloc = Allocator(backend, root, root_ids[0])
    ids, buf = backend.create_region(cfg.arena_size)
    alloc.add_first_arena(ids, buf)
    Allocator.publish_root(root)
    return alloc


def process_view(alloc: Allocator, pid: int) -> Allocator:
    """Another simulated process's view of the same heap (its own magazines and cache id)."""
    backend = alloc.backend
    assert isinstance(backend, MemoryBackend)
    other = Allocator(_PidBackend(backend, pid), alloc.root, alloc.root_id)
    return other


class _PidBackend(MemoryBackend):
    """Shares a MemoryBackend's regions and lock, but reports another pid."""

    def __init__(self, base: MemoryBackend, pid: int) -> None:
        self.__dict__ = base.__dict__.copy()
        self._base = base
        self._pid = pid

    def lock(self) -> bool:
        return self._base.lock()

    def unlock(self) -> None:
        self._base.unlock()

    def recovered(self) -> None:
        self._base.recovered()

    def create_region(
        self, nbytes: int, stage: Callable[[int], None] | None = None
    ) -> tuple[tuple[int, ...], memoryview]:
        return self._base.create_region(nbytes, stage)

    def process_alive(self, pid: int, start: int) -> bool:
        return pid not in self._base.dead

    def process_identity(self) -> tuple[int, int]:
        return self._pid, 0
