"""``python -m sharedobj``: the ipcs/ipcrm of this library.

Commands:

* ``info``   kernel limits and the implementations in use.
* ``ls``     heaps of this user (``--all``: every user, root only) and orphan
  arenas: owner, creator, size, resident bytes, attached processes, live
  blocks, creation time, status.
* ``stat HEAP``   usage per size class, page runs, huge blocks,
  fragmentation, metadata, segments.
* ``check HEAP``  the heap's consistency check.
* ``clean``  removes heaps whose registered processes are all gone and that
  nobody maps, and arenas whose heap root is gone (``--dry-run`` only lists).
* ``demo``   the main job: one Pool job three ways (plain multiprocessing,
  stdlib shared_memory, sharedobj), timed and compared (see ``demo.py``);
  exit status 1 if their results differ.

Every command takes ``--json`` for scripts; the keys are stable.  HEAP is a
heap id: the shmid of the heap's root segment, as ``ls`` shows it.

Exit codes: 0 success; 1 the command ran and found a problem (``check`` found
inconsistencies, HEAP is not a heap this process may open, ``clean`` failed
to remove something, ``info`` on an unsupported platform); 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import info as _info

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2

_EPILOG = """\
exit codes:
  0  success
  1  a problem was found: check found inconsistencies, HEAP is missing or is
     not a heap, clean could not remove something, info: unsupported platform
  2  bad usage
