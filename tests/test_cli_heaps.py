"""`python -m sharedobj ls/stat/check/clean` against heaps made here and in other processes.

Other tests create and kill heaps at the same time (pytest-xdist), so every
assertion is about the heaps this test made, and ``clean`` may only ever find
heaps whose processes are all dead.  Everything made here is removed in a
``finally``, also when an assertion fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import give_away
from sharedobj import Heap, _libc, limits, segment
from sharedobj.allocator.classes import CLASS_SIZES, class_of
from sharedobj.allocator.layout import ROOT_SIZE, TAG_SHIFT, TAG_SLAB
from sharedobj.allocator.pages import ArenaView

PAGE = limits.PAGE_SIZE
IPC_SET = 1


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sharedobj", *args], capture_output=True, text=True, timeout=120
    )


def _json(*args: str, rc: int = 0) -> Any:
    out = _run(*args, "--json")
    assert out.returncode == rc, (out.returncode, out.stdout, out.stderr)
    return json.loads(out.stdout)


def _exists(shmid: int) -> bool:
    return limits.segment_info(shmid) is not None


def _rmid(shmid: int) -> None:
    _libc.libc().shmctl(shmid, _libc.IPC_RMID, None)


# A process that makes a heap, allocates, reports it, then waits for a command
# on stdin ("destroy" or nothing) -- or to be SIGKILLed.
_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from sharedobj import Heap
    auto, grow = sys.argv[1] == "1", sys.argv[2] == "1"
    h = Heap.create(1 << 20, auto_remove=auto, huge_threshold=8 << 20)
    keep = [h.alloc(n) for n in (100, 100, 100, 5000, 200_000)]
    if grow:  # runs that do not fit the first arena: more arenas (with arena magic)
        keep += [h.alloc(700_000) for _ in range(2)]
    hdr = h.header()
    ids = [sid for seg in hdr["segments"] for sid in seg["ids"]]
    print(json.dumps({"id": h.id, "segments": ids, "pid": os.getpid(), "blocks": len(keep)}),
          flush=True)
    if sys.stdin.readline().strip() == "destroy":
        h.destroy()
    """
)


