"""ShareableList: the stdlib's is the oracle, except for its bugs.

Each scenario runs on ``multiprocessing.shared_memory.ShareableList`` and on
``sharedobj.shareable_list.ShareableList`` and the observable results must be
equal.  Inputs the stdlib gets wrong (trailing NULs, multi-byte text, indexes
below -len, out-of-range ints, items over 10 MB) are kept out of the
differential scenarios and tested on their own, showing the stdlib's wrong
result next to ours.

Every list is made through the ``lists`` fixture, under a unique name, and
its block is closed and unlinked at teardown even when the test fails; the
teardown then checks that nothing by that name is left.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory as stdlib_shm
from typing import Any

import pytest

from sharedobj import shareable_list as ours_mod
from sharedobj.shareable_list import ShareableList as OurList

IMPLS: dict[str, Any] = {"stdlib": stdlib_shm.ShareableList, "ours": OurList}
IMPL_NAMES = list(IMPLS)


def unique_name() -> str:
    # Short enough for every platform's POSIX name limit (31 on macOS).
    return f"slt{os.getpid() % 100000}_{uuid.uuid4().hex[:16]}"


def raw_shared_memory(impl: str) -> Callable[..., Any]:
    if impl == "stdlib":
        return stdlib_shm.SharedMemory
    return ours_mod._shared_memory_class()


def exists(impl: str, name: str) -> bool:
    try:
        shm = raw_shared_memory(impl)(name=name)
    except FileNotFoundError:
        return False
    shm.close()
    return True


class Lists:
    """Makes lists and guarantees their blocks are gone afterwards."""

    def __init__(self) -> None:
        self.owned: list[tuple[str, str]] = []  # (impl, name) this test must unlink
        self.objects: list[Any] = []  # every ShareableList instance, to close

    def new(self, impl: str, sequence: Any, *, name: str | None = "") -> Any:
        """A new list; ``name=""`` picks a unique name, ``None`` the default."""
        if name == "":
            name = unique_name()
        if name is not None:
            self.owned.append((impl, name))  # before: a failed create may leak
        sl = IMPLS[impl](sequence, name=name)
        if name is None:
            self.owned.append((impl, sl.shm.name))
        self.objects.append(sl)
        return sl

    def attach(self, impl: str, name: str) -> Any:
        sl = IMPLS[impl](name=name)
        self.objects.append(sl)
        return sl

    def adopt(self, sl: Any) -> Any:
        """Close ``sl`` (an attachment made elsewhere, e.g. by unpickling) at teardown."""
        self.objects.append(sl)
        return sl

    def cleanup(self) -> list[tuple[str, str]]:
        for sl in self.objects:
            with contextlib.suppress(Exception):
                sl.shm.close()
        leaked = []
        for impl, name in self.owned:
            try:
                shm = raw_shared_memory(impl)(name=name)
            except FileNotFoundError:
                continue
            try:
                shm.close()
            finally:
                shm.unlink()
            leaked.append((impl, name))
        return leaked


@pytest.fixture
def lists() -> Iterator[Lists]:
    made = Lists()
    try:
        yield made
    finally:
        # Tests unlink what they make in their own finally; anything still
        # there now is removed, and reported as a leak.
        leaked = made.cleanup()
    assert not leaked, f"left behind: {leaked}"


def close_unlink(sl: Any) -> None:
    sl.shm.close()
    sl.shm.unlink()


# --------------------------------------------------------------------------
# Observations compared between the two implementations

NAN = float("nan")

SCENARIOS: dict[str, list[Any]] = {
    "empty": [],
    "single": ["only"],
    "ints": [0, 1, -1, 42, -(2**63), 2**63 - 1, -(2**31), 2**32],
    "floats": [0.0, -0.0, 1.5, -2.25e300, 5e-324, math.inf, -math.inf, NAN],
    "bools": [True, False, True],
    "nones": [None, None],
    "ascii_strs": ["", "a", "hello", "x" * 7, "y" * 8, "z" * 9, "a\x00b", " spaced "],
    "unicode_strs": ["héllo wörld", "日本", "🐍", "naïve café"],
    "bytes": [b"", b"a", b"\x00\x01", b"a\x00b", bytes(range(1, 256))],
    "long": ["L" * 100_000, b"B" * 65_537, "s" * 4095],
    "mixed": [1, 2.5, True, None, "s", b"b", -3, "", b"", False, 0],
    "equal_but_different_types": [1, 1.0, True, "1", b"1", 0, 0.0, False],
}

MISSING = [12345678, "missing", b"missing", 0.125, NAN, None, -1]


def outcome(f: Callable[[], Any]) -> tuple[str, str]:
    try:
        return ("ok", repr(f()))
    except Exception as exc:
        return ("raises", type(exc).__name__)


def ascii_only(seq: list[Any]) -> bool:
    return all(x.isascii() for x in seq if isinstance(x, str))


def observe(sl: Any) -> dict[str, Any]:
    n = len(sl)
    probes = [sl[i] for i in range(n)] + MISSING
    return {
        "len": n,
        "items": [repr(sl[i]) for i in range(n)],
        "negative": [repr(sl[-i]) for i in range(1, n + 1)],
        "iter": repr(list(sl)),
        "reversed": repr(list(reversed(sl))),
        "repr": repr(sl).replace(repr(sl.shm.name), "NAME"),
        "past_end": outcome(lambda: sl[n]),
        "far_past_end": outcome(lambda: sl[n + 10]),
        # Below -2n-1: the stdlib's only negative IndexError (see the bug test).
        "far_negative": outcome(lambda: sl[-2 * n - 2]),
        "count": [sl.count(v) for v in probes],
        "index": [outcome(lambda v=v: sl.index(v)) for v in probes],
        "contains": [v in sl for v in probes],
    }


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_construction_and_reads_match_stdlib(lists: Lists, scenario: str) -> None:
    seq = SCENARIOS[scenario]
    std, ours = lists.new("stdlib", seq), lists.new("ours", seq)
    try:
        assert observe(ours) == observe(std)
        assert repr(ours).startswith("ShareableList([") and repr(ours).endswith(
            f"], name={ours.shm.name!r})"
        )
        if ascii_only(seq):
            assert ours.format == std.format
    finally:
        close_unlink(std)
        close_unlink(ours)


def test_tuple_and_str_sequences_match_stdlib(lists: Lists) -> None:
    for seq in [(1, "two", 3.0), "abc"]:
        std, ours = lists.new("stdlib", seq), lists.new("ours", seq)
        try:
            assert observe(ours) == observe(std)
        finally:
            close_unlink(std)
            close_unlink(ours)


def test_no_sequence_is_empty_like_stdlib(lists: Lists) -> None:
    std, ours = lists.new("stdlib", None, name=None), lists.new("ours", None, name=None)
    try:
        assert observe(ours) == observe(std)
        assert ours.format == std.format == ""
    finally:
        close_unlink(std)
        close_unlink(ours)


ASSIGNED = [
    0,
    -7,
    2**63 - 1,
    -(2**63),
    3.25,
    math.inf,
    NAN,
    True,
    False,
    None,
    "",
    "abc",
    "x" * 7,
    "x" * 8,
    "y" * 17,
    "é",
    b"",
    b"\x01\x02",
    b"z" * 40,
]


@pytest.mark.parametrize("scenario", ["ints", "ascii_strs", "bytes", "mixed", "long"])
def test_assignments_match_stdlib(lists: Lists, scenario: str) -> None:
    """Every value assigned to every slot: same outcome, same list after."""
    seq = SCENARIOS[scenario]
    std, ours = lists.new("stdlib", seq), lists.new("ours", seq)
    try:
        for i in range(len(seq)):
            for position in (i, i - len(seq)):
                for value in ASSIGNED:

                    def put(sl: Any, p: int = position, v: Any = value) -> None:
                        sl[p] = v

                    got = outcome(lambda: put(ours))
                    want = outcome(lambda: put(std))
                    assert got == want, (i, value)
                    assert [repr(x) for x in ours] == [repr(x) for x in std], (i, value)
                    assert ours.format == std.format, (i, value)
        assert outcome(lambda: ours.__setitem__(len(seq), 1)) == ("raises", "IndexError")
        assert outcome(lambda: std.__setitem__(len(seq), 1)) == ("raises", "IndexError")
    finally:
        close_unlink(std)
        close_unlink(ours)


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_index_errors(lists: Lists, impl: str) -> None:
    sl = lists.new(impl, [1, "a", None])
    try:
        for bad in (3, 4, 100, -100):
            with pytest.raises(IndexError):
                sl[bad]
            with pytest.raises(IndexError):
                sl[bad] = 1
        with pytest.raises(ValueError):
            sl.index("absent")
        with pytest.raises(TypeError):
            sl["0"]
        with pytest.raises(TypeError):
            sl[0:2]
        assert list(sl) == [1, "a", None]
    finally:
        close_unlink(sl)


def test_messages_name_what_went_wrong(lists: Lists) -> None:
    sl = lists.new("ours", [1, "ab"])
    try:
        with pytest.raises(IndexError, match="index 2 out of range for a list of 2 items"):
            sl[2]
        with pytest.raises(IndexError, match="assignment index -3"):
            sl[-3] = 0
        with pytest.raises(ValueError, match=r"'absent' not in this container"):
            sl.index("absent")
        with pytest.raises(TypeError, match="indices must be integers, not str"):
            sl["0"]
    finally:
        close_unlink(sl)


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_named_create_attach_and_exists(lists: Lists, impl: str) -> None:
    name = unique_name()
    sl = lists.new(impl, [1, "two", b"3"], name=name)
    try:
        assert sl.shm.name == name
        again = lists.attach(impl, name)
        assert list(again) == [1, "two", b"3"]
        again[1] = "TWO"
        assert sl[1] == "TWO"
        with pytest.raises(FileExistsError):
            IMPLS[impl]([9], name=name)
        assert list(sl) == [1, "TWO", b"3"]
        again.shm.close()
    finally:
        close_unlink(sl)
    assert not exists(impl, name)
    with pytest.raises(FileNotFoundError):
        IMPLS[impl](name=name)


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_pickle_reattaches_by_name(lists: Lists, impl: str) -> None:
    sl = lists.new(impl, [1, 2.5, "x", b"y", None, True])
    try:
        data = pickle.dumps(sl)
        assert len(data) < 200  # the name, not the items
        copy = lists.adopt(pickle.loads(data))
        assert type(copy) is type(sl)
        assert copy.shm.name == sl.shm.name
        assert list(copy) == list(sl)
        copy[0] = 99
        assert sl[0] == 99
        copy.shm.close()
    finally:
        close_unlink(sl)


def test_uses_the_package_shared_memory_when_there() -> None:
    cls = ours_mod._shared_memory_class()
    try:
        import sharedobj.shared_memory as mod
    except ModuleNotFoundError:
        assert cls is stdlib_shm.SharedMemory
    else:
        assert cls is mod.SharedMemory


# --------------------------------------------------------------------------
# Other processes: attach by name, and pickling through a Pool


def _child_attach_and_modify(cls: Any, name: str, conn: Any) -> None:
    sl = cls(name=name)
    try:
        seen = [repr(x) for x in sl]
        sl[0] = "from child"
        sl[1] = -5
        sl[-1] = None
        sl[3] = 2.5
        conn.send((seen, len(sl), sl.format))
    finally:
        sl.shm.close()


def _pool_read(sl: Any) -> tuple[str, list[str]]:
    try:
        return sl.shm.name, [repr(x) for x in sl]
    finally:
        sl.shm.close()


def _pool_set(args: tuple[Any, int, Any]) -> str:
    sl, i, value = args
    try:
        sl[i] = value
        return repr(sl[i])
    finally:
        sl.shm.close()


CROSS = ["first item!", 7, b"bytes\x01", 1.0, True, None, "last"]


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_attach_from_another_process(lists: Lists, impl: str, method: str) -> None:
    ctx = mp.get_context(method)
    sl = lists.new(impl, CROSS)
    try:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_child_attach_and_modify, args=(IMPLS[impl], sl.shm.name, child))
        p.start()
        try:
            assert parent.poll(60), "child sent nothing"
            seen, n, fmt = parent.recv()
        finally:
            p.join(60)
        assert p.exitcode == 0
        assert seen == [repr(x) for x in CROSS]
        assert n == len(CROSS)
        assert fmt == sl.format
        assert list(sl) == ["from child", -5, b"bytes\x01", 2.5, True, None, None]
    finally:
        close_unlink(sl)


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_pickled_through_a_pool(lists: Lists, impl: str, method: str) -> None:
    sl = lists.new(impl, CROSS)
    try:
        with mp.get_context(method).Pool(2) as pool:
            reads = pool.map(_pool_read, [sl] * 4)
            assert reads == [(sl.shm.name, [repr(x) for x in CROSS])] * 4
            sets = pool.map(_pool_set, [(sl, 0, "pooled"), (sl, 1, 3.5), (sl, 5, b"b")])
            assert sets == ["'pooled'", "3.5", "b'b'"]
        assert list(sl) == ["pooled", 3.5, b"bytes\x01", 1.0, True, b"b", "last"]
    finally:
        close_unlink(sl)


# --------------------------------------------------------------------------
# Fixed stdlib bugs: the stdlib's wrong result, then ours


@pytest.mark.parametrize(
    ("item", "stdlib_reads"),
    [
        (b"ab\x00", b"ab"),
        (b"\x00\x00", b""),
        (bytes(8), b""),
        ("ab\x00", "ab"),
        ("\x00", ""),
    ],
)
def test_bug_trailing_nuls_are_kept(lists: Lists, item: Any, stdlib_reads: Any) -> None:
    std, ours = lists.new("stdlib", [item, 0]), lists.new("ours", [item, 0])
    try:
        assert std[0] == stdlib_reads  # the stdlib strips them
        assert ours[0] == item
        std[1] = ours[1] = item  # and when assigned
        assert std[1] == stdlib_reads
        assert ours[1] == item
        attached = lists.attach("ours", ours.shm.name)
        assert list(attached) == [item, item]
        attached.shm.close()
    finally:
        close_unlink(std)
        close_unlink(ours)


def test_bug_too_long_assignment_names_index_length_and_capacity(lists: Lists) -> None:
    std, ours = lists.new("stdlib", ["abc", 1]), lists.new("ours", ["abc", 1])
    try:
        with pytest.raises(ValueError) as std_exc:
            std[0] = "x" * 9
        assert "9" not in str(std_exc.value)  # "bytes/str item exceeds available storage"
        with pytest.raises(ValueError, match=r"item 0: .* needs 9 bytes .* holds 8"):
            ours[0] = "x" * 9
        with pytest.raises(ValueError, match=r"item 1: .* needs 12 bytes .* holds 8"):
            ours[-1] = "é" * 6  # UTF-8 bytes count, not characters
        assert list(ours) == list(std) == ["abc", 1]
        ours[0] = std[0] = "x" * 8  # what fits goes in
        assert list(ours) == list(std) == ["x" * 8, 1]
    finally:
        close_unlink(std)
        close_unlink(ours)


BIG = 10_000_000  # the stdlib's slot format "10000008s" no longer fits its 8-byte field


def test_bug_items_over_10mb_stdlib_asserts(lists: Lists) -> None:
    name = unique_name()
    lists.owned.append(("stdlib", name))
    with pytest.raises(AssertionError):
        stdlib_shm.ShareableList([b"x" * BIG, 1], name=name)
    assert not exists("stdlib", name)  # the assert comes before the block
    ours = lists.new("ours", [b"x" * BIG, 1])
    try:
        assert ours[0] == b"x" * BIG
        assert ours[1] == 1
        assert ours.format == f"{BIG + 8}sq"
        ours[0] = "y" * (BIG + 7)
        assert ours[0] == "y" * (BIG + 7)
    finally:
        close_unlink(ours)


def test_bug_items_over_10mb_stdlib_under_optimize_is_unreadable() -> None:
    code = textwrap.dedent(
        f"""
        import json
        from multiprocessing.shared_memory import ShareableList
        sl = ShareableList([b"x" * {BIG}, 1], name={unique_name()!r})
        try:
            try:
                sl[0]
                out = "read"
            except Exception as exc:
                out = type(exc).__name__
            print(json.dumps([out, sl.format]))
        finally:
            sl.shm.close()
            sl.shm.unlink()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out, fmt = json.loads(proc.stdout.splitlines()[-1])
    assert out == "error"  # struct.error: the format lost its "s"
    assert fmt.startswith("10000008q")


