"""Finding this library's heaps among System V segments, and what dead processes left.

``python -m sharedobj ls/stat/check/clean`` (the ``ipcs``/``ipcrm`` of
sharedobj) are thin printers over the functions here, which return plain data
so that scripts and tests can use them as well.

The rules below exist because a machine's segments are shared by everybody:

* **Nothing is trusted before its magic.**  A segment of ROOT_SIZE bytes is
  not necessarily a heap root: every candidate is first mapped read-only and
  its magic checked; only then is it parsed, and only our own heaps are ever
  attached read-write (``Heap.attach(register=False)``, which does not enter
  the heap's process registry, so inspecting a heap never makes it look
  alive).
* **Liveness comes from two independent witnesses.**  A heap is an *orphan*
  only when it has registered processes, all of them dead (pid *and* start
  time, so a recycled pid does not count), and no process maps any of its
  segments (``nattch`` from /proc).  A heap nobody registered in (for
  example an ``auto_remove=False`` heap whose users closed it on purpose) is
  *idle*, not orphaned: it may be kept for later, like a file in /dev/shm.
  So is a heap whose root has a System V key (the user's default heap, found
  by name): its blocks live until unlinked, whoever died.
* **Removal re-checks right before IPC_RMID**, after this process dropped its
  own mappings, and removes the root first: once the root is gone no process
  can attach the heap any more, and if one attached in the meantime (the
  root then survives the IPC_RMID, marked) its arenas are left alone.
* **Other users' segments are never touched.**  ``clean`` only considers
  segments whose owner and creator are the calling user.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from . import _libc, limits, segment
from .allocator.core import Allocator, Backend, process_alive
from .allocator.layout import (
    A_INDEX,
    A_ROOT_CTIME,
    A_ROOT_ID,
    H_CREATOR_PID,
    H_OWNER_UID,
    H_VERSION,
    LAYOUT_VERSION,
    MAGIC_ARENA,
    MAGIC_ROOT,
    ROOT_SIZE,
)
from .errors import CorruptHeapError
from .limits import SegmentInfo

__all__ = [
    "CleanAction",
    "CleanReport",
    "HeapEntry",
    "HeapLookupError",
    "Inventory",
    "OrphanArena",
    "ProcessRef",
    "check_heap",
    "clean",
    "human_size",
    "resolve_heap",
    "scan",
    "stat_heap",
]

_PEEK = 64  # bytes read from a candidate: magic plus the arena header fields used here


# --------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class ProcessRef:
    """One entry of a heap's process registry, and whether that process still runs."""

    pid: int
    start: int  # clock ticks since boot, tells a recycled pid apart
    alive: bool


@dataclass
class HeapEntry:
    """One heap as ``ls`` shows it.  Fields are None where they could not be read."""

    heap_id: int
    uid: int  # owner, from /proc
    cuid: int  # creator uid, from /proc
    cpid: int  # pid that created the root segment, from /proc
    ours: bool  # owned and created by the calling user
    marked_for_removal: bool
    key: int  # System V key of the root: non-zero for a heap found by name (the default heap)
    size_bytes: int  # root plus every segment of the heap, as /proc sizes them
    resident_bytes: int
    nattch: int  # processes mapping the root
    nattch_any: int  # the most processes mapping any one of its segments
    creator_pid: int | None = None
    owner_uid: int | None = None  # as written in the heap header
    created_ns: int | None = None
    auto_remove: bool | None = None
    processes: list[ProcessRef] = field(default_factory=list)
    live_blocks: int | None = None
    segments: list[int] = field(default_factory=list)  # root first, then arenas and huge blocks
    status: str = "ok"  # ok, orphan, idle, mapped, removed, foreign, unreadable
    reason: str = ""

    @property
    def live_pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.alive]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["pids"] = [p.pid for p in self.processes]
        doc["live_pids"] = self.live_pids
        doc["created"] = _iso(self.created_ns)
        return doc


