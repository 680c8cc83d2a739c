"""The soak: many processes hammer one heap while a supervisor SIGKILLs them.

    python tests/soak/engine.py --seconds 1800 --workers 8 --report soak.json

Workers (forked, ``--workers`` of them at all times) loop over random
operations on one manager's heap: raw blocks, shared arrays, a dict, a list,
a queue (producers and consumers), and a lock guarding a critical section.
Every ``--kill-every`` seconds the supervisor SIGKILLs a random worker and
starts a new *incarnation* in its place.  Everything a worker does leaves
evidence in shared memory that survives its death:

* **Dict values** are self-checking records ``(key, incarnation, seq, payload,
  crc)``: a reader that sees a record whose crc does not match saw a torn value.
* **Queue messages** are ``(incarnation, seq, payload, crc)``.  A producer
  writes "about to put seq" and then "put seq" into its row of a shared log;
  a consumer appends every id it got to its own row *after* get returned.  At
  the end the queue is drained and the books are balanced: nothing delivered
  twice; everything put delivered exactly once, except at most one message per
  consumer killed (the one it was holding) and the one a producer killed
  mid-put may or may not have sent.
* **The lock** guards a shared "inside" word: a holder finds it 0, sets its
  id, sleeps a little, clears it.  Finding it set means two holders at once,
  unless the lock reported that the previous holder died inside.
* **Blocks and arrays** are filled with a per-incarnation pattern and checked
  before they are freed: another process writing into them means the
  allocator handed the same memory out twice.
* **Heartbeats**: each worker bumps its slot after every operation.  If the
  total does not move for ``--stall`` seconds the run fails as a deadlock
  (each worker dumps its stack on SIGUSR1 first, for the report).

The supervisor runs ``heap.check()`` and the containers' ``_check()`` every
few seconds while all this goes on, and once more at the end, and compares
the System V objects before and after.  Violations are collected, not
asserted on the spot, so one run reports all of them.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import signal
import sys
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# column layout of the shared bookkeeping arrays
LOG = 16384  # ids an incarnation may consume (it stops consuming when its log is full)
P_INTENT, P_DONE = 0, 1  # producer row: seq about to be put, last seq put (-1: none)


@dataclass
class Settings:
    seconds: float = 60.0
    workers: int = 8
    kill_every: float = 1.0
    stall: float = 30.0
    seed: int = 0
    check_every: float = 3.0
    keys: int = 64
    maxsize: int = 256


@dataclass
class Report:
    settings: dict[str, Any] = field(default_factory=dict)
    duration: float = 0.0
    operations: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    incarnations: int = 0
    checks: int = 0
    messages_put: int = 0
    messages_delivered: int = 0
    messages_lost_to_killed_consumers: int = 0
    messages_of_killed_producers_delivered: int = 0
    owner_died_seen: int = 0
    violations: list[str] = field(default_factory=list)
    ipc_before: list[str] = field(default_factory=list)
    ipc_after: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


OPS = ("block", "array", "dict_set", "dict_get", "dict_update", "list", "put", "get", "lock")


def crc(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


def _pattern(inc: int, n: int) -> bytes:
    return bytes([(inc * 37 + 11) % 251 + 1]) * n


class Shared:
    """Everything the workers share, made by the supervisor before forking."""

    def __init__(self, smm: Any, s: Settings) -> None:
        self.d = smm.dict()
        self.lst = smm.list()
        self.q = smm.Queue(s.maxsize)
        self.lock = smm.Lock()
        self.inside = smm.zeros(1, dtype=np.int64)  # the critical section's witness
        n = self.max_inc = s.workers + int(s.seconds / s.kill_every) + 16
        self.beats = smm.zeros(n, dtype=np.int64)
        self.ops = smm.zeros((n, len(OPS)), dtype=np.int64)
        self.prod = smm.zeros((n, 2), dtype=np.int64)  # seqs of messages: 1, 2, ...
        self.cons = smm.zeros((n, LOG), dtype=np.int64)  # message ids got, +1
        self.ncons = smm.zeros(n, dtype=np.int64)
        self.bad = smm.zeros(n, dtype=np.int64)  # violations seen by workers
        self.died = smm.zeros(n, dtype=np.int64)  # owner_died reports
        self.heap = smm.heap


def _msg_id(inc: int, seq: int) -> int:
    return inc * 10_000_000 + seq


def worker(sh: Shared, inc: int, s: Settings, stop_at: float) -> None:
    """One incarnation's loop (runs in a forked child until killed or time is up)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    warnings.simplefilter("ignore")  # OwnerDiedWarning is expected here: we kill holders
    rng = random.Random(s.seed * 100_003 + inc)
    heap, d, lst, q, lock = sh.heap, sh.d, sh.lst, sh.q, sh.lock
    seq = 0
    pat = _pattern(inc, 1)[0]

    def bad(msg: str) -> None:
        sh.bad[inc] += 1
        print(f"[soak worker {inc}] VIOLATION: {msg}", file=sys.stderr, flush=True)

    while time.monotonic() < stop_at:
        op = rng.randrange(len(OPS))
        name = OPS[op]
        if name == "block":
            n = rng.choice((16, 64, 200, 1000, 5000, 40_000, 300_000))
            b = heap.alloc(n)
            b.buf[:] = _pattern(inc, n)
            if bytes(b.buf) != _pattern(inc, n):
                bad(f"block of {n} bytes changed under its owner")
            heap.free(b)
        elif name == "array":
            a = heap_array(sh, rng.choice((10, 1000, 100_000)))
            a[:] = pat
            if not (a == pat).all():
                bad("array changed under its owner")
            a.free()
        elif name == "dict_set":
            k = rng.randrange(s.keys)
            seq += 1
            payload = "x" * rng.choice((1, 10, 100, 1000, 10_000))
            d[k] = (k, inc, seq, payload, crc(k, inc, seq, payload))
        elif name == "dict_get":
            k = rng.randrange(s.keys)
            v = d.get(k)
            if v is not None and (v[0] != k or v[4] != crc(*v[:4])):
                bad(f"torn dict value at key {k}: {str(v)[:80]}")
        elif name == "dict_update":
            d.update_with("counter", lambda x: x + 1, default=0)
        elif name == "list":
            if rng.random() < 0.5 or len(lst) < 10:
                seq += 1
                lst.append((inc, seq, crc(inc, seq)))
            else:
                try:
                    v = lst.pop(0) if rng.random() < 0.5 else lst[rng.randrange(len(lst))]
                except IndexError:
                    v = None  # emptied by another worker meanwhile
                if v is not None and v[2] != crc(*v[:2]):
                    bad(f"torn list item {v}")
            if len(lst) > 500:
                del lst[:250]
        elif name == "put":
            mseq = int(sh.prod[inc, P_DONE]) + 1  # messages are numbered 1, 2, ... per incarnation
            payload = b"m" * rng.choice((8, 100, 5000))
            sh.prod[inc, P_INTENT] = mseq
            try:
                q.put((inc, mseq, payload, crc(inc, mseq, payload)), timeout=0.5)
            except Exception:  # queue.Full: not sent
                sh.prod[inc, P_INTENT] = mseq - 1
            else:
                sh.prod[inc, P_DONE] = mseq
        elif name == "get":
            if sh.ncons[inc] >= LOG:
                continue  # its log is full: leave the messages to others
            try:
                m = q.get(timeout=0.2)
            except Exception:  # queue.Empty
                m = None
            if m is not None:
                i, sq, payload, c = m
                if c != crc(i, sq, payload):
                    bad(f"torn message {str(m)[:80]}")
                n = sh.ncons[inc]
                sh.cons[inc, n] = _msg_id(i, sq) + 1
                sh.ncons[inc] = n + 1
        elif name == "lock":
            if not lock.acquire(timeout=s.stall):
                bad("lock not acquired within the stall time")
                continue
            try:
                if getattr(lock, "owner_died", False):
                    sh.died[inc] += 1
                    sh.inside[0] = 0  # its holder died inside: the witness is stale
                if sh.inside[0] != 0:
                    bad(f"two holders in the critical section ({sh.inside[0]} and {inc + 1})")
                sh.inside[0] = inc + 1
                time.sleep(rng.random() * 0.002)
                sh.inside[0] = 0
            finally:
                lock.release()
        sh.ops[inc, op] += 1
        sh.beats[inc] += 1