def test_bug_multibyte_text_is_not_truncated(lists: Lists) -> None:
    text = "日本語"  # 3 characters, 9 bytes: the stdlib sizes the slot for 8
    std, ours = lists.new("stdlib", [text]), lists.new("ours", [text])
    try:
        with pytest.raises(UnicodeDecodeError):
            std[0]
        assert ours[0] == text
        assert ours.format == "16s"
    finally:
        close_unlink(std)
        close_unlink(ours)


def test_bug_negative_index_below_minus_len(lists: Lists) -> None:
    seq = [1, 2, 3]
    std, ours = lists.new("stdlib", seq), lists.new("ours", seq)
    try:
        assert std[-4] == ord("q")  # a byte of its format table, read as an item
        assert std[-6] == 2  # another item
        with pytest.raises(IndexError):
            std[-8]  # only far enough below -len does it raise IndexError
        for i in range(-7, -3):
            with pytest.raises(IndexError):
                ours[i]
            with pytest.raises(IndexError):
                ours[i] = 0
        assert list(ours) == seq
    finally:
        close_unlink(std)
        close_unlink(ours)


@pytest.mark.parametrize(
    "value", [2**63, -(2**63) - 1, 10**5000], ids=["2**63", "-2**63-1", "10**5000"]
)
def test_bug_int_out_of_range(lists: Lists, value: int) -> None:
    # The stdlib makes the block, then fails to pack: the block leaks.
    name = unique_name()
    lists.owned.append(("stdlib", name))
    with pytest.raises(struct_error()):
        stdlib_shm.ShareableList([1, value], name=name)
    assert exists("stdlib", name)
    leaked = stdlib_shm.SharedMemory(name)
    leaked.close()
    leaked.unlink()

    name = unique_name()
    lists.owned.append(("ours", name))
    with pytest.raises(OverflowError, match=r"item 1: .* out of the 64-bit signed range"):
        OurList([1, value], name=name)
    assert not exists("ours", name)

    # Assigning one: the stdlib has already retyped the slot, ours is unchanged.
    std, ours = lists.new("stdlib", ["text", None]), lists.new("ours", ["text", None])
    try:
        with pytest.raises(struct_error()):
            std[0] = value
        with pytest.raises(struct_error()):
            std[1] = value
        assert std[0] != "text"  # the string's bytes read as an int
        assert std[1] == 0  # None became 0
        with pytest.raises(OverflowError, match="item 0"):
            ours[0] = value
        with pytest.raises(OverflowError, match="item 1"):
            ours[1] = value
        assert list(ours) == ["text", None]
    finally:
        close_unlink(std)
        close_unlink(ours)


def struct_error() -> type[Exception]:
    import struct

    return struct.error


@pytest.mark.parametrize("bad", [[1], {"a": 1}, object(), bytearray(b"x"), (1,), 1j])
def test_unsupported_types(lists: Lists, bad: Any) -> None:
    name = unique_name()
    lists.owned.append(("stdlib", name))
    with pytest.raises(KeyError):  # the stdlib: a bare KeyError(<class ...>)
        stdlib_shm.ShareableList([1, bad], name=name)
    name = unique_name()
    lists.owned.append(("ours", name))
    with pytest.raises(TypeError, match=f"item 1: .*not {type(bad).__name__}$"):
        OurList([1, bad], name=name)
    assert not exists("ours", name)

    std, ours = lists.new("stdlib", [1, "s"]), lists.new("ours", [1, "s"])
    try:
        with pytest.raises(KeyError):
            std[1] = bad
        with pytest.raises(TypeError, match=f"not {type(bad).__name__}$"):
            ours[1] = bad
        assert list(ours) == list(std) == [1, "s"]
    finally:
        close_unlink(std)
        close_unlink(ours)


# --------------------------------------------------------------------------
# Deliberate differences that are not bugs


def test_generator_is_consumed_once(lists: Lists) -> None:
    ours = lists.new("ours", (x * 2 for x in range(5)))
    try:
        assert list(ours) == [0, 2, 4, 6, 8]
    finally:
        close_unlink(ours)
    name = unique_name()
    lists.owned.append(("stdlib", name))
    with pytest.raises(Exception):  # noqa: B017 - the stdlib iterates it three times
        stdlib_shm.ShareableList((x * 2 for x in range(5)), name=name)
    # ... after making the block, which is left behind.
    leaked = stdlib_shm.SharedMemory(name)
    leaked.close()
    leaked.unlink()


def test_subclasses_of_supported_types_are_stored_as_the_base_type(lists: Lists) -> None:
    import enum

    class Colour(enum.IntEnum):
        RED = 3

    class Tag(str):
        pass

    ours = lists.new("ours", [Colour.RED, Tag("t")])
    try:
        assert list(ours) == [3, "t"]
        assert type(ours[0]) is int and type(ours[1]) is str
    finally:
        close_unlink(ours)


def test_attaching_to_a_block_that_is_not_a_list(lists: Lists) -> None:
    name = unique_name()
    lists.owned.append(("ours", name))
    raw = ours_mod._shared_memory_class()(name=name, create=True, size=64)
    try:
        with pytest.raises(ValueError, match="does not hold a ShareableList"):
            OurList(name=name)
    finally:
        raw.close()
        raw.unlink()


def test_closed_list_raises_value_error(lists: Lists) -> None:
    sl = lists.new("ours", [1])
    name = sl.shm.name
    close_unlink(sl)
    with pytest.raises(ValueError, match="closed"):
        sl[0]
    assert not exists("ours", name)
