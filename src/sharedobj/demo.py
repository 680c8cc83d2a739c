"""``python -m sharedobj demo``: the same Pool job three ways, measured side by side.

The job is what a multiprocessing user writes first: a large numpy array and a
``Pool`` whose tasks each need the whole array.  Task ``i`` of ``N`` reduces
the strided slice ``data[i::N]`` (its sum and its maximum), so every task
reads every cache line of the array, the work per byte is small, and each
task's result differs, which lets the three variants be compared exactly:

1. **plain multiprocessing**: the array is an argument of every task.  The
   pool pickles it for every task and each worker unpickles a private copy.
2. **stdlib shared memory**: the array is copied once into a
   ``multiprocessing.shared_memory.SharedMemory``; tasks get its name, shape
   and dtype, and each task attaches, wraps, computes and detaches.
3. **sharedobj**: the array is copied once into a ``SharedMemoryManager``
   heap (``smm.asarray``) and passed as the argument, exactly like variant 1;
   it pickles as a handle of about 150 bytes.

Each variant gets a fresh pool, so the workers' peak memory is theirs alone.

What is measured, per variant:

* wall time: from the private array to the last result, including starting
  the pool, the copy into shared memory (2 and 3) and shutting down;
* bytes pickled: every message the parent's pool pipes carry (task
  arguments out, results back), counted exactly by wrapping the pickler that
  ``multiprocessing.connection.Connection.send/recv`` use, for the duration
  of the variant.  This is the data that crosses between processes; the
  copy into shared memory happens once, inside the parent, and is reported
  separately;
* peak resident memory: the parent's ``VmHWM`` (reset before each variant
  through ``/proc/self/clear_refs``) plus each worker's ``VmHWM``, read from
  ``/proc/<pid>/status`` once all tasks are done.  RSS counts a shared page
  in every process that maps it, so the shared variants' figure counts the
  shared array once per process; the private copies of variant 1 are real.

The default start method is ``spawn``: workers inherit nothing, so every
byte they need is pickled, as on macOS and Windows (where ``spawn`` is the
default) and on Linux from Python 3.14 on (whose default, ``forkserver``,
inherits nothing either).  ``fork`` does not change the result: a Pool
pickles task arguments whatever the start method.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import multiprocessing.connection
import pickle
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from multiprocessing.pool import Pool
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import numpy.typing as npt

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

GiB = 1 << 30
MiB = 1 << 20
MIN_SIZE = 1 * MiB
DEFAULT_MAX_SIZE = 1024 * MiB
DEFAULT_WORKERS = 2
DEFAULT_TASKS = 8
DEFAULT_METHOD = "spawn"
SEED = 20240229

Result = tuple[float, float]  # (sum, max) of one task's strided slice
FloatArray = npt.NDArray[np.float64]

VARIANTS = ("plain", "shared_memory", "sharedobj")
TITLES = {
    "plain": "plain multiprocessing",
    "shared_memory": "stdlib shared_memory",
    "sharedobj": "sharedobj",
}


# --------------------------------------------------------------------------
# sizes


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``1.5GiB``, ``64mb``, ``4096``: bytes, binary units.

    Raises ``argparse.ArgumentTypeError`` (argparse turns it into a usage
    error, exit status 2) for anything else or for less than 1 MiB.  The
    size is rounded down to whole float64 elements.
    """
    m = _SIZE_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: expected a number with an optional unit K, M, G or T "
            "(binary: 1M = 1 MiB), e.g. 64M, 512M, 1G"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value < MIN_SIZE:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small: the minimum is 1M")
    return int(value) // 8 * 8


