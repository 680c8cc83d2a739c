"""System V shared memory segments, attached once per process.

Three traps of raw System V shared memory shape this module:

* **Repeated attaches.**  Every ``shmat`` maps the segment again and eats
  address space; a program that re-attaches per task runs out of it.  So each
  process keeps one mapping per segment (or per span of segments) in a cache,
  and every :class:`Segment` handle for the same ids shares it.
* **Views outliving the mapping.**  ``shmdt`` succeeds while numpy arrays still
  point into the mapping, and touching them afterwards is a SIGSEGV.  Here the
  mapping is owned by a small object that every exported buffer references
  (through its ``.base`` chain); the segment is detached only when the last
  handle *and* the last view are gone.  ``close()`` drops the handle's own
  reference and never invalidates a view.
* **Leaks after a crash.**  A segment that nobody marked ``IPC_RMID`` survives
  every process.  ``auto_remove=True`` marks it right after the creator has
  attached it: Linux still lets other processes attach it by shmid, and frees
  it at the last detach, SIGKILL included.

A request larger than the per-segment limit (the kernel's SHMMAX, or a
``max_segment_size`` setting) becomes a *span*: several page-aligned segments
attached at adjacent addresses inside one reserved range, exposed as one
contiguous buffer.  Each process builds its own span from the list of shmids.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import _libc
from . import limits as _limits
from .errors import shmat_error, shmctl_error, shmget_error

__all__ = [
    "Segment",
    "attach",
    "attach_key",
    "attached_count",
    "create",
    "segment_limit",
]

PAGE_SIZE = _limits.PAGE_SIZE
_KEY_ATTEMPTS = 64


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _check_size(size: object, what: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"{what} must be an int, not {type(size).__name__}")
    if size <= 0:
        raise ValueError(f"{what} must be positive, got {size}")
    return size


def segment_limit(max_segment_size: int | None = None) -> tuple[int, str]:
    """The largest single segment we may create, and the name of what limits it.

    The result is a whole number of pages, because pieces of a span must be.
    """
    shmmax = _limits.shmmax()
    # Linux caps a segment at SHMMAX; values near 2**64 mean "no limit".
    limit, name = (shmmax if shmmax is not None else 1 << 62), "SHMMAX (kernel.shmmax)"
    if max_segment_size is not None:
        _check_size(max_segment_size, "max_segment_size")
        if max_segment_size < limit:
            limit, name = max_segment_size, "max_segment_size"
    limit = (min(limit, 1 << 62) // PAGE_SIZE) * PAGE_SIZE
    if limit < PAGE_SIZE:
        raise ValueError(
            f"the per-segment limit {name} is below one page ({PAGE_SIZE} bytes): "
            f"no segment can be created"
        )
    return limit, name


# --------------------------------------------------------------------------
# The per-process attachment cache


class _Attachment:
    """One mapping of a segment or span in this process; detached when unreferenced."""

    __slots__ = ("__weakref__", "address", "ids", "length", "readonly", "sizes")

    def __del__(self) -> None:
        # Runs once the last handle and the last view are gone (views hold a
        # reference through their ctypes base), so nothing can touch the
        # memory afterwards.
        _detach(self.address, self.length, len(self.ids) > 1)

    def __init__(self, ids: tuple[int, ...], sizes: tuple[int, ...], address: int, readonly: bool):
        self.ids = ids
        self.sizes = sizes
        self.address = address
        self.length = sum(sizes)
        self.readonly = readonly

    def memoryview(self) -> memoryview:
        """A new buffer over the whole mapping that keeps this attachment alive."""
        array = (ctypes.c_char * self.length).from_address(self.address)
        array._sharedobj_attachment = self  # type: ignore[attr-defined]  # keeps the mapping alive
        view = memoryview(array).cast("B")
        return view.toreadonly() if self.readonly else view


def _detach(address: int, length: int, is_span: bool) -> None:
    if _libc is None:  # interpreter teardown: the kernel detaches at exit
        return
    lib = _libc.libc()
    if is_span:
        lib.munmap(address, length)
    else:
        lib.shmdt(address)


_cache: dict[tuple[tuple[int, ...], bool], weakref.ref[_Attachment]] = {}
_cache_lock = threading.Lock()


def _reset_after_fork() -> None:
    # The child shares the parent's mappings, so the cache stays valid; only the
    # lock may have been held by a thread that does not exist in the child.
    global _cache_lock
    _cache_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def attached_count() -> int:
    """How many segment/span mappings this process holds through sharedobj."""
    with _cache_lock:
        return sum(1 for ref in _cache.values() if ref() is not None)


_stat_buf = ctypes.create_string_buffer(_libc.SHMID_DS_SIZE)  # used under _cache_lock
_stat_segsz = ctypes.c_uint64.from_buffer(_stat_buf, _libc.SHMID_DS_SEGSZ)
_stat_uid = ctypes.c_uint32.from_buffer(_stat_buf, _libc.SHMID_DS_UID)
_stat_cuid = ctypes.c_uint32.from_buffer(_stat_buf, _libc.SHMID_DS_CUID)


def _ipc_stat(shmid: int) -> None:
    """Fill _stat_buf with the segment's shmid_ds (caller holds _cache_lock)."""
    if _libc.libc().shmctl(shmid, _libc.IPC_STAT, _stat_buf) != 0:
        raise shmctl_error(_libc.get_errno(), shmid, "inspect")


def _stat_size(shmid: int) -> int:
    _ipc_stat(shmid)
    return int(_stat_segsz.value)


def owners(shmid: int) -> tuple[int, int]:
    """(owner uid, creator uid) of a segment, from one IPC_STAT.

    Not from /proc/sysvipc/shm: reading that lists every segment on the host,
    which made a process's first attach of a heap cost a millisecond.
    """
    with _cache_lock:
        _ipc_stat(shmid)
        return int(_stat_uid.value), int(_stat_cuid.value)


def _shmat(shmid: int, address: int | None, flags: int) -> int:
    addr = _libc.libc().shmat(shmid, address, flags)
    if addr is None or addr == _libc.MAP_FAILED:
        raise shmat_error(_libc.get_errno(), shmid)
    return int(addr)


def _reserve(total: int) -> int:
    """Reserve address space for a span: PROT_NONE, no memory behind it."""
    base = _libc.libc().mmap(
        None,
        total,
        _libc.PROT_NONE,
        _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS | _libc.MAP_NORESERVE,
        -1,
        0,
    )
    if base is None or base == _libc.MAP_FAILED:
        err = _libc.get_errno()
        raise MemoryError(
            f"cannot reserve {total} bytes of address space for a span: {os.strerror(err)}"
        )
    return int(base)


def _map(
    sizes: tuple[int, ...],
    readonly: bool,
    next_id: Callable[[int, int], int],
    after_attach: Callable[[int], None] | None = None,
) -> _Attachment:
    """shmat one segment, or build a span of several at adjacent addresses.

    ``next_id(index, size)`` names (or creates) each piece just before it is
    attached; ``after_attach(shmid)`` runs right after, which is where a new
    segment is marked IPC_RMID: the window in which a crash could leak it is
    one shmget+shmat, not the whole span build.
    """
    flags = _libc.SHM_RDONLY if readonly else 0
    if len(sizes) == 1:
        shmid = next_id(0, sizes[0])
        address = _shmat(shmid, None, flags)
        if after_attach is not None:
            after_attach(shmid)
        return _Attachment((shmid,), sizes, address, readonly)
    for size in sizes:
        if size % PAGE_SIZE:
            raise ValueError(f"span pieces must be whole pages; a piece has {size} bytes")
    total = sum(sizes)
    base = _reserve(total)
    ids: list[int] = []
    offset = 0
    try:
        for index, size in enumerate(sizes):
            shmid = next_id(index, size)
            _shmat(shmid, base + offset, flags | _libc.SHM_REMAP)
            ids.append(shmid)
            if after_attach is not None:
                after_attach(shmid)
            offset += size
    except BaseException:
        _libc.libc().munmap(base, total)
        raise
    return _Attachment(tuple(ids), sizes, base, readonly)


