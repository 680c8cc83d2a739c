"""SharedList against the builtin list and multiprocessing.Manager().list().

The same random operations go to a plain list and to ours (results and
contents compared after each); processes of every start method append and
update concurrently; a forked child is SIGKILLed at every write step of each
operation (and KeyboardInterrupt raised at every step in-process), and the
list must be consistent and hold the before or the after contents.
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
from sharedobj.containers import codec
from sharedobj.containers.shared_list import SharedList

METHODS = ["fork", "spawn", "forkserver"]


def _outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", fn())
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


VALUES: list[Any] = [0, 1, 2, 3, "a", "b", "y" * 100, None, 2.5, (1, 2), [1], 10**30]


def _op(rng: random.Random) -> Callable[[Any], Any]:
    v = rng.choice(VALUES)
    i = rng.randint(-12, 12)
    j = rng.randint(-12, 12)
    step = rng.choice([None, 1, 2, -1, -2, 3, 0])
    sl = slice(rng.choice([None, i]), rng.choice([None, j]), step)
    many = [rng.choice(VALUES) for _ in range(rng.randint(0, 5))]
    ops: list[Callable[[Any], Any]] = [
        lambda x: x.append(v),
        lambda x: x.extend(many),
        lambda x: x.insert(i, v),
        lambda x: x.pop(),
        lambda x: x.pop(i),
        lambda x: x[i],
        lambda x: x.__setitem__(i, v),
        lambda x: x.__delitem__(i),
        lambda x: x[sl],
        lambda x: x.__setitem__(sl, many),
        lambda x: x.__delitem__(sl),
        lambda x: x.remove(v),
        lambda x: x.index(v),
        lambda x: x.count(v),
        lambda x: v in x,
        lambda x: len(x),
        lambda x: x.reverse(),
        lambda x: x.sort(key=repr, reverse=step == 2),
        lambda x: x.__iadd__(many) and None,
        lambda x: x.__imul__(rng.choice([0, 1, 2])) and None,
        lambda x: list(x),
        lambda x: list(reversed(x)),
        lambda x: x == [v],
        lambda x: x < [v] if isinstance(v, int) else None,
        lambda x: x.copy(),
        lambda x: x + many,
        lambda x: x.clear() if step == 0 else None,
    ]
    return rng.choice(ops)


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_match_the_builtin_list(smm: SharedMemoryManager, seed: int) -> None:
    rng = random.Random(seed)
    ours = smm.list()
    plain: list[Any] = []
    for n in range(300):
        op = _op(rng)
        state = rng.getstate()
        expected = _outcome(lambda: op(plain))  # noqa: B023 - called at once
        rng.setstate(state)
        got = _outcome(lambda: op(ours))  # noqa: B023
        assert got == expected, (n, expected, got)
        assert ours == plain, n
    assert ours._check() == [] and repr(ours) == repr(plain)
    assert smm.heap.check() == []


def test_sort_is_stable_and_errors_leave_it_unchanged(smm: SharedMemoryManager) -> None:
    data = [(i % 3, i) for i in range(30)]
    ours = smm.list(data)
    ours.sort(key=lambda t: t[0], reverse=True)
    assert ours == sorted(data, key=lambda t: t[0], reverse=True)
    mixed = smm.list([1, "a", 2])
    with pytest.raises(TypeError):
        mixed.sort()
    assert mixed == [1, "a", 2]


def test_error_messages_match_the_builtin(smm: SharedMemoryManager) -> None:
    ours = smm.list([1, 2])
    plain = [1, 2]
    cases: list[Callable[[Any], Any]] = [
        lambda x: x[5],
        lambda x: x.__setitem__(5, 0),
        lambda x: x.__delitem__(5),
        lambda x: x["a"],
        lambda x: x.pop(9),
        lambda x: x.remove(7),
        lambda x: x.index(7),
        lambda x: x.__setitem__(slice(None, None, 2), [1, 2, 3]),
        lambda x: (x.clear(), x.pop()),
    ]
    for case in cases:
        assert _outcome(lambda: case(ours)) == _outcome(lambda: case(plain))  # noqa: B023


def test_items_are_copies_like_a_manager_list(smm: SharedMemoryManager, std_manager: Any) -> None:
    for lst in (smm.list([[1]]), std_manager.list([[1]])):
        lst[0].append(2)
        assert lst[0] == [1]
        lst += [3]
        lst *= 2
        assert lst[:] == [[1], 3, [1], 3] and len(lst) == 4


def test_numpy_items_are_shared_views(smm: SharedMemoryManager) -> None:
    lst = smm.list()
    lst.append(np.arange(6.0))
    got = lst[0]
    assert isinstance(got, SharedArray) and got.block is not None and not got.flags.writeable
    assert (got == np.arange(6.0)).all()
    lst *= 2  # each copy owns its own array
    lst[0] = 1
    assert (lst[1] == np.arange(6.0)).all()
    popped = lst.pop()
    assert type(popped) is np.ndarray and (popped == np.arange(6.0)).all()
    assert lst._check() == [] and smm.heap.check() == []


def _appender(lst: SharedList, who: int, n: int) -> None:
    for i in range(n):
        lst.append((who, i))
        lst.update_with(0, lambda v: v + 1)


@pytest.mark.parametrize("method", METHODS)
def test_concurrent_appends_and_updates(smm: SharedMemoryManager, method: str) -> None:
    lst = smm.list([0])
    ctx = mp.get_context(method)
    procs = [ctx.Process(target=_appender, args=(lst, w, 100)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert lst[0] == 300 and len(lst) == 301
    items = lst[1:]
    for w in range(3):
        assert [i for who, i in items if who == w] == list(range(100))
    assert lst._check() == []


def _pool_task(args: tuple[SharedList, int]) -> SharedList:
    lst, i = args
    with lst.locked():
        lst.append(i)
        lst.sort()
    return lst


@pytest.mark.parametrize("method", METHODS)
def test_passes_through_pool_arguments_and_results(smm: SharedMemoryManager, method: str) -> None:
    lst = smm.list()
    assert len(pickle.dumps(lst)) < 100
    with mp.get_context(method).Pool(2) as pool:
        results = pool.map(_pool_task, [(lst, i) for i in range(8)])
    assert all(r is lst for r in results)
    assert lst == list(range(8))


# ---------------------------------------------------------------------------
# crash safety


def _base(smm: SharedMemoryManager) -> SharedList:
    lst = smm.list([f"v{i}" for i in range(5)] + ["B" * 300, np.arange(3)])
    while lst._len() < lst._tw[1]:
        lst.append(len(lst))  # full: the next append grows it
    return lst


OPS: dict[str, Callable[[Any], Any]] = {
    "append (grows)": lambda x: x.append("new"),
    "append big": lambda x: (x.pop(), x.append("N" * 500)),
    "setitem": lambda x: x.__setitem__(1, "w"),
    "setitem big": lambda x: x.__setitem__(5, "Q" * 400),
    "setitem array": lambda x: x.__setitem__(2, np.ones(2)),
    "insert": lambda x: x.insert(1, "ins"),
    "pop end": lambda x: x.pop(),
    "pop middle": lambda x: x.pop(5),
    "del slice": lambda x: x.__delitem__(slice(1, 6, 2)),
    "slice assign": lambda x: x.__setitem__(slice(0, 2), ["a", "Z" * 200, "c"]),
    "sort": lambda x: x.sort(key=repr),
    "reverse": lambda x: x.reverse(),
    "clear": lambda x: x.clear(),
    "extend": lambda x: x.extend(["e1", "E" * 100]),
}


def _plain(lst: Any) -> list[Any]:
    return [v.tolist() if isinstance(v, np.ndarray) else v for v in lst]


def _run_killed_at(lst: SharedList, op: Callable[[Any], Any], k: int) -> bool:
    return run_killed_at(codec, lambda: op(lst), k)


def _expected(lst: SharedList, op: Callable[[Any], Any]) -> tuple[list[Any], list[Any]]:
    before = _plain(lst)
    model = lst.copy()
    op(model)
    return before, _plain(model)


@pytest.mark.parametrize("name", list(OPS))
def test_sigkill_at_every_write_step(smm: SharedMemoryManager, name: str) -> None:
    op = OPS[name]
    k = 1
    while True:
        lst = _base(smm)
        before, after = _expected(lst, op)
        finished = _run_killed_at(lst, op, k)
        assert lst._check() == [], (name, k)
        now = _plain(lst)
        if name == "append big":  # two operations: the first alone is also a valid outcome
            assert now in (before, after, before[:-1]), (name, k)
        else:
            assert now in (before, after), (name, k, now)
        lst.append("later")
        assert lst[-1] == "later" and lst._check() == []
        assert smm.heap.check() == []
        if finished:
            crash_points(f"list {name}", k - 1)
            break
        k += 1
    assert k > 2, f"{name}: no write step?"


@pytest.mark.parametrize("name", list(OPS))
def test_keyboard_interrupt_at_every_step(smm: SharedMemoryManager, name: str) -> None:
    op = OPS[name]
    k = 1
    try:
        while True:
            lst = _base(smm)
            before, after = _expected(lst, op)
            count = [0]

            def hook(k: int = k, count: list[int] = count) -> None:
                count[0] += 1
                if count[0] == k:
                    raise KeyboardInterrupt

            codec.fault_hook = hook
            try:
                op(lst)
                finished = True
            except KeyboardInterrupt:
                finished = False
            codec.fault_hook = None
            assert not lst._mutex.locked()
            assert lst._check() == [], (name, k)
            now = _plain(lst)
            assert now in (before, after) or (name == "append big" and now == before[:-1])
            if finished:
                break
            k += 1
    finally:
        codec.fault_hook = None
