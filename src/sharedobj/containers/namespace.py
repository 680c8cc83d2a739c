"""``smm.Namespace()``: attribute access over a shared dict, as ``Manager().Namespace()``.

The stdlib's namespace proxy forwards every attribute whose name does not
start with ``_`` to the server and keeps the others on the proxy object; here
the public attributes live in a :class:`~sharedobj.containers.shared_dict.SharedDict`
(so they get its crash safety and its per-process read cache) and the private
ones stay on this object, in this process, exactly as with the proxy.
"""

from __future__ import annotations

from typing import Any

from ..heap import Heap
from .shared_dict import SharedDict

__all__ = ["Namespace"]


class Namespace:
    """Shared attributes: ``ns.x = 1`` in one process, ``ns.x`` in any other."""

    _d: SharedDict

    def __init__(self, shared: SharedDict) -> None:
        if not isinstance(shared, SharedDict):
            raise TypeError(
                "make a Namespace with SharedMemoryManager().Namespace() or Namespace.create(heap)"
            )
        object.__setattr__(self, "_d", shared)

    @classmethod
    def create(cls, heap: Heap, /, **kwargs: Any) -> Namespace:
        return cls(SharedDict.create(heap, kwargs))

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup failed: private names are local only
        if name.startswith("_"):
            raise AttributeError(f"'Namespace' object has no attribute {name!r}")
        try:
            return self._d[name]
        except KeyError:
            raise AttributeError(f"'Namespace' object has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self._d[name] = value

    def __delattr__(self, name: str) -> None:
        if name.startswith("_"):
            object.__delattr__(self, name)
            return
        try:
            del self._d[name]
        except KeyError:
            raise AttributeError(name) from None

    def __reduce__(self) -> tuple[Any, ...]:
        return (Namespace, (self._d,))

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in sorted(self._d.items()))
        return f"Namespace({items})"