def _register(att: _Attachment) -> _Attachment:
    """Put a fresh attachment in the cache. Caller holds _cache_lock."""
    key = (att.ids, att.readonly)

    def _forget(dead: weakref.ref[_Attachment], key: tuple[tuple[int, ...], bool] = key) -> None:
        # The finalizer above detaches; here only the cache entry goes, and
        # only if it still names the dead attachment.
        if _cache.get(key) is dead:
            del _cache[key]

    _cache[key] = weakref.ref(att, _forget)
    return att


def _attachment(ids: tuple[int, ...], readonly: bool) -> _Attachment:
    with _cache_lock:
        ref = _cache.get((ids, readonly))
        att = ref() if ref is not None else None
        if att is not None:
            return att
        sizes = tuple(_stat_size(shmid) for shmid in ids)
        return _register(_map(sizes, readonly, lambda index, _size: ids[index]))


# --------------------------------------------------------------------------
# Public handles


class Segment:
    """A handle on one System V segment, or on a span of several, attached here.

    ``buf`` is a writable memoryview of the whole mapping (``size`` bytes, a
    whole number of pages).  Handles pickle as their shmids and re-attach in the
    receiving process.
    """

    __slots__ = ("_att", "_buf", "ids", "readonly", "size", "sizes")

    def __init__(self, att: _Attachment) -> None:
        self._att: _Attachment | None = att
        self._buf: memoryview | None = att.memoryview()
        self.ids: tuple[int, ...] = att.ids
        self.sizes: tuple[int, ...] = att.sizes
        self.size: int = att.length
        self.readonly: bool = att.readonly

    # -- access -----------------------------------------------------------
    @property
    def shmid(self) -> int:
        """The shmid of the first (for a plain segment: the only) piece."""
        return self.ids[0]

    @property
    def is_span(self) -> bool:
        return len(self.ids) > 1

    @property
    def closed(self) -> bool:
        return self._buf is None

    @property
    def buf(self) -> memoryview:
        if self._buf is None:
            raise ValueError(f"segment {self._label()} is closed")
        return self._buf

    @property
    def address(self) -> int:
        """Where the mapping starts in this process (differs between processes)."""
        if self._att is None:
            raise ValueError(f"segment {self._label()} is closed")
        return self._att.address

    def _label(self) -> str:
        return "span " + "+".join(map(str, self.ids)) if self.is_span else f"shmid {self.ids[0]}"

    # -- lifetime ---------------------------------------------------------
    def close(self) -> None:
        """Drop this handle; the mapping goes once no handle and no view uses it.

        Views taken from ``buf`` (memoryviews, numpy arrays) stay valid after
        close(): they hold the mapping themselves.
        """
        self._buf = None
        self._att = None

    def remove(self) -> None:
        """Mark every piece IPC_RMID: the kernel frees it at the last detach.

        Processes that already know the shmids can still attach it (Linux).
        Removing twice, or after the kernel freed it, is not an error.
        """
        lib = _libc.libc()
        first_error: Exception | None = None
        for shmid in self.ids:
            if lib.shmctl(shmid, _libc.IPC_RMID, None) != 0:
                err = _libc.get_errno()
                if err in (errno.EINVAL, errno.EIDRM):
                    continue
                first_error = first_error or shmctl_error(err, shmid, "remove")
        if first_error is not None:
            raise first_error

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (attach, (self.ids, self.readonly))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at 0x{self._att.address:x}" if self._att else ""
        return f"<sharedobj.Segment {self._label()} size={self.size} {state}>"

    # -- kernel views -----------------------------------------------------
    def stat(self) -> list[_limits.SegmentInfo]:
        """The kernel's record of every piece (from /proc/sysvipc/shm)."""
        wanted = set(self.ids)
        return [s for s in _limits.list_segments() if s.shmid in wanted]

    def discard(self, offset: int, length: int) -> None:
        """Give the pages of ``[offset, offset+length)`` back to the kernel.

        MADV_REMOVE frees the backing pages of shared memory (MADV_DONTNEED would
        not); they read as zeros afterwards, in every process.
        """
        start, end = self._page_range(offset, length, inner=True)
        if end > start and _libc.libc().madvise(
            self.address + start, end - start, _libc.MADV_REMOVE
        ):
            err = _libc.get_errno()
            raise OSError(err, f"madvise(MADV_REMOVE) on {self._label()}: {os.strerror(err)}")

    def populate(self, offset: int = 0, length: int | None = None, *, write: bool = False) -> bool:
        """Pre-fault pages so first reads do not fault one page at a time.

        Returns False where the kernel lacks MADV_POPULATE_* (before 5.14).
        """
        if length is None:
            length = self.size - offset
        start, end = self._page_range(offset, length, inner=False)
        advice = _libc.MADV_POPULATE_WRITE if write else _libc.MADV_POPULATE_READ
        if end <= start:
            return True
        return bool(_libc.libc().madvise(self.address + start, end - start, advice) == 0)

    def _page_range(self, offset: int, length: int, *, inner: bool) -> tuple[int, int]:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"range [{offset}, {offset + length}) is outside {self._label()} of {self.size} bytes"
            )
        if inner:  # only pages entirely inside the range
            return _round_up(offset, PAGE_SIZE), ((offset + length) // PAGE_SIZE) * PAGE_SIZE
        return (offset // PAGE_SIZE) * PAGE_SIZE, _round_up(offset + length, PAGE_SIZE)


def _shmget(key: int, size: int, flags: int, hugetlb: bool) -> int:
    shmid = _libc.libc().shmget(key, size, flags)
    if shmid < 0:
        err = _libc.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(
                errno.EEXIST, f"a System V segment with key {key:#x} already exists"
            )
        raise shmget_error(err, size, hugetlb=hugetlb)
    return int(shmid)


def _create_one(size: int, *, key: int | None, random_key: bool, flags: int, hugetlb: bool) -> int:
    if key is not None:
        return _shmget(key, size, flags | _libc.IPC_CREAT | _libc.IPC_EXCL, hugetlb)
    if not random_key:
        # IPC_PRIVATE always makes a new segment: no key collisions, no memset.
        return _shmget(_libc.IPC_PRIVATE, size, flags | _libc.IPC_CREAT, hugetlb)
    for _ in range(_KEY_ATTEMPTS):
        candidate = 1 + secrets.randbelow(0x7FFFFFFE)
        try:
            return _shmget(candidate, size, flags | _libc.IPC_CREAT | _libc.IPC_EXCL, hugetlb)
        except FileExistsError:
            continue
    raise FileExistsError(
        errno.EEXIST, f"no free System V key found in {_KEY_ATTEMPTS} random tries"
    )


def _mark_removed(shmid: int) -> None:
    if _libc.libc().shmctl(shmid, _libc.IPC_RMID, None) != 0:
        raise shmctl_error(_libc.get_errno(), shmid, "remove")


def _remove_ids(ids: Iterable[int]) -> None:
    lib = _libc.libc()
    for shmid in ids:
        lib.shmctl(shmid, _libc.IPC_RMID, None)


def create(
    size: int,
    *,
    mode: int = 0o600,
    noreserve: bool = False,
    auto_remove: bool = True,
    max_segment_size: int | None = None,
    split: bool = True,
    key: int | None = None,
    random_key: bool = False,
    hugetlb: bool = False,
    on_create: Callable[[int], None] | None = None,
) -> Segment:
    """Create a segment (or a span, when ``size`` exceeds the per-segment limit).

    ``size`` is rounded up to whole pages.  The memory is zero-filled lazily by
    the kernel: nothing is written or made resident here.  ``auto_remove``
    marks the segment IPC_RMID once attached, so it disappears when the last
    process using it exits, however it exits.  With ``noreserve`` the kernel
    reserves no swap for it, so a heap may be larger than RAM until used.
    ``key=None`` (the default) makes an IPC_PRIVATE segment found only by
    shmid; ``random_key=True`` picks a fresh key (retrying on collisions) so
    unrelated processes can find it with :func:`attach_key`.  ``on_create``
    is called with each new shmid the moment it exists, so a caller can record
    it (the heap does, to remove segments whose creator died mid-way).
    """
    _check_size(size)
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
        raise ValueError(f"mode must be permission bits between 0 and 0o777, got {mode!r}")
    if key is not None and (
        isinstance(key, bool) or not isinstance(key, int) or not 0 < key < 2**31
    ):
        raise ValueError(f"key must be an int in 1..2**31-1 (or None for IPC_PRIVATE), got {key!r}")
    limit, limit_name = segment_limit(max_segment_size)
    granule = PAGE_SIZE
    if hugetlb:
        granule = _limits.read_limits().hugepage_size or PAGE_SIZE
    total = _round_up(size, granule)
    flags = mode
    if noreserve:
        flags |= _libc.SHM_NORESERVE
    if hugetlb:
        flags |= _libc.SHM_HUGETLB
    if total <= limit:
        pieces = [total]
    elif not split:
        raise ValueError(
            f"a segment of {size} bytes exceeds the per-segment limit {limit_name} = {limit} bytes "
            f"and splitting is disabled (split=False)"
        )
    elif key is not None:
        raise ValueError(f"a span of several segments cannot use the single key {key:#x}")
    else:
        limit = (limit // granule) * granule
        if limit <= 0:
            raise ValueError(f"the per-segment limit {limit_name} is below one huge page")
        count = -(-total // limit)
        if count > MAX_SPAN_PIECES:
            raise ValueError(
                f"a segment of {total} bytes would need {count} pieces of at most {limit} bytes "
                f"({limit_name}); a span holds at most {MAX_SPAN_PIECES}"
            )
        pieces = [limit] * (total // limit) + ([total % limit] if total % limit else [])
    created: list[int] = []

    def make(_index: int, piece: int) -> int:
        shmid = _create_one(piece, key=key, random_key=random_key, flags=flags, hugetlb=hugetlb)
        created.append(shmid)
        if on_create is not None:
            on_create(shmid)
        return shmid

    mark = _mark_removed if auto_remove else None
    try:
        with _cache_lock:
            att = _register(_map(tuple(pieces), False, make, mark))
    except BaseException:
        _remove_ids(created)
        raise
    return Segment(att)


#: Pieces one span may have: SHMMNI's ceiling (IPCMNI, 32768) times a margin;
#: a larger request would fail at shmget anyway, after building a huge list.
MAX_SPAN_PIECES = 1 << 17


def attach(ids: int | Sequence[int], readonly: bool = False) -> Segment:
    """Attach an existing segment (an int shmid) or span (a sequence of shmids).

    Attaching what this process already has mapped returns a handle on the same
    mapping: no second shmat.
    """
    if isinstance(ids, bool):
        raise TypeError("shmid must be an int or a sequence of ints, not bool")
    tup = (ids,) if isinstance(ids, int) else tuple(ids)
    if not tup:
        raise ValueError("attach needs at least one shmid")
    for shmid in tup:
        if isinstance(shmid, bool) or not isinstance(shmid, int):
            raise TypeError(f"shmid must be an int, not {type(shmid).__name__}")
        if not 0 <= shmid < 2**31:  # the kernel would truncate a larger one to another id
            raise FileNotFoundError(errno.ENOENT, f"no System V segment with shmid {shmid}")
    return Segment(_attachment(tup, bool(readonly)))


def attach_key(key: int, readonly: bool = False) -> Segment:
    """Attach the segment that was created with ``key`` (see ``random_key``)."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 < key < 2**32:
        raise ValueError(f"key must be a positive 32-bit int, got {key!r}")
    shmid = _libc.libc().shmget(key, 0, 0)
    if shmid < 0:
        err = _libc.get_errno()
        if err == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, f"no System V segment with key {key:#x}")
        if err == errno.EACCES:
            raise PermissionError(err, f"no permission to open the segment with key {key:#x}")
        raise _libc.oserror(err, f"shmget(key={key:#x})")
    return attach(int(shmid), readonly)
