"""``sharedobj.SharedMemoryManager``: the stdlib's manager, without a server process.

The stdlib's ``SharedMemoryManager`` starts a server process that tracks
segments and unlinks them at shutdown.  Here the manager owns one heap
(auto-removed), and everything made through it is a block of that heap:

* ``shutdown()`` destroys the heap, so everything goes at once;
* if the owning process is killed, the kernel frees the heap when the last
  process using it exits: nothing to leak, no server to orphan;
* a child (fork, spawn or forkserver) that receives the manager, or any
  object made through it, attaches the heap by id.  Names made by the manager
  carry the heap id (``so<id>_<hex>``), so ``SharedMemory(name)`` finds them
  from any process.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from .allocator.layout import ROLE_MANAGER
from .arrays import SharedArray, heap_asarray, new_array
from .heap import Heap
from .shared_memory import SharedMemory

__all__ = ["Manager", "SharedMemoryManager"]

DEFAULT_SIZE = 64 << 20  # first arena; noreserve, so it costs nothing until used


class SharedMemoryManager:
    """Creates SharedMemory and ShareableList objects that all go at ``shutdown()``.

    ``size`` is the heap's first arena (it grows when full); ``max_segment_size``
    caps each System V segment (larger requests become spans); ``mode`` is the
    permission of every segment.  ``address`` and ``authkey`` are accepted for
    compatibility with the stdlib's signature and ignored: there is no server.
    """

    def __init__(
        self,
        address: Any = None,
        authkey: Any = None,
        *,
        size: int | None = None,
        max_segment_size: int | None = None,
        mode: int = 0o600,
    ) -> None:
        del address, authkey
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError(f"size must be a positive int, got {size!r}")
        self._size = size
        self._max_segment_size = max_segment_size
        self._mode = mode
        self._heap: Heap | None = None
        self._owner = False
        self._shut = False

    # -- lifecycle ------------------------------------------------------------
    def start(self, initializer: Any = None, initargs: Iterable[Any] = ()) -> None:
        """Create the manager's heap.  ``initializer`` is run here, as the stdlib runs it in its server."""
        if self._heap is not None:
            raise RuntimeError("SharedMemoryManager already started")
        if self._shut:
            raise RuntimeError("SharedMemoryManager was shut down; make a new one")
        self._heap = Heap.create(
            self._size or DEFAULT_SIZE,
            max_segment_size=self._max_segment_size,
            mode=self._mode,
            auto_remove=True,
            noreserve=self._size is None,
            role=ROLE_MANAGER,
        )
        self._owner = True
        if initializer is not None:
            initializer(*initargs)

    def shutdown(self) -> None:
        """Free everything made through this manager (in every process), now.

        In a process that received the manager (not the one that started it),
        this only detaches.  Views still held keep their memory mapped: nothing
        crashes, but the names are gone.
        """
        heap, self._heap = self._heap, None
        self._shut = True
        if heap is None or heap.closed:
            return
        if self._owner:
            heap.destroy()
        # A copy received by pickling only forgets the heap: the Heap object is
        # shared by everything in this process that uses that heap.

    def __enter__(self) -> SharedMemoryManager:
        if self._heap is None and not self._shut:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        # the stdlib's manager shuts its server down when collected; same here
        if getattr(self, "_owner", False):
            try:
                self.shutdown()
            except Exception:
                return

    # -- factories ------------------------------------------------------------
    @property
    def heap(self) -> Heap:
        """The manager's heap (for blocks, arrays and containers made directly on it)."""
        heap = self._heap
        if heap is None or heap.closed:
            raise RuntimeError(
                "SharedMemoryManager is not started (call start() or use it in a with block)"
            )
        return heap

    def _name(self) -> str:
        return f"so{self.heap.id}_{secrets.token_hex(6)}"

    def SharedMemory(self, size: int) -> SharedMemory:
        """A new zero-filled SharedMemory of ``size`` bytes, freed at shutdown."""
        self.heap  # noqa: B018 - raises when not started
        return SharedMemory(self._name(), create=True, size=size, track=False)

    def ShareableList(self, sequence: Iterable[Any] | None = None) -> Any:
        """A new ShareableList holding ``sequence``, freed at shutdown."""
        from .shareable_list import ShareableList

        self.heap  # noqa: B018 - raises when not started
        return ShareableList(() if sequence is None else sequence, name=self._name())

    # -- numpy arrays on the manager's heap (sharedobj.arrays) ---------------------
    def ndarray(
        self, shape: Any, dtype: Any = float, order: Literal["C", "F"] = "C"
    ) -> SharedArray:
        """A zero-filled shared numpy array, freed at shutdown (or by ``arr.free()``)."""
        return new_array(self.heap, shape, dtype, order)

    def zeros(self, shape: Any, dtype: Any = float, order: Literal["C", "F"] = "C") -> SharedArray:
        return new_array(self.heap, shape, dtype, order)

    def empty(self, shape: Any, dtype: Any = float, order: Literal["C", "F"] = "C") -> SharedArray:
        """Uninitialised, like numpy.empty."""
        return new_array(self.heap, shape, dtype, order, zero=False)

    def full(
        self, shape: Any, fill_value: Any, dtype: Any = None, order: Literal["C", "F"] = "C"
    ) -> SharedArray:
        dt = np.asarray(fill_value).dtype if dtype is None else np.dtype(dtype)
        out = new_array(self.heap, shape, dt, order, zero=False)
        out.fill(fill_value)
        return out

    def asarray(self, array: Any, dtype: Any = None, *, writeable: bool = True) -> SharedArray:
        """One copy of ``array`` into the manager's heap (none if it is already there)."""
        return heap_asarray(self.heap, array, dtype, writeable=writeable)

    # -- containers: what multiprocessing.Manager() offers (sharedobj.containers) ---
    def dict(self, mapping: Any = (), /, **kwargs: Any) -> Any:
        """A shared dict (``collections.abc.MutableMapping``) on the manager's heap."""
        from .containers.shared_dict import SharedDict

        return SharedDict.create(self.heap, mapping, **kwargs)

    def list(self, iterable: Iterable[Any] = ()) -> Any:
        """A shared list (``collections.abc.MutableSequence``) on the manager's heap."""
        from .containers.shared_list import SharedList

        return SharedList.create(self.heap, iterable)

    def Namespace(self, **kwargs: Any) -> Any:
        """Shared attributes (``ns.x = 1``), as ``Manager().Namespace()``."""
        from .containers.namespace import Namespace

        return Namespace.create(self.heap, **kwargs)

    def Queue(self, maxsize: int = 0) -> Any:
        from .containers.queues import Queue

        return Queue.create(self.heap, maxsize)

    def JoinableQueue(self, maxsize: int = 0) -> Any:
        from .containers.queues import JoinableQueue

        return JoinableQueue.create(self.heap, maxsize)

    def SimpleQueue(self) -> Any:
        from .containers.queues import SimpleQueue

        return SimpleQueue.create(self.heap)

    def Value(self, typecode: Any, value: Any, lock: bool = True) -> Any:
        from .containers.sync_objects import Value

        return Value.create(self.heap, typecode, value, lock=lock)

    def Array(self, typecode: Any, sequence: Any, lock: bool = True) -> Any:
        from .containers.sync_objects import Array

        return Array.create(self.heap, typecode, sequence, lock=lock)

    def Lock(self) -> Any:
        from .containers.sync_objects import Lock

        return Lock.create(self.heap)

    def RLock(self) -> Any:
        from .containers.sync_objects import RLock

        return RLock.create(self.heap)

    def Semaphore(self, value: int = 1) -> Any:
        from .containers.sync_objects import Semaphore

        return Semaphore.create(self.heap, value)

    def BoundedSemaphore(self, value: int = 1) -> Any:
        from .containers.sync_objects import BoundedSemaphore

        return BoundedSemaphore.create(self.heap, value)

    def Event(self) -> Any:
        from .containers.sync_objects import Event

        return Event.create(self.heap)

    def Condition(self, lock: Any = None) -> Any:
        from .containers.sync_objects import Condition

        return Condition.create(self.heap, lock)

    def Barrier(self, parties: int, action: Any = None, timeout: float | None = None) -> Any:
        from .containers.sync_objects import Barrier

        return Barrier.create(self.heap, parties, action, timeout)

    # -- pickling: children attach the same heap ---------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        return (_attached_manager, (self.heap.id,))

    def __repr__(self) -> str:
        state = (
            "started" if self._heap is not None else ("shut down" if self._shut else "not started")
        )
        heap = f" heap={self._heap.id}" if self._heap is not None else ""
        return f"<sharedobj.SharedMemoryManager {state}{heap}>"


def _attached_manager(heap_id: int) -> SharedMemoryManager:
    manager = SharedMemoryManager()
    manager._heap = Heap.attach(heap_id)
    return manager


def Manager() -> SharedMemoryManager:
    """A started manager, as ``multiprocessing.Manager()`` returns one.

    Code written for ``multiprocessing.Manager()`` (``with Manager() as m:``,
    ``m.dict()``, ``m.Queue()``, ``m.Lock()`` ...) runs unchanged with
    ``from sharedobj import Manager``; everything it makes lives in the
    manager's heap, and there is no server process.
    """
    manager = SharedMemoryManager()
    manager.start()
    return manager
