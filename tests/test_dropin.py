"""Programs written for ``multiprocessing.Manager()`` run unchanged on ``sharedobj.Manager()``.

Each program in ``tests/dropin/`` starts with ``from multiprocessing import
Manager``; the test runs it as written and again with only that line changed
to ``from sharedobj import Manager``, under fork, spawn and forkserver, and
asserts that both print the same result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "dropin"
PROGRAMS = sorted(p.name for p in HERE.glob("*.py"))
STDLIB_IMPORT = "from multiprocessing import Manager\n"
OUR_IMPORT = "from sharedobj import Manager\n"


def _run(source: str, method: str, tmp_path: Path, tag: str) -> dict[str, object]:
    script = tmp_path / f"{tag}.py"
    script.write_text(source)
    proc = subprocess.run(
        [sys.executable, str(script), method],
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, f"{tag} under {method} failed:\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize("program", PROGRAMS)
def test_program_gives_the_stdlib_result(program: str, method: str, tmp_path: Path) -> None:
    source = (HERE / program).read_text()
    assert source.count(STDLIB_IMPORT) == 1, f"{program} must import Manager from multiprocessing"
    ours = _run(source.replace(STDLIB_IMPORT, OUR_IMPORT), method, tmp_path, "ours")
    theirs = _run(source, method, tmp_path, "stdlib")
    assert ours == theirs


def test_the_programs_check_something() -> None:
    # the comparison is only worth something if the programs do real work
    assert {"pool_results.py", "work_queue.py", "locked_counter.py", "barrier_phases.py"} <= set(
        PROGRAMS
    )
