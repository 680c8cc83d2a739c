"""``Queue``, ``JoinableQueue`` and ``SimpleQueue`` in shared memory, with multiprocessing's API.

Why not a pipe and a feeder thread, as ``multiprocessing.Queue`` does: every
message would cross the kernel twice and be copied three times.  Here a message
is pickled straight into a ring buffer that every process maps, under one
robust lock round trip, and read out under another; nobody sleeps or makes a
system call unless the queue is empty (or full) and someone has to wait.
Putters and getters take two different locks (on x86, see :data:`_SPLIT`), so a
producer and a consumer never wait for each other: the ring between them is
a single-producer single-consumer ring, each side publishing its position
with one word store.

Differences from the stdlib, on purpose:

* ``put`` is **synchronous**: the message is in the queue when ``put`` returns,
  so there is no feeder thread, ``join_thread`` has nothing to wait for and a
  message that cannot be pickled raises in ``put`` (the stdlib prints the error
  in its feeder thread and drops the message).
* The queue pickles as a small handle, so it can be passed anywhere: ``Process``
  arguments under every start method, ``Pool`` arguments and results, other
  queues.  (The stdlib only allows inheritance.)
* ``put_many(items)`` / ``get_many(n)`` move a batch under one lock round trip.
  Plain items (numbers, str, bytes, None, bool and tuples of them) are pickled
  as one list per :data:`BATCH_MAX` items and stored as one *batch record*;
  ``get`` and ``get_many`` take from it message by message.  ``get_many`` takes
  whole records, or part of the first one, so it may return fewer than
  ``n`` messages while more are queued.  A batch record partly taken still
  counts in full against ``maxsize`` until its last message is taken
  (``qsize()`` counts only what is left).
* ``close()`` is per object, as in the stdlib: the closing object refuses
  ``put``/``get`` (ValueError; OSError for SimpleQueue, like its closed pipe),
  other handles on the same queue keep working.

Messages.  Pickle protocol 5 (plain data and tuples of it straight through
``pickle.dumps``), cloudpickle for what pickle refuses (lambdas, local
classes).  A pickle over :data:`INLINE_MAX` bytes goes in a heap block of its
own and only the block's handle travels through the ring.  A numpy array of
at least :data:`ARRAY_MIN` bytes travels by handle: a :class:`SharedArray`
already in shared memory is not copied at all (the receiver maps the same
memory; the sender keeps owning it), any other array is copied once into the
heap and the *receiver owns that copy*: when the received array (and every
view of it) is garbage-collected in the receiving process, its block goes
back to the queue as a *spare* for the next copy of about that size (four
slots), or is freed if there is no room.  The receiver gets a
:class:`~sharedobj.arrays.SharedArray`; passing it on by handle shares the
memory, so keep it alive while others use it.  Smaller arrays are pickled
inline, where a heap block would cost more than it saves.  Two kinds of
record skip the pickler: a SharedArray put on its own (K_SHARED: the
arguments of ``arrays._rebuild`` as a plain tuple, remembered for an array
put again and again) and a plain array put on its own (K_ARRAY: its copy's
handle and layout, see :func:`_array_record`).

Memory.  The queue is a small header block plus a ring block of a power-of-two
size that doubles when a message does not fit (``maxsize`` limits the number of
messages, as in the stdlib; bytes are never a limit).  Everything lives until
the manager shuts down (the heap is destroyed): messages never consumed, and
their arrays, go with it.

Layout of the header block (u64 words from :data:`_WORDS_AT`)::

    [0, 64)     RobustMutex "put": TAIL, the ring past it, growth, DONE, spare blocks
    [64, 128)   RobustMutex "get": HEAD and the records before TAIL (growth takes it too)
    [128, 144)  SharedCondition "all done" (JoinableQueue.join waits here; put lock)
    words:  TAIL  = put count (u32) << 32 | tail byte position (u32)
            HEAD  = get count (u32) << 32 | head byte position (u32)
            DONE  = task_done count (u32)           unfinished = put count - DONE
            GEN   = ring generation; the active ring slot is GEN & 1
            MAXSIZE, KIND, MAGIC, and three "waiters" hints (getters, putters, joiners)
            two ring slots: size (0 = empty), 24 bytes of block handle
            four spare array block slots, same format
            LOCKS = 2 if put and get take their own locks, 1 if the put lock serves both

Getters sleep on the count half of TAIL, putters on that of HEAD (futexes;
see :meth:`_Core.sleep`).  Each side reads the other's word without its lock:
a stale HEAD only shows less room (a growth takes the get lock and looks
again), a stale TAIL fewer messages.

Positions count bytes modulo 2**32 and the ring size is a power of two, so a
position means the same record in a ring and in its doubled successor: growing
copies the live bytes to the same positions and changes nothing else.  A record
is an 8-byte header (length, kind) and its payload padded to 8 bytes; a record
never wraps: a padding record fills the end of the ring instead.

Crash safety.  Every change happens under a robust mutex (the put lock for
putters, the get lock for getters, both for growth), and each operation
commits with **one aligned 8-byte store**: ``put``/``put_many`` write their
records past the tail and then store TAIL (count and position together);
``get``/``get_many`` copy their records out and then store HEAD; ``task_done``
stores DONE.  A process killed before that store changed nothing anyone reads;
killed after it, it only loses its own message(s).  Growth writes the new ring
into the free slot, copies, flips GEN (the commit), frees the old ring and
clears its slot; the next lock holder after a death frees whatever a slot not
in use still holds (the put lock's ``on_owner_dead``; a get leaves nothing
to repair).  What a crash can leak: the heap blocks of the one message being
put or taken (a big message's block, its copied-in arrays), until the heap
goes.  A waiter killed while asleep leaves a "waiters" hint one too high,
which costs a wake-up call to each put that ends an empty queue and each get
that leaves messages behind, nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import io
import operator
import os
import pickle
import queue as _queue
import struct
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterable
from ctypes import addressof, byref, c_uint32, c_void_p
from typing import Any, Literal

import numpy as np

from .. import _libc, copying, trust
from ..arrays import SharedArray, _block_for, _dtype_of, populate_for_write
from ..arrays import _rebuild as _rebuild_array
from ..errors import StaleHandleError
from ..heap import Block, Heap, _open_handle
from ..sync import WAIT_SLICE, RobustMutex, SharedCondition

__all__ = ["ARRAY_MIN", "INLINE_MAX", "JoinableQueue", "Queue", "SimpleQueue"]

Empty = _queue.Empty
Full = _queue.Full

#: A pickle longer than this goes in a heap block of its own (its handle through the ring).
INLINE_MAX = 16 << 10
#: numpy arrays with at least this many bytes travel as shared blocks, smaller ones inline.
ARRAY_MIN = 8 << 10
_FIRST_RING = 64 << 10
_SEM_VALUE_MAX = 2**31 - 1  # what the stdlib's maxsize=0 means
#: Copied-in array blocks of these sizes are kept for reuse once their receiver is done:
#: a big one's pages stay mapped (fresh pages cost a fault each, ~1 GB/s), and any
#: size skips an allocation and a free (~45 us of a 64 KiB array's ~60 us round trip).
SPARE_MIN, SPARE_MAX = ARRAY_MIN, 256 << 20
_SPIN = 300  # lock-free polls of an empty queue before sleeping (~50 us)
_LOCK_SPIN = 20  # try-locks before a blocking acquire
_SPARE_TRIES = 200  # try-locks (with a yield between) to keep a received array's block

#: Called before every shared-memory write step of every mutating operation
#: (crash tests set it to kill the process at step k).
fault_hook: Callable[[], None] | None = None

#: Putters and getters take two different locks only where the CPU keeps
#: stores in program order and a lock release is a full fence (x86's total
#: store order; glibc unlocks with a locked instruction): there a getter that
#: sees the new TAIL also sees the record stored before it, and a putter that
#: sees the new HEAD knows the getter has finished reading the bytes it reuses.
#: Elsewhere (ARM, POWER, RISC-V) one lock serves both sides and orders it all.
_SPLIT = _libc.machine() in ("x86_64", "amd64")

# -- header layout -----------------------------------------------------------
_MUTEX_AT = 0  # the put lock
_GET_MUTEX_AT = 64  # the get lock (a line of its own: putters never touch it)
_ALL_DONE_AT = 128
_WORDS_AT = 192
W_TAIL, W_HEAD, W_DONE, W_GEN, W_MAXSIZE, W_KIND, W_MAGIC = range(7)
W_GETW, W_PUTW, W_JOINW = 7, 8, 9
W_SLOTS = 10  # slot i: size word at W_SLOTS + 4*i, handle in the next 3 words
W_SPARE = W_SLOTS + 8  # spare array blocks, same slot format
N_SPARE = 4
W_LOCKS = W_SPARE + 4 * N_SPARE  # 2: put and get take their own locks; 1: one for both
_NWORDS = W_LOCKS + 1
# the u32 count half of TAIL and HEAD: getters sleep on the first, putters on the second
_COUNT_AT = 4 if sys.byteorder == "little" else 0
_HEADER_SIZE = _WORDS_AT + 8 * _NWORDS
_MAGIC = 0x5155_4555_4F53_0003  # "SOQUEUQ" + layout version 3 (two locks, K_SHARED, K_ARRAY)
_M32 = 0xFFFF_FFFF

# record kinds (the high bits make a stray word unlikely to pass _check)
K_PICKLE = 0x5100_0001
K_BIG = 0x5100_0002
K_PAD = 0x5100_0003
# a SharedArray that lives in its block: the arguments of arrays._rebuild, pickled as a tuple
K_SHARED = 0x5100_0004
# a plain array copied into a block the receiver owns: handle + layout, see _array_record
K_ARRAY = 0x5100_0005
_KINDS = (K_PICKLE, K_BIG, K_PAD, K_SHARED, K_ARRAY)
# A *batch* record (put_many of plain items) holds up to BATCH_MAX messages as
# one pickled list.  Its header word is not ``kind << 32 | length``:
#     bits 48-63  _BATCH_TAG
#     bits 32-47  c, the messages in it
#     bits 16-31  taken, how many of them getters have already taken
#     bits 0-15   the pickle's length (at most BATCH_BYTES)
# A getter that takes only part of a batch commits by storing the header with a
# larger ``taken`` (one store, like every other commit); the HEAD word moves past
# the record, and its count by c, when the last message of it is taken.
_BATCH_TAG = 0x5200
BATCH_MAX = 256
BATCH_BYTES = 16 << 10
# types a batch may hold: pickled as a list in one call, no array to hand over
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex})
_TUPLE = frozenset({tuple})
K_BATCH_ITEM = -1  # (not a record kind) what a get found: one message of a batch

KIND_QUEUE, KIND_JOINABLE, KIND_SIMPLE = 1, 2, 3


def _hook() -> None:
    hook = fault_hook
    if hook is not None:
        hook()


# -- pickling messages ---------------------------------------------------------


def _take_array(
    handle: bytes,
    offset: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: np.dtype[Any],
    queue: bytes = b"",
) -> SharedArray:
    """Unpickle an array copied in for this message (inside another object): see _own."""
    if np.dtype(dtype).hasobject:
        # numpy would read the block's bytes as object pointers: a damaged or
        # hostile message must not get that far
        raise TypeError(f"dtype {dtype} holds Python objects, which cannot live in shared memory")
    block, base = _block_for(handle)
    root = np.ndarray(shape, dtype=dtype, buffer=block.buf, offset=offset, strides=strides)
    return _own(root, block, base, handle, queue)


def _own(root: np.ndarray, block: Block, base: int, handle: bytes, queue: bytes) -> SharedArray:
    """The received array over ``root``: the receiver owns its block.

    numpy makes the first array over a buffer the root of every later view (a
    view's ``base`` chain stops at the first array whose base is not an array),
    so when ``root`` is collected no view is left and the block can go.  The
    finalizer holds the handle bytes, not the Block, which the array refers to.
    """
    arr: SharedArray = root.view(SharedArray)
    arr._block = block
    arr._base_addr = base
    if queue and SPARE_MIN <= block.size <= SPARE_MAX:
        weakref.finalize(root, _recycle, handle, block.size, queue)
    else:
        weakref.finalize(root, _free_handle, handle)
    return arr


def _recycle(handle: bytes, size: int, queue: bytes) -> None:
    """A received big array is gone: give its block to its queue for the next copy, or free it."""
    core = _cores.get(queue)  # no lock: a finalizer may run while this thread holds it
    if core is None or not core.give_spare(handle, size):
        _free_handle(handle)


def _free_handle(handle: bytes) -> None:
    # the heap may have gone first (manager shut down): nothing left to free then
    with contextlib.suppress(StaleHandleError, ValueError, OSError):
        _open_handle(handle).free()


def _copy_in(
    obj: np.ndarray, core: _Core, owned: list[Block]
) -> tuple[bytes, np.ndarray, Literal["C", "F"]]:
    """Copy ``obj`` into a block the message will own; (its handle, the copy, "C" or "F").

    A block the queue kept (see give_spare) if one fits, else a new one.  The
    block is in ``owned`` before anything can fail, so the caller frees it.
    """
    nbytes = obj.nbytes
    spare = core.take_spare(nbytes) if nbytes >= SPARE_MIN else None
    block = None
    if spare is not None:
        # cached per handle: attached, buffer sliced; stale if its receiver
        # freed it by hand (SharedArray.free) before dropping it
        with contextlib.suppress(StaleHandleError):
            block = _block_for(spare)[0]
    if block is None or spare is None:
        block = core.heap.alloc(nbytes)
        handle = block.handle.data
    else:
        handle = spare
    owned.append(block)
    order: Literal["C", "F"] = "F" if obj.flags.f_contiguous and not obj.flags.c_contiguous else "C"
    dest = np.ndarray(obj.shape, obj.dtype, buffer=block.buf, order=order)
    populate_for_write(block)
    copying.copyto(dest, obj)
    return handle, dest, order


def _reduce_array(pickler: Any, obj: Any) -> Any:
    """Send a big array by handle: no copy if already shared, else one copy into the heap."""
    if obj.nbytes < ARRAY_MIN or obj.dtype.hasobject:
        return NotImplemented
    if isinstance(obj, SharedArray) and obj._in_block():
        return NotImplemented  # its own __reduce__ sends the handle; the sender keeps it
    core: _Core = pickler.core
    handle, dest, _order = _copy_in(obj, core, pickler.owned)
    return (_take_array, (handle, 0, dest.shape, dest.strides, dest.dtype, core.handle))


# A plain array on its own (the usual message of a pipeline of arrays) skips the
# pickler: its record is the block's handle and a layout suffix, remembered both
# ways, so a stream of same-shaped arrays costs two dict lookups to describe.
#     handle (23 bytes), order (0 "C", 1 "F"), ndim, len(dtype.str), dtype.str, ndim x int64
_LAYOUT = struct.Struct("<BBB")
_suffixes: dict[tuple[Any, ...], bytes] = {}
_Layout = tuple[tuple[int, ...], np.dtype[Any], Literal["C", "F"]]
_layouts: dict[bytes, _Layout] = {}
_LAYOUTS_MAX = 256


def _array_record(obj: np.ndarray, core: _Core) -> tuple[bytes, list[Block]] | None:
    """The K_ARRAY record of ``obj`` copied in, or None if it goes by pickle."""
    dt = obj.dtype
    if obj.nbytes < ARRAY_MIN or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        return None  # small: inline; structured: its dtype needs the pickle
    owned: list[Block] = []
    try:
        handle, _dest, order = _copy_in(obj, core, owned)
    except BaseException:
        _free_blocks(owned)
        raise
    key = (obj.shape, dt, order)
    suffix = _suffixes.get(key)
    if suffix is None:
        name = dt.str.encode("ascii")
        suffix = _LAYOUT.pack(order == "F", obj.ndim, len(name)) + name
        suffix += struct.pack(f"<{obj.ndim}q", *obj.shape)
        if len(_suffixes) >= _LAYOUTS_MAX:
            _suffixes.clear()
        _suffixes[key] = suffix
    return handle + suffix, owned


def _layout_of(suffix: bytes) -> _Layout:
    """Decode (and check) a K_ARRAY record's layout: a damaged one raises, never maps memory."""
    try:
        f_order, ndim, n = _LAYOUT.unpack_from(suffix)
        name = suffix[3 : 3 + n].decode("ascii")
        shape = struct.unpack_from(f"<{ndim}q", suffix, 3 + n)
        if len(suffix) != 3 + n + 8 * ndim or f_order > 1 or min(shape, default=0) < 0:
            raise ValueError("inconsistent lengths")
        dtype = _dtype_of(name)
    except (struct.error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"damaged array record in the queue: {exc}") from None
    if dtype.hasobject:
        raise TypeError(f"dtype {dtype} holds Python objects, which cannot live in shared memory")
    out: _Layout = (shape, dtype, "F" if f_order else "C")
    if len(_layouts) >= _LAYOUTS_MAX:
        _layouts.clear()
    _layouts[suffix] = out
    return out


def _take_record(data: bytes, queue: bytes) -> SharedArray:
    """The array of a K_ARRAY record, over its block (which the receiver now owns)."""
    suffix = data[23:]
    layout = _layouts.get(suffix)
    if layout is None:
        layout = _layout_of(suffix)
    shape, dtype, order = layout
    handle = data[:23]
    block, base = _block_for(handle)
    try:
        root = np.ndarray(shape, dtype=dtype, buffer=block.buf, order=order)
    except TypeError as exc:  # the layout asks for more than the block holds
        raise ValueError(f"damaged array record in the queue: {exc}") from None
    return _own(root, block, base, handle, queue)


def _data_never_moves() -> bool:
    """Whether numpy refuses ``arr.data = buffer`` (2.0 on; 1.x only warns)."""
    probe = np.empty(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe.data = memoryview(bytearray(8))  # type: ignore[misc]
    except (AttributeError, TypeError, ValueError):
        return True
    return False


# SharedArrays sent lately: id -> (weak ref, what its handle depends on, the record).
# An array put again and again (the usual way to hand out work on shared data)
# costs a tuple compare instead of its __reduce__ (~6 us).  Only where numpy
# pins an array's data pointer: everything else its handle says is in the key
# (its Block by id: the live array holds it, and a Block held here would keep
# a shut-down heap mapped).
_sent: dict[int, tuple[weakref.ref[SharedArray], tuple[Any, ...], bytes]] = {}
_SENT_MAX = 64
_SENT_CACHE = _data_never_moves()


def _shared_args(arr: SharedArray) -> bytes:
    """What a SharedArray living in its block sends: its handle, pickled as a plain tuple.

    The same arguments its own pickle carries to ``arrays._rebuild``, without
    the pickler machinery (reducer_override, a global saved and looked up
    again on the other side): half the cost of a message.  b"" if the array
    is private (a result or a copy): it goes by value, or copied in.
    """
    key = (arr.shape, arr.strides, arr.dtype, arr.flags.writeable, id(arr._block))
    hit = _sent.get(id(arr))
    if hit is not None and hit[0]() is arr and hit[1] == key:
        return hit[2]
    reduced = arr.__reduce__()
    if reduced[0] is not _rebuild_array:
        return b""
    data = _pickle_dumps(reduced[1], 5)
    if _SENT_CACHE:
        if len(_sent) >= _SENT_MAX:
            _sent.clear()
        _sent[id(arr)] = (weakref.ref(arr), key, data)
    return data


class _Pickler(pickle.Pickler):
    core: _Core
    owned: list[Block]

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and (type(obj) is np.ndarray or type(obj) is SharedArray):
            return _reduce_array(self, obj)
        return NotImplemented


def _cloud_pickler() -> type:
    import cloudpickle

    class _CloudPickler(cloudpickle.Pickler):  # type: ignore[misc]
        core: _Core
        owned: list[Block]

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, np.ndarray) and (
                type(obj) is np.ndarray or type(obj) is SharedArray
            ):
                result = _reduce_array(self, obj)
                if result is not NotImplemented:
                    return result
            return super().reducer_override(obj)

    return _CloudPickler


_local = threading.local()
_pickle_dumps = pickle.dumps
_pickle_loads = trust.loads  # the unpickle policy applies to every message


def _to_block(heap: Heap, data: bytes, owned: list[Block] | None) -> tuple[bytes, list[Block]]:
    """Put a big pickle in a heap block of its own; the ring carries the handle."""
    big = heap.alloc(len(data))
    owned = owned or []
    owned.append(big)
    big.buf[:] = data
    return big.handle.data, owned


def _dumps(obj: Any, core: _Core) -> tuple[bytes, list[Block]]:
    """Pickle ``obj``; also return the blocks of the arrays copied in for it.

    One pickler per thread is reused (``clear_memo``), which costs a third of
    making a new one per message.
    """
    state = getattr(_local, "pickler", None)
    if state is None:
        f = io.BytesIO()
        state = (_Pickler(f, 5), f)
    _local.pickler = None  # a reentrant put (from a __reduce__) makes its own
    pk, f = state
    pk.core = core
    owned: list[Block] = []
    pk.owned = owned
    try:
        pk.dump(obj)
        data = f.getvalue()
    except BaseException as first:
        _free_blocks(owned)
        state = None  # not reused after an error half-way
        if not isinstance(first, Exception):
            raise
        data, owned = _cloud_dumps(obj, core, first)
    finally:
        if state is not None:
            f.seek(0)
            f.truncate()
            pk.clear_memo()
            pk.owned = []
        _local.pickler = state
    return data, owned


def _cloud_dumps(obj: Any, core: _Core, first: Exception) -> tuple[bytes, list[Block]]:
    f = io.BytesIO()
    pk = _cloud_pickler()(f, 5)
    pk.core = core
    owned: list[Block] = []
    pk.owned = owned
    try:
        pk.dump(obj)
    except Exception as exc:
        _free_blocks(owned)
        raise exc from first
    return f.getvalue(), owned


def _free_blocks(blocks: Iterable[Block]) -> None:
    for b in blocks:
        with contextlib.suppress(StaleHandleError, ValueError, OSError):
            b.free()


# -- the shared part, one per queue and process --------------------------------

_cores: weakref.WeakValueDictionary[bytes, _Core] = weakref.WeakValueDictionary()
_cores_lock = threading.Lock()


class _Core:
    """This process's view of one queue: its header, locks and current ring."""

    __slots__ = (
        "__weakref__",
        "all_done",
        "block",
        "counts",
        "flag",
        "gen",
        "gflag",
        "gmutex",
        "gptr",
        "gtl",
        "gul",
        "handle",
        "hdr",
        "head_addr",
        "heap",
        "mask",
        "maxsize",
        "mutex",
        "ptr",
        "ring",
        "ring_q",
        "ring_size",
        "tail_addr",
        "tl",
        "ul",
        "w",
    )

    def __init__(self, block: Block, *, fresh: bool = False) -> None:
        self.block = block
        self.handle = block.handle.data
        self.heap = block.heap
        hdr = self.hdr = block.buf
        if len(hdr) < _HEADER_SIZE:
            raise ValueError(f"block of {len(hdr)} bytes is not a queue header")
        self.w = hdr[_WORDS_AT:_HEADER_SIZE].cast("Q")
        if fresh:
            self.mutex = RobustMutex.initialize(hdr, _MUTEX_AT, on_owner_dead=self._repair)
            gmutex = RobustMutex.initialize(hdr, _GET_MUTEX_AT, on_owner_dead=_no_repair)
            self.all_done = SharedCondition.initialize(hdr, _ALL_DONE_AT, self.mutex)
            self.w[W_LOCKS] = 2 if _SPLIT else 1
        else:
            if self.w[W_MAGIC] != _MAGIC:
                raise ValueError("this block does not hold a sharedobj queue (bad magic)")
            self.mutex = RobustMutex(hdr, _MUTEX_AT, on_owner_dead=self._repair)
            gmutex = RobustMutex(hdr, _GET_MUTEX_AT, on_owner_dead=_no_repair)
            self.all_done = SharedCondition(hdr, _ALL_DONE_AT, self.mutex)
        self.gmutex = gmutex if self.w[W_LOCKS] == 2 else self.mutex
        # the uncontended path of RobustMutex.acquire/release, inlined by put and get
        self.tl, self.ul, self.ptr, self.flag = self.mutex.inline_parts()
        self.gtl, self.gul, self.gptr, self.gflag = self.gmutex.inline_parts()
        # futex words: from_buffer keeps the mapping while the addresses are in use
        tail = c_uint32.from_buffer(hdr, _WORDS_AT + 8 * W_TAIL + _COUNT_AT)
        head = c_uint32.from_buffer(hdr, _WORDS_AT + 8 * W_HEAD + _COUNT_AT)
        self.counts = (tail, head)
        self.tail_addr = c_void_p(addressof(tail))
        self.head_addr = c_void_p(addressof(head))
        self.maxsize = int(self.w[W_MAXSIZE])
        self.gen = -1
        self.ring = memoryview(b"")
        self.ring_q = self.ring.cast("Q")
        self.ring_size = self.mask = 0

    # -- the ring ---------------------------------------------------------------
    def _slot_handle(self, i: int) -> bytes:
        at = _WORDS_AT + 8 * (W_SLOTS + 4 * i + 1)
        return bytes(self.hdr[at : at + 23])

    def remap(self) -> None:
        """Map the ring the header names now (it changed: it grew, or first use)."""
        gen = int(self.w[W_GEN])
        slot = gen & 1
        size = int(self.w[W_SLOTS + 4 * slot])
        ring = _open_handle(self._slot_handle(slot)).buf
        if len(ring) != size:
            raise ValueError(f"queue ring is {len(ring)} bytes, its header says {size}")
        self.ring = ring
        self.ring_q = ring.cast("Q")
        self.ring_size = size
        self.mask = size - 1
        self.gen = gen

    def _set_slot(self, slot: int, block: Block) -> None:
        at = _WORDS_AT + 8 * (W_SLOTS + 4 * slot + 1)
        _hook()
        self.hdr[at : at + 23] = block.handle.data
        _hook()
        self.w[W_SLOTS + 4 * slot] = block.size  # last: a non-zero size marks the slot used

    def grow(self, need: int) -> None:
        """Double the ring until ``need`` more bytes fit (put lock held; takes the get lock).

        The caller saw too little room, maybe through a HEAD that getters have
        moved since: with getters locked out, the room is measured again.
        """
        gmutex = self.gmutex
        if gmutex is self.mutex:
            self._grow(need)
            return
        _lock(gmutex)
        try:
            self._grow(need)
        finally:
            gmutex.release()

    def _grow(self, need: int) -> None:
        w = self.w
        head = w[W_HEAD] & _M32
        used = ((w[W_TAIL] & _M32) - head) & _M32
        size = self.ring_size
        if used + need <= size:
            return
        new_size = size * 2
        while new_size - used < need:
            new_size *= 2
        if new_size > 1 << 31:
            raise MemoryError(f"a queue ring cannot grow past 2 GiB ({new_size} bytes asked)")
        old_slot = self.gen & 1
        new_slot = old_slot ^ 1
        block = self.heap.alloc(new_size)
        try:
            self._set_slot(new_slot, block)
            old, new = self.ring, block.buf
            p = head
            left = used
            _hook()
            while left:
                o = p & (size - 1)
                n = p & (new_size - 1)
                k = min(left, size - o, new_size - n)
                new[n : n + k] = old[o : o + k]
                p = (p + k) & _M32
                left -= k
            _hook()
            w[W_GEN] = self.gen + 1  # the commit: the new ring is in use
            self._clear_slot(old_slot)
        except BaseException:  # Ctrl-C or an error: what a dead holder's successor would do
            if not w[W_SLOTS + 4 * new_slot]:
                _free_blocks((block,))
            self._clear_slot((int(w[W_GEN]) & 1) ^ 1, hooks=False)
            raise
        finally:
            self.remap()

    def _clear_slot(self, slot: int, hooks: bool = True) -> None:
        w = self.w
        if not w[W_SLOTS + 4 * slot]:
            return
        if hooks:
            _hook()
        _free_handle(self._slot_handle(slot))
        if hooks:
            _hook()
        w[W_SLOTS + 4 * slot] = 0

    # -- spare array blocks ------------------------------------------------------
    def take_spare(self, nbytes: int) -> bytes | None:
        """The handle of a kept block that fits ``nbytes`` (not twice too big), taken out of its slot."""
        w = self.w
        mutex = self.mutex
        _lock(mutex)
        try:
            for i in range(N_SPARE):
                size = w[W_SPARE + 4 * i]
                if nbytes <= size < 2 * nbytes:
                    at = _WORDS_AT + 8 * (W_SPARE + 4 * i + 1)
                    handle = bytes(self.hdr[at : at + 23])
                    _hook()
                    w[W_SPARE + 4 * i] = 0  # the commit: the block is ours
                    return handle
            return None
        finally:
            mutex.release()

    def give_spare(self, handle: bytes, size: int) -> bool:
        """Keep a received array's block for a later copy; False if there is no room."""
        mutex = self.mutex
        if not mutex.acquire(False):
            # A finalizer may run while this very thread holds the lock: never
            # block.  Another process holding it (a producer mid-put) lets go in
            # microseconds, and a kept block saves a page fault per 4 KiB.
            if mutex.holder_tid() == threading.get_native_id():
                return False
            for _ in range(_SPARE_TRIES):
                os.sched_yield()
                if mutex.acquire(False):
                    break
            else:
                return False
        try:
            w = self.w
            for i in range(N_SPARE):
                if not w[W_SPARE + 4 * i]:
                    at = _WORDS_AT + 8 * (W_SPARE + 4 * i + 1)
                    _hook()
                    self.hdr[at : at + 23] = handle
                    _hook()
                    w[W_SPARE + 4 * i] = size  # the commit: a non-zero size
                    return True
            return False
        finally:
            mutex.release()

    def _repair(self, _mutex: RobustMutex) -> None:
        """A holder died: free the ring a growth left behind (new or old, either way unused)."""
        self._clear_slot((int(self.w[W_GEN]) & 1) ^ 1)

    # -- waiting -------------------------------------------------------------
    def wait(self, cond: SharedCondition, hint: int) -> None:
        """Sleep on ``cond`` (put lock held) until notified: ``JoinableQueue.join``."""
        w = self.w
        w[hint] += 1
        try:
            cond.wait(None)
        finally:
            if w[hint]:
                w[hint] -= 1
        if self.gen != w[W_GEN]:
            self.remap()

    def sleep(
        self, addr: c_void_p, seen: int, hint: int, mutex: RobustMutex, deadline: float | None
    ) -> bool:
        """Sleep (``mutex`` held on entry and return) while the count at ``addr`` is ``seen``.

        Getters sleep on TAIL's count, putters on HEAD's (a futex on the u32
        half): the kernel sleeps only if no commit changed it since we looked,
        so a put that lands meanwhile is never slept through.  The ``hint``
        word (sleepers) tells the other side to make the wake-up call; we raise
        it before the kernel reads the count, and the other side stores the
        count before it reads the hint, with its lock release between (a full
        fence where the locks are split, x86; under one lock, the lock orders
        them): one of the two sees the other.

        A wake-up call per sleep, not per message: getters sleep only on an
        empty queue, so only the put that ends the emptiness wakes one, and a
        getter that leaves messages behind wakes the next sleeper.

        One slice of at most WAIT_SLICE, then the caller checks its condition
        and calls again: Ctrl-C is seen, and a wake-up lost (a getter killed
        before it passed one on) costs a slice, never a hang.  False, without
        sleeping, once ``deadline`` passed.
        """
        if deadline is None:
            rel = WAIT_SLICE
        else:
            rel = deadline - time.monotonic()
            if rel <= 0:
                return False
            rel = min(rel, WAIT_SLICE)
        w = self.w
        w[hint] += 1
        mutex.release()
        try:
            _futex_wait(addr, seen, rel)
        finally:
            _lock(mutex)
            if w[hint]:
                w[hint] -= 1
        if self.gen != w[W_GEN]:
            self.remap()
        return True

    def wait_not_empty(self, deadline: float | None) -> int:
        """Wait (get lock held) until a message is in; return HEAD.  queue.Empty at the deadline.

        A blocking get first polls without the lock for a few microseconds: a
        busy producer is usually that close, and a consumer that went to sleep
        costs a wake-up system call and a trip through the scheduler.
        """
        w = self.w
        gmutex = self.gmutex
        if deadline is None or deadline > time.monotonic():
            gmutex.release()
            try:
                for _ in range(_SPIN):
                    if (w[W_TAIL] >> 32) != (w[W_HEAD] >> 32):
                        break
            finally:
                _lock(gmutex)
        head = w[W_HEAD]
        while (w[W_TAIL] >> 32) == (head >> 32):
            if not self.sleep(self.tail_addr, head >> 32, W_GETW, gmutex, deadline):
                raise Empty
            head = w[W_HEAD]
        return int(head)

    def wait_room(self, count: int, deadline: float | None) -> bool:
        """Wait (put lock held) until ``count`` more messages fit; False at the deadline."""
        w = self.w
        maxsize = self.maxsize
        while True:
            head = w[W_HEAD]
            if ((w[W_TAIL] >> 32) - (head >> 32)) & _M32 <= maxsize - count:
                return True
            if not self.sleep(self.head_addr, head >> 32, W_PUTW, self.mutex, deadline):
                return False

    # -- checks -----------------------------------------------------------------
    def head_taken(self) -> int:
        """Messages already taken from a batch record at the head (counted until it all goes)."""
        w = self.w
        head = w[W_HEAD]
        if (w[W_TAIL] >> 32) == (head >> 32) or self.gen != w[W_GEN]:
            return 0
        word = self.ring_q[(head & self.mask) >> 3]
        if word >> 32 == K_PAD:
            word = self.ring_q[(((head & _M32) + (word & _M32) + 8) & self.mask) >> 3]
        return int((word >> 16) & 0xFFFF) if word >> 48 == _BATCH_TAG else 0

    def check(self) -> list[str]:
        problems: list[str] = []
        w = self.w
        if w[W_MAGIC] != _MAGIC:
            return [f"bad magic {w[W_MAGIC]:#x}"]
        if w[W_KIND] not in (KIND_QUEUE, KIND_JOINABLE, KIND_SIMPLE):
            problems.append(f"bad kind {w[W_KIND]}")
        if w[W_LOCKS] not in (1, 2):
            problems.append(f"bad lock count {w[W_LOCKS]}")
        if self.gen != w[W_GEN]:
            self.remap()
        size = self.ring_size
        if size < 64 or size & (size - 1):
            return [*problems, f"ring size {size} is not a power of two"]
        if w[W_SLOTS + 4 * ((self.gen & 1) ^ 1)]:
            problems.append("the unused ring slot still holds a block")
        for i in range(N_SPARE):
            if w[W_SPARE + 4 * i]:
                at = _WORDS_AT + 8 * (W_SPARE + 4 * i + 1)
                try:
                    spare = _open_handle(bytes(self.hdr[at : at + 23]))
                    spare.heap._validate(spare)
                    if spare.size != w[W_SPARE + 4 * i]:
                        problems.append(
                            f"spare block {i} is {spare.size} bytes, not {w[W_SPARE + 4 * i]}"
                        )
                except Exception as exc:
                    problems.append(f"spare block {i}: {exc}")
        tail, head = int(w[W_TAIL]), int(w[W_HEAD])
        qsize = ((tail >> 32) - (head >> 32)) & _M32
        used = ((tail & _M32) - (head & _M32)) & _M32
        if used > size:
            return [*problems, f"{used} bytes between head and tail in a ring of {size}"]
        if qsize and w[W_MAXSIZE] and qsize > w[W_MAXSIZE]:
            problems.append(f"{qsize} messages in a queue of maxsize {w[W_MAXSIZE]}")
        unfinished = ((tail >> 32) - w[W_DONE]) & _M32
        waiting = qsize - self.head_taken()  # messages not yet taken
        if w[W_KIND] == KIND_JOINABLE and unfinished < waiting:
            problems.append(f"{unfinished} unfinished tasks but {waiting} messages queued")
        p, end, count = head & _M32, tail & _M32, 0
        while p != end:
            off = p & self.mask
            if size - off < 8:
                return [*problems, f"record at {p} crosses the end of the ring"]
            word = self.ring_q[off >> 3]
            n, kind = word & _M32, word >> 32
            msgs = 1
            if word >> 48 == _BATCH_TAG:
                msgs, taken, n = (word >> 32) & 0xFFFF, (word >> 16) & 0xFFFF, word & 0xFFFF
                kind = K_PICKLE
                if not 0 < msgs <= BATCH_MAX or taken >= msgs or n > BATCH_BYTES:
                    return [
                        *problems,
                        f"batch record at {p}: {msgs} messages, {taken} taken, {n} bytes",
                    ]
                if taken and p != head & _M32:
                    problems.append(f"batch record at {p} is partly taken but not at the head")
            step = 8 + ((n + 7) & ~7)
            if kind not in _KINDS:
                return [*problems, f"record at {p} has kind {kind:#x}"]
            if off + step > size or step > ((end - p) & _M32):
                return [*problems, f"record at {p} of {n} bytes runs past the ring or the tail"]
            if kind in (K_BIG, K_ARRAY):
                try:
                    big = _open_handle(bytes(self.ring[off + 8 : off + 8 + min(n, 23)]))
                    big.heap._validate(big)
                except Exception as exc:
                    problems.append(f"big message at {p}: {exc}")
            if kind != K_PAD:
                count += msgs
            p = (p + step) & _M32
        if count != qsize:
            problems.append(f"{count} records between head and tail, counters say {qsize}")
        return problems


def _core_for(handle: bytes) -> _Core:
    with _cores_lock:
        core = _cores.get(handle)
    if core is None:
        core = _Core(_open_handle(handle))
        with _cores_lock:
            core = _cores.setdefault(handle, core)
    return core


def _reset_after_fork() -> None:
    global _cores_lock
    _cores_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _create_core(heap: Heap, kind: int, maxsize: int) -> _Core:
    header = heap.alloc_zeroed(_HEADER_SIZE)
    try:
        ring = heap.alloc(_FIRST_RING)
    except BaseException:
        header.free()
        raise
    core = _Core(header, fresh=True)
    w = core.w
    w[W_MAXSIZE] = maxsize
    w[W_KIND] = kind
    core._set_slot(0, ring)
    w[W_MAGIC] = _MAGIC
    core.maxsize = maxsize
    core.remap()
    with _cores_lock:
        _cores[core.handle] = core
    return core


def _lock(mutex: RobustMutex) -> None:
    """Acquire, trying a few times first: the holder is usually out within a microsecond,
    and a contended acquire that sleeps costs two system calls and a context switch."""
    for _ in range(_LOCK_SPIN):
        if mutex.acquire(False):
            return
    mutex.acquire()


def _no_repair(_mutex: RobustMutex) -> None:
    """A getter died holding the get lock: a get commits with one store, nothing is torn.

    (A growth holds both locks; the put lock's repair frees what it left.)
    """


_syscall: Any = None
_SYS_FUTEX = _libc.SYS_FUTEX.get(_libc.machine(), -1)


def _futex(addr: c_void_p, op: int, val: int, timeout: Any) -> int:
    global _syscall
    if _syscall is None:
        _syscall = _libc.libc().syscall
    rc: int = _syscall(_SYS_FUTEX, addr, op, val, timeout, None, 0)
    return rc


def _futex_wait(addr: c_void_p, seen: int, seconds: float) -> None:
    """Sleep while the u32 at ``addr`` is ``seen``, ``seconds`` at most (or until woken)."""
    sec = int(seconds)
    ts = _libc.Timespec(sec, int((seconds - sec) * 1e9))
    val = seen - 2**32 if seen > 2**31 - 1 else seen  # the kernel compares the raw 32 bits
    if _futex(addr, _libc.FUTEX_WAIT, val, byref(ts)) != 0:
        err = _libc.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT):
            raise _libc.oserror(err, "futex wait on a queue")


