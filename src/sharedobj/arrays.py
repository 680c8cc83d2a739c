"""Numpy arrays that live in a heap block and pickle as a handle to it.

A :class:`SharedArray` is a real ``numpy.ndarray`` (a subclass) over a
block's memory.  Pickling it - or any view of it: a slice, a transpose, a
reshape - sends the block's handle plus the view's offset, shape, strides and
dtype, a few dozen bytes whatever the size, so passing arrays to
``Pool.map``, ``ProcessPoolExecutor``, ``Process`` or a queue moves no array
data.  The receiving process maps the same memory: writes are seen by all.

Results of computations (``a + 1``, ``a.sum()``, ``a.copy()``, fancy
indexing) live in private memory: ufunc results come back as plain
``numpy.ndarray`` (reductions as numpy scalars), copies may keep the subclass
but have ``block`` None, and all of them pickle by value as usual.

First touch.  A fresh worker that reads a large array would fault in every
page one at a time (System V mappings get no fault-around), so an array of a
megabyte or more that arrives by pickle has its pages pre-mapped with
``madvise(MADV_POPULATE_READ)``, once per block and process, where the kernel
has it (Linux 5.14+).  ``python -m sharedobj info`` says what is in use.
"""

from __future__ import annotations

import math
import operator
import os
import threading
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from . import _libc, copying
from . import heap as heap_mod
from .errors import StaleHandleError
from .heap import _FREED, Block, Heap, _open_handle, _pack
from .limits import PAGE_SIZE

__all__ = ["SharedArray", "asarray", "empty", "full", "ndarray", "zeros"]

POPULATE_MIN = 1 << 20  # arrays at least this big are pre-faulted when they arrive
_populated_lock = threading.Lock()
_WRITTEN_MAX = 4096  # block ranges remembered as mapped for writing, per heap and process
_populate_works: bool | None = None


class SharedArray(np.ndarray):
    """A numpy array in shared memory; see the module docstring."""

    _block: Block | None
    _base_addr: int

    def __array_finalize__(self, obj: Any) -> None:
        # A view inherits its block; an array that owns its data (a copy, an
        # astype, a fancy-indexing result) is private whatever it came from.
        if self.base is None:
            self._block = None
            self._base_addr = 0
        else:
            self._block = getattr(obj, "_block", None)
            self._base_addr = getattr(obj, "_base_addr", 0)

    def __array_wrap__(self, out: Any, context: Any = None, return_scalar: bool = False) -> Any:
        result = super().__array_wrap__(out, context, return_scalar)
        if isinstance(result, SharedArray) and not result._in_block():
            private = result.view(np.ndarray)  # a computed result lives in private memory
            return private[()] if return_scalar else private
        return result

    # -- where the data is ----------------------------------------------------
    def _in_block(self) -> bool:
        block = self._block
        if block is None:
            return False
        start = self.__array_interface__["data"][0]
        lo, hi = _extent(self)
        return bool(self._base_addr <= start + lo and start + hi <= self._base_addr + block.size)

    @property
    def block(self) -> Block | None:
        """The heap block holding the data (None for a private result)."""
        return self._block if self._in_block() else None

    @property
    def heap(self) -> Heap | None:
        block = self.block
        return block.heap if block is not None else None

    def free(self) -> None:
        """Give the memory back to the heap, in every process.

        Like ``free()`` in C: arrays still viewing it must not be used
        afterwards.  They stay mapped, so using one never crashes, but the
        memory may belong to someone else by then.
        """
        block = self.block
        if block is None:
            raise ValueError("this array is not in shared memory (a private copy or result)")
        block.free()

    def __reduce__(self) -> Any:
        block = self._block
        if block is None:
            return self.view(np.ndarray).__reduce__()
        start = self.__array_interface__["data"][0]
        lo, hi = _extent(self)
        base = self._base_addr
        if not (base <= start + lo and start + hi <= base + block.size):
            return self.view(np.ndarray).__reduce__()  # a private result: by value
        dtype = self.dtype
        return (
            _rebuild,
            (
                _pack(block._heap_id, block.arena, block.offset, block.size, block.gen, block.kind),
                start - base,
                self.shape,
                self.strides,
                # a plain dtype travels as its string ('<f8'): pickling the
                # dtype object costs more than everything else here together
                dtype.str if dtype.fields is None and dtype.subdtype is None else dtype,
                bool(self.flags.writeable),
            ),
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__reduce__()

    def __repr__(self) -> str:
        return np.asarray(self).__repr__().replace("array(", "SharedArray(", 1)


def _extent(arr: np.ndarray[Any, Any]) -> tuple[int, int]:
    """Byte range [lo, hi) an array touches, relative to its data pointer."""
    if arr.size == 0:
        return 0, 0
    lo = hi = 0
    for n, stride in zip(arr.shape, arr.strides, strict=True):
        if stride < 0:
            lo += (n - 1) * stride
        else:
            hi += (n - 1) * stride
    return lo, hi + arr.itemsize


def _wrap(
    block: Block, shape: tuple[int, ...], dtype: np.dtype[Any], order: Literal["C", "F"] = "C"
) -> SharedArray:
    buf = block.buf
    arr: SharedArray = np.ndarray(shape, dtype=dtype, buffer=buf, order=order).view(SharedArray)
    arr._block = block
    arr._base_addr = np.frombuffer(buf, np.uint8).ctypes.data
    return arr


_dtypes: dict[str, np.dtype[Any]] = {}
# Handles unpickled lately in this process: the Block (attached, its memory
# sliced) and its base address.  A worker that receives the same array again
# and again pays only for re-checking the generation.  Bounded; reset at fork.
_recent: dict[bytes, tuple[Block, int]] = {}
_RECENT_MAX = 512


def _forget_heap(heap_id: int) -> None:
    for handle, (block, _base) in list(_recent.items()):
        if block._heap_id == heap_id:
            _recent.pop(handle, None)


heap_mod.close_hooks.append(_forget_heap)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_recent.clear)


