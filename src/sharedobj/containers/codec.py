"""What SharedDict and SharedList share: the value codec, 64-byte entries, and the header.

**Codec.**  A value (or key) becomes bytes behind a one-byte tag.  ``int``,
``float``, ``str``, ``bytes``, ``bool``, ``None`` and tuples of them have
fast encodings of their own; numpy arrays become a shared array in the heap
(the bytes hold its block handle); everything else is pickled, and what plain
pickle refuses (lambdas, closures) goes through cloudpickle.

**Stable hash.**  ``hash(str)`` differs between processes, so a key is hashed
by :func:`encode_key`: numbers use Python's own ``hash()`` (deterministic for
int and float, and equal for ``1 == 1.0 == True``, so such keys find each other
exactly as in a dict); str/bytes/pickled keys use ``zlib.crc32`` of their
encoding; a tuple combines its elements' stable hashes the way CPython does.
Two keys match when their encodings are equal, or, for numbers and tuples with
equal hashes, when the decoded stored key ``==`` the probe (``1`` finds
``1.0``).  NaN keys are matched by their bits (a dict matches them by
identity, which means nothing across processes).  Keys of other types must
pickle deterministically: they match by their pickle bytes.

**Entries.**  Both containers keep 64-byte entries: hash (u64), meta (u64),
and 48 data bytes.  When key + value bytes fit in 48 they are stored inline
(no allocation per set); otherwise the data holds the handle of one block with
key bytes then value bytes ("out of line").  A block an entry owns (the
out-of-line block, a numpy value's array block) is a *ref*, freed when the
entry is overwritten or deleted.

**Header and crash repair.**  Every write happens under the header's robust
mutex.  Crash repair does not replay a log of everything: it relies on three
rules, so the next lock holder (``_recover``) can always finish the job:

* appends write entries *beyond* the table's commit count first and publish
  them with one word store of the count; entries beyond the count with
  nonzero meta are garbage, freed and zeroed by the repair;
* an in-place change of a live entry saves the old and new entry in the
  header's undo area first; the repair puts the old one back;
* structural changes (resize, insert, sort, slice assignment, clear) build a
  new table aside, registered in the header's inactive table slot, and switch
  with one store of the table sequence word; the repair frees whatever the
  inactive table owns that the active one does not.

Derived data (the dict's index and live count) is rebuilt by the repair.  A
kill between unpublishing a block and freeing it leaks that block: never a
double free.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from .. import trust
from ..arrays import SharedArray, _rebuild, heap_asarray
from ..errors import StaleHandleError
from ..heap import Block, Heap, _open_handle
from ..sync import RobustMutex

__all__ = [
    "ENTRY",
    "SharedContainer",
    "decode",
    "encode_key",
    "encode_value",
]

M64 = (1 << 64) - 1
ENTRY = 64  # bytes per entry
INLINE = 48  # data bytes per entry
HANDLE = 23  # bytes of a block handle

# meta word: state (bits 0-1), flags, key length (bits 8-39), inline value length (40-47)
LIVE = 1
DELETED = 2
OOL = 4  # data holds a block handle: [key][value] out of line
ARR = 8  # the value owns a numpy array block
SMALLKEY = 16  # an int key with hash(k) == k: equal hashes mean equal keys
UNDO_NEW = 1 << 63  # undo word flag: the new entry is saved too (it owns blocks)
SMALL_LIMIT = (1 << 61) - 1  # ints in (-LIMIT, LIMIT) other than -1 hash to themselves

_QQ = struct.Struct("<QQ")
_Q = struct.Struct("<Q")
_q = struct.Struct("<q")
_d = struct.Struct("<d")
_I = struct.Struct("<I")

# -- tags -------------------------------------------------------------------
T_NONE = ord("N")
T_TRUE = ord("T")
T_FALSE = ord("F")
T_INT = ord("i")
T_BIGINT = ord("I")
T_FLOAT = ord("f")
T_STR = ord("s")
T_BYTES = ord("b")
T_TUPLE = ord("t")
T_PICKLE = ord("p")
T_CLOUD = ord("c")
T_ARRAY = ord("a")

_NUMERIC_TAGS = frozenset((T_TRUE, T_FALSE, T_INT, T_BIGINT, T_FLOAT, T_TUPLE))
#: Values of these types are immutable: a per-process cache may hand out the same object.
IMMUTABLE = frozenset((int, float, str, bytes, bool, type(None)))
#: Key types whose Python equality our matching reproduces (the per-process cache is keyed by them).
CACHEABLE_KEYS = frozenset((int, float, str, bytes, bool, type(None), tuple))

_NONE_HASH = 0x4E6F6E65  # hash(None) is id-based before 3.12
_NAN_HASH = 0x7FF8_0000_0000_0001


class _Unfast(Exception):
    """A tuple element without a fast encoding: the whole key is pickled."""


def _fast(obj: Any) -> bytes:
    """The fast encoding of obj, or _Unfast."""
    t = obj.__class__
    if t is str:
        return b"s" + str.encode(obj, "utf-8", "surrogatepass")
    if t is int:
        if -(1 << 63) <= obj < (1 << 63):
            return b"i" + _q.pack(obj)
        return b"I" + int.to_bytes(obj, (obj.bit_length() + 8) // 8, "little", signed=True)
    if t is float:
        return b"f" + _d.pack(obj)
    if t is bytes:
        return b"b" + bytes(obj)
    if t is bool:
        return b"T" if obj else b"F"
    if obj is None:
        return b"N"
    if t is tuple:
        parts = [b"t"]
        for x in obj:
            e = _fast(x)
            parts.append(_I.pack(len(e)))
            parts.append(e)
        return b"".join(parts)
    raise _Unfast


def _fast_hash(obj: Any, enc: bytes) -> int:
    t = obj.__class__
    if t is int or t is bool:
        return hash(obj) & M64
    if t is float:
        return _NAN_HASH if obj != obj else hash(obj) & M64
    if obj is None:
        return _NONE_HASH
    if t is tuple:
        # CPython's xxHash-based tuple hash over the elements' stable hashes
        acc = 0x27D4EB2F165667C5
        pos = 1
        for x in obj:
            n = _I.unpack_from(enc, pos)[0]
            lane = _fast_hash(x, enc[pos + 4 : pos + 4 + n])
            pos += 4 + n
            acc = (acc + lane * 0xC2B2AE3D27D4EB4F) & M64
            acc = ((acc << 31) | (acc >> 33)) & M64
            acc = (acc * 0x9E3779B185EBCA87) & M64
        return (acc + (len(obj) ^ 0x27D4EB2F165667C5 ^ 3527539)) & M64
    return zlib.crc32(enc) | (len(enc) << 32)


def encode_key(key: Any) -> tuple[bytes, int]:
    """(encoding, stable 64-bit hash) of a dict key; TypeError if it is unhashable."""
    t = key.__class__
    if t is str:
        enc = b"s" + key.encode("utf-8", "surrogatepass")
        return enc, zlib.crc32(enc) | (len(enc) << 32)
    try:
        enc = _fast(key)
    except _Unfast:
        hash(key)  # unhashable keys are refused, as by dict
        enc = _dumps(key)
        return enc, zlib.crc32(enc) | (len(enc) << 32)
    return enc, _fast_hash(key, enc)


def keys_match(stored: bytes | memoryview, probe: bytes, key: Any) -> bool:
    """Equal-hash keys with different encodings: equal as Python sees it (1 == 1.0)?"""
    if not stored or stored[0] not in _NUMERIC_TAGS or probe[0] not in _NUMERIC_TAGS:
        return False
    try:
        return bool(decode(bytes(stored)) == key)
    except Exception:
        return False


def _dumps(value: Any) -> bytes:
    try:
        return b"p" + pickle.dumps(value, protocol=5)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        import cloudpickle

        try:
            data: bytes = cloudpickle.dumps(value, protocol=5)
            return b"c" + data
        except Exception as exc2:
            raise TypeError(
                f"cannot store {type(value).__name__} object: pickle refused it ({exc}) "
                f"and cloudpickle too ({exc2})"
            ) from exc2


def encode_value(value: Any, heap: Heap) -> bytes:
    """The bytes of a value.  A numpy array is copied into a new block of ``heap`` (a ref)."""
    t = value.__class__
    if t is str:
        return b"s" + str.encode(value, "utf-8", "surrogatepass")
    if t is int and -(1 << 63) <= value < (1 << 63):
        return b"i" + _q.pack(value)
    if (t is np.ndarray or t is SharedArray) and not value.dtype.hasobject:
        src = np.ascontiguousarray(value)
        arr = heap_asarray(heap, src.view(np.ndarray))
        assert arr.block is not None
        meta = pickle.dumps((arr.dtype, arr.shape), protocol=5)
        return b"a" + arr.block.handle.data + meta
    try:
        return _fast(value)
    except _Unfast:
        return _dumps(value)


def free_array_value(vb: bytes) -> None:
    """Free the array block of an encoded array value (made and never stored)."""
    if vb[:1] == b"a":
        _free_handles([vb[1 : 1 + HANDLE]])


class Pickled:
    """A cached encoding of a mutable value: every read unpickles a fresh copy."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def load(self) -> Any:
        return trust.loads(memoryview(self.data)[1:])