@dataclass
class OrphanArena:
    """An arena segment (it carries the arena magic) whose heap root is gone."""

    shmid: int
    uid: int
    cuid: int
    cpid: int
    size_bytes: int
    resident_bytes: int
    nattch: int
    heap_id: int  # the root it names
    heap_created_ns: int
    reason: str

    @property
    def ours(self) -> bool:
        return self.uid == self.cuid == os.geteuid()

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ours"] = self.ours
        return doc


@dataclass
class Inventory:
    uid: int
    all_users: bool
    heaps: list[HeapEntry]
    orphan_arenas: list[OrphanArena]

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "all_users": self.all_users,
            "heaps": [h.to_json() for h in self.heaps],
            "orphan_arenas": [a.to_json() for a in self.orphan_arenas],
        }


@dataclass
class CleanAction:
    """One heap or orphan arena that ``clean`` removed (or, with dry_run, would remove)."""

    kind: str  # "heap" or "arena"
    shmid: int  # the heap id, or the arena's shmid
    shmids: list[int]
    size_bytes: int
    reason: str
    removed: list[int] = field(default_factory=list)
    kept: dict[int, str] = field(default_factory=dict)  # shmid -> why it was left alone
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["kept"] = {str(k): v for k, v in self.kept.items()}
        return doc


@dataclass
class CleanReport:
    dry_run: bool
    actions: list[CleanAction]

    @property
    def ok(self) -> bool:
        return all(a.error is None for a in self.actions)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "ok": self.ok,
            "heaps": [a.to_json() for a in self.actions if a.kind == "heap"],
            "orphan_arenas": [a.to_json() for a in self.actions if a.kind == "arena"],
        }


class HeapLookupError(LookupError):
    """HEAP does not name a heap this process may inspect (the message says why)."""


# --------------------------------------------------------------------------
# small helpers


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _iso(ns: int | None) -> str | None:
    if not ns:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def _ours(info: SegmentInfo, euid: int) -> bool:
    # Owner and creator both: a segment handed to us with IPC_SET is still not ours.
    return info.uid == euid and info.cuid == euid


def _peek(shmid: int, nbytes: int = _PEEK) -> bytes | None:
    """The first bytes of a segment through a read-only mapping, dropped at once."""
    try:
        seg = segment.attach(shmid, readonly=True)
    except (OSError, ValueError):
        return None
    try:
        return bytes(seg.buf[: min(nbytes, seg.size)])
    finally:
        seg.close()


def _own_mappings() -> set[int]:
    """Shmids this process maps (its own mappings are not a reason to keep a heap)."""
    out: set[int] = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/SYSV"):
                    out.add(int(parts[4]))
    except OSError:
        pass
    return out


class _NoBackend:
    """Stands in for a backend where the allocator object is only read."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"read-only heap inspection cannot {name}")


@dataclass
class _RootHeader:
    creator_pid: int
    owner_uid: int
    created_ns: int
    auto_remove: bool
    processes: list[ProcessRef]
    table: list[tuple[int, int, tuple[int, ...], int]]  # (index, kind, ids, size)
    version: int = LAYOUT_VERSION


#: Layouts whose root header, registry and arena table this code reads (read-only,
#: for ls and clean): version 3 only added a root word and a page-map tag.  So a
#: heap an older sharedobj left behind can still be listed and cleaned.
INSPECTABLE_VERSIONS = (2, 3)


@contextmanager
def _read_only_allocator(shmid: int) -> Iterator[Allocator]:
    """An allocator over a read-only mapping of a root: header, registry, table; no lock.

    The mapping is read-only, so any write by mistake raises instead of
    corrupting someone's heap; the allocator is emptied afterwards because it
    references itself (its undo regions) and would otherwise keep the mapping
    until the next garbage collection.
    """
    seg = segment.attach(shmid, readonly=True)
    alloc: Allocator | None = None
    try:
        Allocator.validate_root(seg.buf, INSPECTABLE_VERSIONS)
        alloc = Allocator(cast(Backend, _NoBackend()), seg.buf, shmid)
        yield alloc
    finally:
        if alloc is not None:
            alloc.forget_mappings()
        seg.close()


def _read_root(shmid: int) -> _RootHeader:
    """Parse a root's header through a read-only mapping (raises if it is not a heap)."""
    with _read_only_allocator(shmid) as alloc:
        w = alloc.root32
        procs = [
            ProcessRef(
                e["pid"], e["start"], e["state"] == 1 and process_alive(e["pid"], e["start"])
            )
            for e in alloc.registry()
        ]
        return _RootHeader(
            creator_pid=int(w[H_CREATOR_PID]),
            owner_uid=int(w[H_OWNER_UID]),
            created_ns=alloc.created_ns,
            auto_remove=alloc.config.auto_remove,
            processes=procs,
            table=alloc.arena_ids(),
            version=int(w[H_VERSION]),
        )