def _dtype_of(spec: Any) -> np.dtype[Any]:
    if type(spec) is str:
        dtype = _dtypes.get(spec)
        if dtype is None:
            dtype = np.dtype(spec)
            if len(_dtypes) < 1024:
                _dtypes[spec] = dtype
        return dtype
    out: np.dtype[Any] = np.dtype(spec)
    return out


def _block_for(handle: bytes) -> tuple[Block, int]:
    hit = _recent.get(handle)
    if hit is not None:
        block = hit[0]
        heap = block._heap
        if heap is not None and heap._alloc is not None and block._pos != _FREED:
            try:
                heap._validate(block)  # freed (and maybe reused) since: StaleHandleError
                return hit
            except StaleHandleError:
                del _recent[handle]
                raise
        del _recent[handle]
    block = _open_handle(handle)
    buf = block.buf  # attaches the heap and validates the generation
    entry = (block, np.frombuffer(buf, np.uint8).ctypes.data)
    if len(_recent) >= _RECENT_MAX:
        _recent.clear()
    _recent[handle] = entry
    return entry


def _rebuild(
    handle: bytes,
    offset: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: Any,
    writeable: bool,
) -> SharedArray:
    dtype = _dtype_of(dtype)
    if dtype.hasobject:
        # numpy would read the block's bytes as object pointers: a damaged or
        # hostile pickle must not get that far
        raise TypeError(f"dtype {dtype} holds Python objects, which cannot live in shared memory")
    block, base = _block_for(handle)
    # positional: numpy parses keywords for ~0.9 us more, a tenth of a queue get
    arr: SharedArray = np.ndarray.__new__(SharedArray, shape, dtype, block.buf, offset, strides)
    arr._block = block
    arr._base_addr = base
    if not writeable:
        arr.flags.writeable = False
    if (
        block.size >= POPULATE_MIN
        and (block.arena, block.offset, block.gen) not in block.heap._a().populated
    ):
        lo, hi = _extent(arr)
        if hi - lo >= POPULATE_MIN:
            _populate_once(block, base + offset + lo, hi - lo)
    return arr


