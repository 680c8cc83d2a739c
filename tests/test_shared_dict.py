"""SharedDict against the builtin dict and multiprocessing.Manager().dict().

Differential tests apply the same random operations to a plain dict and to
ours and compare every result; scenarios that make sense for a manager dict
run on ``multiprocessing.Manager().dict()`` too and must observe the same.
Concurrency tests use fork, spawn and forkserver children; crash tests kill a
forked child at every shared-memory write step of each operation (and raise
KeyboardInterrupt at every step in-process) and check the dict is consistent
and holds the before or the after contents.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from conftest import crash_points, run_killed_at
from sharedobj import SharedMemoryManager
from sharedobj.arrays import SharedArray
from sharedobj.containers import codec, shared_dict
from sharedobj.containers.shared_dict import SharedDict

METHODS = ["fork", "spawn", "forkserver"]


# ---------------------------------------------------------------------------
# the builtin dict as the oracle


def _outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", fn())
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


KEYS: list[Any] = [0, 1, 2, -1, 7, 1.0, True, 2.5, "a", "b", "é", b"a", None, (1, "a"), (1.0, "a")]
KEYS += [10**30, "k" * 60, ("t", 2, 3.5)]
VALUES: list[Any] = [0, 1, "x", "y" * 200, b"z", None, 3.25, (1, 2), [1, [2]], {"n": 1}, 10**40]


def _random_op(rng: random.Random) -> tuple[str, tuple[Any, ...]]:
    name = rng.choice(
        ["set"] * 6
        + ["get", "del", "pop", "popdef", "popitem", "setdefault", "in", "update", "len", "clear"]
        + ["iter", "items", "values", "eq", "get_missing", "ior"]
    )
    return name, (rng.choice(KEYS), rng.choice(VALUES), rng.choice(KEYS), rng.choice(VALUES))


def _apply(d: Any, name: str, args: tuple[Any, ...]) -> Any:
    k, v, k2, v2 = args
    if name == "set":
        d[k] = v
        return None
    if name == "get":
        return d[k]
    if name == "get_missing":
        return d.get(k, "dflt")
    if name == "del":
        del d[k]
        return None
    if name == "pop":
        return d.pop(k)
    if name == "popdef":
        return d.pop(k, "dflt")
    if name == "popitem":
        return d.popitem()
    if name == "setdefault":
        return d.setdefault(k, v)
    if name == "in":
        return k in d
    if name == "update":
        d.update({k: v, k2: v2}, extra=1)
        return None
    if name == "ior":
        d |= {k2: v}
        return None
    if name == "len":
        return len(d)
    if name == "clear":
        if random.Random(hash(repr(args))).random() < 0.3:
            d.clear()
        return None
    if name == "iter":
        return list(d)
    if name == "items":
        return list(d.items())
    if name == "values":
        return list(d.values())
    if name == "eq":
        return d == {k: v}
    raise AssertionError(name)


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_match_the_builtin_dict(smm: SharedMemoryManager, seed: int) -> None:
    rng = random.Random(seed)
    ours = smm.dict()
    plain: dict[Any, Any] = {}
    for n in range(400):
        name, args = _random_op(rng)
        expected = _outcome(lambda: _apply(plain, name, args))  # noqa: B023 - called at once
        got = _outcome(lambda: _apply(ours, name, args))  # noqa: B023
        assert got == expected, (n, name, args)
        assert list(ours.items()) == list(plain.items()), (n, name, args)
    assert ours._check() == []
    assert ours == plain and repr(ours) == repr(plain)
    # the types of equal keys are the first stored ones, as in a dict
    assert [type(k) for k in ours] == [type(k) for k in plain]


def test_many_keys_grow_shrink_and_stay_consistent(smm: SharedMemoryManager) -> None:
    ours = smm.dict()
    plain: dict[Any, Any] = {}
    for i in range(5000):
        key: Any = i if i % 3 else f"s{i}"
        ours[key] = plain[key] = "v" * (i % 70)
    for i in range(0, 5000, 2):
        key = i if i % 3 else f"s{i}"
        del ours[key], plain[key]
    for i in range(5000, 7000):
        ours[i] = plain[i] = i
    assert ours == plain and list(ours) == list(plain)
    assert ours._check() == []
    assert smm.heap.check() == []


def test_numeric_key_equivalence_follows_python(smm: SharedMemoryManager) -> None:
    d = smm.dict()
    d[1] = "int"
    d[1.0] = "float"
    d[True] = "bool"
    assert len(d) == 1 and list(d) == [1] and type(next(iter(d))) is int and d[1] == "bool"
    d[(1, 2.0)] = "t"
    assert d[(1.0, 2)] == "t" and d[(True, 2)] == "t"
    d[-0.0] = "zero"
    assert d[0] == "zero" and d[False] == "zero"
    d[2**70] = "big"
    assert d[float(2**70)] == "big"
    nan = float("nan")
    d[nan] = "nan"  # matched by bits: a dict would match only the same object
    assert d[nan] == "nan"
    for k in ["a", b"a", ("a",), None, -1, -2]:
        d[k] = repr(k)
    assert d["a"] == "'a'" and d[b"a"] == "b'a'" and d[-1] == "-1" and d[-2] == "-2"
    assert d._check() == []


def test_unhashable_keys_and_unpicklable_values(smm: SharedMemoryManager) -> None:
    d = smm.dict()
    with pytest.raises(TypeError, match="unhashable"):
        d[[1]] = 1
    with pytest.raises(TypeError, match="unhashable"):
        d[(1, [2])] = 1
    with pytest.raises(TypeError, match="unhashable"):
        _ = [1] in d
    k = 5

    def add(x: int) -> int:
        return x + k

    d["f"] = add
    d["lam"] = lambda x: x * 2
    assert d["f"](1) == 6 and d["lam"](4) == 8
    import threading

    with pytest.raises(TypeError, match="cannot store"):
        d["lock"] = threading.Lock()
    assert "lock" not in d and d._check() == []


def test_values_are_copies_like_a_manager_dict(smm: SharedMemoryManager, std_manager: Any) -> None:
    for d in (smm.dict(), std_manager.dict()):
        d["x"] = [1]
        d["x"].append(2)
        assert d["x"] == [1]
        d["m"] = {"a": []}
        got = d["m"]
        got["a"].append(1)
        assert d["m"] == {"a": []}
        assert type(d.copy()) is dict


def test_error_messages_match_the_builtin(smm: SharedMemoryManager) -> None:
    d = smm.dict()
    plain: dict[Any, Any] = {}
    for fn in (lambda x: x["nope"], lambda x: x.pop("nope"), lambda x: x.popitem()):
        with pytest.raises(KeyError) as ours:
            fn(d)
        with pytest.raises(KeyError) as theirs:
            fn(plain)
        assert str(ours.value) == str(theirs.value)
    for bad in ([1, 2, 3], [(1,)], 5):
        with pytest.raises((TypeError, ValueError)) as ours_e:
            d.update(bad)
        with pytest.raises((TypeError, ValueError)) as theirs_e:
            plain.update(bad)
        assert type(ours_e.value) is type(theirs_e.value)
    with pytest.raises(TypeError):
        SharedDict.create(smm.heap, 5)


def test_constructor_and_views(smm: SharedMemoryManager) -> None:
    d = smm.dict([("a", 1)], b=2)
    assert d == {"a": 1, "b": 2} and d != {"a": 1}
    assert d.keys() == {"a", "b"} and list(d.values()) == [1, 2]
    assert ("a", 1) in d.items() and list(reversed(d)) == ["b", "a"]
    assert (d | {"c": 3}) == {"a": 1, "b": 2, "c": 3}
    assert ({"z": 0} | d) == {"z": 0, "a": 1, "b": 2}
    assert repr(d) == "{'a': 1, 'b': 2}"
    assert d.get("zz") is None and d.setdefault("a", 9) == 1 and d.setdefault("n") is None
    e = smm.dict(d)
    assert e == d and e is not d


def test_numpy_values_are_shared_views(smm: SharedMemoryManager) -> None:
    d = smm.dict()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    d["a"] = a
    got = d["a"]
    assert isinstance(got, SharedArray) and got.block is not None
    assert got.dtype == np.float32 and got.shape == (3, 4) and (got == a).all()
    assert not got.flags.writeable  # stored values change only through d[k] = v
    assert d["a"].__array_interface__["data"][0] == got.__array_interface__["data"][0]
    f = np.asfortranarray(np.arange(6).reshape(2, 3))
    d["f"] = f
    assert (d["f"] == f).all()
    used = smm.heap.stats()
    d["a"] = np.zeros(1)  # the old array is freed; the old view stays readable
    assert got.shape == (3, 4)
    float(got.sum())
    popped = d.pop("f")
    assert type(popped) is np.ndarray and (popped == f).all()
    del d["a"]
    assert smm.heap.check() == [] and used is not None


# ---------------------------------------------------------------------------
# processes


def _counter_worker(d: SharedDict, n: int, use_lock: bool) -> None:
    for _ in range(n):
        if use_lock:
            with d.locked():
                d["c"] = d["c"] + 1
                d["pairs"] = d["pairs"] + 2
        else:
            d.update_with("c", lambda v: v + 1)
            d.update_with("other", lambda v: v + 1, default=0)


@pytest.mark.parametrize("method", METHODS)
def test_no_lost_update_across_processes(smm: SharedMemoryManager, method: str) -> None:
    d = smm.dict(c=0, pairs=0)
    ctx = mp.get_context(method)
    procs = [ctx.Process(target=_counter_worker, args=(d, 150, i % 2 == 0)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert d["c"] == 600 and d["pairs"] == 600 and d["other"] == 300
    assert d._check() == []


def _writer(d: SharedDict, rounds: int) -> None:
    rng = random.Random(1)
    for r in range(rounds):
        n = rng.choice([1, 5, 40, 300, 5000])
        d["v"] = (n, str(r % 10) * n)
        d[r % 50] = "x" * rng.choice([1, 47, 2000])
    d["done"] = True


def _reader(d: SharedDict) -> int:
    bad = 0
    seen = 0
    while not d.get("done", False):
        n, s = d["v"]
        if len(s) != n or len(set(s)) != 1:
            bad += 1
        seen += 1
    return bad


def test_no_torn_reads_under_a_writer(smm: SharedMemoryManager) -> None:
    d = smm.dict(v=(1, "0"))
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        readers = pool.apply_async(_reader, (d,))
        w = ctx.Process(target=_writer, args=(d, 1500))
        w.start()
        w.join(60)
        assert w.exitcode == 0
        assert readers.get(60) == 0
    assert d._check() == []


def _pool_task(args: tuple[SharedDict, int]) -> SharedDict:
    d, i = args
    d[f"w{i}"] = i * i
    return d


@pytest.mark.parametrize("method", METHODS)
def test_passes_through_pool_arguments_and_results(smm: SharedMemoryManager, method: str) -> None:
    d = smm.dict()
    assert len(pickle.dumps(d)) < 100
    assert pickle.loads(pickle.dumps(d)) is d  # one object per process
    with mp.get_context(method).Pool(2) as pool:
        results = pool.map(_pool_task, [(d, i) for i in range(8)])
    assert all(r is d for r in results)
    assert d == {f"w{i}": i * i for i in range(8)}


def test_same_scenario_as_a_manager_dict(smm: SharedMemoryManager, std_manager: Any) -> None:
    outcomes = []
    for d in (smm.dict(), std_manager.dict()):
        with mp.get_context("fork").Pool(2) as pool:
            pool.map(_pool_task, [(d, i) for i in range(6)]) if isinstance(d, SharedDict) else [
                d.__setitem__(f"w{i}", i * i) for i in range(6)
            ]
        d.update(a=1)
        outcomes.append((sorted(d.items(), key=repr), d.get("a"), d.pop("w0"), len(d)))
    assert outcomes[0] == outcomes[1]


def test_use_after_shutdown_raises_cleanly() -> None:
    manager = SharedMemoryManager()
    manager.start()
    d = manager.dict(a=1)
    manager.shutdown()
    try:
        d["a"] = "x" * 500  # needs an allocation: the heap is gone
    except Exception as exc:
        assert "heap" in str(exc) or isinstance(exc, (ValueError, FileNotFoundError))
    d.get("a")  # still-mapped memory: no crash


# ---------------------------------------------------------------------------
# the change log: what another process's write leaves of this process's read cache


def _twin(d: SharedDict) -> SharedDict:
    """Another view of ``d`` with a read cache and entry numbers of its own, as in another process.

    Far cheaper than a process per write burst; the tests with forked
    writers cover the same paths with real processes.
    """
    key = (SharedDict, d._block.handle.data)
    ref = codec._registry[key]
    try:
        twin: SharedDict = SharedDict._setup(d._block)
    finally:
        codec._registry[key] = ref  # pickling still gives the first view
    return twin


class _Spy:
    """Counts the calls of some SharedDict methods (the locked read paths)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.calls: dict[str, int] = dict.fromkeys(names, 0)
        for name in names:
            orig = getattr(SharedDict, name)

            def spy(self_: SharedDict, *a: Any, _orig: Any = orig, _name: str = name) -> Any:
                self.calls[_name] += 1
                return _orig(self_, *a)

            monkeypatch.setattr(SharedDict, name, spy)