def _wake(addr: c_void_p, n: int) -> None:
    """Wake up to ``n`` processes sleeping on the count at ``addr``."""
    _futex(addr, _libc.FUTEX_WAKE, min(n, 2**31 - 1), None)


def _lock_slow(mutex: RobustMutex, rc: int) -> None:
    """Finish what the inlined try-lock of put and get started.

    ``rc`` 0 with the recovery flag set, or EOWNERDEAD: we hold the lock and a
    repair is due (RobustMutex runs it); anything else: someone holds it.
    """
    if rc == 0 or rc == errno.EOWNERDEAD:
        mutex._acquire_slow(rc, True, None)
    else:
        _lock(mutex)


def _deadline(block: bool, timeout: object) -> float | None:
    """Like multiprocessing: a timeout means nothing when not blocking; negative is 0."""
    if not block:
        return 0.0
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
    if timeout != timeout:
        raise ValueError("timeout must not be NaN")
    return time.monotonic() + max(0.0, float(timeout))


def _rebuild(cls: type[_Base], handle: bytes) -> _Base:
    self = cls.__new__(cls)
    self._core = _core_for(handle)
    self._closed = False
    return self


# -- the queues -------------------------------------------------------------------


class _Base:
    __slots__ = ("__weakref__", "_closed", "_core")
    _KIND = 0

    _core: _Core
    _closed: bool

    def __init__(self) -> None:
        raise TypeError(
            f"make a {type(self).__name__} with SharedMemoryManager().{type(self).__name__}() "
            f"or {type(self).__name__}.create(heap)"
        )

    @classmethod
    def _make(cls, heap: Heap, maxsize: int) -> Any:
        if not isinstance(heap, Heap):
            raise TypeError(f"heap must be a sharedobj Heap, not {type(heap).__name__}")
        self = cls.__new__(cls)
        self._core = _create_core(heap, cls._KIND, maxsize)
        self._closed = False
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self._core.handle))

    def _check(self) -> list[str]:
        """Every inconsistency of the shared state (empty when healthy); takes the locks."""
        core = self._core
        with core.mutex:
            if core.gmutex is core.mutex:
                return core.check()
            with core.gmutex:
                return core.check()

    # -- the two halves every queue has -------------------------------------------
    def _refuse(self) -> None:
        raise ValueError(f"Queue {self!r} is closed")

    def _put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj``; wait for room if the queue is full (queue.Full on timeout).

        The hot path of every queue, kept in one function: a call, an attribute
        lookup or a generator costs as much here as a ring write.
        """
        if self._closed:
            self._refuse()
        core = self._core
        deadline = None if block is True and timeout is None else _deadline(block, timeout)
        t = type(obj)
        owned: list[Block] | None = None
        kind = K_PICKLE
        # Plain data (and tuples of it) holds no array to hand over: the pickle
        # module's own dumps is a third of the cost of our reusable pickler.
        if t in _PLAIN:
            data = _pickle_dumps(obj, 5)
        elif t is tuple:
            for x in obj:
                if type(x) not in _PLAIN:
                    data, owned = _dumps(obj, core)
                    break
            else:
                data = _pickle_dumps(obj, 5)
        elif t is np.ndarray or t is SharedArray:
            if t is SharedArray and (data := _shared_args(obj)):
                kind = K_SHARED
            elif (record := _array_record(obj, core)) is not None:
                data, owned = record
                kind = K_ARRAY
            else:
                data, owned = _dumps(obj, core)
        else:
            data, owned = _dumps(obj, core)
        n = len(data)
        if n > INLINE_MAX:
            data, owned = _to_block(core.heap, data, owned)
            n = len(data)
            kind = K_BIG
        need = 8 + ((n + 7) & ~7)
        ptr = core.ptr
        rc = core.tl(ptr)
        if rc or core.flag[0]:
            try:
                _lock_slow(core.mutex, rc)
            except BaseException:
                if owned:
                    _free_blocks(owned)
                raise
        committed = False
        w = core.w
        try:
            if core.gen != w[W_GEN]:
                core.remap()
            tail = w[W_TAIL]
            head = w[W_HEAD]  # getters may move it meanwhile: it only gets more room
            maxsize = core.maxsize
            if maxsize and ((tail >> 32) - (head >> 32)) & _M32 >= maxsize:
                if not core.wait_room(1, deadline):
                    raise Full
                tail = w[W_TAIL]
                head = w[W_HEAD]
            pos = tail & _M32
            size = core.ring_size
            off = pos & core.mask
            pad = size - off if size - off < need else 0
            if ((pos - head) & _M32) + pad + need > size:
                core.grow(pad + need)
                size = core.ring_size
                off = pos & core.mask
                pad = size - off if size - off < need else 0
            rq = core.ring_q
            if pad:
                if fault_hook is not None:
                    fault_hook()
                rq[off >> 3] = K_PAD << 32 | (pad - 8)
                off = 0
            if fault_hook is not None:
                fault_hook()
            rq[off >> 3] = kind << 32 | n
            core.ring[off + 8 : off + 8 + n] = data
            if fault_hook is not None:
                fault_hook()
            w[W_TAIL] = ((((tail >> 32) + 1) & _M32) << 32) | ((pos + pad + need) & _M32)
            committed = True
        finally:
            if core.ul(ptr):
                core.mutex.release()  # raises the right error
            if not committed and owned:
                _free_blocks(owned)
        if w[W_GETW] and (w[W_HEAD] >> 32) == (tail >> 32):
            _wake(core.tail_addr, 1)  # the queue was empty: see _Core.sleep

    def _get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest item; wait if empty (queue.Empty on timeout)."""
        if self._closed:
            self._refuse()
        core = self._core
        deadline = None if block is True and timeout is None else _deadline(block, timeout)
        ptr = core.gptr
        rc = core.gtl(ptr)
        if rc or core.gflag[0]:
            _lock_slow(core.gmutex, rc)
        w = core.w
        try:
            head = w[W_HEAD]
            if (w[W_TAIL] >> 32) == (head >> 32):
                head = core.wait_not_empty(deadline)
            if core.gen != w[W_GEN]:
                core.remap()
            pos = head & _M32
            off = pos & core.mask
            rq = core.ring_q
            word = rq[off >> 3]
            if word >> 32 == K_PAD:
                pos += (word & _M32) + 8  # to the end of the ring it was written in,
                off = pos & core.mask  # which is not always the end of this one
                word = rq[off >> 3]
            if word >> 48 == _BATCH_TAG:
                data, index, freed = _take_from_batch(core, w, rq, off, pos, head, word)
                kind = K_BATCH_ITEM
            else:
                n = word & _M32
                kind = word >> 32
                data = core.ring[off + 8 : off + 8 + n].tobytes()
                if fault_hook is not None:
                    fault_hook()
                w[W_HEAD] = ((((head >> 32) + 1) & _M32) << 32) | (
                    (pos + 8 + ((n + 7) & ~7)) & _M32
                )
                freed = 1
        finally:
            if core.gul(ptr):
                core.gmutex.release()  # raises the right error
        if w[W_GETW] and (w[W_TAIL] >> 32) != (w[W_HEAD] >> 32):
            _wake(core.tail_addr, 1)  # more left for another sleeping getter: see _Core.sleep
        if core.maxsize and freed and w[W_PUTW]:
            _wake(core.head_addr, freed)
        if kind == K_PICKLE:
            return _pickle_loads(data)
        if kind == K_BATCH_ITEM:
            return _pickle_loads(data)[index]
        return _decode(kind, data, core.handle)

    def _empty(self) -> bool:
        w = self._core.w
        return (w[W_HEAD] >> 32) == (w[W_TAIL] >> 32)