def _populate_once(block: Block, address: int, length: int) -> None:
    """Pre-map the pages of [address, address+length) if this process has not yet."""
    global _populate_works
    if _populate_works is False:
        return
    # Remembered on the heap's allocator: a heap detached (its last array
    # gone) and attached again maps the memory afresh, and a fork child
    # starts with no page tables for shared mappings; both must populate.
    done = block.heap._a().populated
    key = (block.arena, block.offset, block.gen)
    with _populated_lock:
        if key in done:
            return
        done.add(key)
    start = address // PAGE_SIZE * PAGE_SIZE
    end = -(-(address + length) // PAGE_SIZE) * PAGE_SIZE
    ok = _libc.libc().madvise(start, end - start, _libc.MADV_POPULATE_READ) == 0
    if _populate_works is None:
        _populate_works = ok


def populate_for_write(block: Block) -> None:
    """Map a big block's pages writable in one system call before a copy fills it.

    A copy into pages this process has not mapped yet takes a page fault per
    page: a forked producer filling 16 MiB took 9-10 ms here, against 3.5-4.9
    ms with MADV_POPULATE_WRITE first (pages the heap kept resident after a
    free need only mapping; fresh ones are allocated in the same call).  Done
    once per block range and process, whatever the generation: a block
    allocated again at the same place is still mapped, and populating mapped
    pages again would cost half a copy.  A range given back to the kernel in
    between just faults again.
    """
    global _populate_works
    if block.size < POPULATE_MIN or _populate_works is False:
        return
    alloc = block.heap._a()
    key = (block.arena, block.offset, block.size)
    done = alloc.written
    if key in done:
        return
    with _populated_lock:
        if len(done) >= _WRITTEN_MAX:
            done.clear()
        done.add(key)
    start = np.frombuffer(block.buf, np.uint8).ctypes.data
    end = start + block.size
    start = -(-start // PAGE_SIZE) * PAGE_SIZE  # whole pages inside the block only
    end = end // PAGE_SIZE * PAGE_SIZE
    if end > start:
        ok = _libc.libc().madvise(start, end - start, _libc.MADV_POPULATE_WRITE) == 0
        if _populate_works is None:
            _populate_works = ok


def first_touch_method() -> str:
    """How arrays that arrive in a fresh process get their pages mapped, on this machine."""
    from .info import _probe_populate_read

    if _probe_populate_read():
        return (
            f"madvise(MADV_POPULATE_READ) for arrays >= {POPULATE_MIN >> 20} MiB arriving by pickle"
        )
    return "page faults (the kernel has no MADV_POPULATE_READ; Linux 5.14+ does)"


# --------------------------------------------------------------------------
# constructors (on a given heap; the module functions use the default heap)


def _dimension(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a dimension cannot be a bool")
    return operator.index(value)


def _shape(shape: int | Iterable[int]) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        dims: tuple[int, ...] = (int(shape),)
    else:
        try:
            dims = tuple(_dimension(d) for d in shape)  # type: ignore[union-attr]
        except TypeError:
            raise TypeError(f"shape must be an int or a sequence of ints, not {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimensions are not allowed: {dims}")
    return dims


def _nbytes(dims: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    return max(1, math.prod(dims) * dtype.itemsize)


def new_array(
    heap: Heap,
    shape: int | Iterable[int],
    dtype: Any = float,
    order: Literal["C", "F"] = "C",
    *,
    zero: bool = True,
) -> SharedArray:
    dims = _shape(shape)
    dt = np.dtype(dtype)
    if not dt.itemsize and dt.kind in "SU":
        dt = np.empty(0, dt).dtype  # numpy makes unsized strings one character wide
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects, which cannot live in shared memory")
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    nbytes = _nbytes(dims, dt)
    block = heap.alloc_zeroed(nbytes) if zero else heap.alloc(nbytes)
    return _wrap(block, dims, dt, order)


def heap_asarray(
    heap: Heap, array: Any, dtype: Any = None, *, writeable: bool = True
) -> SharedArray:
    if (
        isinstance(array, SharedArray)
        and array._in_block()
        and (dtype is None or np.dtype(dtype) == array.dtype)
        and array.heap is heap
    ):
        if writeable or not array.flags.writeable:
            return array  # already shared: no copy
        view: SharedArray = array.view()
        view.flags.writeable = False  # a read-only view of the same memory
        return view
    src = np.asarray(array, dtype=dtype)
    out = new_array(
        heap,
        src.shape,
        src.dtype,
        "F" if src.flags.f_contiguous and not src.flags.c_contiguous else "C",
        zero=False,
    )
    if out._block is not None:
        populate_for_write(out._block)
    copying.copyto(out, src)
    if not writeable:
        out.flags.writeable = False
    return out


def _default() -> Heap:
    from .shared_memory import default_heap

    heap = default_heap()
    assert heap is not None
    return heap


def ndarray(
    shape: int | Iterable[int], dtype: Any = float, order: Literal["C", "F"] = "C"
) -> SharedArray:
    """A zero-filled shared array on the default heap (free it with ``arr.free()``)."""
    return new_array(_default(), shape, dtype, order)


def zeros(
    shape: int | Iterable[int], dtype: Any = float, order: Literal["C", "F"] = "C"
) -> SharedArray:
    return new_array(_default(), shape, dtype, order)


def empty(
    shape: int | Iterable[int], dtype: Any = float, order: Literal["C", "F"] = "C"
) -> SharedArray:
    """Uninitialised, like numpy.empty (the memory may hold an earlier block's bytes)."""
    return new_array(_default(), shape, dtype, order, zero=False)


def full(
    shape: int | Iterable[int], fill_value: Any, dtype: Any = None, order: Literal["C", "F"] = "C"
) -> SharedArray:
    dt = np.asarray(fill_value).dtype if dtype is None else np.dtype(dtype)
    out = new_array(_default(), shape, dt, order, zero=False)
    out.fill(fill_value)
    return out


def asarray(array: Any, dtype: Any = None, *, writeable: bool = True) -> SharedArray:
    """One copy of ``array`` into shared memory (none if it is already a shared array)."""
    return heap_asarray(_default(), array, dtype, writeable=writeable)