"""


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell; numeric columns (``right``) right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for row in cells:
        parts = [
            row[i].rjust(widths[i]) if i in right else row[i].ljust(widths[i])
            for i in range(len(row))
        ]
        out.append("  ".join(parts).rstrip())
    return out


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_PROBLEM


# --------------------------------------------------------------------------
# info


def _cmd_info(args: argparse.Namespace) -> int:
    doc = _info.collect()
    if args.json:
        _print_json(doc)
    else:
        print(_info.render(doc))
    return EXIT_OK if doc["platform"]["supported"] else EXIT_PROBLEM


# --------------------------------------------------------------------------
# ls


def _render_ls(inv: Any) -> str:
    from .inventory import human_size

    lines: list[str] = []
    if inv.heaps:
        rows = []
        for h in inv.heaps:
            pids = ",".join(map(str, h.live_pids)) or "-"
            auto = "-" if h.auto_remove is None else ("yes" if h.auto_remove else "no")
            status = h.status if h.status == "ok" else f"{h.status}: {h.reason}"
            rows.append(
                [
                    h.heap_id,
                    h.uid,
                    h.creator_pid if h.creator_pid is not None else h.cpid,
                    human_size(h.size_bytes),
                    human_size(h.resident_bytes),
                    h.nattch,
                    pids,
                    "-" if h.live_blocks is None else h.live_blocks,
                    len(h.segments),
                    h.to_json()["created"] or "-",
                    auto,
                    status,
                ]
            )
        headers = ["HEAP", "UID", "PID", "SIZE", "RSS", "NATTCH", "LIVE PIDS", "BLOCKS"]
        headers += ["SEGS", "CREATED", "AUTO", "STATUS"]
        lines += _table(headers, rows, right={0, 1, 2, 3, 4, 5, 7, 8})
    else:
        lines.append("no sharedobj heaps" + (" of any user" if inv.all_users else " of this user"))
    if inv.orphan_arenas:
        lines += ["", "orphan arenas (their heap root is gone):"]
        rows = [
            [
                *(a.shmid, a.uid, a.cpid, human_size(a.size_bytes), human_size(a.resident_bytes)),
                *(a.nattch, a.heap_id, a.reason),
            ]
            for a in inv.orphan_arenas
        ]
        headers = ["SHMID", "UID", "CPID", "SIZE", "RSS", "NATTCH", "HEAP", "REASON"]
        lines += _table(headers, rows, right={0, 1, 2, 3, 4, 5, 6})
    return "\n".join(lines)


def _cmd_ls(args: argparse.Namespace) -> int:
    from . import inventory

    inv = inventory.scan(all_users=args.all)
    if args.json:
        _print_json(inv.to_json())
    else:
        print(_render_ls(inv))
    return EXIT_OK


# --------------------------------------------------------------------------
# stat


def _render_stat(doc: dict[str, Any]) -> str:
    from .inventory import human_size as hs

    hdr, s = doc["header"], doc["stats"]
    procs = ", ".join(f"{p['pid']} ({'alive' if p['alive'] else 'gone'})" for p in hdr["processes"])
    lines = [
        f"heap {doc['heap_id']}: owner uid {hdr['owner_uid']}, created {hdr['created']} "
        f"by pid {hdr['creator_pid']}, auto_remove {'yes' if hdr['auto_remove'] else 'no'}",
        f"  size        {hs(s['total_bytes'])} in {_n(s['segments'], 'segment')} "
        f"({_n(s['general_arenas'], 'arena')}, {_n(s['huge_blocks'], 'huge block')}) + root; "
        f"resident {hs(s['resident_bytes'])}",
        f"  used        {hs(s['used_bytes'])} in {s['live_blocks']} live blocks; "
        f"free {hs(s['free_bytes'])} ({hs(s['untouched_bytes'])} never touched)",
        f"  fragmentation {s['fragmentation']:.1%} of free page memory outside the largest "
        f"free run ({hs(s['largest_free_run'])})",
        f"  metadata    {hs(s['metadata_bytes'])} = {s['metadata_ratio']:.1%} of arena bytes",
        f"  processes   {procs or 'none registered'}",
        "",
        "size classes:",
    ]
    if s["classes"]:
        rows = [
            [
                *(c["size"], c["slabs"], c["used_blocks"], c["cached_blocks"], c["free_blocks"]),
                *(hs(c["used_bytes"]), hs(c["free_bytes"]), hs(c["slab_bytes"])),
            ]
            for c in s["classes"]
        ]
        headers = ["SIZE", "SLABS", "USED", "CACHED", "FREE", "USED BYTES", "FREE BYTES"]
        headers.append("SLAB BYTES")
        lines += ["  " + ln for ln in _table(headers, rows, right=set(range(8)))]
    else:
        lines.append("  no slabs")
    lines += [
        "",
        f"page runs:   {hs(s['run_used_bytes'])} used, {hs(s['run_free_bytes'])} free "
        f"in runs ({hs(s['kept_resident_bytes'])} of it kept resident for reuse), "
        f"largest free run {hs(s['largest_free_run'])}",
        f"huge blocks: {s['huge_blocks']} ({hs(s['huge_bytes'])}, "
        f"{hs(s['huge_requested_bytes'])} requested)",
        "",
        "segments:",
    ]
    rows = [
        [seg["index"], seg["kind"], "+".join(map(str, seg["ids"])), hs(seg["size"])]
        for seg in hdr["segments"]
    ]
    lines += ["  " + ln for ln in _table(["INDEX", "KIND", "SHMIDS", "SIZE"], rows, right={0, 3})]
    return "\n".join(lines)


def _cmd_stat(args: argparse.Namespace) -> int:
    from . import inventory

    try:
        doc = inventory.stat_heap(args.heap)
    except inventory.HeapLookupError as exc:
        return _fail(str(exc))
    if args.json:
        _print_json(doc)
    else:
        print(_render_stat(doc))
    return EXIT_OK


# --------------------------------------------------------------------------
# check


def _cmd_check(args: argparse.Namespace) -> int:
    from . import inventory

    try:
        problems = inventory.check_heap(args.heap)
    except inventory.HeapLookupError as exc:
        return _fail(str(exc))
    if args.json:
        _print_json({"heap_id": args.heap, "ok": not problems, "problems": problems})
    elif problems:
        print(f"heap {args.heap}: {len(problems)} problems")
        for p in problems:
            print(f"  {p}")
    else:
        print("ok")
    return EXIT_PROBLEM if problems else EXIT_OK


# --------------------------------------------------------------------------
# clean


def _render_clean(report: Any) -> str:
    from .inventory import human_size

    verb = "would remove" if report.dry_run else "removed"
    lines = []
    total = 0
    for a in report.actions:
        what = (
            f"heap {a.shmid} ({_n(len(a.shmids), 'segment')}, {human_size(a.size_bytes)})"
            if a.kind == "heap"
            else f"orphan arena {a.shmid} ({human_size(a.size_bytes)})"
        )
        if report.dry_run or a.removed:
            lines.append(f"{verb} {what}: {a.reason}")
            total += a.size_bytes
        else:
            lines.append(f"kept {what}")
        for sid, why in a.kept.items():
            lines.append(f"  kept segment {sid}: {why}")
        if a.error:
            lines.append(f"  error: {a.error}")
    if not report.actions:
        lines.append("nothing to clean")
    else:
        heaps = sum(1 for a in report.actions if a.kind == "heap" and (report.dry_run or a.removed))
        arenas = sum(
            1 for a in report.actions if a.kind == "arena" and (report.dry_run or a.removed)
        )
        lines.append(
            f"{verb} {_n(heaps, 'heap')} and {_n(arenas, 'orphan arena')} ({human_size(total)})"
            if report.dry_run or heaps or arenas
            else "nothing removed"
        )
    return "\n".join(lines)


def _cmd_clean(args: argparse.Namespace) -> int:
    from . import inventory

    report = inventory.clean(dry_run=args.dry_run, include_idle=args.idle)
    if args.json:
        _print_json(report.to_json())
    else:
        print(_render_clean(report))
    return EXIT_OK if report.ok else EXIT_PROBLEM


# --------------------------------------------------------------------------
# the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sharedobj",
        description="Inspect System V shared memory as sharedobj uses it: "
        "the ipcs/ipcrm of this library.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p_info = add("info", "kernel limits and the lock/wait/segment implementations in use")
    p_info.set_defaults(func=_cmd_info)

    p_ls = add("ls", "list heaps (owner, size, processes, live blocks, status) and orphan arenas")
    p_ls.add_argument("--all", action="store_true", help="heaps of every user (root only)")
    p_ls.set_defaults(func=_cmd_ls)

    p_stat = add("stat", "usage of one heap per size class, runs, huge blocks, segments")
    p_stat.add_argument("heap", type=int, metavar="HEAP", help="heap id (as `ls` shows it)")
    p_stat.set_defaults(func=_cmd_stat)

    p_check = add("check", "check one heap's metadata; exit status 1 on any inconsistency")
    p_check.add_argument("heap", type=int, metavar="HEAP", help="heap id (as `ls` shows it)")
    p_check.set_defaults(func=_cmd_check)

    p_clean = add(
        "clean",
        "remove heaps whose registered processes are all gone (and that nobody maps) "
        "and arenas whose heap is gone; only this user's segments carrying sharedobj magic",
    )
    p_clean.add_argument("--dry-run", action="store_true", help="only list what would go")
    p_clean.add_argument(
        "--idle",
        action="store_true",
        help="also remove heaps that no process is registered in or maps "
        "(auto_remove=False heaps kept on purpose look like this)",
    )
    p_clean.set_defaults(func=_cmd_clean)

    from . import demo as _demo

    p_demo = add(
        "demo",
        "the main job: a Pool over a large numpy array, run with plain multiprocessing, "
        "stdlib shared_memory and sharedobj; prints time, bytes pickled and peak memory of "
        "each; exit status 1 if their results differ",
    )
    _demo.add_arguments(p_demo)
    p_demo.set_defaults(func=_demo.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "all", False) and os.geteuid() != 0:
        parser.error("--all needs root: other users' heaps cannot be read")
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `python -m sharedobj ls | head`: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