def _arena_header(data: bytes) -> tuple[int, int, int] | None:
    """(index, root id, root created_ns) from an arena's first bytes, None without magic."""
    if len(data) < _PEEK or data[:8] != MAGIC_ARENA:
        return None
    w = memoryview(data).cast("I")
    return int(w[A_INDEX]), int(w[A_ROOT_ID]), int(w[A_ROOT_CTIME]) | int(w[A_ROOT_CTIME + 1]) << 32


# --------------------------------------------------------------------------
# discovery


def _status(entry: HeapEntry) -> tuple[str, str]:
    live = entry.live_pids
    if not entry.ours:
        return "foreign", f"owned by uid {entry.uid}; not ours to attach or remove"
    if entry.marked_for_removal and entry.auto_remove is False:
        return (
            "removed",
            f"destroyed; the kernel frees it when the last of {entry.nattch_any} processes detaches",
        )
    if live:
        return "ok", f"used by pid {', '.join(map(str, live))}"
    if entry.nattch_any:
        return "mapped", (
            f"no registered process alive, but {entry.nattch_any} processes map its segments"
        )
    if entry.key:
        # Made to be found by name (the user's default heap): like a file in
        # /dev/shm its blocks outlive every process until unlinked.
        return "idle", (
            f"named heap (key {entry.key:#x}), nobody attached; its blocks live until "
            "unlinked (clean --idle removes it)"
        )
    if entry.processes:
        pids = ", ".join(str(p.pid) for p in entry.processes)
        return "orphan", f"all registered processes gone (pid {pids})"
    return (
        "idle",
        "no process registered or attached; kept until destroy() (clean --idle removes it)",
    )


def _live_blocks(heap_id: int) -> int | None:
    """stats()['live_blocks'] through a non-registering attach (takes the heap lock)."""
    from . import heap as heap_mod

    ref = heap_mod._heaps.get(heap_id)  # this process may already use the heap itself
    was_open = ref is not None and (h := ref()) is not None and not h.closed
    try:
        heap = heap_mod.Heap.attach(heap_id, register=False)
    except (OSError, ValueError, CorruptHeapError):
        return None
    try:
        return int(heap.stats()["live_blocks"])
    except (OSError, ValueError, KeyError, CorruptHeapError):
        return None
    finally:
        if not was_open:
            heap.close()