def decode(b: bytes) -> Any:
    """The value of an encoding (arrays excepted: see :func:`decode_array`)."""
    tag = b[0]
    if tag == T_STR:
        return b[1:].decode("utf-8", "surrogatepass")
    if tag == T_INT:
        return _q.unpack_from(b, 1)[0]
    if tag == T_FLOAT:
        return _d.unpack_from(b, 1)[0]
    if tag == T_BYTES:
        return b[1:]
    if tag == T_NONE:
        return None
    if tag == T_TRUE:
        return True
    if tag == T_FALSE:
        return False
    if tag == T_BIGINT:
        return int.from_bytes(b[1:], "little", signed=True)
    if tag == T_TUPLE:
        out = []
        pos = 1
        while pos < len(b):
            n = _I.unpack_from(b, pos)[0]
            out.append(decode(b[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        return tuple(out)
    if tag in (T_PICKLE, T_CLOUD):
        return trust.loads(memoryview(b)[1:])
    if tag == T_ARRAY:
        return decode_array(b)
    raise ValueError(f"corrupt entry: unknown tag {tag!r}")


def decode_array(b: bytes) -> SharedArray:
    """A read-only zero-copy view of a stored array (see the module docs for its lifetime)."""
    dtype, shape = trust.loads(memoryview(b)[1 + HANDLE :])
    strides: list[int] = []
    step = dtype.itemsize
    for n in reversed(shape):
        strides.insert(0, step)
        step *= max(n, 1)
    return _rebuild(b[1 : 1 + HANDLE], 0, shape, tuple(strides), dtype, False)


def cache_form(vb: bytes) -> Any:
    """What the per-process cache keeps for an encoding: the value if immutable, else Pickled."""
    tag = vb[0]
    if tag in (T_PICKLE, T_CLOUD):
        return Pickled(vb)
    if tag == T_TUPLE:
        v = decode(vb)
        return v  # tuples of immutables are immutable
    if tag == T_ARRAY:
        return decode_array(vb)  # a read-only view: safe to hand out again
    return decode(vb)


def materialise(v: Any) -> Any:
    return v.load() if v.__class__ is Pickled else v


# -- entries ------------------------------------------------------------------


def make_entry(h: int, kb: bytes, vb: bytes, heap: Heap, flags: int = 0) -> bytes:
    """A 64-byte entry for key bytes ``kb`` and value bytes ``vb`` (allocating if large)."""
    n = len(kb) + len(vb)
    flags |= LIVE | (ARR if vb[0] == T_ARRAY else 0)
    if n <= INLINE:
        meta = flags | (len(kb) << 8) | (len(vb) << 40)
        return (_QQ.pack(h, meta) + kb + vb).ljust(ENTRY, b"\0")
    block = heap.alloc(n)
    buf = block.buf
    buf[: len(kb)] = kb
    buf[len(kb) :] = vb
    meta = flags | OOL | (len(kb) << 8)
    return (_QQ.pack(h, meta) + block.handle.data).ljust(ENTRY, b"\0")


def entry_kv(buf: memoryview, off: int) -> tuple[bytes, bytes]:
    """(key bytes, value bytes) of the entry at ``off``, copied out of shared memory."""
    meta = _Q.unpack_from(buf, off + 8)[0]
    klen = (meta >> 8) & 0xFFFF_FFFF
    if meta & OOL:
        block = _open_handle(bytes(buf[off + 16 : off + 16 + HANDLE]))
        data = bytes(block.buf)
        return data[:klen], data[klen:]
    vlen = (meta >> 40) & 0xFF
    data = bytes(buf[off + 16 : off + 16 + klen + vlen])
    return data[:klen], data[klen:]


def entry_refs(entry: bytes | memoryview) -> list[bytes]:
    """Handles of the blocks an entry owns (out-of-line data, numpy array)."""
    meta = _Q.unpack_from(entry, 8)[0]
    if not meta & (OOL | ARR):
        return []
    refs: list[bytes] = []
    klen = (meta >> 8) & 0xFFFF_FFFF
    if meta & OOL:
        handle = bytes(entry[16 : 16 + HANDLE])
        refs.append(handle)
        if meta & ARR:
            try:
                block = _open_handle(handle)
                head = bytes(block.buf[klen : klen + 1 + HANDLE])
            except (StaleHandleError, ValueError, FileNotFoundError):
                return refs
            if head[:1] == b"a":
                refs.append(head[1:])
    elif meta & ARR:
        head = bytes(entry[16 + klen : 16 + klen + 1 + HANDLE])
        if head[:1] == b"a":
            refs.append(head[1:])
    return refs


def _free_handles(handles: list[bytes]) -> None:
    for handle in handles:
        # already freed (a repair after a kill), or its heap is gone
        with contextlib.suppress(StaleHandleError, ValueError, FileNotFoundError):
            _open_handle(handle).free()


def free_refs(entry: bytes | memoryview) -> None:
    _free_handles(entry_refs(entry))


# -- the shared header ------------------------------------------------------------

H_MUTEX = 0
H_VERSION = 64  # bumped by every change: validates the per-process caches
H_TSEQ = 72  # table sequence: the active table slot is TSEQ & 1
H_PENDING = 80  # 1 while the inactive slot holds a table (being built, or retired)
H_KIND = 88
H_SLOT = (96, 120)  # two table handles, 24 bytes each
H_UNDO = 144  # 0, or index + 1 of the entry whose old and new bytes are saved below
H_SAVED = 152  # old entry (64) + new entry (64)
HEADER_SIZE = 320
W_VERSION = H_VERSION // 8
W_TSEQ = H_TSEQ // 8
W_PENDING = H_PENDING // 8
W_UNDO = H_UNDO // 8

#: Called before every shared-memory write step of every mutating operation (crash tests).
fault_hook: Callable[[], None] | None = None


def step() -> None:
    hook = fault_hook
    if hook is not None:
        hook()


_registry: dict[tuple[type, bytes], weakref.ref[SharedContainer]] = {}
_registry_lock = threading.Lock()


#: Entries the per-process read cache of a dict or list holds before it starts afresh.
CACHE_MAX = 1 << 20


class SharedContainer:
    """The header, the lock, the table switch and the repair common to dict and list.

    Subclasses define the table layout: ``_COMMIT_WORD`` (the table header
    word counting published entries), ``_entries_offset()``, ``_capacity()``,
    and ``_repair_table()`` for derived data.
    """

    KIND: ClassVar[int] = 0
    __slots__ = (
        "__weakref__",
        "_block",
        "_cache",
        "_depth",
        "_flag",
        "_hb",
        "_heap",
        "_holder",
        "_hw",
        "_mutex",
        "_ptr",
        "_seen",
        "_tb",
        "_tblock",
        "_tl",
        "_tseq",
        "_tw",
        "_ul",
    )

    def _remember(self, key: Any, form: Any, version: int) -> None:
        """Cache what a locked read found at ``version`` (a newer version empties the cache)."""
        cache = self._cache
        if self._seen != version:
            cache.clear()
            self._seen = version
        if len(cache) >= CACHE_MAX:
            cache.clear()
        cache[key] = form

    _heap: Heap
    _block: Block
    _hb: memoryview
    _hw: memoryview
    _tb: memoryview
    _tw: memoryview
    _tblock: Block
    _tseq: int
    _mutex: RobustMutex
    _cache: dict[Any, Any]
    _seen: int
    _depth: int
    _holder: int
    _tl: Any
    _ul: Any
    _ptr: Any
    _flag: memoryview

    # -- creation and attachment ---------------------------------------------------
    @classmethod
    def _new(cls, heap: Heap, table_bytes: int) -> Any:
        block = heap.alloc_zeroed(HEADER_SIZE)
        try:
            buf = block.buf
            table = heap.alloc_zeroed(table_bytes)
            buf[H_SLOT[0] : H_SLOT[0] + HANDLE] = table.handle.data
            _Q.pack_into(buf, H_KIND, cls.KIND)
            RobustMutex.initialize(buf, H_MUTEX)
        except BaseException:
            block.free()
            raise
        self = cls._setup(block)
        self._init_table(table)
        return self

    @classmethod
    def _setup(cls, block: Block) -> Any:
        self = object.__new__(cls)
        buf = block.buf
        kind = _Q.unpack_from(buf, H_KIND)[0]
        if kind != cls.KIND:
            raise ValueError(f"block {block!r} does not hold a {cls.__name__} (kind {kind})")
        self._block = block
        self._heap = block.heap
        self._hb = buf
        self._hw = buf.cast("Q")
        mutex = self._mutex = RobustMutex(buf, H_MUTEX, on_owner_dead=self._owner_died)
        # the uncontended path of RobustMutex.acquire/release, inlined by the hot paths
        self._tl, self._ul, self._ptr, self._flag = mutex.inline_parts()
        self._cache = {}
        self._seen = -1
        self._depth = 0
        self._holder = 0
        self._tseq = -1
        self._open_table()
        with _registry_lock:
            _registry[(cls, block.handle.data)] = weakref.ref(self)
        return self

    @classmethod
    def _attach(cls, data: bytes) -> Any:
        with _registry_lock:
            ref = _registry.get((cls, data))
        obj = ref() if ref is not None else None
        if obj is not None:
            return obj
        return cls._setup(_open_handle(data))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self)._attach, (self._block.handle.data,))

    def _init_table(self, table: Block) -> None:
        """Fill the table header of a fresh table block (subclasses)."""

    def _open_table(self) -> None:
        """Map the active table in this process (after another process switched it)."""
        hw = self._hw
        tseq = hw[W_TSEQ]
        at = H_SLOT[tseq & 1]
        block = _open_handle(bytes(self._hb[at : at + HANDLE]))
        buf = block.buf
        self._tblock = block
        self._tb = buf
        self._tw = buf.cast("Q")
        self._tseq = tseq
        self._table_changed()

    def _table_changed(self) -> None:
        """Recompute per-process table geometry (subclasses)."""

    # -- locking -----------------------------------------------------------------
    def _acquire(self) -> bool:
        """Take the lock unless this thread holds it through locked(); True if taken."""
        if self._depth and self._holder == threading.get_ident():
            return False
        rc = self._tl(self._ptr)
        if rc or self._flag[0]:
            self._mutex._acquire_slow(rc, True, None)
        if self._hw[W_TSEQ] != self._tseq:
            self._open_table()
        return True

    def _release(self) -> None:
        if self._ul(self._ptr):
            self._mutex.release()  # raises the right error

    def _owner_died(self, _mutex: RobustMutex) -> None:
        self._recover()

    @contextmanager
    def locked(self) -> Iterator[Any]:
        """Hold the object's lock: the operations inside the block are one atomic step.

        Other processes (and threads) wait; this thread's own operations go through.
        """
        me = threading.get_ident()
        if self._depth and self._holder == me:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._mutex.acquire()
        try:
            if self._hw[W_TSEQ] != self._tseq:
                self._open_table()
            self._holder = me
            self._depth = 1
            try:
                yield self
            finally:
                self._depth = 0
                self._holder = 0
        finally:
            self._mutex.release()

    def _bump(self) -> None:
        step()
        self._hw[W_VERSION] += 1

    # -- table switching ------------------------------------------------------------
    def _begin_table(self, nbytes: int) -> Block:
        """A zeroed table block registered in the inactive slot (so a repair can free it)."""
        block = self._heap.alloc_zeroed(nbytes)
        at = H_SLOT[(self._hw[W_TSEQ] + 1) & 1]
        step()
        self._hb[at : at + HANDLE] = block.handle.data
        step()
        self._hw[W_PENDING] = 1
        return block

    def _switch_table(self) -> None:
        """Publish the inactive table (one word store), then retire the old one."""
        step()
        self._hw[W_TSEQ] += 1
        self._open_table()
        self._retire_inactive()

    def _retire_inactive(self) -> None:
        """Free the inactive table and whatever it owns that the active table does not."""
        hw = self._hw
        if not hw[W_PENDING]:
            return
        at = H_SLOT[(hw[W_TSEQ] + 1) & 1]
        handle = bytes(self._hb[at : at + HANDLE])
        try:
            old = _open_handle(handle)
            obuf = old.buf
        except (StaleHandleError, ValueError, FileNotFoundError):
            step()
            hw[W_PENDING] = 0
            return
        keep = set(self._all_refs(self._tb, self._tw))
        doomed = [r for r in self._all_refs(obuf, obuf.cast("Q")) if r not in keep]
        step()
        hw[W_PENDING] = 0  # unpublished: from here a kill leaks, never double-frees
        _free_handles(doomed)
        _free_handles([handle])

    def _all_refs(self, buf: memoryview, words: memoryview) -> list[bytes]:
        """Refs of every entry with nonzero meta in a table, published or not."""
        base, cap = self._geometry(words)
        metas = np.frombuffer(buf, dtype=np.uint64, count=cap * 8, offset=base).reshape(cap, 8)
        rows = np.flatnonzero(metas[:, 1] & np.uint64(OOL | ARR))
        refs: list[bytes] = []
        for i in rows.tolist():
            off = base + i * ENTRY
            refs.extend(entry_refs(buf[off : off + ENTRY]))
        return refs

    def _geometry(self, words: memoryview) -> tuple[int, int]:
        """(byte offset of the entries, entry capacity) of a table (subclasses)."""
        raise NotImplementedError

    # -- in-place change of a live entry ----------------------------------------------
    def _overwrite(self, i: int, off: int, new: bytes) -> None:
        """Replace the live entry ``i`` at ``off`` by ``new`` with an undo record."""
        tb = self._tb
        old = bytes(tb[off : off + ENTRY])
        hb = self._hb
        step()
        hb[H_SAVED : H_SAVED + 2 * ENTRY] = old + new
        step()
        self._hw[W_UNDO] = (i + 1) | UNDO_NEW
        step()
        tb[off : off + ENTRY] = new
        step()
        self._hw[W_UNDO] = 0  # committed
        if _Q.unpack_from(old, 8)[0] & (OOL | ARR):
            kept = set(entry_refs(new))
            _free_handles([r for r in entry_refs(old) if r not in kept])

    # -- repair ---------------------------------------------------------------------
    def _recover(self) -> None:
        """Bring the object back to a consistent state; the lock is held.

        Runs when a holder died (on_owner_dead) and when an operation was
        interrupted by an exception half-way (Ctrl-C at any step).
        """
        hw = self._hw
        self._open_table()
        undo = hw[W_UNDO]
        if undo:
            i = (undo & ~UNDO_NEW) - 1
            base, cap = self._geometry(self._tw)
            if i < cap:
                saved = bytes(self._hb[H_SAVED : H_SAVED + 2 * ENTRY])
                old, new = saved[:ENTRY], saved[ENTRY:]
                off = base + i * ENTRY
                self._tb[off : off + ENTRY] = old
                if undo & UNDO_NEW:
                    kept = set(entry_refs(old))
                    _free_handles([r for r in entry_refs(new) if r not in kept])
            hw[W_UNDO] = 0
        if hw[W_PENDING]:
            self._retire_inactive()
        self._drop_unpublished()
        self._repair_table()
        hw[W_TSEQ] += 2  # same slot; makes every process re-read the table geometry
        self._open_table()
        hw[W_VERSION] = (hw[W_VERSION] + 1) & M64

    def _drop_unpublished(self) -> None:
        """Entries beyond the commit count with nonzero meta: free what they own, zero them."""
        tb, tw = self._tb, self._tw
        base, cap = self._geometry(tw)
        used = int(tw[0])
        if used > cap:
            raise RuntimeError(f"corrupt {type(self).__name__}: count {used} > capacity {cap}")
        metas = np.frombuffer(tb, dtype=np.uint64, count=cap * 8, offset=base).reshape(cap, 8)
        for i in (np.flatnonzero(metas[used:, 1]) + used).tolist():
            off = base + i * ENTRY
            entry = bytes(tb[off : off + ENTRY])
            tb[off : off + ENTRY] = bytes(ENTRY)
            free_refs(entry)

    def _repair_table(self) -> None:
        """Rebuild derived data from the published entries (subclasses)."""

    def _check_common(self) -> list[str]:
        problems = []
        hw = self._hw
        if hw[W_UNDO]:
            problems.append(f"undo record left set ({hw[W_UNDO]})")
        if hw[W_PENDING]:
            problems.append("an inactive table is still registered")
        if self._mutex.recovery_pending:
            problems.append("lock recovery pending")
        tw = self._tw
        base, cap = self._geometry(tw)
        used = int(tw[0])
        if used > cap:
            problems.append(f"count {used} > capacity {cap}")
            return problems
        metas = np.frombuffer(self._tb, dtype=np.uint64, count=cap * 8, offset=base).reshape(cap, 8)
        if np.any(metas[used:, 1]):
            problems.append("unpublished entries beyond the count")
        return problems


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for ref in list(_registry.values()):
        obj = ref()
        if obj is not None:
            obj._cache = {}
            obj._seen = -1
            obj._depth = 0
            obj._holder = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