class Child:
    """A subprocess owning a heap; every segment it reported is removed at the end."""

    def __init__(self, auto_remove: bool, grow: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, "1" if auto_remove else "0", "1" if grow else "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("child failed to create its heap")
        doc = json.loads(line)
        self.id: int = doc["id"]
        self.arenas: list[int] = doc["segments"]
        self.pid: int = doc["pid"]
        self.blocks: int = doc["blocks"]

    @property
    def segments(self) -> list[int]:
        return [self.id, *self.arenas]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def finish(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write("destroy\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        for shmid in self.segments:
            _rmid(shmid)


@contextlib.contextmanager
def children(*specs: tuple[bool, bool]) -> Iterator[list[Child]]:
    made: list[Child] = []
    try:
        for auto, grow in specs:
            made.append(Child(auto, grow))
        yield made
    finally:
        for c in made:
            c.finish()


def _entry(doc: dict[str, Any], heap_id: int) -> dict[str, Any]:
    found = [h for h in doc["heaps"] if h["heap_id"] == heap_id]
    assert len(found) == 1, f"heap {heap_id} listed {len(found)} times"
    entry: dict[str, Any] = found[0]
    return entry


def _proc_size(ids: list[int]) -> int:
    by_id = {s.shmid: s for s in limits.list_segments()}
    return sum(by_id[i].size for i in ids)


# --------------------------------------------------------------------------
# ls


def test_ls_shows_heaps_of_this_process_and_of_a_live_child() -> None:
    h = Heap.create(2 << 20)
    blocks = [h.alloc(64) for _ in range(7)] + [h.alloc(300_000)]
    try:
        with children((False, False)) as (child,):
            doc = _json("ls")
            assert doc["uid"] == os.geteuid()
            mine = _entry(doc, h.id)
            assert mine["creator_pid"] == os.getpid() == mine["cpid"]
            assert mine["owner_uid"] == os.geteuid() == mine["uid"]
            assert os.getpid() in mine["live_pids"]
            assert mine["live_blocks"] == len(blocks)
            assert mine["auto_remove"] is True
            assert mine["status"] == "ok"
            ids = [sid for seg in h.header()["segments"] for sid in seg["ids"]]
            assert mine["segments"] == [h.id, *ids]
            assert mine["size_bytes"] == _proc_size([h.id, *ids])
            assert mine["nattch"] >= 1 and mine["created"]

            theirs = _entry(doc, child.id)
            assert theirs["creator_pid"] == child.pid
            assert theirs["live_pids"] == [child.pid]
            assert theirs["live_blocks"] == child.blocks
            assert theirs["auto_remove"] is False
            assert theirs["marked_for_removal"] is False
            assert theirs["status"] == "ok"
            assert theirs["size_bytes"] == ROOT_SIZE + _proc_size(child.arenas)

            human = _run("ls")
            assert human.returncode == 0, human.stderr
            assert "HEAP" in human.stdout and "STATUS" in human.stdout
            assert str(h.id) in human.stdout and str(child.id) in human.stdout
    finally:
        h.destroy()


# --------------------------------------------------------------------------
# stat


def test_stat_reports_usage_per_size_class() -> None:
    h = Heap.create(4 << 20)
    try:
        small = [h.alloc(100) for _ in range(10)]
        mid = [h.alloc(3000) for _ in range(4)]
        run = h.alloc(100 << 10)
        doc = _json("stat", str(h.id))
        s = doc["stats"]
        by_size = {c["size"]: c for c in s["classes"]}
        c100 = by_size[CLASS_SIZES[class_of(100)]]
        assert c100["used_blocks"] == len(small)
        assert c100["used_bytes"] == len(small) * c100["size"]
        assert c100["slabs"] >= 1
        assert by_size[CLASS_SIZES[class_of(3000)]]["used_blocks"] == len(mid)
        assert s["live_blocks"] == len(small) + len(mid) + 1
        assert s["run_used_bytes"] >= run.size
        assert 0 < s["metadata_ratio"] < 1
        assert doc["header"]["creator_pid"] == os.getpid()
        assert doc["header"]["segments"][0]["kind"] == "general"

        human = _run("stat", str(h.id))
        assert human.returncode == 0, human.stderr
        for word in ("size classes", "SLABS", "CACHED", "fragmentation", "metadata", "segments"):
            assert word in human.stdout
    finally:
        h.destroy()


# --------------------------------------------------------------------------
# check


def _slab_nfree_word(h: Heap) -> tuple[segment.Segment, ArenaView, int]:
    """The word of the first slab's header that counts its free slots."""
    ids = h.header()["segments"][0]["ids"]
    seg = segment.attach(ids)
    av = ArenaView(0, seg.buf)
    pm = av.pages_array(av.pm)
    page = next(
        p for p in range(av.meta_pages, av.frontier()) if int(pm[p]) >> TAG_SHIFT == TAG_SLAB
    )
    return seg, av, page * PAGE // 4 + 2


def test_check_passes_a_healthy_heap_and_fails_a_corrupted_one() -> None:
    h = Heap.create(2 << 20, auto_remove=True)
    seg: segment.Segment | None = None
    try:
        keep = [h.alloc(48) for _ in range(20)]
        out = _run("check", str(h.id))
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip() == "ok"
        assert _json("check", str(h.id)) == {"heap_id": h.id, "ok": True, "problems": []}

        seg, av, word = _slab_nfree_word(h)
        original = av.w[word]
        av.w[word] = original + 1  # the slab header now miscounts its free slots
        try:
            out = _run("check", str(h.id))
            assert out.returncode == 1, out.stdout + out.stderr
            assert "free slots" in out.stdout
            doc = _json("check", str(h.id), rc=1)
            assert doc["ok"] is False and any("free slots" in p for p in doc["problems"])
        finally:
            av.w[word] = original
        assert _run("check", str(h.id)).returncode == 0
        del keep
    finally:
        if seg is not None:
            seg.close()
        h.destroy()


def test_heap_argument_errors() -> None:
    plain = segment.create(PAGE, auto_remove=False)
    h = Heap.create(1 << 20)
    try:
        missing = 2**31 - 2
        assert not _exists(missing)
        for cmd in ("stat", "check"):
            out = _run(cmd, str(missing))
            assert out.returncode == 1 and "no System V segment" in out.stderr
            out = _run(cmd, str(plain.shmid))
            assert out.returncode == 1 and "not a sharedobj heap" in out.stderr
            arena = h.header()["segments"][0]["ids"][0]
            out = _run(cmd, str(arena))
            assert out.returncode == 1 and f"of heap {h.id}" in out.stderr
            assert _run(cmd, "not-a-number").returncode == 2
            assert _run(cmd).returncode == 2
        assert _run("ls", "--bogus").returncode == 2
        assert _run("clean", "extra").returncode == 2
        assert "exit codes" in _run("--help").stdout
    finally:
        plain.remove()
        plain.close()
        h.destroy()


# --------------------------------------------------------------------------
# clean


def test_clean_removes_only_dead_processes_heaps_and_orphan_arenas() -> None:
    # A, B: auto_remove=False, killed -> orphans.  C: auto_remove=True, killed
    # -> the kernel already freed it.  D: alive -> kept.  E: grew to several
    # arenas, killed, then its root removed -> its arenas are orphan arenas.
    plain = segment.create(ROOT_SIZE, auto_remove=False)  # a root's size, but no magic
    try:
        with children(
            (False, False), (False, False), (True, False), (False, False), (False, True)
        ) as (
            a,
            b,
            c,
            d,
            e,
        ):
            assert len(e.arenas) >= 2
            for child in (a, b, c, e):
                child.kill()
            assert not any(_exists(s) for s in c.segments)  # auto_remove did its job
            _rmid(e.id)
            assert not _exists(e.id)

            listing = _json("ls")
            assert _entry(listing, a.id)["status"] == "orphan"
            assert _entry(listing, a.id)["live_pids"] == []
            assert _entry(listing, d.id)["status"] == "ok"
            assert not [h for h in listing["heaps"] if h["heap_id"] in (c.id, e.id, plain.shmid)]
            orphan_ids = {o["shmid"] for o in listing["orphan_arenas"]}
            assert set(e.arenas) <= orphan_ids

            mine = set(a.segments + b.segments + d.segments + e.segments + [plain.shmid])
            dry = _json("clean", "--dry-run")
            assert dry["dry_run"] is True
            assert {x["shmid"] for x in dry["heaps"]} & mine == {a.id, b.id}
            assert {x["shmid"] for x in dry["orphan_arenas"]} & mine == set(e.arenas)
            for x in dry["heaps"]:
                if x["shmid"] in (a.id, b.id):
                    assert x["shmids"] == (a if x["shmid"] == a.id else b).segments
                    assert x["removed"] == []
            survivors = a.segments + b.segments + e.arenas
            assert all(_exists(s) for s in survivors), "dry run removed something"
            human = _run("clean", "--dry-run")
            assert human.returncode == 0 and f"would remove heap {a.id}" in human.stdout

            done = _json("clean")
            assert done["dry_run"] is False and done["ok"] is True
            removed = {s for x in done["heaps"] + done["orphan_arenas"] for s in x["removed"]}
            assert set(survivors) <= removed
            assert not any(_exists(s) for s in survivors)
            assert all(_exists(s) for s in d.segments), "clean removed a live process's heap"
            assert _exists(plain.shmid), "clean removed a segment without sharedobj magic"
            assert not removed & {*d.segments, plain.shmid}
            d_entry = _entry(_json("ls"), d.id)
            assert d_entry["status"] == "ok" and d_entry["live_pids"] == [d.pid]
    finally:
        plain.remove()
        plain.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a segment to another user")
def test_clean_never_touches_another_users_heap_and_ls_all_shows_it() -> None:
    with children((False, False)) as (child,):
        child.kill()
        for shmid in child.segments:
            give_away(shmid, 65534)
        assert not [h for h in _json("ls")["heaps"] if h["heap_id"] == child.id]
        everyone = _json("ls", "--all")
        entry = _entry(everyone, child.id)
        assert entry["uid"] == 65534 and entry["ours"] is False
        assert entry["status"] == "foreign" and entry["live_blocks"] is None
        assert entry["creator_pid"] == child.pid  # read through a read-only mapping
        done = _json("clean")
        removed = {s for x in done["heaps"] + done["orphan_arenas"] for s in x["removed"]}
        assert not removed & set(child.segments)
        assert all(_exists(s) for s in child.segments)


def test_ls_and_clean_handle_a_heap_an_older_sharedobj_left() -> None:
    """A heap of the previous layout (2) is listed, said to be older, and cleaned whole."""
    from sharedobj.allocator.layout import H_VERSION, LAYOUT_VERSION

    with children((False, True)) as (old,):
        assert len(old.arenas) >= 2
        old.kill()
        root = segment.attach(old.id)
        try:
            root.buf.cast("I")[H_VERSION] = LAYOUT_VERSION - 1  # as the older code wrote it
        finally:
            root.close()
        entry = _entry(_json("ls"), old.id)
        assert entry["status"] == "orphan"
        assert f"older sharedobj (heap layout version {LAYOUT_VERSION - 1})" in entry["reason"]
        with pytest.raises(Exception, match="layout version"):
            Heap.attach(old.id)  # still refused for use
        done = _json("clean")
        removed = {s for x in done["heaps"] for s in x["removed"]}
        assert set(old.segments) <= removed
        assert not any(_exists(s) for s in old.segments)
