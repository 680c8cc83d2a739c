"""A fixed-length list of small scalars in one shared memory block.

The counterpart of :class:`multiprocessing.shared_memory.ShareableList`, with
the same semantics, minus its bugs:

* ``str`` and ``bytes`` items keep their trailing NUL bytes.  The stdlib keeps
  only a NUL-padded slot and strips every trailing NUL when reading, so
  ``b"ab\\x00"`` comes back as ``b"ab"``.  Here every item records its exact
  length.
* A ``str`` slot is sized by its UTF-8 length, not by its number of
  characters, so non-ASCII text is never truncated (the stdlib cuts it and
  then fails to decode it).
* Every check happens before the first byte is written, so a failed
  construction leaves no block behind and a failed assignment leaves the item
  as it was (the stdlib leaks the block when an int is out of range, and an
  out-of-range int turns the item it was assigned to into garbage).
* Indexes below ``-len`` raise :class:`IndexError` (the stdlib reads and
  writes its own metadata for them).
* There is no per-item size limit beyond the slot's capacity (the stdlib
  ``assert`` s that a slot's ``struct`` format fits in 8 characters, so an
  item of 10 MB fails, and under ``python -O`` becomes unreadable).

Layout of the block (native byte order, every field 8-byte aligned)::

    0                 magic b"SOSL", layout version (u32)
    8                 n, the number of items (u64)
    16                n + 1 slot offsets from the start of the block (u64):
                      slot i is [off[i], off[i + 1]), a multiple of 8 bytes
    24 + 8n           n state words (u64): kind << 56 | length in bytes
    24 + 16n          the slots

The block describes itself, so ``ShareableList(name=...)`` in any process
rebuilds the list from it alone.  The magic is written last: a process that
attaches while the list is still being built is told it is not (yet) a
ShareableList instead of reading half-written items.  An item's kind and
length share one word so that they change together.  Slots are fixed when the
list is made (8 bytes for a number or None; for ``str`` and ``bytes`` the
first multiple of 8 above the encoded length, as in the stdlib, so even an
empty string leaves room for 7 bytes); any supported value that fits may be assigned to
any slot later.  Numbers are stored as the stdlib stores them (``q``, ``d``,
a bool in the last byte of its slot), so :attr:`ShareableList.format` is
both the stdlib's format string and a true ``struct`` description of the
slots.

Like the stdlib's, the list has no lock: concurrent writers to one item need
their own.
"""

from __future__ import annotations

import importlib
import itertools
import operator
import struct
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeAlias

__all__ = ["ShareableList"]

Item: TypeAlias = "int | float | bool | str | bytes | None"

_MAGIC = b"SOSL"
_VERSION = 1
_HEADER = struct.Struct("=4sIQ")
_U64 = struct.Struct("=Q")
_I64 = struct.Struct("=q")
_F64 = struct.Struct("=d")
_SLOT = 8
_KIND_SHIFT = 56
_LENGTH_MASK = (1 << _KIND_SHIFT) - 1
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 63) - 1

# Kind codes; 0 is never written, so a zeroed state word is recognisably bad.
_INT, _FLOAT, _BOOL, _NONE, _STR, _BYTES = 1, 2, 3, 4, 5, 6
_NUMBER_FORMATS = {_INT: "q", _FLOAT: "d", _BOOL: "xxxxxxx?", _NONE: "xxxxxx?x"}
_ZERO_SLOT = bytes(_SLOT)


class _SharedMemoryLike(Protocol):
    @property
    def buf(self) -> memoryview | None: ...

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    def close(self) -> None: ...

    def unlink(self) -> None: ...


def _shared_memory_class() -> Callable[..., _SharedMemoryLike]:
    """``sharedobj.shared_memory.SharedMemory``, or the stdlib's until it exists.

    Temporary: remove this function (import the class directly) once
    ``sharedobj.shared_memory`` is in place.  Only a missing module falls
    back; a module that exists but fails to import raises, so a bug there is
    not hidden behind the stdlib.
    """
    try:
        module = importlib.import_module("sharedobj.shared_memory")
    except ModuleNotFoundError as exc:
        if exc.name != "sharedobj.shared_memory":
            raise
        from multiprocessing.shared_memory import SharedMemory

        return SharedMemory
    cls: Callable[..., _SharedMemoryLike] = module.SharedMemory
    return cls


