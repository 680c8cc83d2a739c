"""``sharedobj.SharedMemory``: the stdlib's ``multiprocessing.shared_memory.SharedMemory``, on heap blocks.

Each object is a block of a heap, published under its name in the heap's
name directory (:mod:`sharedobj.names`), instead of a POSIX segment of its
own.  Where the name is looked up:

* names that a :class:`~sharedobj.SharedMemoryManager` generated look like
  ``so<heap id>_<hex>``: they name their heap, which is attached directly;
* every other name lives in the user's *default heap*: a heap whose root
  segment has a System V key derived from the uid, so unrelated processes
  started later find it.  It is not auto-removed (a block lives until
  ``unlink()``, as in the stdlib) and it is retired when its last name goes.

Deliberate differences from the stdlib are listed in docs/differences.md.
"""

from __future__ import annotations

import errno
import os
import random
import re
import threading
import time
import weakref
import zlib
from typing import Any

from .allocator.layout import H_RETIRED, H_VERSION, LAYOUT_VERSION, MAGIC_ROOT, ROLE_DEFAULT
from .errors import CorruptHeapError
from .heap import Block, Heap
from .names import HINTS_MAX, Ticket, encode_name

__all__ = ["SharedMemory", "default_heap", "default_heap_key"]

DEFAULT_HEAP_SIZE = (
    64 << 20
)  # first arena of the default heap (noreserve: costs nothing until used)
_MANAGED = re.compile(r"so(\d+)_[0-9a-f]+\Z")
_lock = threading.Lock()
_default: Heap | None = None
# Generated names: 32 random bits, like the stdlib's secrets.token_hex(4), from a
# generator seeded by the OS (and reseeded in fork children) - secrets costs 1 us.
_random = random.Random()
# The heap each name was last opened in, so that opening it again goes straight
# to that heap's remembered entry (Directory.reopen), which checks it is still so.
# Weak: remembering a name must not keep a heap (and its segments) alive.
_reopen: dict[str, weakref.ref[Heap]] = {}


def default_heap_key() -> int:
    """The System V key of this user's default heap (``SHAREDOBJ_DEFAULT_KEY`` overrides it)."""
    env = os.environ.get("SHAREDOBJ_DEFAULT_KEY")
    if env:
        try:
            key = int(env, 0)
        except ValueError:
            raise ValueError(f"SHAREDOBJ_DEFAULT_KEY must be an integer, got {env!r}") from None
        if not 0 < key < 2**31:
            raise ValueError(f"SHAREDOBJ_DEFAULT_KEY must be in 1..2**31-1, got {key}")
        return key
    return (zlib.crc32(f"sharedobj default heap, uid {os.geteuid()}".encode()) & 0x7FFFFFFF) or 1


def _alive(heap: Heap | None) -> bool:
    return heap is not None and not heap.closed and not heap._a().root32[H_RETIRED]


def default_heap(*, create: bool = True) -> Heap | None:
    """This user's default heap, attached (or created) once per process."""
    heap = _default
    if heap is not None and heap._alloc is not None and not heap._alloc.root32[H_RETIRED]:
        return heap  # the common case, without the lock
    return _find_default(create)


def _find_default(create: bool) -> Heap | None:
    global _default
    from . import segment

    with _lock:
        if _alive(_default):
            return _default
        key = default_heap_key()
        deadline = time.monotonic() + 5.0
        while True:
            try:
                seg = segment.attach_key(key)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    _default = Heap.create(
                        DEFAULT_HEAP_SIZE,
                        key=key,
                        auto_remove=False,
                        noreserve=True,
                        role=ROLE_DEFAULT,
                    )
                    return _default
                except FileExistsError:
                    continue  # another process made it first: attach theirs
            try:
                heap = Heap.attach(seg.shmid)
            except CorruptHeapError:
                _refuse_other_layout(seg, key)
                seg.close()
                if time.monotonic() > deadline:
                    raise CorruptHeapError(
                        f"System V key {key:#x} (the default heap's) names a segment that is not a "
                        f"sharedobj heap; set SHAREDOBJ_DEFAULT_KEY to use another key"
                    ) from None
                time.sleep(0.001)  # its creator is still writing it
                continue
            seg.close()
            if not heap._a().root32[H_RETIRED]:
                _default = heap
                return heap
            heap.close()  # retired while we looked: its key is gone, try again
            time.sleep(0.001)


def _refuse_other_layout(seg: Any, key: int) -> None:
    """A complete heap of another layout version under the default key: say so at once.

    (A heap without its magic yet is one being made: the caller waits for it.)
    """
    buf = seg.buf
    if len(buf) < 64 or bytes(buf[:8]) != MAGIC_ROOT:
        return
    version = int(buf.cast("I")[H_VERSION])
    if version == LAYOUT_VERSION:
        return
    from .inventory import INSPECTABLE_VERSIONS

    shmid = seg.shmid
    seg.close()
    removal = (
        "'python -m sharedobj clean --idle' removes it"
        if version in INSPECTABLE_VERSIONS
        else f"remove it with 'ipcrm -m {shmid}', then 'python -m sharedobj clean' (its arenas)"
    )
    raise CorruptHeapError(
        f"the default heap (System V key {key:#x}, shmid {shmid}) was made by a sharedobj with "
        f"heap layout version {version}; this one reads version {LAYOUT_VERSION}. Let the "
        f"processes using it finish (it goes with the last of them); if none is left, "
        f"{removal}; or set SHAREDOBJ_DEFAULT_KEY to use another key"
    )


