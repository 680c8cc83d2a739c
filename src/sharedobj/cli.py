"""``python -m sharedobj``: the ipcs/ipcrm of this library.

Exit codes: 0 success; 1 the command ran and found a problem (for example an
unsupported platform for ``info``); 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import info as _info


def _cmd_info(args: argparse.Namespace) -> int:
    doc = _info.collect()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(_info.render(doc))
    return 0 if doc["platform"]["supported"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sharedobj",
        description="Inspect System V shared memory as sharedobj uses it.",
        epilog="Exit codes: 0 success, 1 a problem was found, 2 bad usage.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_info = sub.add_parser(
        "info", help="kernel limits and the lock/wait/segment implementations in use"
    )
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