def _take_from_batch(
    core: _Core, w: Any, rq: Any, off: int, pos: int, head: int, word: int
) -> tuple[bytes, int, int]:
    """Take the next message of the batch record at the head (get lock held).

    Returns its record's pickle, its index there, and the messages the take
    freed for maxsize (all of the record's, when it was its last).
    """
    msgs, taken, n = (word >> 32) & 0xFFFF, (word >> 16) & 0xFFFF, word & 0xFFFF
    data = core.ring[off + 8 : off + 8 + n].tobytes()
    _hook()
    if taken + 1 < msgs:
        rq[off >> 3] = (word & ~(0xFFFF << 16)) | ((taken + 1) << 16)  # the commit
        return data, taken, 0
    w[W_HEAD] = ((((head >> 32) + msgs) & _M32) << 32) | ((pos + 8 + ((n + 7) & ~7)) & _M32)
    return data, taken, msgs


def _span(records: list[tuple[int, bytes]], pos: int, size: int) -> int:
    """Bytes the records take from position ``pos`` in a ring of ``size``, padding included."""
    p = pos
    mask = size - 1
    for _kind, data in records:
        need = 8 + ((len(data) + 7) & ~7)
        room = size - (p & mask)
        if room < need:
            p += room
        p += need
    return p - pos