def heap_array(sh: Shared, n: int) -> Any:
    from sharedobj.arrays import new_array

    return new_array(sh.heap, (n,), np.uint8, "C", zero=False)


def _ipc() -> list[str]:
    out = []
    for path, kind in (("/proc/sysvipc/shm", "shm"), ("/proc/sysvipc/sem", "sem")):
        try:
            with open(path) as f:
                out += [f"{kind} {line.split()[1]}" for line in f.readlines()[1:]]
        except OSError:
            pass
    return sorted(out)


def _ipc_detail(ids: set[int]) -> list[str]:
    from sharedobj import limits

    return [
        f"shmid {i.shmid}: {i.size} bytes, nattch {i.nattch}, mode {i.mode:o}, cpid {i.cpid}, "
        f"lpid {i.lpid} (supervisor {os.getpid()})"
        for i in limits.list_segments()
        if i.shmid in ids
    ]


def run(s: Settings) -> Report:
    from sharedobj import SharedMemoryManager

    rep = Report(settings=asdict(s))
    rng = random.Random(s.seed)
    start = time.monotonic()
    stop_at = start + s.seconds
    smm = SharedMemoryManager()
    smm.start()
    try:
        sh = Shared(smm, s)
        children: dict[int, int] = {}  # pid -> incarnation
        killed: set[int] = set()
        inc_next = 0

        def spawn() -> None:
            nonlocal inc_next
            inc = inc_next
            inc_next += 1
            if inc >= sh.max_inc:
                raise RuntimeError("too many incarnations for the bookkeeping arrays")
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    worker(sh, inc, s, stop_at)
                except BaseException as e:  # a crash is a violation: report it
                    print(f"[soak worker {inc}] crashed: {e!r}", file=sys.stderr, flush=True)
                    sh.bad[inc] += 1
                    code = 1
                os._exit(code)
            children[pid] = inc

        for _ in range(s.workers):
            spawn()
        last_kill = last_check = time.monotonic()
        last_total, last_move = -1, time.monotonic()
        while time.monotonic() < stop_at:
            time.sleep(0.05)
            now = time.monotonic()
            if now - last_kill >= s.kill_every and children and now < stop_at - 1.0:
                pid = rng.choice(sorted(children))
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                inc = children.pop(pid)
                rep.kills += 1
                killed.add(inc)
                spawn()
                last_kill = now
            if now - last_check >= s.check_every:
                _check(sh, rep, "during the run")
                last_check = time.monotonic()
            total = int(sh.beats.sum())
            if total != last_total:
                last_total, last_move = total, now
            elif now - last_move > s.stall:
                for pid in children:
                    os.kill(pid, signal.SIGUSR1)
                time.sleep(1.0)
                rep.violations.append(f"no progress for {s.stall:.0f} s: deadlock (stacks above)")
                break
        # Workers stop by themselves at stop_at; one that does not within the
        # stall time is stuck: dump its stack, kill it, report a deadlock.
        deadline = max(stop_at, time.monotonic()) + s.stall
        while children:
            for pid in list(children):
                if rep.violations and "deadlock" in rep.violations[-1]:
                    os.kill(pid, signal.SIGKILL)
                got, status = os.waitpid(pid, os.WNOHANG)
                if got:
                    inc = children.pop(pid)
                    if status != 0 and not (rep.violations and "deadlock" in rep.violations[-1]):
                        rep.violations.append(f"worker {inc} exited with status {status}")
            if children and time.monotonic() > deadline:
                for pid in children:
                    os.kill(pid, signal.SIGUSR1)
                time.sleep(1.0)
                rep.violations.append(
                    f"workers {sorted(children.values())} still running {s.stall:.0f} s after the "
                    f"end: deadlock (stacks above)"
                )
            time.sleep(0.02)
        rep.duration = time.monotonic() - start
        rep.incarnations = inc_next
        _check(sh, rep, "at the end")
        _balance(sh, rep, inc_next, killed)
        rep.operations = {op: int(sh.ops[:inc_next, i].sum()) for i, op in enumerate(OPS)}
        rep.owner_died_seen = int(sh.died.sum())
        nbad = int(sh.bad.sum())
        if nbad:
            rep.violations.append(f"{nbad} violations seen by workers (their stderr has each)")
    finally:
        smm.shutdown()
    return rep


