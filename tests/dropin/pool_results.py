"""A shared dict of results, filled by a Pool's workers."""

import json
import multiprocessing as mp
import sys
from multiprocessing import Manager


def work(args):
    results, i = args
    results[i] = {"square": i * i, "name": f"item-{i}"}
    return i


if __name__ == "__main__":
    mp.set_start_method(sys.argv[1])
    with Manager() as manager:
        results = manager.dict()
        with mp.Pool(3) as pool:
            done = pool.map(work, [(results, i) for i in range(40)])
        out = {"done": done, "results": sorted((k, v) for k, v in results.items())}
        out["len"] = len(results)
        print(json.dumps(out))
