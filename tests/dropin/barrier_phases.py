"""Workers run phases in lockstep: nobody starts phase k+1 before all finished phase k."""

import json
import multiprocessing as mp
import sys
from multiprocessing import Manager

WORKERS, PHASES = 3, 5


def run(barrier, log, lock, wid):
    for phase in range(PHASES):
        with lock:
            log.append((phase, wid))
        barrier.wait()


if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    with Manager() as manager:
        barrier = manager.Barrier(WORKERS)
        log = manager.list()
        lock = manager.Lock()
        procs = [mp.Process(target=run, args=(barrier, log, lock, w)) for w in range(WORKERS)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        phases = [phase for phase, _ in log]
        print(
            json.dumps(
                {
                    "lockstep": phases == sorted(phases),
                    "entries": sorted(tuple(e) for e in log),
                    "parties": barrier.parties,
                    "broken": barrier.broken,
                }
            )
        )
