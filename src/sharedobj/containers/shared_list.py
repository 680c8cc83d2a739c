"""SharedList: a list in shared memory that every process sees, with the builtin's API.

Layout.  The header (codec.SharedContainer) holds the lock, the version and
the handle of the active table; a table is one block: word 0 the length (the
commit count), word 1 the capacity, then 64-byte entries from byte 64, each
holding a value inline (up to 48 bytes) or the handle of a block.

``append``/``extend``/``l[i] = v``/``pop()`` work in place: an append writes
past the length and publishes with one store of it; an item assignment saves
the old entry in the header's undo area first.  Everything that moves entries
(insert, deletion in the middle, slice assignment, sort, reverse, ``*=``,
clear, growth) builds the new table aside and switches with one store; the
entries are 64-byte records, so that is a memcpy-speed pass.  Python's own
list does the index arithmetic (slices with steps, negative indices, error
messages) on a list of the raw entries, so the semantics are the builtin's.

As with ``multiprocessing.Manager().list()``, items come back as copies
(``l[0].append(1)`` changes nothing stored); iteration walks a snapshot;
``copy()``, ``l + x`` and ``l * n`` return plain lists.  numpy arrays are
stored as shared arrays and read back as read-only zero-copy views (freed
when their item is overwritten or removed; an earlier view stays mapped).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Iterable, Iterator, MutableSequence
from typing import Any, overload

import numpy as np

from ..heap import Block, Heap
from . import codec
from .codec import (
    ARR,
    ENTRY,
    LIVE,
    OOL,
    W_VERSION,
    Pickled,
    SharedContainer,
    cache_form,
    decode,
    encode_value,
    entry_kv,
    free_array_value,
    free_refs,
    make_entry,
    materialise,
    step,
)

__all__ = ["SharedList"]

_LIST_KIND = 0x7473694C  # "List"
_MISSING: Any = object()


def _table_bytes(cap: int) -> int:
    return 64 + cap * ENTRY


def _entry_for(vb: bytes, heap: Heap) -> bytes:
    return make_entry(0, b"", vb, heap)


class SharedList(SharedContainer, MutableSequence[Any]):
    """A list shared by processes; create it with ``SharedMemoryManager().list()``."""

    KIND = _LIST_KIND
    __slots__ = ()

    @classmethod
    def create(cls, heap: Heap, iterable: Iterable[Any] = ()) -> SharedList:
        """A new shared list on ``heap`` holding the items of ``iterable``."""
        if not isinstance(heap, Heap):
            raise TypeError(f"SharedList.create needs a Heap, not {type(heap).__name__}")
        items = list(iterable)
        self: SharedList = cls._new(heap, _table_bytes(8))
        if items:
            self.extend(items)
        return self

    def _init_table(self, table: Block) -> None:
        table.buf.cast("Q")[1] = 8
        self._open_table()

    def _geometry(self, words: memoryview) -> tuple[int, int]:
        cap = int(words[1])
        if _table_bytes(cap) > len(words) * 8:
            raise RuntimeError(f"corrupt SharedList table (capacity {cap})")
        return 64, cap

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach, (self._block.handle.data,))

    # -- reading (lock held) --------------------------------------------------------
    def _len(self) -> int:
        return int(self._tw[0])

    def _vb(self, i: int) -> bytes:
        off = 64 + i * ENTRY
        meta = self._tw[off // 8 + 1]
        if meta & (OOL | ARR):
            return entry_kv(self._tb, off)[1]
        return self._tb[off + 16 : off + 16 + ((meta >> 40) & 0xFF)].tobytes()

    def _form(self, i: int) -> Any:
        """The cacheable form of item i (array views made while the lock holds the block)."""
        vb = self._vb(i)
        return cache_form(vb) if vb[0] == codec.T_ARRAY else vb

    def _rows(self) -> list[bytes]:
        n = self._len()
        raw = self._tb[64 : 64 + n * ENTRY].tobytes()
        return [raw[i : i + ENTRY] for i in range(0, n * ENTRY, ENTRY)]

    def _values(self) -> list[Any]:
        """Every item, decoded afresh (lock held)."""
        return [_fresh(self._form(i)) for i in range(self._len())]

    def _index(self, i: Any, what: str = "list index out of range") -> int:
        if i.__class__ is not int:
            try:
                i = operator.index(i)
            except TypeError:
                raise TypeError(
                    f"list indices must be integers or slices, not {type(i).__name__}"
                ) from None
        n = self._len()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(what)
        return int(i)

    # -- writing (lock held) --------------------------------------------------------
    def _append_entries(self, entries: list[bytes]) -> None:
        tw = self._tw
        n = int(tw[0])
        if n + len(entries) > tw[1]:
            self._rebuild(None, max(8, (n + len(entries)) * 3 // 2))
            tw = self._tw
        hook = codec.fault_hook
        try:
            off = 64 + n * ENTRY
            for e in entries:
                if hook is not None:
                    hook()
                self._tb[off : off + len(e)] = e
                off += ENTRY
            if hook is not None:
                hook()
            tw[0] = n + len(entries)  # published
            if hook is not None:
                hook()
            self._hw[W_VERSION] += 1
        except BaseException:
            self._recover()
            raise

    def _rebuild(self, rows: list[bytes] | None, cap: int | None = None) -> None:
        """Switch to a new table holding ``rows`` (None: the current entries, resized)."""
        try:
            if rows is None:
                n = self._len()
                data: bytes | memoryview = self._tb[64 : 64 + n * ENTRY]
            else:
                n = len(rows)
                data = b"".join(rows)
            if cap is None:
                cap = max(8, n + n // 2)
            block = self._begin_table(_table_bytes(cap))
            nw = block.buf.cast("Q")
            step()
            nw[1] = cap
            block.buf[64 : 64 + n * ENTRY] = data
            nw[0] = n
            self._switch_table()
            self._bump()
        except BaseException:
            self._recover()
            raise

    def _set_entry(self, i: int, entry: bytes) -> None:
        try:
            self._overwrite(i, 64 + i * ENTRY, entry)
            self._bump()
        except BaseException:
            self._recover()
            raise

    def _pop_last(self) -> Any:
        tw = self._tw
        n = int(tw[0]) - 1
        off = 64 + n * ENTRY
        vb = self._vb(n)
        value = _private(vb)
        entry = self._tb[off : off + ENTRY].tobytes()
        try:
            step()
            tw[0] = n  # unpublished; a repair would free its blocks from here
            step()
            self._tb[off : off + ENTRY] = bytes(ENTRY)
            self._bump()
        except BaseException:
            self._recover()
            raise
        free_refs(entry)
        return value

    def _del_index(self, j: int) -> None:
        if j == self._len() - 1:
            self._pop_last()
        else:
            rows = self._rows()
            del rows[j]
            self._rebuild(rows)

    def _encode_all(self, values: Iterable[Any]) -> list[bytes]:
        """Entries for values, made before taking the lock (arrays copied, big values allocated)."""
        out: list[bytes] = []
        try:
            for v in values:
                out.append(_entry_for(encode_value(v, self._heap), self._heap))
        except BaseException:
            for e in out:
                free_refs(e)
            raise
        return out

    def _repair_table(self) -> None:
        pass

    def _check(self) -> list[str]:
        """Every inconsistency found (empty when healthy); takes the lock."""
        taken = self._acquire()
        try:
            problems = self._check_common()
            for i in range(self._len()):
                meta = self._tw[(64 + i * ENTRY) // 8 + 1]
                if meta & 3 != LIVE:
                    problems.append(f"item {i} is not live (meta {meta:#x})")
                    continue
                try:
                    vb = self._vb(i)
                    if vb[:1] != b"a":
                        decode(vb)
                except Exception as exc:
                    problems.append(f"item {i} does not decode: {exc!r}")
            return problems
        finally:
            if taken:
                self._release()

    # -- the sequence API ---------------------------------------------------------------
    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...
    def __getitem__(self, i: Any) -> Any:
        if self._hw[W_VERSION] == self._seen and i.__class__ is int:
            v = self._cache.get(i, _MISSING)
            if v is not _MISSING:
                return v.load() if v.__class__ is Pickled else v
        if isinstance(i, slice):
            taken = self._acquire()
            try:
                return [_fresh(self._form(j)) for j in range(*i.indices(self._len()))]
            finally:
                if taken:
                    self._release()
        taken = self._acquire()
        try:
            version = self._hw[W_VERSION]
            form = self._form(self._index(i))
        finally:
            if taken:
                self._release()
        if form.__class__ is bytes:
            form = cache_form(form)
        if i.__class__ is int:
            self._remember(i, form, version)
        return materialise(form)

    def __setitem__(self, i: Any, value: Any) -> None:
        if isinstance(i, slice):
            entries = self._encode_all(value)
            try:
                taken = self._acquire()
            except BaseException:
                for e in entries:
                    free_refs(e)
                raise
            try:
                rows = self._rows()
                try:
                    rows[i] = entries
                except BaseException:
                    for e in entries:
                        free_refs(e)
                    raise
                self._rebuild(rows)  # from here the repair owns the new entries' blocks
            finally:
                if taken:
                    self._release()
            return
        vb = encode_value(value, self._heap)
        try:
            entry = _entry_for(vb, self._heap)
        except BaseException:
            free_array_value(vb)
            raise
        try:
            taken = self._acquire()
        except BaseException:
            free_refs(entry)
            raise
        try:
            try:
                j = self._index(i, "list assignment index out of range")
            except BaseException:
                free_refs(entry)
                raise
            self._set_entry(j, entry)
        finally:
            if taken:
                self._release()

    def __delitem__(self, i: Any) -> None:
        taken = self._acquire()
        try:
            if isinstance(i, slice):
                rows = self._rows()
                del rows[i]
                if len(rows) != self._len():
                    self._rebuild(rows)
                return
            self._del_index(self._index(i, "list assignment index out of range"))
        finally:
            if taken:
                self._release()

    def __len__(self) -> int:
        taken = self._acquire()
        try:
            return self._len()
        finally:
            if taken:
                self._release()

    def append(self, value: Any) -> None:
        entries = self._encode_all((value,))
        try:
            taken = self._acquire()
        except BaseException:
            free_refs(entries[0])
            raise
        try:
            self._append_entries(entries)
        finally:
            if taken:
                self._release()

    def extend(self, values: Iterable[Any]) -> None:
        """Like list.extend; all the items appear in one atomic step."""
        if values is self:
            values = self.copy()
        entries = self._encode_all(values)
        if not entries:
            return
        try:
            taken = self._acquire()
        except BaseException:
            for e in entries:
                free_refs(e)
            raise
        try:
            self._append_entries(entries)
        finally:
            if taken:
                self._release()

    def insert(self, i: Any, value: Any) -> None:
        i = operator.index(i)
        entries = self._encode_all((value,))
        taken = self._acquire()
        try:
            n = self._len()
            if i < 0:
                i = max(0, i + n)
            if i >= n:
                self._append_entries(entries)
                return
            rows = self._rows()
            rows.insert(i, entries[0])
            self._rebuild(rows)
        finally:
            if taken:
                self._release()

    def pop(self, i: Any = -1) -> Any:
        taken = self._acquire()
        try:
            if not self._len():
                raise IndexError("pop from empty list")
            j = self._index(i, "pop index out of range")
            if j == self._len() - 1:
                return self._pop_last()
            value = _private(self._vb(j))
            rows = self._rows()
            del rows[j]
            self._rebuild(rows)
            return value
        finally:
            if taken:
                self._release()

    def remove(self, value: Any) -> None:
        taken = self._acquire()
        try:
            for j, v in enumerate(self._values()):
                if v is value or v == value:
                    self._del_index(j)
                    return
            raise ValueError("list.remove(x): x not in list")
        finally:
            if taken:
                self._release()

    def index(self, value: Any, start: Any = 0, stop: Any = sys.maxsize) -> int:
        values = self.copy()
        try:
            return values.index(value, start, stop)
        except ValueError:
            raise ValueError(f"{value!r} is not in list") from None

    def count(self, value: Any) -> int:
        return self.copy().count(value)

    def __contains__(self, value: Any) -> bool:
        return value in self.copy()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.copy())

    def __reversed__(self) -> Iterator[Any]:
        return iter(self.copy()[::-1])

    def reverse(self) -> None:
        taken = self._acquire()
        try:
            rows = self._rows()
            if len(rows) > 1:
                rows.reverse()
                self._rebuild(rows, int(self._tw[1]))
        finally:
            if taken:
                self._release()

    def sort(self, *, key: Callable[[Any], Any] | None = None, reverse: bool = False) -> None:
        """Like list.sort (stable; on error the list is left unchanged)."""
        taken = self._acquire()
        try:
            values = self._values()
            keys = values if key is None else [key(v) for v in values]
            order = sorted(range(len(values)), key=keys.__getitem__, reverse=bool(reverse))
            if order != list(range(len(values))):
                rows = self._rows()
                self._rebuild([rows[j] for j in order], int(self._tw[1]))
        finally:
            if taken:
                self._release()

    def clear(self) -> None:
        taken = self._acquire()
        try:
            if self._len() or self._tw[1] > 8:
                self._rebuild([], 8)
        finally:
            if taken:
                self._release()

    def copy(self) -> list[Any]:
        """A plain list with the current items (as Manager().list()[:] gives)."""
        taken = self._acquire()
        try:
            forms = [self._form(i) for i in range(self._len())]
        finally:
            if taken:
                self._release()
        return [_fresh(f) for f in forms]

    def update_with(self, i: Any, fn: Callable[[Any], Any]) -> Any:
        """Atomically ``l[i] = fn(l[i])``; return the new value (``fn`` runs under the lock)."""
        taken = self._acquire()
        try:
            j = self._index(i)
            new = fn(_fresh(self._form(j)))
            entry = _entry_for(encode_value(new, self._heap), self._heap)
            self._set_entry(j, entry)
            return new
        finally:
            if taken:
                self._release()

    def __iadd__(self, values: Iterable[Any]) -> SharedList:  # type: ignore[misc]
        self.extend(values)
        return self

    def __imul__(self, n: Any) -> SharedList:
        n = operator.index(n)
        taken = self._acquire()
        try:
            if n <= 0:
                if self._len():
                    self._rebuild([], 8)
            elif n > 1 and self._len():
                values = self._values()
                extra = self._encode_all(values * (n - 1))  # copies: every entry owns its blocks
                self._append_entries(extra)
        finally:
            if taken:
                self._release()
        return self

    def __add__(self, other: Any) -> list[Any]:
        if isinstance(other, SharedList):
            other = other.copy()
        if not isinstance(other, list):
            return NotImplemented
        return self.copy() + other

    def __radd__(self, other: Any) -> list[Any]:
        if not isinstance(other, list):
            return NotImplemented
        return other + self.copy()

    def __mul__(self, n: Any) -> list[Any]:
        out: list[Any] = self.copy() * n
        return out

    __rmul__ = __mul__

    def _cmp_other(self, other: Any) -> list[Any] | None:
        if isinstance(other, SharedList):
            return other.copy()
        if isinstance(other, list):
            return other
        return None

    def __eq__(self, other: object) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self.copy() == o

    def __ne__(self, other: object) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self.copy() != o

    def __lt__(self, other: Any) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self.copy() < o

    def __le__(self, other: Any) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self.copy() <= o

    def __gt__(self, other: Any) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self.copy() > o

    def __ge__(self, other: Any) -> bool:
        o = self._cmp_other(other)
        return NotImplemented if o is None else self.copy() >= o

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.copy())


def _fresh(form: Any) -> Any:
    """A value for the caller from a _form: decoded anew unless it is an array view."""
    if form.__class__ is bytes:
        return decode(form)
    return materialise(form)


def _private(vb: bytes) -> Any:
    """A value whose storage is about to be freed: arrays as a private copy."""
    if vb[0] == codec.T_ARRAY:
        return np.array(codec.decode_array(vb))
    return decode(vb)


def _attach(data: bytes) -> SharedList:
    result: SharedList = SharedList._attach(data)
    return result