def _heap_for(name: str, create: bool) -> Heap | None:
    match = _MANAGED.match(name)
    if match:
        try:
            return Heap.attach(int(match.group(1)))
        except (FileNotFoundError, CorruptHeapError):
            if create:
                raise FileNotFoundError(
                    errno.ENOENT, f"the heap named by {name!r} is gone", name
                ) from None
            return None
    return default_heap(create=create)


def _retire_if_empty(heap: Heap) -> None:
    """Remove the default heap now if it holds no name and no other live process uses it."""
    heap.retire_if_unused()


class SharedMemory:
    """A named block of shared memory, like ``multiprocessing.shared_memory.SharedMemory``.

    ``SharedMemory(create=True, size=n)`` makes a zero-filled block under a
    fresh name; ``SharedMemory(name)`` opens an existing one from any process
    of the same user.  ``close()`` ends this object's use; ``unlink()``
    removes the name, and the memory is freed once every process that opened
    it has closed it (or exited).
    """

    _buf: memoryview | None
    _block: Block | None
    _ticket: Ticket | None
    _data: bytes
    _h: int

    def __init__(
        self, name: str | None = None, create: bool = False, size: int = 0, *, track: bool = True
    ) -> None:
        if not create and name.__class__ is str and size.__class__ is int and size >= 0:
            ref = _reopen.get(name)
            heap = ref() if ref is not None else None
            if heap is not None and heap._names is not None:
                got = heap._names.reopen(name)
                if got is not None:
                    known, self._ticket, self._h, view = got
                    self._heap, self._block, self._track = heap, known, bool(track)
                    self._name, self._data, self._size = name, got[1][0], known.size
                    self._buf = view[:]  # a view of its own, as each stdlib object has
                    return
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"'size' must be an int, not {type(size).__name__}")
        if size < 0:
            raise ValueError("'size' must be a positive integer")
        if create and size == 0:
            raise ValueError("'size' must be a positive number different from zero")
        if name is None and not create:
            raise ValueError("'name' can only be None if create=True")
        self._block = None
        self._buf = None
        self._ticket = None
        self._track = bool(track)
        if create:
            self._create(name, size)
        else:
            assert name is not None
            data = self._data = encode_name(name)
            h = self._h = zlib.crc32(data)
            heap = _heap_for(name, create=False)
            if heap is None:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", name)
            self._heap = heap
            self._block, self._ticket = heap.names.open(data, h, name)
            self._name = name
            if len(_reopen) >= HINTS_MAX:
                _reopen.clear()
            _reopen[name] = weakref.ref(heap)
        block = self._block
        assert block is not None
        self._size = block.size
        self._buf = block.buf

    def _create(self, name: str | None, size: int) -> None:
        while True:
            if name is None:
                # a generated name always lives in the default heap
                chosen = f"psm_{_random.getrandbits(32):08x}"
                heap = default_heap()
                tracked = self._track
            else:
                chosen = name
                heap = _heap_for(chosen, create=True)
                # a manager's blocks live until its shutdown: never tracked
                tracked = self._track and not _MANAGED.match(chosen)
            assert heap is not None
            data = encode_name(chosen)
            h = zlib.crc32(data)
            block = heap.alloc_zeroed(size)
            try:
                self._ticket = heap.names.create(data, h, block, tracked=tracked)
            except FileExistsError:
                heap.free(block)
                if name is None:
                    continue  # a generated name collided: draw another
                raise
            except BaseException:
                heap.free(block)
                raise
            self._heap, self._block, self._name, self._data, self._h = heap, block, chosen, data, h
            return

    # -- the stdlib's attributes --------------------------------------------
    @property
    def buf(self) -> memoryview | None:
        """A memoryview of exactly ``size`` bytes (None once closed, like the stdlib's)."""
        return self._buf

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        """The size asked for (the stdlib reports it rounded up to whole pages when opening)."""
        return self._size

    def close(self) -> None:
        """End this object's use of the memory.

        Views taken from ``buf`` (numpy arrays included) stay valid: unlike the
        stdlib's, close() never raises BufferError and never invalidates memory
        still referenced.
        """
        ticket = self._ticket
        if self._block is None or ticket is None:
            return
        self._block = None
        self._buf = None
        names = self._heap._names
        if names is not None:
            names.close(ticket)

    def unlink(self) -> None:
        """Remove the name; the memory goes once every process has closed it."""
        heap = self._heap
        if heap._alloc is None:  # closed in this process: find the heap again
            found = _heap_for(self._name, create=False)
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", self._name)
            heap = found
        heap.names.unlink(self._data, self._h, self._ticket if heap is self._heap else None)

    def __del__(self) -> None:
        if getattr(self, "_block", None) is None:  # closed already (or never opened)
            return
        try:
            self.close()
        except Exception:  # never raise from a finaliser (suppress() would cost 1 us)
            return

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.name, False, self.size))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.name!r}, size={self.size})"

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_random.seed)
