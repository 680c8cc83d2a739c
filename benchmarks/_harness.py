"""Shared machinery of the benchmarks: interleaved runs, medians, ratios, JSON and a table.

The host flips between a fast state and one about 2x slower every few tens of
seconds, so an absolute figure means little.  Every benchmark therefore runs
ours and its anchors interleaved (A B A B ...), repeats the round several
times, and judges by the ratio of medians: a slow phase hits both sides of a
round alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from types import FrameType
from typing import Any


@dataclass
class Row:
    """One measured case: a set of named contestants, each a list of samples."""

    name: str
    unit: str  # what one sample is, e.g. "us/pair" or "pairs/s"
    higher_is_better: bool
    ours: str  # which contestant is sharedobj
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items() if v}

    def ratios(self) -> dict[str, float]:
        """How many times better ours is than each anchor (>1 means ours wins)."""
        med = self.medians()
        mine = med.get(self.ours)
        out: dict[str, float] = {}
        if mine is None:
            return out
        for k, v in med.items():
            if k == self.ours or v == 0 or mine == 0:
                continue
            out[k] = (mine / v) if self.higher_is_better else (v / mine)
        return out


def interleave(
    contestants: dict[str, Callable[[], float]], rounds: int, *, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each contestant once per round, in alternating order, and collect the samples."""
    names = list(contestants)
    for _ in range(warmup):
        for n in names:
            contestants[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            samples[n].append(contestants[n]())
    return samples


class Sampler:
    """An interleave() contestant: ``fn(n)`` does n operations; a sample is us/op.

    The first call calibrates n so that a sample lasts about ``target`` seconds
    (at least one operation) and doubles as the warm-up; with ``untimed_first``
    one operation runs untimed before that (the very first one pays imports,
    tracker start-up, first attach).  ``around`` wraps every sample in untimed
    setup and teardown; ``after`` runs untimed after every sample.
    """

    def __init__(
        self,
        fn: Callable[[int], None],
        target: float,
        max_n: int = 200_000,
        around: Callable[[], AbstractContextManager[Any]] = nullcontext,
        after: Callable[[], None] | None = None,
        *,
        untimed_first: bool = False,
    ) -> None:
        self.fn = fn
        self.target = target
        self.max_n = max_n
        self.around = around
        self.after = after
        self.untimed_first = untimed_first
        self.n = 0

    def _measure(self) -> float:
        if self.n:
            return per_op_us(self.fn, self.n)
        if self.untimed_first:
            self.fn(1)
        per_op = per_op_us(self.fn, 1) / 1e6
        if per_op < self.target / 20:
            trial = max(1, min(self.max_n, int(self.target / 10 / per_op)))
            per_op = per_op_us(self.fn, trial) / 1e6
        self.n = max(1, min(self.max_n, int(self.target / per_op)))
        return per_op * 1e6

    def __call__(self) -> float:
        try:
            with self.around():
                return self._measure()
        finally:
            if self.after is not None:
                self.after()


def per_op_us(fn: Callable[[int], None], n: int) -> float:
    """Microseconds per operation of ``fn(n)``, which performs n operations."""
    t0 = time.perf_counter()
    fn(n)
    return (time.perf_counter() - t0) / n * 1e6


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--rounds", type=int, default=7, help="interleaved repetitions (medians over these)"
    )
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds (smoke test)")
    p.add_argument(
        "--json", metavar="FILE", help="also write the results as JSON to FILE ('-' for stdout)"
    )
    return p


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def report(title: str, rows: list[Row], json_path: str | None) -> dict[str, Any]:
    """Print the table and write the JSON; return the JSON document."""
    doc: dict[str, Any] = {"benchmark": title, "machine": machine(), "rows": []}
    print(f"\n== {title} ==")
    print(f"{'case':<44} {'contestant':<26} {'median':>12} {'unit':<10} {'ours is':>10}")
    for row in rows:
        med = row.medians()
        ratios = row.ratios()
        doc["rows"].append(
            {
                "name": row.name,
                "unit": row.unit,
                "higher_is_better": row.higher_is_better,
                "ours": row.ours,
                "medians": med,
                "ratios_ours_vs": ratios,
                "samples": row.samples,
                "note": row.note,
            }
        )
        first = True
        for k, v in med.items():
            tag = "(ours)" if k == row.ours else (f"{ratios[k]:.2f}x" if k in ratios else "")
            print(f"{row.name if first else '':<44} {k:<26} {v:>12.4g} {row.unit:<10} {tag:>10}")
            first = False
        if row.note:
            print(f"{'':<44} note: {row.note}")
    print("(ratio = how many times better ours is than that anchor; >1 means ours wins)")
    if json_path:
        text = json.dumps(doc, indent=2)
        if json_path == "-":
            print(text)
        else:
            with open(json_path, "w") as f:
                f.write(text)
            print(f"JSON written to {json_path}")
    return doc


# --------------------------------------------------------------------------
# What every benchmark shares: sizes for people, and stopping cleanly on a signal


def human(n: int) -> str:
    """A byte count as people write it (1 GiB, 64 MiB, 4 KiB, 100 B)."""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


_stop_signal: int | None = None


def _stop_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Remembered as well as raised: an exception raised while a finalizer runs
    # (a segment being detached, say) is swallowed, and check_stop() raises it
    # again at the next sample.
    global _stop_signal
    _stop_signal = signum
    raise _stop_exception(signum)


def stop_on_signals() -> None:
    """Turn SIGTERM, SIGHUP and SIGINT into exceptions, so every finally block runs.

    Only where the signal still has its default handling: a benchmark started
    with SIGINT ignored (a background job of a non-interactive shell) keeps it so.
    """
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, _on_signal)


def check_stop() -> None:
    if _stop_signal is not None:
        raise _stop_exception(_stop_signal)


def run_interleaved(
    contestants: dict[str, Callable[[], float]], rounds: int, *, warmup: int = 1
) -> dict[str, list[float]]:
    """:func:`interleave`, stopping between samples once a signal came."""

    def guard(fn: Callable[[], float]) -> Callable[[], float]:
        def sample() -> float:
            check_stop()
            value = fn()
            check_stop()
            return value

        return sample

    return interleave({k: guard(v) for k, v in contestants.items()}, rounds, warmup=warmup)