def _write_items(d: SharedDict, items: list[tuple[Any, Any]]) -> None:
    for k, v in items:
        d[k] = v


def _in_child(target: Callable[..., Any], *args: Any) -> None:
    p = mp.get_context("fork").Process(target=target, args=args)
    p.start()
    p.join(60)
    assert p.exitcode == 0


@pytest.mark.parametrize("kind", ["int", "str"])
@pytest.mark.parametrize("writes", [1, 150])  # both ways of reading the log
def test_a_write_elsewhere_leaves_the_other_cached_reads_alone(
    smm: SharedMemoryManager, monkeypatch: pytest.MonkeyPatch, kind: str, writes: int
) -> None:
    keys: list[Any] = list(range(300)) if kind == "int" else [f"k{i}" for i in range(300)]
    d = smm.dict({k: "old" for k in keys})
    assert [d[k] for k in keys] == ["old"] * 300  # cached here
    changed = {keys[(i * 7) % 300]: f"new{i}" for i in range(writes)}
    _in_child(_write_items, d, list(changed.items()))
    spy = _Spy(monkeypatch, "_find", "_get_slow")
    got = {k: d[k] for k in keys}
    assert got == {k: changed.get(k, "old") for k in keys}
    # one locked catch-up, which re-read the logged entries only: no key was looked up
    assert spy.calls == {"_find": 0, "_get_slow": 1}