def scan(*, all_users: bool = False, details: bool = True) -> Inventory:
    """Every heap of this library (of the calling user, or of all users) and orphan arenas.

    ``details`` also counts live blocks of our own heaps, which attaches them
    and takes each heap's lock briefly; ``clean`` does without.  The /proc
    snapshot that decides sizes and attach counts is taken before this
    process maps anything.
    """
    euid = os.geteuid()
    snapshot = {s.shmid: s for s in limits.list_segments()}
    visible = [s for s in snapshot.values() if all_users or _ours(s, euid)]
    roots: dict[int, _RootHeader | str] = {}  # shmid -> header, or why it is unreadable
    arenas: dict[int, tuple[int, int, int]] = {}  # shmid -> (index, root id, root ctime)
    for info in sorted(visible, key=lambda s: s.shmid):
        if info.size < _PEEK:
            continue
        data = _peek(info.shmid)
        if data is None:
            if info.size == ROOT_SIZE and not _ours(info, euid):
                roots[info.shmid] = "cannot be read by this user"
            continue
        if data[:8] == MAGIC_ROOT and info.size == ROOT_SIZE:
            try:
                roots[info.shmid] = _read_root(info.shmid)
            except (OSError, ValueError, CorruptHeapError) as exc:
                roots[info.shmid] = str(exc)
        else:
            head = _arena_header(data)
            if head is not None:
                arenas[info.shmid] = head

    def root_of(root_id: int, ctime: int) -> _RootHeader | str | None:
        """The live root an arena names, a reason it has none, or None if unknowable."""
        if root_id not in snapshot:
            return f"its heap root (shmid {root_id}) no longer exists"
        hdr = roots.get(root_id)
        if hdr is None:
            data = _peek(root_id)
            if data is None:
                return None
            if data[:8] != MAGIC_ROOT or snapshot[root_id].size != ROOT_SIZE:
                return f"shmid {root_id} is no longer a heap root"
            try:
                hdr = roots[root_id] = _read_root(root_id)
            except (OSError, ValueError, CorruptHeapError) as exc:
                roots[root_id] = str(exc)
                return None
        if isinstance(hdr, str):
            return None
        if hdr.created_ns != ctime:
            return f"shmid {root_id} is now another heap (created at another time)"
        return hdr

    strays: dict[int, list[int]] = {}  # heap id -> its arenas missing from its table
    orphans: list[OrphanArena] = []
    for shmid, (_index, root_id, ctime) in sorted(arenas.items()):
        owner = root_of(root_id, ctime)
        if isinstance(owner, str):
            s = snapshot[shmid]
            orphans.append(
                OrphanArena(
                    shmid=shmid,
                    uid=s.uid,
                    cuid=s.cuid,
                    cpid=s.cpid,
                    size_bytes=s.size,
                    resident_bytes=s.rss or 0,
                    nattch=s.nattch,
                    heap_id=root_id,
                    heap_created_ns=ctime,
                    reason=owner,
                )
            )
        elif owner is not None:
            strays.setdefault(root_id, []).append(shmid)

    heaps: list[HeapEntry] = []
    for root_id, hdr in sorted(roots.items()):
        rinfo = snapshot.get(root_id)
        if rinfo is None or not (all_users or _ours(rinfo, euid)):
            continue  # a root read only to judge an arena of ours
        entry = HeapEntry(
            heap_id=root_id,
            uid=rinfo.uid,
            cuid=rinfo.cuid,
            cpid=rinfo.cpid,
            ours=_ours(rinfo, euid),
            marked_for_removal=rinfo.marked_for_removal,
            key=rinfo.key,
            size_bytes=rinfo.size,
            resident_bytes=rinfo.rss or 0,
            nattch=rinfo.nattch,
            nattch_any=rinfo.nattch,
            segments=[root_id],
        )
        if isinstance(hdr, str):
            entry.status, entry.reason = (
                ("foreign", f"owned by uid {rinfo.uid}; {hdr}")
                if not entry.ours
                else ("unreadable", hdr)
            )
            heaps.append(entry)
            continue
        entry.creator_pid = hdr.creator_pid
        entry.owner_uid = hdr.owner_uid
        entry.created_ns = hdr.created_ns
        entry.auto_remove = hdr.auto_remove
        entry.processes = hdr.processes
        table_ids = [sid for _i, _k, ids, _size in hdr.table for sid in ids]
        extra = [sid for sid in strays.get(root_id, []) if sid not in table_ids]
        for sid in table_ids + extra:
            entry.segments.append(sid)
            part = snapshot.get(sid)
            if part is not None:
                entry.size_bytes += part.size
                entry.resident_bytes += part.rss or 0
                entry.nattch_any = max(entry.nattch_any, part.nattch)
        entry.status, entry.reason = _status(entry)
        if hdr.version != LAYOUT_VERSION:
            entry.reason += f"; made by an older sharedobj (heap layout version {hdr.version})"
        heaps.append(entry)

    if details:
        for entry in heaps:
            if entry.ours and entry.status not in ("unreadable", "removed"):
                entry.live_blocks = _live_blocks(entry.heap_id)
    return Inventory(uid=euid, all_users=all_users, heaps=heaps, orphan_arenas=orphans)