def _describe_int(value: int) -> str:
    # str() of a huge int is slow and, past 4300 digits, refused.
    return str(value) if value.bit_length() <= 256 else f"an int of {value.bit_length()} bits"


def _encode(value: object, where: str) -> tuple[int, bytes]:
    """The kind and the bytes of ``value``; raises before anything is written."""
    if value is None:
        return _NONE, _ZERO_SLOT
    if isinstance(value, bool):
        return _BOOL, b"\x00" * (_SLOT - 1) + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise OverflowError(
                f"{where}: {_describe_int(value)} is out of the 64-bit signed range "
                f"[-2**63, 2**63 - 1] that ShareableList stores"
            )
        return _INT, _I64.pack(value)
    if isinstance(value, float):
        return _FLOAT, _F64.pack(value)
    if isinstance(value, str):
        return _STR, str.encode(value, "utf-8")
    if isinstance(value, bytes):
        return _BYTES, bytes(value)
    raise TypeError(
        f"{where}: ShareableList items must be int, float, bool, str, bytes or None, "
        f"not {type(value).__name__}"
    )


def _capacity(kind: int, payload: bytes) -> int:
    if kind in (_STR, _BYTES):
        return _SLOT * (len(payload) // _SLOT + 1)
    return _SLOT


class ShareableList:
    """A list of fixed length whose items live in shared memory.

    ``ShareableList(sequence)`` makes a new block (named ``name`` if given,
    :class:`FileExistsError` if that name is taken); ``ShareableList(name=n)``
    attaches to an existing list, in this process or any other.  Pickling
    sends only the name.  The creator must ``shm.unlink()`` the block; every
    process should ``shm.close()`` its attachment.
    """

    shm: _SharedMemoryLike

    def __init__(self, sequence: Iterable[Item] | None = None, *, name: str | None = None) -> None:
        shared_memory = _shared_memory_class()
        if sequence is None and name is not None:
            self.shm = shared_memory(name=name, create=False)
            try:
                self._offsets = self._read_layout()
            except BaseException:
                self.shm.close()
                raise
            return

        # One pass over the input, so a generator works, and every item is
        # checked before the block exists, so a bad item leaks nothing.
        encoded = [_encode(v, f"item {i}") for i, v in enumerate(sequence or ())]
        n = len(encoded)
        start = 24 + 16 * n
        offsets = [start]
        for kind, payload in encoded:
            offsets.append(offsets[-1] + _capacity(kind, payload))
        size = offsets[-1]

        image = bytearray(size)
        _HEADER.pack_into(image, 0, b"\x00" * 4, 0, n)
        struct.pack_into(f"={n + 1}Q", image, 16, *offsets)
        struct.pack_into(
            f"={n}Q",
            image,
            24 + 8 * n,
            *(kind << _KIND_SHIFT | len(payload) for kind, payload in encoded),
        )
        for (_kind, payload), offset in zip(encoded, offsets, strict=False):
            image[offset : offset + len(payload)] = payload

        self.shm = shared_memory(name=name, create=True, size=size)
        try:
            buf = self._buf()
            buf[:size] = image
            _HEADER.pack_into(buf, 0, _MAGIC, _VERSION, n)
        except BaseException:
            self.shm.close()
            self.shm.unlink()
            raise
        self._offsets = offsets

    def _buf(self) -> memoryview:
        buf = self.shm.buf
        if buf is None:
            raise ValueError("operation on a closed ShareableList (its shm was closed)")
        return buf

    def _read_layout(self) -> list[int]:
        buf = self._buf()
        name = self.shm.name
        if len(buf) < _HEADER.size:
            raise ValueError(f"shared memory {name!r} is too small to hold a ShareableList")
        magic, version, n = _HEADER.unpack_from(buf, 0)
        if magic != _MAGIC:
            raise ValueError(
                f"shared memory {name!r} does not hold a ShareableList "
                "(no magic number: another kind of block, or a list still being made)"
            )
        if version != _VERSION:
            raise ValueError(
                f"shared memory {name!r} holds a ShareableList of layout version {version}; "
                f"this sharedobj reads version {_VERSION}"
            )
        start = 24 + 16 * n
        if start > len(buf):
            raise ValueError(f"shared memory {name!r}: corrupt ShareableList header (n={n})")
        offsets = list(struct.unpack_from(f"={n + 1}Q", buf, 16))
        if offsets[0] != start or offsets[-1] > len(buf):
            raise ValueError(f"shared memory {name!r}: corrupt ShareableList slot table")
        for lo, hi in itertools.pairwise(offsets):
            if hi < lo + _SLOT or (hi - lo) % _SLOT:
                raise ValueError(f"shared memory {name!r}: corrupt ShareableList slot table")
        return offsets

    def _position(self, position: object, what: str) -> int:
        try:
            i = operator.index(position)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"ShareableList indices must be integers, not {type(position).__name__}"
            ) from None
        n = len(self._offsets) - 1
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{what} index {position} out of range for a list of {n} items")
        return i

    def _state(self, buf: memoryview, i: int) -> tuple[int, int]:
        n = len(self._offsets) - 1
        (word,) = _U64.unpack_from(buf, 24 + 8 * n + 8 * i)
        return word >> _KIND_SHIFT, word & _LENGTH_MASK

    def _item(self, buf: memoryview, i: int) -> Item:
        kind, length = self._state(buf, i)
        offset = self._offsets[i]
        if kind == _INT:
            value: Item = _I64.unpack_from(buf, offset)[0]
        elif kind == _FLOAT:
            value = _F64.unpack_from(buf, offset)[0]
        elif kind == _BOOL:
            value = buf[offset + _SLOT - 1] != 0
        elif kind == _NONE:
            value = None
        elif kind in (_STR, _BYTES) and length <= self._offsets[i + 1] - offset:
            raw = bytes(buf[offset : offset + length])
            value = raw.decode("utf-8") if kind == _STR else raw
        else:
            raise ValueError(
                f"ShareableList {self.shm.name!r}: item {i} has a corrupt state "
                f"(kind {kind}, length {length})"
            )
        return value

    def __getitem__(self, position: int) -> Item:
        i = self._position(position, "list")
        return self._item(self._buf(), i)

    def __setitem__(self, position: int, value: Item) -> None:
        i = self._position(position, "assignment")
        kind, payload = _encode(value, f"item {i}")
        offset, end = self._offsets[i], self._offsets[i + 1]
        if len(payload) > end - offset:
            raise ValueError(
                f"item {i}: the new value needs {len(payload)} bytes but its slot holds "
                f"{end - offset} (slots keep the size they were made with)"
            )
        buf = self._buf()
        buf[offset : offset + len(payload)] = payload
        buf[offset + len(payload) : end] = bytes(end - offset - len(payload))
        n = len(self._offsets) - 1
        _U64.pack_into(buf, 24 + 8 * n + 8 * i, kind << _KIND_SHIFT | len(payload))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __iter__(self) -> Iterator[Item]:
        buf = self._buf()
        for i in range(len(self)):
            yield self._item(buf, i)

    def __reduce__(
        self,
    ) -> tuple[
        Callable[[type[ShareableList], str], ShareableList], tuple[type[ShareableList], str]
    ]:
        return _attach, (type(self), self.shm.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r}, name={self.shm.name!r})"

    @property
    def format(self) -> str:
        """The ``struct`` format of the slots, as the stdlib spells it."""
        buf = self._buf()
        parts = []
        for i in range(len(self)):
            kind, _length = self._state(buf, i)
            if kind in (_STR, _BYTES):
                parts.append(f"{self._offsets[i + 1] - self._offsets[i]}s")
            else:
                parts.append(_NUMBER_FORMATS.get(kind, "?"))
        return "".join(parts)

    def count(self, value: object) -> int:
        """How many items equal ``value``."""
        return sum(1 for item in self if item == value)

    def index(self, value: object) -> int:
        """The position of the first item equal to ``value``; ValueError if none."""
        for i, item in enumerate(self):
            if item == value:
                return i
        raise ValueError(f"{value!r} not in this container")

    __class_getitem__: classmethod[ShareableList, [object], types.GenericAlias] = classmethod(
        types.GenericAlias
    )


def _attach(cls: type[ShareableList], name: str) -> ShareableList:
    return cls(name=name)
