"""`python -m sharedobj info`: the numbers it prints are the kernel's."""

from __future__ import annotations

import json
import subprocess
import sys

from sharedobj import limits


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sharedobj", *args], capture_output=True, text=True, timeout=60
    )


def test_info_json_reports_kernel_limits_and_implementation() -> None:
    out = _run("info", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    lim = limits.read_limits()
    assert doc["limits"]["shmmax"] == lim.shmmax
    assert doc["limits"]["shmall"] == lim.shmall
    assert doc["limits"]["shmmni"] == lim.shmmni
    assert doc["limits"]["semmni"] == lim.semmni
    assert doc["limits"]["page_size"] == limits.PAGE_SIZE
    assert doc["limits"]["hugepage_size"] == lim.hugepage_size
    impl = doc["implementation"]
    assert "pthread" in impl["lock"] and "robust" in impl["lock"]
    assert "futex" in impl["wait"]
    assert "64 MiB per arena" in impl["freed_pages"] and "MADV_REMOVE" in impl["freed_pages"]
    assert doc["platform"]["supported"] is True
    assert doc["sysv_ipc"]["version"]


def test_info_human_output_names_each_limit() -> None:
    out = _run("info")
    assert out.returncode == 0, out.stderr
    for word in ("SHMMAX", "SHMALL", "SHMMNI", "SEMMNI", "page size", "huge pages", "lock", "wait"):
        assert word in out.stdout


def test_bad_usage_exits_2() -> None:
    assert _run("no-such-command").returncode == 2
    assert _run().returncode == 2
