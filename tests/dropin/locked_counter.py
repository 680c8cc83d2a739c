"""A counter incremented under a Lock by several processes."""

import json
import multiprocessing as mp
import sys
from multiprocessing import Manager

WORKERS, ROUNDS = 4, 250


def bump(counter, lock, hits):
    for _ in range(ROUNDS):
        with lock:
            counter.value += 1
    with lock:
        hits.append(mp.current_process().name != "")


if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    with Manager() as manager:
        counter = manager.Value("i", 0)
        lock = manager.Lock()
        hits = manager.list()
        procs = [mp.Process(target=bump, args=(counter, lock, hits)) for _ in range(WORKERS)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        print(
            json.dumps(
                {
                    "value": counter.value,
                    "hits": list(hits),
                    "exitcodes": [p.exitcode for p in procs],
                }
            )
        )