# --------------------------------------------------------------------------
# one heap: stat and check


def resolve_heap(heap_id: int) -> None:
    """Make sure ``heap_id`` names a heap this process may open; HeapLookupError says why not."""
    info = limits.segment_info(heap_id) if heap_id >= 0 else None
    if info is None:
        raise HeapLookupError(f"no System V segment with shmid {heap_id}")
    euid = os.geteuid()
    if euid != 0 and not _ours(info, euid):
        raise HeapLookupError(
            f"segment {heap_id} belongs to uid {info.uid} (created by uid {info.cuid}); "
            "only its owner or root may inspect it"
        )
    data = _peek(heap_id)
    if data is None:
        raise HeapLookupError(f"segment {heap_id} cannot be attached for reading")
    if data[:8] == MAGIC_ROOT and info.size == ROOT_SIZE:
        return
    arena = _arena_header(data)
    if arena is not None:
        raise HeapLookupError(
            f"segment {heap_id} is arena {arena[0]} of heap {arena[1]}, not a heap root; "
            f"try {arena[1]}"
        )
    raise HeapLookupError(
        f"segment {heap_id} is not a sharedobj heap ({info.size} bytes, no heap magic)"
    )


@contextmanager
def _inspect(heap_id: int) -> Iterator[Any]:
    from .heap import Heap, _heaps

    resolve_heap(heap_id)
    ref = _heaps.get(heap_id)
    was_open = ref is not None and (h := ref()) is not None and not h.closed
    try:
        heap = Heap.attach(heap_id, register=False)
    except (OSError, CorruptHeapError) as exc:
        raise HeapLookupError(f"heap {heap_id} cannot be opened: {exc}") from exc
    try:
        yield heap
    finally:
        if not was_open:
            heap.close()


def stat_heap(heap_id: int) -> dict[str, Any]:
    """The heap's header and ``stats()``: per-class usage, runs, huge blocks, segments."""
    with _inspect(heap_id) as heap:
        header = heap.header()
        stats = heap.stats()
    for p in header["processes"]:
        p["alive"] = p["state"] == 1 and process_alive(p["pid"], p["start"])
    header["created"] = _iso(header["created_ns"])
    return {"heap_id": heap_id, "header": header, "stats": stats}


def check_heap(heap_id: int) -> list[str]:
    """``heap.check()``: every inconsistency found (an empty list when healthy)."""
    with _inspect(heap_id) as heap:
        return list(heap.check())


# --------------------------------------------------------------------------
# clean


def _remove(shmid: int) -> str | None:
    """IPC_RMID one segment; an error message, or None (also when it is already gone)."""
    if _libc.libc().shmctl(shmid, _libc.IPC_RMID, None) != 0:
        err = _libc.get_errno()
        if limits.segment_info(shmid) is None:
            return None
        return f"IPC_RMID of {shmid} failed: {os.strerror(err)}"
    return None


def _unused(shmid: int, euid: int) -> str | None:
    """Why ``shmid`` must not be removed right now (None: ours and mapped by nobody)."""
    gc.collect()  # drop any mapping of ours still held by a reference cycle
    if shmid in _own_mappings():
        return "still mapped by this process"
    info = limits.segment_info(shmid)
    if info is None:
        return "already gone"
    if not _ours(info, euid):
        return f"belongs to uid {info.uid}"
    if info.nattch:
        return f"mapped by {info.nattch} processes"
    return None


