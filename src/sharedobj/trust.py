"""What sharedobj will unpickle out of shared memory: the trust model in code.

Pickle runs code: whoever can *write* a heap can make every process that
unpickles a value from it (a dict value, a queue message, a list item) call
any function.  So the boundary of trust is write access to the heap's
segments, which sharedobj keeps to the user who created it:

* every segment is created with mode ``0o600`` unless asked otherwise;
* attaching a heap checks, before reading anything in it, that its root
  segment was created by and still belongs to this user (``cuid`` and ``uid``
  of the segment; the kernel sets ``cuid``, nobody can forge it), and that its
  magic and layout are ours.

Where that is not enough (a heap made with a wider ``mode`` shared between
users, or defence in depth), ``SHAREDOBJ_UNPICKLE=plain`` in the environment,
or :func:`set_unpickle_policy("plain") <set_unpickle_policy>`, makes every
unpickling done by sharedobj refuse anything but plain data: numbers, str,
bytes, bytearray, None, bool, tuples, lists, dicts, sets, numpy arrays and
scalars, and sharedobj's own handles.  Anything else raises
``pickle.UnpicklingError`` naming what was refused.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

__all__ = ["POLICIES", "get_unpickle_policy", "loads", "set_unpickle_policy"]

POLICIES = ("any", "plain")

# (module, name) pairs a plain-data pickle may reference.  Lists, dicts, tuples,
# str, bytes, numbers, None and bool need no global at all.
_PLAIN_GLOBALS = frozenset(
    {
        ("builtins", "complex"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),  # protocols 0-2 pickle bytes as codecs.encode(str, "latin1")
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
        ("sharedobj", "_h"),
        ("sharedobj.arrays", "_rebuild"),
    }
)


def _initial_policy() -> str:
    policy = os.environ.get("SHAREDOBJ_UNPICKLE", "any").strip().lower() or "any"
    if policy not in POLICIES:
        raise ValueError(f"SHAREDOBJ_UNPICKLE must be one of {POLICIES}, got {policy!r}")
    return policy


_policy = _initial_policy()


def set_unpickle_policy(policy: str) -> None:
    """``"any"`` (the default: pickle's own rules) or ``"plain"`` (plain data only)."""
    global _policy
    if policy not in POLICIES:
        raise ValueError(f"unpickle policy must be one of {POLICIES}, got {policy!r}")
    _policy = policy


def get_unpickle_policy() -> str:
    return _policy


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocols 0-2 name the builtins module this way
            module = "builtins"
        if (module, name) in _PLAIN_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name} from shared memory: the unpickle policy is "
            f"'plain' (SHAREDOBJ_UNPICKLE=plain), which allows only numbers, str, bytes, None, "
            f"bool, tuples, lists, dicts, sets and numpy arrays"
        )


def loads(data: bytes | memoryview) -> Any:
    """``pickle.loads`` under the current policy; every unpickling in sharedobj goes through here."""
    if _policy == "any":
        return pickle.loads(data)
    return _PlainUnpickler(io.BytesIO(data)).load()
