"""The short soak that CI runs (the long one: ``python tests/soak/engine.py --seconds 1800``).

It runs in a private IPC namespace when it can, so that the before/after
comparison of System V objects sees only the soak's own (other tests run in
parallel and create segments of their own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import _unshare_works

ENGINE = Path(__file__).with_name("engine.py")
SECONDS = float(os.environ.get("SHAREDOBJ_SOAK_SECONDS", "45"))


def test_soak_with_kills_keeps_every_invariant(tmp_path: Path) -> None:
    report = tmp_path / "soak.json"
    cmd = [
        sys.executable,
        str(ENGINE),
        "--seconds",
        str(SECONDS),
        "--workers",
        "8",
        "--kill-every",
        "0.5",
        "--stall",
        "20",
        "--report",
        str(report),
    ]
    private = _unshare_works()
    if private:
        cmd = ["unshare", "--ipc", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 120)
    doc = json.loads(report.read_text()) if report.exists() else None
    assert doc is not None, f"no report:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    violations = doc["violations"]
    if not private:  # sharing the namespace: other tests' segments come and go
        violations = [v for v in violations if not v.startswith("System V objects left behind")]
    assert violations == [], f"{proc.stdout}\n{proc.stderr[-5000:]}"
    assert proc.returncode == (0 if doc["ok"] else 1)
    # the run really did what it claims: kills, new incarnations, every kind of operation
    assert doc["kills"] >= SECONDS, doc
    assert doc["incarnations"] == 8 + doc["kills"]
    assert all(n > 0 for n in doc["operations"].values()), doc["operations"]
    assert doc["messages_delivered"] > 0 and doc["checks"] >= 3