def test_own_writes_keep_the_own_cache(
    smm: SharedMemoryManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = smm.dict({i: i for i in range(10)})
    assert [d[i] for i in range(10)] == list(range(10))
    spy = _Spy(monkeypatch, "_get_slow")
    d[3] = "three"
    d[20] = 20  # a key this process never read: nothing to update
    assert [d[i] for i in range(10)] == [0, 1, 2, "three", *range(4, 10)]
    assert spy.calls["_get_slow"] == 0
    d[4] = [4]  # a mutable value is not cached as the caller's object
    got = d[4]
    assert got == [4] and spy.calls["_get_slow"] == 1
    got.append(5)
    assert d[4] == [4]


def _delete_and_reuse(d: SharedDict) -> None:
    del d["x"]  # the last entry: the next new key takes its number
    d["y"] = "y"
    del d["a"]  # a middle one


def test_an_entry_number_reused_elsewhere_is_not_written_through(smm: SharedMemoryManager) -> None:
    d = smm.dict()
    d["a"] = 1
    d["x"] = 1  # this process now knows both entry numbers
    _in_child(_delete_and_reuse, d)
    d["x"] = 2  # must not land in y's entry
    d["a"] = 3
    assert list(d.items()) == [("y", "y"), ("x", 2), ("a", 3)]
    assert d._check() == []


def test_pickled_tuple_keys_never_answer_for_equal_fast_ones(smm: SharedMemoryManager) -> None:
    """(1,) == (Decimal(1),) for Python, but the keys match by encoding: two entries."""
    from decimal import Decimal

    d = smm.dict()
    writer = _twin(d)
    d[(1,)] = "int"
    assert d[(1,)] == "int"  # cached
    writer[(Decimal(1),)] = "decimal"  # replayed: must not refresh the cached (1,)
    assert d[(1,)] == "int"
    for _ in range(2):  # the second time from the cache, when it may
        assert d[(Decimal(1),)] == "decimal" and d[(1,)] == "int"
        assert d[(1,)] == "int" and d[(Decimal(1),)] == "decimal"
        assert d.get((1, (Decimal(1),))) is None and d.get((1, (1,))) is None
    assert len(d) == 2


def test_falling_behind_the_log_forgets_the_cache(
    smm: SharedMemoryManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = smm.dict({i: 0 for i in range(40)})
    writer = _twin(d)
    assert [d[i] for i in range(40)] == [0] * 40
    for r in range(d._ecap + 5):  # more changes than the log holds
        writer[r % 40] = r
    spy = _Spy(monkeypatch, "_replay")
    assert {i: d[i] for i in range(40)} == {i: writer[i] for i in range(40)}
    assert spy.calls["_replay"] == 0


# keys of every kind the cache meets: equal numbers of three types, NaN (matched by bits),
# a pickled tuple (matched by its pickle), out-of-line ones
_NAN = float("nan")
LOG_KEYS: list[Any] = [0, 1, 1.0, True, -1, -(2**62), 2**70, 5, 6, 7, "a", "é", b"b", None, -0.0]
LOG_KEYS += [_NAN, (1, "t"), ("f", frozenset({1})), frozenset({2}), "L" * 60, -5, -6]
LOG_KEYS += list(range(100, 180))  # a table large enough for long log windows
LOG_VALUES: list[Any] = [0, "s", "x" * 45, "big" * 40, b"b", None, 2.5, (1, 2), [1], {"m": 1}]


def _plain_value(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v


@pytest.mark.parametrize("seed", range(6))
def test_reads_after_other_writes_match_the_builtin_dict(
    smm: SharedMemoryManager, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """A writer view changes the dict in bursts; the reader view must always read the truth."""
    rng = random.Random(seed)
    if seed == 0:  # caches that overflow and start afresh
        monkeypatch.setattr(shared_dict, "CACHE_MAX", 7)
    d = smm.dict()
    writer = _twin(d)
    model: dict[Any, Any] = {}

    def write(who: Any, n: int) -> None:
        for _ in range(n):
            k = rng.choice(LOG_KEYS)
            op = rng.random()
            if op < 0.7:
                v = rng.choice(LOG_VALUES)
                if rng.random() < 0.05:
                    v = np.arange(rng.randrange(1, 5))
                who[k] = model[k] = v
            elif op < 0.85:
                assert _plain_value(who.pop(k, "none")) == _plain_value(model.pop(k, "none"))
            elif op < 0.9 and model:
                got, want = who.popitem(), model.popitem()
                assert repr(got[0]) == repr(want[0])
                assert _plain_value(got[1]) == _plain_value(want[1])
            elif op < 0.93:
                who.update({k: "u"}, extra=1)
                model.update({k: "u"}, extra=1)
            elif op < 0.95 and rng.random() < 0.3:
                who.clear()
                model.clear()
            else:
                got = who.setdefault(k, "sd")
                assert _plain_value(got) == _plain_value(model.setdefault(k, "sd"))

    for _ in range(60):
        write(writer, rng.choice([1, 2, 5, 30, 70, 150, 400]))
        if rng.random() < 0.2:
            write(d, rng.choice([1, 3]))  # the reader writes too
        for k in rng.sample(LOG_KEYS, 40):
            want = model.get(k, "missing")
            got = d.get(k, "missing")
            assert _plain_value(got) == _plain_value(want), (k, got, want)
            assert (k in d) == (k in model)
    # every entry left in the reader's cache is the truth
    for k, form in list(d._cache.items()):
        want = model.get(k, "missing")
        got = d.get(k, "missing")
        assert _plain_value(got) == _plain_value(want), (k, form, want)
    assert d._check() == []


def _bump_counter(d: SharedDict, key: str, n: int) -> None:
    for _ in range(n):
        d[key] = d[key] + 1  # one writer at a time: no lost update
        d[f"{key}-last"] = d[key]


def test_reads_after_child_writes_match_a_manager_dict(
    smm: SharedMemoryManager, std_manager: Any
) -> None:
    seen = []
    for d in (smm.dict(), std_manager.dict()):
        d.update(a=0, b=0, c="c")
        observed = [d["c"]]
        for key in ("a", "b", "a"):
            p = mp.get_context("fork").Process(target=_bump_counter, args=(d, key, 40))
            p.start()
            p.join(60)
            assert p.exitcode == 0
            observed.append((d["a"], d["b"], d["c"], d.get(f"{key}-last"), len(d)))
        seen.append(observed)
    assert seen[0] == seen[1]


def test_threads_share_the_cache_safely(smm: SharedMemoryManager) -> None:
    import threading

    d = smm.dict({i: 0 for i in range(50)})
    errors: list[str] = []

    def writer() -> None:
        for r in range(1, 40):
            for i in range(50):
                d[i] = r

    def reader() -> None:
        last = [0] * 50
        while t.is_alive():
            for i in range(50):
                v = d[i]
                if v < last[i]:  # one writer, increasing values: never older than read before
                    errors.append(f"key {i}: {v} after {last[i]}")
                last[i] = v

    t = threading.Thread(target=writer)
    readers = [threading.Thread(target=reader) for _ in range(2)]
    t.start()
    for r in readers:
        r.start()
    t.join(60)
    for r in readers:
        r.join(60)
    assert errors == []
    assert [d[i] for i in range(50)] == [39] * 50


def test_check_finds_a_log_record_beyond_the_count(smm: SharedMemoryManager) -> None:
    d = smm.dict(a=1)
    assert d._check() == []
    v = int(d._hw[codec.W_VERSION])
    d._tw[d._rbase + v % d._ecap] = ((v & 0xFF_FFFF) << 40) | 7
    assert any("log names entry 6" in p for p in d._check())


# ---------------------------------------------------------------------------
# crash safety


def _base(smm: SharedMemoryManager) -> SharedDict:
    d = smm.dict()
    for i in range(9):
        d[i] = f"v{i}"
    d["big"] = "B" * 300
    d["arr"] = np.arange(5)
    n = 0
    while d._tw[0] < d._ecap:  # full: the next new key makes it grow
        d[f"fill{n}"] = n
        n += 1
    for r in range(d._ecap + 3):  # every change log slot holds a record (of an older version)
        d[r % 9] = f"v{r % 9}"
    return d


OPS: dict[str, Callable[[Any], Any]] = {
    "set new small": lambda d: d.__setitem__("new", 1),
    "set new big": lambda d: d.__setitem__("new", "N" * 500),
    "overwrite inline": lambda d: d.__setitem__(3, "w"),
    "overwrite big with small": lambda d: d.__setitem__("big", 2),
    "overwrite small with big": lambda d: d.__setitem__(3, "Q" * 400),
    "set array": lambda d: d.__setitem__(4, np.ones(3)),
    "delete": lambda d: d.__delitem__(2),
    "delete big": lambda d: d.__delitem__("big"),
    "popitem": lambda d: d.popitem(),
    "resize": lambda d: d.__setitem__("grow", 1),
    "clear": lambda d: d.clear(),
    "update_with": lambda d: (
        d.update_with(0, lambda v: v + "!") if isinstance(d, SharedDict) else d.update({0: "v0!"})
    ),
}


def _plain(d: SharedDict) -> dict[Any, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def _run_killed_at(d: SharedDict, op: Callable[[Any], Any], k: int) -> bool:
    return run_killed_at(codec, lambda: op(d), k)


_GONE = "<gone>"


def _reads(d: SharedDict, keys: Any) -> dict[Any, Any]:
    """What ``d.get`` returns for each key: through this process's read cache when it can."""
    return {k: _plain_value(d.get(k, _GONE)) for k in keys}


def _as_read(contents: dict[Any, Any], keys: Any) -> dict[Any, Any]:
    return {k: contents.get(k, _GONE) for k in keys}


@pytest.mark.parametrize("name", list(OPS))
def test_sigkill_at_every_write_step(smm: SharedMemoryManager, name: str) -> None:
    op = OPS[name]
    k = 1
    while True:
        d = _base(smm)
        before = _plain(d)
        model = dict(d.items())
        op(model)
        after = {k2: (v.tolist() if isinstance(v, np.ndarray) else v) for k2, v in model.items()}
        assert _reads(d, before) == before  # now cached here
        finished = _run_killed_at(d, op, k)
        # before anyone repairs: the cache shows the contents before or after, not a mix
        early = _reads(d, before)
        assert early in (before, _as_read(after, before)), (name, k, early)
        assert d._check() == [], (name, k)
        now = _plain(d)
        assert now in (before, after), (name, k, now)
        assert list(now) in (list(before), list(after))
        # after the repair: cached reads (replayed from the log or started afresh) are the truth
        keys = [*before, *after]
        assert _reads(d, keys) == _as_read(now, keys), (name, k)
        d["later"] = "works"
        assert d["later"] == "works" and d._check() == []
        assert smm.heap.check() == []
        if finished:
            crash_points(f"dict {name}", k - 1)
            break
        k += 1
    assert k > 2, f"{name}: no write step?"


def test_update_killed_half_way_leaves_whole_items(smm: SharedMemoryManager) -> None:
    """update() is one step for other processes; a crash inside keeps a prefix of whole items."""
    new = {f"k{i}": "z" * (i * 40) for i in range(6)}
    k = 1
    while True:
        d = _base(smm)
        before = _plain(d)
        finished = _run_killed_at(d, lambda x: x.update(new), k)
        assert d._check() == []
        now = _plain(d)
        added = [key for key in now if key not in before]
        assert added == list(new)[: len(added)]
        assert all(now[key] == new[key] for key in added)
        assert {key: now[key] for key in before} == before
        if finished:
            assert added == list(new)
            break
        k += 1


@pytest.mark.parametrize("name", list(OPS))
def test_keyboard_interrupt_at_every_step(smm: SharedMemoryManager, name: str) -> None:
    op = OPS[name]
    k = 1
    try:
        while True:
            d = _base(smm)
            before = _plain(d)
            model = dict(d.items())
            op(model)
            after = {a: (v.tolist() if isinstance(v, np.ndarray) else v) for a, v in model.items()}
            assert _reads(d, before) == before  # now cached here
            count = [0]

            def hook(k: int = k, count: list[int] = count) -> None:
                count[0] += 1
                if count[0] == k:
                    raise KeyboardInterrupt

            codec.fault_hook = hook
            try:
                op(d)
                finished = True
            except KeyboardInterrupt:
                finished = False
            codec.fault_hook = None
            assert not d._mutex.locked()
            assert d._check() == [], (name, k)
            now = _plain(d)
            assert now in (before, after), (name, k)
            keys = [*before, *after]
            assert _reads(d, keys) == _as_read(now, keys), (name, k)
            assert smm.heap.check() == []
            d["x"] = 1
            if finished:
                break
            k += 1
    finally:
        codec.fault_hook = None