def mem_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (None when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_size() -> int:
    """min(1 GiB, MemAvailable/8), in whole MiB.

    1 GiB, the size users share: the plain variant pickles the whole array
    once per task, which on a 2-core machine costs 3-7 s per GiB per task
    (pickle, pipe, unpickle), so the default run takes about a minute, most
    of it in the plain variant; ``--size 512M`` halves that.  MemAvailable/8:
    the plain variant holds about
    ``3 + 2 * workers`` copies of the array at its peak (the parent's array
    and its pickle; in each worker the received bytes and the unpickled
    array).
    """
    avail = mem_available()
    size = DEFAULT_MAX_SIZE if avail is None else min(DEFAULT_MAX_SIZE, avail // 8)
    return max(MIN_SIZE, size // MiB * MiB)


def human(n: float) -> str:
    """Bytes in binary units: ``1.0 GiB``, ``812 B``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------
# what the workers run (module level, so every start method can import it)


def compute(data: FloatArray, index: int, ntasks: int) -> Result:
    """Task ``index`` of ``ntasks``: sum and maximum of ``data[index::ntasks]``.

    Strided, so every task reads the whole array; deterministic, so the three
    variants must agree to the last bit.
    """
    part = data[index::ntasks]
    return float(part.sum()), float(part.max())


def task_array(args: tuple[FloatArray, int, int]) -> tuple[int, Result]:
    """Variants 1 and 3: the array itself is the argument.

    The same function serves both: passing a private array or a sharedobj
    array is the only difference, which is the point.
    """
    data, index, ntasks = args
    return index, compute(data, index, ntasks)


def task_shared_memory(args: tuple[str, tuple[int, ...], str, int, int]) -> tuple[int, Result]:
    """Variant 2: the stdlib boilerplate of attach, wrap, compute, drop views, detach."""
    name, shape, dtype, index, ntasks = args
    shm = shared_memory.SharedMemory(name=name)
    try:
        data: FloatArray = np.ndarray(shape, dtype=dtype, buffer=shm.buf)
        try:
            return index, compute(data, index, ntasks)
        finally:
            del data  # close() raises BufferError while a view of shm.buf is alive
    finally:
        shm.close()


def _worker_init() -> None:
    """Workers ignore Ctrl-C: the parent catches it, terminates them and cleans up.

    They are born with SIGINT blocked (see ``_sigint_blocked``), so a Ctrl-C
    while they start up stays pending; ignoring it first, then unblocking,
    discards it instead of printing a traceback from every new worker.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT while the pool starts its workers and helper threads.

    Children inherit the mask (across fork and exec), so they cannot be
    interrupted before ``_worker_init`` runs; the pool's helper threads keep
    it too, so Ctrl-C always reaches the main thread.  A Ctrl-C in this
    window is delivered to the parent as soon as the block ends.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --------------------------------------------------------------------------
# measurements


class _Counter:
    sent = 0
    received = 0


_counter = _Counter()


class _CountingPickler(ForkingPickler):
    """``ForkingPickler`` that adds the size of every message to ``_counter``.

    Installed as ``multiprocessing.connection._ForkingPickler`` in the parent
    only while a variant runs: ``Pool`` sends tasks with ``Connection.send``
    and receives results with ``Connection.recv``, which both go through it.
    """

    @classmethod
    def dumps(cls, obj: Any, protocol: int | None = None) -> memoryview:
        buf = super().dumps(obj, protocol)
        _counter.sent += memoryview(buf).nbytes
        return buf

    @staticmethod
    def loads(data: Any, /, **kwargs: Any) -> Any:  # type: ignore[override]
        _counter.received += memoryview(data).nbytes
        return pickle.loads(data, **kwargs)


@contextmanager
def _count_pickled() -> Iterator[_Counter]:
    module: Any = multiprocessing.connection
    original = module._ForkingPickler
    _counter.sent = _counter.received = 0
    module._ForkingPickler = _CountingPickler
    try:
        yield _counter
    finally:
        module._ForkingPickler = original


def _vm_hwm(pid: int | str = "self") -> int | None:
    """Peak resident set size of a process in bytes (``VmHWM``), None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@dataclass
class VariantReport:
    name: str
    wall_s: float = 0.0
    setup_s: float = 0.0  # copy into shared memory, before the pool starts
    tasks_s: float = 0.0  # first task submitted to last result received
    pickled_sent: int = 0
    pickled_received: int = 0
    copied_into_shm: int = 0
    peak_rss_parent: int | None = None
    peak_rss_workers: list[int | None] = field(default_factory=list)
    parent_peak_reset: bool = False
    results: dict[int, Result] = field(default_factory=dict)

    @property
    def pickled(self) -> int:
        return self.pickled_sent + self.pickled_received

    @property
    def peak_rss(self) -> int | None:
        parts = [self.peak_rss_parent, *self.peak_rss_workers]
        return None if any(p is None for p in parts) else sum(p for p in parts if p is not None)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": TITLES[self.name],
            "wall_s": round(self.wall_s, 4),
            "setup_s": round(self.setup_s, 4),
            "tasks_s": round(self.tasks_s, 4),
            "bytes_pickled": self.pickled,
            "bytes_pickled_sent": self.pickled_sent,
            "bytes_pickled_received": self.pickled_received,
            "bytes_copied_into_shared_memory": self.copied_into_shm,
            "peak_rss_bytes": self.peak_rss,
            "peak_rss_parent_bytes": self.peak_rss_parent,
            "peak_rss_workers_bytes": self.peak_rss_workers,
            "parent_peak_reset": self.parent_peak_reset,
            "results": [[i, *self.results[i]] for i in sorted(self.results)],
        }


# --------------------------------------------------------------------------
# progress


class Progress:
    """One line on stderr, redrawn as tasks complete and twice a second; silent when disabled.

    The timer ticks from a thread so that a slow first task (the plain
    variant pickling a large array) does not look like a hang.
    """

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled = enabled
        self.label = label
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            self._draw()
            self._thread = threading.Thread(target=self._tick, name="demo-progress", daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._draw()

    def _draw(self) -> None:
        width = 24
        with self._lock:
            if self._stop.is_set():
                return
            filled = width * self.done // self.total if self.total else width
            bar = "#" * filled + "-" * (width - filled)
            elapsed = time.perf_counter() - self.start
            sys.stderr.write(
                f"\r  {self.label:<22} [{bar}] {self.done}/{self.total} tasks  {elapsed:5.1f}s"
            )
            sys.stderr.flush()

    def update(self, done: int) -> None:
        self.done = done
        if self.enabled:
            self._draw()

    def close(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._stop.set()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        if self._thread is not None:
            self._thread.join()


# --------------------------------------------------------------------------
# the three variants


@dataclass
class Config:
    size: int
    workers: int
    tasks: int
    method: str
    progress: bool

    @property
    def elements(self) -> int:
        return self.size // 8


def _run_pool(
    cfg: Config,
    report: VariantReport,
    func: Callable[[Any], tuple[int, Result]],
    args: Callable[[int], Any],
) -> None:
    """Run ``cfg.tasks`` tasks through a fresh pool, counting what is pickled."""
    ctx = multiprocessing.get_context(cfg.method)
    progress = Progress(cfg.progress, TITLES[report.name], cfg.tasks)
    with _count_pickled() as counter:
        with _sigint_blocked():
            pool: Pool = ctx.Pool(cfg.workers, initializer=_worker_init)
        try:
            t0 = time.perf_counter()
            it = pool.imap_unordered(func, (args(i) for i in range(cfg.tasks)), chunksize=1)
            for done, (index, result) in enumerate(it, 1):
                report.results[index] = result
                progress.update(done)
            report.tasks_s = time.perf_counter() - t0
            report.peak_rss_workers = [_vm_hwm(p.pid) for p in _pool_processes(pool)]
            pool.close()
            pool.join()
        finally:
            pool.terminate()  # a no-op after join; stops the workers on error or Ctrl-C
            progress.close()
        report.pickled_sent, report.pickled_received = counter.sent, counter.received


def _pool_processes(pool: Pool) -> list[Any]:
    """The pool's worker processes (``multiprocessing.active_children`` minus helpers)."""
    procs = getattr(pool, "_pool", None)
    if procs is None:  # pragma: no cover - every CPython has it; be safe anyway
        return list(multiprocessing.active_children())
    return [p for p in procs if p.pid is not None]


def run_plain(cfg: Config, data: FloatArray) -> VariantReport:
    report = VariantReport("plain")
    report.parent_peak_reset = _reset_hwm()
    t0 = time.perf_counter()
    _run_pool(cfg, report, task_array, lambda i: (data, i, cfg.tasks))
    report.wall_s = time.perf_counter() - t0
    report.peak_rss_parent = _vm_hwm()
    return report


def run_shared_memory(cfg: Config, data: FloatArray) -> VariantReport:
    report = VariantReport("shared_memory")
    report.parent_peak_reset = _reset_hwm()
    t0 = time.perf_counter()
    shm = shared_memory.SharedMemory(create=True, size=data.nbytes)
    try:
        view: FloatArray = np.ndarray(data.shape, dtype=data.dtype, buffer=shm.buf)
        view[:] = data
        del view
        report.copied_into_shm = data.nbytes
        report.setup_s = time.perf_counter() - t0
        name, shape, dtype = shm.name, data.shape, data.dtype.str
        _run_pool(cfg, report, task_shared_memory, lambda i: (name, shape, dtype, i, cfg.tasks))
        report.peak_rss_parent = _vm_hwm()
    finally:
        shm.close()
        shm.unlink()
    report.wall_s = time.perf_counter() - t0
    return report


def run_sharedobj(cfg: Config, data: FloatArray) -> VariantReport:
    from .manager import SharedMemoryManager

    report = VariantReport("sharedobj")
    report.parent_peak_reset = _reset_hwm()
    t0 = time.perf_counter()
    with SharedMemoryManager() as smm:
        shared = smm.asarray(data)
        report.copied_into_shm = data.nbytes
        report.setup_s = time.perf_counter() - t0
        _run_pool(cfg, report, task_array, lambda i: (shared, i, cfg.tasks))
        report.peak_rss_parent = _vm_hwm()
    report.wall_s = time.perf_counter() - t0
    return report


RUNNERS: dict[str, Callable[[Config, FloatArray], VariantReport]] = {
    "plain": run_plain,
    "shared_memory": run_shared_memory,
    "sharedobj": run_sharedobj,
}


# --------------------------------------------------------------------------
# comparing and printing


def differences(reports: dict[str, VariantReport], tasks: int) -> list[str]:
    """Every task whose result is not bit-identical across the variants."""
    problems = []
    ref = reports["plain"].results
    for i in range(tasks):
        values = {name: r.results.get(i) for name, r in reports.items()}
        if any(v is None for v in values.values()):
            missing = ", ".join(n for n, v in values.items() if v is None)
            problems.append(f"task {i}: no result from {missing}")
        elif any(v != ref[i] for v in values.values()):
            shown = "; ".join(f"{n}: sum={v[0]!r} max={v[1]!r}" for n, v in values.items() if v)
            problems.append(f"task {i}: {shown}")
    return problems


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def speedups(reports: dict[str, VariantReport]) -> dict[str, float | None]:
    ours = reports["sharedobj"].wall_s
    return {
        "vs_plain": _ratio(reports["plain"].wall_s, ours),
        "vs_shared_memory": _ratio(reports["shared_memory"].wall_s, ours),
    }


def intro(cfg: Config, size_note: str) -> str:
    return "\n".join(
        [
            f"sharedobj demo: {cfg.tasks} tasks on a Pool of {cfg.workers} {cfg.method} workers "
            f"over one {human(cfg.size)} float64 array ({cfg.elements:,} values, {size_note}).",
            f"Task i computes the sum and max of data[i::{cfg.tasks}], so every task reads the "
            "whole array.",
            "The same job runs three ways, each with a fresh pool:",
            "  1. plain multiprocessing: the array is an argument of every task (pickled each time)",
            "  2. stdlib shared_memory: copied once into a SharedMemory; tasks get its name and "
            "attach/detach",
            "  3. sharedobj: copied once with smm.asarray(); the array is the argument "
            "(pickles as a handle)",
            "",
        ]
    )


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """First column left-aligned, the numbers right-aligned, padded to the widest cell."""
    cells = [headers, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]


def render(cfg: Config, reports: dict[str, VariantReport], problems: list[str]) -> str:
    rows = []
    for name in VARIANTS:
        r = reports[name]
        peak = r.peak_rss
        rows.append(
            [
                TITLES[name],
                f"{r.wall_s:.2f} s",
                f"{r.tasks_s:.2f} s",
                human(r.pickled),
                human(r.copied_into_shm) if r.copied_into_shm else "-",
                human(peak) if peak is not None else "n/a",
            ]
        )
    headers = ["VARIANT", "WALL", "TASKS", "PICKLED", "COPIED TO SHM", "PEAK RSS (sum)"]
    lines = _table(headers, rows)
    sp = speedups(reports)
    plain, ours = reports["plain"], reports["sharedobj"]
    lines += [""]
    for key, title in (
        ("vs_plain", "plain multiprocessing"),
        ("vs_shared_memory", "stdlib shared_memory"),
    ):
        value = sp[key]
        if value is None:
            verdict = "n/a"
        elif value >= 1.05:
            verdict = f"{value:.1f}x faster"
        elif value <= 0.95:
            verdict = f"{1 / value:.1f}x slower"
        else:
            verdict = f"about the same speed ({value:.2f}x)"
        lines.append(f"sharedobj vs {title}: {verdict}")
    if ours.pickled:
        lines.append(
            f"bytes pickled: {plain.pickled / ours.pickled:,.0f}x fewer with sharedobj "
            f"({human(ours.pickled)} vs {human(plain.pickled)})"
        )
    lines += [
        "",
        "WALL: private array to last result, including pool start-up/shutdown and the copy into",
        "  shared memory; TASKS: first task submitted to last result.",
        "PICKLED: exact bytes of every message on the pool's pipes (task arguments out, results",
        "  back), counted by wrapping the pickler of multiprocessing.connection.",
        "COPIED TO SHM: the one copy of the array into shared memory, inside the parent.",
        "PEAK RSS: the parent's VmHWM (reset before each variant) plus each worker's; RSS counts",
        "  a shared page once in every process that maps it.",
    ]
    if not all(r.parent_peak_reset for r in reports.values()):
        lines.append("  (this kernel refused to reset VmHWM: the parent's peak is cumulative)")
    lines.append("")
    if problems:
        lines.append(f"RESULTS DIFFER in {len(problems)} of {cfg.tasks} tasks:")
        lines += [f"  {p}" for p in problems]
    else:
        lines.append(f"results: identical in all three variants ({cfg.tasks} tasks, bit for bit)")
    return "\n".join(lines)


def to_json(cfg: Config, reports: dict[str, VariantReport], problems: list[str]) -> dict[str, Any]:
    return {
        "size_bytes": cfg.size,
        "elements": cfg.elements,
        "dtype": "float64",
        "workers": cfg.workers,
        "tasks": cfg.tasks,
        "method": cfg.method,
        "variants": {name: reports[name].to_json() for name in VARIANTS},
        "speedup": speedups(reports),
        "results_agree": not problems,
        "differences": problems,
    }


# --------------------------------------------------------------------------
# the command


def make_data(elements: int) -> FloatArray:
    """Reproducible values in [-0.5, 0.5), made in place (no second copy)."""
    data: FloatArray = np.random.default_rng(SEED).random(elements)
    data -= 0.5
    return data


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``demo`` options (``--json`` is added by the CLI for every command)."""
    p.add_argument(
        "--size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="array size: 64M, 512M, 1G, ... (default: min(1G, MemAvailable/8))",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=DEFAULT_WORKERS,
        metavar="N",
        help="pool size (default 2)",
    )
    p.add_argument(
        "--tasks", type=_positive, default=DEFAULT_TASKS, metavar="N", help="tasks (default 8)"
    )
    p.add_argument(
        "--method",
        choices=("fork", "spawn", "forkserver"),
        default=DEFAULT_METHOD,
        help="start method (default spawn: workers inherit nothing, as on macOS, Windows and, "
        "with forkserver, Linux from Python 3.14)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when the three variants agree, 1 when they differ, 130 on Ctrl-C."""
    if args.size is None:
        size, note = default_size(), "min(1 GiB, MemAvailable/8); --size changes it"
    else:
        size, note = args.size, "--size"
    cfg = Config(
        size=size,
        workers=args.workers,
        tasks=args.tasks,
        method=args.method,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    if not args.json:
        print(intro(cfg, note), flush=True)
    avail = mem_available()
    need = cfg.size * (3 + 2 * cfg.workers)
    if avail is not None and need > avail and not args.quiet:
        print(
            f"warning: the plain variant may need about {human(need)}; {human(avail)} is available",
            file=sys.stderr,
        )
    reports: dict[str, VariantReport] = {}
    try:
        data = make_data(cfg.elements)
        for name in VARIANTS:
            reports[name] = RUNNERS[name](cfg, data)
    except KeyboardInterrupt:
        print("\ninterrupted: workers stopped, shared memory released", file=sys.stderr)
        return EXIT_INTERRUPTED
    problems = differences(reports, cfg.tasks)
    if args.json:
        print(json.dumps(to_json(cfg, reports, problems), indent=2))
    else:
        print(render(cfg, reports, problems))
    if problems:
        print(f"error: the variants' results differ in {len(problems)} tasks", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK
