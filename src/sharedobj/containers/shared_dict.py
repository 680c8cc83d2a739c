"""SharedDict: a dict in shared memory that every process sees, with the builtin's API.

Layout.  The header (codec.SharedContainer) holds the lock, the version and
the handle of the active table.  A table is one block::

    words 0-4   used (entries published: the commit count), live count,
                log2 of the index size, entry capacity, deletions (see below)
    words 8..   the index: open addressing with linear probing, one u64 per
                slot: 0 empty, DUMMY deleted, else entry number + 1
    then        the entries, 64 bytes each, in insertion order (as CPython's
                compact dict): the order of iteration, and popitem is LIFO
    then        the change log: one u64 per entry (see Reads)

A set of a new key writes its entry past ``used``, its index slot, then
``used`` (one store publishes it).  Growing builds a compacted table of twice
the size aside, copying entries with numpy and building the index with a
vectorised linear-probing pass, then switches tables with one store, so a
resize costs one memcpy-like pass, not a per-key Python loop.  The index and
the live count are derived data: the crash repair rebuilds them.

Reads.  Each process keeps a cache of decoded values keyed by the Python key,
valid as of the version it has seen: a cached ``d[k]`` is one word compare
and one dict lookup.  Every change bumps the shared version, so the next read
takes the lock; it then replays the change log instead of forgetting the
cache.  Each change stores ``(version, entry)`` in log slot ``version mod
capacity`` just before publishing the version, so a process that is up to
``capacity`` versions behind re-reads exactly the entries logged since (one
lock for the lot) and keeps every other cached key.  A record whose version
tag does not match (a newer table, a crash repair, a change the log cannot
describe such as removing the last entry) makes the reader start afresh, as
does falling further behind: the log is a shortcut, never the only truth.

Writes by key.  Entries never move inside a table, and the deletion counter
(table word 4, bumped before any delete) tells a process whether an entry
number it remembers for a key may have been reused, so an overwrite of a key
this process has used before skips the hashing and the index probe.

Semantics that differ from a dict, on purpose (the same as
``multiprocessing.Manager().dict()``): values come back as *copies*
(``d['x'].append(1)`` changes nothing stored; write back with ``d['x'] = v``
or ``update_with``); iteration walks a snapshot taken when it starts (no
"changed size during iteration" error: other processes may write any time);
``copy()`` returns a plain dict.  numpy arrays are stored as a shared array of
the heap and read back as a read-only zero-copy SharedArray view; the array
is freed when its key is overwritten or deleted: a view obtained earlier stays
mapped (never a crash) but may then show other data.  ``pop``/``popitem``
return a private copy of an array value.  See codec.py for the key rules.
"""

from __future__ import annotations

from collections.abc import (
    Callable,
    ItemsView,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    ValuesView,
)
from threading import get_ident
from typing import Any

import numpy as np

from ..heap import Block, Heap
from . import codec
from .codec import (
    _QQ,
    ARR,
    CACHE_MAX,
    DELETED,
    ENTRY,
    H_SAVED,
    INLINE,
    LIVE,
    M64,
    OOL,
    SMALL_LIMIT,
    SMALLKEY,
    T_ARRAY,
    T_STR,
    W_TSEQ,
    W_UNDO,
    W_VERSION,
    Pickled,
    SharedContainer,
    cache_form,
    decode,
    encode_key,
    encode_value,
    entry_kv,
    free_array_value,
    free_refs,
    keys_match,
    make_entry,
    step,
)

__all__ = ["SharedDict"]

FIB = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads sequential int keys over the index
DUMMY = M64
_MISSING: Any = object()
_DICT_KIND = 0x74636944  # "Dict"
_VLEN_OFF = M64 ^ (0xFF << 40)
_SAVED = slice(H_SAVED, H_SAVED + ENTRY)  # the undo area's old entry
_qpack = codec._q.pack
W_DELETES = 4  # table word: bumped before every delete (entry numbers may be reused)
# a log record: the low 24 bits of its version, then entry number + 1 (0: "anything changed")
_TAG_SHIFT = 40
_TAG_MASK = 0xFF_FFFF
_EI_MASK = (1 << _TAG_SHIFT) - 1
# what a deleted entry keeps of its meta word, so the log can name its key
_KEEP = SMALLKEY | (0xFFFF_FFFF << 8)
_NOT_LIVE_INLINE = 3 | OOL | ARR
# a log replay's common case: a live small-int key (its own hash) with an inline value
_SIMPLE_MASK = _NOT_LIVE_INLINE | SMALLKEY
_SIMPLE = LIVE | SMALLKEY
_SMALL_KLEN = 9  # b"i" + 8 bytes; meta bits above the value length are zero
_NUMPY_REPLAY = 48  # longer log windows are read with numpy
_REPLAY_MAX = 1 << 16  # longer ones are not replayed: the cache starts afresh
_UNCACHED_TAGS = frozenset((codec.T_PICKLE, codec.T_CLOUD))  # keys matched by pickle bytes
_NAN_TAGS = frozenset((codec.T_FLOAT, codec.T_TUPLE))
#: As keys these always hash and match entries as Python compares them (NaN aside: see
#: _reflexive); as values they decode to an equal object of the same type.
_SCALARS = frozenset((int, str, bytes, bool, float, type(None)))


def _table_bytes(bits: int) -> tuple[int, int]:
    icap = 1 << bits
    ecap = icap * 2 // 3
    return 64 + icap * 8 + ecap * (ENTRY + 8), ecap


def _key_of(key: Any) -> tuple[bytes, int, int]:
    """(encoding, stable hash, SMALLKEY or 0) of a key; TypeError if it is unhashable."""
    if key.__class__ is int and -SMALL_LIMIT < key < SMALL_LIMIT and key != -1:
        return b"i" + _qpack(key), key & M64, SMALLKEY
    kb, h = encode_key(key)
    return kb, h, 0


def _fast_tuple(key: tuple[Any, ...]) -> bool:
    """Is the tuple encoded element by element (so it matches keys as Python compares them)?

    A tuple holding anything else is pickled whole and matches by its pickle:
    ``(Decimal(1),)`` is not the entry of ``(1,)``, although they are equal,
    so the read cache (which finds keys by equality) must not hold such keys.
    """
    for x in key:
        c = x.__class__
        if c not in _SCALARS and (c is not tuple or not _fast_tuple(x)):
            return False
    return True


def _inline_form(vb: bytes) -> Any:
    """cache_form, with the str case first."""
    if vb[0] == T_STR:
        return vb[1:].decode("utf-8", "surrogatepass")
    return cache_form(vb)


def _reflexive(key: Any) -> bool:
    """Does the key equal itself (no NaN inside)?  Only then can a cache find it by equality."""
    if key.__class__ is tuple:
        return all(_reflexive(x) for x in key)
    return bool(key == key)


def _bits_for(n: int) -> int:
    """log2 of an index size whose entry capacity holds 2n entries (at least 8 slots)."""
    bits = 3
    while (1 << bits) * 2 // 3 < 2 * n:
        bits += 1
    return bits


def _entries(buf: memoryview, base: int, cap: int) -> np.ndarray[Any, Any]:
    return np.frombuffer(buf, dtype=np.uint64, count=cap * 8, offset=base).reshape(cap, 8)


def _build_index(index: np.ndarray[Any, Any], hashes: np.ndarray[Any, Any], ids: Any) -> None:
    """Place entries ``ids`` (hashes ``hashes``) in an empty index, linear probing, vectorised.

    Each round puts, for every contested slot, one of its candidates there if
    the slot is free; the others move one slot on.  An entry thus only moves
    past occupied slots, which is all a linear-probing lookup needs.
    """
    mask = len(index) - 1
    shift = np.uint64(64 - (len(index).bit_length() - 1))
    pos = ((hashes * np.uint64(FIB)) >> shift).astype(np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    while ids.size:
        slots, first = np.unique(pos, return_index=True)
        win = first[index[slots] == 0]
        index[pos[win]] = (ids[win] + 1).astype(np.uint64)
        lose = np.ones(ids.size, dtype=bool)
        lose[win] = False
        ids = ids[lose]
        pos = (pos[lose] + 1) & mask


class SharedDict(SharedContainer, MutableMapping[Any, Any]):
    """A dict shared by processes; create it with ``SharedMemoryManager().dict()``."""

    KIND = _DICT_KIND
    __slots__ = (
        "_base",
        "_ebase",
        "_ecap",
        "_layout",
        "_log",
        "_mask",
        "_rbase",
        "_shift",
        "_slots",
    )

    _ebase: int  # word offset of the entries
    _base: int  # byte offset of the entries
    _ecap: int
    _mask: int
    _shift: int
    _rbase: int  # word offset of the change log
    _log: memoryview  # the change log's words
    _slots: dict[Any, int]  # key -> its entry number in this table (see _layout)
    _layout: int  # the table's deletion count when _slots was last known valid

    @classmethod
    def create(cls, heap: Heap, mapping: Any = (), /, **kwargs: Any) -> SharedDict:
        """A new shared dict on ``heap`` holding ``dict(mapping, **kwargs)``."""
        if not isinstance(heap, Heap):
            raise TypeError(f"SharedDict.create needs a Heap, not {type(heap).__name__}")
        items = dict(mapping, **kwargs)  # the dict constructor's errors and semantics
        self: SharedDict = cls._new(heap, _table_bytes(3)[0])
        if items:
            self.update(items)
        return self

    def _init_table(self, table: Block) -> None:
        self._write_geometry(table.buf.cast("Q"), 3)
        self._open_table()

    @staticmethod
    def _write_geometry(words: memoryview, bits: int) -> None:
        words[2] = bits
        words[3] = _table_bytes(bits)[1]

    def _geometry(self, words: memoryview) -> tuple[int, int]:
        bits = int(words[2])
        if bits == 0:
            return 64, 0
        if bits > 40 or _table_bytes(bits)[0] > len(words) * 8:
            raise RuntimeError(f"corrupt SharedDict table (index of 2**{bits} slots)")
        return 64 + (8 << bits), int(words[3])

    def _table_changed(self) -> None:
        bits = int(self._tw[2])
        self._mask = (1 << bits) - 1
        self._shift = 64 - bits
        self._base, self._ecap = self._geometry(self._tw)
        self._ebase = self._base // 8
        self._rbase = self._ebase + self._ecap * 8
        self._log = self._tw[self._rbase : self._rbase + self._ecap]
        self._slots = {}
        self._layout = int(self._tw[W_DELETES])

    def _check_layout(self) -> None:
        """Forget the key -> entry map if a delete may have reused entries (lock held)."""
        deletes = self._tw[W_DELETES]
        if deletes != self._layout:
            self._slots = {}
            self._layout = deletes

    # -- lookup (lock held) -------------------------------------------------------------
    def _find(self, kb: bytes, h: int, key: Any, small: int = 0) -> tuple[int, int]:
        """(entry number or -1, index slot holding it or where it would go).

        ``small``: the key is a SMALLKEY int, so an equal hash on a SMALLKEY
        entry is a match without comparing bytes.
        """
        tw = self._tw
        mask = self._mask
        ebase = self._ebase
        i = (h * FIB >> self._shift) & mask
        free = -1
        while True:
            e = tw[8 + i]
            if e == 0:
                return -1, (i if free < 0 else free)
            if e == DUMMY:
                if free < 0:
                    free = i
            else:
                w = ebase + (e - 1) * 8
                if tw[w] == h:
                    meta = tw[w + 1]
                    if small and meta & SMALLKEY:
                        return e - 1, i
                    if not meta & OOL and (meta >> 8) & 0xFFFF_FFFF == len(kb):
                        o = w * 8 + 16
                        if self._tb[o : o + len(kb)].tobytes() == kb:
                            return e - 1, i
                    if self._slow_match(w * 8, kb, key):
                        return e - 1, i
            i = (i + 1) & mask

    def _slow_match(self, off: int, kb: bytes, key: Any) -> bool:
        stored, _ = entry_kv(self._tb, off)
        return stored == kb or keys_match(stored, kb, key)

    def _slot_of(self, ei: int) -> int:
        tw = self._tw
        mask = self._mask
        i = (int(tw[self._ebase + ei * 8]) * FIB >> self._shift) & mask
        while True:
            e = tw[8 + i]
            if e == ei + 1:
                return i
            if e == 0:
                raise RuntimeError(f"corrupt SharedDict: entry {ei} is not in the index")
            i = (i + 1) & mask

    def _value_at(self, ei: int) -> bytes:
        return entry_kv(self._tb, self._base + ei * ENTRY)[1]

    # -- writes (lock held) -----------------------------------------------------------
    def _commit(self, ei: int) -> None:
        """Log entry ``ei`` (-1: anything) as the next version's change, then publish it."""
        hw = self._hw
        v = hw[W_VERSION] + 1
        step()
        self._log[v % self._ecap] = ((v & _TAG_MASK) << _TAG_SHIFT) | (ei + 1)
        step()
        hw[W_VERSION] = v

    def _set_inline(self, ei: int, vb: bytes) -> int:
        """Replace the value of entry ``ei`` in place if it is live and inline and ``vb`` fits.

        The new version, or 0 if it did not fit.  The stored key stays (1
        stays 1 when 1.0 is set).  The old entry is saved in the undo area
        first: the value bytes are not one store.
        """
        tw = self._tw
        w = self._ebase + ei * 8
        meta = tw[w + 1]
        klen = (meta >> 8) & 0xFFFF_FFFF
        n = len(vb)
        if meta & _NOT_LIVE_INLINE != LIVE or klen + n > INLINE or vb[0] == T_ARRAY:
            return 0
        off = w * 8
        hw = self._hw
        hook = codec.fault_hook
        try:
            if hook is not None:
                hook()
            self._hb[_SAVED] = self._tb[off : off + ENTRY]
            if hook is not None:
                hook()
            hw[W_UNDO] = ei + 1
            if hook is not None:
                hook()
            if (meta >> 40) & 0xFF != n:
                tw[w + 1] = (meta & _VLEN_OFF) | (n << 40)
            o = off + 16 + klen
            self._tb[o : o + n] = vb
            if hook is not None:
                hook()
            hw[W_UNDO] = 0
            # _commit(ei), inlined: the call is 7% of an overwrite (callgrind)
            v = hw[W_VERSION] + 1
            if hook is not None:
                hook()
            self._log[v % self._ecap] = ((v & _TAG_MASK) << _TAG_SHIFT) | (ei + 1)
            if hook is not None:
                hook()
            hw[W_VERSION] = v
        except BaseException:
            self._recover()
            raise
        return v

    def _put(self, kb: bytes, h: int, vb: bytes, key: Any, small: int = 0) -> int:
        """Store ``vb`` under the key; its entry number."""
        ei, slot = self._find(kb, h, key, small)
        tw = self._tw
        if ei >= 0:
            if self._set_inline(ei, vb):
                return ei
            off = (self._ebase + ei * 8) * 8
            meta = tw[self._ebase + ei * 8 + 1]
            klen = (meta >> 8) & 0xFFFF_FFFF
            if meta & OOL or klen != len(kb) or self._tb[off + 16 : off + 16 + klen] != kb:
                kb = entry_kv(self._tb, off)[0]  # keep the key first stored
            entry = make_entry(h, kb, vb, self._heap, meta & SMALLKEY)
            try:
                self._overwrite(ei, off, entry)
                self._commit(ei)
            except BaseException:
                self._recover()
                raise
            return ei
        used = tw[0]
        if used >= self._ecap:
            self._grow()
            tw = self._tw
            ei, slot = self._find(kb, h, key, small)
            used = tw[0]
        off = self._base + used * ENTRY
        n = len(kb) + len(vb)
        try:
            step()
            if n <= INLINE:  # arrays never fit: their encoding holds a handle and a pickle
                _QQ.pack_into(self._tb, off, h, LIVE | small | (len(kb) << 8) | (len(vb) << 40))
                self._tb[off + 16 : off + 16 + n] = kb + vb
            else:
                self._tb[off : off + ENTRY] = make_entry(h, kb, vb, self._heap, small)
            step()
            tw[8 + slot] = used + 1
            step()
            tw[0] = used + 1  # published
            step()
            tw[1] += 1
            self._commit(used)
        except BaseException:
            self._recover()
            raise
        return int(used)

    def _delete(self, ei: int, slot: int) -> None:
        tw = self._tw
        w = self._ebase + ei * 8
        off = w * 8
        meta = tw[w + 1]
        entry = bytes(self._tb[off : off + ENTRY]) if meta & (OOL | ARR) else None
        try:
            step()
            tw[W_DELETES] += 1  # first: other processes forget the entry numbers they know
            used = tw[0]
            if ei == used - 1:  # the last entry (popitem): shrink, as a stack would
                step()
                self._tb[off : off + ENTRY] = bytes(ENTRY)
                step()
                tw[8 + slot] = DUMMY
                step()
                tw[0] = ei
                logged = -1  # its number will name another key: the log cannot say which
            else:
                step()
                # unpublished (one word); an inline key stays readable for the log
                tw[w + 1] = DELETED | (0 if meta & OOL else meta & _KEEP)
                step()
                tw[8 + slot] = DUMMY
                logged = ei
            step()
            tw[1] -= 1
            self._commit(logged)
        except BaseException:
            self._recover()
            raise
        if entry is not None:
            free_refs(entry)

    def _grow(self) -> None:
        """Compact into a new table with room for twice the live entries, switch to it."""
        tw, tb = self._tw, self._tb
        used = int(tw[0])
        old = _entries(tb, self._base, self._ecap)[:used]
        live = np.flatnonzero((old[:, 1] & np.uint64(3)) == LIVE)
        bits = _bits_for(len(live))
        nbytes, ecap = _table_bytes(bits)
        try:
            block = self._begin_table(nbytes)
            nw = block.buf.cast("Q")
            step()
            self._write_geometry(nw, bits)
            base = 64 + (8 << bits)
            new = _entries(block.buf, base, ecap)
            step()
            new[: len(live)] = old[live]
            _build_index(
                np.frombuffer(block.buf, np.uint64, count=1 << bits, offset=64),
                new[: len(live), 0].copy(),
                np.arange(len(live)),
            )
            nw[0] = nw[1] = len(live)
            self._switch_table()
        except BaseException:
            self._recover()
            raise

    def _repair_table(self) -> None:
        tw, tb = self._tw, self._tb
        used = int(tw[0])
        ents = _entries(tb, self._base, self._ecap)[:used]
        live = np.flatnonzero((ents[:, 1] & np.uint64(3)) == LIVE)
        index = np.frombuffer(tb, np.uint64, count=self._mask + 1, offset=64)
        index[:] = 0
        _build_index(index, ents[live, 0].copy(), live)
        tw[1] = len(live)
        # _recover publishes the next version: log it as "anything changed"
        v = int(self._hw[W_VERSION]) + 1
        self._log[v % self._ecap] = (v & _TAG_MASK) << _TAG_SHIFT

    def _check(self) -> list[str]:
        """Every inconsistency found (empty when healthy); takes the lock."""
        taken = self._acquire()
        try:
            problems = self._check_common()
            tw, tb = self._tw, self._tb
            used = int(tw[0])
            ents = _entries(tb, self._base, self._ecap)[:used]
            states = ents[:, 1] & np.uint64(3)
            live = np.flatnonzero(states == LIVE)
            if int(tw[1]) != len(live):
                problems.append(f"count {int(tw[1])} but {len(live)} live entries")
            index = np.frombuffer(tb, np.uint64, count=self._mask + 1, offset=64)
            refs = index[(index != 0) & (index != DUMMY)].astype(np.int64) - 1
            if sorted(refs.tolist()) != live.tolist():
                problems.append("the index does not name exactly the live entries")
            v = int(self._hw[W_VERSION])
            rec = int(self._log[v % self._ecap])
            if rec >> _TAG_SHIFT == v & _TAG_MASK and (rec & _EI_MASK) > used:
                problems.append(f"the log names entry {(rec & _EI_MASK) - 1} beyond the count")
            seen: set[bytes] = set()
            for ei in live.tolist():
                try:
                    kb, vb = entry_kv(tb, self._base + ei * ENTRY)
                    decode(kb)
                    if vb[:1] != b"a":
                        decode(vb)
                except Exception as exc:
                    problems.append(f"entry {ei} does not decode: {exc!r}")
                    continue
                if kb in seen:
                    problems.append(f"key {kb!r} stored twice")
                seen.add(kb)
                h = int(ents[ei, 0])
                e, _slot = self._find(kb, h, _MISSING)
                if e != ei:
                    problems.append(f"entry {ei} is not found by lookup")
            return problems
        finally:
            if taken:
                self._release()

    # -- the mapping API ----------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        if self._hw[W_VERSION] == self._seen and (
            key.__class__ in _SCALARS or (key.__class__ is tuple and _fast_tuple(key))
        ):
            v = self._cache.get(key, _MISSING)
            if v is not _MISSING:
                if v.__class__ is Pickled:
                    return v.load()
                if v is _ABSENT:
                    raise KeyError(key)
                return v
        return self._get_slow(key, _MISSING)

    def _get_slow(self, key: Any, default: Any) -> Any:
        kc = key.__class__
        cacheable = kc in _SCALARS or (kc is tuple and _fast_tuple(key))
        taken = self._acquire()
        try:
            version = self._hw[W_VERSION]
            if version != self._seen:
                self._catch_up(version)
            form = self._cache.get(key, _MISSING) if cacheable else _MISSING
            if form is _MISSING:
                form = self._lookup(key)
                if cacheable:
                    cache = self._cache
                    if len(cache) >= CACHE_MAX:
                        cache.clear()
                    cache[key] = form
        finally:
            if taken and self._ul(self._ptr):
                self._mutex.release()
        if form is _ABSENT:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return form.load() if form.__class__ is Pickled else form

    def _lookup(self, key: Any) -> Any:
        """The cache form of the key's value, or _ABSENT (lock held)."""
        if key.__class__ in _SCALARS:
            if self._tw[W_DELETES] != self._layout:
                self._check_layout()
            slots = self._slots
            ei = slots.get(key, -1)
            if ei < 0:
                kb, h, small = _key_of(key)
                ei = self._find(kb, h, key, small)[0]
                if ei < 0:
                    return _ABSENT
                if len(slots) >= CACHE_MAX:
                    slots.clear()
                slots[key] = ei
        else:
            kb, h, small = _key_of(key)
            ei = self._find(kb, h, key, small)[0]
            if ei < 0:
                return _ABSENT
        return self._form_at(ei)

    def _form_at(self, ei: int) -> Any:
        """The cache form of live entry ``ei``'s value (lock held: array views need it)."""
        w = self._ebase + ei * 8
        meta = self._tw[w + 1]
        if meta & (OOL | ARR):
            return cache_form(entry_kv(self._tb, w * 8)[1])
        o = w * 8 + 16 + ((meta >> 8) & 0xFFFF_FFFF)
        return cache_form(self._tb[o : o + ((meta >> 40) & 0xFF)].tobytes())

    def _catch_up(self, version: int) -> None:
        """Make the read cache describe ``version`` (lock held): replay the log, or forget.

        A logged change costs the replay a fraction of a locked read (a tenth
        when its key is not cached, a third when it is): past about 16 changes
        per cached key, forgetting and reading again on demand is cheaper.
        The lock is held meanwhile, so a replay is also kept under about
        _REPLAY_MAX changes (some tens of milliseconds).
        """
        cache = self._cache
        seen = self._seen
        behind = version - seen
        if not (
            cache
            and seen >= 0
            and 0 < behind <= min(self._ecap, 16 * len(cache) + 64, _REPLAY_MAX)
            and self._replay(seen + 1, version + 1)
        ):
            cache.clear()
        self._seen = version

    def _replay(self, first: int, end: int) -> bool:
        """Refresh or drop the cached keys of the entries logged for versions [first, end).

        False when the log cannot tell (a record of another table or version,
        an "anything changed" record, a key the cache cannot find by equality):
        the caller then forgets the whole cache.
        """
        if end - first > _NUMPY_REPLAY:
            return self._replay_many(first, end)
        log, cap = self._log, self._ecap
        eis = set()
        for v in range(first, end):
            rec = log[v % cap]
            if rec >> _TAG_SHIFT != v & _TAG_MASK or not rec & _EI_MASK:
                return False
            eis.add((rec & _EI_MASK) - 1)
        tw, tb = self._tw, self._tb
        if max(eis) >= tw[0]:
            return False
        cache = self._cache
        ebase = self._ebase
        for ei in sorted(eis):
            w = ebase + ei * 8
            meta = tw[w + 1]
            if meta & _SIMPLE_MASK == _SIMPLE:
                key = tw[w]
                if key >> 63:
                    key -= 1 << 64
                if key in cache:
                    o = w * 8 + 16 + _SMALL_KLEN
                    cache[key] = _inline_form(tb[o : o + (meta >> 40)].tobytes())
            elif not self._refresh(ei):
                return False
        return True

    def _replay_many(self, first: int, end: int) -> bool:
        """_replay for a long window: the log and the simple entries are read with numpy."""
        cap = self._ecap
        ring = np.frombuffer(self._tb, np.uint64, count=cap, offset=self._rbase * 8)
        at = first % cap
        n = end - first
        recs = (
            ring[at : at + n]
            if at + n <= cap
            else np.concatenate((ring[at:], ring[: at + n - cap]))
        )
        expected = np.arange(first, end, dtype=np.uint64) & np.uint64(_TAG_MASK)
        if not np.array_equal(recs >> np.uint64(_TAG_SHIFT), expected):
            return False
        logged = np.sort(recs & np.uint64(_EI_MASK))  # entry numbers + 1, each once below
        keep = np.empty(n, dtype=bool)
        keep[0] = True
        np.not_equal(logged[1:], logged[:-1], out=keep[1:])
        idx = logged[keep].astype(np.intp) - 1
        if idx[0] < 0 or idx[-1] >= self._tw[0]:
            return False
        rows = _entries(self._tb, self._base, cap)[idx]
        simple = (rows[:, 1] & np.uint64(_SIMPLE_MASK)) == np.uint64(_SIMPLE)
        if not simple.all():
            if not all(self._refresh(ei) for ei in idx[~simple].tolist()):
                return False
            rows = rows[simple]
        blob = rows.tobytes()
        cache = self._cache
        keys = rows[:, 0].view(np.int64).tolist()  # a small-int key is its own hash
        vlens = (rows[:, 1] >> np.uint64(40)).tolist()
        starts = range(16 + _SMALL_KLEN, len(blob), ENTRY)
        for key, o, vlen in zip(keys, starts, vlens, strict=True):
            if key in cache:
                cache[key] = _inline_form(blob[o : o + vlen])
        return True

    def _refresh(self, ei: int) -> bool:
        """Refresh or drop the cached key of logged entry ``ei`` (published); False: cannot tell."""
        tw, tb = self._tw, self._tb
        w = self._ebase + ei * 8
        meta = tw[w + 1]
        state = meta & 3
        if meta & SMALLKEY:
            key: Any = tw[w]
            if key >> 63:
                key -= 1 << 64
        else:
            if meta & OOL:
                kb = entry_kv(tb, w * 8)[0] if state == LIVE else b""
            else:
                kb = tb[w * 8 + 16 : w * 8 + 16 + ((meta >> 8) & 0xFFFF_FFFF)].tobytes()
            if not kb:
                return False  # a deleted key gone out of line: which one?
            if kb[0] in _UNCACHED_TAGS:
                return True  # matched by its pickle: never cached (see _fast_tuple)
            key = decode(kb)
            if kb[0] in _NAN_TAGS and not _reflexive(key):
                return False
        cache = self._cache
        if state == LIVE:
            if key in cache:
                cache[key] = self._form_at(ei)
        elif state == DELETED:
            cache.pop(key, None)
        else:
            return False
        return True

    def get(self, key: Any, default: Any = None) -> Any:
        if self._hw[W_VERSION] == self._seen and (
            key.__class__ in _SCALARS or (key.__class__ is tuple and _fast_tuple(key))
        ):
            v = self._cache.get(key, _MISSING)
            if v is not _MISSING:
                if v.__class__ is Pickled:
                    return v.load()
                if v is _ABSENT:
                    return default
                return v
        return self._get_slow(key, default)

    def __contains__(self, key: Any) -> bool:
        return self.get(key, _ABSENT) is not _ABSENT

    def __setitem__(self, key: Any, value: Any) -> None:
        if key.__class__ in _SCALARS:
            kb = None  # these always hash; encoded only if this process has no entry number
            h = 0
        else:
            kb, h = encode_key(key)  # an unhashable key fails before an array is copied in
        if value.__class__ is str:
            vb = b"s" + value.encode("utf-8", "surrogatepass")
        else:
            vb = encode_value(value, self._heap)
        try:
            if self._depth and self._holder == get_ident():
                taken = False
            else:
                rc = self._tl(self._ptr)
                if rc or self._flag[0]:
                    self._mutex._acquire_slow(rc, True, None)
                taken = True
                if self._hw[W_TSEQ] != self._tseq:
                    self._open_table()
        except BaseException:
            free_array_value(vb)
            raise
        try:
            if kb is None:
                if self._tw[W_DELETES] != self._layout:
                    self._check_layout()
                ei = self._slots.get(key, -1)
                version = self._set_inline(ei, vb) if ei >= 0 else 0
                if not version:
                    kb, h, small = _key_of(key)
                    ei = self._put(kb, h, vb, key, small)
                    slots = self._slots  # a new one if _put grew the table
                    if len(slots) >= CACHE_MAX:
                        slots.clear()
                    slots[key] = ei
                    version = self._hw[W_VERSION]
                if self._seen == version - 1 and (key.__class__ is not float or key == key):
                    # the only change since the cache was valid is ours: keep it valid
                    cache = self._cache
                    if key in cache:
                        if value.__class__ in _SCALARS:
                            cache[key] = value
                        else:
                            del cache[key]
                    self._seen = version
            else:
                self._put(kb, h, vb, key)
        finally:
            if taken and self._ul(self._ptr):
                self._mutex.release()

    def __delitem__(self, key: Any) -> None:
        self._pop(key, _MISSING, want=False)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        return self._pop(key, default, want=True)

    def _pop(self, key: Any, default: Any, *, want: bool) -> Any:
        kb, h, small = _key_of(key)
        taken = self._acquire()
        try:
            ei, slot = self._find(kb, h, key, small)
            if ei < 0:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            value = _private(self._value_at(ei)) if want else None
            self._delete(ei, slot)
            return value
        finally:
            if taken:
                self._release()

    def popitem(self) -> tuple[Any, Any]:
        taken = self._acquire()
        try:
            tw = self._tw
            ei = int(tw[0]) - 1
            while ei >= 0 and tw[self._ebase + ei * 8 + 1] & 3 != LIVE:
                ei -= 1
            if ei < 0:
                raise KeyError("popitem(): dictionary is empty")
            kb, vb = entry_kv(self._tb, self._base + ei * ENTRY)
            item = (decode(kb), _private(vb))
            self._delete(ei, self._slot_of(ei))
            return item
        finally:
            if taken:
                self._release()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        kb, h, small = _key_of(key)
        taken = self._acquire()
        try:
            ei, _slot = self._find(kb, h, key, small)
            if ei >= 0:
                return _fresh(self._value_at(ei))
            self._put(kb, h, encode_value(default, self._heap), key, small)
            return default
        finally:
            if taken:
                self._release()

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Like dict.update; all the items are written in one atomic step."""
        if isinstance(other, SharedDict):
            other = other._snapshot()
        elif isinstance(other, Mapping):
            other = [(k, other[k]) for k in other]
        elif hasattr(other, "keys"):
            other = [(k, other[k]) for k in other.keys()]  # noqa: SIM118 - the protocol
        pairs: list[tuple[Any, Any]] = []
        for n, item in enumerate(other):
            try:
                k, v = item
            except (TypeError, ValueError):
                try:
                    size = len(item)
                except TypeError:
                    raise TypeError(
                        f"cannot convert dictionary update sequence element #{n} to a sequence"
                    ) from None
                raise ValueError(
                    f"dictionary update sequence element #{n} has length {size}; 2 is required"
                ) from None
            pairs.append((k, v))
        pairs.extend(kwargs.items())
        if not pairs:
            return
        encoded = []
        try:
            for k, v in pairs:
                kb, h, small = _key_of(k)
                encoded.append((kb, h, small, encode_value(v, self._heap), k))
            taken = self._acquire()
        except BaseException:
            for item in encoded:
                free_array_value(item[3])
            raise
        try:
            for kb, h, small, vb, k in encoded:
                self._put(kb, h, vb, k, small)
        finally:
            if taken:
                self._release()

    def update_with(self, key: Any, fn: Callable[[Any], Any], default: Any = _MISSING) -> Any:
        """Atomically ``d[key] = fn(d[key])`` (or ``fn(default)`` when absent); return it.

        ``fn`` runs under the dict's lock: no other process changes the dict
        meanwhile, so counters updated this way never lose an increment.
        """
        kb, h, small = _key_of(key)
        taken = self._acquire()
        try:
            ei, _slot = self._find(kb, h, key, small)
            if ei >= 0:
                current = _fresh(self._value_at(ei))
            elif default is _MISSING:
                raise KeyError(key)
            else:
                current = default
            new = fn(current)
            self._put(kb, h, encode_value(new, self._heap), key, small)
            return new
        finally:
            if taken:
                self._release()

    def clear(self) -> None:
        taken = self._acquire()
        try:
            try:
                block = self._begin_table(_table_bytes(3)[0])
                step()
                self._write_geometry(block.buf.cast("Q"), 3)
                self._switch_table()
                self._commit(-1)
            except BaseException:
                self._recover()
                raise
        finally:
            if taken:
                self._release()

    def __len__(self) -> int:
        taken = self._acquire()
        try:
            return int(self._tw[1])
        finally:
            if taken:
                self._release()

    def _raw(self) -> list[tuple[bytes, bytes]]:
        """Key and value bytes of every live entry, in order, read in one locked step."""
        taken = self._acquire()
        try:
            tw, tb = self._tw, self._tb
            ents = _entries(tb, self._base, self._ecap)[: int(tw[0])]
            live = np.flatnonzero((ents[:, 1] & np.uint64(3)) == LIVE)
            out = [entry_kv(tb, self._base + ei * ENTRY) for ei in live.tolist()]
            # array views are made while the lock keeps their blocks alive
            return [(kb, vb) if vb[0] != codec.T_ARRAY else (kb, _ArrayRaw(vb)) for kb, vb in out]
        finally:
            if taken:
                self._release()

    def _snapshot(self) -> list[tuple[Any, Any]]:
        return [(decode(kb), _fresh(vb)) for kb, vb in self._raw()]

    def __iter__(self) -> Iterator[Any]:
        return iter([decode(kb) for kb, _vb in self._raw()])

    def __reversed__(self) -> Iterator[Any]:
        return iter([decode(kb) for kb, _vb in self._raw()][::-1])

    def keys(self) -> KeysView[Any]:
        return _Keys(self)

    def values(self) -> ValuesView[Any]:
        return _Values(self)

    def items(self) -> ItemsView[Any, Any]:
        return _Items(self)

    def copy(self) -> dict[Any, Any]:
        """A plain dict with the current contents (as Manager().dict().copy() returns)."""
        return dict(self._snapshot())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SharedDict) and other._block.handle == self._block.handle:
            return True
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.copy() == (other.copy() if isinstance(other, SharedDict) else dict(other))

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Any) -> dict[Any, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        out = self.copy()
        out.update(other.copy() if isinstance(other, SharedDict) else other)
        return out

    def __ror__(self, other: Any) -> dict[Any, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        out = dict(other)
        out.update(self.copy())
        return out

    def __ior__(self, other: Any) -> SharedDict:
        self.update(other)
        return self

    def __repr__(self) -> str:
        return repr(self.copy())

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach, (self._block.handle.data,))


class _ArrayRaw(bytes):
    """Array value bytes whose view was made under the lock (see _raw)."""

    view: Any

    def __new__(cls, vb: bytes) -> _ArrayRaw:
        self = super().__new__(cls, vb)
        self.view = codec.decode_array(vb)
        return self


class _Absent:
    __slots__ = ()


_ABSENT: Any = _Absent()


def _fresh(vb: bytes) -> Any:
    """A value for the caller: arrays as their view, everything else decoded anew."""
    if isinstance(vb, _ArrayRaw):
        return vb.view
    if vb[0] == codec.T_ARRAY:
        return codec.decode_array(vb)
    return decode(vb)


def _private(vb: bytes) -> Any:
    """A value whose storage is about to be freed: arrays as a private copy."""
    if vb[0] == codec.T_ARRAY:
        return np.array(codec.decode_array(vb))
    return decode(vb)


class _Keys(KeysView[Any]):
    _mapping: SharedDict

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping)

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self._mapping)

    def __repr__(self) -> str:
        return f"dict_keys({list(self._mapping)!r})"


class _Values(ValuesView[Any]):
    _mapping: SharedDict

    def __iter__(self) -> Iterator[Any]:
        return iter([v for _k, v in self._mapping._snapshot()])

    def __reversed__(self) -> Iterator[Any]:
        return iter([v for _k, v in self._mapping._snapshot()][::-1])

    def __repr__(self) -> str:
        return f"dict_values({list(self)!r})"


class _Items(ItemsView[Any, Any]):
    _mapping: SharedDict

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self._mapping._snapshot())

    def __reversed__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self._mapping._snapshot()[::-1])

    def __repr__(self) -> str:
        return f"dict_items({list(self)!r})"


def _attach(data: bytes) -> SharedDict:
    result: SharedDict = SharedDict._attach(data)
    return result
