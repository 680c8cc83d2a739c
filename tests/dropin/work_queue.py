"""A work queue with several producers and consumers, ended by sentinels."""

import json
import multiprocessing as mp
import sys
from multiprocessing import Manager

PRODUCERS, CONSUMERS, ITEMS = 3, 2, 200


def produce(tasks, pid):
    for i in range(ITEMS):
        tasks.put((pid, i))


def consume(tasks, done):
    while True:
        item = tasks.get()
        if item is None:
            break
        done.put(item)
    done.put("finished")


if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    with Manager() as manager:
        tasks, done = manager.Queue(), manager.Queue()
        producers = [mp.Process(target=produce, args=(tasks, p)) for p in range(PRODUCERS)]
        consumers = [mp.Process(target=consume, args=(tasks, done)) for _ in range(CONSUMERS)]
        for proc in producers + consumers:
            proc.start()
        for proc in producers:
            proc.join()
        for _ in consumers:
            tasks.put(None)
        got, finished = [], 0
        while finished < CONSUMERS:
            item = done.get(timeout=60)
            if item == "finished":
                finished += 1
            else:
                got.append(tuple(item))
        for proc in consumers:
            proc.join()
        print(json.dumps({"items": sorted(got), "count": len(got), "empty": tasks.empty()}))