def _clean_heap(entry: HeapEntry, euid: int, include_idle: bool) -> CleanAction:
    action = CleanAction(
        "heap", entry.heap_id, list(entry.segments), entry.size_bytes, entry.reason
    )
    # Re-read the root: the heap must still be the one we judged, and still abandoned.
    try:
        hdr = _read_root(entry.heap_id)
    except (OSError, ValueError, CorruptHeapError) as exc:
        action.kept[entry.heap_id] = f"root no longer readable as a heap ({exc})"
        return action
    if hdr.created_ns != entry.created_ns:
        action.kept[entry.heap_id] = "the shmid now names another heap"
        return action
    if any(p.alive for p in hdr.processes) or (not hdr.processes and not include_idle):
        action.kept[entry.heap_id] = "a process registered in the meantime"
        return action
    root_now = limits.segment_info(entry.heap_id)
    if root_now is not None and root_now.key and not include_idle:
        action.kept[entry.heap_id] = "it is a named heap now"
        return action
    why = _unused(entry.heap_id, euid)
    if why is not None:
        action.kept[entry.heap_id] = why
        return action
    err = _remove(entry.heap_id)
    if err is not None:
        action.error = err
        return action
    action.removed.append(entry.heap_id)
    if limits.segment_info(entry.heap_id) is not None:
        # Someone attached between the check and IPC_RMID: the root lives on,
        # marked; its arenas stay for that process (and become orphan arenas
        # that a later clean removes).
        for sid in entry.segments[1:]:
            action.kept[sid] = "a process attached the heap while it was being removed"
        return action
    for sid in entry.segments[1:]:
        why = _unused(sid, euid)
        if why == "already gone":
            continue
        if why is not None:
            action.kept[sid] = why
            continue
        err = _remove(sid)
        if err is not None:
            action.error = action.error or err
        else:
            action.removed.append(sid)
    return action


def _clean_arena(arena: OrphanArena, euid: int) -> CleanAction:
    action = CleanAction("arena", arena.shmid, [arena.shmid], arena.size_bytes, arena.reason)
    data = _peek(arena.shmid)
    head = _arena_header(data) if data is not None else None
    if head is None or head[1:] != (arena.heap_id, arena.heap_created_ns):
        action.kept[arena.shmid] = "no longer the same arena"
        return action
    root = limits.segment_info(arena.heap_id)
    if root is not None:
        root_data = _peek(arena.heap_id)
        if root_data is not None and root_data[:8] == MAGIC_ROOT and root.size == ROOT_SIZE:
            try:
                if _read_root(arena.heap_id).created_ns == arena.heap_created_ns:
                    action.kept[arena.shmid] = "its heap root is back"
                    return action
            except (OSError, ValueError, CorruptHeapError):
                pass
    why = _unused(arena.shmid, euid)
    if why is not None:
        action.kept[arena.shmid] = why
        return action
    err = _remove(arena.shmid)
    if err is not None:
        action.error = err
    else:
        action.removed.append(arena.shmid)
    return action


def clean(*, dry_run: bool = False, include_idle: bool = False) -> CleanReport:
    """Remove our orphan heaps (every registered process dead, nothing mapped) and orphan arenas.

    ``include_idle`` also removes heaps that no process is registered in or
    maps; off by default, because such a heap may be kept on purpose.  With
    ``dry_run`` nothing is removed and the report lists what would be.
    """
    euid = os.geteuid()
    inv = scan(all_users=False, details=False)
    wanted = ("orphan", "idle") if include_idle else ("orphan",)
    heaps = [h for h in inv.heaps if h.ours and h.status in wanted and h.nattch_any == 0]
    arenas = [a for a in inv.orphan_arenas if a.ours and a.nattch == 0]
    if dry_run:
        actions = [
            CleanAction("heap", h.heap_id, list(h.segments), h.size_bytes, h.reason) for h in heaps
        ] + [CleanAction("arena", a.shmid, [a.shmid], a.size_bytes, a.reason) for a in arenas]
        return CleanReport(dry_run=True, actions=actions)
    actions = [_clean_heap(h, euid, include_idle) for h in heaps]
    actions += [_clean_arena(a, euid) for a in arenas]
    return CleanReport(dry_run=False, actions=actions)
