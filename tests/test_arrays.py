"""Shared numpy arrays: constructors, numpy semantics, pickling as handles, workers, lifetime.

Every array a test makes lives either on a manager's heap (``with
SharedMemoryManager() as smm``: gone at shutdown) or on this test process's
private default heap (see conftest), freed in a finally.  "No array bytes are
copied" is checked two ways: what multiprocessing would send
(``ForkingPickler.dumps``) is a few dozen bytes, and writes made by the
receiver are seen by the sender, which only aliasing explains.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import multiprocessing as mp
import os
import pickle
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import pytest

import sharedobj
from conftest import maps_for, remove_default_heap
from sharedobj import SharedArray, SharedMemoryManager, StaleHandleError, limits
from sharedobj.info import _probe_populate_read

METHODS = ["fork", "spawn", "forkserver"]
HANDLE_MAX = 256  # what a pickled array or view may weigh, whatever its size
MIB = 1 << 20


# ---------------------------------------------------------------------------
# helpers


def sent_size(obj: Any) -> int:
    """Bytes multiprocessing sends for ``obj`` (Pool, Process, Queue all use ForkingPickler)."""
    return len(bytes(ForkingPickler.dumps(obj)))


def segment_ids(arr: SharedArray) -> tuple[int, ...]:
    """The shmids of the segment (or span) holding ``arr``."""
    block = arr.block
    assert block is not None, "not a shared array"
    return tuple(block.heap._a()._ids[block.arena])


def is_private(result: Any) -> bool:
    """True if ``result`` lives in private memory (not in any heap block)."""
    return isinstance(result, np.ndarray) and getattr(result, "block", None) is None


class Api:
    """The array factories of one heap: a manager's, or the module functions on the default heap."""

    def __init__(self, kind: str, smm: SharedMemoryManager | None) -> None:
        self.kind = kind
        self.smm = smm
        self.made: list[SharedArray] = []

    @property
    def heap(self) -> sharedobj.Heap:
        if self.smm is not None:
            return self.smm.heap
        from sharedobj.shared_memory import default_heap

        heap = default_heap()
        assert heap is not None
        return heap

    def _src(self) -> Any:
        return self.smm if self.smm is not None else sharedobj

    def _keep(self, arr: SharedArray) -> SharedArray:
        if self.smm is None and all(arr is not m for m in self.made):
            self.made.append(arr)
        return arr

    def ndarray(self, *args: Any, **kwargs: Any) -> SharedArray:
        return self._keep(self._src().ndarray(*args, **kwargs))

    def zeros(self, *args: Any, **kwargs: Any) -> SharedArray:
        return self._keep(self._src().zeros(*args, **kwargs))

    def empty(self, *args: Any, **kwargs: Any) -> SharedArray:
        return self._keep(self._src().empty(*args, **kwargs))

    def full(self, *args: Any, **kwargs: Any) -> SharedArray:
        return self._keep(self._src().full(*args, **kwargs))

    def asarray(self, array: Any, *args: Any, **kwargs: Any) -> SharedArray:
        out = self._src().asarray(array, *args, **kwargs)
        if out is array or (isinstance(array, SharedArray) and out.block is array.block):
            return out  # no new block: the caller owns it
        return self._keep(out)

    def close(self) -> None:
        for arr in self.made:
            with contextlib.suppress(StaleHandleError):  # the test may have freed it
                arr.free()
        self.made.clear()


@pytest.fixture(params=["manager", "module"])
def api(request: pytest.FixtureRequest) -> Iterator[Api]:
    if request.param == "manager":
        with SharedMemoryManager() as smm:
            yield Api("manager", smm)
    else:
        factories = Api("module", None)
        try:
            yield factories
        finally:
            factories.close()


@pytest.fixture
def smm() -> Iterator[SharedMemoryManager]:
    with SharedMemoryManager() as manager:
        yield manager


# ---------------------------------------------------------------------------
# 1. constructors and numpy semantics


def test_factories_make_real_numpy_arrays_in_shared_memory(api: Api) -> None:
    made = {
        "ndarray": api.ndarray((3, 4)),
        "ndarray_kw": api.ndarray(shape=(3, 4), dtype=float, order="C"),
        "zeros": api.zeros((3, 4)),
        "empty": api.empty((3, 4)),
        "full": api.full((3, 4), 7.5),
        "asarray": api.asarray(np.arange(12.0).reshape(3, 4)),
    }
    for name, arr in made.items():
        assert isinstance(arr, np.ndarray), name
        assert isinstance(arr, SharedArray), name
        assert arr.shape == (3, 4) and arr.dtype == np.float64, name
        assert arr.flags.c_contiguous and arr.flags.writeable, name
        assert arr.block is not None and arr.heap is api.heap, name
    assert not made["ndarray"].any() and not made["zeros"].any()
    assert (made["full"] == 7.5).all()
    assert np.array_equal(made["asarray"], np.arange(12.0).reshape(3, 4))
    # distinct blocks, no aliasing between them
    blocks = {(a.block.arena, a.block.offset) for a in made.values() if a.block is not None}
    assert len(blocks) == len(made)

    assert api.zeros(5).shape == (5,)
    assert api.zeros(np.int64(5)).shape == (5,)
    assert api.zeros([2, 3], dtype=np.int32).dtype == np.int32
    full_int = api.full(4, 3)
    assert full_int.dtype == np.asarray(3).dtype and (full_int == 3).all()
    full_typed = api.full((2, 2), 1, dtype=np.float32)
    assert full_typed.dtype == np.float32 and (full_typed == 1).all()


def test_asarray_copies_once_and_never_when_already_shared(api: Api) -> None:
    src = np.arange(100, dtype=np.int64)
    out = api.asarray(src)
    assert np.array_equal(out, src) and not np.shares_memory(out, src)
    src[:] = -1  # one copy, taken at call time
    assert np.array_equal(out, np.arange(100))

    assert api.asarray(out) is out  # already shared on this heap: no copy
    view = out[10:50:2]
    again = api.asarray(view)
    assert np.shares_memory(again, out) and again.block is out.block
    converted = api.asarray(out, dtype=np.float32)  # another dtype needs a copy
    assert converted.dtype == np.float32 and not np.shares_memory(converted, out)
    assert np.array_equal(converted, np.arange(100, dtype=np.float32))
    from_list = api.asarray([[1, 2], [3, 4]])
    assert from_list.block is not None and from_list.tolist() == [[1, 2], [3, 4]]


def test_asarray_from_another_heap_copies_into_this_one(smm: SharedMemoryManager) -> None:
    elsewhere = sharedobj.asarray(np.arange(10.0))
    try:
        here = smm.asarray(elsewhere)
        assert here.heap is smm.heap and not np.shares_memory(here, elsewhere)
        assert np.array_equal(here, elsewhere)
        back = sharedobj.asarray(here)  # and the other way round
        try:
            assert back.heap is not smm.heap and not np.shares_memory(back, here)
        finally:
            back.free()
    finally:
        elsewhere.free()


def test_numpy_functions_work(api: Api) -> None:
    rng = np.random.default_rng(7)
    data = rng.permutation(24).astype(np.float64).reshape(4, 6)
    a = api.asarray(data)
    assert a.sum() == data.sum() and np.sum(a) == data.sum()
    assert a.mean() == pytest.approx(data.mean())
    assert np.array_equal(np.dot(a, a.T), np.dot(data, data.T))
    assert np.array_equal(a @ a.T, data @ data.T)
    assert np.array_equal(a[[0, 2], [1, 3]], data[[0, 2], [1, 3]])
    assert np.array_equal(a[a > 10], data[data > 10])
    assert np.array_equal(a.argsort(axis=None), data.argsort(axis=None))
    assert np.array_equal(a.reshape(6, 4), data.reshape(6, 4))
    assert np.array_equal(a.T, data.T) and np.array_equal(a.ravel(), data.ravel())

    a.sort(axis=1)  # in place, in shared memory
    data.sort(axis=1)
    assert np.array_equal(a, data) and a.block is not None

    out = np.add(a, 1, out=a)
    assert out is a and np.array_equal(a, data + 1)
    np.multiply(a[:, :3], 2, out=a[:, :3])
    assert np.array_equal(a[:, :3], (data[:, :3] + 1) * 2)

    as32 = a.astype(np.float32)  # a private copy
    assert as32.dtype == np.float32 and is_private(as32) and not np.shares_memory(as32, a)
    as32[0, 0] = -1
    assert a[0, 0] != -1


VIEWS: dict[str, Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]] = {
    "slice": lambda x: x[1:3],
    "strided": lambda x: x[::2, 1::2],
    "negative": lambda x: x[::-1, ::-3],
    "transpose": lambda x: x.T,
    "reshape": lambda x: x.reshape(2, 12),
    "ravel": lambda x: x.ravel(),
    "row": lambda x: x[2],
    "column": lambda x: x[:, 3],
    "newaxis": lambda x: x[None, :, 1],
    "ellipsis": lambda x: x[...],
    "swapaxes": lambda x: x.reshape(2, 3, 4).swapaxes(0, 2)[1],
    "view_dtype": lambda x: x.view(np.int64)[1:, :2],
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_views_reshapes_and_slices_stay_shared(api: Api, name: str) -> None:
    a = api.zeros((4, 6))
    index = np.arange(a.size, dtype=np.int64).reshape(a.shape)
    view = VIEWS[name](a)
    positions = VIEWS[name](index).ravel()
    assert isinstance(view, SharedArray)
    assert np.shares_memory(view, a) and view.block is a.block
    assert sent_size(view) < HANDLE_MAX
    view[...] = 7  # write through the view: seen in the base, exactly where the view is
    flat = a.view(np.int64).ravel() if name == "view_dtype" else a.ravel()
    assert (flat[positions] == 7).all()
    assert np.count_nonzero(flat) == len(set(positions.tolist()))
    a[...] = 0
    assert not view.any()


def _computed(a: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {
        "add": a + 1,
        "ufunc": np.sqrt(a),
        "sum_axis": a.sum(axis=0),
        "cumsum": a.cumsum(),
        "concatenate": np.concatenate([a, a]),
        "where": np.where(a > 3, a, 0),
        "matmul": a @ a.T,
        "dot": np.dot(a, a.T),
        "copy": a.copy(),
        "astype": a.astype(np.float32),
        "fancy": a[[0, 2]],
        "mask": a[a > 3],
        "sort": np.sort(a),
        "argsort": a.argsort(),
        "take": a.take([0, 1]),
        "flatten": a.flatten(),
        "reshape_copy": a.T.reshape(12),
    }


def test_computed_results_are_private(api: Api) -> None:
    a = api.asarray(np.arange(12.0).reshape(3, 4))
    for name, result in _computed(a).items():
        assert is_private(result), name
        assert not np.shares_memory(result, a), name
        # a private result pickles by value and unpickles as a plain ndarray
        clone = pickle.loads(pickle.dumps(result))
        assert type(clone) is np.ndarray and np.array_equal(clone, result), name


def test_reductions_return_numpy_scalars(smm: SharedMemoryManager) -> None:
    a = smm.asarray(np.arange(12.0))
    plain = np.arange(12.0)
    for name in ("sum", "mean", "max", "min", "std", "any", "all"):
        got, want = getattr(a, name)(), getattr(plain, name)()
        assert type(got) is type(want), (name, type(got))
    assert type(np.sum(a)) is np.float64
    assert {a.sum(): "hashable"}[66.0] == "hashable"


PLAIN_UFUNC_RESULTS = ["add", "ufunc", "sum_axis", "cumsum", "concatenate", "where", "matmul"]


def test_ufunc_results_are_plain_ndarrays(smm: SharedMemoryManager) -> None:
    a = smm.asarray(np.arange(12.0).reshape(3, 4))
    computed = _computed(a)
    for name in PLAIN_UFUNC_RESULTS:
        assert type(computed[name]) is np.ndarray, name


def test_all_computed_results_are_private(smm: SharedMemoryManager) -> None:
    # copies made outside ufuncs may keep the subclass, but never claim a block
    a = smm.asarray(np.arange(12.0).reshape(3, 4))
    wrong = {
        n: type(r).__name__
        for n, r in _computed(a).items()
        if getattr(r, "block", None) is not None
    }
    assert not wrong, wrong
    for name, r in _computed(a).items():
        if isinstance(r, np.ndarray) and r.size:
            assert len(pickle.dumps(r)) >= r.nbytes, name  # pickled by value
        if isinstance(r, SharedArray):
            with pytest.raises(ValueError, match="not in shared memory"):
                r.free()


def test_free_on_a_private_copy_leaves_the_original_alone(smm: SharedMemoryManager) -> None:
    a = smm.full(16, 3.0)
    handle = pickle.dumps(a)
    copy = a.copy()
    with pytest.raises(ValueError, match="not in shared memory"):
        copy.free()
    again = pickle.loads(handle)  # StaleHandleError if the copy freed a's block
    assert np.shares_memory(again, a)


DTYPES: list[Any] = [
    np.float64,
    np.float32,
    np.float16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
    np.complex128,
    np.dtype([("id", "<i4"), ("pos", "<f8", (3,)), ("tag", "S4")]),
    np.dtype("datetime64[ns]"),
    np.dtype("timedelta64[s]"),
    np.dtype("U5"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).str)
def test_dtypes(api: Api, dtype: Any) -> None:
    dt = np.dtype(dtype)
    a = api.zeros((3, 5), dtype=dt)
    assert a.dtype == dt and a.nbytes == 15 * dt.itemsize
    assert a.tobytes() == bytes(a.nbytes)
    values = np.zeros((3, 5), dtype=dt)
    if dt.names:
        values["id"] = np.arange(15).reshape(3, 5)
        values["pos"][..., 1] = 0.5
        values["tag"] = b"ab"
    elif dt.kind == "M":
        values = np.datetime64("2024-01-01", "ns") + np.arange(15).reshape(3, 5).astype("m8[ns]")
    elif dt.kind == "U":
        values[:] = "héllo"
    elif dt.kind == "b":
        values[::2] = True
    else:
        values = np.arange(15).reshape(3, 5).astype(dt)
    a[...] = values
    assert a.tobytes() == values.tobytes()
    clone = pickle.loads(pickle.dumps(a))
    assert clone.dtype == dt and np.shares_memory(clone, a)
    assert clone.tobytes() == values.tobytes()
    copy = api.asarray(values)
    assert copy.dtype == dt and copy.tobytes() == values.tobytes()
    filled = api.full(4, values.flat[1], dtype=dt)
    assert (filled == values.flat[1]).all()


@pytest.mark.parametrize(
    "dtype", [object, np.dtype([("a", "i4"), ("o", "O")])], ids=["object", "struct_object"]
)
def test_object_dtype_is_refused(api: Api, dtype: Any) -> None:
    for make in (api.ndarray, api.zeros, api.empty):
        with pytest.raises(TypeError, match="object"):
            make(3, dtype=dtype)
    with pytest.raises(TypeError, match="object"):
        api.full(3, None, dtype=dtype)
    with pytest.raises(TypeError, match="object"):
        api.asarray(np.array([1, "a", None], dtype=object))


def test_fortran_order(api: Api) -> None:
    for make in (api.ndarray, api.zeros, api.empty):
        f = make((3, 4), order="F")
        assert f.flags.f_contiguous and not f.flags.c_contiguous
    f = api.full((3, 4), 2.0, order="F")
    assert f.flags.f_contiguous and (f == 2.0).all()
    f[...] = np.arange(12.0).reshape(3, 4)
    assert f.block is not None
    assert bytes(f.block.buf[: f.nbytes]) == np.arange(12.0).reshape(3, 4).tobytes(order="F")
    clone = pickle.loads(pickle.dumps(f))
    assert clone.flags.f_contiguous and np.shares_memory(clone, f)
    assert np.array_equal(clone, f)
    fsrc = np.asfortranarray(np.arange(6).reshape(2, 3))
    copied = api.asarray(fsrc)
    assert copied.flags.f_contiguous and np.array_equal(copied, fsrc)
    assert f.T.flags.c_contiguous and f.T.block is f.block


def test_zero_d_and_size_zero_arrays(api: Api) -> None:
    scalar = api.full((), 4.5)
    assert scalar.shape == () and scalar.ndim == 0 and scalar.block is not None
    scalar[()] = 1.5
    clone = pickle.loads(pickle.dumps(scalar))
    assert clone.shape == () and float(clone) == 1.5
    clone[()] = 2.5
    assert float(scalar) == 2.5 and scalar.item() == 2.5
    assert api.zeros(()).item() == 0.0
    assert api.asarray(np.float32(3)).shape == ()

    for shape in [0, (0,), (0, 3), (3, 0, 2)]:
        for make in (api.ndarray, api.zeros, api.empty):
            e = make(shape)
            assert e.size == 0 and e.shape == ((shape,) if isinstance(shape, int) else shape)
            assert e.block is not None and e.sum() == 0
            assert sent_size(e) < HANDLE_MAX
            back = pickle.loads(pickle.dumps(e))
            assert back.shape == e.shape and back.size == 0
    empty_copy = api.asarray(np.zeros((0, 4), dtype=np.int16))
    assert empty_copy.shape == (0, 4) and empty_copy.dtype == np.int16
    assert api.full(0, 1.0).size == 0


@pytest.mark.parametrize(
    ("shape", "error"),
    [
        (-1, ValueError),
        ((2, -3), ValueError),
        ("abc", TypeError),
        (2.5, TypeError),
        ((2, 1.5), TypeError),
        (None, TypeError),
        (True, TypeError),
        ((2, True), TypeError),
        (object(), TypeError),
    ],
)
def test_bad_shapes_raise_clear_errors(api: Api, shape: Any, error: type[Exception]) -> None:
    for make in (api.ndarray, api.zeros, api.empty):
        with pytest.raises(error, match=r"shape|dimension"):
            make(shape)
    with pytest.raises(error, match=r"shape|dimension"):
        api.full(shape, 1.0)


def test_bad_dtype_and_order_raise_clear_errors(api: Api) -> None:
    with pytest.raises(TypeError, match="not understood"):
        api.zeros(3, dtype="no-such-type")
    with pytest.raises(TypeError):
        api.zeros(3, dtype=42)
    for order in ("K", "A", "x", None):
        with pytest.raises(ValueError, match="order"):
            api.zeros(3, order=order)
    with pytest.raises((TypeError, ValueError)):
        api.asarray([[1, 2], [3]])  # ragged: numpy refuses it


# ---------------------------------------------------------------------------
# 2. pickling sends a handle


def test_a_one_gib_array_and_its_views_pickle_as_handles(api: Api) -> None:
    big = api.zeros(1 << 30, dtype=np.uint8)  # never touched: noreserve, nothing resident
    square = big.reshape(1 << 15, 1 << 15)
    views: dict[str, np.ndarray[Any, Any]] = {
        "whole": big,
        "reversed": big[::-1],
        "strided": big[3::4096],
        "transposed": square.T,
        "2d_negative": square[::-2, 5::7],
        "float_view": big.view(np.float64)[::-3],
    }
    for name, view in views.items():
        for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
            assert len(pickle.dumps(view, protocol=protocol)) < HANDLE_MAX, (name, protocol)
        assert sent_size(view) < HANDLE_MAX, name
    # unpickled views (small extents: unpickling a huge extent pre-faults it) alias the block
    small_views = [big[10:1000:3], big[5000:100:-7], square[:4, :8].T, square[2:6, ::-4096]]
    for i, view in enumerate(small_views, start=1):
        back = pickle.loads(pickle.dumps(view))
        assert back.shape == view.shape and back.strides == view.strides
        assert np.shares_memory(back, big) and back.block is not None
        back[...] = i
        assert (view == i).all()
    for shmid in segment_ids(big):
        info = limits.segment_info(shmid)
        assert info is not None
        if info.rss is not None:
            assert info.rss < 64 * MIB, "pickling a big array must not touch its pages"


def test_unpickled_views_alias_the_same_memory(api: Api) -> None:
    a = api.zeros((6, 8), dtype=np.int32)
    views = [a, a[1:5, ::2], a.T, a[::-1, ::-3], a.reshape(48)[5:40:7], a[2], a[..., 3]]
    for i, view in enumerate(views, start=1):
        data = pickle.dumps(view)
        assert len(data) < HANDLE_MAX
        back = pickle.loads(data)
        assert isinstance(back, SharedArray) and back.dtype == view.dtype
        assert back.shape == view.shape and back.strides == view.strides
        back[...] = i
        assert (view == i).all()
        view[...] = -i
        assert (back == -i).all()


# ---------------------------------------------------------------------------
# 3 + 4. Pool, ProcessPoolExecutor, Process, Queue under every start method
# (workers are module-level functions so spawn and forkserver children import them)


ROW = MIB // 8  # float64 items in a 1 MiB row


def _mapping_counts(*arrays: SharedArray) -> list[int]:
    return [maps_for(shmid) for arr in arrays for shmid in segment_ids(arr)]


def _pool_task(args: tuple[Any, ...]) -> tuple[SharedArray, dict[str, Any]]:
    smm, before, after, huge, module_arr, i = args
    before[:] = i + 1
    after[:] = 10 * (i + 1)
    huge[:] = 100 * (i + 1)
    module_arr[i] = i + 1
    made = smm.full(ROW, float(i))  # made in the worker, on the manager's heap
    info = {
        "pid": os.getpid(),
        "maps": _mapping_counts(before, after, huge),
        "module_maps": _mapping_counts(module_arr),
        "result_size": sent_size(made),
        "shared": [isinstance(x, SharedArray) and x.block is not None for x in args[1:5]],
    }
    return made, info


@pytest.mark.parametrize("method", METHODS)
def test_pool_map_moves_handles_both_ways(smm: SharedMemoryManager, method: str) -> None:
    ntasks = 8
    before = smm.zeros((ntasks, ROW))  # exists before the pool starts
    module_arr = sharedobj.zeros(ntasks, dtype=np.int64)
    try:
        with mp.get_context(method).Pool(2) as pool:
            after = smm.zeros((ntasks, ROW))  # after the pool started: same arena
            huge = smm.zeros((ntasks, 3 * ROW))  # after, and over 16 MiB: a new segment
            tasks = [(smm, before[i], after[i], huge[i], module_arr, i) for i in range(ntasks)]
            for task in tasks:
                assert sent_size(task) < 4 * HANDLE_MAX  # five handles, no array data
            results = pool.map(_pool_task, tasks, chunksize=1)
            again = pool.map(_pool_task, tasks, chunksize=1)  # later tasks, same mappings
            pool.close()
            pool.join()
        # the workers' writes are visible here: they wrote into our memory
        for i in range(ntasks):
            assert (before[i] == i + 1).all() and (after[i] == 10 * (i + 1)).all()
            assert (huge[i] == 100 * (i + 1)).all()
        assert module_arr.tolist() == list(range(1, ntasks + 1))
        per_pid: dict[int, list[list[int]]] = {}
        for _made, info in results + again:
            assert info["shared"] == [True] * 4
            assert info["result_size"] < HANDLE_MAX
            per_pid.setdefault(info["pid"], []).append(info["maps"] + info["module_maps"])
        assert max(len(v) for v in per_pid.values()) >= 2
        for pid, counts in per_pid.items():
            assert all(c == [1] * len(c) for c in counts), (pid, counts)
        # results made in the workers came back shared, on the manager's heap
        for i, (made, _info) in enumerate(results):
            assert isinstance(made, SharedArray) and made.heap is smm.heap
            assert made.shape == (ROW,) and (made == float(i)).all()
            assert sent_size(made) < HANDLE_MAX
            made[0] = -1.0
            assert pickle.loads(pickle.dumps(made))[0] == -1.0
    finally:
        module_arr.free()


def _executor_task(smm: SharedMemoryManager, view: SharedArray, i: int) -> SharedArray:
    view[...] = i
    out = smm.asarray(view * 2)  # one copy into the manager's heap, returned as a handle
    assert sent_size(out) < HANDLE_MAX
    return out


@pytest.mark.parametrize("method", METHODS)
def test_process_pool_executor(smm: SharedMemoryManager, method: str) -> None:
    a = smm.zeros((6, ROW), dtype=np.float32)
    ctx = mp.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        views = [a[i, ::-1] for i in range(6)]
        assert all(sent_size(v) < HANDLE_MAX for v in views)
        futures = [pool.submit(_executor_task, smm, v, i + 1) for i, v in enumerate(views)]
        outs = [f.result(timeout=120) for f in futures]
        mapped = list(pool.map(_executor_task, [smm] * 2, [a[0, :8], a[1, :8]], [7, 8]))
    for i, out in enumerate(outs):
        assert (a[i, 8:] == i + 1).all()
        assert isinstance(out, SharedArray) and out.heap is smm.heap
        assert out.dtype == np.float32 and (out == 2 * (i + 1)).all()
    assert (a[0, :8] == 7).all() and (mapped[1] == 16).all()


def _process_main(
    smm: Any, arg: SharedArray, readonly: SharedArray, inbox: Any, outbox: Any
) -> None:
    try:
        arg[...] = 5
        queued = inbox.get(timeout=60)
        queued[...] = 6
        try:
            readonly[0] = 1
            ro_write = "allowed"
        except ValueError:
            ro_write = "ValueError"
        made = smm.full((4, 4), 9, dtype=np.int16)
        outbox.put(
            {
                "made": made,
                "made_size": sent_size(made),
                "queued_shared": isinstance(queued, SharedArray) and queued.block is not None,
                "ro_writeable": bool(readonly.flags.writeable),
                "ro_write": ro_write,
                "ro_sum": int(readonly.sum()),
            }
        )
    except BaseException as exc:
        outbox.put({"error": repr(exc)})


@pytest.mark.parametrize("method", METHODS)
def test_process_arguments_and_queues(smm: SharedMemoryManager, method: str) -> None:
    ctx = mp.get_context(method)
    a = smm.zeros(2 * ROW)
    readonly = smm.asarray(np.arange(100), writeable=False)
    inbox, outbox = ctx.Queue(), ctx.Queue()
    args = (smm, a[::2], readonly, inbox, outbox)
    assert sent_size(args[:3]) < 3 * HANDLE_MAX
    proc = ctx.Process(target=_process_main, args=args)
    proc.start()
    try:
        queued = a[1::2]
        assert sent_size(queued) < HANDLE_MAX
        inbox.put(queued)
        report = outbox.get(timeout=60)
    finally:
        proc.join(60)
    assert proc.exitcode == 0 and "error" not in report, report
    assert (a[::2] == 5).all() and (a[1::2] == 6).all()
    assert report["queued_shared"]
    assert (report["ro_writeable"], report["ro_write"]) == (False, "ValueError")
    assert report["ro_sum"] == sum(range(100))
    made = report["made"]
    assert isinstance(made, SharedArray) and made.heap is smm.heap
    assert made.dtype == np.int16 and (made == 9).all() and report["made_size"] < HANDLE_MAX


# ---------------------------------------------------------------------------
# 5. freeing, shutdown, read-only


def test_free_releases_the_memory(smm: SharedMemoryManager) -> None:
    run = smm.full(4 * ROW, 1.0)  # a 4 MiB run: freeing gives its pages back
    (run_id,) = segment_ids(run)
    info = limits.segment_info(run_id)
    assert info is not None
    if info.rss is not None:
        assert info.rss >= 4 * MIB
    used = smm.heap.stats()["used_bytes"]
    handle = pickle.dumps(run[::3])
    run.free()
    assert smm.heap.stats()["used_bytes"] <= used - 4 * MIB
    # kept resident for the next big array (no page faults), until released
    assert smm.heap.stats()["kept_resident_bytes"] >= 4 * MIB
    assert smm.heap.release_memory() >= 4 * MIB
    assert smm.heap.stats()["kept_resident_bytes"] == 0
    info = limits.segment_info(run_id)
    if info is not None and info.rss is not None:
        assert info.rss < 4 * MIB
    with pytest.raises(StaleHandleError):
        pickle.loads(handle)
    with pytest.raises(StaleHandleError):
        run.free()

    huge = smm.full(3 * 8 * ROW, 1.0)  # 24 MiB: a segment of its own
    huge_ids = segment_ids(huge)
    huge.free()
    del huge
    gc.collect()
    assert all(limits.segment_info(shmid) is None for shmid in huge_ids)

    mod = sharedobj.full(1000, 2.0)
    mod_handle = pickle.dumps(mod)
    mod.free()
    with pytest.raises(StaleHandleError):
        pickle.loads(mod_handle)

    with pytest.raises(ValueError, match="not in shared memory"):
        np.ndarray.view(np.zeros(3), SharedArray).free()


def test_shutdown_releases_everything() -> None:
    smm = SharedMemoryManager()
    smm.start()
    try:
        arrays = [smm.zeros(10), smm.full(2 * ROW, 1.0), smm.zeros(3 * 8 * ROW)]
        ids = {smm.heap.id} | {s for arr in arrays for s in segment_ids(arr)}
        assert all(limits.segment_info(s) is not None for s in ids)
    finally:
        smm.shutdown()
    with pytest.raises(RuntimeError, match="not started"):
        smm.zeros(3)
    del arrays
    gc.collect()
    assert all(limits.segment_info(s) is None for s in ids)


USE_AFTER_RELEASE = r"""
import gc, json, pickle, sys
import numpy as np
import sharedobj
from sharedobj import SharedMemoryManager

out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except Exception as exc:
        out[name] = type(exc).__name__
    print(name, out[name], file=sys.stderr, flush=True)

smm = SharedMemoryManager()
smm.start()
small, run, huge = smm.full(16, 1.0), smm.full(2 * 131072, 1.0), smm.full(3 * 1048576, 1.0)
views = [small[::2], run[100:], huge[::-5], huge.T]
pickles = [pickle.dumps(v) for v in views]
for arr in (small, run, huge):
    arr.free()
for i, v in enumerate(views):
    attempt(f"free_write_{i}", lambda v=v: v.fill(7.0))
    attempt(f"free_read_{i}", lambda v=v: float(v.sum()))
    attempt(f"free_unpickle_{i}", lambda p=pickles[i]: pickle.loads(p))
for i, arr in enumerate((small, run, huge)):
    attempt(f"freed_base_{i}", lambda a=arr: float((a + 1).sum()))
    attempt(f"double_free_{i}", arr.free)
del small, run, huge
gc.collect()

live = [smm.full(16, 1.0), smm.full(2 * 131072, 1.0), smm.full(3 * 1048576, 1.0)]
lviews = [a[1:] for a in live]
lpickles = [pickle.dumps(v) for v in lviews]
smm.shutdown()
for i, v in enumerate(lviews):
    attempt(f"shutdown_write_{i}", lambda v=v: v.fill(3.0))
    attempt(f"shutdown_read_{i}", lambda v=v: float(v.sum()))
    attempt(f"shutdown_unpickle_{i}", lambda p=lpickles[i]: pickle.loads(p))
    attempt(f"shutdown_free_{i}", live[i].free)
attempt("shutdown_new", lambda: smm.zeros(3))

mod = sharedobj.full((3, 1048576), 2.0)
mview = mod[:, ::3]
mod.free()
attempt("module_write", lambda: mview.fill(1.0))
attempt("module_read", lambda: float(mview.sum()))
del mod, mview
gc.collect()
print(json.dumps(out))
"""


@pytest.fixture
def fresh_default_key() -> Iterator[int]:
    """A default-heap key for a subprocess; the heap it makes there is removed afterwards."""
    key = 0x5000_0000 | secrets.randbelow(0x0FFF_FFFF)
    yield key
    remove_default_heap(key)


def test_use_after_free_or_shutdown_never_crashes(fresh_default_key: int) -> None:
    env = dict(os.environ, SHAREDOBJ_DEFAULT_KEY=str(fresh_default_key))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(USE_AFTER_RELEASE)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode != -signal.SIGSEGV, f"segfault:\n{proc.stderr}"
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}:\n{proc.stderr}"
    assert proc.returncode == 0, proc.stderr
    out: dict[str, str] = json.loads(proc.stdout.splitlines()[-1])
    for i in range(4):
        assert out[f"free_unpickle_{i}"] == "StaleHandleError"
        assert out[f"free_write_{i}"] in ("ok", "StaleHandleError", "ValueError")
    for i in range(3):
        assert out[f"double_free_{i}"] == "StaleHandleError"
        assert out[f"shutdown_unpickle_{i}"] in ("FileNotFoundError", "StaleHandleError")
    assert out["shutdown_new"] == "RuntimeError"


def _check_readonly(arr: SharedArray) -> tuple[bool, str]:
    try:
        arr[0] = 1
    except ValueError:
        return bool(arr.flags.writeable), "ValueError"
    return bool(arr.flags.writeable), "written"


def test_readonly_arrays(api: Api) -> None:
    ro = api.asarray(np.arange(10), writeable=False)
    assert ro.block is not None and not ro.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        ro[0] = 5
    with pytest.raises(ValueError, match="read-only"):
        np.add(ro, 1, out=ro)
    for view in (ro[::2], ro[::-1], ro.reshape(2, 5).T):
        assert not view.flags.writeable
        back = pickle.loads(pickle.dumps(view))
        assert not back.flags.writeable and np.shares_memory(back, ro)
        with pytest.raises(ValueError, match="read-only"):
            back[0] = 1
    assert ro.tolist() == list(range(10))
    assert (ro + 1).flags.writeable  # computed results are ordinary arrays


def test_readonly_asarray_of_an_already_shared_array(smm: SharedMemoryManager) -> None:
    x = smm.zeros(10)
    ro = smm.asarray(x, writeable=False)
    assert x.flags.writeable  # the original stays writeable
    assert np.shares_memory(ro, x)  # no copy
    with pytest.raises(ValueError, match="read-only"):
        ro[0] = 5


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_readonly_array_stays_readonly_in_a_worker(smm: SharedMemoryManager, method: str) -> None:
    ro = smm.asarray(np.arange(10), writeable=False)
    with mp.get_context(method).Pool(1) as pool:
        writeable, outcome = pool.apply(_check_readonly, (ro[2:],))
        pool.close()
        pool.join()
    assert (writeable, outcome) == (False, "ValueError")
    assert ro.tolist() == list(range(10))


# ---------------------------------------------------------------------------
# 6. first touch in a fresh worker


def _smaps_rss(shmids: tuple[int, ...]) -> int:
    """Resident bytes of this process's mappings of ``shmids`` (/proc/self/smaps)."""
    rss = 0
    current = False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and ":" not in parts[0]:
                current = (
                    len(parts) >= 6 and parts[5].startswith("/SYSV") and int(parts[4]) in shmids
                )
            elif current and parts[0] == "Rss:":
                rss += int(parts[1]) * 1024
    return rss


def _first_touch_report(arr: SharedArray, small: SharedArray) -> dict[str, Any]:
    # ``arr`` was unpickled as this spawn child started, before this function ran
    from sharedobj import arrays

    return {
        "populate_works": arrays._populate_works,
        "rss": _smaps_rss(segment_ids(arr)),
        "nbytes": int(arr.nbytes),
        "small_rss": _smaps_rss(segment_ids(small)),
    }


def _first_touch_entry(queue: Any, arr: SharedArray, small: SharedArray) -> None:
    try:
        queue.put(_first_touch_report(arr, small))
    except BaseException as exc:
        queue.put({"error": repr(exc)})


@pytest.mark.skipif(not _probe_populate_read(), reason="the kernel has no MADV_POPULATE_READ")
def test_big_arrays_are_prefaulted_in_a_fresh_spawn_worker(smm: SharedMemoryManager) -> None:
    big = smm.full(3 * 8 * ROW, 1.0)  # 24 MiB, a segment of its own
    small = smm.zeros(4096)  # 32 KiB, below the threshold: not pre-faulted
    assert big.nbytes >= sharedobj.arrays.POPULATE_MIN > small.nbytes
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_first_touch_entry, args=(queue, big[::-1], small))
    proc.start()
    try:
        report = queue.get(timeout=60)
    finally:
        proc.join(60)
    assert proc.exitcode == 0 and "error" not in report, report
    assert report["populate_works"] is True
    assert report["rss"] >= report["nbytes"]
    big_ids, small_ids = segment_ids(big), segment_ids(small)
    assert set(big_ids).isdisjoint(small_ids)
    assert report["small_rss"] < report["nbytes"]  # only the big one was populated


def _free_in_child(data: bytes) -> None:
    pickle.loads(data).free()


def test_a_handle_unpickled_before_is_checked_again(smm: SharedMemoryManager) -> None:
    # Unpickling reuses the block of a handle seen lately in this process; its
    # generation must still be checked, or a block freed elsewhere would be read.
    arr = smm.zeros(1000)
    data = pickle.dumps(arr[10:20])
    assert float(pickle.loads(data).sum()) == 0.0  # now remembered in this process
    p = mp.get_context("fork").Process(target=_free_in_child, args=(pickle.dumps(arr),))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    with pytest.raises(sharedobj.StaleHandleError):
        pickle.loads(data)


def test_closing_a_heap_lets_go_of_the_blocks_unpickling_remembered() -> None:
    heap = sharedobj.Heap.create(1 << 20)
    try:
        block = heap.alloc(4096)
        view = sharedobj.arrays._wrap(block, (512,), np.dtype(np.float64))
        data = pickle.dumps(view)
        del view
        pickle.loads(data)  # remembered: holds the heap's arena mapping
        assert any(b._heap_id == heap.id for b, _ in sharedobj.arrays._recent.values())
    finally:
        heap.destroy()
    assert not any(b._heap_id == heap.id for b, _ in sharedobj.arrays._recent.values())


def _rss_after_populate_in_child(block: Any, conn: Any) -> None:
    """In a fork child (no page tables for the shared mappings yet): RSS before/after."""
    from sharedobj import arrays

    ids = tuple(block.heap._a()._ids[block.arena])
    before = _smaps_rss(ids)
    arrays.populate_for_write(block)
    conn.send((before, _smaps_rss(ids), (block.arena, block.offset, block.size)))
    conn.close()


@pytest.mark.skipif(not _probe_populate_read(), reason="the kernel has no MADV_POPULATE_*")
def test_copy_in_maps_a_big_block_for_writing_once_per_process(
    smm: SharedMemoryManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """heap_asarray (and the queue's copy-in) map a big block in one call, not a fault per page."""
    from sharedobj import arrays

    big = smm.heap.alloc(8 * MIB)
    try:
        big.buf[:] = b"\x01" * len(big.buf)  # resident in the segment, as a kept block is
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_rss_after_populate_in_child, args=(big, child))
        proc.start()
        before, after, key = parent.recv()
        proc.join(30)
        assert proc.exitcode == 0
        assert before < MIB  # a fork child maps shared pages lazily
        assert after >= 8 * MIB - 2 * 4096  # all of it, in one call
        # once per block range: the second time makes no system call
        calls: list[int] = []

        class CountingLibc:
            def madvise(self, *args: Any) -> int:
                calls.append(args[2])
                return 0

        monkeypatch.setattr(arrays._libc, "libc", lambda: CountingLibc())
        smm.heap._a().written.discard(key)
        arrays.populate_for_write(big)
        arrays.populate_for_write(big)
        assert calls == [arrays._libc.MADV_POPULATE_WRITE]
        small = smm.heap.alloc(64 * 1024)  # below POPULATE_MIN: faults are cheaper
        arrays.populate_for_write(small)
        assert len(calls) == 1
        smm.heap.free(small)
        # heap_asarray goes through it
        copied = arrays.heap_asarray(smm.heap, np.ones(2 * MIB // 8))
        assert len(calls) == 2 and (copied == 1).all()
        copied.free()
    finally:
        smm.heap.free(big)
