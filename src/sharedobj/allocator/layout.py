"""Where everything lives in a heap: the root region and each arena.

All metadata is in shared memory and addressed by offsets (word indices into a
region), never by pointers, because every process maps the regions at
different addresses.  Offsets below are in 32-bit words unless they say bytes.

Root region (ROOT_SIZE bytes, one segment; its shmid is the heap id)::

    word 0..1     magic b"SHOBJHP1"
    H_*           header fields (sizes, counters, the undo log's length)
    byte 256      the heap lock (a 64-byte RobustMutex slot)
    byte 4096     undo log entries (LOG_MAX x 32 bytes)
    LOG_BLOB      u16 slot indices referenced by SLOTS log entries
    H_LOG_SEQ     the number of the operation being logged (scratch, like the log)
    TABLE         arena table (MAX_ARENAS x 48 bytes)
    REGISTRY      processes using the heap (MAX_PROCS x 32 bytes)
    IDS           shmids of all arenas, arena entries point into it

Arena (a segment or span; page 0 is its header)::

    page 0        A_* header fields, free-run bins, per-class partial slab lists
    page 1..      pm[npages], nxt[npages], prv[npages] (u32 each)
    data pages    page runs and slabs, from meta_pages up to npages

``pm`` (page map) tags the first page of every run, and the last page of
every free run (a boundary tag, so a freed run finds its left neighbour):
``tag << 28 | length``.  ``nxt``/``prv`` link free runs into size bins and
slabs into their class's partial list; for a used run ``nxt[head]`` holds its
generation; for every non-head page of a slab ``prv[page]`` points to the head.
"""

from __future__ import annotations

from ..limits import PAGE_SIZE
from .classes import NCLASSES

MAGIC_ROOT = b"SHOBJHP1"
MAGIC_ARENA = b"SHOBJAR1"
LAYOUT_VERSION = 3  # 2: undo-log entries carry their operation number; 3: dirty free runs
NIL = 0xFFFFFFFF

ROOT_SIZE = 512 * 1024

# root header, in u32 words
H_VERSION = 2
H_PAGE_SIZE = 3
H_ARENA_COUNT = 4  # table entries in use (live or freed)
H_EPOCH = 5  # bumped whenever the arena table changes
H_LOG_COUNT = 6  # committed undo-log entries; 0 = no operation in flight
H_LOG_BLOB = 7  # u16 units used in the blob area
H_FLAGS = 8
H_GEN = 9  # generation counter for page runs and huge blocks
H_CREATOR_PID = 10
H_OWNER_UID = 11
H_MODE = 12
H_IDS_USED = 13
H_ROOT_SIZE = 14
H_INFLIGHT = 15  # shmids staged at IDS[ids_used:] by a growth not yet committed
# u64 fields, as pairs of words (lo, hi)
H_MAX_SIZE = 16
H_ARENA_SIZE = 18
H_HUGE_THRESHOLD = 20
H_CREATED_NS = 22
H_MAX_SEGMENT = 24

# the name directory (sharedobj.names): where its table lives, and the heap's role
H_NAMES_ARENA = 26
H_NAMES_OFF = 27  # u64
H_NAMES_GEN = 29
H_NAMES_COUNT = 30  # live names
H_RETIRED = 31  # 1 once a default heap has been retired: look it up again
H_ROLE = 32  # ROLE_*
H_DESTROYED = 33  # 1 once destroy() ran: processes still mapping it let go when they next look
H_DIRTY_MAX = 34  # pages of freed runs an arena may keep resident (TAG_DIRTY) for reuse

ROLE_PLAIN, ROLE_DEFAULT, ROLE_MANAGER = 0, 1, 2

FLAG_AUTO_REMOVE = 1
FLAG_NORESERVE = 2

LOCK_OFFSET = 256  # bytes

