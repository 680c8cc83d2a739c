"""``python -m sharedobj demo``: the main job, run small in a subprocess.

The demo starts pools of spawn workers, so it runs in its own interpreter as
a user would run it; the JSON output is the contract checked here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from sharedobj.demo import parse_size


def _demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sharedobj", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


@pytest.mark.slow
def test_demo_json_small() -> None:
    proc = _demo("--size", "32M", "--tasks", "4", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    assert doc["size_bytes"] == 32 << 20
    assert doc["tasks"] == 4 and doc["workers"] == 2 and doc["method"] == "spawn"
    assert doc["results_agree"] is True and doc["differences"] == []

    variants = doc["variants"]
    assert set(variants) == {"plain", "shared_memory", "sharedobj"}
    results = [variants[name]["results"] for name in variants]
    assert len(results[0]) == 4
    assert results[0] == results[1] == results[2]

    plain, ours = variants["plain"], variants["sharedobj"]
    # the plain pool pickles the whole array once per task
    assert plain["bytes_pickled_sent"] >= 4 * (32 << 20)
    # sharedobj pickles handles: far less than 1% of that
    assert 0 < ours["bytes_pickled"] < plain["bytes_pickled"] / 100
    assert ours["bytes_pickled"] < 16 << 10
    assert ours["bytes_copied_into_shared_memory"] == 32 << 20
    for v in variants.values():
        assert v["wall_s"] > 0
        assert v["peak_rss_bytes"] is None or v["peak_rss_bytes"] > 0
    assert doc["speedup"]["vs_plain"] > 0 and doc["speedup"]["vs_shared_memory"] > 0


@pytest.mark.parametrize("junk", ["junk", "12Q", "-5M", "1.2.3G", "", "0", "100K", "nanG"])
def test_demo_size_rejects_junk(junk: str) -> None:
    proc = _demo("--size", junk, "--json", "--quiet", timeout=30)
    assert proc.returncode == 2
    assert "--size" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64M", 64 << 20),
        ("512m", 512 << 20),
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("1.5G", 3 << 29),
        ("2048K", 2 << 20),
        ("1048576", 1 << 20),
        (" 64 MB ", 64 << 20),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rounds_to_whole_float64() -> None:
    assert parse_size("1048579") == 1048576


def test_parse_size_error_type() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