def run_isolated(s: Settings) -> Report:
    """:func:`run` in a child process, then compare the System V objects once it is gone.

    Segments marked for removal live until their last process exits, so the
    comparison is only meaningful after the whole soak (supervisor included)
    has exited.
    """
    import tempfile

    before = _ipc()
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                rep = run(s)
                with open(out.name, "w") as f:
                    json.dump(asdict(rep), f)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        text = out.read()
    if not text:
        rep = Report(settings=asdict(s))
        rep.violations.append(f"the supervisor died (wait status {status})")
    else:
        rep = Report(**json.loads(text))
    rep.ipc_before = before
    for _ in range(50):  # workers' last references go within moments
        rep.ipc_after = _ipc()
        if rep.ipc_after == before:
            break
        time.sleep(0.1)
    new = sorted(set(rep.ipc_after) - set(before))
    if new:
        detail = _ipc_detail({int(x.split()[1]) for x in new if x.startswith("shm")})
        rep.violations.append(f"System V objects left behind: {new} {detail}")
    return rep


def _check(sh: Shared, rep: Report, when: str) -> None:
    rep.checks += 1
    problems = sh.heap.check()
    for name, obj in (("dict", sh.d), ("list", sh.lst), ("queue", sh.q)):
        checker = getattr(obj, "_check", None)
        if checker is not None:
            problems += [f"{name}: {p}" for p in checker()]
    rep.violations += [f"{when}: {p}" for p in problems]


