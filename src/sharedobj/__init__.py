"""sharedobj: share numpy arrays, dicts, lists and queues through System V shared memory."""

from __future__ import annotations

from .arrays import SharedArray, asarray, empty, full, ndarray, zeros
from .errors import (
    CorruptHeapError,
    IPCLimitError,
    SharedObjError,
    StaleHandleError,
    UnsupportedPlatformError,
)
from .heap import Block, BlockHandle, Heap
from .heap import _h as _h  # unpickles block handles; short so pickles stay small
from .manager import Manager, SharedMemoryManager
from .shareable_list import ShareableList
from .shared_memory import SharedMemory
from .trust import set_unpickle_policy

__version__ = "0.1.0"

__all__ = [
    "Block",
    "BlockHandle",
    "CorruptHeapError",
    "Heap",
    "IPCLimitError",
    "Manager",
    "ShareableList",
    "SharedArray",
    "SharedMemory",
    "SharedMemoryManager",
    "SharedObjError",
    "StaleHandleError",
    "UnsupportedPlatformError",
    "__version__",
    "asarray",
    "empty",
    "full",
    "ndarray",
    "set_unpickle_policy",
    "zeros",
]
