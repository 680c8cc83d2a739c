"""sharedobj: share numpy arrays, dicts, lists and queues through System V shared memory."""

from __future__ import annotations

from .errors import (
    CorruptHeapError,
    IPCLimitError,
    OwnerDiedError,
    SharedObjError,
    StaleHandleError,
    UnsupportedPlatformError,
)

__version__ = "0.1.0"

__all__ = [
    "CorruptHeapError",
    "IPCLimitError",
    "OwnerDiedError",
    "SharedObjError",
    "StaleHandleError",
    "UnsupportedPlatformError",
    "__version__",
]
