"""sharedobj: share numpy arrays, dicts, lists and queues through System V shared memory."""

from __future__ import annotations

from .errors import IPCLimitError, OwnerDiedError, SharedObjError, UnsupportedPlatformError

__version__ = "0.1.0"

__all__ = [
    "IPCLimitError",
    "OwnerDiedError",
    "SharedObjError",
    "UnsupportedPlatformError",
    "__version__",
]