def _balance(sh: Shared, rep: Report, n: int, killed: set[int]) -> None:
    """Drain the queue; every message delivered at most once, and exactly once except
    the one each killed worker may have been holding."""
    delivered: list[int] = []
    for inc in range(n):
        delivered += [int(x) - 1 for x in sh.cons[inc, : int(sh.ncons[inc])]]
    while True:
        try:
            m = sh.q.get(timeout=0.2)
        except Exception:  # queue.Empty: drained
            break
        delivered.append(_msg_id(m[0], m[1]))
    seen: set[int] = set()
    dups = []
    for m in delivered:
        if m in seen:
            dups.append(m)
        seen.add(m)
    if dups:
        rep.violations.append(f"{len(dups)} messages delivered twice, e.g. {dups[:5]}")
    put: set[int] = set()
    maybe: set[int] = set()  # a killed producer's message in flight: sent or not
    for inc in range(n):
        done, intent = int(sh.prod[inc, P_DONE]), int(sh.prod[inc, P_INTENT])
        put.update(_msg_id(inc, q) for q in range(1, done + 1))
        if intent > done and inc in killed:
            maybe.add(_msg_id(inc, intent))
    extra = seen - put - maybe
    if extra:
        rep.violations.append(
            f"{len(extra)} delivered messages were never put: {sorted(extra)[:5]}"
        )
    missing = put - seen
    rep.messages_put = len(put)
    rep.messages_delivered = len(seen)
    rep.messages_lost_to_killed_consumers = len(missing)
    rep.messages_of_killed_producers_delivered = len(maybe & seen)
    if len(missing) > len(killed):
        rep.violations.append(
            f"{len(missing)} messages lost, more than the {len(killed)} killed workers could hold: "
            f"{sorted(missing)[:5]}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--kill-every", type=float, default=1.0)
    ap.add_argument("--stall", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--report", help="write the JSON report here")
    a = ap.parse_args(argv)
    s = Settings(a.seconds, a.workers, a.kill_every, a.stall, a.seed)
    rep = run_isolated(s)
    doc = asdict(rep) | {"ok": rep.ok}
    text = json.dumps(doc, indent=2)
    if a.report:
        with open(a.report, "w") as f:
            f.write(text)
    ops = sum(rep.operations.values())
    print(
        f"soak: {rep.duration:.0f} s, {s.workers} workers, {rep.incarnations} incarnations, "
        f"{rep.kills} kills, {ops} operations ({ops / max(rep.duration, 1e-9):.0f}/s), "
        f"{rep.checks} checks, {rep.messages_delivered} messages delivered, "
        f"{rep.messages_lost_to_killed_consumers} lost to killed consumers, "
        f"{len(rep.violations)} violations"
    )
    for v in rep.violations:
        print("  VIOLATION:", v)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