def _all_plain(items: list[Any]) -> bool:
    """Whether every item is plain data or a tuple of it (no array to hand over, nothing mutable).

    Set comprehensions, not ``all()`` over a generator per tuple: for 100
    two-tuples this is 23 us against 87, where pickling them takes 12.
    """
    types = {type(o) for o in items}
    if types <= _PLAIN:
        return True
    if tuple not in types or not types - _TUPLE <= _PLAIN:
        return False
    return {type(x) for o in items if type(o) is tuple for x in o} <= _PLAIN


def _item_record(
    obj: Any,
    core: _Core,
    heap: Heap,
    owned: list[Block],
    append: Callable[[tuple[int, bytes]], None],
) -> list[Block]:
    """Append the record of one message; return the blocks it owns so far."""
    t = type(obj)
    if t is int or t is str or t is bytes or t is float or obj is None:
        data = _pickle_dumps(obj, 5)
    elif t is SharedArray and (data := _shared_args(obj)):
        append((K_SHARED, data))
        return owned
    elif (t is np.ndarray or t is SharedArray) and (record := _array_record(obj, core)) is not None:
        data, blocks = record
        owned += blocks
        append((K_ARRAY, data))
        return owned
    else:
        data, blocks = _dumps(obj, core)
        owned += blocks
    if len(data) > INLINE_MAX:
        data, owned = _to_block(heap, data, owned)
        append((K_BIG, data))
    else:
        append((K_PICKLE, data))
    return owned


def _decode(kind: int, data: bytes, queue: bytes) -> Any:
    """The message of one record taken out of the ring (no lock needed any more)."""
    if kind == K_PICKLE:
        return _pickle_loads(data)
    if kind == K_ARRAY:
        return _take_record(data, queue)
    if kind == K_SHARED:
        return _rebuild_array(*_pickle_loads(data))
    return _load_big(data)


def _load_big(handle: bytes) -> Any:
    block = _open_handle(handle)
    try:
        return trust.loads(block.buf)
    finally:
        _free_blocks((block,))


class Queue(_Base):
    """A process-shared FIFO queue with ``multiprocessing.Queue``'s API (see the module doc)."""

    __slots__ = ()
    _KIND = KIND_QUEUE

    __class_getitem__: Any = classmethod(types.GenericAlias)

    @classmethod
    def create(cls, heap: Heap, maxsize: int = 0) -> Queue:
        """A new queue in ``heap``; ``maxsize <= 0`` means unbounded, as in the stdlib."""
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            maxsize = operator.index(maxsize)  # TypeError for floats and strings
        return cls._make(heap, 0 if maxsize <= 0 else min(maxsize, _SEM_VALUE_MAX))  # type: ignore[no-any-return]

    def _check_closed(self) -> None:
        if self._closed:
            self._refuse()

    put = _Base._put
    get = _Base._get

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    def get_nowait(self) -> Any:
        return self.get(False)

    def put_many(
        self, items: Iterable[Any], block: bool = True, timeout: float | None = None
    ) -> None:
        """Put every item, in order and next to each other, under one lock round trip.

        All or nothing: with a maxsize, it waits until the whole batch fits
        (queue.Full on timeout, nothing put); a batch larger than maxsize is a
        ValueError.
        """
        self._check_closed()
        core = self._core
        deadline = _deadline(block, timeout)
        items = list(items)
        if core.maxsize and len(items) > core.maxsize:
            raise ValueError(f"a batch of {len(items)} items never fits in maxsize {core.maxsize}")
        if not items:
            return
        records: list[tuple[int, bytes]] = []
        owned: list[Block] = []
        committed = False
        count = len(items)
        try:
            heap = core.heap
            append = records.append
            if _all_plain(items):
                # Plain data holds no array to hand over: pickle each chunk as one
                # list, one call, and store it as one batch record.
                for start in range(0, count, BATCH_MAX):
                    chunk = items[start : start + BATCH_MAX]
                    data = _pickle_dumps(chunk, 5)
                    if len(data) <= BATCH_BYTES:
                        append(((_BATCH_TAG << 16) | len(chunk), data))
                    else:
                        for obj in chunk:
                            owned = _item_record(obj, core, heap, owned, append)
            else:
                for obj in items:
                    owned = _item_record(obj, core, heap, owned, append)
            committed = self._put_records(records, deadline, count)
        finally:
            if not committed and owned:
                _free_blocks(owned)

    def _put_records(
        self, records: list[tuple[int, bytes]], deadline: float | None, count: int
    ) -> bool:
        """Write the records past the tail and commit them all with one store of TAIL."""
        core = self._core
        mutex = core.mutex
        _lock(mutex)
        w = core.w
        try:
            if core.gen != w[W_GEN]:
                core.remap()
            if core.maxsize and not core.wait_room(count, deadline):
                raise Full
            tail = w[W_TAIL]
            pos = tail & _M32
            while True:  # where the padding goes depends on the ring size
                span = _span(records, pos, core.ring_size)
                if ((pos - (w[W_HEAD] & _M32)) & _M32) + span <= core.ring_size:
                    break
                core.grow(span)
            ring, rq, size, mask = core.ring, core.ring_q, core.ring_size, core.mask
            p = pos
            for kind, data in records:
                n = len(data)
                need = 8 + ((n + 7) & ~7)
                off = p & mask
                if size - off < need:
                    _hook()
                    rq[off >> 3] = K_PAD << 32 | (size - off - 8)
                    p += size - off
                    off = 0
                _hook()
                rq[off >> 3] = kind << 32 | n
                ring[off + 8 : off + 8 + n] = data
                p += need
            _hook()
            w[W_TAIL] = ((((tail >> 32) + count) & _M32) << 32) | (p & _M32)
        finally:
            mutex.release()
        if w[W_GETW] and (w[W_HEAD] >> 32) == (tail >> 32):
            _wake(core.tail_addr, count)  # the queue was empty: see _Core.sleep
        return True

    def get_many(
        self, max_items: int = _SEM_VALUE_MAX, block: bool = True, timeout: float | None = None
    ) -> list[Any]:
        """Remove and return up to ``max_items`` of the oldest items, at least one.

        Waits (as ``get``) while the queue is empty; queue.Empty on timeout.
        """
        self._check_closed()
        if isinstance(max_items, bool) or not isinstance(max_items, int):
            raise TypeError(f"max_items must be an int, not {type(max_items).__name__}")
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        core = self._core
        deadline = _deadline(block, timeout)
        gmutex = core.gmutex
        records: list[tuple[int, bytes, int, int]] = []
        _lock(gmutex)
        w = core.w
        try:
            head = w[W_HEAD]
            if (w[W_TAIL] >> 32) == (head >> 32):
                head = core.wait_not_empty(deadline)
            if core.gen != w[W_GEN]:
                core.remap()
            avail = ((w[W_TAIL] >> 32) - (head >> 32)) & _M32  # messages, as the counters see them
            ring, rq, mask = core.ring, core.ring_q, core.mask
            p = head & _M32
            want = max_items
            passed = 0  # messages of the records wholly taken
            partial = -1  # a batch record only partly taken: its offset (the commit is its header)
            partial_word = 0
            append = records.append
            while want > 0 and passed < avail:
                off = p & mask
                word = rq[off >> 3]
                if word >> 32 == K_PAD:
                    p += (word & _M32) + 8
                    off = p & mask
                    word = rq[off >> 3]
                if word >> 48 == _BATCH_TAG:
                    msgs, taken, n = (word >> 32) & 0xFFFF, (word >> 16) & 0xFFFF, word & 0xFFFF
                    data = ring[off + 8 : off + 8 + n].tobytes()
                    if msgs - taken <= want:
                        append((K_BATCH_ITEM, data, taken, msgs))
                        want -= msgs - taken
                        passed += msgs
                        p += 8 + ((n + 7) & ~7)
                        continue
                    if records:  # taking part of it would need a second commit: stop here
                        break
                    partial, partial_word = off, (word & ~(0xFFFF << 16)) | ((taken + want) << 16)
                    append((K_BATCH_ITEM, data, taken, taken + want))
                    break
                n = word & _M32
                append((word >> 32, ring[off + 8 : off + 8 + n].tobytes(), 0, 0))
                want -= 1
                passed += 1
                p += 8 + ((n + 7) & ~7)
            _hook()
            if partial >= 0:
                rq[partial >> 3] = partial_word  # the commit of a partial take
                passed = 0
            else:
                w[W_HEAD] = ((((head >> 32) + passed) & _M32) << 32) | (p & _M32)
        finally:
            gmutex.release()
        if w[W_GETW] and (w[W_TAIL] >> 32) != (w[W_HEAD] >> 32):
            _wake(core.tail_addr, 1)  # more left for another sleeping getter: see _Core.sleep
        if core.maxsize and passed and w[W_PUTW]:
            _wake(core.head_addr, passed)
        out: list[Any] = []
        error: BaseException | None = None
        for kind, data, lo, hi in records:
            try:
                if kind == K_BATCH_ITEM:
                    out += _pickle_loads(data)[lo:hi]
                else:
                    out.append(_decode(kind, data, core.handle))
            except Exception as exc:  # free the other big blocks before raising
                error = error or exc
        if error is not None:
            raise error
        return out

    def qsize(self) -> int:
        """Messages in the queue now (a snapshot, as in the stdlib)."""
        core = self._core
        w = core.w
        head = w[W_HEAD] >> 32  # head first: the count read after it can only be larger
        n = int(((w[W_TAIL] >> 32) - head) & _M32)
        # the counters count a batch at the head in full until its last message goes
        return max(n - core.head_taken(), 0) if n else 0

    def empty(self) -> bool:
        return self._empty()

    def full(self) -> bool:
        maxsize = self._core.maxsize
        return bool(maxsize) and self.qsize() >= maxsize

    def close(self) -> None:
        """This object puts and gets no more (the queue stays usable through other handles)."""
        self._closed = True

    def join_thread(self) -> None:
        """Nothing to wait for: put is synchronous.  Like the stdlib, only after close()."""
        if not self._closed:
            raise AssertionError(f"Queue {self!r} not closed")

    def cancel_join_thread(self) -> None:
        """Nothing to cancel: put is synchronous, a process may always exit."""

    def __repr__(self) -> str:
        core = self._core
        return (
            f"<sharedobj {type(self).__name__} heap={core.heap.id} header={core.block.offset}"
            f"{' closed' if self._closed else ''}>"
        )


class JoinableQueue(Queue):
    """A Queue whose ``join()`` waits until every item put has been marked ``task_done()``."""

    __slots__ = ()
    _KIND = KIND_JOINABLE

    @classmethod
    def create(cls, heap: Heap, maxsize: int = 0) -> JoinableQueue:
        return super().create(heap, maxsize)  # type: ignore[return-value]

    def task_done(self) -> None:
        """Mark one item as processed; ValueError if called more often than items were put."""
        core = self._core
        with core.mutex:
            w = core.w
            done = w[W_DONE]
            if ((w[W_TAIL] >> 32) - done) & _M32 == 0:
                raise ValueError("task_done() called too many times")
            _hook()
            w[W_DONE] = (done + 1) & _M32
            if ((w[W_TAIL] >> 32) - done - 1) & _M32 == 0 and w[W_JOINW]:
                _hook()
                core.all_done.notify_all()

    def join(self) -> None:
        """Block until every item put (by any process) has been marked done."""
        core = self._core
        with core.mutex:
            w = core.w
            while ((w[W_TAIL] >> 32) - w[W_DONE]) & _M32:
                core.wait(core.all_done, W_JOINW)


class SimpleQueue(_Base):
    """``multiprocessing.SimpleQueue``: unbounded; put, get, empty and close only."""

    __slots__ = ()
    _KIND = KIND_SIMPLE

    __class_getitem__: Any = classmethod(types.GenericAlias)

    @classmethod
    def create(cls, heap: Heap) -> SimpleQueue:
        return cls._make(heap, 0)  # type: ignore[no-any-return]

    def _refuse(self) -> None:
        raise OSError("handle is closed")

    def _check_open(self) -> None:
        if self._closed:
            self._refuse()

    def put(self, obj: Any) -> None:
        self._put(obj)

    def get(self) -> Any:
        return self._get()

    def empty(self) -> bool:
        self._check_open()
        return self._empty()

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        core = self._core
        return f"<sharedobj SimpleQueue heap={core.heap.id} header={core.block.offset}>"