LOG_OFFSET = 4096  # bytes
LOG_ENTRY_WORDS = 8  # 32 bytes: type, region, index (u64), old, blob start, count, H_LOG_SEQ
LOG_MAX = 1024
LOG_BLOB_OFFSET = LOG_OFFSET + LOG_MAX * LOG_ENTRY_WORDS * 4  # bytes
LOG_BLOB_MAX = 8192  # u16 entries
# number of the operation being logged (a word index); every entry carries it
H_LOG_SEQ = (LOG_BLOB_OFFSET + 2 * LOG_BLOB_MAX) // 4
LOG_END = LOG_BLOB_OFFSET + 2 * LOG_BLOB_MAX + 4

TABLE_OFFSET = 65536  # bytes
TABLE_ENTRY_WORDS = 12  # 48 bytes
MAX_ARENAS = 1024
# arena table entry fields (word offsets inside an entry)
T_STATE = 0  # 0 unused, 1 live, 2 freed
T_KIND = 1  # 0 general (page runs and slabs), 1 huge (one block)
T_SIZE = 2  # u64 bytes of the arena (lo, hi)
T_IDS_OFF = 4  # index into IDS
T_NIDS = 5
T_GEN = 6  # generation of a huge block
T_PENDING = 7  # 1 while not yet IPC_RMID'd (auto_remove heaps)
T_EPOCH = 8  # epoch at which the arena appeared
T_NBYTES = 10  # u64 requested bytes of a huge block

ARENA_FREE, ARENA_LIVE, ARENA_DEAD = 0, 1, 2
KIND_GENERAL, KIND_HUGE = 0, 1

REGISTRY_OFFSET = TABLE_OFFSET + MAX_ARENAS * TABLE_ENTRY_WORDS * 4  # bytes
REGISTRY_ENTRY_WORDS = 8
MAX_PROCS = 126  # cache ids 1..126 fit in a slot's state byte below TAG_BASE
# registry entry fields
R_PID = 0
R_STATE = 1  # 0 free, 1 active, 2 being reclaimed
R_START = 2  # u64 process start time (clock ticks since boot), against pid reuse
R_SEEN = 4  # epoch of the arena table this process has attached

IDS_OFFSET = 131072  # bytes
MAX_IDS = (ROOT_SIZE - IDS_OFFSET) // 4

# slot state byte
SLOT_FREE = 0
TAG_BASE = 128  # 128..255: allocated, the value is the slot's generation tag

# arena header, in u32 words
A_INDEX = 2
A_NPAGES = 3
A_ROOT_ID = 4
A_FRONTIER = 5
A_META_PAGES = 6
A_ROOT_CTIME = 8  # u64
A_DIRTY = 10  # pages in TAG_DIRTY runs of this arena
A_BINS = 16
NBINS = 88
A_PARTIAL = A_BINS + NBINS
A_HEADER_END = A_PARTIAL + NCLASSES

# page map tags
TAG_SHIFT = 28
LEN_MASK = (1 << TAG_SHIFT) - 1
TAG_RUN = 1  # a used run (medium block)
TAG_SLAB = 2
TAG_FREE = 3  # a free run whose pages went back to the kernel (or never left it)
TAG_DIRTY = 4  # a free run whose pages are kept resident, so reusing them costs no page faults
FREE_TAGS = (TAG_FREE, TAG_DIRTY)


def bin_of(npages: int) -> int:
    """Free-run bin: exact for 1..64 pages, then one bin per power of two."""
    if npages <= 64:
        return npages - 1
    return 64 + npages.bit_length() - 7


def arena_meta_pages(npages: int) -> int:
    """Pages taken by an arena's header and its three per-page arrays."""
    return 1 + -(-(12 * npages) // PAGE_SIZE)


assert A_HEADER_END * 4 <= PAGE_SIZE
assert MAX_PROCS < TAG_BASE
assert REGISTRY_OFFSET + MAX_PROCS * REGISTRY_ENTRY_WORDS * 4 <= IDS_OFFSET
assert LOG_END <= TABLE_OFFSET
